"""Estimator 4: information from denoising errors (I-MMSE), with a mixture's exact denoisers or
a network's class-conditional and null-class predictions.

With gamma_t = abar_t / (1 - abar_t), x_t / sqrt(1 - abar_t) = sqrt(gamma_t) x_0 + noise, and the
I-MMSE relation (Guo, Shamai, Verdu 2005) in its mismatched form (Verdu 2010) gives, in nats,
for a decision problem Z with groups g over the classes S (the sub-population of S):

    d KL(p(x_t | g) || p_S(x_t)) / d gamma = 1/2 E_{x_0 ~ g} || E[x_0 | x_t, g] - E_S[x_0 | x_t] ||^2
    I(Z; X_t) = sum_g q_g KL(p(x_t | g) || p_S(x_t)),      H(Z | X_t) = H(Z) - I(Z; X_t)

where E[x_0 | x_t, G] = sum_{c in G} P(c | x_t, c in G) E[x_0 | x_t, c] for a set G of classes
(a group g, or S). KL = 0 at gamma = 0, so each is the integral of its integrand from 0.

Monte Carlo: n samples per class k, each a draw x_t ~ p(x_t | k) at every step, independent
from step to step like forward Monte Carlo's. Its integrand is
f = 1/2 ||E[x_0 | x_t, g(k)] - E_S[x_0 | x_t]||^2, the expectation given x_t of the plain error
difference (the class within its group averaged out by its posterior: Rao-Blackwellised).
Integrated over gamma (trapezoid rule in log-SNR over the steps; in gamma on [0, gamma_T],
with f at gamma = 0 exact), J(t) = int_0^{gamma_t} f d gamma per sample, and E_k[J] is class k's
share of its group's KL: sum_{k in S} (pi_k / pi_S) E_k[J] = I(Z; X_t). For the class label over
all classes, E_k[J] = D_k(t) = KL(p(x_t | k) || p(x_t)). Optionally (common_noise) one x_0 and
one noise z per sample serve every t, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z: common random
numbers make each sample's curve smooth, but its integral then adds up strongly correlated
terms, and the curves are 10 to 40 times noisier (docs/method.md).

Given examples (x_0 from data, or a model's own samples): sample j of class k is one example,
the same at every t, noised afresh at every step (x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z_t),
so the bootstrap over blocks of samples covers the spread between examples.

A network gives E[x_0 | x_t, k] - E[x_0 | x_t] = -(eps(x_t, t, k) - eps(x_t, t, null)) / sqrt(gamma_t):
two calls per sample and step give the class label's integrand
f = ||eps_k - eps_null||^2 / (2 gamma_t), for x_0 of class k (the class label only: a group's
denoiser needs P(c | x_t), which a network does not give). Its value at gamma = 0, 1/2 ||m_k - m||^2,
is taken as its value at the noisiest step; the interval [0, gamma_T] it closes has width
gamma_T (4e-5 on the linear 1000-step schedule).

The formulas: docs/method.md, "Estimator 4: information from denoising errors (I-MMSE)".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info import mixture as gmm
from jaxdiff_info.distributed import shard_rows, to_host
from jaxdiff_info.estimators import Blocks
from jaxdiff_info.schedule import Schedule
from jaxdiff_info.tracking import step_chunks

HIGHEST = jax.lax.Precision.HIGHEST
BATCH_FLOATS = 2**24  # samples per vmapped batch of integrands: at most this many floats of (C + M) d rows


# --- per example ---------------------------------------------------------------------------

def set_weights(log_posterior: jax.Array, sets: jax.Array) -> jax.Array:
    """(M, C) w_Gc = P(c | x_t, c in G) for M non-empty sets G of classes (M, C) bool, from (C,)
    log P(c | x_t): the denoiser of a set is E[x_0 | x_t, G] = sum_c w_Gc E[x_0 | x_t, c]."""
    return jax.nn.softmax(jnp.where(sets, log_posterior, -jnp.inf), axis=-1)


def information_integrands(mixture: gmm.GaussianMixture, x_t: jax.Array, alpha_bar: jax.Array,
                           groups: jax.Array, populations: jax.Array) -> jax.Array:
    """(M,) f_m = 1/2 ||E[x_0 | x_t, G_m] - E[x_0 | x_t, S_m]||^2 in nats per unit gamma, for M
    pairs of a group G_m inside a population S_m of classes ((M, C) bool each).

    Formed as ||(w_G - w_S) @ E[x_0 | x_t, c]||^2, the weights' difference first: both sum to 1,
    so nothing large cancels."""
    log_post = gmm.log_posterior(mixture, x_t, alpha_bar)  # (C,)
    denoisers = gmm.class_denoisers(mixture, x_t, alpha_bar)[:-1]  # (C, d)
    dw = set_weights(log_post, groups) - set_weights(log_post, populations)  # (M, C)
    diff = jnp.einsum("mc,cd->md", dw, denoisers, precision=HIGHEST)
    return 0.5 * jnp.sum(diff**2, axis=-1)


# --- the sets of every sample's integrands ---------------------------------------------------

def integrand_sets(membership: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For P problems (P, G, K) and, last, the class label over all K classes (M = P + 1):
    groups (M, K, K) [m, k, c]: c is in the group of class k; populations (M, K) the classes of
    each problem (S); member (M, K): class k is in problem m. A class outside a problem gets its
    own class as a stand-in group (its integrand is multiplied by member = 0)."""
    membership = np.asarray(membership, bool)
    P, _, K = membership.shape
    eye = np.eye(K, dtype=bool)
    member = np.concatenate([membership.any(axis=1), np.ones((1, K), bool)])
    populations = member.copy()
    same = np.einsum("pgk,pgc->pkc", membership, membership)  # (P, K, K)
    groups = np.concatenate([np.where(member[:P, :, None], same, eye), eye[None]])
    return groups, populations, member


