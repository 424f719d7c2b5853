"""Dynamic Negative Guidance against the exact answers a mixture gives: the lam = 1 identity, the
tracked posterior along guided paths, generation of p(x | not C), the published variant's own
formula, and what negative prompting does instead."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff_info as jdi
from jaxdiff_info import guidance as G
from jaxdiff_info import mixture as gmm
from jaxdiff_info import removal as R
from jaxdiff_info.schedule import linear_schedule, reverse_std

POINTS = [-8.0, -4.0, 6.0, 8.0]  # the paper's default problem


def _remaining(mix, mask):
    """p(x | not C) built directly from the components of the classes outside C."""
    keep = np.array([j for j in range(mix.num_components) if not mask[mix.component_class[j]]])
    log_w = mix.log_weights[keep]
    take = lambda a: None if a is None else a[keep]  # noqa: E731
    return gmm.GaussianMixture(mix.means[keep], mix.stds[keep], log_w - jax.nn.logsumexp(log_w),
                               take(mix.basis), take(mix.spectrum))


MIXTURES = {
    "points, one class": (dict(means=POINTS), [0]),
    "points, a set": (dict(means=POINTS), [2, 3]),
    "isotropic, unequal weights": (dict(means=POINTS, stds=[0.5, 1.0, 0.3, 0.0], weights=[1, 2, 3, 4]), [1]),
    "2-D full covariances, a class of two components": (dict(
        means=[[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [2.0, 2.0]], weights=[1, 1, 2, 1], classes=[[0, 1], [2], [3]],
        covs=[np.eye(2) * 0.1, [[0.3, 0.1], [0.1, 0.2]], np.eye(2) * 0.05, [[1.0, 0.5], [0.5, 0.5]]]), [0, 2]),
}


@pytest.mark.parametrize("name", list(MIXTURES))
def test_dng_at_lam_1_with_the_exact_posterior_is_the_eps_of_the_mixture_without_C(name):
    kwargs, remove = MIXTURES[name]
    mix = gmm.make_mixture(**kwargs)
    K = mix.num_classes
    mask = G.removal_mask(remove, K)
    sub = _remaining(mix, mask)
    schedule = linear_schedule(1000)
    key = jax.random.key(0)
    n = 2000
    t = jax.random.randint(jax.random.fold_in(key, 1), (n,), 1, 1001)
    alpha_bar = schedule.alpha_bar[t - 1]
    classes = jax.random.randint(jax.random.fold_in(key, 2), (n,), 0, K)
    x = jax.vmap(lambda k, c, ab: gmm.sample_xt_given_classes(mix, k, c[None], ab)[0])(
        jax.random.split(key, n), classes, alpha_bar)

    def one(x, ab):
        log_post = gmm.log_posterior(mix, x, ab)
        eps = gmm.class_eps(mix, x, ab)
        ratio = G.dng_ratio(G.removed_log_odds(log_post, mask))
        dng = G.negative_guided(eps[K], G.removed_eps(eps[:K], log_post, mask), 1.0 * ratio)
        return dng, gmm.class_eps(sub, x, ab)[-1], ratio

    dng, exact, ratio = (np.asarray(a, np.float64) for a in jax.jit(jax.vmap(one))(x, alpha_bar))
    rel = np.abs(dng - exact).max(-1) / (np.abs(exact).max(-1) + 1.0)
    # float32: the formula multiplies the rounding of eps_null by P/(1 - P), so the error is
    # ~1e-7 (1 + P/(1 - P)); where the ratio is moderate the two agree to float32 precision
    assert np.all(rel / (1.0 + ratio) < 2e-6), (rel / (1.0 + ratio)).max()
    assert np.all(rel[ratio < 10] < 1e-5), rel[ratio < 10].max()
    assert (ratio < 10).mean() > 0.5


def test_log_odds_and_ratio_stay_finite_as_P_C_goes_to_1():
    mask = np.array([True, False, False])
    log_post = jax.nn.log_softmax(jnp.array([0.0, -200.0, -300.0]))  # P(C) = 1 - 1e-87 in float32
    lo = G.removed_log_odds(log_post, mask)
    assert float(lo) == pytest.approx(200.0, rel=1e-6)
    assert np.isfinite(float(G.dng_ratio(lo))) and float(G.dng_ratio(lo)) == pytest.approx(math.exp(G.LOG_RATIO_GUARD))
    assert float(G.dng_ratio(lo, max_ratio=50.0)) == pytest.approx(50.0)
    assert float(G.removed_log_odds(jnp.log(jnp.array([0.25, 0.5, 0.25])), mask)) == pytest.approx(math.log(1 / 3))


def test_a_run_that_starts_almost_surely_in_C_stays_finite():
    mix = gmm.make_mixture(POINTS, weights=[1.0, 1e-6, 1e-6, 1e-6])
    cm, _ = gmm.centred(mix)
    schedule = linear_schedule(50)
    run = G.sample(gmm.eps_fn(schedule), cm, schedule, jdi.Sampler(), jax.random.key(0), [0], num=256, shape=(1,),
                   log_prior=cm.class_log_weights)
    assert np.all(np.isfinite(np.asarray(run.x_0))) and np.all(np.isfinite(np.asarray(run.log_posterior)))
    assert float(run.effective_scale[0, 2]) > 1e5  # the prior odds of C, 1e6 / 3


@functools.lru_cache
def _schedule_and_eps(steps):
    """One eps function per schedule, so that runs of the same shape reuse their compilation."""
    schedule = linear_schedule(steps)
    return schedule, gmm.eps_fn(schedule)


def _guided_run(mix, remove, steps, num, key=0, record=8, **kwargs):
    cm, shift = gmm.centred(mix)
    schedule, eps = _schedule_and_eps(steps)
    run = G.sample(eps, cm, schedule, jdi.Sampler(), jax.random.key(key), remove, num=num,
                   shape=(1,), log_prior=cm.class_log_weights, record=record, **kwargs)
    return run, np.asarray(run.x_0, np.float64) + shift, cm, schedule


def test_the_tracked_posterior_on_dng_paths_is_the_exact_state_posterior_up_to_the_start():
    """Class kernels unguided and exact (DDPM beta~_t on points): the tracked P(k | x_t, ..., x_T)
    is the unguided mixture's P(k | x_t) at the guided path's x_t, up to the start x_T ~ N(0, I)
    instead of q(x_T | k): adding log P(k | x_T) - log pi_k makes them equal."""
    mix = gmm.make_mixture(POINTS)
    run, _, cm, schedule = _guided_run(mix, [2], 200, 64, record=64)
    path_x = jnp.asarray(run.path_x)  # (S, M, 1), steps t = S..1
    alpha_bar = schedule.alpha_bar[::-1]
    exact = jax.vmap(lambda xs, ab: jax.vmap(gmm.log_posterior, (None, 0, None))(cm, xs, ab))(path_x, alpha_bar)
    start = np.asarray(exact[0]) - np.asarray(cm.class_log_weights)
    tracked = np.asarray(run.path_log_posterior)
    corrected = np.exp(np.asarray(jax.nn.log_softmax(tracked + start, axis=-1)))
    assert np.abs(corrected - np.exp(np.asarray(exact))).max() < 2e-3
    # without the correction the start is visible (up to ~0.2 nats of log-odds on these points)
    assert np.abs(np.exp(tracked) - np.exp(np.asarray(exact))).max() > 5e-3


def test_dng_at_lam_1_generates_the_mixture_without_C_within_monte_carlo_error():
    """W1 to the exact CDF within twice its floor (the mean W1 of exact draws of the same size).
    Over 20 keys (4000 samples, 200 steps) DNG's W1 averaged 0.090 against 0.091 for exact draws,
    and a single set of either exceeds twice the mean floor for about 1 key in 16, so the key is fixed."""
    mix = gmm.make_mixture(POINTS)
    mask = G.removal_mask([2], 4)
    n = 4000
    _, x_0, _, _ = _guided_run(mix, [2], 200, n)
    metrics = R.removal_metrics(mix, mask, x_0, jax.random.key(1))
    floor, _ = R.distance_floor(mix, mask, n, jax.random.key(2))
    assert metrics.forbidden_fraction < 0.01
    assert metrics.distance_to_target < 2.0 * floor, (metrics.distance_to_target, floor)
    assert metrics.kl_to_target_bits < 0.01
    lo, hi = metrics.distance_to_target_ci95
    assert lo <= metrics.distance_to_target <= hi


def _published_reference(mix, remove, schedule, key, num, lam, g):
    """The published update written out in float64 numpy, step by step on the same noise
    (Koulischer et al., compute_posterior_DNG; our DDPM beta~_t step in both the move and the update)."""
    K = mix.num_classes
    mask = np.zeros(K, bool)
    mask[remove] = True
    key_x, key_run = jax.random.split(key)
    x = np.asarray(jax.random.normal(key_x, (num, 1)), np.float64)
    log_w = np.tile(np.asarray(mix.log_weights, np.float64), (num, 1))
    p = np.full(num, g.prior)
    ps = []
    eps_all = jax.jit(jax.vmap(gmm.class_eps, (None, 0, None)))
    for t in range(schedule.num_steps, 0, -1):
        ps.append(p.copy())
        beta, abar = float(schedule.betas[t - 1]), float(schedule.alpha_bar[t - 1])
        sigma = float(reverse_std(schedule, t, jdi.Sampler()))
        eps = np.asarray(eps_all(mix, jnp.asarray(x, jnp.float32), abar), np.float64)  # (N, K + 1, 1)
        w = np.exp(log_w - log_w.max(1, keepdims=True)) * mask
        eps_c = np.einsum("nk,nkd->nd", w / w.sum(1, keepdims=True), eps[:, :K])
        eps_null = eps[:, K]
        guided = eps_null - (lam * p / (1 - p))[:, None] * (eps_c - eps_null)
        mean = lambda e: (x - beta / np.sqrt(1 - abar) * e) / np.sqrt(1 - beta)  # noqa: E731
        z = np.asarray(jax.random.normal(jax.random.fold_in(key_run, t), (num, 1)), np.float64)
        x_new = mean(guided) + sigma * z
        if t > 1:
            diff = ((x_new - mean(eps_c)) ** 2).sum(1) - ((x_new - mean(eps_null)) ** 2).sum(1)
            p = np.clip(p * np.exp((-g.temperature * diff + g.offset) / (2 * sigma**2)), g.p_min, g.p_max)
            sq = ((x_new[:, None, :] - mean(eps[:, :K].transpose(1, 0, 2)).transpose(1, 0, 2)) ** 2).sum(-1)
            log_w = log_w - 0.5 * sq / sigma**2
            top = log_w.max(1, keepdims=True)
            log_w = log_w - top - np.log(np.exp(log_w - top).sum(1, keepdims=True))
        x = x_new
    return x, np.stack(ps)


def test_the_published_variant_reproduces_its_own_formula():
    mix = gmm.centred(gmm.make_mixture(POINTS, stds=[0.5, 0.5, 0.5, 0.5]))[0]
    schedule = linear_schedule(40)
    g = G.Guidance("dng_published", prior=0.3, temperature=0.5, offset=1e-3, p_min=1e-4, p_max=0.9)
    key = jax.random.key(3)
    run = G.sample(gmm.eps_fn(schedule), mix, schedule, jdi.Sampler(), key, [2], num=64, shape=(1,),
                   log_prior=mix.class_log_weights, guidance=g, scale=2.0, record=64)
    x_ref, p_ref = _published_reference(mix, [2], schedule, key, 64, 2.0, g)
    np.testing.assert_allclose(np.asarray(run.path_published), p_ref, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(np.asarray(run.x_0), x_ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(run.path_scale), 2.0 * p_ref / (1 - p_ref), rtol=5e-3)
    assert np.asarray(run.path_published).max() <= 0.9 + 1e-6 and np.asarray(run.path_published).min() >= 1e-4 - 1e-9


def test_negative_prompting_at_a_matching_forbidden_fraction_distorts_the_class_balance():
    """Measured on the paper's points without 6 (4000 samples, 200 steps, key 0): DNG at lam = 1
    has a forbidden fraction of 0 and KL 0.0007 bits to the target's class balance (1/3 each of
    -8, -4, 8). Negative prompting first gets under 1% at w = 2 (0.0003), where the fractions of
    -8 / -4 / 8 are 0.94 / 0.00 / 0.06 (KL 1.26 bits): pushed away from 6, the paths cross -4 and
    pile up at -8 and beyond. With exact point scores the push (eps_C - eps_null) grows like
    1 / sqrt(1 - alpha_bar) away from C, so negative prompting also throws samples off the data:
    W1 32 against DNG's 0.13 (floor 0.10)."""
    mix = gmm.make_mixture(POINTS)
    mask = G.removal_mask([2], 4)
    n = 4000
    _, x_dng, _, _ = _guided_run(mix, [2], 200, n)
    dng = R.removal_metrics(mix, mask, x_dng, jax.random.key(1), num_resamples=50)
    found = None
    for w in (1.0, 2.0, 4.0, 8.0):
        _, x_neg, _, _ = _guided_run(mix, [2], 200, n, guidance=G.Guidance("negative"), scale=w)
        neg = R.removal_metrics(mix, mask, x_neg, jax.random.key(1), num_resamples=50)
        if neg.forbidden_fraction < 0.01:
            found = w, neg
            break
    assert found is not None
    w, neg = found
    assert dng.forbidden_fraction < 0.01
    assert neg.kl_to_target_bits > 0.3 and neg.kl_to_target_bits > 20 * dng.kl_to_target_bits
    assert neg.kl_to_target_bits_ci95[0] > dng.kl_to_target_bits_ci95[1]
    assert neg.distance_to_target > 10 * dng.distance_to_target


