"""Full-covariance and low-rank components, and classes made of components, against their
definitions: autodiff gradients, Tweedie, a 2-D quadrature done here, brute-force float64
sums, invariances, and memory at a size whose (N, K, d) intermediate would not fit."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff_info import mixture as M

RNG = np.random.default_rng(0)


def random_cov(d, scale=1.0, rank=None):
    a = RNG.normal(size=(d, rank or d)) * scale
    return a @ a.T / (rank or d)


FULL = M.make_mixture(RNG.normal(size=(3, 3)), weights=[0.2, 0.5, 0.3],
                      covs=[random_cov(3), random_cov(3, 0.5), random_cov(3, 2.0, rank=1)])
U = np.stack([np.linalg.qr(RNG.normal(size=(6, 2)))[0] for _ in range(4)])
LOW = M.make_mixture(RNG.normal(size=(4, 6)), stds=[0.3, 0.0, 0.6, 0.2], basis=U,
                     spectrum=[[1.0, 0.2], [0.5, 0.0], [2.0, 1.0], [0.3, 0.3]], weights=[1, 2, 3, 4],
                     classes=[[0, 2], [1], [3]])
MIXTURES = {"full": FULL, "low rank + isotropic, classes": LOW}


def dense_covs(mix):
    """(K, d, d) float64 S_k from the stored form."""
    s2 = np.asarray(mix.stds, np.float64) ** 2
    covs = s2[:, None, None] * np.eye(mix.dim)
    if mix.basis is not None:
        u, l = np.asarray(mix.basis, np.float64), np.asarray(mix.spectrum, np.float64)
        covs = covs + np.einsum("kdr,kr,ker->kde", u, l, u)
    return covs


def brute_class_log_joint(mix, x, ab):
    """(C,) log sum_{k in c} pi_k N(x; sqrt(ab) m_k, ab S_k + (1 - ab) I), float64, dense."""
    covs = ab * dense_covs(mix) + (1 - ab) * np.eye(mix.dim)
    means = math.sqrt(ab) * np.asarray(mix.means, np.float64)
    out = []
    for k in range(mix.num_components):
        r = x - means[k]
        _, logdet = np.linalg.slogdet(covs[k])
        out.append(float(mix.log_weights[k]) - 0.5 * r @ np.linalg.solve(covs[k], r) - 0.5 * logdet
                   - 0.5 * mix.dim * math.log(2 * math.pi))
    out = np.asarray(out)
    cls = mix.component_class
    return np.array([np.logaddexp.reduce(out[cls == c]) for c in range(mix.num_classes)])


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("ab", [0.95, 0.4, 0.02])
def test_densities_match_dense_float64_algebra(name, ab):
    mix = MIXTURES[name]
    x = RNG.normal(size=mix.dim)
    got = np.asarray(M.log_joint(mix, jnp.asarray(x, jnp.float32), ab))
    np.testing.assert_allclose(got, brute_class_log_joint(mix, x, ab), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("ab", [0.9, 0.3, 0.02])
def test_scores_are_gradients_and_denoisers_are_tweedie(name, ab):
    mix = MIXTURES[name]
    x = jnp.asarray(RNG.normal(size=mix.dim), jnp.float32)
    for c in range(mix.num_classes):
        g = jax.grad(lambda x: M.log_prob_given_class(mix, x, ab)[c])(x)
        np.testing.assert_allclose(M.score(mix, x, ab, c), g, rtol=1e-4, atol=1e-4)
        tweedie = (x + (1 - ab) * M.score(mix, x, ab, c)) / math.sqrt(ab)
        np.testing.assert_allclose(M.denoiser(mix, x, ab, c), tweedie, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(M.score(mix, x, ab), jax.grad(M.log_prob, 1)(mix, x, ab), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(M.score(mix, x, ab, mix.num_classes), M.score(mix, x, ab), rtol=1e-6)
    np.testing.assert_allclose(M.eps(mix, x, ab, 0), -math.sqrt(1 - ab) * M.score(mix, x, ab, 0), rtol=1e-6)


def test_full_covariance_against_a_2d_quadrature():
    """p(x_t | k) and E[x_0 | x_t, k] as integrals over x_0 on a grid: the forward kernel
    N(x_t; sqrt(ab) x_0, (1 - ab) I) against the component's density N(x_0; m, S)."""
    m = np.array([0.5, -0.3])
    rot = np.array([[math.cos(0.6), -math.sin(0.6)], [math.sin(0.6), math.cos(0.6)]])
    cov = rot @ np.diag([0.5, 0.05]) @ rot.T
    mix = M.make_mixture([m], covs=[cov])
    g = np.linspace(-4, 4, 801)
    x0 = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    r0 = x0 - m
    prior = np.exp(-0.5 * np.einsum("ni,ij,nj->n", r0, np.linalg.inv(cov), r0)) / (2 * math.pi * math.sqrt(np.linalg.det(cov)))
    cell = (g[1] - g[0]) ** 2
    for ab in [0.9, 0.5, 0.1]:
        for xt in [np.array([0.2, 0.1]), np.array([-0.8, 0.9])]:
            kern = np.exp(-0.5 * np.sum((xt - math.sqrt(ab) * x0) ** 2, -1) / (1 - ab)) / (2 * math.pi * (1 - ab))
            p = np.sum(kern * prior) * cell
            mean = np.sum((kern * prior)[:, None] * x0, 0) * cell / p
            x = jnp.asarray(xt, jnp.float32)
            assert float(M.log_prob_given_component(mix, x, ab)[0]) == pytest.approx(math.log(p), abs=2e-3)
            np.testing.assert_allclose(M.denoiser(mix, x, ab, 0), mean, atol=2e-3)


