"""The research API: one call per estimator of H(Z | X_t), each returning a `Curves`.

    exact = jdi.exact_curves(mixture, problems, schedule)                    # 1-D mixtures
    fmc = jdi.forward_mc_curves(mixture, problems, schedule, samples_per_class=1000, key=k1)
    online = jdi.online_curves(mixture, problems, schedule, samples_per_class=1000, key=k2)
    online = jdi.online_curves(jdi.Network(eps, params, shape, num_classes), problems, schedule, ...)

`problems` is a plain list of `DecisionProblem`s (None: the class label). The membership,
class weights and prior entropies are derived here, once (`decisions.problem_arrays`).
docs/method.md defines every quantity and says which function computes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info import estimators
from jaxdiff_info import mixture as gmm
from jaxdiff_info.curves import Curves, curves_from_blocks, curves_from_profiles
from jaxdiff_info.decisions import DecisionProblem, ProblemArrays, problem_arrays
from jaxdiff_info.schedule import Sampler, Schedule
from jaxdiff_info.tracking import EpsFn, Tracker

DEFAULT_SAMPLER = Sampler("ddpm", "small")
GENERATIONS = ("conditional", "unconditional")


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
    """

    eps: EpsFn
    params: Any
    shape: tuple[int, ...]
    num_classes: int
    weights: Sequence[float] | None = None

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
    return problem_arrays(problems, np.asarray(mixture.weights, np.float64))


# --- 1. exact ----------------------------------------------------------------------------------

def exact_curves(mixture: gmm.GaussianMixture, problems: Sequence[DecisionProblem] | None,
                 schedule: Schedule) -> Curves:
    """H(Z | X_t) of a 1-D mixture by quadrature at every step of `schedule`, with its exact
    (unsmoothed) rate. No intervals: the error is that of the quadrature (< 1e-4 bits)."""
    arrays = _mixture_problems(mixture, problems)
    profiles = estimators.quadrature_class_entropy(mixture, schedule, arrays.membership)
    return curves_from_profiles(_time(schedule), profiles, arrays, estimator="exact",
                                method="exact: quadrature of E[h(P(z | x_t))] over p(x_t), state posterior")


# --- 2. forward Monte Carlo ---------------------------------------------------------------------

def forward_mc_curves(mixture: gmm.GaussianMixture, problems: Sequence[DecisionProblem] | None,
                      schedule: Schedule, *, samples_per_class: int, key: jax.Array, bandwidth: float = 0.01,
                      num_resamples: int = 200, num_blocks: int = 32, bootstrap_key: jax.Array | None = None) -> Curves:
    """H(Z | X_t) of a mixture (any d) by forward Monte Carlo: at every step, samples_per_class
    draws x_t ~ q(x_t | k) of every class, averaged with the exact posterior P(z | x_t), with
    95% bootstrap intervals over blocks of draws. bandwidth: smoothing of the rate in t/T.
    bootstrap_key: the intervals' key (default: derived from `key`)."""
    arrays = _mixture_problems(mixture, problems)
    _check_bandwidth(bandwidth)
    blocks = estimators.make_blocks(mixture.num_components, samples_per_class, num_blocks)
    sums = estimators.forward_mc_block_sums(mixture, schedule, arrays.membership, blocks, key)
    return curves_from_blocks(
        jax.random.fold_in(key, 7) if bootstrap_key is None else bootstrap_key, _time(schedule), sums, blocks.counts,
        arrays, bandwidth=bandwidth, num_resamples=num_resamples, estimator="forward_mc",
        method="forward Monte Carlo: x_t ~ q(x_t | k) at each t independently, exact state posterior")


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
    batch_size: int | None = None,
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

    Advanced: batch_size (trajectories per network call: bounds memory, same numbers);
    chunk (steps per compiled call), progress(steps_done), after_chunk(t, TrackState) (at
    x_T first, then after every chunk; t = 0 is the generated sample); sharding of the
    trajectory axis.
    """
    if generation not in GENERATIONS:
        raise ValueError(f"unknown generation {generation!r}; choose conditional or unconditional")
    _check_bandwidth(bandwidth)
    unconditional = generation == "unconditional"
    with_null = unconditional or guidance != 0.0
    if isinstance(model, gmm.GaussianMixture):
        eps, params, shape = gmm.eps_fn(schedule, with_null=with_null), model, (model.dim,)
        num_classes, log_prior = model.num_components, model.log_weights
    elif isinstance(model, Network):
        eps, params, shape = model.eps, model.params, tuple(model.shape)
        num_classes, log_prior = model.num_classes, model.log_prior()
    else:
        raise ValueError(f"model must be a GaussianMixture or a Network, got {type(model).__name__}")
    K = num_classes
    arrays = problem_arrays(problems, np.exp(np.asarray(log_prior, np.float64)))
    tracker = Tracker(eps, schedule, sampler, K, guidance=guidance, batch_size=batch_size)
    if unconditional:
        blocks = estimators.make_blocks(1, samples_per_class * K, num_blocks)
        generating = np.full(blocks.per_class, K)
        # the trajectories are one population; block_entropy_sums weights each problem's share
        block_arrays = dataclasses.replace(arrays, class_weights=np.ones((len(arrays.problems), 1)))
    else:
        blocks = estimators.make_blocks(K, samples_per_class, num_blocks)
        generating = blocks.classes
        block_arrays = arrays
    n_paths = min(paths_per_class, blocks.per_class)
    path_index = np.concatenate([np.flatnonzero(generating == c)[:n_paths] for c in np.unique(generating)])

    def record(x, log_post):
        mean_post = blocks.sums(jnp.exp(log_post)).sum(axis=1) / blocks.per_class  # (C, K)
        return log_post[path_index], mean_post, (x[path_index] if record_x else None)

    run = estimators.online_block_sums(
        tracker, params, log_prior, shape, arrays.membership, blocks, key, record=record, chunk=chunk,
        progress=progress, unconditional=unconditional, after_chunk=after_chunk, sharding=sharding)
    path_log_post, mean_post, path_x = run.paths
    trajectories = estimators.OnlineRun(
        run.block_sums, run.x_0, run.log_posterior, run.paths, classes=generating, path_index=path_index,
        path_log_posterior=path_log_post, path_x=path_x, mean_posterior=mean_post)
    kernel = sampler.describe() + (f", classifier-free guidance w = {guidance:g}" if guidance else "")
    curves = curves_from_blocks(
        jax.random.fold_in(key, 7) if bootstrap_key is None else bootstrap_key, _time(schedule), run.block_sums,
        blocks.counts, block_arrays, bandwidth=bandwidth, num_resamples=num_resamples, estimator="online",
        method=f"online classifier: P(k | x_t, ..., x_T) tracked along {generation} trajectories of {kernel}")
    curves = dataclasses.replace(curves, problems=arrays.problems, prior_entropy_bits=arrays.prior_entropy_bits,
                                 trajectories=trajectories)
    return curves


def _check_bandwidth(bandwidth: float) -> None:
    if not (np.isfinite(bandwidth) and bandwidth >= 0):
        raise ValueError(f"the rate bandwidth must be a finite number >= 0, got {bandwidth}")