# --- the metrics themselves ---------------------------------------------------------------------

def test_wasserstein1_is_exact_for_point_targets_and_matches_a_gaussian_cdf():
    target = gmm.make_mixture([0.0, 10.0], weights=[3, 1])
    at_atoms = np.concatenate([np.zeros(300), np.full(100, 10.0)])[:, None]
    assert R.wasserstein1(at_atoms[:, 0], target) == pytest.approx(0.0, abs=1e-6)  # float32 weights
    moved = at_atoms[:, 0] + 0.5
    assert R.wasserstein1(moved, target) == pytest.approx(0.5, rel=1e-6)
    # all samples at 0 against weights 3/4, 1/4 at 0 and 10: a quarter of the mass moves 10
    assert R.wasserstein1(np.zeros(50), target) == pytest.approx(2.5, rel=1e-6)
    # one sample at 0 against N(0, 1): W1 = E|Z| = sqrt(2 / pi)
    normal = gmm.make_mixture([0.0], stds=[1.0])
    assert R.wasserstein1(np.zeros(1), normal) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-5)
    # bootstrap weights reproduce the plain value when uniform
    w = np.full((2, 400), 1 / 400)
    np.testing.assert_allclose(R.wasserstein1(moved, target, w), 0.5, rtol=1e-6)


