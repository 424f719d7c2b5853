"""The I-MMSE estimator (information from denoising errors) against exact answers: quadrature,
the two-class closed form, the per-class KL in closed form, and the online classifier."""

import math

import jax
import numpy as np
import pytest

import jaxdiff_info as jdi
from jaxdiff_info import decisions as D
from jaxdiff_info import estimators as E
from jaxdiff_info import immse

PAPER = jdi.make_mixture([-8.0, -4.0, 6.0, 8.0])
PAPER_PROBLEMS = [jdi.class_label(4, "all four"), jdi.make_problem("{-8,-4} vs {6,8}", [[0, 1], [2, 3]], 4),
                  jdi.make_problem("6 vs 8", [[2], [3]], 4), jdi.one_vs_rest(0, 4)]
UNEQUAL = jdi.make_mixture([-3.0, 0.0, 4.0], [0.5, 1.0, 0.2], [0.2, 0.5, 0.3])
UNEQUAL_PROBLEMS = [jdi.class_label(3), jdi.make_problem("0 vs 2", [[0], [2]], 3),
                    jdi.make_problem("{0,1} vs 2", [[0, 1], [2]], 3)]
SHORT = jdi.linear_schedule(200)
MARGIN = 0.002  # bits: beside the bands, for steps where they are ~0 wide (H at 0 or at H(Z))


def assert_within_bands(curves, exact, max_error, fraction=0.9):
    """The exact curve inside the 95% band (widened by MARGIN) at >= fraction of the steps of
    every problem, and the largest error below max_error."""
    lo, hi = np.moveaxis(curves.entropy_bits_ci95, -1, 0)
    inside = ((lo - MARGIN <= exact) & (exact <= hi + MARGIN)).mean(axis=1)
    assert np.all(inside >= fraction), inside
    assert np.abs(curves.entropy_bits - exact).max() < max_error, np.abs(curves.entropy_bits - exact).max(axis=1)


@pytest.fixture(scope="module")
def paper():
    schedule = jdi.linear_schedule(1000)
    exact = jdi.exact_curves(PAPER, PAPER_PROBLEMS, schedule)
    return exact, jdi.immse_curves(PAPER, PAPER_PROBLEMS, schedule, samples_per_class=500, key=jax.random.key(0))


def test_paper_problems_match_quadrature(paper):
    exact, im = paper
    assert im.estimator == "immse" and im.posterior == "state (exact denoisers)" and "denoisers" in im.method
    assert_within_bands(im, exact.entropy_bits, max_error=0.02)
    np.testing.assert_allclose(im.prior_entropy_bits, exact.prior_entropy_bits)
    # the rate and its peak come from the same machinery: within a smoothing bandwidth of the exact peak
    # ("-8 vs rest" has two bumps of similar height, so its argmax is left out)
    np.testing.assert_allclose(im.peak_time[:3], exact.peak_time[:3], atol=0.02)
    np.testing.assert_allclose(im.half_time, exact.half_time, atol=0.01)
    assert np.abs(im.entropy_rate - exact.entropy_rate).max() < 0.35  # rates peak at ~4.5 bits per unit t/T
    assert np.all(np.diff(im.entropy_bits, axis=1) >= -1e-5)  # H grows with t: every integrand is >= 0


def test_subset_problem_is_about_its_own_classes(paper):
    """"6 vs 8" is posed on the sub-population of classes 2 and 3: H(Z) = 1 bit at t = T, not
    the entropy of those classes within the whole mixture."""
    exact, im = paper
    i = im.index("6 vs 8")
    assert im.entropy_bits[i, -1] == pytest.approx(1.0, abs=1e-3)
    assert np.abs(im.entropy_bits[i] - exact.entropy_bits[i]).max() < 0.02
    # classes outside the problem carry no weight, and their profiles say "no information"
    np.testing.assert_allclose(im.class_entropy_bits[i, :2], 1.0)


