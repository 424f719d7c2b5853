"""The experiments: `python -m experiments.gmm`, `python -m experiments.cifar10`."""

import os
from pathlib import Path


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs between runs (a second run skips compilation).

    In $JAXDIFF_INFO_CACHE, else $XDG_CACHE_HOME/jaxdiff_info/xla, else ~/.cache/jaxdiff_info/xla;
    JAXDIFF_INFO_CACHE=off disables it.
    """
    import jaxdiff_info  # noqa: F401  (sets XLA flags before the backend starts)
    import jax

    where = os.environ.get("JAXDIFF_INFO_CACHE")
    if where == "off":
        return
    if not where:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        where = Path(base) / "jaxdiff_info" / "xla"
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
