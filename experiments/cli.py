"""The command-line edge shared by the experiments: argument parsing with one-line errors,
defaults in every help line, running a command with bad input reported as one line and exit
status 2 and Ctrl-C as one line and exit status 130, the check that a run fits in memory, and
the printout of what was written."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence


class HelpFormatter(argparse.HelpFormatter):
    """Appends each flag's default to its help line, unless the help already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.option_strings == []:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            return text
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr with exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


MAX_RESAMPLES = 100_000  # R x steps x problems must stay within XLA's 32-bit dimensions


def resamples(text: str) -> int:
    """argparse type of --bootstrap: an integer from 2 (an interval needs two) to MAX_RESAMPLES."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 2 <= n <= MAX_RESAMPLES:
        raise argparse.ArgumentTypeError(f"must be from 2 (an interval needs two resamples) to {MAX_RESAMPLES}, got {n}")
    return n


def folder(text: str) -> Path:
    """argparse type of an output or checkpoint folder: a path that names something."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty path")
    return Path(text)


def positive_int(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def finite_nonnegative(text: str) -> float:
    """argparse type of a scale or weight: a finite number >= 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (x >= 0 and x < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return x


def run_command(prog: str, command: Callable[[], object], *, out: Path | None = None,
                outputs: Sequence[str] = ()) -> tuple[int, object]:
    """Run `command()`; bad input (ValueError) becomes one line "prog: error: ..." on stderr
    and exit status 2, Ctrl-C one line "prog: interrupted; ..." and exit status 130. With
    `out` (the run's output folder; `outputs`, its result files) that line says that nothing
    was written, and that the results already there are unchanged. Returns (status, what
    the command returned)."""
    previous = _watch_interrupts()
    try:
        return 0, command()
    except (ValueError, FloatingPointError) as e:  # bad input, or settings that made the numbers non-finite
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"{prog}: {interrupted_note(out, outputs)}", file=sys.stderr)
        _exit_if_command(130)
        return 130, None
    finally:
        if previous is not None:
            handler, hook, quiet = previous
            signal.signal(signal.SIGINT, handler)
            if sys.unraisablehook is quiet:  # else a hook installed since wraps it: keep the chain
                sys.unraisablehook = hook


class _Interrupts:
    """Whether Ctrl-C was pressed during the running command. A KeyboardInterrupt that arrives
    while Python runs a finaliser is ignored, so the commands re-raise it at checkpoints."""

    seen = False


def _watch_interrupts():
    """Install the SIGINT handler of a command (main thread only), and keep quiet about a
    KeyboardInterrupt that a finaliser swallowed (a checkpoint raises it again); returns the
    previous handler and hook, and the new hook."""
    _Interrupts.seen = False
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_sigint(signum, frame):
        _Interrupts.seen = True
        raise KeyboardInterrupt

    hook = sys.unraisablehook

    def quiet(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            hook(unraisable)

    sys.unraisablehook = quiet
    return signal.signal(signal.SIGINT, on_sigint), hook, quiet


def checkpoint() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed during the running command (call it between
    chunks of work and before results are moved into place)."""
    if _Interrupts.seen:
        raise KeyboardInterrupt


def with_checkpoint(update: Callable[[int], object]) -> Callable[[int], object]:
    """A progress callback that first re-raises a Ctrl-C the command may have lost."""
    def progress(n: int):
        checkpoint()
        return update(n)

    return progress


def _close_progress_bars() -> None:
    """End the lines of the progress bars an interrupted run left open."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _exit_if_command(status: int) -> None:
    """Exit at once, without the interpreter's teardown, when this process is one of the
    experiments' commands (python -m experiments...): an interrupted run can leave JAX
    compiling in a background thread, and tearing the runtime down under it crashes
    (SIGSEGV). A process that only called the command (tests, a notebook) goes on."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.split(".")[0] == "experiments":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def interrupted_note(out: Path | None, outputs: Sequence[str]) -> str:
    """What a run stopped by Ctrl-C left behind: nothing, and the earlier results as they were."""
    if out is None:
        return "interrupted"
    note = "interrupted; nothing was written"
    if any((Path(out) / name).exists() for name in outputs):
        note += f"; the results in {out} are unchanged"
    return note


# --- memory ---------------------------------------------------------------------------------------

def available_memory() -> tuple[int, str]:
    """Bytes free for a run's arrays, and where: (n, "") for this machine's memory (MemAvailable,
    within a cgroup's limit), (n, " on gpu") for an accelerator's (JAX's default device)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f" on {jax.local_devices()[0].platform}"
    return host_memory(), ""


def host_memory() -> int:
    """Bytes of this machine's memory available to a new allocation."""
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            cgroup = Path("/sys/fs/cgroup")
            free = min(free, int((cgroup / limit).read_text()) - int((cgroup / usage).read_text()))
        except (OSError, ValueError):  # no such cgroup file, or "max": no limit
            continue
    return max(free, 0)


def check_memory(flag: str, value: int, needed: Callable[[int], int], *, minimum: int = 1,
                 alternative: Callable[[int], str | None] | None = None) -> None:
    """ValueError, one line, if `needed(value)` bytes (an estimate, increasing in the flag's
    value) exceed the memory available: the estimate, what is available and the largest value
    of `flag` that fits; alternative(available bytes): another way to fit, or None."""
    need = needed(value)
    available, where = available_memory()
    if need <= available:
        return
    largest = largest_fitting(needed, available, minimum, value)
    ways = [f"{flag} {largest} or less"] if largest is not None else []
    other = alternative(available) if alternative is not None else None
    ways += [other] if other else []
    advice = f"use {', or '.join(ways)}" if ways else "free some memory or use a larger machine"
    raise ValueError(f"{flag} {value} needs about {_gb(need)} of memory, {_gb(available)} are available{where}; "
                     f"{advice}")


def largest_fitting(needed: Callable[[int], int], available: int, low: int, high: int) -> int | None:
    """The largest n in [low, high] with needed(n) <= available (None if not even low)."""
    if needed(low) > available:
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if needed(mid) <= available else (low, mid - 1)
    return low


def _gb(n: int) -> str:
    return f"{n / 1e9:.0f} GB" if n >= 1e10 else f"{n / 1e9:.1f} GB"


def report_written(outputs: Sequence[str], out: Path, start: float) -> None:
    """The "wrote ..." line of a finished run (start: time.perf_counter() at its start)."""
    print(f"wrote {', '.join(outputs)} to {out}/ in {time.perf_counter() - start:.1f} s")


def describe_times(problem: dict, estimator: str) -> str:
    """A decision problem's peak and half-entropy times from its summary.json entry, with
    95% intervals where the estimator has them; "never halves" where H stays above half."""
    peak = f"peak t/T {problem['peak_time'][estimator]:.3f}"
    ci = problem["peak_time_ci95"].get(estimator)
    if ci is not None:
        peak += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    half = problem["half_time"][estimator]
    if half <= 0:
        return f"{peak},  H never halves"
    text = f"{peak},  half of H resolved at t/T {half:.3f}"
    ci = problem["half_time_ci95"].get(estimator)
    if ci is not None:
        text += (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci[0] > 0
                 else f" (95% CI up to {ci[1]:.3f}; never halves in some resamples)")
    return text