def test_unequal_weights_and_stds_match_quadrature():
    exact = jdi.exact_curves(UNEQUAL, UNEQUAL_PROBLEMS, SHORT)
    im = jdi.immse_curves(UNEQUAL, UNEQUAL_PROBLEMS, SHORT, samples_per_class=500, key=jax.random.key(1))
    assert_within_bands(im, exact.entropy_bits, max_error=0.03)
    # the per-class profiles average to the curve with the problems' own class weights
    arrays = D.problem_arrays(UNEQUAL_PROBLEMS, np.asarray(UNEQUAL.weights))
    np.testing.assert_allclose(np.einsum("pkt,pk->pt", im.class_entropy_bits, arrays.class_weights),
                               im.entropy_bits, atol=1e-5)
    # the class label: sum_k pi_k D_k = I(Y; X_t), exactly, and against quadrature
    information = np.asarray(UNEQUAL.weights) @ im.class_information_bits
    np.testing.assert_allclose(information, im.prior_entropy_bits[0] - im.entropy_bits[0], atol=1e-4)
    assert np.abs(information - (exact.prior_entropy_bits[0] - exact.entropy_bits[0])).max() < 0.03


def test_two_class_closed_form_in_five_dimensions():
    m = np.array([0.8, -0.4, 0.0, 0.6, 0.2])
    mix = jdi.make_mixture([m, -m], [0.5, 0.5])
    closed = np.asarray(E.symmetric_two_class_entropy_bits(SHORT.alpha_bar, float(np.linalg.norm(m)), 0.5))
    im = jdi.immse_curves(mix, None, SHORT, samples_per_class=500, key=jax.random.key(2))
    assert_within_bands(im, closed[None], max_error=0.02)


def point_class_information_bits(means, weights, alpha_bar, num_nodes=200):
    """(K, T) D_k(t) = KL(p(x_t | k) || p(x_t)) in bits of a 1-D mixture of points, by
    Gauss-Hermite quadrature: x_t = sqrt(abar) m_k + sqrt(1 - abar) z."""
    m, log_w = np.asarray(means, np.float64), np.log(np.asarray(weights, np.float64) / np.sum(weights))
    z, wz = np.polynomial.hermite_e.hermegauss(num_nodes)
    wz = wz / math.sqrt(2 * math.pi)
    a = np.sqrt(np.asarray(alpha_bar, np.float64))[None, :, None, None]
    v = 1.0 - a**2
    x = a * m[:, None, None, None] + np.sqrt(v) * z[None, None, :, None]  # (K, T, nodes, 1)
    log_ratio = -(x - a * m[None, None, None, :]) ** 2 / (2 * v) + (x - a * m[:, None, None, None]) ** 2 / (2 * v)
    log_mix = np.logaddexp.reduce(log_w + log_ratio, axis=-1)  # log p(x_t) - log p(x_t | k)
    return -(wz * log_mix).sum(axis=-1) / math.log(2.0)