def test_energy_distance_and_its_weighted_form():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 2)), rng.normal(size=(400, 2))
    d = R.energy_distance(x, y)
    assert abs(d) < 0.05
    assert R.energy_distance(x + 2.0, y) > 1.0
    np.testing.assert_allclose(R.energy_distance(x, y, np.full((3, 300), 1 / 300)), d, rtol=1e-9)


def test_fractions_kl_and_forbidden_fraction_at_known_samples():
    mix = gmm.make_mixture(POINTS)
    mask = np.array([False, False, True, False])
    x = np.array([-8.0] * 50 + [-4.0] * 30 + [6.0] * 10 + [8.0] * 10)[:, None]
    m = R.removal_metrics(mix, mask, x, jax.random.key(0), num_resamples=50)
    assert m.forbidden_fraction == pytest.approx(0.1, abs=1e-6)
    np.testing.assert_allclose(m.class_fractions, np.array([50, 30, 10]) / 90, atol=1e-6)
    q = np.full(3, 1 / 3)
    kl = float(np.sum(m.class_fractions * np.log2(m.class_fractions / q)))
    assert m.kl_to_target_bits == pytest.approx(kl, rel=1e-6)
    np.testing.assert_allclose(R.target_weights(mix, mask), q)
    assert m.forbidden_fraction_ci95[0] <= 0.1 <= m.forbidden_fraction_ci95[1]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="every class"):
        G.removal_mask([0, 1, 2, 3], 4)
    with pytest.raises(ValueError, match="no class 4"):
        G.removal_mask([4], 4)
    with pytest.raises(ValueError, match="at least one"):
        G.removal_mask([], 4)
    with pytest.raises(ValueError, match="unknown guidance"):
        G.Guidance("cfg")
    with pytest.raises(ValueError, match="p_min"):
        G.Guidance("dng_published", p_max=1.0)
    mix = gmm.make_mixture(POINTS)
    schedule = linear_schedule(50)
    with pytest.raises(ValueError, match=">= 0"):
        G.sample(gmm.eps_fn(schedule), mix, schedule, jdi.Sampler(), jax.random.key(0), [0], num=4, shape=(1,),
                 log_prior=mix.class_log_weights, scale=-1.0)
    with pytest.raises(ValueError, match="stochastic"):
        G.sample(gmm.eps_fn(schedule), mix, schedule, jdi.Sampler("ddim", eta=0.0), jax.random.key(0), [0], num=4,
                 shape=(1,), log_prior=mix.class_log_weights)


