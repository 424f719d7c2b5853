"""The research API: one call per estimator, problem-first curves, and what they say they are."""

import os

import jax
import numpy as np
import pytest

import jaxdiff_info as jdi
from jaxdiff_info import curves as C
from jaxdiff_info import decisions as D
from jaxdiff_info import plots

SCHEDULE = jdi.linear_schedule(200)
MIX = jdi.make_mixture([-3.0, 0.0, 4.0], [0.5, 1.0, 0.2], [0.2, 0.5, 0.3])
PROBLEMS = [jdi.class_label(3), jdi.make_problem("0 vs 2", [[0], [2]], 3), jdi.one_vs_rest(1, 3)]


@pytest.fixture(scope="module")
def three():
    exact = jdi.exact_curves(MIX, PROBLEMS, SCHEDULE)
    fmc = jdi.forward_mc_curves(MIX, PROBLEMS, SCHEDULE, samples_per_class=400, key=jax.random.key(0))
    online = jdi.online_curves(MIX, PROBLEMS, SCHEDULE, samples_per_class=400, key=jax.random.key(1))
    return exact, fmc, online


def test_shapes_are_problem_first_and_intervals_are_pairs(three):
    P, T, K = len(PROBLEMS), SCHEDULE.num_steps, 3
    for c in three:
        assert c.names == ("all classes", "0 vs 2", "1 vs rest")
        assert c.time.shape == (T,) and c.entropy_bits.shape == (P, T) and c.entropy_rate.shape == (P, T)
        assert c.class_entropy_bits.shape == (P, K, T) and c.peak_time.shape == (P,) and c.half_time.shape == (P,)
        np.testing.assert_allclose(c.prior_entropy_bits, D.prior_entropy_bits(PROBLEMS, np.asarray(MIX.weights)))
    exact, fmc, online = three
    assert exact.peak_time_ci95 is None and exact.estimator == "exact"
    for c in (fmc, online):
        assert c.peak_time_ci95.shape == (P, 2) and c.half_time_ci95.shape == (P, 2)
        assert c.entropy_bits_ci95.shape == (P, T, 2) and c.entropy_rate_ci95.shape == (P, T, 2)
        assert np.all(c.peak_time_ci95[:, 0] <= c.peak_time + 1e-6) and np.all(c.peak_time <= c.peak_time_ci95[:, 1] + 1e-6)
        assert np.all(c.entropy_bits_ci95[..., 0] <= c.entropy_bits + 1e-6)
        assert np.all(c.entropy_bits <= c.entropy_bits_ci95[..., 1] + 1e-6)
    # the three agree: the same problem in the same row of every estimator
    for c in (fmc, online):
        assert np.abs(c.entropy_bits - exact.entropy_bits).max() < 0.06
    # the weights: H(Z | X_t) is the class-weighted mean of the per-class profiles
    arrays = D.problem_arrays(PROBLEMS, np.asarray(MIX.weights))
    np.testing.assert_allclose(np.einsum("pkt,pk->pt", exact.class_entropy_bits, arrays.class_weights),
                               exact.entropy_bits, atol=1e-5)


def test_every_curve_says_what_it_estimates(three):
    exact, fmc, online = three
    assert "quadrature" in exact.method and "forward" in fmc.method
    assert "tracked" in online.method and "beta~_t" in online.method  # the kernel of the default sampler
    large = jdi.online_curves(MIX, PROBLEMS[:1], SCHEDULE, samples_per_class=8, key=jax.random.key(2),
                              sampler=jdi.Sampler("ddpm", "large"), num_resamples=5)
    assert "beta_t" in large.method and "beta~_t" not in large.method


def test_one_problem_by_name(three):
    _, fmc, _ = three
    one = fmc["0 vs 2"]
    np.testing.assert_array_equal(one.entropy_bits, fmc.entropy_bits[1])
    assert one.peak_time == fmc.peak_time[1] and one.peak_time_ci95 == tuple(fmc.peak_time_ci95[1])
    assert one.entropy_bits_ci95.shape == (SCHEDULE.num_steps, 2)
    with pytest.raises(KeyError, match="no decision problem 'nope'"):
        fmc["nope"]


def test_a_network_is_tracked_like_the_mixture_it_computes(three):
    """The mixture given as eps(params, x_t, t, k) and parameters: the same trajectories and the
    same numbers (up to the rounding of x_t, which the mixture path takes about its mean)."""
    _, _, online = three
    net = jdi.Network(jdi.mixture.eps_fn(SCHEDULE, with_null=False), MIX, (1,), 3, weights=[2.0, 5.0, 3.0])
    again = jdi.online_curves(net, PROBLEMS, SCHEDULE, samples_per_class=400, key=jax.random.key(1))
    np.testing.assert_allclose(again.entropy_bits, online.entropy_bits, atol=1e-5)
    np.testing.assert_allclose(again.trajectories.x_0, online.trajectories.x_0, atol=1e-5)
    assert again.posterior == "state (DDPM approximation)" and again.exact_state is None
    assert online.posterior == "state (DDPM approximation)"  # components of std > 0


