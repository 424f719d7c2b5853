"""The cost of tracking all K classes, against K plain network evaluations and against a
PyTorch loop that evaluates the classes one call at a time, the way published code does.

    python -m benchmarks.analyze_speed [--config tiny] [--trajectories 16] [--steps 10] [--reps 3]

Per reverse step, all three variants evaluate the network on the same B trajectories x K
classes (B * K images):

  track   jaxdiff_info's compiled loop: Tracker.run with the per-step entropy statistics
          (one vmapped network call of B * K examples, the step, the log-weight update)
  plain   the same B * K network evaluations in a compiled scan, and nothing else
  torch   a Python loop over steps and, inside it, over classes: K calls of batch B to the
          PyTorch port (benchmarks/torch_unet.py), then the step and the log-weight update

Reported: seconds per step (median of --reps), the overhead of tracking over plain network
calls (target <= 10%), and torch / track. Needs the `bench` extra (torch).
"""

from __future__ import annotations

import argparse
import time

import jaxdiff_info  # noqa: F401  (XLA:CPU flags before the backend starts)
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info import decisions, estimators, unet
from jaxdiff_info.schedule import Sampler, linear_schedule, respace
from jaxdiff_info.tracking import Tracker


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def jax_variants(config, params, trajectories: int, steps: int):
    """Compiled `track` and `plain` runs over the same steps; returns two thunks."""
    K = config.num_classes
    schedule = respace(linear_schedule(1000), steps)
    eps = unet.make_eps_fn(config)
    tracker = Tracker(eps, schedule, Sampler("ddpm", "large"), K)
    blocks = estimators.make_blocks(K, trajectories // K)
    membership = decisions.membership([decisions.class_label(K)], K)
    classes = jnp.asarray(blocks.classes)
    ts = jnp.arange(steps, 0, -1)
    shape = (config.image_size, config.image_size, config.channels)
    state = tracker.init(jax.random.key(0), classes.shape[0], shape, jnp.zeros(K))

    def observe(t, x, log_post, log_ratio):
        return estimators.block_entropy_sums(log_post, membership, blocks)

    track = jax.jit(lambda p, s: tracker.run(p, s, classes, ts, observe, False))

    all_classes = jax.vmap(jax.vmap(eps, (None, None, None, 0)), (None, 0, None, None))

    def plain_body(x, t):
        e = all_classes(params, x, schedule.timesteps[t - 1], jnp.arange(K))  # (B, K, H, W, C)
        return x - 1e-3 * e.mean(axis=1), None

    plain = jax.jit(lambda p, x: jax.lax.scan(plain_body, x, ts)[0])
    jax.block_until_ready(track(params, state))  # compile
    jax.block_until_ready(plain(params, state.x))
    return (lambda: track(params, state)), (lambda: plain(params, state.x)), schedule


def torch_variant(config_name, config, params, trajectories: int, schedule):
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting threads distort shared machines
    import torch

    from benchmarks import torch_unet

    torch.set_num_threads(2)
    model = torch_unet.build(config_name, config)
    torch_unet.load_jax_params(model, params)
    model.eval()
    K = config.num_classes
    betas = torch.tensor(np.asarray(schedule.betas))
    abar = torch.tensor(np.asarray(schedule.alpha_bar))
    timesteps = torch.tensor(np.asarray(schedule.timesteps)).long()
    n = trajectories // K
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(n * K, config.channels, config.image_size, config.image_size, generator=gen)
    own = torch.arange(K).repeat_interleave(n)

    @torch.no_grad()
    def run():
        x = x0.clone()
        log_w = torch.full((n * K, K), -np.log(K))
        for i in range(schedule.num_steps, 0, -1):
            beta, ab = betas[i - 1], abar[i - 1]
            t = timesteps[i - 1].repeat(n * K)
            means = []
            for k in range(K):  # one network call per class
                e = model(x, t, torch.full((n * K,), k, dtype=torch.long))
                means.append((x - beta / torch.sqrt(1 - ab) * e) / torch.sqrt(1 - beta))
            means = torch.stack(means, 1)  # (N, K, C, H, W)
            sigma = torch.sqrt(beta)
            x = means[torch.arange(n * K), own] + sigma * torch.randn(x.shape, generator=gen)
            if i > 1:
                sq = ((x[:, None] - means) ** 2).flatten(2).sum(-1)
                log_w = torch.log_softmax(log_w - 0.5 * sq / sigma**2, dim=-1)
            p = log_w.exp()
            _ = -(p * log_w).sum(-1)  # the per-step entropy, as the JAX loop computes
        return x

    run()  # warm-up
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", choices=sorted(unet.CONFIGS))
    p.add_argument("--trajectories", type=int, default=20, help="B, a multiple of the number of classes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    a = p.parse_args(argv)
    config = unet.get_config(a.config)
    K = config.num_classes
    if a.trajectories % K:
        p.error(f"--trajectories must be a multiple of the {K} classes")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.05 * rng.standard_normal(leaf.shape), jnp.float32),
                          unet.abstract_params(config))
    track, plain, schedule = jax_variants(config, params, a.trajectories, a.steps)
    torch_run = None if a.no_torch else torch_variant(a.config, config, params, a.trajectories, schedule)
    results = {"track": [], "plain": [], "torch": []}
    for _ in range(a.reps):  # interleaved, so that load on the machine hits all alike
        results["track"].append(_median_time(track, 1))
        results["plain"].append(_median_time(plain, 1))
        if torch_run is not None:
            results["torch"].append(_median_time(torch_run, 1))
    med = {k: float(np.median(v)) / a.steps for k, v in results.items() if v}
    images = a.trajectories * K
    print(f"config {a.config}, B = {a.trajectories} trajectories x K = {K} classes = {images} images per step, "
          f"{a.steps} steps, median of {a.reps}")
    print(f"  track  {med['track'] * 1e3:9.1f} ms/step   {a.trajectories / med['track']:8.1f} trajectory-steps/s")
    print(f"  plain  {med['plain'] * 1e3:9.1f} ms/step   (the B*K network evaluations alone)")
    print(f"  tracking overhead over plain network calls: {100 * (med['track'] / med['plain'] - 1):+.1f}%")
    if "torch" in med:
        print(f"  torch  {med['torch'] * 1e3:9.1f} ms/step   (K calls of batch B per step)")
        print(f"  torch / track: {med['torch'] / med['track']:.2f}x")


if __name__ == "__main__":
    main()
