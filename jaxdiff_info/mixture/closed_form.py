"""Every quantity of the diffused mixture in closed form, for ONE point x (d,) at alpha_bar.

With v_k = abar s_k^2 + 1 - abar and e_kj = v_k + abar l_kj (the variances of x_t | k along
U_k's columns and off them), p(x_t | k) = N(sqrt(abar) m_k, v_k I + abar U_k diag(l_k) U_k^T).
Distances come from norms and dot products, ||x - a m||^2 = ||x||^2 - 2 a x.m + a^2 ||m||^2,
and projections U_k^T x, so that `jax.vmap` over N points turns every sum over components into
a matrix product: O(N K d) flops, memory O(N (K + C d)), never an (N, K, d) intermediate.
(Centre the mixture first, `centred`, so that float32 does not cancel.)

Class c (a group of components) has the sub-mixture as its model:
P(k | x_t, c) = softmax over k in c of log pi_k + log p(x_t | k), and its score, eps and
denoiser are the P(k | x_t, c)-weighted ones of its components. Class index C (one past the
last) is "no class", the whole mixture, like the null class of a classifier-free-guided
network.

docs/method.md, "Gaussian mixtures in closed form" and "Full-covariance components and
classes made of components".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdiff_info.mixture.model import GaussianMixture, class_layout

HIGHEST = jax.lax.Precision.HIGHEST
# up to this dimension distances are formed directly from x - sqrt(abar) m_k: no cancellation,
# and the (N, K, d) differences are no bigger than a few (N, K) arrays
DIRECT_MAX_DIM = 8


def _dot(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def _variances(mixture: GaussianMixture, alpha_bar):
    """v (K,) off the basis and e (K, r) along it."""
    v = alpha_bar * mixture.stds**2 + (1.0 - alpha_bar)
    e = None if mixture.basis is None else v[:, None] + alpha_bar * mixture.spectrum
    return v, e


def _projections(mixture: GaussianMixture, x, alpha_bar):
    """(K, r) U_k^T (x - sqrt(abar) m_k), or None without a basis."""
    if mixture.basis is None:
        return None
    ux = jnp.einsum("kdr,d->kr", mixture.basis, x, precision=HIGHEST)
    um = jnp.einsum("kdr,kd->kr", mixture.basis, mixture.means, precision=HIGHEST)
    return ux - jnp.sqrt(alpha_bar) * um


def squared_distances(x: jax.Array, means: jax.Array, a: jax.Array, direct: bool) -> jax.Array:
    """(K,) ||x - a m_k||^2: directly, or from norms and dot products (a matrix product once
    vmapped over points; exact up to float32 cancellation when x is near a m_k)."""
    if direct:
        return jnp.sum((x - a * means) ** 2, axis=-1)
    sq = _dot(x, x) - 2.0 * a * _dot(means, x) + a**2 * jnp.sum(means**2, axis=-1)
    return jnp.maximum(sq, 0.0)


def log_prob_given_component(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(K,) log p(x_t | k) = log N(x_t; sqrt(abar) m_k, abar S_k + (1 - abar) I)."""
    a = jnp.sqrt(alpha_bar)
    v, e = _variances(mixture, alpha_bar)
    sq = squared_distances(x, mixture.means, a, direct=mixture.dim <= DIRECT_MAX_DIM)
    d, r = mixture.dim, mixture.rank
    if mixture.basis is None:
        maha, log_det = sq / v, d * jnp.log(v)
    else:
        p2 = _projections(mixture, x, alpha_bar) ** 2
        maha = jnp.sum(p2 / e, axis=-1)
        log_det = jnp.sum(jnp.log(e), axis=-1)
        if not mixture.complete:  # the isotropic rest off the basis
            maha = maha + jnp.maximum(sq - jnp.sum(p2, axis=-1), 0.0) / v
            log_det = log_det + (d - r) * jnp.log(v)
    return -0.5 * maha - 0.5 * log_det - 0.5 * d * math.log(2.0 * math.pi)


