"""Numbers that mean what they say: which posterior the online estimator tracks, refusals of
modes that would estimate something else, and exact answers in the corners (few steps,
tiny weights, far-off means, respaced schedules)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff_info as jdi
from jaxdiff_info import decisions as D
from jaxdiff_info import mixture as M
from jaxdiff_info.analysis import analyze_model
from jaxdiff_info.schedule import eps_to_x0

FULL = jdi.linear_schedule(1000)
PAPER = jdi.make_mixture([-8.0, -4.0, 6.0, 8.0])
LABEL = [jdi.class_label(4)]


# --- path posterior and state posterior ------------------------------------------------------

@pytest.mark.parametrize("eta", [0.2, 2.0])
def test_ddim_other_than_eta_1_is_refused_unless_the_path_posterior_is_asked_for(eta):
    ddim = jdi.Sampler("ddim", eta=eta)
    with pytest.raises(ValueError, match=f"DDIM with eta = {eta:g} != 1 .* path posterior"):
        jdi.Tracker(M.eps_fn(FULL), FULL, ddim, 4)
    with pytest.raises(ValueError, match="path_posterior=True"):
        jdi.online_curves(PAPER, LABEL, FULL, samples_per_class=4, key=jax.random.key(0), sampler=ddim)
    jdi.Tracker(M.eps_fn(FULL), FULL, jdi.Sampler("ddim", eta=1.0), 4)  # the DDPM small step: fine


@pytest.fixture(scope="module")
def ddim_path():
    return jdi.online_curves(PAPER, LABEL, FULL, samples_per_class=300, key=jax.random.key(0),
                             sampler=jdi.Sampler("ddim", eta=0.2), path_posterior=True, num_resamples=20)


def test_the_path_effect_shows_beside_the_exact_state_posterior(ddim_path):
    """DDIM eta = 0.2 keeps the marginals q(x_t), so the exact posterior at its x_t gives the
    state curve; the tracked path posterior is far more certain (docs/method.md's table)."""
    exact = jdi.exact_curves(PAPER, LABEL, FULL)
    state = ddim_path.exact_state
    assert ddim_path.posterior == "path" and "path posterior" in ddim_path.method
    assert state.posterior == "state (exact posterior)" and state.estimator == "online_state"
    assert np.abs(state.entropy_bits - exact.entropy_bits).max() < 0.06
    at = [199, 399, 599]  # t = 200, 400, 600
    assert np.all(state.entropy_bits[0, at] - ddim_path.entropy_bits[0, at] > 0.1)


def test_with_the_exact_kernel_the_tracked_posterior_is_the_state_posterior():
    online = jdi.online_curves(PAPER, LABEL, FULL, samples_per_class=300, key=jax.random.key(1), num_resamples=20)
    assert online.posterior == "state (exact kernel)"
    assert np.abs(online.entropy_bits - online.exact_state.entropy_bits).max() < 0.01


@pytest.mark.parametrize("model, sampler, guidance, kind", [
    (PAPER, jdi.Sampler("ddpm", "small"), 0.0, "state (exact kernel)"),
    (PAPER, jdi.Sampler("ddim", eta=1.0), 0.0, "state (exact kernel)"),
    (PAPER, jdi.Sampler("ddpm", "large"), 0.0, "state (DDPM approximation)"),
    (PAPER, jdi.Sampler("ddpm", "small", clip_x0=10.0), 0.0, "state (DDPM approximation)"),
    (jdi.make_mixture([-1.0, 1.0], [0.3, 0.3]), jdi.Sampler("ddpm", "small"), 0.0, "state (DDPM approximation)"),
    (PAPER, jdi.Sampler("ddpm", "small"), 2.0, "path"),
    (PAPER, jdi.Sampler("ddim", eta=0.5), 0.0, "path"),
    (PAPER, jdi.Sampler("ddim", eta=2.0), 0.0, "path"),
])
def test_which_posterior_is_said(model, sampler, guidance, kind):
    from jaxdiff_info.api import posterior_kind

    assert posterior_kind(model, sampler, guidance) == kind


def test_unconditional_generation_with_guidance_is_refused():
    with pytest.raises(ValueError, match="unconditional generation with guidance .* not a posterior"):
        jdi.online_curves(PAPER, LABEL, FULL, samples_per_class=4, key=jax.random.key(0),
                          generation="unconditional", guidance=1.0)


# --- unconditional generation on few steps -------------------------------------------------------

@pytest.mark.parametrize("steps", [20, 50])
def test_unconditional_estimates_are_right_on_few_steps(steps):
    """With few steps the null kernel's paths are not distributed as the prior mixture of the
    class kernels'; the path likelihood ratio corrects the weights (before it: 0.03-0.1 bits
    off, with intervals that excluded the truth)."""
    schedule = jdi.respace(FULL, steps)
    mix = jdi.make_mixture([-8.0, -4.0, 6.0, 8.0], weights=[0.1, 0.2, 0.3, 0.4])
    problems = [jdi.class_label(4), jdi.make_problem("-8 vs -4", [[0], [1]], 4),
                jdi.make_problem("6 vs 8", [[2], [3]], 4)]
    exact = jdi.exact_curves(mix, problems, schedule)
    online = jdi.online_curves(mix, problems, schedule, samples_per_class=4000, key=jax.random.key(steps),
                               generation="unconditional", num_resamples=50)
    assert "likelihood ratios" in online.method
    # measured before the correction: up to 0.12 (20 steps) and 0.06 bits (50 steps) off, bands
    # covering the exact curve at 40-60% of the steps; after it: 0.03 and 75-100%
    assert np.abs(online.entropy_bits - exact.entropy_bits).max() < 0.04
    inside = (online.entropy_bits_ci95[..., 0] - 2e-3 <= exact.entropy_bits) & (
        exact.entropy_bits <= online.entropy_bits_ci95[..., 1] + 2e-3)
    assert np.all(inside.mean(axis=1) >= 0.75)


# --- half-entropy times and their intervals ---------------------------------------------------

@pytest.mark.slow
def test_half_entropy_and_peak_time_intervals_cover_the_truth_over_seeds():
    """The 95% intervals of the half-entropy time and of the peak time of the rate, over 30
    seeds, against the exact values (the peak of the exact rate smoothed with the same
    bandwidth). Measured over 100 seeds (400 samples per class), the I-MMSE peak intervals
    covered at 0.94, 0.95 and 0.90 for the three problems: slightly below 95%, hence its
    lower bar here (at 1600 samples per class: 0.98, 0.98, 0.97 over 60 seeds)."""
    from jaxdiff_info.curves import rate_operator

    problems = [jdi.class_label(4), jdi.make_problem("6 vs 8", [[2], [3]], 4),
                jdi.make_problem("-8 vs -4", [[0], [1]], 4)]
    exact = jdi.exact_curves(PAPER, problems, FULL)
    smoothed_rate = exact.entropy_bits @ np.asarray(rate_operator(exact.time, 0.01)).T
    truth = {"half_time": exact.half_time, "peak_time": exact.time[np.argmax(smoothed_rate, axis=1)]}
    estimators = {
        "forward_mc": lambda key: jdi.forward_mc_curves(PAPER, problems, FULL, samples_per_class=400, key=key),
        "online": lambda key: jdi.online_curves(PAPER, problems, FULL, samples_per_class=400, key=key),
        "immse": lambda key: jdi.immse_curves(PAPER, problems, FULL, samples_per_class=400, key=key),
    }
    covered = {(name, field): [] for name in estimators for field in truth}
    for seed in range(30):
        for i, (name, estimate) in enumerate(estimators.items()):
            c = estimate(jax.random.key(1000 * i + seed))
            for field, true in truth.items():
                lo, hi = getattr(c, f"{field}_ci95").T
                covered[name, field].append((lo <= true) & (true <= hi))
    for (name, field), hits in covered.items():
        rate = np.mean(hits, axis=0)
        assert np.all(rate >= (0.8 if (name, field) == ("immse", "peak_time") else 0.85)), (name, field, rate)


@pytest.mark.slow
@pytest.mark.parametrize("n, floor", [(2, 0.5), (16, 0.85)])
def test_half_time_intervals_from_few_trajectories(n, floor):
    """docs/method.md "Few trajectories per class": over 40 seeds, coverage of the half-time
    intervals at n per class. Measured: 0.68-0.75 at n = 2 (below 95%: a rough guide), 0.90-0.98
    at n = 16; the point estimate never outside its interval."""
    problems = [jdi.class_label(4), jdi.make_problem("6 vs 8", [[2], [3]], 4),
                jdi.make_problem("-8 vs -4", [[0], [1]], 4)]
    exact = jdi.exact_curves(PAPER, problems, FULL)
    for estimate in (jdi.forward_mc_curves, jdi.online_curves):
        hits, outside = [], []
        for seed in range(40):
            c = estimate(PAPER, problems, FULL, samples_per_class=n, key=jax.random.key(seed))
            lo, hi = c.half_time_ci95.T
            hits.append((lo <= exact.half_time) & (exact.half_time <= hi))
            outside.append((c.half_time < lo) | (c.half_time > hi))
        coverage = np.mean(hits, axis=0)
        assert np.all(coverage >= floor) and not np.any(outside), (estimate.__name__, coverage)
        if n == 2:
            assert np.all(coverage < 0.9), (estimate.__name__, coverage)  # as documented: not 95%


@pytest.mark.slow
def test_pointwise_entropy_bands_cover_the_exact_curve_over_seeds():
    """The 95% bands of H(Z | X_t), step by step, over 30 seeds (3 components of non-zero
    width, 200 steps, 400 per class), by region of t/T, against quadrature. Measured: forward
    Monte Carlo and the exact posterior on the online paths 0.92-0.97, except "0 vs 2" at
    0.1 <= t/T < 0.5 (0.80-0.82), where a few samples near the overlap carry the mean; the
    online classifier's own bands cover its tracked posterior's entropy, and against the state
    curve they fall to 0.64-0.78 at the ends (the DDPM approximation's O(1/T) offset, not noise)."""
    schedule = jdi.linear_schedule(200)
    mix = jdi.make_mixture([-3.0, 0.0, 4.0], [0.5, 1.0, 0.2], [0.2, 0.5, 0.3])
    problems = [jdi.class_label(3), jdi.make_problem("0 vs 2", [[0], [2]], 3), jdi.one_vs_rest(1, 3)]
    exact = jdi.exact_curves(mix, problems, schedule)
    regions = [exact.time < 0.1, (exact.time >= 0.1) & (exact.time < 0.5), exact.time >= 0.5]
    inside = {"forward_mc": [], "online_state": []}
    for seed in range(30):
        fmc = jdi.forward_mc_curves(mix, problems, schedule, samples_per_class=400, key=jax.random.key(seed))
        online = jdi.online_curves(mix, problems, schedule, samples_per_class=400, key=jax.random.key(seed))
        for name, c in (("forward_mc", fmc), ("online_state", online.exact_state)):
            lo, hi = np.moveaxis(c.entropy_bits_ci95, -1, 0)
            inside[name].append((lo - 1e-6 <= exact.entropy_bits) & (exact.entropy_bits <= hi + 1e-6))
    for name, hits in inside.items():
        coverage = np.array([[np.mean(np.array(hits)[:, i, r]) for r in regions] for i in range(len(problems))])
        floor = np.full_like(coverage, 0.85)
        floor[1, 1] = 0.7  # "0 vs 2" in the middle: a few samples carry the mean
        assert np.all(coverage >= floor), (name, coverage.round(2))


def test_difference_intervals_come_from_the_resamples_of_both_estimates():
    """results.curve_differences: exact minus exact has no width; exact minus Monte Carlo is
    the Monte Carlo interval mirrored about the exact value (the percentiles of a - b*); two
    Monte Carlo runs give the percentiles of a* - b* over all pairs of resamples."""
    from jaxdiff_info import results

    schedule = jdi.linear_schedule(200)
    other = jdi.make_mixture([-8.0, -5.0, 5.0, 8.0])
    exact = jdi.exact_curves(PAPER, LABEL, schedule)
    exact_other = jdi.exact_curves(other, LABEL, schedule)
    fmc = jdi.forward_mc_curves(other, LABEL, schedule, samples_per_class=64, key=jax.random.key(0), num_resamples=40)
    d = results.curve_differences(exact, exact_other, 0)
    assert d["half_time_difference_ci95"] == [d["half_time_difference"]] * 2
    d = results.curve_differences(exact, fmc, 0)
    lo, hi = fmc.half_time_ci95[0]
    want = float(exact.half_time[0])
    np.testing.assert_allclose(d["half_time_difference_ci95"], [want - hi, want - lo], atol=2e-6)
    fmc_a = jdi.forward_mc_curves(PAPER, LABEL, schedule, samples_per_class=64, key=jax.random.key(1),
                                  num_resamples=30)
    d = results.curve_differences(fmc_a, fmc, 0)
    ra, rb = jdi.curves.bootstrap_replicates(fmc_a), jdi.curves.bootstrap_replicates(fmc)
    pairs = np.subtract.outer(ra.peak_time[:, 0], rb.peak_time[:, 0])
    assert pairs.shape == (30, 40)
    np.testing.assert_allclose(d["peak_time_difference_ci95"], np.percentile(pairs, [2.5, 97.5]), atol=1e-6)
    assert results.curve_differences(fmc_a, fmc, 0, replicates=(ra, rb)) == d


def test_simultaneous_half_width_is_the_percentile_of_the_largest_deviation():
    """Brute force over every pair; swapping a and b (and the sign of the gap) changes nothing;
    no sampling error on either side: width 0."""
    from jaxdiff_info import results

    rng = np.random.default_rng(0)
    a, b, gap = rng.normal(size=(7, 30)), rng.normal(size=(5, 30)) * 2.0, rng.normal(size=30)
    worst = [np.max(np.abs(a[i] - b[j] - gap)) for i in range(7) for j in range(5)]
    assert results.simultaneous_half_width(gap, a, b) == pytest.approx(np.percentile(worst, 95.0))
    assert results.simultaneous_half_width(-gap, b, a) == pytest.approx(np.percentile(worst, 95.0))
    assert results.simultaneous_half_width(a[0] - b[0], a[:1], b[:1]) == 0.0


def test_the_largest_difference_of_two_runs_of_one_model_is_not_called_significant():
    """Two independent runs of the same mixture: the true difference is 0 at every step, and the
    largest |dH| over the steps is noise picked by the data. The simultaneous band there covers
    0 (a pointwise interval at the argmax excluded it in 80-92% of such pairs; forward Monte
    Carlo, 200 steps, 200 per class). Also D_k of two online runs, and a run against the exact
    curve."""
    from jaxdiff_info import results
    from jaxdiff_info.curves import bootstrap_replicates

    schedule = jdi.linear_schedule(100)
    mix = jdi.make_mixture([-2.0, 0.5, 3.0], [0.5, 0.3, 1.0], [0.2, 0.5, 0.3])
    problems = [jdi.class_label(3), jdi.make_problem("0 vs 2", [[0], [2]], 3)]
    exact = jdi.exact_curves(mix, problems, schedule)
    covered = {"fmc - fmc": [], "fmc - exact": [], "online D_k": []}
    pointwise = []
    for seed in range(20):
        runs = [jdi.forward_mc_curves(mix, problems, schedule, samples_per_class=64, key=jax.random.key(2 * seed + s),
                                      num_resamples=100) for s in (0, 1)]
        pair = tuple(bootstrap_replicates(r) for r in runs)
        for i in range(2):
            d = results.curve_differences(*runs, i, replicates=pair)
            lo, hi = d["entropy_difference_bits_at_max_simultaneous_ci95"]
            covered["fmc - fmc"].append(lo <= 0 <= hi)
            at = int(np.argmin(np.abs(schedule.time - d["max_abs_entropy_difference_time"])))
            lo, hi = np.percentile(np.subtract.outer(pair[0].entropy_bits[:, i, at], pair[1].entropy_bits[:, i, at]),
                                   [2.5, 97.5])
            pointwise.append(lo <= 0 <= hi)
            lo, hi = results.curve_differences(runs[0], exact, i)["entropy_difference_bits_at_max_simultaneous_ci95"]
            covered["fmc - exact"].append(lo <= 0 <= hi)
        if seed < 10:
            runs = [jdi.online_curves(mix, None, schedule, samples_per_class=32, key=jax.random.key(2 * seed + s),
                                      num_resamples=100, state_readout=False) for s in (0, 1)]
            for row in results.information_differences(*runs, ["a", "b", "c"]):
                lo, hi = row["information_difference_bits_at_max_simultaneous_ci95"]
                covered["online D_k"].append(lo <= 0 <= hi)
    rates = {name: float(np.mean(hits)) for name, hits in covered.items()}
    assert all(rate >= 0.85 for rate in rates.values()), rates
    assert np.mean(pointwise) < 0.6, np.mean(pointwise)  # why the band is needed


@pytest.mark.slow
def test_difference_intervals_cover_the_exact_difference_over_seeds():
    """Forward Monte Carlo of the paper's mixture against that of a second mixture: the 95%
    intervals of the peak-time and half-time differences (`results.curve_differences`) cover
    the exact differences. Measured over 100 seeds: peak 0.98, 1.00, 0.99 and half-time 0.95,
    0.95, 0.90 for the three problems (docs/method.md). The normal combination of the two
    half-widths that this replaced covers the class label's peak-time difference at 0.80 over
    these 40 seeds (0.87 over 100), below this test's bar."""
    from jaxdiff_info import results
    from jaxdiff_info.curves import rate_operator

    other = jdi.make_mixture([-8.0, -5.0, 5.0, 8.0], [1.0, 1.0, 1.0, 1.0], [1, 1, 2, 1])
    problems = [jdi.class_label(4), jdi.make_problem("6 vs 8", [[2], [3]], 4),
                jdi.make_problem("-8 vs -4", [[0], [1]], 4)]

    def truth(mixture):
        exact = jdi.exact_curves(mixture, problems, FULL)
        smoothed_rate = exact.entropy_bits @ np.asarray(rate_operator(exact.time, 0.01)).T
        return {"half_time": exact.half_time, "peak_time": exact.time[np.argmax(smoothed_rate, axis=1)]}

    ta, tb = truth(PAPER), truth(other)
    hits = {field: [] for field in ta}
    for seed in range(40):
        a = jdi.forward_mc_curves(PAPER, problems, FULL, samples_per_class=400, key=jax.random.key(seed))
        b = jdi.forward_mc_curves(other, problems, FULL, samples_per_class=400, key=jax.random.key(10_000 + seed))
        for field in ta:
            row = []
            for i in range(len(problems)):
                lo, hi = results.curve_differences(a, b, i)[f"{field}_difference_ci95"]
                row.append(lo <= ta[field][i] - tb[field][i] <= hi)
            hits[field].append(row)
    for field, h in hits.items():
        rate = np.mean(h, axis=0)
        assert np.all(rate >= {"peak_time": 0.92, "half_time": 0.8}[field]), (field, rate)


# --- tiny class weights --------------------------------------------------------------------------

def test_tiny_class_weights_give_the_right_curve():
    """Weights (1, 1e-33, 1e-33), the problem "1 vs 2": a cut-off on the problem's posterior
    mass made this H = 0 everywhere. The values are those of a float64 quadrature."""
    mix = jdi.make_mixture([0.0, -1.0, 1.0], [0.5, 0.5, 0.5], [1.0, 1e-33, 1e-33])
    problem = [jdi.make_problem("1 vs 2", [[1], [2]], 3)]
    at, truth = [0, 49, 199, 499], [0.087, 0.111, 0.425, 0.942]
    exact = jdi.exact_curves(mix, problem, FULL)
    np.testing.assert_allclose(exact.entropy_bits[0, at], truth, atol=1.5e-3)
    fmc = jdi.forward_mc_curves(mix, problem, FULL, samples_per_class=2000, key=jax.random.key(0))
    np.testing.assert_allclose(fmc.entropy_bits[0, at], truth, atol=0.02)


def test_batched_and_single_problem_entropies_agree_on_any_posterior():
    problems = [jdi.class_label(5), jdi.make_problem("1 vs 2", [[1], [2]], 5),
                jdi.make_problem("{0,3} vs {4}", [[0, 3], [4]], 5)]
    m = D.membership(problems, 5)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 5)) * 3
    logits[:50, 1:3] -= 80.0  # classes of posterior mass ~1e-35
    logits[50:60, 0] = -np.inf
    log_post = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    batched = D.batch_problem_entropy_bits(log_post, m)
    single = jax.vmap(lambda lp: D.problem_entropy_bits(lp, jnp.asarray(m)))(log_post)
    np.testing.assert_allclose(batched, single, atol=2e-5)
    # the tiny classes' own question, from their relative logits in float64
    rel = logits[:50, 1:3] - logits[:50, 1:3].max(axis=1, keepdims=True)
    p12 = np.exp(rel) / np.exp(rel).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(batched[:50, 1], -(p12 * np.log2(p12)).sum(axis=1), atol=2e-5)


