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
    """Process 0 must be able to listen on the address; the others must reach it within timeout
    and find a gRPC server there (`_coordinator_answer`)."""
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
                break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ValueError(f"cannot reach the coordinator at JAX_COORDINATOR_ADDRESS {host}:{port} within "
                                 f"{timeout} s ({e.strerror or e}): start process 0 there, or fix the address "
                                 f"(JAXDIFF_INFO_CONNECT_TIMEOUT sets the wait)") from None
            time.sleep(0.5)
    answer = _coordinator_answer(host, port, timeout=min(timeout, 30))
    if answer is not None:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS {host}:{port} is not a JAX coordinator (it {answer}): give the "
                         f"host:port that process 0 of this job was given")


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


PROBE_PATH = b"/xla.coordination.CoordinationService/JaxdiffInfoProbe"  # a method it does not have


def _coordinator_answer(host: str, port: int, timeout: float) -> str | None:
    """None when host:port answers as a gRPC server (JAX's coordination service is one). The
    probe calls a method the coordination service does not have (`PROBE_PATH`): any gRPC server
    answers it with HTTP/2 status 200 (grpc-status 12, UNIMPLEMENTED), and nothing changes on
    the server. Otherwise what the address did instead, for the error (JAX itself would abort
    the process with a C++ check failure). Only definite refusals count: an answer this probe
    cannot read is None. The whole exchange has `timeout` seconds."""
    headers = (b"\x83\x86"  # :method POST, :scheme http (indexed)
               + bytes([0x04, len(PROBE_PATH)]) + PROBE_PATH  # :path, a literal with an indexed name
               + b"\x01\x0bcoordinator"  # :authority
               + b"\x00\x0ccontent-type\x10application/grpc" + b"\x00\x02te\x08trailers")  # new names
    request = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")  # preface, SETTINGS
               + _frame(1, 4, 1, headers) + _frame(0, 1, 1, bytes(5)))  # HEADERS, an empty gRPC message
    deadline = time.monotonic() + timeout
    received, frames = b"", 0
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(request)
            while True:
                while len(received) < 9 or len(received) < 9 + int.from_bytes(received[:3], "big"):
                    if received.startswith(b"HTTP/") and b"\r\n" in received:
                        line = received.split(b"\r\n")[0].decode("latin-1")
                        return f"answered {line!r}, not HTTP/2"
                    if len(received) >= 9 and frames == 0 and received[3] != 4:  # before a bogus length
                        return "answered, but not with HTTP/2 (no SETTINGS frame first)"
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout
                    s.settimeout(left)
                    chunk = s.recv(65536)
                    if not chunk:
                        return "closed the connection without answering a gRPC call"
                    received += chunk
                size, kind, flags = int.from_bytes(received[:3], "big"), received[3], received[4]
                stream, payload = int.from_bytes(received[5:9], "big") & 0x7FFFFFFF, received[9:9 + size]
                received, frames = received[9 + size:], frames + 1
                if frames == 1 and (kind != 4 or stream != 0):  # a first frame that arrived whole
                    return "answered, but not with HTTP/2 (no SETTINGS frame first)"
                if kind == 4 and not flags & 1:
                    s.sendall(_frame(4, 1, 0, b""))  # SETTINGS acknowledged
                elif kind == 7 and payload[4:8] != bytes(4):
                    return "ended the connection with an HTTP/2 error instead of answering a gRPC call"
                elif kind == 3 and stream == 1:
                    return "reset the gRPC call (HTTP/2 RST_STREAM)"
                elif kind == 1 and stream == 1:
                    if flags & 0x8:  # PADDED: a pad length, then padding at the end
                        pad = payload[0] if payload else 0
                        payload = payload[1:len(payload) - pad]
                    return _http2_status(payload[5:] if flags & 0x20 else payload)  # PRIORITY: 5 bytes
    except socket.timeout:
        return f"did not answer a gRPC call within {timeout:g} s"
    except OSError as e:
        return f"ended the connection ({e.strerror or e})"


def _http2_status(block: bytes) -> str | None:
    """None for :status 200 as the first field of an HPACK header block (or a block this cannot
    read: Huffman-coded strings, multi-byte integers); otherwise the status it answered."""
    static = {8: "200", 9: "204", 10: "206", 11: "304", 12: "400", 13: "404", 14: "500"}  # RFC 7541, :status
    i = 0
    while i < len(block) and block[i] & 0xE0 == 0x20:  # dynamic table size updates
        if block[i] & 0x1F == 0x1F:  # a size that continues in more bytes: not read here
            return None
        i += 1
    if i >= len(block):
        return None
    first = block[i]
    if first & 0x80:  # an indexed field
        status = static.get(first & 0x7F)
        return None if status in (None, "200") else f"answered HTTP status {status}"
    index = first & (0x3F if first & 0x40 else 0x0F)  # a literal: the name's index, or 0 and the name
    if index == (0x3F if first & 0x40 else 0x0F):  # an index that continues in more bytes
        return None
    i += 1

    def string() -> bytes | None:
        nonlocal i
        if i >= len(block) or block[i] & 0x80 or block[i] == 0x7F:  # Huffman-coded or long
            return None
        text = block[i + 1:i + 1 + block[i]]
        i += 1 + block[i]
        return text

    if index == 0 and string() != b":status" or index and index not in static:
        return None
    value = string()
    if value is None or not value.isdigit() or value == b"200":
        return None
    return f"answered HTTP status {value.decode()}"


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Start `jax.distributed` when the environment describes a multi-process job (module
    docstring); nothing otherwise. Must run before any JAX computation. Returns whether JAX runs
    distributed. ValueError, one line, for an environment that does not describe a job, a
    coordinator that cannot be reached or is not one, or a start after JAX has computed."""
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
        elif (env.get("JAX_NUM_PROCESSES", "").strip() not in ("", "1")
              or env.get("JAX_PROCESS_ID", "").strip() not in ("", "0")):
            raise ValueError(f"JAX_NUM_PROCESSES={env.get('JAX_NUM_PROCESSES', '')!r} and JAX_PROCESS_ID="
                             f"{env.get('JAX_PROCESS_ID', '')!r} describe a job of several processes: set "
                             f"JAX_COORDINATOR_ADDRESS to process 0's host:port too (or unset both for one process)")
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
