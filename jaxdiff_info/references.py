"""Two exact reference models of an image dataset, as mixtures: their curves have exact answers.

    gaussian_reference(images, labels, num_classes)    each class one Gaussian with that class's
                                                       empirical mean and covariance (the linear
                                                       model; full covariance up to FULL_MAX_DIM,
                                                       low rank plus isotropic above)
    empirical_reference(images, labels, num_classes)   each class the mixture of its training
                                                       images: the exact minimiser of the training
                                                       loss, a model that memorises

Images are float arrays (N, *shape) in the model's range ([-1, 1]); the mixtures live on the
flattened images (d = prod(shape)); class weights are the class frequencies. Both run through
`jaxdiff_info.online_curves` and `jaxdiff_info.analysis.analyze_model` like a network, and
through `forward_mc_curves` with their exact posterior. docs/method.md, "Reference models".
"""

from __future__ import annotations

import numpy as np

from jaxdiff_info.mixture import GaussianMixture, make_mixture

REFERENCES = ("gaussian", "empirical")
# full covariances up to this many pixels; above, the top DEFAULT_RANK directions plus isotropic
FULL_MAX_DIM = 1024
DEFAULT_RANK = 128


def _flat(images, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    labels = np.asarray(labels)
    if x.shape[0] != labels.shape[0] or x.shape[0] == 0:
        raise ValueError(f"a reference needs images and one label per image, got {x.shape[0]} images and "
                         f"{labels.shape[0]} labels")
    if not np.all(np.isfinite(x)):
        raise ValueError("the images of a reference must be finite numbers")
    counts = np.bincount(labels, minlength=num_classes)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    if np.any(counts == 0):
        raise ValueError(f"class {int(np.argmin(counts))} has no images: every class needs at least one")
    return x, labels


def gaussian_reference(images, labels, num_classes: int, *, rank: int | None = None) -> GaussianMixture:
    """Class c ~ N(mean_c, S_c), the class's empirical mean and (maximum-likelihood) covariance.

    rank None: the full covariance for d <= FULL_MAX_DIM, else rank DEFAULT_RANK. With a rank
    r: S_c ~ U diag(l) U^T + s^2 I from the top r principal directions of the class, s^2 the
    mean variance of the remaining d - r directions (so the total variance is kept).
    """
    x, labels = _flat(images, labels, num_classes)
    d = x.shape[1]
    counts = np.bincount(labels, minlength=num_classes)
    means = np.stack([x[labels == c].mean(0) for c in range(num_classes)])
    if rank is None and d <= FULL_MAX_DIM:
        covs = np.stack([np.cov(x[labels == c].T, bias=True).reshape(d, d) for c in range(num_classes)])
        return make_mixture(means, weights=counts, covs=covs)
    r = min(DEFAULT_RANK if rank is None else int(rank), d)
    if r < 0:
        raise ValueError(f"the rank of a Gaussian reference must be >= 0, got {rank}")
    basis, spectrum, stds = np.zeros((num_classes, d, r)), np.zeros((num_classes, r)), np.zeros(num_classes)
    for c in range(num_classes):
        centred = x[labels == c] - means[c]
        sing, vt = _top_singular(centred, r, seed=c)
        var = sing**2 / centred.shape[0]  # the principal variances (at most n_c of them)
        total = float(np.sum(centred**2) / centred.shape[0])
        top = min(r, var.shape[0])
        rest = (total - var[:top].sum()) / max(d - r, 1) if r < d else 0.0
        stds[c] = np.sqrt(max(rest, 0.0))
        basis[c, :, :top] = vt[:top].T
        spectrum[c, :top] = np.maximum(var[:top] - stds[c] ** 2, 0.0)
        if top < r:  # fewer images than directions: the unused columns complete the basis, variance 0
            q, _ = np.linalg.qr(np.concatenate([vt[:top].T, np.random.default_rng(c).normal(size=(d, r - top))], 1))
            basis[c, :, top:] = q[:, top:]
    return make_mixture(means, stds, counts, basis=basis, spectrum=spectrum)


# below this many multiply-adds (n d min(n, d)) the SVD is exact; above, randomised
EXACT_SVD_WORK = 2e9


def _top_singular(a: np.ndarray, r: int, seed: int, oversample: int = 32, power: int = 4):
    """The top r singular values and right singular vectors (r, d) of a (n, d): exact for
    small a; else the randomised range finder with power iterations (Halko, Martinsson and
    Tropp 2011), O(n d (r + oversample)) per pass instead of O(n d min(n, d))."""
    n, d = a.shape
    if n * d * min(n, d) <= EXACT_SVD_WORK or r + oversample >= min(n, d):
        _, sing, vt = np.linalg.svd(a, full_matrices=False)
        return sing[:r], vt[:r]
    q = np.linalg.qr(a @ np.random.default_rng(seed).normal(size=(d, r + oversample)))[0]
    for _ in range(power):
        q = np.linalg.qr(a @ np.linalg.qr(a.T @ q)[0])[0]
    _, sing, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return sing[:r], vt[:r]


def empirical_reference(images, labels, num_classes: int) -> GaussianMixture:
    """Every training image a point component of weight 1/N, grouped into its class."""
    x, labels = _flat(images, labels, num_classes)
    return make_mixture(x, classes=[np.flatnonzero(labels == c).tolist() for c in range(num_classes)])


def make_reference(name: str, images, labels, num_classes: int, **kwargs) -> GaussianMixture:
    """The reference model `name` ("gaussian" or "empirical") of a dataset."""
    if name == "gaussian":
        return gaussian_reference(images, labels, num_classes, **kwargs)
    if name == "empirical":
        return empirical_reference(images, labels, num_classes)
    raise ValueError(f"unknown reference {name!r}; choose one of {', '.join(REFERENCES)}")
