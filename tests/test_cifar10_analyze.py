"""The image-model analysis path: the same tracker and estimators behind a network interface."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff_info as jdi
from jaxdiff_info import decisions as D
from jaxdiff_info import mixture as M
from jaxdiff_info import schedule as S
from jaxdiff_info import unet
from jaxdiff_info.analysis import analyze_model
from jaxdiff_info.tracking import Tracker

SCHEDULE = S.linear_schedule(1000)
PAPER = M.make_mixture([-8.0, -4.0, 6.0, 8.0])
PROBLEMS = [D.class_label(4), D.make_problem("left vs right", [[0, 1], [2, 3]], 4),
            D.make_problem("6 vs 8", [[2], [3]], 4)]


def _exact(schedule=SCHEDULE):
    return jdi.exact_curves(PAPER, PROBLEMS, schedule)


def _analyze(mix, schedule, problems, **kw):
    """The analytic mixture behind eps(params, x_t, t, k), through the image-model code path."""
    network = jdi.Network(M.eps_fn(SCHEDULE), mix, (1,), 4)
    return analyze_model(network, schedule, problems, sampler=S.Sampler("ddpm", "small"), **kw)


@pytest.fixture(scope="module")
def mixture_as_network():
    """The analytic mixture behind eps(params, x_t, t, k), through the image-model code path."""
    return _analyze(PAPER, SCHEDULE, PROBLEMS, samples_per_class=600, key=jax.random.key(0), batch_size=300,
                    num_resamples=50)


def test_mixture_behind_the_network_interface_gives_the_mixture_curves(mixture_as_network):
    res = mixture_as_network
    exact = _exact()
    assert np.abs(res.curves.entropy_bits - exact.entropy_bits).max() < 0.04
    np.testing.assert_allclose(res.curves.peak_time[1:], exact.peak_time[1:], atol=0.04)
    # the hierarchy: the coarse decision (left vs right) comes before the fine one in generation
    assert res.curves.peak_time[1] > res.curves.peak_time[2] + 0.2
    np.testing.assert_allclose(res.curves.half_time, exact.half_time, atol=0.03)
    assert res.curves.half_time[1] > res.curves.half_time[2] + 0.2
    # per-class profiles average to the class-label curve
    np.testing.assert_allclose(res.class_curves.entropy_bits.mean(axis=0), res.curves.entropy_bits[0], atol=1e-5)
    # every trajectory ends on its own point; posteriors are distributions
    np.testing.assert_allclose(res.x_0[:, 0], np.repeat([-8.0, -4.0, 6.0, 8.0], 600), atol=0.05)
    np.testing.assert_allclose(res.mean_posterior.sum(-1), 1.0, atol=1e-5)
    assert res.mean_posterior[0, 0, 0] > 0.99 and abs(res.mean_posterior[-1, 0, 0] - 0.25) < 1e-6
    assert [s[0] for s in res.snapshots][0] == 1000 and res.snapshots[-1][0] == 0


def test_unconditional_generation_reweights_to_each_problem():
    res = _analyze(PAPER, SCHEDULE, PROBLEMS, samples_per_class=400, key=jax.random.key(1),
                   generation="unconditional", num_resamples=20)
    assert res.class_curves is None
    assert np.abs(res.curves.entropy_bits - _exact().entropy_bits).max() < 0.05


def test_respaced_schedule_uses_the_respaced_kernel():
    """Sampling with 100 of the model's 1000 steps: eps is asked at the model's own steps."""
    short = S.respace(SCHEDULE, 100)
    res = _analyze(PAPER, short, PROBLEMS, samples_per_class=500, key=jax.random.key(2), num_resamples=20)
    assert np.abs(res.curves.entropy_bits - _exact(short).entropy_bits).max() < 0.05
    np.testing.assert_allclose(res.x_0[:, 0], np.repeat([-8.0, -4.0, 6.0, 8.0], 500), atol=0.05)


def test_too_few_samples_per_class():
    with pytest.raises(ValueError, match="samples-per-class must be >= 2"):
        _analyze(PAPER, SCHEDULE, PROBLEMS, samples_per_class=1, key=jax.random.key(0))


TINY = unet.UNetConfig(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, num_classes=3,
                       image_size=8, channels=3, num_groups=4)


def _random_params(config, seed):
    rng = np.random.default_rng(seed)

    def draw(leaf):
        scale = 1 / math.sqrt(math.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.5
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree.map(draw, unet.abstract_params(config))


def test_all_classes_in_one_call_equal_classes_one_by_one():
    """The tracker's batched evaluation (N trajectories x K+1 classes in one network call, or in
    chunks of trajectories) gives what evaluating each class separately gives."""
    params = _random_params(TINY, 0)
    eps = unet.make_eps_fn(TINY)
    schedule = S.respace(SCHEDULE, 5)
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
    log_w = jnp.log(jnp.full((6, 3), 1 / 3))
    classes = jnp.array([0, 1, 2, 3, 0, 1])  # class 3 = unconditional
    for batch_size in (None, 4):
        tracker = Tracker(eps, schedule, S.Sampler("ddpm", "large"), 3, guidance=1.5, batch_size=batch_size)
        state = tracker.init(jax.random.key(5), 6, (8, 8, 3), jnp.zeros(3))
        state = type(state)(x, log_w, state.key)
        new, _ = jax.jit(lambda s: tracker.run(params, s, classes, jnp.array([3]), None, True))(state)
        # by hand: one class at a time
        beta, ab = schedule.betas[2], schedule.alpha_bar[2]
        sigma = jnp.sqrt(beta)
        zs = jax.random.normal(jax.random.fold_in(state.key, 3), x.shape)
        for n in range(6):
            per_class = [eps(params, x[n], schedule.timesteps[2], k) for k in range(4)]
            guided = [per_class[k] + 1.5 * (per_class[k] - per_class[3]) for k in range(3)] + [per_class[3]]
            means = [(x[n] - beta / jnp.sqrt(1 - ab) * e) / jnp.sqrt(1 - beta) for e in guided]
            x_prev = means[int(classes[n])] + sigma * zs[n]
            np.testing.assert_allclose(new.x[n], x_prev, atol=2e-5)
            log_lik = np.array([-float(jnp.sum((x_prev - means[k]) ** 2)) / (2 * float(sigma) ** 2) for k in range(3)])
            expected = np.asarray(log_w[n]) + log_lik
            np.testing.assert_allclose(new.log_posterior[n], expected - np.logaddexp.reduce(expected), atol=5e-3)


_EIGHT = r"""
import os, sys
import numpy as np, jax
import jaxdiff_info
from jaxdiff_info.analysis import analyze_model
from jaxdiff_info import mixture as M, decisions as D, schedule as S
s = S.linear_schedule(200)
mix = M.make_mixture([-8.0, -4.0, 6.0, 8.0])
net = jaxdiff_info.Network(M.eps_fn(s), mix, (1,), 4)
every = sys.argv[2] == "every"  # every estimator (I-MMSE, a mixture's forward MC and exact readout), or online
res = analyze_model(net, s, [D.class_label(4)], samples_per_class=16, key=jax.random.key(3),
                    sampler=S.Sampler("ddpm", "small"), num_resamples=10, immse=every,
                    held_out=(np.linspace(-9, 9, 64, dtype=np.float32)[:, None], np.repeat(np.arange(4), 16)))
