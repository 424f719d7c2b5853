"""The online classifier's step: the recursion of docs/method.md, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff_info import decisions as D
from jaxdiff_info import estimators as E
from jaxdiff_info import mixture as M
from jaxdiff_info import schedule as S
from jaxdiff_info.tracking import Tracker

SCHEDULE = S.linear_schedule(1000)
MIX = M.make_mixture([[-2.0, 1.0], [0.5, 0.0], [3.0, -1.0]], [0.7, 0.0, 1.3], [0.2, 0.5, 0.3])


@pytest.mark.parametrize("variance", ["small", "large"])
def test_step_is_bayes_rule_with_the_variance_of_the_step_taken(variance):
    sampler = S.Sampler("ddpm", variance)
    tracker = Tracker(M.eps_fn(SCHEDULE), SCHEDULE, sampler, 3)
    x = jnp.array([0.3, -0.2])
    log_w = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    z = jnp.array([0.7, -1.1])
    t = jnp.asarray(400)
    x_prev, log_w_prev = tracker.step_one(MIX, t, x, log_w, 1, z, False)
    ab, beta = float(SCHEDULE.alpha_bar[399]), float(SCHEDULE.betas[399])
    ab_prev = float(SCHEDULE.alpha_bar[398])
    var = beta if variance == "large" else beta * (1 - ab_prev) / (1 - ab)
    mus = [(x - beta / np.sqrt(1 - ab) * M.eps(MIX, x, ab, k)) / np.sqrt(1 - beta) for k in range(3)]
    np.testing.assert_allclose(x_prev, mus[1] + np.sqrt(var) * z, rtol=1e-5)
    log_lik = np.array([-np.sum((np.asarray(x_prev) - np.asarray(mu)) ** 2) / (2 * var) for mu in mus])
    expected = np.asarray(log_w) + log_lik
    expected -= np.logaddexp.reduce(expected)
    np.testing.assert_allclose(log_w_prev, expected, atol=2e-4)


def test_no_update_on_the_noiseless_last_step():
    tracker = Tracker(M.eps_fn(SCHEDULE), SCHEDULE, S.Sampler(), 3)
    log_w = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    x_prev, log_w_prev = tracker.step_one(MIX, jnp.asarray(1), jnp.array([0.3, -0.2]), log_w, 0, jnp.ones(2), False)
    np.testing.assert_allclose(log_w_prev, log_w)
    mu = (jnp.array([0.3, -0.2]) - SCHEDULE.betas[0] / jnp.sqrt(1 - SCHEDULE.alpha_bar[0])
          * M.eps(MIX, jnp.array([0.3, -0.2]), SCHEDULE.alpha_bar[0], 0)) / jnp.sqrt(1 - SCHEDULE.betas[0])
    np.testing.assert_allclose(x_prev, mu, rtol=1e-6)


def test_guided_and_unconditional_kernels():
    """Guidance w: class kernels use eps_k + w (eps_k - eps_null); class K generates unconditionally."""
    w = 2.0
    tracker = Tracker(M.eps_fn(SCHEDULE), SCHEDULE, S.Sampler("ddpm", "large"), 3, guidance=w)
    x, z, t = jnp.array([0.3, -0.2]), jnp.array([0.1, 0.4]), jnp.asarray(300)
    ab, beta = SCHEDULE.alpha_bar[299], SCHEDULE.betas[299]
    mean = lambda e: (x - beta / jnp.sqrt(1 - ab) * e) / jnp.sqrt(1 - beta)
    null = M.eps(MIX, x, ab)
    guided = [M.eps(MIX, x, ab, k) + w * (M.eps(MIX, x, ab, k) - null) for k in range(3)]
    x_prev, _ = tracker.step_one(MIX, t, x, jnp.log(jnp.ones(3) / 3), 2, z, True)
    np.testing.assert_allclose(x_prev, mean(guided[2]) + jnp.sqrt(beta) * z, rtol=1e-5)
    x_prev, _ = tracker.step_one(MIX, t, x, jnp.log(jnp.ones(3) / 3), 3, z, True)
    np.testing.assert_allclose(x_prev, mean(null) + jnp.sqrt(beta) * z, rtol=1e-5)


def test_tracker_is_permutation_equivariant():
    order = [2, 0, 1]
    perm = M.permute(MIX, order)
    tracker = Tracker(M.eps_fn(SCHEDULE), SCHEDULE, S.Sampler(), 3)
    x, z, t = jnp.array([0.3, -0.2]), jnp.array([0.1, 0.4]), jnp.asarray(250)
    log_w = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    a = tracker.step_one(MIX, t, x, log_w, 0, z, False)
    b = tracker.step_one(perm, t, x, log_w[jnp.asarray(order)], order.index(0), z, False)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1][jnp.asarray(order)], b[1], atol=1e-5)


def test_deterministic_sampler_is_refused():
    with pytest.raises(ValueError, match="stochastic sampler"):
        Tracker(M.eps_fn(SCHEDULE), SCHEDULE, S.Sampler("ddim", eta=0.0), 3)


def test_chunked_run_equals_one_scan():
    """Progress chunks (with no-op padding) change nothing: same key, same numbers."""
    schedule = S.linear_schedule(50)
    tracker = Tracker(M.eps_fn(schedule), schedule, S.Sampler(), 3)
    problems = D.membership([D.class_label(3)], 3)
    blocks = E.make_blocks(3, 10, 4)
    whole = E.online_block_sums(tracker, MIX, MIX.log_weights, (2,), problems, blocks, jax.random.key(0))
    calls = []
    parts = E.online_block_sums(tracker, MIX, MIX.log_weights, (2,), problems, blocks, jax.random.key(0),
                                chunk=7, progress=calls.append)
    assert sum(calls) == 50 and len(calls) == 8
    np.testing.assert_allclose(whole.block_sums, parts.block_sums, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(whole.x_0, parts.x_0, rtol=1e-6)
    assert whole.block_sums.shape == (50, 3, 4, 1)


def test_ddim_with_noise_tracks_too():
    schedule = S.linear_schedule(200)
    mix = M.make_mixture([-4.0, 4.0])
    tracker = Tracker(M.eps_fn(schedule), schedule, S.Sampler("ddim", eta=1.0), 2)
    blocks = E.make_blocks(2, 500)
    run = E.online_block_sums(tracker, mix, mix.log_weights, (1,), D.membership([D.class_label(2)], 2), blocks,
                              jax.random.key(0))
    h = run.block_sums.sum(axis=2)[:, :, 0] / 500
    closed = np.asarray(E.symmetric_two_class_entropy_bits(schedule.alpha_bar, 4.0, 0.0))
    assert np.abs(h.mean(axis=1) - closed).max() < 0.05
