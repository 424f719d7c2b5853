"""Decision problems: the renormalised group posterior and its entropy, and validation."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff_info import decisions as D


def _reference_entropy(p, groups):
    """Direct float64 evaluation of the formula in docs/method.md, from probabilities."""
    included = [k for g in groups for k in g]
    pz = np.array([p[list(g)].sum() for g in groups]) / p[included].sum()
    pz = pz[pz > 0]
    return float(-(pz * np.log2(pz)).sum())


def test_group_entropy_matches_definition():
    rng = np.random.default_rng(0)
    problems = [D.class_label(5), D.make_problem("a", [[0, 1], [3]], 5), D.make_problem("b", [[4], [0, 2], [1]], 5),
                D.one_vs_rest(2, 5)]
    m = jnp.asarray(D.membership(problems, 5))
    for _ in range(20):
        p = rng.dirichlet(np.full(5, 0.5))
        h = D.problem_entropy_bits(jnp.log(jnp.asarray(p, jnp.float32)), m)
        ref = [_reference_entropy(p, pr.groups) for pr in problems]
        np.testing.assert_allclose(h, ref, atol=2e-5)
        # the log-space group posterior gives the same entropies
        np.testing.assert_allclose(D.entropy_bits(D.group_log_posterior(jnp.log(jnp.asarray(p, jnp.float32)), m)), ref, atol=2e-5)


def test_entropy_is_finite_and_right_when_included_classes_are_astronomically_unlikely():
    """The contrast 0 vs 1 where x_t is almost surely from class 2: still a proper entropy."""
    m = jnp.asarray(D.membership([D.make_problem("0 vs 1", [[0], [1]], 3)], 3))
    log_p = jnp.array([-5000.0, -5000.0 - np.log(3.0), 0.0])  # P(0)/P(1) = 3, both ~e^-5000
    h = D.problem_entropy_bits(log_p, m)
    assert float(h[0]) == pytest.approx(_reference_entropy(np.array([0.75, 0.25, 0.0]), [[0], [1]]), abs=1e-5)
    log_p = jnp.array([-jnp.inf, -3.0, 0.0])  # a zero-weight class
    assert float(D.problem_entropy_bits(log_p, m)[0]) == 0.0


def test_entropy_bounds_and_relabelling_invariance():
    p = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4]))
    a = D.make_problem("a", [[0, 1], [2], [3]], 4)
    b = D.make_problem("b", [[3], [1, 0], [2]], 4)  # same partition, groups and members reordered
    h = D.problem_entropy_bits(p, jnp.asarray(D.membership([a, b], 4)))
    assert float(h[0]) == pytest.approx(float(h[1]), abs=1e-6)
    uniform = D.problem_entropy_bits(jnp.log(jnp.full(4, 0.25)), jnp.asarray(D.membership([D.class_label(4)], 4)))
    assert float(uniform[0]) == pytest.approx(2.0, abs=1e-6)


def test_prior_entropy_and_class_weights():
    problems = [D.class_label(4), D.one_vs_rest(0, 4), D.make_problem("2v3", [[2], [3]], 4)]
    w = np.array([1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(D.prior_entropy_bits(problems, w), [2.0, 0.8112781, 1.0], atol=1e-6)
    cw = D.class_weights(problems, np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(cw[2], [0, 0, 3 / 7, 4 / 7])
    with pytest.raises(ValueError, match="weight zero"):
        D.class_weights([D.make_problem("0v1", [[0], [1]], 3)], np.array([0.0, 0.0, 1.0]))


@pytest.mark.parametrize("groups, match", [
    ([[0], [4]], "names class 4, but the classes are 0..3"),
    ([[0], [-1]], "names class -1"),
    ([[0, 1], [1, 2]], "puts class 1 in two groups"),
    ([[0, 1, 2]], "at least two groups"),
    ([], "at least two groups"),
    ([[0], []], "non-empty list"),
    ([[0], ["a"]], "not an integer"),
    ([[0], [1.5]], "not an integer"),
])
def test_bad_problems(groups, match):
    with pytest.raises(ValueError, match=match):
        D.make_problem("p", groups, 4)


def test_bad_problem_sets():
    with pytest.raises(ValueError, match="at least one"):
        D.make_problems({}, 3)
    with pytest.raises(ValueError, match="non-empty strings"):
        D.make_problems({"": [[0], [1]]}, 3)
