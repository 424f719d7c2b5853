"""The mixture itself: components (mean, covariance, weight) grouped into classes, validated.

Component k has mean m_k (d,), weight pi_k and covariance

    S_k = U_k diag(l_k) U_k^T + s_k^2 I,     U_k (d, r) orthonormal columns, l_k >= 0, s_k >= 0,

so that isotropic components (r = 0), points (r = 0, s_k = 0), full covariances (U_k their
eigenvectors, r = d, s_k = 0) and low rank plus isotropic (r << d) are one family, and under
the forward process alpha_bar S_k + (1 - alpha_bar) I has U_k's eigenvectors: every closed form
is O(d r) per point. A class is a group of components (its model the sub-mixture); the
components are stored grouped by class, in class order, class c holding `class_sizes[c]`
consecutive components. By default every component is its own class.

docs/method.md, "Full-covariance components and classes made of components".
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# how far from symmetric / positive semi-definite / orthonormal a float matrix may be
SYMMETRY_TOLERANCE = 1e-6
PSD_TOLERANCE = 1e-6
ORTHONORMAL_TOLERANCE = 1e-4


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """means (K, d), stds (K,) the isotropic part s_k, log_weights (K,) normalised over all
    components; basis (K, d, r) and spectrum (K, r) the low-rank part (None: r = 0);
    class_sizes: components per class, consecutive (None: every component its own class).
    Build with `make_mixture`."""

    means: jax.Array
    stds: jax.Array
    log_weights: jax.Array
    basis: jax.Array | None = None
    spectrum: jax.Array | None = None
    class_sizes: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def num_classes(self) -> int:
        return self.num_components if self.class_sizes is None else len(self.class_sizes)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def rank(self) -> int:
        """r, the columns of every U_k (0: isotropic components)."""
        return 0 if self.basis is None else self.basis.shape[-1]

    @property
    def complete(self) -> bool:
        """U_k spans the whole space (full covariances): no isotropic rest."""
        return self.rank == self.dim

    @property
    def weights(self) -> jax.Array:
        """(K,) component weights pi_k."""
        return jnp.exp(self.log_weights)

    @property
    def singleton_classes(self) -> bool:
        return self.class_sizes is None or all(n == 1 for n in self.class_sizes)

    @property
    def component_class(self) -> np.ndarray:
        """(K,) the class of every component."""
        sizes = np.ones(self.num_components, int) if self.class_sizes is None else np.asarray(self.class_sizes)
        return np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)

    @property
    def class_log_weights(self) -> jax.Array:
        """(C,) log pi_c = log sum_{k in c} pi_k."""
        if self.singleton_classes:
            return self.log_weights
        index, valid = class_layout(self)
        return jax.nn.logsumexp(jnp.where(valid, self.log_weights[index], -jnp.inf), axis=-1)

    @property
    def class_weights(self) -> jax.Array:
        return jnp.exp(self.class_log_weights)

    @property
    def points(self) -> bool:
        """Every component a single point (s_k = 0, no low-rank part)."""
        spread = np.asarray(self.stds)
        if self.spectrum is not None:
            spread = np.concatenate([spread, np.asarray(self.spectrum).ravel()])
        return bool(np.all(spread == 0))


def check_class_weights(mixture: GaussianMixture) -> None:
    """ValueError, one line, for a class of weight 0: P(class | x_t) and H(class | x_t) of a
    class that never occurs are not defined by the mixture (its p(x_t | class) is 0 / 0)."""
    empty = np.flatnonzero(~(np.asarray(mixture.class_weights, np.float64) > 0))
    if empty.size:
        raise ValueError(f"class {', '.join(map(str, empty))} has weight 0 in the mixture; the estimators need every "
                         f"class to have a weight > 0 (leave the class out of the mixture)")


def class_layout(mixture: GaussianMixture) -> tuple[np.ndarray, np.ndarray]:
    """(C, L) component index of member l of class c, and whether that slot is a member
    (classes padded to the largest, L): every per-class sum is then a batched product."""
    sizes = np.ones(mixture.num_components, int) if mixture.class_sizes is None else np.asarray(mixture.class_sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slots = np.arange(int(sizes.max()))
    valid = slots[None, :] < sizes[:, None]
    index = np.where(valid, starts[:, None] + slots[None, :], starts[:, None])
    return index.astype(np.int32), valid


# --- construction -------------------------------------------------------------------------

def _numbers(name: str, value) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, in lists of one consistent shape") from None


def _classes(classes, k: int) -> list[list[int]]:
    if classes is None:
        return [[j] for j in range(k)]
    if not isinstance(classes, (list, tuple)) or not classes:
        raise ValueError("classes must be a non-empty list of lists of component indices")
    seen: dict[int, int] = {}
    clean = []
    for c, members in enumerate(classes):
        if not isinstance(members, (list, tuple)) or not members:
            raise ValueError(f"class {c} must be a non-empty list of component indices, got {members!r}")
        for j in members:
            if isinstance(j, bool) or not isinstance(j, (int, np.integer)):
                raise ValueError(f"class {c}: component index {j!r} is not an integer")
            if not 0 <= j < k:
                raise ValueError(f"class {c} names component {j}, but the components are 0..{k - 1}")
            if j in seen:
                raise ValueError(f"component {j} is in class {seen[j]} and class {c}: classes must not overlap")
            seen[int(j)] = c
        clean.append([int(j) for j in members])
    missing = sorted(set(range(k)) - set(seen))
    if missing:
        raise ValueError(f"component {missing[0]} is in no class: every component must belong to one")
    return clean


def _covariances(covs, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecompositions (K, d, d), (K, d) of validated covariances (K, d, d)."""
    covs = _numbers("covs", covs)
    if covs.shape != (k, d, d):
        raise ValueError(f"covs must be one {d} x {d} matrix per component ({k}), got shape {covs.shape}")
    if not np.all(np.isfinite(covs)):
        raise ValueError("covs must be finite numbers")
    vecs, vals = np.empty_like(covs), np.empty((k, d))
    for j, s in enumerate(covs):
        scale = max(1.0, float(np.abs(s).max()))
        if np.abs(s - s.T).max() > SYMMETRY_TOLERANCE * scale:
            raise ValueError(f"the covariance of component {j} is not symmetric")
        lam, u = np.linalg.eigh(0.5 * (s + s.T))
        if lam.min() < -PSD_TOLERANCE * scale:
            raise ValueError(f"the covariance of component {j} is not positive semi-definite "
                             f"(smallest eigenvalue {lam.min():.3g})")
        vals[j], vecs[j] = np.clip(lam, 0.0, None), u
    return vecs, vals


