"""The stderr of a process of a multi-process job, with JAX's fatal errors as one line.

When a process of a `jax.distributed` job dies or stops answering, JAX's coordination service
ends the others from C++ (absl LOG(FATAL)): several error lines, then the fatal one, then a
stack trace, then abort. Python cannot catch that, so `distributed.one_line_fatal_errors`
sends the process's stderr through this script, run as its own process:

    python jaxdiff_info/stderr_filter.py HEARTBEAT_SECONDS   (stdin: the stderr to filter)

Everything is passed on as it comes (progress bars included), except a block of the
coordination service's log lines: it is held, and becomes one line if a fatal log line follows
(the rest, stack trace included, is dropped), or is passed on unchanged after HOLD_SECONDS or
at the end. The script imports nothing of the library, so that it starts at once.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import time

HOLD_SECONDS = 5.0
# absl log lines of severity W, E or F from JAX's distributed runtime, e.g.
# "E1201 22:31:35.398042   10439 coordination_service.cc:1549] ..."
RUNTIME_LOG = re.compile(
    rb"[WEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (coordination_\w*|client|distributed\w*|preemption_\w*)\.(cc|h):\d+\]")
FATAL = re.compile(rb"F\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ?(.*)")
LINE_END = re.compile(rb"[\r\n]")


def one_line(fatal: bytes, heartbeat: str) -> bytes:
    """The fatal log line's first sentence, with what it means and what to do."""
    text = FATAL.match(fatal).group(1).decode("utf-8", "replace").strip()
    first = text.split(". ")[0].rstrip(".")
    return (f"error: {first or 'jax.distributed ended this process'}: another process of the job died or did not "
            f"answer for JAXDIFF_INFO_HEARTBEAT_TIMEOUT = {heartbeat} s; that process's own output says why\n").encode()


def run(source: int, sink: int, heartbeat: str) -> None:
    held: list[bytes] | None = None  # a block of runtime log lines, held back
    held_since = 0.0
    pending = b""                    # the start of a line not yet ended

    def write(data: bytes) -> None:
        if data:
            os.write(sink, data)

    while True:
        timeout = None if held is None else max(0.0, held_since + HOLD_SECONDS - time.monotonic())
        ready, _, _ = select.select([source], [], [], timeout)
        if not ready:  # no fatal error followed: pass the block on
            write(b"".join(held))
            held = None
            continue
        data = os.read(source, 1 << 16)
        if not data:
            break
        pending += data
        lines = []
        while (m := LINE_END.search(pending)) is not None:
            lines.append(pending[:m.end()])
            pending = pending[m.end():]
        for line in lines:
            if held is None:
                start = RUNTIME_LOG.search(line)  # (it may follow a progress bar on the same line)
                if start is None:
                    write(line)
                    continue
                write(line[:start.start()])
                line, held, held_since = line[start.start():], [], time.monotonic()
            fatal = FATAL.search(line)
            if fatal is not None:
                write(one_line(line[fatal.start():], heartbeat))
                while os.read(source, 1 << 16):  # drop the rest (the stack trace) until the end
                    pass
                return
            held.append(line)
        # a line still being written (a progress bar) goes on at once, up to where a log line
        # may be starting
        if held is None and pending:
            cut = max(pending.rfind(b"W"), pending.rfind(b"E"), pending.rfind(b"F"))
            write(pending if cut < 0 else pending[:cut])
            pending = b"" if cut < 0 else pending[cut:]
    write(b"".join(held or []) + pending)


if __name__ == "__main__":
    # Ctrl-C and SIGTERM reach the whole process group: the filtered process says what
    # happened, and this one passes it on until the end of its output.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run(0, 1, sys.argv[1] if len(sys.argv) > 1 else "?")
