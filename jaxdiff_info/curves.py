"""From per-class entropy profiles to the curves a researcher reads: H(Z | X_t) per decision
problem, mutual information, the entropy rate r(t) = dH / d(t/T), its peaks, and bootstrap
confidence intervals.

Per-class profile H_k(t) = E[h(P(z | x_t)) | class k]; for a problem over the classes S,
H(Z | X_t) = sum_{k in S} pi_k / pi_S H_k(t).

The formulas: docs/method.md, "The entropy rate", "Peak time, local peaks and half-entropy
time", "The curves an estimator returns" and "Bootstrap intervals".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info.decisions import DecisionProblem, ProblemArrays


def problem_entropy(class_entropy: jax.Array, class_weights: jax.Array) -> jax.Array:
    """(..., T, P) H(Z | X_t) from (..., T, K, P) per-class profiles and (P, K) class weights."""
    return jnp.einsum("...tkp,pk->...tp", class_entropy, class_weights, precision=jax.lax.Precision.HIGHEST)


def mutual_information_bits(prior_entropy_bits: jax.Array, entropy_bits: jax.Array) -> jax.Array:
    """I(Z; X_t) = H(Z) - H(Z | X_t)."""
    return prior_entropy_bits - entropy_bits


# --- the entropy rate ----------------------------------------------------------------------

def rate_operator(time: np.ndarray, bandwidth: float = 0.0) -> np.ndarray:
    """(T, T) linear map D with r = D @ H the derivative dH/d(time).

    bandwidth = 0: second-order finite differences (central inside, one-sided at the ends).
    bandwidth > 0: slope of a local quadratic fit with Gaussian weights of that width in
    normalised time (a Savitzky-Golay filter that also works at the ends); it leaves
    quadratics exact and smooths Monte Carlo noise. A bandwidth below 1.5 grid spacings
    (a coarse, respaced grid) is raised to that, so every fit sees enough points.
    """
    t = np.asarray(time, np.float64)
    return _rate_operator(t.tobytes(), float(bandwidth)).copy()


def smoothing_operator(time: np.ndarray, bandwidth: float = 0.0) -> np.ndarray:
    """(T, T) linear map S with S @ H the value of the same local quadratic fit whose slope
    `rate_operator` takes (the identity for bandwidth 0). Half-entropy times of Monte Carlo
    curves are read off the smoothed curve, so that independent noise at each t does not
    make a late crossing out of an early one."""
    t = np.asarray(time, np.float64)
    if bandwidth <= 0:
        return np.eye(t.shape[0])
    return _local_quadratic(t.tobytes(), float(bandwidth))[0].copy()


@functools.lru_cache(maxsize=8)
def _rate_operator(time_bytes: bytes, bandwidth: float) -> np.ndarray:
    t = np.frombuffer(time_bytes, np.float64)
    n = t.shape[0]
    if n < 3:
        raise ValueError("the entropy rate needs at least 3 time points")
    if bandwidth <= 0:
        d = np.zeros((n, n))
        for i in range(n):
            j = np.arange(min(max(i - 1, 0), n - 3), min(max(i - 1, 0), n - 3) + 3)
            d[i, j] = _lagrange_slope(t[j], t[i])
        return d
    return _local_quadratic(time_bytes, bandwidth)[1]


@functools.lru_cache(maxsize=8)
def _local_quadratic(time_bytes: bytes, bandwidth: float) -> tuple[np.ndarray, np.ndarray]:
    """(value, slope) operators of the Gaussian-weighted local quadratic fit at every t."""
    t = np.frombuffer(time_bytes, np.float64)
    if t.shape[0] < 3:
        raise ValueError("the entropy rate needs at least 3 time points")
    bandwidth = max(bandwidth, 1.5 * float(np.max(np.diff(t))))
    delta = t[None, :] - t[:, None]  # (target i, source j)
    w = np.exp(-0.5 * (delta / bandwidth) ** 2)
    s0, s1, s2, s3, s4 = (np.sum(w * delta**power, axis=1) for power in range(5))
    gram = np.stack([np.stack([s0, s1, s2], -1), np.stack([s1, s2, s3], -1), np.stack([s2, s3, s4], -1)], -2)
    inv = np.linalg.inv(gram)
    basis = lambda row: w * (row[:, :1] + row[:, 1:2] * delta + row[:, 2:] * delta**2)  # noqa: E731
    return basis(inv[:, 0, :]), basis(inv[:, 1, :])  # the intercept's and the slope's rows


def _lagrange_slope(nodes: np.ndarray, at: float) -> np.ndarray:
    """Weights giving f'(at) from f at three nodes (derivative of the interpolating quadratic)."""
    a, b, c = nodes
    return np.array([
        (2 * at - b - c) / ((a - b) * (a - c)),
        (2 * at - a - c) / ((b - a) * (b - c)),
        (2 * at - a - b) / ((c - a) * (c - b)),
    ])