# --- the estimator ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InformationSums:
    """Result of `information_block_sums`, in step order t = 1..T, in nats: problem_sums
    (T, K, B, P) block sums of J_p = int_0^{gamma_t} f_p d gamma over samples of each class
    (class k's share of its group's KL, 0 for a class outside problem p); label_sums (T, K, B)
    the same for the class label over all classes, whose means are D_k(t) = KL(p(x_t | k) || p(x_t))."""

    problem_sums: np.ndarray
    label_sums: np.ndarray


def integration_weights(alpha_bar: np.ndarray) -> np.ndarray:
    """(T, 2) weights (a_i, b_i) of the steps visited in the order t = T..1 (gamma increasing):
    the integral grows by a_i f_{previous} + b_i f_i. The first step closes [0, gamma_T] by the
    trapezoid rule in gamma (a = b = gamma_T / 2, f_previous the integrand at gamma = 0); every
    later one [gamma_{t+1}, gamma_t] by the trapezoid rule in lambda = log gamma (d gamma =
    gamma d lambda): a = gamma_{t+1} dlambda / 2, b = gamma_t dlambda / 2."""
    ab = np.asarray(alpha_bar, np.float64)[::-1]
    gamma = ab / (1.0 - ab)
    d_lambda = np.diff(np.log(gamma))
    a = np.concatenate([[gamma[0] / 2], gamma[:-1] * d_lambda / 2])
    b = np.concatenate([[gamma[0] / 2], gamma[1:] * d_lambda / 2])
    return np.stack([a, b], axis=-1)