def test_norms_and_dot_products_equal_direct_differences():
    """The matrix-product path (d > DIRECT_MAX_DIM) against the direct one to float32 precision."""
    d = 40
    mix = M.centred(M.make_mixture(RNG.normal(size=(7, d)), stds=RNG.uniform(0, 1, 7),
                                   classes=[[0, 1, 2], [3], [4, 5, 6]]))[0]
    x = jnp.asarray(RNG.normal(size=(5, d)), jnp.float32)
    for ab in [0.999, 0.5, 0.01]:
        a = math.sqrt(ab)
        fast = jax.vmap(M.squared_distances, (0, None, None, None))(x, mix.means, a, False)
        direct = jax.vmap(M.squared_distances, (0, None, None, None))(x, mix.means, a, True)
        np.testing.assert_allclose(fast, direct, rtol=2e-5, atol=1e-4)
        scores = jax.vmap(M.class_scores, (None, 0, None))(mix, x, ab)  # (5, C + 1, d)
        for n in range(5):
            xn = np.asarray(x[n], np.float64)
            per = -(xn - a * np.asarray(mix.means, np.float64)) / (ab * np.asarray(mix.stds, np.float64) ** 2 + 1 - ab)[:, None]
            lj = brute_class_log_joint(mix, xn, ab)
            comp = np.array([brute_component(mix, xn, ab, k) for k in range(7)])
            for c in range(3):
                members = mix.component_class == c
                w = np.exp(comp[members] - np.logaddexp.reduce(comp[members]))
                np.testing.assert_allclose(scores[n, c], w @ per[members], rtol=1e-4, atol=1e-3)
            post = np.exp(lj - np.logaddexp.reduce(lj))
            np.testing.assert_allclose(scores[n, 3], post @ np.asarray(scores[n, :3], np.float64), rtol=1e-4, atol=1e-3)


def brute_component(mix, x, ab, k):
    v = ab * float(mix.stds[k]) ** 2 + 1 - ab
    r = x - math.sqrt(ab) * np.asarray(mix.means[k], np.float64)
    return float(mix.log_weights[k]) - 0.5 * r @ r / v - 0.5 * mix.dim * math.log(2 * math.pi * v)


def test_a_class_of_coincident_components_is_one_component():
    """Two components with the same mean and std in one class are that one component."""
    split = M.make_mixture([-1.0, 2.0, 2.0], [0.5, 0.3, 0.3], [2, 1, 2], classes=[[0], [1, 2]])
    whole = M.make_mixture([-1.0, 2.0], [0.5, 0.3], [2, 3])
    x = jnp.array([0.7])
    for ab in [0.9, 0.2]:
        np.testing.assert_allclose(M.log_posterior(split, x, ab), M.log_posterior(whole, x, ab), atol=1e-6)
        np.testing.assert_allclose(M.class_eps(split, x, ab), M.class_eps(whole, x, ab), atol=1e-6)
        np.testing.assert_allclose(M.class_denoisers(split, x, ab), M.class_denoisers(whole, x, ab), atol=1e-6)