def entropy_rate(time: np.ndarray, entropy: jax.Array, bandwidth: float = 0.0) -> jax.Array:
    """(..., T, P) r(t) = dH(Z | X_t) / d(t/T) in bits per unit of normalised time, from
    (..., T, P) entropies on the time grid `time`."""
    d = jnp.asarray(rate_operator(time, bandwidth), jnp.float32)
    return jnp.einsum("st,...tp->...sp", d, entropy, precision=jax.lax.Precision.HIGHEST)


# --- peaks ---------------------------------------------------------------------------------

def peak_time(time: np.ndarray, rate: jax.Array) -> jax.Array:
    """(..., P) t/T at which the entropy rate (..., T, P) is largest."""
    return jnp.asarray(time)[jnp.argmax(rate, axis=-2)]


def local_peaks(time: np.ndarray, rate: np.ndarray, min_height: float = 0.2, min_separation: float = 0.05) -> list[float]:
    """Times of the local maxima of one rate curve (T,) that reach min_height of its maximum,
    highest first, at least min_separation apart in normalised time."""
    r = np.asarray(rate, np.float64)
    t = np.asarray(time, np.float64)
    top = r.max()
    if not top > 0:
        return []
    inner = (r[1:-1] >= r[:-2]) & (r[1:-1] > r[2:])
    cand = np.flatnonzero(np.concatenate([[r[0] > r[1]], inner, [r[-1] > r[-2]]]))
    cand = cand[r[cand] >= min_height * top]
    peaks: list[float] = []
    for i in cand[np.argsort(-r[cand])]:
        if all(abs(t[i] - p) >= min_separation for p in peaks):
            peaks.append(float(t[i]))
    return peaks


def half_entropy_time(time: jax.Array, entropy_bits: jax.Array) -> jax.Array:
    """(..., P) the time by which half of the entropy is resolved, from (..., T, P) curves.

    The threshold is half of H at the noisiest time on the grid (``time`` ascending, so the
    last entry, where H is the prior entropy up to the signal left at t = T). The result is
    the largest t at which H(t) <= threshold, refined to the crossing by linear interpolation
    between grid points: the first time, in generation order, that H reaches half. It is 0
    when H stays above half to the end, and the noisiest time when H is already at or below
    half there (a prior entropy of 0). Unlike the rate's argmax it does not land on the end
    of the grid when a decision is spread out or still going at t = 0.
    """
    T = entropy_bits.shape[-2]
    h = jnp.moveaxis(entropy_bits, -2, -1)  # (..., P, T)
    threshold = h[..., -1:] / 2.0
    below = h <= threshold
    i = T - 1 - jnp.argmax(below[..., ::-1], axis=-1)  # last index at or below the threshold
    j = jnp.minimum(i + 1, T - 1)
    h_i = jnp.take_along_axis(h, i[..., None], -1)[..., 0]
    h_j = jnp.take_along_axis(h, j[..., None], -1)[..., 0]
    t_i, t_j = time[i], time[j]
    frac = jnp.where(h_j > h_i, (threshold[..., 0] - h_i) / jnp.where(h_j > h_i, h_j - h_i, 1.0), 0.0)
    crossing = t_i + jnp.clip(frac, 0.0, 1.0) * (t_j - t_i)
    return jnp.where(below.any(axis=-1), crossing, 0.0)


