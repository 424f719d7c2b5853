"""The I-MMSE estimator of a network (two eps calls per sample and step) and from given examples
(x_0 from data or from a model's samples): the analytic mixture wrapped as a Network gives the
mixture's own numbers, intervals cover the exact curve, and bad input is refused in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff_info as jdi
from jaxdiff_info import mixture as gmm

UNEQUAL = jdi.make_mixture([-3.0, 0.0, 4.0], [0.5, 1.0, 0.2], [0.2, 0.5, 0.3])
SHORT = jdi.linear_schedule(200)


def draws(mixture, per_class, seed):
    """per_class x_0 of every class (class-major) and their labels."""
    classes = jnp.repeat(jnp.arange(mixture.num_classes), per_class)
    return np.asarray(gmm.sample_xt_given_classes(mixture, jax.random.key(seed), classes, jnp.ones(()))), np.asarray(classes)


def as_network(mixture, schedule):
    """The mixture's closed-form eps behind the Network interface, in centred coordinates."""
    centred, shift = gmm.centred(mixture)
    net = jdi.Network(gmm.eps_fn(schedule), centred, (mixture.dim,), mixture.num_classes,
                      weights=np.asarray(mixture.class_weights))
    return net, shift


@pytest.mark.parametrize("mixture", [UNEQUAL, jdi.make_mixture(np.array([[1.0, 0.0, -0.5], [-1.0, 0.5, 0.0],
                                                                       [0.0, -1.0, 1.0], [0.5, 0.5, 0.5]]) * 1.5,
                                                             [0.3, 0.6, 0.0, 0.4], classes=[[0, 1], [2, 3]])],
                         ids=["1-D", "3-D classes of components"])
def test_network_path_equals_the_mixture_path(mixture):
    """The same x_0 and keys: eps differences of the network interface against the mixture's
    class denoisers, to float32 precision (and the f(gamma = 0) ~ f(gamma_T) stand-in)."""
    x0, labels = draws(mixture, 60, seed=3)
    net, shift = as_network(mixture, SHORT)
    a = jdi.immse_curves(mixture, None, SHORT, samples_per_class=60, key=jax.random.key(1), x_0=x0, labels=labels)
    b = jdi.immse_curves(net, None, SHORT, samples_per_class=60, key=jax.random.key(1), x_0=x0 - shift, labels=labels,
                         source="mixture draws", estimator="immse_model", chunk=64, batch_size=50)
    np.testing.assert_allclose(b.entropy_bits, a.entropy_bits, atol=2e-5)
    np.testing.assert_allclose(b.class_information_bits, a.class_information_bits, atol=2e-5)
    np.testing.assert_allclose(b.entropy_bits_ci95, a.entropy_bits_ci95, atol=2e-5)
    assert b.estimator == "immse_model" and b.posterior == "state (network denoisers)"
    assert "two calls" in b.method and "mixture draws" in b.method and "60 per class" in b.method
    # D_k sum to the information, exactly
    information = np.asarray(mixture.class_weights) @ b.class_information_bits
    np.testing.assert_allclose(information, b.prior_entropy_bits[0] - b.entropy_bits[0], atol=1e-5)
    # the wrong class's denoiser gives a different answer: the test can fail
    shuffled = jdi.immse_curves(net, None, SHORT, samples_per_class=60, key=jax.random.key(1),
                                x_0=x0 - shift, labels=np.roll(labels, 60))
    assert np.abs(shuffled.entropy_bits - a.entropy_bits).max() > 0.1


def test_given_examples_cover_the_exact_curve_over_seeds():
    """Fixed x_0 per sample (the spread between examples is in the intervals): the 95% interval
    of H(Y | X_t) covers quadrature in most of 20 independent runs, at three times."""
    exact = jdi.exact_curves(UNEQUAL, None, SHORT)
    steps = [60, 120, 160]
    inside = []
    for seed in range(20):
        x0, labels = draws(UNEQUAL, 100, seed=100 + seed)
        c = jdi.immse_curves(UNEQUAL, None, SHORT, samples_per_class=100, key=jax.random.key(seed), x_0=x0,
                             labels=labels, num_resamples=200)
        lo, hi = c.entropy_bits_ci95[0, steps, 0], c.entropy_bits_ci95[0, steps, 1]
        inside.append((lo <= exact.entropy_bits[0, steps]) & (exact.entropy_bits[0, steps] <= hi))
    coverage = np.mean(inside, axis=0)
    assert np.all(coverage >= 0.75), coverage