# --- respaced schedules and the mixture's eps -------------------------------------------------

def test_a_mixture_on_a_respaced_schedule_matches_the_exact_curve():
    short = jdi.respace(FULL, 50)
    exact = jdi.exact_curves(PAPER, LABEL, short)
    online = jdi.online_curves(PAPER, LABEL, short, samples_per_class=500, key=jax.random.key(3), num_resamples=20)
    assert np.abs(online.entropy_bits - exact.entropy_bits).max() < 0.03
    np.testing.assert_allclose(online.trajectories.x_0[:, 0], np.repeat([-8.0, -4.0, 6.0, 8.0], 500), atol=0.05)
    # the eps of the full schedule serves the respaced one (it holds its steps); a foreign one is refused
    jdi.Tracker(M.eps_fn(FULL), short, jdi.Sampler(), 4)
    with pytest.raises(ValueError, match="built for another schedule"):
        jdi.Tracker(M.eps_fn(jdi.cosine_schedule(1000)), short, jdi.Sampler(), 4)
    with pytest.raises(ValueError, match="built for another schedule"):
        jdi.Tracker(M.eps_fn(short), FULL, jdi.Sampler(), 4)


# --- far-off means -------------------------------------------------------------------------------

def test_far_off_means_are_centred_and_tracked_right():
    far = jdi.make_mixture([3e4 - 0.5, 3e4 + 0.5])
    exact = jdi.exact_curves(far, None, FULL)
    starts = []
    online = jdi.online_curves(far, None, FULL, samples_per_class=500, key=jax.random.key(4), num_resamples=20,
                               record_x=True, chunk=100, after_chunk=lambda t, state: starts.append((t, state.x)))
    assert np.abs(online.entropy_bits - exact.entropy_bits).max() < 0.03
    near = jdi.exact_curves(jdi.make_mixture([-0.5, 0.5]), None, FULL)
    np.testing.assert_allclose(exact.entropy_bits, near.entropy_bits, atol=1e-4)  # H does not move with the data
    np.testing.assert_allclose(online.trajectories.x_0[:, 0], np.repeat([3e4 - 0.5, 3e4 + 0.5], 500), atol=0.01)
    # the same process as without centring, seen in the mixture's own coordinates: x_T ~ N(0, I) ...
    t, x_T = starts[0]
    assert t == 1000 and abs(float(np.mean(x_T))) < 0.1 and abs(float(np.std(x_T)) - 1.0) < 0.1
    # ... the recorded paths start there and end at x_1, and the generated samples are where the paths end
    path_x = online.trajectories.path_x[..., 0]  # (T, M)
    x_0 = online.trajectories.x_0[online.trajectories.path_index, 0]
    np.testing.assert_allclose(path_x[0], np.sqrt(float(FULL.alpha_bar[0])) * x_0, atol=0.2)  # x_1
    np.testing.assert_allclose(path_x[-1], np.asarray(x_T)[online.trajectories.path_index, 0], atol=1e-3)  # x_T
    assert starts[-1][0] == 0
    np.testing.assert_allclose(starts[-1][1], online.trajectories.x_0, atol=1e-3)


