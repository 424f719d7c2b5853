"""The analytic mixture against its definitions: densities, scores (autodiff), Tweedie, sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff_info import mixture as M
from jaxdiff_info import schedule as S

MIX = M.make_mixture([[-2.0, 1.0], [0.5, 0.0], [3.0, -1.0]], [0.7, 0.0, 1.3], [0.2, 0.5, 0.3])


def test_1d_density_integrates_to_one_and_posterior_is_bayes():
    mix = M.make_mixture([-8, -4, 6, 8], [0.0, 0.5, 0.0, 2.0], [1, 2, 3, 4])
    x = jnp.linspace(-30, 30, 200_001)[:, None]
    for ab in [0.999, 0.5, 0.01]:
        p = jnp.exp(jax.vmap(M.log_prob, (None, 0, None))(mix, x, ab))
        assert float(jnp.trapezoid(p, x[:, 0])) == pytest.approx(1.0, abs=1e-4)
    post = jnp.exp(M.log_posterior(mix, jnp.array([1.0]), 0.3))
    joint = mix.weights * jnp.exp(M.log_prob_given_class(mix, jnp.array([1.0]), 0.3))
    np.testing.assert_allclose(post, joint / joint.sum(), rtol=1e-5)


@pytest.mark.parametrize("ab", [0.9, 0.3, 0.02])
def test_scores_are_gradients_of_log_densities(ab):
    x = jnp.array([0.4, -0.3])
    np.testing.assert_allclose(M.score(MIX, x, ab), jax.grad(M.log_prob, 1)(MIX, x, ab), rtol=1e-4, atol=1e-5)
    for k in range(3):
        g = jax.grad(lambda x: M.log_prob_given_class(MIX, x, ab)[k])(x)
        np.testing.assert_allclose(M.score(MIX, x, ab, k), g, rtol=1e-4, atol=1e-5)
    # k = K is the unconditional prediction, like a network's null class
    np.testing.assert_allclose(M.score(MIX, x, ab, 3), M.score(MIX, x, ab), rtol=1e-6)
    np.testing.assert_allclose(M.eps(MIX, x, ab, 1), -math.sqrt(1 - ab) * M.score(MIX, x, ab, 1), rtol=1e-6)


@pytest.mark.parametrize("ab", [0.9, 0.3])
def test_denoiser_is_tweedie(ab):
    """E[x_0 | x_t] = (x_t + (1 - abar) grad log p(x_t)) / sqrt(abar), per class and overall."""
    x = jnp.array([0.4, -0.3])
    for k in [0, 1, 2, None]:
        tweedie = (x + (1 - ab) * M.score(MIX, x, ab, k)) / math.sqrt(ab)
        np.testing.assert_allclose(M.denoiser(MIX, x, ab, k), tweedie, rtol=1e-4, atol=1e-5)


def test_denoiser_by_monte_carlo():
    """E[x_0 | x_t, k] from joint samples of one class, binned near a point (1-D)."""
    mix = M.make_mixture([1.0], [0.8])
    ab = 0.5
    key0, key1 = jax.random.split(jax.random.key(0))
    x0 = 1.0 + 0.8 * jax.random.normal(key0, (2_000_000,))
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * jax.random.normal(key1, x0.shape)
    near = jnp.abs(xt - 0.9) < 0.02
    mc = float(jnp.sum(jnp.where(near, x0, 0)) / jnp.sum(near))
    assert mc == pytest.approx(float(M.denoiser(mix, jnp.array([0.9]), ab, 0)[0]), abs=0.02)


def test_sampling_moments():
    s = S.linear_schedule(1000)
    xs, ks = M.sample_xt(MIX, jax.random.key(0), 200_000, s, 400)
    ab = float(s.alpha_bar[399])
    np.testing.assert_allclose(np.bincount(np.asarray(ks)) / 200_000, MIX.weights, atol=5e-3)
    for k in range(3):
        sel = xs[ks == k]
        np.testing.assert_allclose(sel.mean(0), math.sqrt(ab) * MIX.means[k], atol=0.02)
        var = ab * float(MIX.stds[k]) ** 2 + 1 - ab
        np.testing.assert_allclose(sel.var(0), var, rtol=0.03)
    x0, k0 = M.sample_x0(MIX, jax.random.key(1), 1000)
    point = np.asarray(x0)[np.asarray(k0) == 1]
    np.testing.assert_allclose(point, np.broadcast_to(MIX.means[1], point.shape))  # std 0: the point itself


def test_zero_weight_component_is_never_chosen():
    mix = M.make_mixture([-1.0, 1.0], [0.0, 0.0], [0.0, 1.0])
    _, ks = M.sample_x0(mix, jax.random.key(0), 1000)
    assert np.all(np.asarray(ks) == 1)
    lp = M.log_posterior(mix, jnp.array([-1.0]), 0.9)
    assert np.isneginf(float(lp[0])) and float(lp[1]) == 0.0
    assert np.all(np.isfinite(np.asarray(M.score(mix, jnp.array([-1.0]), 0.9))))


def test_extreme_values_stay_finite():
    mix = M.make_mixture([-1e3, 1e3], [0.0, 0.0], [1e-6, 1.0])
    for ab in [0.9999, 0.5, 1e-5]:
        for x in [-1e3, 0.0, 1e3]:
            xx = jnp.array([x * math.sqrt(ab)])
            assert np.all(np.isfinite(np.asarray(M.log_posterior(mix, xx, ab))))
            for k in [0, 1, 2]:
                assert np.all(np.isfinite(np.asarray(M.eps(mix, xx, ab, k))))


@pytest.mark.parametrize("kwargs, match", [
    (dict(means=[0, 1], stds=[0, -1]), "stds must be finite numbers >= 0"),
    (dict(means=[0, 1], stds=[0, float("nan")]), "stds must be finite"),
    (dict(means=[0, 1], stds=[0, float("inf")]), "stds must be finite"),
    (dict(means=[0, 1], stds=[0, 0], weights=[1, -1]), "weights must be finite numbers >= 0"),
    (dict(means=[0, 1], stds=[0, 0], weights=[0, 0]), "must not all be zero"),
    (dict(means=[0, 1], stds=[0]), "one entry per component"),
    (dict(means=[0, 1], stds=[0, 0], weights=[1, 1, 1]), "one entry per component"),
    (dict(means=[[0, 1], [1]], stds=[0, 0]), "consistent shape"),
    (dict(means=[0, 1], stds="ab"), "stds must be numbers"),
    (dict(means=[], stds=[]), "non-empty"),
    (dict(means=[0, float("nan")], stds=[0, 0]), "means must be finite"),
])
def test_bad_mixtures(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.make_mixture(**kwargs)


def test_class_only_eps_matches_the_full_one():
    s = S.linear_schedule(100)
    full, fast = M.eps_fn(s), M.eps_fn(s, with_null=False)
    x = jnp.array([0.4, -0.3])
    for k in range(3):
        np.testing.assert_allclose(fast(MIX, x, 40, k), full(MIX, x, 40, k), rtol=1e-5, atol=1e-6)
    assert np.all(np.isnan(np.asarray(fast(MIX, x, 40, 3))))  # no null class: loud, not wrong