def test_examples_are_taken_per_class_in_order():
    x = np.arange(10, dtype=np.float32)[:, None]
    labels = np.array([1, 0, 1, 0, 2, 2, 0, 1, 2, 2])
    picked = jdi.immse.examples_per_class(x, labels, 3, 2)
    np.testing.assert_array_equal(picked[:, 0], [1, 3, 0, 2, 4, 5])


def test_bad_input_is_refused_in_one_line():
    net, shift = as_network(UNEQUAL, SHORT)
    x0, labels = draws(UNEQUAL, 8, seed=0)
    run = lambda model=net, **kw: jdi.immse_curves(  # noqa: E731
        model, kw.pop("problems", None), SHORT, key=jax.random.key(0), **{"samples_per_class": 8, "x_0": x0,
                                                                           "labels": labels, **kw})
    cases = [
        (dict(model=dataclasses.replace(net, has_null=False)), "no null class"),
        (dict(x_0=None, labels=None), "needs examples"),
        (dict(labels=None), "together"),
        (dict(samples_per_class=9), "class 0 has 8 examples, fewer than the 9"),
        (dict(samples_per_class=1), ">= 2"),
        (dict(problems=[jdi.make_problem("0 vs 1", [[0], [1]], 3)]), "class label only"),
        (dict(labels=labels + 1), "labels must lie in 0..2"),
        (dict(x_0=x0[:, :, None]), "shape"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            run(**kwargs)
        assert "\n" not in str(err.value)


def test_a_network_without_null_class_refuses_guidance_and_unconditional_generation():
    net, _ = as_network(UNEQUAL, SHORT)
    net = dataclasses.replace(net, has_null=False)
    for kwargs in (dict(guidance=1.0), dict(generation="unconditional")):
        with pytest.raises(ValueError, match="no null class"):
            jdi.online_curves(net, None, SHORT, samples_per_class=2, key=jax.random.key(0), **kwargs)


def test_an_inconsistent_null_class_shows_as_information_past_its_bound():
    """The analysis' consistency check: the mixture as a network is consistent (D_k never past
    -log2 pi_k, H never below 0); the same network with the null class of another mixture is
    not, and the check says so."""
    from jaxdiff_info.analysis import analyze_model, immse_differences

    net, shift = as_network(UNEQUAL, SHORT)
    other, _ = gmm.centred(jdi.make_mixture([-1.0, 0.5, 1.0], [0.3, 0.3, 0.3], [0.2, 0.5, 0.3]))
    mixture_eps = gmm.eps_fn(SHORT)

    def wrong_null(params, x, t, k):
        return jnp.where(k == 3, mixture_eps(other, x, t, 3), mixture_eps(params, x, t, k))

    x0, labels = draws(UNEQUAL, 64, seed=5)
    checks = {}
    for name, model in (("consistent", net), ("wrong null", dataclasses.replace(net, eps=wrong_null))):
        result = analyze_model(model, SHORT, None, samples_per_class=64, key=jax.random.key(2),
                               sampler=jdi.Sampler("ddpm", "small"), held_out=(x0 - shift, labels),
                               held_out_name="mixture draws", num_resamples=100)
        checks[name] = immse_differences(result)
        assert set(checks[name]) == {"data", "model_samples", "difference_method", "consistency"}
    for source in ("data", "model_samples"):
        ok, bad = checks["consistent"][source], checks["wrong null"][source]
        assert [c["immse_above_bound_until_time"] for c in ok["classes"]] == [None] * 3
        assert ok["class_label"]["immse_entropy_below_zero_until_time"] is None
        assert ok["class_label"]["max_abs_entropy_difference_bits"] < 0.15  # the two estimators agree
        assert any(c["immse_above_bound_until_time"] is not None for c in bad["classes"])
        assert bad["class_label"]["immse_entropy_below_zero_until_time"] is not None
