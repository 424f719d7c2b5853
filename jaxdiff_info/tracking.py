"""The online Bayesian classifier: P(k | x_t, ..., x_T) tracked along generated reverse trajectories.

Bayes' rule over one reverse step gives, in log space,

    log w_k(t-1) = log w_k(t) + log N(x_{t-1}; mu(x_t, k), sigma_t^2 I),   log w_k(T) = log pi_k
    P(k | x_{t-1}, ..., x_T) = softmax_k(log w_k(t-1)).

This is the posterior of the path under the sampler's kernels. When each class kernel is the
exact reverse of its forward chain (class -> x_0 -> x_1 -> ... -> x_T Markov), it is the state
posterior P(k | x_t); otherwise a path posterior (the Curves of `jaxdiff_info.online_curves` say
which). sigma_t is the std of the step that really produced x_{t-1}; the last step (t = 1) is
noiseless and carries no update. The model enters only as a per-example eps-predictor
eps(params, x_t, t, k) with k in 0..K-1 the classes and k = K the null class (unconditional).

Sampling, tracking and per-step statistics run in one `lax.scan`; `observe` is a pure
function of (t, x_t, log P(k | x_t, ...), log_ratio) for the whole batch whose outputs are
stacked over steps.

When every class eps is affine in x_t with a scalar gain, eps_k(x) = g_k (x - c_k) (a mixture
whose classes are single isotropic components or points: `mixture.eps_fn(...).affine_classes`),
and the reverse mean is affine in eps, mu(x, e) = A x + B e (every sampler without clip_x0),
every class mean is a common part plus a per-class scalar times x plus a per-class scalar times
c_k. The squared distances ||x_{t-1} - mu_k||^2, less their common part, then come from norms
and the dot products x_{t-1}.c_k, x_t.c_k (matrix products over the batch): O(N K d) flops,
no (N, K, d) array (`Tracker.step_with_ratio`).

The formulas: docs/method.md, "Estimator 3: the online Bayesian classifier" and "What
the online estimator estimates: path posterior and state posterior".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info.schedule import Sampler, Schedule, reverse_mean, reverse_std, reverse_step
from jaxdiff_info.static import schedule_key

HIGHEST = jax.lax.Precision.HIGHEST

EpsFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
Observe = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrackState:
    """x: (N, *shape) current x_t; log_posterior: (N, K) log P(k | x_t, ..., x_T); key: noise key;
    log_ratio: (N,) log [sum_k pi_k p_k(path) / p_null(path)], the density of each path so far
    under the class kernels' mixture over its density under the null kernel; accumulated
    whenever the null class is evaluated (it weighs the paths of unconditional generation),
    0 otherwise; None is read as 0."""

    x: jax.Array
    log_posterior: jax.Array
    key: jax.Array
    log_ratio: jax.Array | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Tracker:
    """A reverse sampler with the online classifier riding along.

    eps_fn:      per-example eps(params, x_t, t, k), k = num_classes is the null class; if it
                 has an attribute all_classes(params, x_t, t, with_null) -> (K [+ 1], *shape),
                 that gives every class's eps at once (`mixture.eps_fn` has one); if it has
                 affine_classes(params, t) -> (g (K,), centres (K, *shape)) with
                 eps_k(x_t) = g_k (x_t - centres_k), or None, the class log-likelihoods are
                 taken in matrix form (`step_with_ratio`; not with clip_x0)
    schedule:    the sampling schedule (respaced or not); eps gets schedule.timesteps
    sampler:     the reverse step taken (and so the kernel the classifier uses)
    num_classes: K
    guidance:    classifier-free guidance weight w: every class kernel uses
                 eps_k + w (eps_k - eps_null); 0 = plain class-conditional kernels
    batch_size:  trajectories per network call; None = all N in one call (N * K examples).
                 Smaller values bound memory and give the same numbers.
    path_posterior: allow kernels whose tracked posterior is a path posterior only (DDIM
                 with eta != 1); refused otherwise
    """

    eps_fn: EpsFn
    schedule: Schedule
    sampler: Sampler
    num_classes: int
    guidance: float = 0.0
    batch_size: int | None = None

    path_posterior: bool = False

    def __post_init__(self):
        if not self.sampler.stochastic:
            raise ValueError(
                "the online classifier needs a stochastic sampler (DDPM, or DDIM with eta > 0): "
                "a deterministic step carries no likelihood to update on"
            )
        if self.sampler.kind == "ddim" and self.sampler.eta != 1 and not self.path_posterior:
            raise ValueError(
                f"DDIM with eta = {self.sampler.eta:g} != 1 is not the reverse of the forward chain: the tracked "
                "P(k | x_t, ..., x_T) would be a path posterior, not the state posterior P(k | x_t) "
                "(docs/method.md); use DDPM or eta = 1, or ask for the path posterior explicitly "
                "(path_posterior=True)"
            )
        check = getattr(self.eps_fn, "check_schedule", None)
        if check is not None:
            check(self.schedule)

    # Equal trackers (the same eps function, equal schedules and settings) compile to the same
    # program, so a tracker is compared by value: `estimators.online_block_sums` then reuses
    # the compiled loop across calls (another seed of a study).
    @functools.cached_property
    def _key(self) -> tuple:
        return (self.eps_fn, schedule_key(self.schedule), self.sampler, self.num_classes, self.guidance,
                self.batch_size, self.path_posterior)

    def __eq__(self, other):
        return isinstance(other, Tracker) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    # --- one trajectory, one step ------------------------------------------------------

    def step_one(self, params, t, x, log_w, c, z, with_null: bool):
        """One reverse step of one trajectory generated with class c (c = K: unconditional).

        x: (*shape), log_w: (K,) normalised log-posterior at x_t, z: (*shape) N(0, I) noise.
        Returns x_{t-1} and log P(k | x_{t-1}, ..., x_T).
        """
        x_prev, log_w_prev, _ = self.step_with_ratio(params, t, x, log_w, c, z, with_null)
        return x_prev, log_w_prev

    def step_with_ratio(self, params, t, x, log_w, c, z, with_null: bool):
        """`step_one`, and the step's increment of TrackState.log_ratio (0 without the null
        class): log sum_k P(k | path) N(x_{t-1}; mu_k, sigma^2) - log N(x_{t-1}; mu_null, sigma^2).

        Every class's eps is formed and stepped with (`all_classes` of the eps function, or a
        vmap over k), except where `affine_classes` applies (`affine_step`)."""
        affine = self.affine_classes(params, t)
        if affine is not None:
            return self.affine_step(params, t, x, log_w, c, z, with_null, affine)
        K = self.num_classes
        s = self.schedule
        all_classes = getattr(self.eps_fn, "all_classes", None)
        if all_classes is not None:  # every class at once (a mixture: its posterior formed once)
            eps = all_classes(params, x, s.timesteps[t - 1], with_null)
        else:
            ks = jnp.arange(K + 1 if with_null else K)
            eps = jax.vmap(self.eps_fn, (None, None, None, 0))(params, x, s.timesteps[t - 1], ks)
        eps_class = eps[:K]
        if with_null:
            eps_null = eps[K]
            eps_class = guided(eps_class, eps_null, self.guidance)
            eps_all = jnp.concatenate([eps_class, eps_null[None]])
        else:
            eps_all = eps_class
        means = jax.vmap(reverse_mean, (None, None, None, 0, None))(s, t, x, eps_all, self.sampler)
        sigma = reverse_std(s, t, self.sampler)
        x_prev = means[c] + sigma * z
        # log N(x_{t-1}; mu(x_t, k), sigma^2 I) up to a term common to all k
        sq = jnp.sum(((x_prev - means) ** 2).reshape(means.shape[0], -1), axis=-1)
        update = t > 1
        var = jnp.where(update, sigma**2, 1.0)
        log_lik = -0.5 * sq / var
        joint = log_w + log_lik[:K]
        log_w_prev = jax.nn.log_softmax(joint)
        ratio = jax.nn.logsumexp(joint) - log_lik[K] if with_null else jnp.zeros((), log_w.dtype)
        return x_prev, jnp.where(update, log_w_prev, log_w), jnp.where(update, ratio, 0.0)

    def affine_classes(self, params, t):
        """(g (K,), centres (K, *shape)) with eps_k(x_t) = g_k (x_t - centres_k) at step t, when
        the eps function declares that form (`affine_classes`) and the reverse mean is affine in
        eps (no clip_x0); else None, and the step forms every class's eps."""
        affine = getattr(self.eps_fn, "affine_classes", None)
        if affine is None or self.sampler.clip_x0 is not None:
            return None
        return affine(params, self.schedule.timesteps[t - 1])

    def affine_step(self, params, t, x, log_w, c, z, with_null: bool, affine):
        """`step_with_ratio` for class eps eps_k(x) = g_k (x - c_k) (`affine_classes`), in
        matrix form: no (K, *shape) array per trajectory.

        The trajectory moves with its own class's eps (or the null's, c = K), as in the general
        step. The reverse mean is affine in eps, mu(x, e) = A x + B e (A, B: `reverse_mean` at
        (1, 0) and (0, 1)), so with guidance w and n = eps_null every class mean is

            mu_k = u + G_k (x - c_k),   u = A x - B w n,   G_k = (1 + w) B g_k.

        Take G0 = the midrange of G_k (every G_k when the components share their variance),
        r = x_{t-1} - u - G0 x and e_k = (G_k - G0) x - G_k c_k, so x_{t-1} - mu_k = r - e_k and

            ||x_{t-1} - mu_k||^2 - ||r||^2 = -2 r.e_k + ||e_k||^2
                = dG_k (dG_k ||x||^2 - 2 r.x) + 2 G_k (r.c_k - dG_k x.c_k) + G_k^2 ||c_k||^2,

        dG_k = G_k - G0. ||r||^2 is common to all classes and never formed; what is formed is
        small where classes are close (e_k -> 0), so float32 does not cancel (centre a mixture
        first). Over the batch r.c_k and x.c_k are (N, d) x (d, K) matrix products. The null
        kernel's term for the ratio is the same with e_null = (1 + w) B n - G0 x."""
        K = self.num_classes
        s = self.schedule
        timestep = s.timesteps[t - 1]
        gain, centres = affine
        flat = lambda a: a.reshape(*a.shape[: a.ndim - x.ndim], -1)  # noqa: E731  (..., *shape) -> (..., d)
        w = self.guidance if with_null else 0.0
        own = gain[jnp.clip(c, 0, K - 1)] * (x - centres[jnp.clip(c, 0, K - 1)])
        if with_null:
            eps_null = self.eps_fn(params, x, timestep, K)
            own = jnp.where(c < K, guided(own, eps_null, self.guidance), eps_null)
        sigma = reverse_std(s, t, self.sampler)
        x_prev = reverse_mean(s, t, x, own, self.sampler) + sigma * z
        one, zero = jnp.ones((), x.dtype), jnp.zeros((), x.dtype)
        A, B = reverse_mean(s, t, one, zero, self.sampler), reverse_mean(s, t, zero, one, self.sampler)
        G = (1.0 + w) * B * gain  # (K,)
        G0 = 0.5 * (jnp.max(G) + jnp.min(G))
        dG = G - G0
        r = x_prev - (A + G0) * x
        if with_null:
            r = r + B * w * eps_null
        xf, rf, cf = flat(x), flat(r), flat(centres)
        rc = jnp.matmul(cf, rf, precision=HIGHEST)  # (K,)
        xc = jnp.matmul(cf, xf, precision=HIGHEST)
        sq = (dG * (dG * jnp.sum(xf * xf) - 2.0 * jnp.sum(rf * xf)) + 2.0 * G * (rc - dG * xc)
              + G**2 * jnp.sum(cf * cf, axis=-1))
        update = t > 1
        var = jnp.where(update, sigma**2, 1.0)
        joint = log_w - 0.5 * sq / var
        log_w_prev = jax.nn.log_softmax(joint)
        if with_null:
            e_null = flat((1.0 + w) * B * eps_null - G0 * x)
            sq_null = jnp.sum(e_null * e_null) - 2.0 * jnp.sum(rf * e_null)
            ratio = jax.nn.logsumexp(joint) + 0.5 * sq_null / var
        else:
            ratio = jnp.zeros((), log_w.dtype)
        return x_prev, jnp.where(update, log_w_prev, log_w), jnp.where(update, ratio, 0.0)

    # --- the batch, a run of steps -----------------------------------------------------

    def init(self, key: jax.Array, num: int, shape: tuple[int, ...], log_prior: jax.Array) -> TrackState:
        """x_T ~ N(0, I) for `num` trajectories, log P(k | x_T) = log pi_k."""
        key_x, key_run = jax.random.split(key)
        x = jax.random.normal(key_x, (num, *shape))
        log_post = jnp.broadcast_to(jax.nn.log_softmax(log_prior), (num, log_prior.shape[0]))
        return TrackState(x, log_post, key_run, jnp.zeros((num,), x.dtype))

    def run(self, params, state: TrackState, classes: jax.Array, ts: jax.Array, observe: Observe | None = None,
            with_null: bool = False):
        """Steps t in `ts` (decreasing; t = 0 entries are no-ops used for padding).

        classes: (N,) generating class of every trajectory (K = unconditional).
        Returns the new state and observe(t, x_t, log P(k | x_t), log_ratio) stacked over ts
        (taken at x_t, before the step from t).

        The noise of the step from t is normal(fold_in(state.key, t), x.shape), drawn with the
        key's own implementation: a key from jax.random.key(seed, impl="threefry4x32") draws
        it faster on CPUs than the default threefry2x32 (other numbers, the same law;
        benchmarks/README.md).
        """
        if state.log_ratio is None:
            state = dataclasses.replace(state, log_ratio=jnp.zeros(state.x.shape[:1], state.x.dtype))

        def step(t, x, log_w, z):
            one = lambda a: self.step_with_ratio(params, t, a[0], a[1], a[2], a[3], with_null)  # noqa: E731
            return jax.lax.map(one, (x, log_w, classes, z), batch_size=self.batch_size or x.shape[0])

        def advance(t, state: TrackState) -> TrackState:
            z = jax.random.normal(jax.random.fold_in(state.key, t), state.x.shape)
            x, log_w, ratio = step(t, state.x, state.log_posterior, z)
            return TrackState(x, log_w, state.key, state.log_ratio + ratio)

        def body(state: TrackState, t):
            out = None
            if observe is not None:
                out = observe(t, state.x, state.log_posterior, state.log_ratio)
            # a padding step (t = 0) draws nothing and leaves the state as it is; as a branch of
            # its own the step also has XLA draw the noise once rather than re-hash it in each
            # of its consumers (benchmarks/README.md)
            return jax.lax.cond(t > 0, lambda s: advance(jnp.maximum(t, 1), s), lambda s: s, state), out

        return jax.lax.scan(body, state, ts)


