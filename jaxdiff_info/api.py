"""The research API: one call per estimator of H(Z | X_t), each returning a `Curves`.

    exact = jdi.exact_curves(mixture, problems, schedule)                    # 1-D mixtures
    fmc = jdi.forward_mc_curves(mixture, problems, schedule, samples_per_class=1000, key=k1)
    online = jdi.online_curves(mixture, problems, schedule, samples_per_class=1000, key=k2)
    online = jdi.online_curves(jdi.Network(eps, params, shape, num_classes), problems, schedule, ...)
    immse = jdi.immse_curves(mixture, problems, schedule, samples_per_class=1000, key=k3)  # I-MMSE

`problems` is a plain list of `DecisionProblem`s (None: the class label). The membership,
class weights and prior entropies are derived here, once (`decisions.problem_arrays`).
docs/method.md defines every quantity and says which function computes it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info import estimators, immse
from jaxdiff_info import mixture as gmm
from jaxdiff_info.curves import Curves, bootstrap_class_entropy, curves_from_blocks, curves_from_profiles
from jaxdiff_info.decisions import DecisionProblem, ProblemArrays, problem_arrays
from jaxdiff_info.schedule import Sampler, Schedule, reverse_std
from jaxdiff_info.static import StaticArray
from jaxdiff_info.tracking import EpsFn, Tracker

DEFAULT_SAMPLER = Sampler("ddpm", "small")
GENERATIONS = ("conditional", "unconditional")

# What an estimator's posterior is (docs/method.md, "path posterior and state posterior")
STATE_EXACT_POSTERIOR = "state (exact posterior)"
STATE_EXACT_DENOISERS = "state (exact denoisers)"  # I-MMSE: the state quantity, from E[x_0 | x_t, c]
STATE_NETWORK_DENOISERS = "state (network denoisers)"  # I-MMSE of a network: the state quantity of its denoisers
STATE_EXACT_KERNEL = "state (exact kernel)"
STATE_DDPM = "state (DDPM approximation)"
PATH = "path"
# float32 rounding of x_t must stay below this fraction of the smallest reverse-step std
FLOAT32_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    """A class-conditional eps-predictor as the library sees it.

    eps:         per-example eps(params, x_t, t, k): x_t of shape `shape`, t the step of the
                 model's training schedule (`Schedule.timesteps`), k in 0..K-1 a class and
                 k = K the null (unconditional) class
    params:      its parameters (any pytree)
    shape:       the shape of one example x_t
    num_classes: K
    weights:     (K,) prior class weights pi_k, any positive scale; None: equal
    has_null:    whether k = K was trained (label dropout); without it nothing that needs the
                 unconditional eps (guidance, unconditional generation, I-MMSE) runs
    """

    eps: EpsFn
    params: Any
    shape: tuple[int, ...]
    num_classes: int
    weights: Sequence[float] | None = None
    has_null: bool = True

    def require_null(self, what: str) -> None:
        """ValueError, one line, when the network has no null class and `what` needs one."""
        if not self.has_null:
            raise ValueError(f"{what} needs the unconditional prediction eps(x_t, t, null), and this network has no "
                             f"null class (it was trained without label dropout)")

    def log_prior(self) -> jax.Array:
        w = np.full(self.num_classes, 1.0 / self.num_classes) if self.weights is None else np.asarray(self.weights)
        if w.shape != (self.num_classes,) or not np.all(w > 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"network weights must be {self.num_classes} finite numbers > 0, got {self.weights}")
        return jnp.log(jnp.asarray(w / w.sum(), jnp.float32))


Model = gmm.GaussianMixture | Network


def _time(schedule: Schedule) -> np.ndarray:
    return np.asarray(schedule.time)


def _mixture_problems(mixture: gmm.GaussianMixture, problems) -> ProblemArrays:
    if not isinstance(mixture, gmm.GaussianMixture):
        raise ValueError(f"this estimator needs a GaussianMixture (the exact posterior), got {type(mixture).__name__}")
    gmm.check_class_weights(mixture)
    return problem_arrays(problems, np.asarray(mixture.class_weights, np.float64))


def _check_resampling(samples_per_class, num_resamples, what: str = "this estimator") -> None:
    """ValueError, one line, when the bootstrap intervals would be empty: fewer than two
    samples per class (one block) or fewer than two resamples."""
    if isinstance(samples_per_class, bool) or int(samples_per_class) != samples_per_class or samples_per_class < 2:
        raise ValueError(f"{what} needs an integer >= 2 samples per class (its bootstrap intervals need two), "
                         f"got {samples_per_class}")
    if isinstance(num_resamples, bool) or int(num_resamples) != num_resamples or num_resamples < 2:
        raise ValueError(f"num_resamples must be an integer >= 2 (200 by default), got {num_resamples}")


# --- 1. exact ----------------------------------------------------------------------------------

def exact_curves(mixture: gmm.GaussianMixture, problems: Sequence[DecisionProblem] | None,
                 schedule: Schedule) -> Curves:
    """H(Z | X_t) of a 1-D mixture by quadrature at every step of `schedule`, with its exact
    (unsmoothed) rate. No intervals: the error is that of the quadrature (< 1e-4 bits)."""
    arrays = _mixture_problems(mixture, problems)
    profiles = estimators.quadrature_class_entropy(gmm.centred(mixture)[0], schedule, arrays.membership)
    curves = curves_from_profiles(_time(schedule), profiles, arrays, estimator="exact",
                                  method="exact: quadrature of E[h(P(z | x_t))] over p(x_t), state posterior")
    return dataclasses.replace(curves, posterior=STATE_EXACT_POSTERIOR)


# --- 2. forward Monte Carlo ---------------------------------------------------------------------

def forward_mc_curves(mixture: gmm.GaussianMixture, problems: Sequence[DecisionProblem] | None,
                      schedule: Schedule, *, samples_per_class: int, key: jax.Array, bandwidth: float = 0.01,
                      num_resamples: int = 200, num_blocks: int = 32, bootstrap_key: jax.Array | None = None,
                      sharding: Any = None) -> Curves:
    """H(Z | X_t) of a mixture (any d) by forward Monte Carlo: at every step, samples_per_class
    draws x_t ~ q(x_t | k) of every class, averaged with the exact posterior P(z | x_t), with
    95% bootstrap intervals over blocks of draws. bandwidth: smoothing of the rate in t/T.
    bootstrap_key: the intervals' key (default: derived from `key`); sharding: of the sample
    axis (`analysis.trajectory_sharding`: over devices and processes, the same numbers)."""
    arrays = _mixture_problems(mixture, problems)
    _check_bandwidth(bandwidth)
    _check_resampling(samples_per_class, num_resamples, "forward Monte Carlo")
    blocks = estimators.make_blocks(mixture.num_classes, samples_per_class, num_blocks)
    sums = estimators.forward_mc_block_sums(gmm.centred(mixture)[0], schedule, arrays.membership, blocks, key,
                                            sharding=sharding)
    curves = curves_from_blocks(
        jax.random.fold_in(key, 7) if bootstrap_key is None else bootstrap_key, _time(schedule), sums, blocks.counts,
        arrays, bandwidth=bandwidth, num_resamples=num_resamples, estimator="forward_mc",
        method="forward Monte Carlo: x_t ~ q(x_t | k) at each t independently, exact state posterior")
    return dataclasses.replace(curves, posterior=STATE_EXACT_POSTERIOR)


# --- 3. online ---------------------------------------------------------------------------------

def online_curves(
    model: Model,
    problems: Sequence[DecisionProblem] | None,
    schedule: Schedule,
    *,
    samples_per_class: int,
    key: jax.Array,
    sampler: Sampler = DEFAULT_SAMPLER,
    generation: str = "conditional",
    guidance: float = 0.0,
    bandwidth: float = 0.01,
    num_resamples: int = 200,
    num_blocks: int = 32,
    paths_per_class: int = 4,
    record_x: bool = False,
    state_readout: bool = True,
    batch_size: int | None = None,
    path_posterior: bool = False,
    bootstrap_key: jax.Array | None = None,
    chunk: int | None = None,
    progress: Callable[[int], None] | None = None,
    after_chunk: Callable[[int, Any], None] | None = None,
    sharding: Any = None,
) -> Curves:
    """H(Z | X_t) along generated trajectories, with P(k | x_t) tracked online (`Tracker`).

    model: a GaussianMixture (its analytic eps) or a `Network`. Trajectories are generated
    with `sampler` on `schedule` (respaced or not): samples_per_class from each class
    (generation "conditional", per-class profiles), or samples_per_class * K from the null
    class ("unconditional", importance-weighted per problem); classifier-free `guidance` w
    uses eps_k + w (eps_k - eps_null) for every class kernel. 95% bootstrap intervals over
    blocks of trajectories; bandwidth smooths the rate in t/T.

    The result's `trajectories` (`estimators.OnlineRun`) holds the generated x_0 (N, *shape)
    with their classes, the final log P(k | x_1), and, per step (T, ...):
    path_log_posterior (T, M, K) of the first paths_per_class trajectories of each generating
    class (path_index), their x_t (T, M, *shape) with record_x, and mean_posterior (T, C, K),
    P(k | x_t) averaged over the trajectories of each generating class.

    The result's `posterior` says which posterior was tracked (`posterior_kind`): the state
    posterior P(k | x_t) when the kernels are exact reverses of the forward chain (or
    approximately so), else a path posterior; DDIM with eta < 1 is refused unless
    path_posterior=True. Unconditional generation with guidance is refused: its kernels mix.
    For a mixture, `exact_state` holds the curves of the exact P(k | x_t) at the same
    trajectories (conditional generation, unless state_readout=False), so the size of the
    path effect shows. Conditional generation also gives the information per class,
    class_information_bits (K, T): D_k(t) = E_k[log2 P(k | x_t) - log2 pi_k] along the
    trajectories of class k, with its band (class_information_bits_ci95). A mixture is
    tracked in coordinates centred on its mean (the same process, x_T ~ N(0, I) included;
    results are moved back), and refused where float32 cannot resolve the reverse steps.

    The noise of every step is drawn with the implementation of `key` (`Tracker.run`): on
    CPUs, key=jax.random.key(seed, impl="threefry4x32") draws it about twice as fast as the
    default threefry2x32 (1.6x on the whole N = 1e5, d = 64 loop; benchmarks/README.md), with
    other numbers from the same law.

    Advanced: batch_size (trajectories per network call: bounds memory, same numbers);
    chunk (steps per compiled call), progress(steps_done), after_chunk(t, TrackState) (at
    x_T first, then after every chunk; t = 0 is the generated sample); sharding of the
    trajectory axis.

    The compiled loop is kept for the next call with an equal tracker and recording (the same
    eps function, equal schedule and settings): a study over seeds compiles it once.
    """
    if generation not in GENERATIONS:
        raise ValueError(f"unknown generation {generation!r}; choose conditional or unconditional")
    _check_bandwidth(bandwidth)
    _check_resampling(samples_per_class, num_resamples, "the online estimator")
    unconditional = generation == "unconditional"
    with_null = unconditional or guidance != 0.0
    shift = None
    state_log_posterior = None
    if isinstance(model, gmm.GaussianMixture):
        gmm.check_class_weights(model)
        mix, shift = gmm.centred(model)  # H is unchanged by the move; float32 is not
        _check_float32_range(mix, schedule, sampler)
        eps, params, shape = gmm.eps_fn(schedule, with_null=with_null), mix, (model.dim,)
        num_classes, log_prior = model.num_classes, model.class_log_weights
        if not unconditional:
            state_log_posterior = _StatePosterior(StaticArray(np.asarray(schedule.alpha_bar)))
    elif isinstance(model, Network):
        if with_null:
            model.require_null("unconditional generation" if unconditional else "classifier-free guidance")
        eps, params, shape = model.eps, model.params, tuple(model.shape)
        num_classes, log_prior = model.num_classes, model.log_prior()
    else:
        raise ValueError(f"model must be a GaussianMixture or a Network, got {type(model).__name__}")
    K = num_classes
    arrays = problem_arrays(problems, np.exp(np.asarray(log_prior, np.float64)))
    tracker = Tracker(eps, schedule, sampler, K, guidance=guidance, batch_size=batch_size,
                      path_posterior=path_posterior)
    if unconditional:
        blocks = estimators.make_blocks(1, samples_per_class * K, num_blocks)
        # the trajectories are one population; block_entropy_sums weights each problem's share
        block_arrays = dataclasses.replace(arrays, class_weights=np.ones((len(arrays.problems), 1)))
    else:
        blocks = estimators.make_blocks(K, samples_per_class, num_blocks)
        block_arrays = arrays
    generating = generating_classes(K, samples_per_class, generation)
    path_index = recorded_paths(generating, paths_per_class)
    alpha_bar = np.asarray(schedule.alpha_bar, np.float64)

    def moved_back(x, t):
        """x_t of the centred mixture in the given mixture's coordinates (t = 0: x_0)."""
        if shift is None:
            return x
        return x + jnp.asarray((np.sqrt(alpha_bar[t - 1]) if t > 0 else 1.0) * shift, jnp.float32)

    record = _Record(blocks, StaticArray(path_index), None if unconditional else StaticArray(generating),
                     bool(record_x))

    def chunk_done(t, state):
        after_chunk(t, dataclasses.replace(state, x=moved_back(state.x, t)))

    run = estimators.online_block_sums(
        tracker, params, log_prior, shape, arrays.membership, blocks, key, record=record, chunk=chunk,
        progress=progress, unconditional=unconditional, after_chunk=chunk_done if after_chunk else None,
        sharding=sharding, state_log_posterior=state_log_posterior if state_readout else None,
        x_T_offset=None if shift is None else -np.sqrt(alpha_bar[-1]) * shift)
    if not np.all(np.isfinite(np.asarray(run.block_sums))):
        raise FloatingPointError("the online classifier's entropies are not finite: " + (
            f"the guided eps overflowed float32 at guidance w = {guidance:g}; use a smaller weight" if guidance
            else "the model's eps gave NaN or inf"))
    path_log_post, mean_post, path_x, own_sums = run.paths
    if path_x is not None and shift is not None:
        path_x = path_x + (np.sqrt(alpha_bar)[:, None, None] * shift).astype(np.float32)
    trajectories = estimators.OnlineRun(
        run.block_sums, np.asarray(moved_back(run.x_0, 0)), run.log_posterior, None, classes=generating,
        path_index=path_index, path_log_posterior=path_log_post, path_x=path_x, mean_posterior=mean_post,
        state_block_sums=run.state_block_sums)
    posterior = posterior_kind(model, sampler, guidance)
    kernel = sampler.describe() + (f", classifier-free guidance w = {guidance:g}" if guidance else "")
    weighting = ", importance-weighted by path likelihood ratios" if unconditional else ""
    boot_key = jax.random.fold_in(key, 7) if bootstrap_key is None else bootstrap_key
    curves = curves_from_blocks(
        boot_key, _time(schedule), run.block_sums, blocks.counts, block_arrays, bandwidth=bandwidth,
        num_resamples=num_resamples, estimator="online",
        method=f"online classifier: P(k | x_t, ..., x_T) tracked along {generation} trajectories of {kernel}"
               f"{weighting}; {posterior} posterior")
    exact_state = None
    if run.state_block_sums is not None:
        exact_state = curves_from_blocks(
            boot_key, _time(schedule), run.state_block_sums, blocks.counts, block_arrays, bandwidth=bandwidth,
            num_resamples=num_resamples, estimator="online_state",
            method=f"exact state posterior P(k | x_t) of the mixture at the x_t of the online trajectories "
                   f"({kernel})")
        exact_state = dataclasses.replace(exact_state, posterior=STATE_EXACT_POSTERIOR)
    curves = dataclasses.replace(curves, trajectories=trajectories, posterior=posterior, exact_state=exact_state)
    if own_sums is None:
        return curves
    # D_k(t) = E_k[log P(k | x_t)] - log pi_k, in bits
    log_pi = np.asarray(log_prior, np.float64)
    gain = (np.asarray(own_sums, np.float64) - log_pi[None, :, None] * blocks.counts[None]) / math.log(2.0)
    return _with_class_information(curves, gain)