# --- bootstrap over blocks of trajectories --------------------------------------------------

def class_entropy_from_blocks(block_sums: jax.Array, block_counts: jax.Array) -> jax.Array:
    """(T, K, P) per-class profiles from (T, K, B, P) block sums and (K, B) counts."""
    counts = jnp.maximum(block_counts.sum(axis=1), 1)
    return block_sums.sum(axis=2) / counts[None, :, None]


def bootstrap_class_entropy(key: jax.Array, block_sums: jax.Array, block_counts: jax.Array, num_resamples: int) -> jax.Array:
    """(R, T, K, P) per-class profiles of R bootstrap resamples: each resample draws, for every
    class, B of its blocks of trajectories with replacement. Blocks are disjoint sets of
    independent trajectories, so this is the bootstrap of the trajectories, coarsened.
    A resample is a multiplicity m[k, b] for every block; its sums are linear in m."""
    _, num_classes, num_blocks, _ = block_sums.shape
    idx = jax.random.randint(key, (num_resamples, num_classes, num_blocks), 0, num_blocks)
    mult = jax.nn.one_hot(idx, num_blocks, dtype=block_sums.dtype).sum(axis=2)  # (R, K, B)
    sums = jnp.einsum("rkb,tkbp->rtkp", mult, block_sums, precision=jax.lax.Precision.HIGHEST)
    counts = jnp.einsum("rkb,kb->rk", mult, block_counts.astype(block_sums.dtype), precision=jax.lax.Precision.HIGHEST)
    return sums / jnp.maximum(counts, 1)[:, None, :, None]


@dataclasses.dataclass(frozen=True)
class ProblemCurves:
    """The curves of one decision problem from one estimator: time (T,), entropy_bits and
    entropy_rate (T,), peak_time and half_time (floats), and for Monte Carlo estimators
    entropy_bits_ci95 and entropy_rate_ci95 (T, 2) and peak_time_ci95, half_time_ci95
    (lo, hi); None for the exact estimator."""

    name: str
    prior_entropy_bits: float
    time: np.ndarray
    entropy_bits: np.ndarray
    entropy_rate: np.ndarray
    peak_time: float
    half_time: float
    entropy_bits_ci95: np.ndarray | None
    entropy_rate_ci95: np.ndarray | None
    peak_time_ci95: tuple[float, float] | None
    half_time_ci95: tuple[float, float] | None


