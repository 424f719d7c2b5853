"""jaxdiff_info: when does a diffusion model decide what it generates?

An online Bayesian classifier rides along the reverse dynamics and gives P(class | x_t);
from it, the conditional entropy H(Z | X_t) in bits of any decision problem Z and its
rate of change, whose peaks mark when each decision is made.

    import jaxdiff_info as jdi
    exact = jdi.exact_curves(mixture, problems, schedule)
    online = jdi.online_curves(mixture_or_network, problems, schedule, samples_per_class=..., key=...)
    immse = jdi.immse_curves(mixture, problems, schedule, samples_per_class=..., key=...)  # I-MMSE

The image-model analysis is `jaxdiff_info.analysis.analyze_model`; docs/method.md defines
every quantity and names the function that computes it.
"""

import os as _os


def _configure_xla_cpu() -> None:
    """XLA:CPU in jaxlib 0.10 hands elementwise fusions to YNNPACK by default; with it the
    tracking loop ran 1.4-2.4x slower in benchmarks/README.md (single small fusions up to
    100x). Turn it off, unless the user set the flag, before JAX starts its backends. Other
    jaxlib versions do not know the flag and are left alone."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        jaxlib_version = version("jaxlib")
    except PackageNotFoundError:
        return
    flags = _os.environ.get("XLA_FLAGS", "")
    if jaxlib_version.startswith("0.10.") and "xla_cpu_experimental_ynn_fusion_type" not in flags:
        _os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()


_configure_xla_cpu()


def enable_compilation_cache(directory=None) -> str | None:
    """Keep compiled XLA programs on disk, so that a call that compiles the same program again
    (the same estimator and shapes with another key, or a second run) loads it instead.

    In `directory`, else $JAXDIFF_INFO_CACHE, else $XDG_CACHE_HOME/jaxdiff_info/xla, else
    ~/.cache/jaxdiff_info/xla; JAXDIFF_INFO_CACHE=off (without `directory`) leaves the cache
    off. Every program is kept, however short its compilation. Returns the folder, or None
    when off. The experiments' commands call it.
    """
    import jax
    from pathlib import Path

    where = directory if directory is not None else _os.environ.get("JAXDIFF_INFO_CACHE")
    if where == "off":
        return None
    if not where:
        base = _os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        where = Path(base) / "jaxdiff_info" / "xla"
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return str(where)


from jaxdiff_info import curves, decisions, estimators, immse, mixture, schedule, tracking  # noqa: E402
from jaxdiff_info.api import Network, exact_curves, forward_mc_curves, immse_curves, online_curves  # noqa: E402
from jaxdiff_info.curves import Curves, ProblemCurves, entropy_rate, mutual_information_bits, peak_time  # noqa: E402
from jaxdiff_info.decisions import DecisionProblem, class_label, make_problem, one_vs_rest  # noqa: E402
from jaxdiff_info.mixture import GaussianMixture, make_mixture  # noqa: E402
from jaxdiff_info.schedule import Sampler, Schedule, cosine_schedule, linear_schedule, respace  # noqa: E402
from jaxdiff_info.tracking import Tracker  # noqa: E402

__all__ = [
    # the research API: one call per estimator, each returning Curves
    "exact_curves", "forward_mc_curves", "online_curves", "immse_curves", "Network", "Curves", "ProblemCurves",
    # the pieces they take
    "DecisionProblem", "make_problem", "class_label", "one_vs_rest", "GaussianMixture", "make_mixture",
    "Sampler", "Schedule", "cosine_schedule", "linear_schedule", "respace", "Tracker",
    "entropy_rate", "mutual_information_bits", "peak_time", "enable_compilation_cache",
    # the modules
    "curves", "decisions", "estimators", "immse", "mixture", "schedule", "tracking",
]
