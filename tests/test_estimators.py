"""The three estimators of H(Z | X_t) against exact answers and against each other."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff_info import curves as C
from jaxdiff_info import decisions as D
from jaxdiff_info import estimators as E
from jaxdiff_info import mixture as M
from jaxdiff_info import schedule as S
from jaxdiff_info.tracking import Tracker

SCHEDULE = S.linear_schedule(1000)
TIME = np.asarray(SCHEDULE.time)

# docs/method.md, "The paper's default problem"
PAPER = M.make_mixture([-8.0, -4.0, 6.0, 8.0])
PAPER_PROBLEMS = [
    (D.class_label(4), 0.573, 2.0),
    (D.make_problem("{-8,-4} vs {6,8}", [[0, 1], [2, 3]], 4), 0.590, 1.0),
    (D.make_problem("-8 vs -4", [[0], [1]], 4), 0.357, 1.0),
    (D.make_problem("6 vs 8", [[2], [3]], 4), 0.199, 1.0),
    (D.one_vs_rest(1, 4), 0.473, 0.811),
    (D.one_vs_rest(2, 4), 0.199, 0.811),
    (D.one_vs_rest(3, 4), 0.199, 0.811),
    (D.one_vs_rest(0, 4), 0.609, 0.811),
]


def exact_curves(mix, problems, schedule=SCHEDULE, **kw):
    arrays = D.problem_arrays(problems, np.asarray(mix.weights, np.float64))
    profiles = E.quadrature_class_entropy(mix, schedule, arrays.membership, **kw)
    return C.curves_from_profiles(np.asarray(schedule.time), profiles, arrays)


def mc_curves(block_sums, blocks, mix, problems, bandwidth=0.02):
    arrays = D.problem_arrays(problems, np.asarray(mix.weights, np.float64))
    return C.curves_from_blocks(jax.random.key(99), TIME, jnp.asarray(block_sums), blocks.counts, arrays,
                                bandwidth=bandwidth, num_resamples=100, estimator="test")


def online(mix, problems, per_class, key, variance="small", schedule=SCHEDULE, **kw):
    m = D.membership(problems, mix.num_components)
    blocks = E.make_blocks(mix.num_components, per_class)
    tracker = Tracker(M.eps_fn(schedule), schedule, S.Sampler("ddpm", variance), mix.num_components)
    run = E.online_block_sums(tracker, mix, mix.log_weights, (mix.dim,), m, blocks, key, **kw)
    return run, blocks


@pytest.fixture(scope="module")
def paper_exact():
    return exact_curves(PAPER, [p for p, _, _ in PAPER_PROBLEMS])


def test_paper_peak_times_and_prior_entropies(paper_exact):
    problems = [p for p, _, _ in PAPER_PROBLEMS]
    for i, (problem, peak, prior) in enumerate(PAPER_PROBLEMS):
        assert float(paper_exact.peak_time[i]) == pytest.approx(peak, abs=0.0021), problem.name
        assert D.prior_entropy_bits([problem], np.ones(4))[0] == pytest.approx(prior, abs=1e-3)
        # at t = T the noise hides (almost) everything: H(Z | X_T) = H(Z)
        assert paper_exact.entropy_bits[i, -1] == pytest.approx(prior, abs=2e-3)
        # at t = 1 the points are far apart: nothing is left to decide
        assert paper_exact.entropy_bits[i, 0] < 1e-6
    # "-8 vs rest" has two bumps
    peaks = C.local_peaks(TIME, paper_exact.entropy_rate[problems.index(PAPER_PROBLEMS[7][0])])
    assert len(peaks) == 2 and sorted(peaks)[0] == pytest.approx(0.36, abs=0.02)
    # coarse decisions come first in generation (later in t), fine ones last
    assert paper_exact.peak_time[1] > paper_exact.peak_time[2] > paper_exact.peak_time[3]


def test_quadrature_is_converged():
    mix = M.make_mixture([-3.0, 0.0, 0.1, 4.0], [0.5, 1.5, 0.0, 0.2], [0.2, 0.4, 0.1, 0.3])
    problems = [D.class_label(4), D.make_problem("1v2", [[1], [2]], 4)]
    coarse = exact_curves(mix, problems, num_nodes=1001)
    fine = exact_curves(mix, problems, num_nodes=6001)
    assert np.abs(coarse.entropy_bits - fine.entropy_bits).max() < 2e-4


@pytest.mark.parametrize("std", [0.0, 0.7])
def test_quadrature_matches_two_class_closed_form(std):
    mix = M.make_mixture([-1.5, 1.5], [std, std])
    exact = exact_curves(mix, [D.class_label(2)])
    closed = E.symmetric_two_class_entropy_bits(SCHEDULE.alpha_bar, 1.5, std)
    np.testing.assert_allclose(exact.entropy_bits[0], closed, atol=2e-4)


def test_monte_carlo_estimators_match_closed_form_in_d_dimensions():
    """Two classes at +-m in d = 5, common std: the Gauss-Hermite closed form of docs/method.md."""
    m = np.array([0.8, -0.4, 0.0, 0.6, 0.2])
    mix = M.make_mixture([m, -m], [0.5, 0.5])
    problems = [D.class_label(2)]
    closed = np.asarray(E.symmetric_two_class_entropy_bits(SCHEDULE.alpha_bar, float(np.linalg.norm(m)), 0.5))
    blocks = E.make_blocks(2, 2000)
    fmc = mc_curves(E.forward_mc_block_sums(mix, SCHEDULE, D.membership(problems, 2), blocks, jax.random.key(0)),
                    blocks, mix, problems)
    run, blocks = online(mix, problems, 2000, jax.random.key(1))
    onl = mc_curves(run.block_sums, blocks, mix, problems)
    assert np.abs(fmc.entropy_bits[0] - closed).max() < 0.03
    assert np.abs(onl.entropy_bits[0] - closed).max() < 0.03
    assert onl.entropy_bits[0, -1] == pytest.approx(1.0)  # log w(T) = log pi


@pytest.fixture(scope="module")
def unequal():
    """A 1-D mixture with unequal weights and non-zero stds, all three estimators."""
    mix = M.make_mixture([-3.0, 0.0, 4.0], [0.5, 1.0, 0.2], [0.2, 0.5, 0.3])
    problems = [D.class_label(3), D.make_problem("0 vs 2", [[0], [2]], 3), D.one_vs_rest(1, 3)]
    exact = exact_curves(mix, problems)
    blocks = E.make_blocks(3, 2000)
    fmc = mc_curves(E.forward_mc_block_sums(mix, SCHEDULE, D.membership(problems, 3), blocks, jax.random.key(0)),
                    blocks, mix, problems)
    run, blocks = online(mix, problems, 2000, jax.random.key(1))
    return mix, problems, exact, fmc, mc_curves(run.block_sums, blocks, mix, problems), run, blocks


def test_three_estimators_agree(unequal):
    mix, problems, exact, fmc, onl, _, _ = unequal
    for est in (fmc, onl):
        assert np.abs(est.entropy_bits - exact.entropy_bits).max() < 0.03
        assert np.abs(est.entropy_rate - exact.entropy_rate).max() < 0.3  # rates peak at ~3.5 bits
        np.testing.assert_allclose(est.peak_time, exact.peak_time, atol=0.05)
        # per-class profiles agree too
        assert np.abs(est.class_entropy_bits - exact.class_entropy_bits).max() < 0.05
        # bootstrap bands: ordered, and mostly covering the exact curve
        lo, hi = np.moveaxis(est.entropy_bits_ci95, -1, 0)
        assert np.all(lo <= hi + 1e-7)
        assert np.mean((lo - 0.01 <= exact.entropy_bits) & (exact.entropy_bits <= hi + 0.01)) > 0.9
        assert np.all(est.peak_time_ci95[:, 0] <= est.peak_time + 1e-6)
        assert np.all(est.peak_time <= est.peak_time_ci95[:, 1] + 1e-6)
        # half-entropy times: close to the exact ones, inside their own intervals
        np.testing.assert_allclose(est.half_time, exact.half_time, atol=0.02)
        assert np.all(est.half_time_ci95[:, 0] <= est.half_time + 1e-6)
        assert np.all(est.half_time <= est.half_time_ci95[:, 1] + 1e-6)
    assert np.all(np.isfinite(onl.entropy_rate)) and np.all(np.isfinite(fmc.entropy_rate))


def test_half_entropy_time_on_curves_with_known_crossings():
    time = np.linspace(0.01, 1.0, 100)
    curves = np.stack([
        2.0 * time,                                   # linear: crosses 1.0 at exactly t = 0.5
        2.0 * time**2,                                # crosses at 1 / sqrt(2), between grid points
        np.full_like(time, 1.5),                      # never halves: 0
        np.zeros_like(time),                          # no prior entropy: the noisiest time
        np.where(np.abs(time - 0.8) < 0.02, 0.2, 1.0 + 0.0 * time) * np.minimum(1.0, 5 * time),  # dips at 0.8 first
    ], axis=-1)
    half = np.asarray(C.half_entropy_time(jnp.asarray(time), jnp.asarray(curves)))
    np.testing.assert_allclose(half[:2], [0.5, 1 / math.sqrt(2)], atol=2e-4)
    assert half[2] == 0.0 and half[3] == pytest.approx(1.0)
    assert 0.8 < half[4] < 0.83  # the first crossing in generation order, not the last
    # a batch axis in front (bootstrap resamples) gives the same per-curve answers
    batched = C.half_entropy_time(jnp.asarray(time), jnp.stack([jnp.asarray(curves)] * 3))
    np.testing.assert_allclose(batched, np.stack([half] * 3))


def test_online_generates_the_data_distribution(unequal):
    mix, _, _, _, _, run, blocks = unequal
    x0 = run.x_0[:, 0]
    for k in range(3):
        sel = x0[blocks.classes == k]
        assert sel.mean() == pytest.approx(float(mix.means[k, 0]), abs=0.05)
        assert sel.std() == pytest.approx(float(mix.stds[k]), abs=0.05)


def test_online_with_large_variance_agrees_on_points():
    problems = [D.class_label(4), D.make_problem("6 vs 8", [[2], [3]], 4)]
    exact = exact_curves(PAPER, problems)
    run, blocks = online(PAPER, problems, 1000, jax.random.key(5), variance="large")
    onl = mc_curves(run.block_sums, blocks, PAPER, problems)
    assert np.abs(onl.entropy_bits - exact.entropy_bits).max() < 0.04


def test_permuting_components_permutes_nothing_else():
    mix = M.make_mixture([-3.0, 0.0, 4.0], [0.5, 1.0, 0.2], [0.2, 0.5, 0.3])
    order = [2, 0, 1]  # new component j is old component order[j]
    new_index = {old: new for new, old in enumerate(order)}
    problems = [D.class_label(3), D.make_problem("0 vs 2", [[0], [2]], 3), D.one_vs_rest(1, 3)]
    moved = [D.make_problem(p.name, [[new_index[k] for k in g] for g in p.groups], 3) for p in problems]
    a = exact_curves(mix, problems)
    b = exact_curves(M.permute(mix, order), moved)
    np.testing.assert_allclose(a.entropy_bits, b.entropy_bits, atol=2e-5)
    np.testing.assert_allclose(a.class_entropy_bits[:, order], b.class_entropy_bits, atol=2e-5)


def test_extreme_valid_inputs_give_finite_correct_curves():
    mix = M.make_mixture([-1e3, 0.0, 1e3], [0.0, 0.0, 0.0], [1e-6, 0.5, 0.5])
    problems = [D.class_label(3), D.make_problem("-1e3 vs 1e3", [[0], [2]], 3)]
    exact = exact_curves(mix, problems)
    run, blocks = online(mix, problems, 64, jax.random.key(0))
    fmc_sums = E.forward_mc_block_sums(mix, SCHEDULE, D.membership(problems, 3), blocks, jax.random.key(1))
    for c in (exact, mc_curves(run.block_sums, blocks, mix, problems), mc_curves(fmc_sums, blocks, mix, problems)):
        assert np.all(np.isfinite(c.entropy_bits)) and np.all(np.isfinite(c.entropy_rate))
        assert np.all(c.entropy_bits >= -1e-6)
        assert np.all(c.entropy_bits[0] <= math.log2(3) + 1e-5)
        assert c.entropy_bits[:, 0].max() < 1e-4  # separated points: decided by t = 1
    # the online trajectories end on their points, even the rare one
    for k in range(3):
        np.testing.assert_allclose(run.x_0[blocks.classes == k, 0], float(mix.means[k, 0]), atol=1e-2)


def test_bad_sample_counts():
    with pytest.raises(ValueError, match="integer >= 1"):
        E.make_blocks(3, 0)
    with pytest.raises(ValueError, match="1-D"):
        E.quadrature_class_entropy(M.make_mixture([[0, 0], [1, 1]]), SCHEDULE, D.membership([D.class_label(2)], 2))


@pytest.mark.parametrize("per_class, num_blocks", [(10, 4), (12, 4), (7, 7), (5, 32)])
def test_block_sums_partition_the_trajectories(per_class, num_blocks):
    blocks = E.make_blocks(3, per_class, num_blocks)
    values = jnp.arange(3 * per_class, dtype=jnp.float32)[:, None] ** 1.5
    sums = np.asarray(blocks.sums(values))[..., 0]
    v = np.asarray(values)[:, 0].reshape(3, per_class)
    for k in range(3):
        for b in range(blocks.num_blocks):
            assert sums[k, b] == pytest.approx(v[k, b::blocks.num_blocks].sum(), rel=1e-6)
    np.testing.assert_array_equal(blocks.counts.sum(axis=1), per_class)


def test_a_second_call_with_other_keys_reuses_the_compilation():
    """The estimators' compiled loops are keyed on what is static (membership by value, the
    block layout), so a study over seeds compiles once; a new membership compiles anew."""
    import jaxdiff_info as jdi
    from jaxdiff_info import immse

    mix = jdi.make_mixture([-2.0, 1.0, 3.0])
    schedule = jdi.linear_schedule(50)

    def calls(seed, problems):
        jdi.exact_curves(mix, problems, schedule)
        jdi.forward_mc_curves(mix, problems, schedule, samples_per_class=8, key=jax.random.key(seed), num_resamples=4)
        jdi.immse_curves(mix, problems, schedule, samples_per_class=8, key=jax.random.key(seed), num_resamples=4)

    compiled = (E._quadrature, E._forward_mc, immse._information)
    calls(0, [jdi.class_label(3)])
    sizes = [f._cache_size() for f in compiled]
    calls(1, [jdi.class_label(3)])  # an equal membership, built afresh
    assert [f._cache_size() for f in compiled] == sizes
    calls(2, [jdi.make_problem("1 vs 2", [[1], [2]], 3)])
    assert [f._cache_size() for f in compiled][:2] == [n + 1 for n in sizes[:2]]


def test_the_online_loop_is_compiled_once_for_a_study_over_seeds(monkeypatch):
    """online_curves keys its compiled loop on the tracker and what it records, by value: a
    second seed with an equal schedule built afresh (and so a fresh mixture eps, or a network's
    eps made again) compiles nothing; another schedule compiles anew; a plain-function eps that
    is new each call fills a bounded cache."""
    import jaxdiff_info as jdi
    from jaxdiff_info import unet

    mix = jdi.make_mixture([-2.0, 1.0, 3.0])
    centred = jdi.mixture.centred(mix)[0]

    def calls(seed, steps=30):
        schedule = jdi.linear_schedule(steps)
        mixture = jdi.online_curves(mix, None, schedule, samples_per_class=8, key=jax.random.key(seed),
                                    num_resamples=4)
        network = jdi.Network(jdi.mixture.eps_fn(schedule), centred, (1,), 3)
        jdi.online_curves(network, None, schedule, samples_per_class=4, key=jax.random.key(seed), num_resamples=4)
        return mixture

    def compiled():
        return {key: (init._cache_size(), run._cache_size()) for key, (init, run) in E._PROGRAMS.items()}

    E._PROGRAMS.clear()
    first = calls(0)
    before = compiled()
    assert len(before) == 2 and all(sizes == (1, 1) for sizes in before.values())
    again = calls(1)
    assert compiled() == before
    assert not np.array_equal(first.trajectories.x_0, again.trajectories.x_0)  # another seed, the same program
    np.testing.assert_array_equal(calls(0).trajectories.x_0, first.trajectories.x_0)
    calls(0, steps=31)
    assert len(compiled()) == 4
    oldest = list(E._PROGRAMS)[:2]
    calls(2)  # the 30-step loops again: now the most recently used, the last to be dropped
    assert list(E._PROGRAMS)[-2:] == oldest and len(compiled()) == 4

    monkeypatch.setattr(E, "MAX_PROGRAMS", 2)
    schedule = jdi.linear_schedule(25)
    for seed in range(E.MAX_PROGRAMS + 2):
        eps = jdi.mixture.eps_fn(schedule)
        network = jdi.Network(lambda p, x, t, k: eps(p, x, t, k), centred, (1,), 3)
        jdi.online_curves(network, None, schedule, samples_per_class=2, key=jax.random.key(seed), num_resamples=4)
    assert len(E._PROGRAMS) == E.MAX_PROGRAMS

    config = unet.get_config("tiny")
    assert unet.make_eps_fn(config) is unet.make_eps_fn(config)
    assert unet.make_eps_fn(config, compute_dtype=jnp.bfloat16) is not unet.make_eps_fn(config)


def test_trackers_compare_by_value():
    eps = M.eps_fn(S.linear_schedule(30))
    a = Tracker(eps, S.linear_schedule(30), S.Sampler(), 3)
    assert a == Tracker(M.eps_fn(S.linear_schedule(30)), S.linear_schedule(30), S.Sampler(), 3)
    assert hash(a) == hash(Tracker(eps, S.linear_schedule(30), S.Sampler(), 3))
    assert a != Tracker(eps, S.linear_schedule(30), S.Sampler(), 3, guidance=1.0)
    cosine = S.cosine_schedule(30)
    assert a != Tracker(M.eps_fn(cosine), cosine, S.Sampler(), 3)
    assert a != Tracker(eps, S.linear_schedule(30), S.Sampler("ddpm", "large"), 3)
    assert a != Tracker(lambda *args: eps(*args), S.linear_schedule(30), S.Sampler(), 3)


def test_bootstrap_replicates_are_the_resamples_behind_the_intervals():
    """Drawn again from the curves' block sums and key, the resamples' percentiles are the
    stored 95% intervals (entropy, half-entropy time, peak time); the exact curves have none."""
    import jaxdiff_info as jdi

    mix = jdi.make_mixture([-8.0, -4.0, 6.0, 8.0])
    schedule = jdi.linear_schedule(200)
    problems = [jdi.class_label(4), jdi.make_problem("6 vs 8", [[2], [3]], 4)]
    c = jdi.forward_mc_curves(mix, problems, schedule, samples_per_class=64, key=jax.random.key(3), num_resamples=50)
    r = C.bootstrap_replicates(c)
    assert r.entropy_bits.shape == (50, 2, 200) and r.half_time.shape == r.peak_time.shape == (50, 2)
    q = [2.5, 97.5]
    np.testing.assert_allclose(np.moveaxis(np.percentile(r.entropy_bits, q, axis=0), 0, -1), c.entropy_bits_ci95,
                               atol=1e-5)
    np.testing.assert_allclose(np.percentile(r.half_time, q, axis=0).T, c.half_time_ci95, atol=1e-5)
    np.testing.assert_allclose(np.percentile(r.peak_time, q, axis=0).T, c.peak_time_ci95, atol=1e-5)
    assert C.bootstrap_replicates(jdi.exact_curves(mix, problems, schedule)) is None
    assert r.class_information_bits is None  # forward Monte Carlo gives no D_k
    for estimator in (jdi.online_curves, jdi.immse_curves):  # D_k's band, from its own resamples
        c = estimator(mix, problems, schedule, samples_per_class=16, key=jax.random.key(4), num_resamples=40)
        r = C.bootstrap_replicates(c)
        assert r.class_information_bits.shape == (40, 4, 200)
        np.testing.assert_allclose(np.moveaxis(np.percentile(r.class_information_bits, q, axis=0), 0, -1),
                                   c.class_information_bits_ci95, atol=1e-5)
