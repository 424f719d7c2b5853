"""Devices and data: the distributed start, the mesh, and the batches of every step.

Devices. Training is data parallel over every device of every process: a Mesh over
``jax.devices()`` with one axis "data"; each batch is sharded along it and the state is
replicated, and XLA inserts the gradient all-reduce. For several hosts, start one process
per host with the usual environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID; or a Slurm or Open MPI launch of more than one task):
``initialize_distributed`` then starts ``jax.distributed`` before anything else, and each
process feeds its own slice of every global batch. The checkpoint directory must then be
on a file system that every process sees.

Data order. It is a pure function of (seed, step): epoch e visits the images in the order of
the permutation ``numpy.random.default_rng((seed, e))``, in batches, dropping the remainder.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff_info import distributed
from jaxdiff_info.data import Dataset


def initialize_distributed() -> bool:
    """Start ``jax.distributed`` when the environment describes a multi-process job
    (`jaxdiff_info.distributed.initialize`: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, or Slurm and Open MPI detection). Must run before any JAX computation.
    Returns whether JAX runs distributed."""
    return distributed.initialize()


def data_mesh(devices=None) -> Mesh:
    """A 1-D Mesh with axis "data" over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def _replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of ``mesh`` (the sharding of the state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
    """(batch_size,) indices of the images of global batch ``step``.

    Epoch e = step // (N // B) visits the images in the order of
    ``numpy.random.default_rng((seed, e)).permutation(N)``; the last N mod B are skipped.
    """
    per_epoch = num_examples // batch_size
    epoch, i = divmod(int(step), per_epoch)
    return _permutation(seed, epoch, num_examples)[i * batch_size:(i + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n)


class Batches:
    """The global batches of a run, as arrays sharded along the mesh's "data" axis.

    ``batches(step, n)`` gives the n consecutive batches starting at ``step``, stacked:
    {"images": uint8 (n, B, H, W, C), "labels": int32 (n, B)}; ``batches.one(step)`` a single
    one without the leading axis. Each process builds only its own rows of each batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, mesh: Mesh):
        self.images, self.labels = dataset.images, dataset.labels
        self.batch_size, self.seed, self.mesh = batch_size, seed, mesh
        processes = jax.process_count()
        self.rows = slice(jax.process_index() * batch_size // processes,
                          (jax.process_index() + 1) * batch_size // processes)

    def _indices(self, step: int, n: int) -> np.ndarray:
        return np.stack([batch_indices(self.seed, s, len(self.labels), self.batch_size)
                         for s in range(step, step + n)])

    def _put(self, array: np.ndarray, spec: PartitionSpec, global_shape) -> jax.Array:
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), array, global_shape)

    def __call__(self, step: int, n: int) -> dict[str, jax.Array]:
        idx = self._indices(step, n)[:, self.rows]
        spec = PartitionSpec(None, "data")
        return {"images": self._put(self.images[idx], spec, (n, self.batch_size) + self.images.shape[1:]),
                "labels": self._put(self.labels[idx], spec, (n, self.batch_size))}

    def one(self, step: int) -> dict[str, jax.Array]:
        idx = self._indices(step, 1)[0, self.rows]
        spec = PartitionSpec("data")
        return {"images": self._put(self.images[idx], spec, (self.batch_size,) + self.images.shape[1:]),
                "labels": self._put(self.labels[idx], spec, (self.batch_size,))}