def test_a_prior_over_components_instead_of_classes_is_refused():
    mix = gmm.make_mixture([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]], [0.3, 0.3, 0.2], classes=[[0, 1], [2]])
    schedule = linear_schedule(30)
    with pytest.raises(ValueError, match="class_log_weights"):
        G.sample(gmm.eps_fn(schedule), mix, schedule, jdi.Sampler(), jax.random.key(0), [1], num=4, shape=(2,),
                 log_prior=mix.log_weights)


def test_samples_figure_counts_the_judged_removed_among_the_shown_and_among_all():
    from jaxdiff_info import guidance_plots

    images = np.zeros((40, 8, 8, 1))
    forbidden = np.zeros(40, bool)
    forbidden[[1, 5, 35, 36, 39]] = True  # 2 among the 32 shown, 5 among all 40
    fig = guidance_plots.samples_figure({"dng": images}, {"dng": forbidden}, ["1"])
    ax = fig.axes[0]
    assert ax.get_title() == "dng: 2 of these 32 judged removed\n(5 of all 40, 12.5%)"
    assert len(ax.patches) == 2  # a red frame on each shown sample judged removed
    guidance_plots.plt.close(fig)


def test_class_fractions_of_resamples_with_only_forbidden_samples_are_left_out_not_nan():
    """Four samples, three of them at the removed point: some resamples hold no remaining sample,
    whose class fractions are undefined (they divided 0 by 0, and the interval was NaN)."""
    import warnings

    mix = gmm.make_mixture([-8.0, -4.0, 6.0, 8.0])
    removed = np.array([False, False, True, False])
    samples = np.array([[6.0], [6.0], [6.0], [-8.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        m = R.removal_metrics(mix, removed, samples, jax.random.key(0), num_resamples=200)
    assert np.all(np.isfinite(m.class_fractions_ci95))
    assert m.class_fractions_ci95[0] == pytest.approx([1.0, 1.0])  # every defined resample: all at -8
