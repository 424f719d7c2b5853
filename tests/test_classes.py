"""Classes made of components: per-class curves against a 1-D quadrature done here, the
class-conditional generation against the sub-mixture, and what the posterior is called."""

import math

import jax
import numpy as np
import pytest

import jaxdiff_info as jdi
from jaxdiff_info import mixture as M
from jaxdiff_info import schedule as S

MEANS, STDS, WEIGHTS = [-6.0, -1.0, 2.0, 5.0, 7.0], [0.5, 0.0, 1.0, 0.3, 0.0], [1, 2, 1, 3, 1]
CLASSES = [[0, 2, 4], [1, 3]]
MIX = M.make_mixture(MEANS, STDS, WEIGHTS, classes=CLASSES)
SCHEDULE = S.linear_schedule(100)


def quadrature_class_entropies(alpha_bar):
    """(C,) H_c = integral p(x_t | c) h(P(c | x_t)) dx_t in bits, float64 on a dense grid."""
    x = np.linspace(-30, 30, 400_001)
    w = np.asarray(WEIGHTS, float) / np.sum(WEIGHTS)
    dens = []
    for members in CLASSES:
        p = 0.0
        for k in members:
            v = alpha_bar * STDS[k] ** 2 + 1 - alpha_bar
            p = p + w[k] * np.exp(-0.5 * (x - math.sqrt(alpha_bar) * MEANS[k]) ** 2 / v) / math.sqrt(2 * math.pi * v)
        dens.append(p)
    joint = np.stack(dens)  # pi_c p(x | c)
    post = joint / joint.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.sum(np.where(post > 0, post * np.log2(post), 0.0), axis=0)
    pi_c = np.array([w[m].sum() for m in CLASSES])
    return np.array([np.trapezoid(joint[c] / pi_c[c] * h, x) for c in range(2)])


def test_exact_curves_of_classes_match_an_independent_quadrature():
    exact = jdi.exact_curves(MIX, None, SCHEDULE)
    for t in [10, 40, 70, 95]:
        want = quadrature_class_entropies(float(SCHEDULE.alpha_bar[t - 1]))
        np.testing.assert_allclose(exact.class_entropy_bits[0, :, t - 1], want, atol=2e-4)


def test_monte_carlo_class_curves_of_classes_match_the_quadrature():
    exact = jdi.exact_curves(MIX, None, SCHEDULE)
    fmc = jdi.forward_mc_curves(MIX, None, SCHEDULE, samples_per_class=3000, key=jax.random.key(0), num_resamples=20)
    online = jdi.online_curves(MIX, None, SCHEDULE, samples_per_class=3000, key=jax.random.key(1), num_resamples=20)
    for curves, tol in [(fmc, 0.03), (online, 0.05), (online.exact_state, 0.05)]:
        gap = np.abs(curves.class_entropy_bits[0] - exact.class_entropy_bits[0]).max()
        assert gap < tol, (curves.estimator, gap)
    assert online.posterior == "state (DDPM approximation)"  # a class of several points: no exact kernel


def test_class_conditional_generation_draws_from_the_sub_mixture():
    """x_0 of class 0 lands on its components in proportion to their weights (1 : 1 : 1)."""
    online = jdi.online_curves(MIX, None, S.linear_schedule(200), samples_per_class=3000, key=jax.random.key(2),
                               num_resamples=5)
    x0, cls = online.trajectories.x_0[:, 0], online.trajectories.classes
    for c, members in enumerate(CLASSES):
        near = np.array([np.mean(np.abs(x0[cls == c] - MEANS[k]) < 3 * STDS[k] + 0.3) for k in members])
        w = np.asarray(WEIGHTS, float)[members]
        np.testing.assert_allclose(near, w / w.sum(), atol=0.04)


def test_decisions_are_over_classes():
    with pytest.raises(ValueError, match="names class 2, but the model has classes 0..1"):
        jdi.exact_curves(MIX, [jdi.decisions.make_problem("bad", [[0], [2]], 3)], SCHEDULE)
