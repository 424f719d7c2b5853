"""Schedules, the forward process, conversions and reverse steps against their definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff_info import schedule as S


def test_linear_schedule_matches_ddpm_definition():
    s = S.linear_schedule(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-5)
    np.testing.assert_allclose(s.alpha_bar, np.cumprod(1 - betas), rtol=1e-5)
    np.testing.assert_allclose(s.time, np.arange(1, 1001) / 1000, rtol=1e-6)
    assert float(s.alpha_bar[-1]) < 1e-4
    np.testing.assert_allclose(s.log_snr, np.log(s.alpha_bar / (1 - s.alpha_bar)), rtol=1e-4)
    np.testing.assert_allclose(np.exp(-2 * np.asarray(s.ou_time)), s.alpha_bar, rtol=1e-5)


def test_linear_schedule_scales_with_steps_and_cosine_is_monotone():
    short = S.linear_schedule(100)
    assert float(short.alpha_bar[-1]) < 1e-4  # noise still hides the data
    c = S.cosine_schedule(1000)
    ab = np.asarray(c.alpha_bar)
    assert np.all(np.diff(ab) < 0) and 0.99 < ab[0] < 1 and ab[-1] < 1e-6
    u = np.arange(1, 1001) / 1000
    f = lambda u: np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    np.testing.assert_allclose(ab[:990], (f(u) / f(0))[:990], rtol=1e-4)


@pytest.mark.parametrize("bad", [1, 0, -5, 2.5])
def test_bad_step_counts(bad):
    with pytest.raises(ValueError, match="integer >= 2"):
        S.linear_schedule(bad)


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
        S.make_schedule("quadratic")


def test_respace_keeps_marginals_and_model_steps():
    s = S.linear_schedule(1000)
    r = S.respace(s, 50)
    assert r.num_steps == 50 and int(r.timesteps[0]) == 1 and int(r.timesteps[-1]) == 1000
    np.testing.assert_allclose(r.alpha_bar, np.asarray(s.alpha_bar)[np.asarray(r.timesteps) - 1])
    np.testing.assert_allclose(np.cumprod(1 - np.asarray(r.betas, np.float64)), r.alpha_bar, rtol=1e-4)
    np.testing.assert_allclose(r.time, np.asarray(r.timesteps) / 1000)
    with pytest.raises(ValueError, match="only 1000"):
        S.respace(s, 2000)


def test_q_sample_moments():
    s = S.linear_schedule(1000)
    x0 = jnp.full((200_000,), 2.0)
    xt = S.q_sample(s, jax.random.key(0), x0, jnp.asarray(300))
    ab = float(s.alpha_bar[299])
    assert abs(float(xt.mean()) - 2 * math.sqrt(ab)) < 0.01
    assert abs(float(xt.var()) - (1 - ab)) < 0.01


def test_conversions_round_trip():
    key = jax.random.key(1)
    x0, eps = jax.random.normal(key, (2, 7))
    ab = jnp.float32(0.37)
    xt = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
    np.testing.assert_allclose(S.eps_to_x0(xt, eps, ab), x0, atol=1e-5)
    np.testing.assert_allclose(S.x0_to_eps(xt, x0, ab), eps, atol=1e-5)
    np.testing.assert_allclose(S.score_to_eps(S.eps_to_score(eps, ab), ab), eps, atol=1e-6)


def test_reverse_step_moments_and_variances():
    s = S.linear_schedule(1000)
    t = jnp.asarray(500)
    beta, ab, ab_prev = float(s.betas[499]), float(s.alpha_bar[499]), float(s.alpha_bar[498])
    beta_tilde = beta * (1 - ab_prev) / (1 - ab)
    small, large = S.Sampler("ddpm", "small"), S.Sampler("ddpm", "large")
    assert float(S.reverse_std(s, t, small)) == pytest.approx(math.sqrt(beta_tilde), rel=1e-5)
    assert float(S.reverse_std(s, t, large)) == pytest.approx(math.sqrt(beta), rel=1e-5)
    assert float(S.reverse_std(s, jnp.asarray(1), large)) == 0.0  # the last step is noiseless
    # DDPM posterior mean = DDIM mean at eta = 1 (both are the mean of q(x_{t-1} | x_t, x0_hat))
    x, e = jnp.array([0.3, -1.2]), jnp.array([0.5, 0.1])
    ddim1 = S.Sampler("ddim", eta=1.0)
    np.testing.assert_allclose(S.reverse_mean(s, t, x, e, small), S.reverse_mean(s, t, x, e, ddim1), rtol=1e-4)
    assert float(S.reverse_std(s, t, ddim1)) == pytest.approx(math.sqrt(beta_tilde), rel=1e-5)
    # DDIM eta = 0 is deterministic and maps x_t to sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps
    ddim0 = S.Sampler("ddim", eta=0.0)
    x0 = S.eps_to_x0(x, e, ab)
    np.testing.assert_allclose(S.reverse_mean(s, t, x, e, ddim0), math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * e, rtol=1e-4)
    assert float(S.reverse_std(s, t, ddim0)) == 0.0
    # the sample
    z = jax.random.normal(jax.random.key(3), (100_000, 2))
    xs = jax.vmap(lambda k: S.reverse_step(s, k, t, x, e, large))(jax.random.split(jax.random.key(3), 100_000))
    np.testing.assert_allclose(xs.mean(0), S.reverse_mean(s, t, x, e, large), atol=3e-3)
    np.testing.assert_allclose(xs.std(0), math.sqrt(beta), rtol=2e-2)
    del z


def test_sampler_validation():
    with pytest.raises(ValueError, match="variance"):
        S.Sampler("ddpm", "medium")
    with pytest.raises(ValueError, match="eta"):
        S.Sampler("ddim", eta=-1.0)
    with pytest.raises(ValueError, match="sampler"):
        S.Sampler("euler")


def test_clipped_x0_kernel_is_the_posterior_mean_of_the_clipped_prediction():
    s = S.linear_schedule(1000)
    t = jnp.asarray(300)
    x, e = jnp.array([0.3, -2.5]), jnp.array([0.5, -1.9])
    ab, ab_prev, beta = float(s.alpha_bar[299]), float(s.alpha_bar[298]), float(s.betas[299])
    x0 = np.clip(np.asarray(S.eps_to_x0(x, e, ab)), -1, 1)
    posterior_mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * np.asarray(x)
    clipped = S.Sampler("ddpm", "large", clip_x0=1.0)
    np.testing.assert_allclose(S.reverse_mean(s, t, x, e, clipped), posterior_mean, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(S.eps_to_x0(x, e, ab))).max() > 1  # the clip was active
