"""benchmarks/repeated_calls.py: a short run prints every row, and its figures show what it
claims: repeats of the mixture estimators compile (almost) nothing, and with the disk cache
neither does a repeat of the online loop."""

import contextlib
import io

from benchmarks import repeated_calls


def test_a_short_run_shows_repeats_without_compilation():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        repeated_calls.main(["--calls", "2", "--samples", "4", "--steps", "30"])
    rows = {}
    for line in out.getvalue().splitlines()[2:]:
        name, *label, first, first_compile, later, later_compile = line.split()
        rows[name, " ".join(label)] = tuple(map(float, (first, first_compile, later, later_compile)))
    assert {name for name, _ in rows} == set(repeated_calls.ESTIMATORS) and len(rows) == 8
    for (name, label), (first, first_compile, later, later_compile) in rows.items():
        assert first > 0 and later > 0 and first_compile > 0, (name, label)
        if name != "online" or label == "enable_compilation_cache":
            assert later_compile < 0.25 * first_compile, (name, label)