def component_log_joint(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(K,) log pi_k + log p(x_t | k)."""
    return mixture.log_weights + log_prob_given_component(mixture, x, alpha_bar)


def isotropic_eps_gains(mixture: GaussianMixture, alpha_bar: jax.Array) -> jax.Array:
    """(K,) g_k with eps(x_t | k) = g_k (x_t - sqrt(abar) m_k) for isotropic components and
    points (no basis): g_k = sqrt(1 - abar) / v_k, v_k = abar s_k^2 + 1 - abar."""
    v, _ = _variances(mixture, alpha_bar)
    return jnp.sqrt(1.0 - alpha_bar) / v


def _within_class(mixture: GaussianMixture, joint):
    """(C,) log p(x_t, c) and (C, L) P(k | x_t, c) in the padded class layout."""
    index, valid = class_layout(mixture)
    padded = jnp.where(valid, joint[index], -jnp.inf)
    log_class = jax.nn.logsumexp(padded, axis=-1)
    return log_class, jnp.exp(padded - jnp.where(jnp.isfinite(log_class), log_class, 0.0)[:, None])


def log_joint(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(C,) log p(x_t, c) = log sum_{k in c} pi_k p(x_t | k)."""
    joint = component_log_joint(mixture, x, alpha_bar)
    return joint if mixture.singleton_classes else _within_class(mixture, joint)[0]


def log_prob_given_class(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(C,) log p(x_t | c), the class's sub-mixture."""
    return log_joint(mixture, x, alpha_bar) - mixture.class_log_weights


def log_prob(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """log p(x_t) = logsumexp_k(log pi_k + log p(x_t | k))."""
    return jax.nn.logsumexp(component_log_joint(mixture, x, alpha_bar))


def log_posterior(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(C,) log P(c | x_t), the class posterior."""
    return jax.nn.log_softmax(log_joint(mixture, x, alpha_bar))


def component_log_posterior(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(K,) log P(k | x_t) over components."""
    return jax.nn.log_softmax(component_log_joint(mixture, x, alpha_bar))


def _class_sums(mixture: GaussianMixture, x, alpha_bar):
    """Everything the per-class linear forms need: the class posterior (C,) and, in the
    padded layout (C, L), P(k | x_t, c), v_k and the member means (C, L, d); with a basis
    also e (C, L, r), the projections (C, L, r) and the member bases (C, L, d, r)."""
    joint = component_log_joint(mixture, x, alpha_bar)
    index, valid = class_layout(mixture)
    if mixture.singleton_classes:
        log_class, within = joint, jnp.ones(index.shape, joint.dtype)
    else:
        log_class, within = _within_class(mixture, joint)
    v, e = _variances(mixture, alpha_bar)
    parts = dict(posterior=jnp.exp(jax.nn.log_softmax(log_class)), w=within, v=v[index],
                 s2=(mixture.stds**2)[index], m=mixture.means[index])
    if mixture.basis is not None:
        parts.update(e=e[index], p=_projections(mixture, x, alpha_bar)[index], u=mixture.basis[index],
                     l=mixture.spectrum[index])
    return parts


def _weighted(w, vectors):
    """(C, d) sum_l w_cl vectors_cl: a batched matrix product over classes."""
    return jnp.einsum("cl,cld->cd", w, vectors, precision=HIGHEST)


def _sum_offsets(mixture: GaussianMixture, c, x, m, a):
    """(C, d) sum_l c_cl (x - a m_cl): directly in low d, else as sum(c) x - a (c @ m)."""
    if mixture.dim <= DIRECT_MAX_DIM:
        return jnp.einsum("cl,cld->cd", c, x - a * m, precision=HIGHEST)
    return jnp.sum(c, axis=-1)[:, None] * x - a * _weighted(c, m)


def _along_basis(coef, u):
    """(C, d) sum_l sum_j coef_clj U_cl[:, j]."""
    return jnp.einsum("clr,cldr->cd", coef, u, precision=HIGHEST)


def _with_null(per_class, posterior):
    """(C + 1, d): the classes' rows and, last, the whole mixture's (posterior-weighted)."""
    return jnp.concatenate([per_class, _dot(posterior, per_class)[None]])


def class_scores(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(C + 1, d) grad log p(x_t | c) for every class c, and last the unconditional score."""
    a = jnp.sqrt(alpha_bar)
    q = _class_sums(mixture, x, alpha_bar)
    wv = q["w"] / q["v"]  # (C, L)
    if mixture.complete:
        per_class = -_along_basis(q["w"][..., None] * q["p"] / q["e"], q["u"])
    else:
        per_class = -_sum_offsets(mixture, wv, x, q["m"], a)
        if mixture.basis is not None:
            per_class = per_class - _along_basis(
                q["w"][..., None] * q["p"] * (1.0 / q["e"] - 1.0 / q["v"][..., None]), q["u"])
    return _with_null(per_class, q["posterior"])


def class_denoisers(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(C + 1, d) E[x_0 | x_t, c] for every class c, and last E[x_0 | x_t]:
    E[x_0 | x_t, k] = m_k + sqrt(abar) S_k C_k(t)^{-1} (x_t - sqrt(abar) m_k)."""
    a = jnp.sqrt(alpha_bar)
    q = _class_sums(mixture, x, alpha_bar)
    w = q["w"]
    if mixture.complete:
        per_class = _weighted(w, q["m"]) + a * _along_basis(w[..., None] * q["p"] * (q["l"] + q["s2"][..., None]) / q["e"],
                                                           q["u"])
    else:
        g = a * q["s2"] / q["v"]  # the gain s^2 / v off the basis, times sqrt(abar)
        per_class = _weighted(w, q["m"]) + _sum_offsets(mixture, w * g, x, q["m"], a)
        if mixture.basis is not None:
            gain = (q["l"] + q["s2"][..., None]) / q["e"] - (q["s2"] / q["v"])[..., None]
            per_class = per_class + a * _along_basis(w[..., None] * q["p"] * gain, q["u"])
    return _with_null(per_class, q["posterior"])


def class_eps(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(C + 1, d) eps(x_t, t, c) = -sqrt(1 - abar) grad log p(x_t | c), last the unconditional."""
    return -jnp.sqrt(1.0 - alpha_bar) * class_scores(mixture, x, alpha_bar)


def _pick(rows, k):
    """rows (C + 1, d): row k, or the last (the whole mixture) for k = None."""
    return rows[-1] if k is None else rows[jnp.clip(k, 0, rows.shape[0] - 1)]


def score(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array, k: jax.Array | None = None) -> jax.Array:
    """(d,) grad log p(x_t | c = k); k = None or C: the unconditional score."""
    return _pick(class_scores(mixture, x, alpha_bar), k)


def eps(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array, k: jax.Array | None = None) -> jax.Array:
    """(d,) eps(x_t, t, k) = -sqrt(1 - abar) grad log p(x_t | k)  (k = None or C: unconditional)."""
    return _pick(class_eps(mixture, x, alpha_bar), k)


def denoiser(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array, k: jax.Array | None = None) -> jax.Array:
    """(d,) E[x_0 | x_t, c = k]; k = None or C: E[x_0 | x_t]."""
    return _pick(class_denoisers(mixture, x, alpha_bar), k)