def test_class_information_matches_closed_form_and_the_online_classifier():
    """D_k(t) per class on three points of unequal weights: I-MMSE against the per-class KL by
    quadrature, and the online classifier's E_k[log2 P(k | x_t) - log2 pi_k] (exact kernel on
    points) against I-MMSE, within the two estimates' own bands."""
    means, weights = [-2.0, 0.0, 3.0], [0.2, 0.5, 0.3]
    mix = jdi.make_mixture(means, weights=weights)
    exact = point_class_information_bits(means, weights, SHORT.alpha_bar)
    im = jdi.immse_curves(mix, None, SHORT, samples_per_class=400, key=jax.random.key(3), num_resamples=100)
    on = jdi.online_curves(mix, None, SHORT, samples_per_class=400, key=jax.random.key(4), num_resamples=100)
    assert on.posterior == "state (exact kernel)"
    for c in (im, on):
        assert c.class_information_bits.shape == (3, 200) and c.class_information_bits_ci95.shape == (3, 200, 2)
        lo, hi = np.moveaxis(c.class_information_bits_ci95, -1, 0)
        assert np.all(lo <= c.class_information_bits + 1e-5) and np.all(c.class_information_bits <= hi + 1e-5)
    lo, hi = np.moveaxis(im.class_information_bits_ci95, -1, 0)
    assert np.mean((lo - MARGIN <= exact) & (exact <= hi + MARGIN)) > 0.9
    error = np.abs(im.class_information_bits - exact)
    assert np.all(error <= (hi - lo) + MARGIN) and error.max() < 0.08  # within twice the half-width
    # the online run starts from the prior (D_k(T) = 0); q(x_T | k) holds ~1e-3 bits
    assert np.abs(on.class_information_bits[:, -1]).max() < 1e-5
    half = lambda c: np.diff(c.class_information_bits_ci95, axis=-1)[..., 0] / 2  # noqa: E731
    gap = np.abs(on.class_information_bits - im.class_information_bits)
    assert np.all(gap <= 2 * np.hypot(half(on), half(im)) + 0.01), gap.max(axis=1)
    assert np.mean(gap <= np.hypot(half(on), half(im)) + MARGIN) > 0.75


@pytest.mark.slow
def test_common_random_numbers_are_unbiased_but_noisier():
    """The same x_0 and noise at every t (common_noise=True) gives a smooth curve per sample,
    but its integral sums strongly correlated terms: its bands are far wider than those of
    draws independent from step to step, the default."""
    exact = jdi.exact_curves(PAPER, PAPER_PROBLEMS[:1], SHORT)
    fresh = jdi.immse_curves(PAPER, PAPER_PROBLEMS[:1], SHORT, samples_per_class=200, key=jax.random.key(5))
    common = jdi.immse_curves(PAPER, PAPER_PROBLEMS[:1], SHORT, samples_per_class=200, key=jax.random.key(5),
                              common_noise=True)
    assert "common random numbers" in common.method and "independently" in fresh.method
    width = lambda c: np.diff(c.entropy_bits_ci95, axis=-1)[..., 0].max()  # noqa: E731
    assert width(common) > 4 * width(fresh)
    assert_within_bands(common, exact.entropy_bits, max_error=0.3, fraction=0.8)


def test_integration_weights_integrate_in_log_snr_from_zero():
    """[0, gamma_T] by the trapezoid in gamma (from the integrand at gamma = 0), then the
    trapezoid in lambda = log gamma: exact for f = 1 / gamma, a constant in lambda."""
    alpha_bar = np.asarray(SHORT.alpha_bar, np.float64)
    gamma = (alpha_bar / (1 - alpha_bar))[::-1]  # the order visited: t = T..1
    w = immse.integration_weights(alpha_bar)
    np.testing.assert_allclose(w[0], [gamma[0] / 2, gamma[0] / 2])
    inv = 1.0 / gamma
    assert np.sum(w[1:, 0] * inv[:-1] + w[1:, 1] * inv[1:]) == pytest.approx(np.log(gamma[-1] / gamma[0]), rel=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(samples_per_class=1), "needs an integer >= 2 samples per class"),
    (dict(samples_per_class=0), "needs an integer >= 2 samples per class"),
    (dict(samples_per_class=2.5), "needs an integer >= 2 samples per class"),
    (dict(samples_per_class=8, bandwidth=-1.0), "bandwidth must be a finite number >= 0"),
])
def test_bad_inputs_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        jdi.immse_curves(PAPER, None, SHORT, key=jax.random.key(0), **kwargs)
    assert "\n" not in str(e.value)


def test_a_network_needs_examples_and_other_models_are_refused():
    net = jdi.Network(lambda params, x, t, k: x, None, (1,), 2)
    with pytest.raises(ValueError, match="needs examples"):
        jdi.immse_curves(net, None, SHORT, samples_per_class=8, key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs a GaussianMixture"):
        jdi.immse_curves(object(), None, SHORT, samples_per_class=8, key=jax.random.key(0))
