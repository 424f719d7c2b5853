"""What each estimator costs to reach a 0.02-bit standard error on the class-label curve of a
trained network: the online classifier against I-MMSE (held-out data and the model's samples),
measured in one run on the same steps.

    python -m benchmarks.immse_cost [--checkpoint checkpoints/tiny-shapes] [--steps 50]
                                    [--samples-per-class 8] [--target 0.02] [--out FILE]

Each estimator runs once with n samples per class on the same respaced schedule; its standard
error at step t is the 95% bootstrap half-width over 1.96, and SE_max is the largest over t of
the class label's H(Y | X_t). Monte Carlo error falls as 1/sqrt(n), so the samples per class
that reach the target are n (SE_max / target)^2, and the network calls and the wall time (from
the run's own seconds, compilation excluded by a warm-up run on 2 samples per class) scale with
them. Network calls per sample and step: K for the online classifier (every class), 2 for
I-MMSE (the sample's class and the null class). Reported: calls and seconds to the target per
estimator, and their ratios to the online classifier.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jaxdiff_info as jdi
import jax
import numpy as np

from jaxdiff_info import training, unet
from jaxdiff_info.analysis import IMAGE_SAMPLER
from jaxdiff_info.data import load_dataset, to_model_range


def max_standard_error(curves, from_time: float = 0.0) -> float:
    """The largest over the steps with t/T >= from_time of the class label's 95% half-width
    / 1.96, in bits."""
    keep = curves.time >= from_time
    lo, hi = curves.entropy_bits_ci95[0, keep, 0], curves.entropy_bits_ci95[0, keep, 1]
    return float(np.max(hi - lo) / (2 * 1.96))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.numpy.zeros(()))
    return out, time.perf_counter() - start


def measure(checkpoint: Path, steps: int, per_class: int, seed: int = 0, from_time: float = 0.5) -> dict:
    model = training.load_checkpoint(checkpoint)
    K = model.config.num_classes
    shape = (model.config.image_size, model.config.image_size, model.config.channels)
    network = jdi.Network(unet.make_eps_fn(model.config), model.params, shape, K, has_null=model.has_null)
    schedule = jdi.respace(jdi.linear_schedule(model.num_train_steps), steps)
    data = load_dataset(model.dataset, "data", split="test", seed=training.DATA_SEED)
    x_data, y_data = to_model_range(data.images), data.labels
    label = [jdi.class_label(K, "class")]
    key = jax.random.key(seed)

    def online(n):
        return jdi.online_curves(network, label, schedule, samples_per_class=n, key=key, sampler=IMAGE_SAMPLER,
                                 state_readout=False)

    def immse(n, x_0, labels, estimator):
        return jdi.immse_curves(network, label, schedule, samples_per_class=n, key=jax.random.fold_in(key, 1),
                                x_0=x_0, labels=labels, estimator=estimator)

    # warm-up (compilation) on 2 samples per class; then the measured runs
    warm = online(2)
    immse(2, x_data, y_data, "immse")
    immse(2, warm.trajectories.x_0, warm.trajectories.classes, "immse_model")
    run_online, t_online = timed(lambda: online(per_class))
    traj = run_online.trajectories
    run_data, t_data = timed(lambda: immse(per_class, x_data, y_data, "immse"))
    run_model, t_model = timed(lambda: immse(per_class, traj.x_0, traj.classes, "immse_model"))
    rows = {}
    for name, curves, seconds, calls_per_sample_step in (("online", run_online, t_online, K),
                                                         ("immse", run_data, t_data, 2),
                                                         ("immse_model", run_model, t_model, 2)):
        rows[name] = {"seconds": seconds, "max_standard_error_bits": max_standard_error(curves),
                      "max_standard_error_bits_from_time": max_standard_error(curves, from_time),
                      "network_calls": calls_per_sample_step * K * per_class * steps,
                      "calls_per_sample_and_step": calls_per_sample_step}
    return {"checkpoint": str(checkpoint), "model": f"{model.config_name} on {model.dataset}, step {model.step}",
            "steps": steps, "samples_per_class": per_class, "num_classes": K, "from_time": from_time, "rows": rows}


def to_target(result: dict, target: float, field: str = "max_standard_error_bits") -> dict:
    """Samples per class, network calls and seconds for each estimator to reach the standard
    error `field` (SE_max over all steps, or over t/T >= from_time) = target, and the ratios to
    the online classifier."""
    out = {}
    for name, row in result["rows"].items():
        factor = (row[field] / target) ** 2
        out[name] = {"samples_per_class": result["samples_per_class"] * factor,
                     "network_calls": row["network_calls"] * factor, "seconds": row["seconds"] * factor}
    base = out["online"]
    for name, row in out.items():
        row["calls_ratio_to_online"] = row["network_calls"] / base["network_calls"]
        row["seconds_ratio_to_online"] = row["seconds"] / base["seconds"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.immse_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/tiny-shapes"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples-per-class", type=int, default=8)
    p.add_argument("--target", type=float, default=0.02, help="standard error to reach, bits")
    p.add_argument("--from-time", type=float, default=0.5,
                   help="also the standard error over t/T >= this only (a network's I-MMSE diverges toward t = 0)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    a = p.parse_args(argv)
    result = measure(a.checkpoint, a.steps, a.samples_per_class, from_time=a.from_time)
    result["target_standard_error_bits"] = a.target
    result["to_target"] = to_target(result, a.target)
    result["to_target_from_time"] = to_target(result, a.target, "max_standard_error_bits_from_time")
    print(f"{result['model']}: {a.steps} steps, {a.samples_per_class} samples per class, "
          f"class label, target SE {a.target} bits")
    for label, key, field in (("all steps", "to_target", "max_standard_error_bits"),
                              (f"t/T >= {a.from_time}", "to_target_from_time", "max_standard_error_bits_from_time")):
        print(f"SE_max over {label}")
        print(f"  {'estimator':<12s} {'s (run)':>8s} {'SE_max':>7s} {'n to target':>11s} {'calls to target':>15s} "
              f"{'s to target':>11s} {'calls/online':>12s} {'s/online':>8s}")
        for name, row in result["rows"].items():
            t = result[key][name]
            print(f"  {name:<12s} {row['seconds']:8.1f} {row[field]:7.4f} {t['samples_per_class']:11.0f} "
                  f"{t['network_calls']:15.3g} {t['seconds']:11.0f} {t['calls_ratio_to_online']:12.2f} "
                  f"{t['seconds_ratio_to_online']:8.2f}")
    if a.out is not None:
        a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
