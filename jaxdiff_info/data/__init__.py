"""Image datasets with class hierarchies, and on-device helpers to feed them to a model.

``load_dataset("cifar10", data_dir)`` reads (downloading if needed) CIFAR-10;
``load_dataset("shapes", data_dir)`` generates the synthetic two-level "shapes" dataset;
``load_dataset("digits", data_dir)`` gives scikit-learn's 8x8 handwritten digits.
All give a :class:`Dataset` of uint8 NHWC images; ``to_model_range`` maps them to
float32 in [-1, 1] and ``random_flip`` augments a batch on device.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info.data import cifar10, digits, shapes

DATASETS = ("cifar10", "shapes", "digits")
# (height, width, channels) of each dataset's images, known without loading them.
IMAGE_SHAPES = {"cifar10": (32, 32, 3), "shapes": (32, 32, 3), "digits": (digits.SIZE, digits.SIZE, 1)}
# Whether a mirrored image still shows its class: the default of random horizontal flips.
MIRROR_SAFE = {"cifar10": True, "shapes": True, "digits": False}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Images with integer labels, class names and the decision problems they support.

    ``decision_problems`` maps a name to a partition of (some of) the classes into
    groups, e.g. ``{"cat vs dog": [[3], [5]]}``: each group is one outcome to decide on.
    """

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int32
    class_names: tuple[str, ...]
    decision_problems: dict[str, list[list[int]]]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C) uint8, got {self.images.shape} "
                             f"{self.images.dtype}")
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be ({len(self.images)},) int32, got "
                             f"{self.labels.shape} {self.labels.dtype}")
        k = len(self.class_names)
        if self.labels.size and not 0 <= self.labels.min() <= self.labels.max() < k:
            raise ValueError(f"labels must lie in 0..{k - 1}")
        for name, groups in self.decision_problems.items():
            members = [c for group in groups for c in group]
            if len(set(members)) != len(members) or not all(0 <= c < k for c in members):
                raise ValueError(f"decision problem {name!r} must use distinct classes "
                                 f"in 0..{k - 1}, got {groups}")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_dataset(name: str, data_dir: str | os.PathLike, *, split: str = "train",
                 seed: int = 0, num_examples: int | None = None) -> Dataset:
    """Load one split of a dataset by name ("cifar10", "shapes" or "digits").

    cifar10: read from ``data_dir/cifar-10-python.tar.gz``, downloaded there when absent;
    ``num_examples`` keeps the first examples of the split (the files are in random
    order) and ``seed`` is unused. shapes: generated from ``seed`` (each split an
    independent draw; ``data_dir`` unused), 50,000 train or 10,000 test images unless
    ``num_examples`` says otherwise. digits: scikit-learn's 1,797 images (``data_dir`` unused),
    split by ``seed`` into 1,438 train and 359 test images, 20% of each class held out
    (``digits.load_digits``); ``num_examples`` keeps the first of the split's shuffled images.
    """
    if name == "cifar10":
        images, labels, class_names = cifar10.load_cifar10(
            data_dir, split, url=cifar10.URL, md5=cifar10.MD5)
        if num_examples is not None:
            if not 0 <= num_examples <= len(images):
                raise ValueError(f"num_examples must be in 0..{len(images)} for the CIFAR-10 "
                                 f"{split} split, got {num_examples}")
            images, labels = images[:num_examples], labels[:num_examples]
        problems = cifar10.DECISION_PROBLEMS
    elif name == "shapes":
        images, labels, class_names = shapes.load_shapes(split, seed=seed,
                                                         num_examples=num_examples)
        problems = shapes.DECISION_PROBLEMS
    elif name == "digits":
        images, labels, class_names = digits.load_digits(split, seed=seed, num_examples=num_examples)
        problems = digits.DECISION_PROBLEMS
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return Dataset(images=images, labels=labels, class_names=tuple(class_names),
                   decision_problems=copy.deepcopy(problems))


def to_model_range(images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """uint8 images in 0..255 to float32 in [-1, 1] (numpy in, numpy out; jax in, jax out)."""
    xp = jnp if isinstance(images, jax.Array) else np
    return xp.asarray(images, dtype=xp.float32) / 127.5 - 1.0


def from_model_range(images: np.ndarray | jax.Array) -> np.ndarray:
    """float images in [-1, 1] back to uint8 in 0..255 (clipped and rounded), as numpy."""
    scaled = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Flip each image of a (B, H, W, C) batch horizontally with probability 1/2. Jittable."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


__all__ = [
    "DATASETS",
    "Dataset",
    "IMAGE_SHAPES",
    "MIRROR_SAFE",
    "cifar10",
    "digits",
    "from_model_range",
    "load_dataset",
    "random_flip",
    "shapes",
    "to_model_range",
]