def _low_rank(basis, spectrum, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    basis, spectrum = _numbers("basis", basis), _numbers("spectrum", spectrum)
    if basis.ndim != 3 or basis.shape[:2] != (k, d):
        raise ValueError(f"basis must be (K, d, r) = ({k}, {d}, r), got shape {basis.shape}")
    r = basis.shape[2]
    if spectrum.shape != (k, r):
        raise ValueError(f"spectrum must be (K, r) = ({k}, {r}), got shape {spectrum.shape}")
    if not (np.all(np.isfinite(basis)) and np.all(np.isfinite(spectrum))):
        raise ValueError("basis and spectrum must be finite numbers")
    if r > d:
        raise ValueError(f"basis has r = {r} columns in d = {d}: at most d")
    for j in range(k):
        if np.any(spectrum[j] < 0):
            raise ValueError(f"the spectrum of component {j} must be >= 0 (variances along its basis)")
        gram = basis[j].T @ basis[j]
        if np.abs(gram - np.eye(r)).max() > ORTHONORMAL_TOLERANCE:
            raise ValueError(f"the basis of component {j} must have orthonormal columns")
    return basis, spectrum


def make_mixture(means, stds=None, weights=None, *, covs=None, basis=None, spectrum=None,
                 classes=None) -> GaussianMixture:
    """Validated mixture.

    means: (K,) or (K, d); weights: (K,) >= 0, any scale (default equal); the covariance of
    each component from one of
      stds (K,) >= 0:               s_k^2 I (default 0: points);
      covs (K, d, d):               full, symmetric positive semi-definite (stored as its
                                    eigendecomposition);
      stds with basis (K, d, r) and spectrum (K, r):
                                    U_k diag(l_k) U_k^T + s_k^2 I, U_k orthonormal columns.
    classes: [[component indices], ...], a partition of the components (default: each its own
    class). Components are stored grouped by class, in class order.
    """
    means = _numbers("means", means)
    if means.ndim == 1:
        means = means[:, None]
    if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
        raise ValueError(f"means must be a non-empty list of points (K,) or (K, d), got shape {means.shape}")
    k, d = means.shape
    if covs is not None and (stds is not None or basis is not None):
        raise ValueError("give the covariances as covs or as stds (with basis and spectrum), not both")
    if (basis is None) != (spectrum is None):
        raise ValueError("basis and spectrum come together")
    stds = np.zeros(k) if stds is None else _numbers("stds", stds)
    weights = np.ones(k) if weights is None else _numbers("weights", weights)
    if stds.shape != (k,):
        raise ValueError(f"stds must have one entry per component ({k}), got shape {stds.shape}")
    if weights.shape != (k,):
        raise ValueError(f"weights must have one entry per component ({k}), got shape {weights.shape}")
    if not np.all(np.isfinite(means)):
        raise ValueError("means must be finite numbers")
    if not np.all(np.isfinite(stds)) or np.any(stds < 0):
        raise ValueError("stds must be finite numbers >= 0")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("weights must be finite numbers >= 0")
    if not np.any(weights > 0):
        raise ValueError("weights must not all be zero")
    if covs is not None:
        basis, spectrum = _covariances(covs, k, d)
        if d == 1:  # a 1 x 1 covariance is an isotropic variance
            stds, basis, spectrum = np.sqrt(spectrum[:, 0]), None, None
    elif basis is not None:
        basis, spectrum = _low_rank(basis, spectrum, k, d)
    groups = _classes(classes, k)
    order = np.asarray([j for g in groups for j in g])
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights) - np.log(weights.sum())
    f32 = lambda a: None if a is None else jnp.asarray(a[order], jnp.float32)  # noqa: E731
    sizes = None if classes is None else tuple(len(g) for g in groups)
    return GaussianMixture(f32(means), f32(stds), f32(log_weights), f32(basis), f32(spectrum), sizes)


def centred(mixture: GaussianMixture) -> tuple[GaussianMixture, np.ndarray]:
    """The mixture moved so that its mean is 0, and the shift (d,) that was taken off.

    Every class posterior is unchanged by the move (x_t moves by sqrt(abar_t) * shift), so
    entropies can be computed on the centred mixture, where float32 does not cancel.
    """
    shift = np.asarray(mixture.weights, np.float64) @ np.asarray(mixture.means, np.float64)
    means = jnp.asarray(np.asarray(mixture.means, np.float64) - shift, jnp.float32)
    return dataclasses.replace(mixture, means=means), shift


def permute(mixture: GaussianMixture, order: Sequence[int]) -> GaussianMixture:
    """The same mixture with its classes listed in `order` (each with its components)."""
    index, valid = class_layout(mixture)
    order = np.asarray(order)
    components = np.concatenate([index[c][valid[c]] for c in order])
    take = lambda a: None if a is None else a[components]  # noqa: E731
    sizes = None if mixture.class_sizes is None else tuple(mixture.class_sizes[c] for c in order)
    return GaussianMixture(take(mixture.means), take(mixture.stds), take(mixture.log_weights),
                           take(mixture.basis), take(mixture.spectrum), sizes)
