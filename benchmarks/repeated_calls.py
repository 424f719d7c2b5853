"""A study over seeds: the cost of calling each estimator again with another key.

    python -m benchmarks.repeated_calls              # ~1 min
    python -m benchmarks.repeated_calls --calls 6 --samples 1000

The paper's 1-D mixture (means -8, -4, 6, 8, std 1), T = `--steps` (1000), the class label and "6 vs 8",
`--samples` per class. Each estimator is called `--calls` times with keys 0, 1, ...; the first
call compiles, the later ones show what a loop over seeds pays per call: the median of their
wall times and the seconds XLA spent compiling in them (jax.monitoring's
backend_compile_duration). Each configuration runs in a process of its own: without the
persistent compilation cache, and with `jaxdiff_info.enable_compilation_cache` in an empty
temporary folder (a repeat then loads the program instead of compiling it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ESTIMATORS = ("exact", "forward_mc", "online", "immse")


def worker(cache: str | None, calls: int, samples: int, steps: int) -> dict:
    import time

    import jaxdiff_info as jdi
    import jax

    if cache:
        jdi.enable_compilation_cache(cache)
    compile_s = [0.0]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compile_s.__setitem__(0, compile_s[0] + secs)
        if event.endswith("backend_compile_duration") else None)
    schedule = jdi.linear_schedule(steps)
    mix = jdi.make_mixture([-8.0, -4.0, 6.0, 8.0])
    problems = [jdi.class_label(4), jdi.make_problem("6 vs 8", [[2], [3]], 4)]
    calls_of = {
        "exact": lambda key: jdi.exact_curves(mix, problems, schedule),
        "forward_mc": lambda key: jdi.forward_mc_curves(mix, problems, schedule, samples_per_class=samples, key=key),
        "online": lambda key: jdi.online_curves(mix, problems, schedule, samples_per_class=samples, key=key),
        "immse": lambda key: jdi.immse_curves(mix, problems, schedule, samples_per_class=samples, key=key),
    }
    result = {}
    for name in ESTIMATORS:
        walls, compiles = [], []
        for seed in range(calls):
            compile_s[0] = 0.0
            start = time.perf_counter()
            curves = calls_of[name](jax.random.key(seed))
            jax.block_until_ready(curves.entropy_bits)
            walls.append(time.perf_counter() - start)
            compiles.append(compile_s[0])
        result[name] = {"wall_s": walls, "compile_s": compiles}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4, help="calls per estimator (the first compiles)")
    parser.add_argument("--samples", type=int, default=400, help="samples per class")
    parser.add_argument("--steps", type=int, default=1000, help="T of the linear schedule (at least 21)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.calls < 2 or args.samples < 2 or args.steps < 21:
        parser.error("--calls and --samples must be at least 2, --steps at least 21")
    if args.worker is not None:
        print(json.dumps(worker(args.worker or None, args.calls, args.samples, args.steps)))
        return
    print(f"# repeated calls: paper mixture, T = {args.steps}, {args.samples} samples per class, "
          f"{args.calls} calls each; load average {os.getloadavg()[0]:.2f} at the start")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, cache in (("no disk cache", ""), ("enable_compilation_cache", os.path.join(tmp, "xla"))):
            cmd = [sys.executable, "-m", "benchmarks.repeated_calls", "--calls", str(args.calls), "--samples",
                   str(args.samples), "--steps", str(args.steps), "--worker", cache]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAXDIFF_INFO_CACHE": "off"})
            if out.returncode != 0:
                sys.exit(f"worker failed:\n{out.stderr[-3000:]}")
            rows[label] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'estimator':<11} {'disk cache':<25} {'1st call s':>10} {'of it compile':>13} "
          f"{'later calls s':>13} {'of it compile':>13}")
    for name in ESTIMATORS:
        for label, result in rows.items():
            wall, comp = result[name]["wall_s"], result[name]["compile_s"]
            print(f"{name:<11} {label:<25} {wall[0]:10.2f} {comp[0]:13.2f} {statistics.median(wall[1:]):13.2f} "
                  f"{statistics.median(comp[1:]):13.2f}")


if __name__ == "__main__":
    main()