out = dict(h=res.curves.entropy_bits, x0=res.x_0, devices=len(jax.devices()))
if every:
    ref = analyze_model(mix, s, [D.class_label(4)], samples_per_class=16, key=jax.random.key(3),
                        sampler=S.Sampler("ddpm", "small"), num_resamples=10)
    out.update(immse=res.immse.entropy_bits, immse_model=res.immse_model.class_information_bits,
               forward=ref.forward_mc.entropy_bits, ref_immse=ref.immse.entropy_bits,
               state=ref.curves.exact_state.entropy_bits)
np.savez(sys.argv[1], **out)
"""


@pytest.mark.parametrize("which", ["online", pytest.param("every", marks=pytest.mark.slow)])
def test_eight_host_devices_give_the_same_result(tmp_path, which):
    outs = {}
    for n in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        path = tmp_path / f"{n}.npz"
        r = subprocess.run([sys.executable, "-c", _EIGHT, str(path), which], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[n] = np.load(path)
    assert int(outs[8]["devices"]) == 8 and int(outs[1]["devices"]) == 1
    np.testing.assert_allclose(outs[8]["x0"], outs[1]["x0"], atol=1e-5)
    names = ("h", "immse", "immse_model", "forward", "ref_immse", "state") if which == "every" else ("h",)
    for name in names:  # every estimator, split 8 ways
        np.testing.assert_allclose(outs[8][name], outs[1][name], atol=1e-5, err_msg=name)