def test_components_are_stored_grouped_by_class():
    mix = M.make_mixture([0.0, 1.0, 2.0, 3.0], weights=[1, 2, 3, 4], classes=[[3, 0], [2, 1]])
    np.testing.assert_allclose(mix.means[:, 0], [3, 0, 2, 1])
    np.testing.assert_allclose(mix.class_weights, [0.5, 0.5], rtol=1e-6)
    assert mix.class_sizes == (2, 2) and mix.num_classes == 2 and mix.num_components == 4
    np.testing.assert_array_equal(mix.component_class, [0, 0, 1, 1])


def test_sampling_moments_of_low_rank_classes():
    n = 200_000
    for c in range(LOW.num_classes):
        x = np.asarray(M.sample_xt_given_classes(LOW, jax.random.key(c), jnp.full((n,), c), 1.0), np.float64)
        members = LOW.component_class == c
        pi = np.asarray(LOW.weights, np.float64)[members]
        pi = pi / pi.sum()
        mu = np.asarray(LOW.means, np.float64)[members]
        mean = pi @ mu
        cov = np.einsum("k,kde->de", pi, dense_covs(LOW)[members]) + np.einsum("k,kd,ke->de", pi, mu - mean, mu - mean)
        np.testing.assert_allclose(x.mean(0), mean, atol=0.02)
        np.testing.assert_allclose(np.cov(x.T), cov, atol=0.03)


@pytest.mark.parametrize("kwargs, match", [
    (dict(means=[[0, 0], [1, 1]], covs=[np.eye(2), [[1, 2], [2, 1]]]), "component 1 is not positive semi-definite"),
    (dict(means=[[0, 0], [1, 1]], covs=[np.eye(2), [[1, 0.5], [0, 1]]]), "component 1 is not symmetric"),
    (dict(means=[[0, 0], [1, 1]], covs=[np.eye(2)]), "one 2 x 2 matrix per component"),
    (dict(means=[[0, 0], [1, 1]], covs=[np.eye(3), np.eye(3)]), "one 2 x 2 matrix per component"),
    (dict(means=[[0, 0], [1, 1]], stds=[1, 1], covs=[np.eye(2), np.eye(2)]), "not both"),
    (dict(means=[[0, 0], [1, 1]], basis=np.ones((2, 2, 1))), "come together"),
    (dict(means=[[0, 0], [1, 1]], basis=np.ones((2, 2, 1)), spectrum=np.ones((2, 1))), "orthonormal"),
    (dict(means=[0, 1, 2], classes=[[0, 1], [1, 2]]), "component 1 is in class 0 and class 1"),
    (dict(means=[0, 1, 2], classes=[[0, 1], []]), "class 1 must be a non-empty list"),
    (dict(means=[0, 1, 2], classes=[[0, 1], [3]]), "class 1 names component 3"),
    (dict(means=[0, 1, 2], classes=[[0, 1]]), "component 2 is in no class"),
])
def test_bad_covariances_and_classes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.make_mixture(**kwargs)


def test_a_mixture_whose_n_k_d_would_not_fit_runs_in_modest_memory():
    """N = 512 points, K = 20,000 point components in 10 classes, d = 1024: an (N, K, d)
    float32 intermediate would be 42 GB; the matrix products need a few hundred MB."""
    code = """
import resource, jax, jax.numpy as jnp, numpy as np
from jaxdiff_info import mixture as M
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
K, d, N = 20_000, 1024, 512
rng = np.random.default_rng(0)
mix = M.make_mixture(rng.normal(size=(K, d)).astype(np.float32) * 0.1, classes=[list(range(c, K, 10)) for c in range(10)])
x = jax.random.normal(jax.random.key(0), (N, d))
before = peak()
post = jax.jit(jax.vmap(M.log_posterior, (None, 0, None)))(mix, x, 0.5)
eps = jax.jit(jax.vmap(M.class_eps, (None, 0, None)))(mix, x, 0.5)
assert post.shape == (N, 10) and eps.shape == (N, 11, d) and bool(jnp.all(jnp.isfinite(eps)))
print(before, peak())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split()[-2:])
    assert after - before < 1500, f"the computation raised peak memory from {before} MB to {after} MB"
