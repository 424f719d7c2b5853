"""The experiments: `python -m experiments.gmm`, `python -m experiments.cifar10`."""


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs between runs (a second run skips compilation):
    `jaxdiff_info.enable_compilation_cache` (in $JAXDIFF_INFO_CACHE, else
    ~/.cache/jaxdiff_info/xla; JAXDIFF_INFO_CACHE=off disables it)."""
    import jaxdiff_info  # sets XLA flags before the backend starts

    jaxdiff_info.enable_compilation_cache()