def information_block_sums(mixture: gmm.GaussianMixture, schedule: Schedule, membership: np.ndarray,
                           blocks: Blocks, key: jax.Array, common_noise: bool = False,
                           x_0: jax.Array | None = None, sharding=None) -> InformationSums:
    """The I-MMSE information integrals of `blocks.per_class` samples of every class at every
    step of `schedule`, summed over blocks, in one compiled scan over the steps (t = T..1).

    Sample j of class k is a sequence of draws x_t ~ p(x_t | k), independent from step to step
    (key fold_in(key, t)), like forward Monte Carlo's: the integral then sums independent terms.
    common_noise: one x_0 ~ p(x_0 | k) and one z ~ N(0, I) per sample instead, reused at every t
    (x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z: common random numbers; keys fold_in(key, 0) and
    fold_in(key, 1)); a smooth curve per sample, but far noisier (docs/method.md).
    x_0: (N, d) given examples in `blocks`' order (class-major), one per sample at every t, noised
    afresh at every step (key fold_in(key, t)), instead of draws from the mixture.
    mixture: centred (`mixture.centred`) for float32, and x_0 in the same coordinates.
    sharding: of the sample axis (over devices and processes; the same numbers)."""
    if x_0 is not None and common_noise:
        raise ValueError("common_noise draws its own x_0; give x_0 or common_noise, not both")
    groups, populations, member = integrand_sets(membership)
    classes = jnp.asarray(blocks.classes)
    rows = (mixture.num_components + groups.shape[0] + 1) * max(mixture.dim, mixture.rank)  # floats per sample
    batch = int(min(classes.shape[0], max(1, BATCH_FLOATS // rows)))
    weights = jnp.asarray(integration_weights(np.asarray(schedule.alpha_bar)), jnp.float32)
    given = None if x_0 is None else jnp.asarray(x_0, jnp.float32).reshape(classes.shape[0], mixture.dim)
    if sharding is not None:
        classes = jax.device_put(classes, sharding)
        given = None if given is None else jax.device_put(given, sharding)
    sums = _information(mixture, schedule.alpha_bar, weights, classes, key, jnp.asarray(groups),
                        jnp.asarray(populations), jnp.asarray(member), given, blocks=blocks, batch=batch,
                        common_noise=common_noise, sharding=sharding)
    sums = to_host(sums)[::-1]  # visited t = T..1; reported t = 1..T
    return InformationSums(sums[..., :-1], sums[..., -1])


@functools.partial(jax.jit, static_argnames=("blocks", "batch", "common_noise", "sharding"))
def _information(mixture, alpha_bar, weights, classes, key, groups, populations, member, given, blocks, batch,
                 common_noise, sharding):
    sample_groups = jnp.moveaxis(groups[:, classes], 1, 0)  # (N, M, K): the group of each sample's class
    sample_member = member[:, classes].T.astype(jnp.float32)  # (N, M)
    if common_noise:
        x_0 = gmm.sample_xt_given_classes(mixture, jax.random.fold_in(key, 0), classes, jnp.ones((), jnp.float32))
        z = jax.random.normal(jax.random.fold_in(key, 1), x_0.shape, x_0.dtype)

    def integrands(t, ab):
        if common_noise:
            x_t = jnp.sqrt(ab) * x_0 + jnp.sqrt(1.0 - ab) * z
        elif given is not None:
            x_t = noised(given, ab, jax.random.fold_in(key, t))
        else:
            x_t = gmm.sample_xt_given_classes(mixture, jax.random.fold_in(key, t), classes, ab)
        x_t = shard_rows(x_t, sharding)
        f = jax.lax.map(lambda args: information_integrands(mixture, args[0], ab, args[1], populations),
                        (x_t, sample_groups), batch_size=batch)
        return f * sample_member  # (N, M)

    def step(carry, inputs):
        integral, f_prev = carry
        t, ab, a, b = inputs
        f = integrands(t, ab)
        integral = integral + a * f_prev + b * f
        return (integral, f), blocks.sums(integral)

    T = alpha_bar.shape[0]
    f_0 = integrands(0, jnp.zeros((), alpha_bar.dtype))  # gamma = 0: every denoiser is its class's mean
    steps = (jnp.arange(T, 0, -1), alpha_bar[::-1], weights[:, 0], weights[:, 1])
    _, sums = jax.lax.scan(step, (jnp.zeros_like(f_0), f_0), steps)
    return sums  # (T, K, B, M), t = T..1


def noised(x_0: jax.Array, alpha_bar: jax.Array, key: jax.Array) -> jax.Array:
    """x_t = sqrt(abar) x_0 + sqrt(1 - abar) z, z ~ N(0, I): the forward process from given x_0."""
    z = jax.random.normal(key, x_0.shape, jnp.float32)
    return jnp.sqrt(alpha_bar) * x_0 + jnp.sqrt(1.0 - alpha_bar) * z


# --- examples: x_0 from data or from a model's samples ---------------------------------------

def examples_per_class(x_0: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int,
                       what: str = "examples") -> np.ndarray:
    """(K * per_class, ...) the first per_class examples of every class, class-major (the layout
    of `estimators.Blocks`). ValueError, one line, when a class has fewer."""
    x_0, labels = np.asarray(x_0), np.asarray(labels)
    if labels.ndim != 1 or x_0.shape[:1] != labels.shape:
        raise ValueError(f"x_0 {x_0.shape} and labels {labels.shape} must have one label per example")
    if labels.size and not (0 <= labels.min() and labels.max() < num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    counts = np.bincount(labels, minlength=num_classes)
    short = int(np.argmin(counts))
    if counts[short] < per_class:
        raise ValueError(f"class {short} has {counts[short]} {what}, fewer than the {per_class} samples per class "
                         f"asked for; ask for at most {counts[short]}")
    return np.concatenate([x_0[labels == k][:per_class] for k in range(num_classes)])


# --- a network: the class label from two calls per sample and step ---------------------------

def network_information_block_sums(eps, params, schedule: Schedule, x_0: jax.Array, blocks: Blocks, key: jax.Array,
                                   *, batch_size: int | None = None, chunk: int | None = None,
                                   progress=None, sharding=None) -> np.ndarray:
    """(T, K, B) block sums over samples of each class of J = int_0^{gamma_t} f d gamma in nats,
    in step order t = 1..T, whose means are D_k(t) = KL(p(x_t | k) || p(x_t)) of the model
    whose denoisers `eps` gives: f = ||eps(x_t, t, k) - eps(x_t, t, K)||^2 / (2 gamma_t) for a
    sample of class k (k = K the null class), x_t noised afresh at every step from the sample's
    x_0 (key fold_in(key, t)); f at gamma = 0 is taken as f at t = T (module docstring).

    eps: per-example eps(params, x_t, t, k) on `schedule`'s timesteps; x_0 (N, *shape) in the
    order of `blocks` (class-major); batch_size: samples per network call (2 examples each;
    None: all); chunk: steps per compiled call, progress(steps_done) after each; sharding: of
    the sample axis (over devices and processes; the same numbers)."""
    classes = jnp.asarray(blocks.classes)
    x_0 = jnp.asarray(x_0, jnp.float32)
    if sharding is not None:
        classes, x_0 = jax.device_put(classes, sharding), jax.device_put(x_0, sharding)
    if x_0.shape[0] != classes.shape[0]:
        raise ValueError(f"{x_0.shape[0]} examples for {classes.shape[0]} samples")
    K = blocks.num_classes
    alpha_bar = np.asarray(schedule.alpha_bar, np.float64)
    weights = integration_weights(alpha_bar)  # visited t = T..1
    gamma = alpha_bar / (1.0 - alpha_bar)
    eps_batch = jax.vmap(eps, (None, 0, None, 0))
    batch = classes.shape[0] if batch_size is None else int(min(batch_size, classes.shape[0]))

    def integrands(p, t, step, ab, g):
        x_t = shard_rows(noised(x_0, ab, jax.random.fold_in(key, t)), sharding)

        def call(args):
            x, k = args
            both = eps_batch(p, jnp.stack([x, x]), step, jnp.stack([k, jnp.full_like(k, K)]))
            return 0.5 * jnp.sum((both[0] - both[1]) ** 2) / g

        return jax.lax.map(call, (x_t, classes), batch_size=batch)  # (N,)

    @jax.jit
    def run(p, carry, ts, steps, abs_, gs, a, b):
        def body(carry, inputs):
            integral, f_prev = carry
            t, step, ab, g, a_i, b_i = inputs
            # the padded no-op steps of a last, short chunk (t = 0) skip the network
            f = jax.lax.cond(t > 0, lambda: integrands(p, t, step, ab, g), lambda: jnp.zeros_like(f_prev))
            f_prev = jnp.where(t == schedule.num_steps, f, f_prev)  # f(gamma = 0) ~ f(gamma_T)
            integral = jnp.where(t > 0, integral + a_i * f_prev + b_i * f, integral)
            return (integral, jnp.where(t > 0, f, f_prev)), blocks.sums(integral)

        return jax.lax.scan(body, carry, (ts, steps, abs_, gs, a, b))

    T = schedule.num_steps
    timesteps = np.asarray(schedule.timesteps)
    carry = (jnp.zeros(classes.shape[0], jnp.float32), jnp.zeros(classes.shape[0], jnp.float32))
    if sharding is not None:  # the carry as the integrals come out: one compilation for every chunk
        carry = jax.device_put(carry, sharding)
    outputs = []
    for ts in step_chunks(T, chunk):
        i = np.where(ts > 0, ts - 1, 0)
        row = np.where(ts > 0, T - ts, 0)  # the position of step t in the visiting order
        args = (jnp.asarray(ts), jnp.asarray(timesteps[i]), jnp.asarray(alpha_bar[i], jnp.float32),
                jnp.asarray(gamma[i], jnp.float32), jnp.asarray(np.where(ts > 0, weights[row, 0], 0), jnp.float32),
                jnp.asarray(np.where(ts > 0, weights[row, 1], 0), jnp.float32))
        carry, sums = run(params, carry, *args)
        outputs.append(to_host(sums))
        if progress is not None:
            jax.block_until_ready(carry)
            progress(int(np.count_nonzero(ts)))
    return np.concatenate(outputs)[:T][::-1]  # visited t = T..1; reported t = 1..T
