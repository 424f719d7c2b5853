"""The handwritten digits that scikit-learn ships: 1,797 greyscale 8x8 images of 0..9.

``sklearn.datasets.load_digits`` (the UCI "optical recognition of handwritten digits" test
set, read from files installed with scikit-learn: no download) gives 8x8 images with 17 grey
levels 0..16, ink bright on a black background. They are kept at their native 8x8 (d = 64
pixels), one channel, scaled to 0..255 as round(v * 255 / 16).

There is no official split. A fixed held-out split is drawn from ``seed``: the images of
each class, in turn 0..9, are permuted by ``numpy.random.default_rng(seed)`` and the first
round(0.2 n_c) of class c go to "test", the rest to "train"; each split is then shuffled by
the same generator, so that its first images mix the classes. The two splits are disjoint,
together hold all 1,797 images, and the same seed always gives the same split.
"""

from __future__ import annotations

import numpy as np

NUM_IMAGES = 1797
SIZE = 8
LEVELS = 16  # grey levels 0..16
CLASS_NAMES = tuple(str(k) for k in range(10))
SPLITS = ("train", "test")
TEST_FRACTION = 0.2

# Decision problems. The pairs are those that pixel classifiers confuse most on held-out
# digits (python -m experiments.digits_confusions; README, "Handwritten digits"): over the
# test splits of seeds 0..19, 1-nearest-neighbour and logistic regression trained on the
# train split together confuse 1 and 8 in 56 of 14,360 classifications (either way), 5 and 9
# in 29, 8 and 9 in 28, 3 and 9 in 23; each of these four is among the ten most confused pairs
# of both classifiers. "0 vs 1", never confused by either, is the easy contrast. Then each
# digit against the rest.
PAIRS = ((1, 8), (5, 9), (8, 9), (3, 9), (0, 1))
DECISION_PROBLEMS: dict[str, list[list[int]]] = {
    **{f"{a} vs {b}": [[a], [b]] for a, b in PAIRS},
    **{f"{k} vs rest": [[k], [j for j in range(10) if j != k]] for k in range(10)},
}


def _raw() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) in 0..16, labels (1797,)) as scikit-learn gives them."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Grey levels 0..16 to uint8 0..255: round(v * 255 / 16).

    The one tie, v = 8 -> 127.5, gives 128 whether halves round up or to even.
    """
    v = np.asarray(values, np.float64)
    if v.size and not (v.min() >= 0 and v.max() <= LEVELS and np.array_equal(v, np.round(v))):
        raise ValueError(f"digit pixels must be integers in 0..{LEVELS}")
    return np.rint(v * 255 / LEVELS).astype(np.uint8)


def split_indices(labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """{"train": indices, "test": indices} of the held-out split of ``seed`` (module docstring)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(TEST_FRACTION * members.size)
        parts["test"].append(members[:n_test])
        parts["train"].append(members[n_test:])
    return {split: rng.permutation(np.concatenate(parts[split])) for split in SPLITS}


def load_digits(split: str = "train", *, seed: int = 0, num_examples: int | None = None,
                ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One split of the digits: (images (N, 8, 8, 1) uint8, labels (N,) int32, class names).

    ``seed`` fixes the held-out split (1,438 train and 359 test images for any seed);
    ``num_examples`` keeps the first images of the split, which is in random order.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of {SPLITS}")
    values, labels = _raw()
    idx = split_indices(labels, seed)[split]
    if num_examples is not None:
        if isinstance(num_examples, bool) or not 0 <= num_examples <= idx.size:
            raise ValueError(f"num_examples must be in 0..{idx.size} for the digits {split} split, "
                             f"got {num_examples}")
        idx = idx[:num_examples]
    images = to_uint8(values[idx])[..., None]
    return np.ascontiguousarray(images), labels[idx].astype(np.int32), CLASS_NAMES
