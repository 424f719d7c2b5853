"""Draws from the mixture and from its forward process: x_0 ~ p(x_0 | c), x_t ~ p(x_t | c).

A draw of class c first picks a component k ~ pi_k / pi_c among the class's members, then
x_0 = m_k + s_k z + U_k (sqrt(l_k) * z_r) and x_t = sqrt(abar) m_k + sqrt(v_k) z +
U_k (sqrt(abar l_k) * z_r), with z ~ N(0, I_d), z_r ~ N(0, I_r).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff_info.mixture.model import GaussianMixture, class_layout
from jaxdiff_info.schedule import Schedule, alpha_bar_at


def sample_components(mixture: GaussianMixture, key: jax.Array, classes: jax.Array) -> jax.Array:
    """(N,) a component k ~ pi_k / pi_c of each class c in `classes` (N,)."""
    if mixture.singleton_classes:
        return jnp.asarray(classes)
    index, valid = class_layout(mixture)
    logits = jnp.where(valid, mixture.log_weights[index], -jnp.inf)[classes]  # (N, L)
    slot = jax.random.categorical(key, logits)
    return jnp.asarray(index)[classes, slot]


def xt_given_component(mixture: GaussianMixture, k: jax.Array, alpha_bar: jax.Array, z: jax.Array,
                       z_r: jax.Array | None = None) -> jax.Array:
    """(d,) x_t = sqrt(abar) m_k + sqrt(v_k) z + U_k (sqrt(abar l_k) z_r): a draw from
    p(x_t | k) given z ~ N(0, I_d) and z_r ~ N(0, I_r) (alpha_bar = 1: a draw of x_0)."""
    v = alpha_bar * mixture.stds[k] ** 2 + (1.0 - alpha_bar)
    x = jnp.sqrt(alpha_bar) * mixture.means[k] + jnp.sqrt(v) * z
    if mixture.basis is not None:
        x = x + jnp.matmul(mixture.basis[k], jnp.sqrt(alpha_bar * mixture.spectrum[k]) * z_r,
                           precision=jax.lax.Precision.HIGHEST)  # float32 on GPUs too, not TF32
    return x


def sample_xt_given_classes(mixture: GaussianMixture, key: jax.Array, classes: jax.Array,
                            alpha_bar: jax.Array) -> jax.Array:
    """(N, d) x_t ~ p(x_t | c) for every class c in `classes` (N,), drawn in one step."""
    n = classes.shape[0]
    z = jax.random.normal(key, (n, mixture.dim))  # from `key` itself: the draw of a mixture without classes
    ks = sample_components(mixture, jax.random.fold_in(key, 1), classes)
    z_r = jax.random.normal(jax.random.fold_in(key, 2), (n, mixture.rank))
    return jax.vmap(xt_given_component, (None, 0, None, 0, 0))(mixture, ks, alpha_bar, z, z_r)


def sample_classes(mixture: GaussianMixture, key: jax.Array, num: int) -> jax.Array:
    """(num,) c ~ Categorical(pi_c)."""
    return jax.random.categorical(key, mixture.class_log_weights, shape=(num,))


def sample_x0(mixture: GaussianMixture, key: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
    """(num, d) x_0 ~ p(x_0) and their classes (num,)."""
    key_c, key_x = jax.random.split(key)
    cs = sample_classes(mixture, key_c, num)
    return sample_xt_given_classes(mixture, key_x, cs, jnp.ones((), jnp.float32)), cs


def sample_xt(mixture: GaussianMixture, key: jax.Array, num: int, schedule: Schedule, t: int) -> tuple[jax.Array, jax.Array]:
    """(num, d) x_t ~ p(x_t) at step t of `schedule`, and their classes (num,)."""
    key_c, key_x = jax.random.split(key)
    cs = sample_classes(mixture, key_c, num)
    return sample_xt_given_classes(mixture, key_x, cs, alpha_bar_at(schedule, jnp.asarray(t))), cs
