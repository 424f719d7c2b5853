"""The online classifier's class log-likelihoods in matrix form (`Tracker.affine_step`): the
same posterior as the step that forms every class's eps, a float64 recursion to check both
against, and proof that the matrix form is the path taken (no (N, K, d) array in the step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff_info import decisions as D
from jaxdiff_info import estimators as E
from jaxdiff_info import mixture as M
from jaxdiff_info import schedule as S
from jaxdiff_info.tracking import Tracker


def direct(eps):
    """The same eps without `affine_classes`: the Tracker then forms every class's eps."""
    f = lambda *a: eps(*a)  # noqa: E731
    f.all_classes, f.check_schedule = eps.all_classes, eps.check_schedule
    return f


def mixture(d, k=4, seed=0, points=False):
    rng = np.random.default_rng(seed)
    stds = np.zeros(k) if points else rng.uniform(0.0, 1.0, k)
    return M.centred(M.make_mixture(rng.normal(size=(k, d)) * 4 / np.sqrt(d), stds, rng.uniform(1, 2, k)))[0]


def run_both(mix, schedule, steps, guidance=0.0, unconditional_every=0, per_class=30, sampler=S.Sampler()):
    """log P(k | path), log_ratio and x_t at every step of the same trajectories, fast and direct."""
    K = mix.num_classes
    with_null = guidance != 0.0 or unconditional_every > 0
    classes = jnp.repeat(jnp.arange(K), per_class)
    if unconditional_every:
        classes = classes.at[::unconditional_every].set(K)
    ts = jnp.arange(schedule.num_steps, schedule.num_steps - steps, -1)
    out = []
    for eps in (M.eps_fn(schedule), direct(M.eps_fn(schedule))):
        tracker = Tracker(eps, schedule, sampler, K, guidance=guidance)
        state = tracker.init(jax.random.key(0), classes.shape[0], (mix.dim,), mix.log_weights)
        observe = lambda t, x, log_post, ratio: (log_post, ratio, x)  # noqa: E731
        final, seen = jax.jit(lambda s: tracker.run(mix, s, classes, ts, observe, with_null))(state)
        out.append([np.concatenate([np.asarray(a), np.asarray(b)[None]])
                    for a, b in zip(seen, (final.log_posterior, final.log_ratio, final.x))])
    return out


@pytest.mark.parametrize("d", [1, 20])
@pytest.mark.parametrize("guidance, unconditional_every", [(0.0, 0), (1.5, 0), (0.0, 3)])
def test_matrix_form_gives_the_direct_posterior_over_a_few_steps(d, guidance, unconditional_every):
    """Five steps from x_T: the same x_t and log P(k | path) (and log_ratio with the null class)
    to float32 precision."""
    mix = mixture(d, seed=d)
    fast, slow = run_both(mix, S.linear_schedule(1000), 5, guidance, unconditional_every)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-5)
    assert np.abs(fast[0] - fast[0][0]).max() > 1e-3  # the posterior did move


def test_matrix_form_gives_the_direct_posterior_late_in_the_chain():
    """At small t, where sigma_t is small and the classes separate, the two agree on P(k | path)."""
    mix = mixture(20, seed=1, points=True)
    schedule = S.respace(S.linear_schedule(1000), 60)
    fast, slow = run_both(mix, schedule, 60)
    np.testing.assert_allclose(np.exp(fast[0]), np.exp(slow[0]), atol=1e-4)
    np.testing.assert_allclose(fast[2], slow[2], atol=1e-4)


@pytest.mark.parametrize("d, sampler", [(1, S.Sampler()), (20, S.Sampler()), (20, S.Sampler("ddim", eta=1.0)),
                                        (20, S.Sampler("ddpm", "large"))])
def test_matrix_form_gives_the_same_curves(d, sampler):
    """Per-class entropy curves over all T steps of the online estimator agree (same key, same
    trajectories; only the rounding of the update differs)."""
    mix = mixture(d, k=3, seed=2 + d)
    schedule = S.linear_schedule(100)
    problems = D.membership([D.class_label(3)], 3)
    blocks = E.make_blocks(3, 64, 8)
    runs = [E.online_block_sums(Tracker(eps, schedule, sampler, 3), mix, mix.log_weights, (d,), problems, blocks,
                                jax.random.key(1))
            for eps in (M.eps_fn(schedule), direct(M.eps_fn(schedule)))]
    curves = [r.block_sums.sum(axis=2)[..., 0] / 64 for r in runs]  # (T, K) bits
    assert np.abs(curves[0] - curves[1]).max() < 1e-4
    assert curves[0][-1].mean() - curves[0][0].mean() > 0.5  # t = T .. 1: H fell, a real run


def float64_recursion(mix, schedule, xs):
    """log P(k | path) in float64 along stored x_t (xs[i] at t = T - i), DDPM beta~_t."""
    m, s2 = np.asarray(mix.means, np.float64), np.asarray(mix.stds, np.float64) ** 2
    ab, beta = np.asarray(schedule.alpha_bar, np.float64), np.asarray(schedule.betas, np.float64)
    T = ab.shape[0]
    log_w = np.broadcast_to(np.asarray(mix.log_weights, np.float64), (xs.shape[1], m.shape[0])).copy()
    out = [log_w.copy()]
    for i, t in enumerate(range(T, T - xs.shape[0] + 1, -1)):
        x, x_prev = xs[i].astype(np.float64), xs[i + 1].astype(np.float64)
        a, b, a_prev = ab[t - 1], beta[t - 1], ab[t - 2] if t > 1 else 1.0
        eps = np.sqrt(1 - a) * (x[:, None] - np.sqrt(a) * m) / (a * s2 + 1 - a)[:, None]
        mu = (x[:, None] - b / np.sqrt(1 - a) * eps) / np.sqrt(1 - b)
        if t > 1:
            log_w = log_w - ((x_prev[:, None] - mu) ** 2).sum(-1) / (2 * b * (1 - a_prev) / (1 - a))
            log_w -= np.logaddexp.reduce(log_w, axis=1, keepdims=True)
        out.append(log_w.copy())
    return np.stack(out)


