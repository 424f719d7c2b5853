"""The experiments: `python -m experiments.gmm`, `python -m experiments.cifar10`."""

import os as _os
import signal as _signal
import sys as _sys


def _interrupted_while_starting(signum, frame):
    """Ctrl-C before a command has installed its own handler (while Python imports JAX, or
    parses the flags): nothing has been written, so one line and exit status 130 at once.
    A KeyboardInterrupt raised there could land in a finaliser, which Python ignores, and the
    run would go on."""
    command = " ".join(_sys.orig_argv[1:3]) if len(getattr(_sys, "orig_argv", ())) >= 3 else "experiments"
    _os.write(2, f"python {command}: interrupted; nothing was written\n".encode())
    _os._exit(130)


# `python -m experiments.<name>` imports this package first, while sys.argv[0] is "-m"
if _sys.argv[:1] == ["-m"]:
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs between runs (a second run skips compilation):
    `jaxdiff_info.enable_compilation_cache` (in $JAXDIFF_INFO_CACHE, else
    ~/.cache/jaxdiff_info/xla; JAXDIFF_INFO_CACHE=off disables it)."""
    import jaxdiff_info  # sets XLA flags before the backend starts

    jaxdiff_info.enable_compilation_cache()