def test_default_problem_is_the_class_label():
    c = jdi.exact_curves(MIX, None, SCHEDULE)
    assert c.names == ("all classes",) and c.prior_entropy_bits[0] == pytest.approx(1.4855, abs=1e-4)


@pytest.mark.parametrize("problems, message", [
    ([], "at least one decision problem"),
    ([jdi.make_problem("a", [[0], [3]], 4)], "names class 3, but the model has classes 0..2"),
    ([jdi.class_label(3, "x"), jdi.one_vs_rest(0, 3, "x")], "names must be unique; repeated: x"),
    ([[[0], [1]]], "must be DecisionProblem objects"),
])
def test_bad_problems_are_refused_with_what_to_fix(problems, message):
    with pytest.raises(ValueError, match=message):
        jdi.exact_curves(MIX, problems, SCHEDULE)


def test_bad_models_and_modes_are_refused():
    with pytest.raises(ValueError, match="needs a GaussianMixture"):
        jdi.forward_mc_curves("net", None, SCHEDULE, samples_per_class=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="unknown generation 'sideways'"):
        jdi.online_curves(MIX, None, SCHEDULE, samples_per_class=2, key=jax.random.key(0), generation="sideways")
    with pytest.raises(ValueError, match="network weights must be 3 finite numbers > 0"):
        net = jdi.Network(jdi.mixture.eps_fn(SCHEDULE), MIX, (1,), 3, weights=[1.0, 0.0, 1.0])
        jdi.online_curves(net, None, SCHEDULE, samples_per_class=2, key=jax.random.key(0))