def guided(eps_class: jax.Array, eps_null: jax.Array, guidance: float) -> jax.Array:
    """Classifier-free guidance: eps_k + w (eps_k - eps_null)."""
    return eps_class + guidance * (eps_class - eps_null)


def step_chunks(num_steps: int, chunk: int | None) -> Iterator[np.ndarray]:
    """The steps T..1 in chunks of `chunk` (the last padded with no-op zeros, so every chunk
    has the same length and compiles once)."""
    ts = np.arange(num_steps, 0, -1, dtype=np.int32)
    chunk = num_steps if chunk is None else max(1, min(chunk, num_steps))
    for start in range(0, num_steps, chunk):
        part = ts[start : start + chunk]
        yield np.pad(part, (0, chunk - part.shape[0]))


def generate(
    eps_fn: EpsFn, params, schedule: Schedule, sampler: Sampler, key: jax.Array, x_T: jax.Array, classes: jax.Array
) -> jax.Array:
    """The reverse chain x_T -> x_0 of a batch, each trajectory generated with its class.

    eps_fn:  per-example eps(params, x_t, t, k), vmapped over the batch; t is the model's
             timestep of the step (schedule.timesteps), k = K is the null class
    sampler: the reverse step (`schedule.reverse_step`); its clip_x0 clips the prediction of x_0
    key:     the noise: the step from t (t = S..1) uses key number S - t of
             jax.random.split(key, S), one (N, *shape) draw for the whole batch
    x_T:     (N, *shape); classes: (N,) int, the class of every trajectory
    Returns x_0: (N, *shape). One `lax.scan` over the steps S..1, no classifier.
    """
    eps_batch = jax.vmap(eps_fn, (None, 0, None, 0))

    def step(x, inputs):
        t, k = inputs
        eps = eps_batch(params, x, schedule.timesteps[t - 1], classes)
        # reverse_step is elementwise given t: one call steps the whole batch
        return reverse_step(schedule, k, t, x, eps, sampler), None

    S = schedule.num_steps
    x_0, _ = jax.lax.scan(step, x_T, (jnp.arange(S, 0, -1), jax.random.split(key, S)))
    return x_0