def test_matrix_form_is_as_accurate_as_float64_allows():
    """Against the recursion in float64 on the same x_t, at d = 64 over all T = 1000 steps, the
    matrix form's P(k | path) is within 5e-5 everywhere (the direct form's error is larger)."""
    mix = mixture(64, seed=4)
    schedule = S.linear_schedule(1000)
    fast, slow = run_both(mix, schedule, 1000, per_class=25)
    errors = [np.abs(np.exp(run[0]) - np.exp(float64_recursion(mix, schedule, run[2]))).max() for run in (fast, slow)]
    assert errors[0] < 5e-5, errors
    assert errors[0] <= errors[1], errors


# --- which path is taken ---------------------------------------------------------------------

def largest_intermediate(fn, *args) -> int:
    """Elements of the largest array any equation of fn's jaxpr makes (sub-jaxprs included)."""
    def walk(jaxpr):
        biggest = 0
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        biggest = max(biggest, walk(inner))
        return biggest
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_the_matrix_form_is_the_path_taken_and_forms_no_n_k_d_array(guidance):
    """One batched step on N = 7, K = 5, d = 20: the matrix form's largest array is (N, d) (and
    (N, 2, d), a class's and the null eps, with guidance); clipping x_0 (not affine in eps) or
    classes made of components take the general step, which forms every class's eps, an
    (N, K, d) array."""
    N, K, d = 7, 5, 20
    mix = mixture(d, k=K)
    schedule = S.linear_schedule(100)
    with_null = guidance != 0.0
    x, z = jnp.ones((N, d)), jnp.ones((N, d))
    log_w = jnp.zeros((N, K))
    classes = jnp.arange(N) % (K + with_null)

    def step(tracker, params):
        one = lambda x, lw, c, z: tracker.step_with_ratio(params, jnp.asarray(50), x, lw, c, z, with_null)  # noqa
        return lambda x, lw, c, z: jax.vmap(one)(x, lw, c, z)

    fast = Tracker(M.eps_fn(schedule), schedule, S.Sampler(), K, guidance=guidance)
    assert fast.affine_classes(mix, jnp.asarray(50)) is not None
    assert largest_intermediate(step(fast, mix), x, log_w, classes, z) <= 2 * N * d  # (N, d); (N, 2, d) with null

    clipped = Tracker(M.eps_fn(schedule), schedule, S.Sampler(clip_x0=100.0), K, guidance=guidance)
    assert clipped.affine_classes(mix, jnp.asarray(50)) is None
    assert largest_intermediate(step(clipped, mix), x, log_w, classes, z) >= N * K * d

    grouped = M.make_mixture(np.asarray(mix.means), np.asarray(mix.stds), classes=[[0, 1], [2], [3], [4]])
    assert M.eps_fn(schedule).affine_classes(grouped, 50) is None
    four = Tracker(M.eps_fn(schedule), schedule, S.Sampler(), 4, guidance=guidance)
    assert four.affine_classes(grouped, jnp.asarray(50)) is None
    assert largest_intermediate(step(four, grouped), x, log_w[:, :4], classes % 4, z) >= N * 4 * d


def test_affine_form_is_the_eps_of_every_class():
    """eps_fn's affine_classes(mixture, t) = (g, centres) reproduces eps(x_t, t, k) for every class,
    and is None for components with a low-rank part."""
    schedule = S.linear_schedule(100)
    eps = M.eps_fn(schedule)
    mix = mixture(12, k=5, seed=7)
    x = jax.random.normal(jax.random.key(3), (12,))
    gain, centres = eps.affine_classes(mix, 40)
    for k in range(5):
        np.testing.assert_allclose(gain[k] * (x - centres[k]), eps(mix, x, 40, k), rtol=1e-5, atol=1e-6)
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(12, 2)))[0]
    low = M.make_mixture(np.asarray(mix.means), np.asarray(mix.stds), basis=np.stack([basis] * 5),
                         spectrum=np.ones((5, 2)))
    assert eps.affine_classes(low, 40) is None


@pytest.mark.parametrize("kind", ["isotropic", "low rank", "classes"])
def test_one_class_eps_equals_its_row_of_all_classes(kind):
    """eps(mixture, x, t, k) computes one row (and the null row) without the others; it equals
    the row of all_classes for every k, the null class included."""
    schedule = S.linear_schedule(100)
    eps = M.eps_fn(schedule)
    rng = np.random.default_rng(5)
    means, stds = rng.normal(size=(4, 10)), rng.uniform(0.0, 1.0, 4)
    if kind == "isotropic":
        mix = M.make_mixture(means, stds)
    elif kind == "low rank":
        u = np.stack([np.linalg.qr(rng.normal(size=(10, 3)))[0] for _ in range(4)])
        mix = M.make_mixture(means, stds, basis=u, spectrum=rng.uniform(0.1, 2.0, (4, 3)))
    else:
        mix = M.make_mixture(means, stds, classes=[[0, 3], [1], [2]])
    x = jnp.asarray(rng.normal(size=10), jnp.float32)
    rows = eps.all_classes(mix, x, 30, True)
    for k in range(mix.num_classes + 1):
        np.testing.assert_allclose(eps(mix, x, 30, k), rows[k], rtol=1e-5, atol=1e-6)