def test_means_too_far_apart_for_float32_are_refused_with_the_range():
    with pytest.raises(ValueError, match=r"spans \+-3e\+04 .* only within \+-1.2\de\+03"):
        jdi.online_curves(jdi.make_mixture([-3e4, 3e4]), None, FULL, samples_per_class=4, key=jax.random.key(0))


# --- snapshots use the generating kernel ------------------------------------------------------

@pytest.mark.parametrize("guidance, clip", [(2.0, None), (0.0, 7.0), (1.5, 7.0)])
def test_snapshots_predict_x0_with_the_generating_kernel(guidance, clip):
    schedule = jdi.respace(FULL, 20)
    net = jdi.Network(M.eps_fn(FULL), PAPER, (1,), 4)
    sampler = jdi.Sampler("ddpm", "small", clip_x0=clip)
    res = analyze_model(net, schedule, LABEL, samples_per_class=2, key=jax.random.key(0), sampler=sampler,
                        guidance=guidance, num_resamples=5, paths_per_class=1, num_snapshots=3)
    t, x_t, x0_hat = res.snapshots[1]
    assert 0 < t < schedule.num_steps
    for m, c in enumerate(res.path_classes):
        eps = M.eps(PAPER, x_t[m], schedule.alpha_bar[t - 1], c)
        eps = eps + guidance * (eps - M.eps(PAPER, x_t[m], schedule.alpha_bar[t - 1], 4))
        want = eps_to_x0(x_t[m], eps, schedule.alpha_bar[t - 1])
        want = want if clip is None else jnp.clip(want, -clip, clip)
        np.testing.assert_allclose(x0_hat[m], want, atol=2e-4)