@dataclasses.dataclass(frozen=True)
class _Record:
    """What `online_curves` keeps of each step besides the entropies (`OnlineRun`), compared by
    value so that the compiled loop is reused: log P(k | x_t) of the recorded paths, the mean
    posterior per generating class, the recorded x_t (record_x), and (conditional generation)
    the (K, B) block sums of log P(k | x_t) at the generating class (D_k = E_k[...] - log pi_k)."""

    blocks: estimators.Blocks
    path_index: StaticArray
    own: StaticArray | None
    record_x: bool

    def __call__(self, x, log_post):
        blocks, path_index = self.blocks, self.path_index.array
        mean_post = blocks.sums(jnp.exp(log_post)).sum(axis=1) / blocks.per_class  # (C, K)
        own_sums = None
        if self.own is not None:
            own = jnp.asarray(self.own.array)
            own_sums = blocks.sums(jnp.take_along_axis(log_post, own[:, None], axis=1)[:, 0])
        return log_post[path_index], mean_post, (x[path_index] if self.record_x else None), own_sums


@dataclasses.dataclass(frozen=True)
class _StatePosterior:
    """The exact log P(k | x_t) of a mixture (the compiled loop's params) at step t of a schedule
    with these (T,) alpha_bar, for the readout of the online trajectories; compared by value."""

    alpha_bar: StaticArray

    def __call__(self, mixture, t, x):
        alpha_bar = jnp.asarray(self.alpha_bar.array)[t - 1]
        return jax.vmap(gmm.log_posterior, (None, 0, None))(mixture, x, alpha_bar)


