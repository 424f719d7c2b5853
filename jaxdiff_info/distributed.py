"""Several processes, one computation: JAX's distributed runtime for the CLIs.

A multi-process job is described by the environment, the same for `train` and `analyze`:
JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID, or
JAX's own detection under Slurm (SLURM_NTASKS > 1) and Open MPI (OMPI_COMM_WORLD_SIZE > 1).
`initialize` starts `jax.distributed` before any JAX computation. Every process then runs the
same program on its share of the devices; arrays sharded over all devices are brought to the
host of every process with `to_host`, and only process 0 writes (`is_primary`).

Timeouts, in seconds, from the environment:
  JAXDIFF_INFO_CONNECT_TIMEOUT    (300) how long a process waits for process 0 to listen
  JAXDIFF_INFO_HEARTBEAT_TIMEOUT  (100) after how long without a heartbeat from a process (or,
                                  at exit, without all processes at the shutdown barrier) the
                                  others stop: JAX's coordination service then ends them with
                                  "Terminating process because the JAX distributed service
                                  detected fatal errors", instead of waiting in a collective
                                  forever

`one_line_fatal_errors` (the CLIs call it) turns that termination, which JAX writes as several
log lines and a stack trace, into one line on stderr.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

CONNECT_TIMEOUT = 300
HEARTBEAT_TIMEOUT = 100


def _seconds(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a whole number of seconds >= 1, got {text!r}")
    return value


def explicit_job(env: Mapping[str, str]) -> tuple[str, int, int, int] | None:
    """(host, port, num_processes, process_id) from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID, or None when JAX_COORDINATOR_ADDRESS is unset. ValueError, one line, when
    they do not describe a job."""
    address = env.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return None
    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS must be host:port of process 0 (e.g. 10.0.0.1:1234), got {address!r}")
    try:
        num, pid = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except (KeyError, ValueError):
        raise ValueError("JAX_COORDINATOR_ADDRESS is set: set JAX_NUM_PROCESSES and JAX_PROCESS_ID to integers too "
                         "(or unset it for a single-process run)") from None
    if num < 1:
        raise ValueError(f"JAX_NUM_PROCESSES must be >= 1, got {num}")
    if not 0 <= pid < num:
        raise ValueError(f"JAX_PROCESS_ID must be in 0..{num - 1} for JAX_NUM_PROCESSES={num}, got {pid}")
    return host.strip("[]"), int(port_text), num, pid


def _check_reachable(host: str, port: int, pid: int, timeout: int) -> None:
    """Process 0 must be able to listen on the address; the others must reach it within timeout."""
    if pid == 0:
        try:
            with socket.create_server((host, port)):
                pass
        except OSError as e:
            raise ValueError(f"process 0 cannot listen on JAX_COORDINATOR_ADDRESS {host}:{port} ({e.strerror or e}): "
                             f"run it on that host, with the port free") from None
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ValueError(f"cannot reach the coordinator at JAX_COORDINATOR_ADDRESS {host}:{port} within "
                                 f"{timeout} s ({e.strerror or e}): start process 0 there, or fix the address "
                                 f"(JAXDIFF_INFO_CONNECT_TIMEOUT sets the wait)") from None
            time.sleep(0.5)


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Start `jax.distributed` when the environment describes a multi-process job (module
    docstring); nothing otherwise. Must run before any JAX computation. Returns whether JAX runs
    distributed. ValueError, one line, for an environment that does not describe a job, a
    coordinator that cannot be reached, or a start after JAX has computed."""
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return True
    connect = _seconds(env, "JAXDIFF_INFO_CONNECT_TIMEOUT", CONNECT_TIMEOUT)
    heartbeat = _seconds(env, "JAXDIFF_INFO_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT)
    job = explicit_job(env)
    timeouts = dict(initialization_timeout=connect, heartbeat_timeout_seconds=heartbeat,
                    shutdown_timeout_seconds=heartbeat)
    try:
        if job is not None:
            host, port, num, pid = job
            if num == 1:
                return False
            _check_reachable(host, port, pid, connect)
            jax.distributed.initialize(f"{host}:{port}", num, pid, **timeouts)
        elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
            jax.distributed.initialize(**timeouts)
        else:
            return False
    except RuntimeError as e:
        raise ValueError(f"cannot start jax.distributed ({' '.join(str(e).split())[:300]}); it must start before any "
                         f"JAX computation") from None
    return True


def one_line_fatal_errors(env: Mapping[str, str] | None = None) -> None:
    """From now on, this process's stderr (file descriptor 2) passes through
    `jaxdiff_info/stderr_filter.py`, a process of its own: what JAX's distributed runtime writes
    when it ends this process because another died (error lines, a fatal line, a stack trace)
    becomes one line; everything else passes unchanged. For a running jax.distributed job only
    (nothing happens otherwise); the CLIs call it after `initialize`."""
    if not jax.distributed.is_initialized() or getattr(one_line_fatal_errors, "filter", None) is not None:
        return
    env = os.environ if env is None else env
    heartbeat = env.get("JAXDIFF_INFO_HEARTBEAT_TIMEOUT", str(HEARTBEAT_TIMEOUT))
    sys.stderr.flush()
    read, write = os.pipe()
    original = os.dup(2)
    one_line_fatal_errors.filter = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("stderr_filter.py")), heartbeat],
        stdin=read, stdout=original, stderr=original, close_fds=True)
    os.close(read)
    os.close(original)
    os.dup2(write, 2)  # the filter ends when the last copy of this end closes: at exit
    os.close(write)


def is_primary() -> bool:
    """Whether this is process 0, the one that writes."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Every array of `tree` as a NumPy array on this host, the whole of it: arrays sharded over
    the devices of several processes are gathered (a collective: every process must call it)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


def check_split(num: int, what: str = "trajectories") -> None:
    """ValueError, one line, when a multi-process run's `num` items do not split evenly over
    all devices of all processes."""
    devices = jax.device_count()
    if jax.process_count() > 1 and num % devices:
        raise ValueError(f"{num} {what} do not split over the {devices} devices of {jax.process_count()} processes; "
                         f"use a multiple of {devices} (e.g. --samples-per-class times the classes)")


def shard_rows(x, sharding):
    """x (N, ...) laid out with its first axis split as `sharding` says (a NamedSharding over
    the trajectory axis, or None: as it is). Inside a jitted function a sharding constraint, so
    that per-row work (draws, posteriors, network calls) is done where the row lives."""
    if sharding is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding)
