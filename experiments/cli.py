"""The command-line edge shared by the experiments: argument parsing with one-line errors,
defaults in every help line, running a command with bad input reported as one line and exit
status 2, and the printout of what was written."""

from __future__ import annotations

import argparse
import sys
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


def run_command(prog: str, command: Callable[[], object]) -> tuple[int, object]:
    """Run `command()`; bad input (ValueError) becomes one line "prog: error: ..." on stderr
    and exit status 2. Returns (status, what the command returned)."""
    try:
        return 0, command()
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2, None


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