def _with_class_information(curves: Curves, block_sums: np.ndarray) -> Curves:
    """`curves` with D_k(t) and its band (`class_information`, key `Resampling.information_key`)
    from (T, K, B) block sums in bits over the blocks of `curves.resampling`, where the sums are
    kept so that the band's resamples can be drawn again (`curves.bootstrap_replicates`)."""
    rs = curves.resampling
    block_sums = np.asarray(block_sums, np.float32)
    mean, band = class_information(rs.information_key, block_sums, rs.block_counts, rs.num_resamples)
    return dataclasses.replace(curves, class_information_bits=mean, class_information_bits_ci95=band,
                               resampling=dataclasses.replace(rs, information_block_sums=block_sums))


def class_information(key: jax.Array, block_sums: np.ndarray, block_counts: np.ndarray,
                      num_resamples: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, T) the per-class means of per-sample values (D_k(t) in bits) from (T, K, B) block sums
    and (K, B) counts, and (K, T, 2) their 95% bootstrap band (blocks resampled per class, as
    for the curves: `curves.bootstrap_class_entropy`)."""
    sums = jnp.asarray(block_sums, jnp.float32)[..., None]
    counts = jnp.asarray(block_counts)
    mean = np.asarray(sums.sum(axis=2)[..., 0] / jnp.maximum(counts.sum(axis=1), 1)).T
    boot = bootstrap_class_entropy(key, sums, counts, num_resamples)[..., 0]  # (R, T, K)
    band = np.asarray(jnp.percentile(boot, jnp.array([2.5, 97.5]), axis=0))  # (2, T, K)
    return mean, np.transpose(band, (2, 1, 0))


# --- 4. I-MMSE -----------------------------------------------------------------------------------

def immse_curves(model: Model, problems: Sequence[DecisionProblem] | None, schedule: Schedule, *,
                 samples_per_class: int, key: jax.Array, x_0: np.ndarray | None = None,
                 labels: np.ndarray | None = None, source: str | None = None, estimator: str = "immse",
                 bandwidth: float = 0.01, num_resamples: int = 200, num_blocks: int = 32,
                 bootstrap_key: jax.Array | None = None, common_noise: bool = False, batch_size: int | None = None,
                 chunk: int | None = None, progress: Callable[[int], None] | None = None,
                 sharding: Any = None) -> Curves:
    """H(Z | X_t) from denoising errors (I-MMSE): H(Z) minus the integral over
    gamma = abar / (1 - abar) of 1/2 E||E[x_0 | x_t, z] - E[x_0 | x_t]||^2 (nats), on the
    steps of `schedule` (trapezoid rule in log-SNR, from gamma = 0). 95% bootstrap intervals
    over blocks of samples; bandwidth smooths the rate in t/T. bootstrap_key: the intervals'
    key (default: derived from `key`).

    model: a GaussianMixture (its exact class denoisers, every decision problem) or a
    `Network` (the class label only, from eps(x_t, t, k) and eps(x_t, t, null): two calls per
    sample and step; it needs a null class).
    Where x_t comes from: samples_per_class per class, each
      - for a mixture without x_0: a draw x_t ~ q(x_t | k) at each t independently
        (common_noise: one x_0 and one noise per sample at every t, smoother but far noisier);
      - with x_0 (N, *shape) and labels (N,) (data, or a model's samples; needed for a
        network): the first samples_per_class examples of each class, each the same at every
        t, noised afresh at every step. source: what they are, in words, for the method line;
        estimator: the key the curves are filed under ("immse"; "immse_model" for a model's
        own samples).

    Per-class profiles (class_entropy_bits): H(Z) minus class k's share E_k[J] of its group's
    KL, whose weighted sum is H(Z | X_t) (docs/method.md). class_information_bits (K, T):
    D_k(t) = KL(p(x_t | k) || p(x_t)) in bits, with its band class_information_bits_ci95.
    Advanced: sharding of the sample axis (over devices and processes, the same numbers);
    for networks batch_size (samples per network call), chunk (steps per compiled call) and
    progress(steps_done)."""
    _check_resampling(samples_per_class, num_resamples, "the I-MMSE estimator")
    _check_bandwidth(bandwidth)
    network = isinstance(model, Network)
    if not (network or isinstance(model, gmm.GaussianMixture)):
        raise ValueError(f"the I-MMSE estimator needs a GaussianMixture (its exact denoisers) or a Network, "
                         f"got {type(model).__name__}")
    if (x_0 is None) != (labels is None):
        raise ValueError("give x_0 and labels together (one label per example)")
    K = model.num_classes
    given = None
    if x_0 is not None:
        given = immse.examples_per_class(x_0, labels, K, samples_per_class, what=source or "examples")
    blocks = estimators.make_blocks(K, samples_per_class, num_blocks)
    if network:
        model.require_null("the I-MMSE estimator")
        if given is None:
            raise ValueError("the I-MMSE estimator of a network needs examples: give x_0 and labels (data, or the "
                             "network's own samples)")
        if given.shape[1:] != tuple(model.shape):
            raise ValueError(f"examples of shape {given.shape[1:]} for a network of shape {tuple(model.shape)}")
        arrays = problem_arrays(problems, np.exp(np.asarray(model.log_prior(), np.float64)))
        if any(sorted(map(len, p.groups)) != [1] * K for p in arrays.problems):
            raise ValueError("the I-MMSE estimator of a network gives the class label only (a group's denoiser "
                             "needs P(c | x_t), which a network does not give); pass problems=None or the class label")
        label_sums = immse.network_information_block_sums(model.eps, model.params, schedule, given, blocks, key,
                                                          batch_size=batch_size, chunk=chunk, progress=progress,
                                                          sharding=sharding)
        problem_sums = np.repeat(label_sums[..., None], len(arrays.problems), axis=-1)
        denoisers = "the network's eps(x_t, t, k) and eps(x_t, t, null) (two calls per sample and step)"
    else:
        arrays = _mixture_problems(model, problems)
        mixture, shift = gmm.centred(model)
        if given is not None:
            given = given.reshape(given.shape[0], -1) - shift
        run = immse.information_block_sums(mixture, schedule, arrays.membership, blocks, key,
                                           common_noise=common_noise, x_0=given, sharding=sharding)
        problem_sums, label_sums = run.problem_sums, run.label_sums
        denoisers = "the mixture's exact denoisers"
    counts = blocks.counts.astype(np.float64)
    profile_sums = (arrays.prior_entropy_bits[None, None, None, :] * counts[None, :, :, None]
                    - np.asarray(problem_sums, np.float64) / math.log(2.0))
    boot_key = jax.random.fold_in(key, 7) if bootstrap_key is None else bootstrap_key
    if given is not None:
        draws = (f"x_0: {source or 'the given examples'}, {samples_per_class} per class, each the same at every t, "
                 f"noised afresh at each t")
    elif common_noise:
        draws = "x_0 ~ p(x_0 | k) and one noise per sample, the same at every t (common random numbers)"
    else:
        draws = "x_t ~ q(x_t | k) at each t independently"
    curves = curves_from_blocks(
        boot_key, _time(schedule), profile_sums.astype(np.float32), blocks.counts, arrays, bandwidth=bandwidth,
        num_resamples=num_resamples, estimator=estimator,
        method=f"I-MMSE: H(Z) - int_0^gamma_t 1/2 E||E[x_0 | x_t, z] - E[x_0 | x_t]||^2 d gamma with {denoisers}; "
               f"{draws}; trapezoid rule in log-SNR over the steps, from gamma = 0")
    posterior = STATE_NETWORK_DENOISERS if network else STATE_EXACT_DENOISERS
    return _with_class_information(dataclasses.replace(curves, posterior=posterior),
                                  np.asarray(label_sums) / math.log(2.0))


def generating_classes(num_classes: int, samples_per_class: int, generation: str) -> np.ndarray:
    """(N,) the class that generates each trajectory of `online_curves`, class-major
    (K: the null class, for unconditional generation of samples_per_class * K)."""
    if generation == "unconditional":
        return np.full(samples_per_class * num_classes, num_classes, np.int32)
    return np.repeat(np.arange(num_classes, dtype=np.int32), samples_per_class)


def recorded_paths(generating: np.ndarray, paths_per_class: int) -> np.ndarray:
    """(M,) the trajectories whose paths `online_curves` records: the first paths_per_class
    of each generating class."""
    return np.concatenate([np.flatnonzero(generating == c)[:paths_per_class] for c in np.unique(generating)])


def posterior_kind(model: Model, sampler: Sampler, guidance: float = 0.0) -> str:
    """Which posterior the online classifier tracks (docs/method.md): "path" for DDIM with
    eta != 1 or guided kernels; "state (exact kernel)" for DDPM with beta~_t (or DDIM eta = 1)
    on a mixture of points without clipping, each class one point, where each class kernel is
    the exact reverse of its forward chain (exact up to the start, x_T ~ N(0, I) rather than q(x_T | k), which
    alpha_bar_T ~ 0 makes negligible); "state (DDPM approximation)" otherwise."""
    if guidance != 0.0 or (sampler.kind == "ddim" and sampler.eta != 1):
        return PATH
    exact_step = (sampler.kind == "ddpm" and sampler.variance == "small") or (sampler.kind == "ddim" and sampler.eta == 1)
    points = isinstance(model, gmm.GaussianMixture) and model.points and model.singleton_classes
    return STATE_EXACT_KERNEL if points and exact_step and sampler.clip_x0 is None else STATE_DDPM


def float32_range(schedule: Schedule, sampler: Sampler) -> float:
    """The largest |x| at which float32 resolves the online classifier's steps: its rounding
    (2^-24 |x|) stays below FLOAT32_TOLERANCE of the smallest reverse-step std."""
    sigmas = np.asarray(jax.vmap(lambda t: reverse_std(schedule, t, sampler))(jnp.arange(2, schedule.num_steps + 1)))
    return FLOAT32_TOLERANCE * float(sigmas.min()) * 2.0**24


def _check_float32_range(mixture: gmm.GaussianMixture, schedule: Schedule, sampler: Sampler) -> None:
    spread = float(np.asarray(mixture.stds).max())
    if mixture.spectrum is not None:
        spread = spread + float(np.sqrt(np.asarray(mixture.spectrum).max()))
    span = float(np.abs(np.asarray(mixture.means)).max() + 6.0 * spread + 6.0)
    limit = float32_range(schedule, sampler)
    if span > limit:
        raise ValueError(
            f"the mixture spans +-{span:.3g} about its mean (means, 6 stds and 6 noise stds); float32 tracks the "
            f"posterior on this schedule only within +-{limit:.3g}, where the rounding of x_t stays below "
            f"{FLOAT32_TOLERANCE:.0%} of the smallest reverse-step std; rescale the means and stds")


def _check_bandwidth(bandwidth: float) -> None:
    if not (np.isfinite(bandwidth) and bandwidth >= 0):
        raise ValueError(f"the rate bandwidth must be a finite number >= 0, got {bandwidth}")