def test_the_step_log_ratio_is_the_path_likelihood_ratio():
    """Tracker.step_with_ratio's increment, by hand, and its use: under the null kernel's paths
    exp(log_ratio) averages to 1 (it is a likelihood ratio), at any number of steps."""
    schedule = jdi.respace(FULL, 20)
    mix = jdi.make_mixture([-8.0, -4.0, 6.0, 8.0], weights=[0.1, 0.2, 0.3, 0.4])
    tracker = jdi.Tracker(M.eps_fn(schedule), schedule, jdi.Sampler(), 4)
    t, x, z = jnp.asarray(12), jnp.array([0.7]), jnp.array([0.3])
    log_w = jnp.log(jnp.array([0.4, 0.1, 0.2, 0.3]))
    x_prev, log_w_prev, ratio = tracker.step_with_ratio(mix, t, x, log_w, 4, z, True)
    sigma = float(jdi.schedule.reverse_std(schedule, t, tracker.sampler))
    means = [float(jdi.schedule.reverse_mean(schedule, t, x, M.eps(mix, x, schedule.alpha_bar[11], k), tracker.sampler)[0])
             for k in range(5)]
    log_lik = np.array([-(float(x_prev[0]) - m) ** 2 / (2 * sigma**2) for m in means])
    want = np.logaddexp.reduce(np.asarray(log_w) + log_lik[:4]) - log_lik[4]
    assert float(ratio) == pytest.approx(want, abs=1e-4)
    np.testing.assert_allclose(log_w_prev, jax.nn.log_softmax(log_w + log_lik[:4]), atol=1e-5)
    # E_null[exp(log_ratio)] = 1 over whole paths
    state = tracker.init(jax.random.key(0), 20000, (1,), mix.log_weights)
    classes = jnp.full((20000,), 4)
    final, _ = jax.jit(lambda s: tracker.run(mix, s, classes, jnp.arange(20, 0, -1), None, True))(state)
    assert float(jnp.mean(jnp.exp(final.log_ratio))) == pytest.approx(1.0, abs=0.03)
    assert float(jnp.std(final.log_ratio)) > 0.1  # few steps: the correction matters


def test_unconditional_snapshots_follow_the_recorded_paths():
    net = jdi.Network(M.eps_fn(FULL, with_null=True), PAPER, (1,), 4)
    res = analyze_model(net, jdi.respace(FULL, 20), LABEL, samples_per_class=2, key=jax.random.key(0),
                        sampler=jdi.Sampler(), generation="unconditional", paths_per_class=4, num_resamples=5)
    assert res.paths.shape[1] == len(res.path_classes) == res.snapshots[0][1].shape[0] == 4