@dataclasses.dataclass(frozen=True)
class Curves:
    """What one estimator gives for a list of decision problems (host arrays).

    Arrays are indexed by problem first: P problems, T steps (t/T ascending), K classes.

    estimator:          "exact", "forward_mc", "online", "online_state", "immse" or "immse_model"
                        (I-MMSE from a model's own samples)
    method:             one line saying what was estimated and how (which posterior, which kernel)
    problems:           the P DecisionProblems, in order; prior_entropy_bits (P,) H(Z)
    time:               (T,) normalised time t/T of each step
    class_entropy_bits: (P, K, T) per-class profiles H_k(t) = E[h(P(z | x_t)) | class k]
                        ((P, 1, T) for unconditional generation: one population; I-MMSE:
                        H(Z) minus class k's share of its group's information, the same
                        weighted sum H(Z | X_t), docs/method.md)
    entropy_bits:       (P, T) H(Z | X_t) in bits
    entropy_rate:       (P, T) dH/d(t/T) in bits per unit of t/T (smoothed with rate_bandwidth)
    peak_time:          (P,) t/T of the largest rate
    half_time:          (P,) t/T by which half of H(Z) is resolved (`half_entropy_time` of
                        the curve smoothed with rate_bandwidth, `smoothing_operator`);
                        0 where H never halves (`halves` is False there)
    *_ci95:             95% percentile-bootstrap intervals, Monte Carlo estimators only
                        (None for the exact one): entropy_bits_ci95, entropy_rate_ci95 (P, T, 2);
                        peak_time_ci95, half_time_ci95 (P, 2), each row (lo, hi)
    rate_bandwidth:     smoothing of the rate in normalised time (0: finite differences)
    trajectories:       the online estimator's generated trajectories (`estimators.OnlineRun`)
    resampling:         the block sums (T, K, B, P) and block counts (K, B) the intervals were
                        drawn from, and the bootstrap key (Monte Carlo estimators)
    posterior:          which posterior the entropies are of: "state (exact posterior)",
                        "state (exact denoisers)", "state (network denoisers)", "state (exact kernel)",
                        "state (DDPM approximation)" or "path"
                        (docs/method.md, "path posterior and state posterior")
    exact_state:        online estimator on a mixture: the Curves of the exact state posterior
                        P(k | x_t) at the same trajectories (estimator "online_state")
    class_information_bits: (K, T) D_k(t) = KL(p(x_t | k) || p(x_t)) in bits, the information
                        about the class label that x_t of class k holds (sum_k pi_k D_k =
                        I(Y; X_t)); the I-MMSE estimator, and the online one as
                        E_k[log2 P(k | x_t) - log2 pi_k] along trajectories of class k
                        (conditional generation); None otherwise. class_information_bits_ci95
                        (K, T, 2): its 95% bootstrap band

    ``curves["6 vs 8"]`` gives one problem's curves (`ProblemCurves`).
    """

    estimator: str
    method: str
    problems: tuple
    prior_entropy_bits: np.ndarray
    time: np.ndarray
    class_entropy_bits: np.ndarray
    entropy_bits: np.ndarray
    entropy_rate: np.ndarray
    peak_time: np.ndarray
    half_time: np.ndarray
    entropy_bits_ci95: np.ndarray | None = None
    entropy_rate_ci95: np.ndarray | None = None
    peak_time_ci95: np.ndarray | None = None
    half_time_ci95: np.ndarray | None = None
    rate_bandwidth: float = 0.0
    trajectories: Any = None
    resampling: Any = None
    posterior: str = ""
    exact_state: Any = None
    class_information_bits: np.ndarray | None = None
    class_information_bits_ci95: np.ndarray | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.problems)

    @property
    def halves(self) -> np.ndarray:
        """(P,) bool: whether H(Z | X_t) reaches half of its value at the noisiest step."""
        return self.half_time > 0

    def index(self, name: str) -> int:
        """The position of the problem called `name`."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no decision problem {name!r}; these are: {', '.join(self.names)}") from None

    def __getitem__(self, name: str) -> ProblemCurves:
        i = self.index(name)
        pick = lambda a: None if a is None else a[i]  # noqa: E731
        pair = lambda a: None if a is None else (float(a[i, 0]), float(a[i, 1]))  # noqa: E731
        return ProblemCurves(name, float(self.prior_entropy_bits[i]), self.time, self.entropy_bits[i],
                             self.entropy_rate[i], float(self.peak_time[i]), float(self.half_time[i]),
                             pick(self.entropy_bits_ci95), pick(self.entropy_rate_ci95), pair(self.peak_time_ci95),
                             pair(self.half_time_ci95))


def _summarise(time, rate_op, smooth_op, class_weights, class_entropy):
    """Entropy, rate, peak step and half-entropy time (on the smoothed curve) from (..., T, K, P)
    per-class profiles (time-major: (..., T, P))."""
    h = problem_entropy(class_entropy, class_weights)
    r = jnp.einsum("st,...tp->...sp", rate_op, h, precision=jax.lax.Precision.HIGHEST)
    smooth = jnp.einsum("st,...tp->...sp", smooth_op, h, precision=jax.lax.Precision.HIGHEST)
    return h, r, jnp.argmax(r, axis=-2), half_entropy_time(time, smooth)


@functools.partial(jax.jit, static_argnames="num_resamples")
def _curves(time, rate_op, smooth_op, class_entropy, class_weights, key, block_sums, block_counts, num_resamples):
    """The summaries of the point estimate and the 95% percentiles of those of bootstrap
    resamples, in one program."""
    time_index = jnp.arange(rate_op.shape[0])
    summarise = functools.partial(_summarise, time, rate_op, smooth_op, class_weights)
    point = summarise(class_entropy)
    if block_sums is None:
        return point, None
    boot = summarise(bootstrap_class_entropy(key, block_sums, block_counts, num_resamples))
    q = jnp.array([2.5, 97.5])
    return point, tuple(jnp.percentile(a, q, axis=0) for a in boot[:2]) + (
        jnp.percentile(time_index[boot[2]], q, axis=0), jnp.percentile(boot[3], q, axis=0))


def curves_from_profiles(time: np.ndarray, class_entropy: jax.Array, problems: ProblemArrays, *,
                         estimator: str = "exact", method: str = "", bandwidth: float = 0.0) -> Curves:
    """Curves of an estimator without sampling error (e.g. quadrature), from (T, K, P)
    per-class profiles."""
    return _assemble(time, class_entropy, problems, estimator, method, bandwidth)


def curves_from_blocks(
    key: jax.Array,
    time: np.ndarray,
    block_sums: jax.Array,
    block_counts: jax.Array,
    problems: ProblemArrays,
    *,
    bandwidth: float,
    num_resamples: int = 200,
    estimator: str,
    method: str = "",
) -> Curves:
    """Curves of a Monte Carlo estimator with 95% percentile-bootstrap intervals, from
    (T, K, B, P) block sums of h(P(z | x_t)) and (K, B) trajectories per block."""
    class_entropy = class_entropy_from_blocks(jnp.asarray(block_sums), jnp.asarray(block_counts))
    return _assemble(time, class_entropy, problems, estimator, method, bandwidth, key, block_sums, block_counts,
                     num_resamples)


def _assemble(time, class_entropy, problems, estimator, method, bandwidth, key=None, block_sums=None,
              block_counts=None, num_resamples=0) -> Curves:
    time = np.asarray(time)
    rate_op = jnp.asarray(rate_operator(time, bandwidth), jnp.float32)
    smooth_op = jnp.asarray(smoothing_operator(time, bandwidth), jnp.float32)
    args = (jnp.asarray(block_sums), jnp.asarray(block_counts)) if block_sums is not None else (None, None)
    (h, r, peak, half), ci = _curves(jnp.asarray(time, jnp.float32), rate_op, smooth_op, jnp.asarray(class_entropy),
                                     jnp.asarray(problems.class_weights, jnp.float32), key, *args, num_resamples)
    curves = Curves(
        estimator=estimator, method=method, problems=tuple(problems.problems),
        prior_entropy_bits=np.asarray(problems.prior_entropy_bits, np.float64), time=time,
        class_entropy_bits=np.transpose(np.asarray(class_entropy), (2, 1, 0)), entropy_bits=np.asarray(h).T,
        entropy_rate=np.asarray(r).T, peak_time=time[np.asarray(peak)], half_time=np.asarray(half, np.float64),
        rate_bandwidth=float(bandwidth))
    if ci is None:
        return curves
    h_ci, r_ci, peak_ci, half_ci = (np.asarray(a) for a in ci)
    # percentiles of step indices, read off on the time grid
    peak_ci = np.interp(peak_ci, np.arange(time.shape[0]), time)
    return dataclasses.replace(
        curves, entropy_bits_ci95=np.transpose(h_ci, (2, 1, 0)), entropy_rate_ci95=np.transpose(r_ci, (2, 1, 0)),
        peak_time_ci95=peak_ci.T, half_time_ci95=half_ci.T,
        resampling=Resampling(np.asarray(block_sums), np.asarray(block_counts), key, num_resamples,
                              np.asarray(problems.class_weights, np.float32)))


@dataclasses.dataclass(frozen=True)
class Resampling:
    """What a Monte Carlo estimator's intervals were drawn from: block_sums (T, K, B, P) of
    h(P(z | x_t)), block_counts (K, B), the bootstrap key, the number of resamples and the
    problems' (P, K) class weights; for the per-class information D_k (class_information_bits),
    its (T, K, B) block sums in bits (None without it)."""

    block_sums: np.ndarray
    block_counts: np.ndarray
    key: Any
    num_resamples: int
    class_weights: np.ndarray
    information_block_sums: np.ndarray | None = None

    @property
    def information_key(self) -> jax.Array:
        """The key of D_k's band, derived from the curves' bootstrap key."""
        return jax.random.fold_in(self.key, 1)


@dataclasses.dataclass(frozen=True)
class Replicates:
    """The bootstrap resamples behind a Monte Carlo estimator's intervals (`bootstrap_replicates`):
    entropy_bits (R, P, T), peak_time and half_time (R, P), and class_information_bits (R, K, T)
    where the curves have D_k (else None)."""

    entropy_bits: np.ndarray
    peak_time: np.ndarray
    half_time: np.ndarray
    class_information_bits: np.ndarray | None = None


@functools.partial(jax.jit, static_argnames="num_resamples")
def _replicates(time, rate_op, smooth_op, class_weights, key, block_sums, block_counts, num_resamples):
    return _summarise(time, rate_op, smooth_op, class_weights,
                      bootstrap_class_entropy(key, block_sums, block_counts, num_resamples))


def bootstrap_replicates(curves: Curves) -> Replicates | None:
    """The R bootstrap resamples whose percentiles are the curves' 95% intervals, drawn again
    from `curves.resampling` with its key (the same resamples, to float32 rounding). For
    intervals of anything computed from two independent estimates, e.g. the difference of
    two models' half-entropy times (`results.curve_differences`). None without sampling error
    (the exact estimator)."""
    rs = curves.resampling
    if rs is None:
        return None
    time = np.asarray(curves.time)
    h, _, peak, half = _replicates(
        jnp.asarray(time, jnp.float32), jnp.asarray(rate_operator(time, curves.rate_bandwidth), jnp.float32),
        jnp.asarray(smoothing_operator(time, curves.rate_bandwidth), jnp.float32), jnp.asarray(rs.class_weights),
        rs.key, jnp.asarray(rs.block_sums), jnp.asarray(rs.block_counts), rs.num_resamples)
    information = None
    if rs.information_block_sums is not None:
        information = np.transpose(np.asarray(bootstrap_class_entropy(
            rs.information_key, jnp.asarray(rs.information_block_sums, jnp.float32)[..., None],
            jnp.asarray(rs.block_counts), rs.num_resamples)[..., 0]), (0, 2, 1))
    return Replicates(np.transpose(np.asarray(h), (0, 2, 1)), time[np.asarray(peak)], np.asarray(half, np.float64),
                      information)


def class_curves(curves: Curves, problem: str, class_names: Sequence[str], key: jax.Array) -> Curves:
    """One problem's curves for the trajectories of each class separately, from a Monte Carlo
    estimator's curves: "problem" k of the result is H(Z | X_t) over trajectories of class k
    (its per-class profile H_k), with its own bootstrap intervals. The result's problems are
    named by `class_names`."""
    if curves.resampling is None:
        raise ValueError("per-class curves need a Monte Carlo estimator's curves (with block sums)")
    p = curves.index(problem)
    sums = curves.resampling.block_sums[..., p:p + 1]
    K = sums.shape[1]
    if len(class_names) != K:
        raise ValueError(f"{len(class_names)} class names for {K} classes")
    groups = curves.problems[p].groups
    arrays = ProblemArrays(tuple(DecisionProblem(str(n), groups) for n in class_names), np.zeros((K, 1, K), bool),
                           np.eye(K), np.full(K, float(curves.prior_entropy_bits[p])))
    per_class = curves_from_blocks(
        key, curves.time, np.repeat(sums, K, axis=-1), curves.resampling.block_counts, arrays,
        bandwidth=curves.rate_bandwidth, num_resamples=curves.resampling.num_resamples, estimator=curves.estimator,
        method=f"{curves.method}; per generating class, {problem}")
    return dataclasses.replace(per_class, posterior=curves.posterior)