ZERO_WEIGHT = jdi.make_mixture([-2.0, 0.0, 2.0], [0.5, 0.5, 0.5], [1.0, 0.0, 1.0])
ESTIMATORS = {
    "exact": lambda m, **kw: jdi.exact_curves(m, None, SCHEDULE),
    "forward_mc": lambda m, **kw: jdi.forward_mc_curves(m, None, SCHEDULE, key=jax.random.key(0), **kw),
    "online": lambda m, **kw: jdi.online_curves(m, None, SCHEDULE, key=jax.random.key(0), **kw),
    "immse": lambda m, **kw: jdi.immse_curves(m, None, SCHEDULE, key=jax.random.key(0), **kw),
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_class_of_weight_zero_is_refused_not_a_nan(estimator):
    """P(class | x_t) of a class that never occurs is 0 / 0; before this check the exact and
    I-MMSE estimators returned NaN curves (and a peak at the first step) for such a mixture."""
    with pytest.raises(ValueError, match="class 1 has weight 0 in the mixture"):
        ESTIMATORS[estimator](ZERO_WEIGHT, samples_per_class=8)


@pytest.mark.parametrize("estimator", ["forward_mc", "online", "immse"])
@pytest.mark.parametrize("kwargs, message", [
    (dict(samples_per_class=1), "needs an integer >= 2 samples per class"),
    (dict(samples_per_class=8, num_resamples=1), "num_resamples must be an integer >= 2"),
    (dict(samples_per_class=8, num_resamples=0), "num_resamples must be an integer >= 2"),
])
def test_empty_intervals_are_refused(estimator, kwargs, message):
    """One sample per class (one block) or one resample gave intervals of width 0; none an
    obscure error inside the bootstrap."""
    with pytest.raises(ValueError, match=message):
        ESTIMATORS[estimator](MIX, **kwargs)


def test_per_class_curves_average_to_the_problem_curve(three):
    _, fmc, _ = three
    per_class = C.class_curves(fmc, "all classes", ["a", "b", "c"], jax.random.key(3))
    assert per_class.names == ("a", "b", "c")
    np.testing.assert_allclose(per_class.entropy_bits, fmc.class_entropy_bits[0], atol=1e-6)
    weights = np.asarray(MIX.weights)
    np.testing.assert_allclose(weights @ per_class.entropy_bits, fmc.entropy_bits[0], atol=1e-5)
    with pytest.raises(ValueError, match="Monte Carlo"):
        C.class_curves(jdi.exact_curves(MIX, PROBLEMS, SCHEDULE), "all classes", ["a", "b", "c"], jax.random.key(0))


def test_rate_figure_says_its_units_direction_bands_and_peaks(three):
    exact, fmc, online = three
    fig = plots.curves_figure({"exact": exact, "forward_mc": fmc, "online": online}, "entropy_rate", "a title")
    ax = fig.axes[0]
    assert "bits per unit t/T" in ax.get_ylabel() and "from t/T = 1 to 0" in ax.get_xlabel()
    title, posterior = fig._suptitle.get_text().split("\n")
    assert ax.get_title() == "all classes" and title == "a title"
    # which posterior each estimator's curve is of, estimators of the same posterior together
    assert posterior == (f"posterior: exact (quadrature), forward Monte Carlo: {exact.posterior}; "
                         f"online classifier: {online.posterior}")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "online classifier: 95% bootstrap band" in labels
    assert "online classifier: peak t/T and its 95% CI" in labels and "exact (quadrature): peak t/T" in labels
    peak_lines = [line for line in ax.get_lines() if line.get_xdata()[0] == line.get_xdata()[-1]]
    assert sorted(float(line.get_xdata()[0]) for line in peak_lines) == sorted(
        [exact.peak_time[0], fmc.peak_time[0], online.peak_time[0]])
    entropy = plots.curves_figure({"exact": exact}, "entropy_bits")
    prior_lines = [line for line in entropy.axes[1].get_lines() if line.get_label() == "prior H(Z)"]
    assert prior_lines and prior_lines[0].get_ydata()[0] == pytest.approx(exact.prior_entropy_bits[1])
    plots.plt.close(fig)
    plots.plt.close(entropy)


def test_a_curve_that_leaves_the_scale_of_the_others_is_named_with_its_largest_value(three):
    import dataclasses

    exact, fmc, online = three
    wild = dataclasses.replace(fmc, entropy_rate=fmc.entropy_rate * 50.0)
    fig = plots.curves_figure({"exact": exact, "online": online, "forward_mc": wild}, "entropy_rate",
                              scale_by=("exact", "online"))
    for i, ax in enumerate(fig.axes[:len(exact.problems)]):
        top = max(exact.entropy_rate[i].max(), online.entropy_rate[i].max())
        assert top < ax.get_ylim()[1] < 1.2 * top
        notes = [t.get_text() for t in ax.texts]
        assert notes == [f"forward Monte Carlo leaves the axis (max {wild.entropy_rate[i].max():.3g})"]
    plots.plt.close(fig)
    everything = plots.curves_figure({"exact": exact, "forward_mc": wild}, "entropy_rate")  # default: all set the scale
    assert everything.axes[0].get_ylim()[1] >= wild.entropy_rate[0].max() and not everything.axes[0].texts
    plots.plt.close(everything)


def test_class_information_figure_draws_the_bound_and_names_a_curve_beyond_it():
    import dataclasses

    online = jdi.online_curves(MIX, PROBLEMS, SCHEDULE, samples_per_class=64, key=jax.random.key(0))
    immse = jdi.immse_curves(MIX, PROBLEMS, SCHEDULE, samples_per_class=64, key=jax.random.key(1))
    beyond = dataclasses.replace(immse, class_information_bits=immse.class_information_bits * 3.0)
    log_prior = np.log(np.asarray(MIX.weights))
    fig = plots.class_information_figure({"online": online, "immse": beyond}, ["a", "b", "c"], "D_k",
                                         log_prior=log_prior)
    for k, ax in enumerate(fig.axes[:3]):
        bound = -log_prior[k] / np.log(2.0)
        assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_label() == "bound -log2 pi_k"] == \
            pytest.approx([bound])
        assert ax.get_ylim()[1] == pytest.approx(1.2 * bound)
        assert any("I-MMSE (denoising errors) leaves the axis" in t.get_text() for t in ax.texts)
    assert "posterior: online classifier: " in fig._suptitle.get_text()
    plots.plt.close(fig)


def test_the_compilation_cache_keeps_programs_in_the_folder_given(tmp_path):
    import subprocess
    import sys

    code = """if True:
        import sys, jax, jaxdiff_info as jdi
        where = jdi.enable_compilation_cache(sys.argv[1])
        mix = jdi.make_mixture([-1.0, 1.0])
        jdi.online_curves(mix, None, jdi.linear_schedule(30), samples_per_class=4, key=jax.random.key(0),
                          num_resamples=2)
        print(where)
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "xla")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "xla")
    assert len(list((tmp_path / "xla").iterdir())) >= 2  # the tracking loop and the curves, at least
    off = subprocess.run([sys.executable, "-c", "import jaxdiff_info as jdi; print(jdi.enable_compilation_cache())"],
                         capture_output=True, text=True, env={**env, "JAXDIFF_INFO_CACHE": "off"})
    assert off.stdout.strip() == "None", off.stderr
