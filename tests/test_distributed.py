"""Several processes on 127.0.0.1 (jax.distributed, gloo collectives on the CPU): `analyze` and
`train` give the numbers of one process with as many devices, only process 0 writes, a dead
process ends the others, and a job the environment cannot describe is one line, exit 2."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jaxdiff_info import distributed, training, unet

REPO = Path(__file__).resolve().parents[1]
MICRO = unet.UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                        num_classes=10, image_size=8, channels=1, num_groups=4)
# the CLI in a subprocess, with the micro network registered for `train --config micro`
CLI = textwrap.dedent("""
    import sys
    from jaxdiff_info import unet
    unet.CONFIGS["micro"] = unet.UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                                            dropout=0.0, num_classes=10, image_size=8, channels=1, num_groups=4)
    from experiments.cifar10.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")
ANALYZE = ["analyze", "--steps", "6", "--samples-per-class", "2", "--bootstrap", "10", "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **extra}


def launch(args, processes: int, port: int, **extra):
    """`processes` processes of the CLI with the job's environment (Popen objects)."""
    return [subprocess.Popen([sys.executable, "-c", CLI, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=environment(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                             JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i), **extra))
            for i in range(processes)]


def finish(procs, timeout=600):
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def one_process(args, devices: int):
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=environment(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "micro-digits"
    training.train(training.TrainConfig(model="micro", unet=MICRO, dataset="digits", checkpoint_dir=directory,
                                        num_examples=64, steps=2, batch_size=8, lr=1e-3, warmup=1, save_every=2,
                                        samples_per_class=0, log_every=1), progress=False)
    return directory


# --- the environment -------------------------------------------------------------------------

@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1"}, "must be host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:99999"}, "must be host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2"}, "set JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID must be in 0..1 for JAX_NUM_PROCESSES=2, got 2"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES must be >= 1"),
    ({"JAXDIFF_INFO_HEARTBEAT_TIMEOUT": "soon"}, "JAXDIFF_INFO_HEARTBEAT_TIMEOUT must be a whole number"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "set JAX_COORDINATOR_ADDRESS to process 0's host:port too"),
    ({"JAX_PROCESS_ID": "1"}, "describe a job of several processes"),
])
def test_a_job_the_environment_cannot_describe_is_one_line(env, message):
    with pytest.raises(ValueError, match=message) as err:
        distributed.initialize(env)
    assert "\n" not in str(err.value)


def test_an_unreachable_coordinator_is_one_line():
    port = free_port()
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "JAXDIFF_INFO_CONNECT_TIMEOUT": "1"}
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"cannot reach the coordinator at JAX_COORDINATOR_ADDRESS 127.0.0.1:{port} "
                                         "within 1 s"):
        distributed.initialize(env)
    assert time.monotonic() - start < 10
    # process 0 on an address it cannot listen on (TEST-NET-3, not this machine's)
    with pytest.raises(ValueError, match="process 0 cannot listen on JAX_COORDINATOR_ADDRESS 203.0.113.7"):
        distributed.initialize({**env, "JAX_COORDINATOR_ADDRESS": "203.0.113.7:1234", "JAX_PROCESS_ID": "0"})
    assert not distributed.initialize({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "1",
                                       "JAX_PROCESS_ID": "0"})  # a job of one process: nothing to start


def serve_once(reply):
    """A server on a free port of 127.0.0.1 that is not a JAX coordinator: for each connection it
    reads the request and calls reply(connection). Returns the port."""
    server = socket.create_server(("127.0.0.1", 0))

    def loop():
        while True:
            connection, _ = server.accept()
            with connection:
                connection.settimeout(5)
                try:
                    connection.recv(65536)
                    reply(connection)
                except OSError:
                    pass

    threading.Thread(target=loop, daemon=True).start()
    return server.getsockname()[1]


def http2_404(connection):
    connection.sendall(distributed._frame(4, 0, 0, b"") + distributed._frame(1, 4, 1, b"\x8d"))
    time.sleep(0.5)


@pytest.mark.parametrize("reply, answer", [
    (lambda c: c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"), "answered 'HTTP/1.1 400 Bad Request', not HTTP/2"),
    (lambda c: None, "closed the connection without answering a gRPC call"),
    (http2_404, "answered HTTP status 404"),
    (lambda c: time.sleep(3), "did not answer a gRPC call within 1 s"),
    (lambda c: [(c.sendall(distributed._frame(4, 0, 0, b"") if i == 0 else distributed._frame(6, 0, 0, bytes(8))),
                 time.sleep(0.2)) for i in range(20)], "did not answer a gRPC call within 1 s"),  # PINGs, no answer
    (lambda c: c.sendall(distributed._frame(1, 4, 1, b"\x88")), "answered, but not with HTTP/2 (no SETTINGS frame first)"),
])
def test_an_address_where_something_else_listens_is_one_line(reply, answer):
    """JAX itself aborts the process there (a C++ check failure, exit 134)."""
    port = serve_once(reply)
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "JAXDIFF_INFO_CONNECT_TIMEOUT": "1"}
    with pytest.raises(ValueError, match=f"JAX_COORDINATOR_ADDRESS 127.0.0.1:{port} is not a JAX coordinator "
                                         f"\\(it {re.escape(answer)}\\): give the host:port") as err:
        distributed.initialize(env)
    assert "\n" not in str(err.value)


def test_a_real_coordinator_passes_the_probe():
    """JAX's own coordination service (the one process 0 starts) answers the probe's call of a
    method it lacks with HTTP/2 status 200: not refused, at once."""
    from jax._src.lib import _jax

    port = free_port()
    service = _jax.get_distributed_runtime_service(f"127.0.0.1:{port}", 2)
    try:
        start = time.monotonic()
        assert distributed._coordinator_answer("127.0.0.1", port, timeout=5) is None
        assert time.monotonic() - start < 2
    finally:
        service.shutdown()


@pytest.mark.parametrize("block, answer", [
    (b"\x88", None), (b"\x8d", "answered HTTP status 404"), (b"\x3f\xe1\x1f\x88", None),
    (b"\x00\x07:status\x03200", None), (b"\x40\x07:status\x03503", "answered HTTP status 503"),
    (b"\x08\x03404", "answered HTTP status 404"), (b"\x48\x83\x64\x01\x00", None),  # Huffman: not read
    (b"\x3f\x8c\x01\x88", None),  # a dynamic table size of several bytes, then 200
    (b"\x00\x0ccontent-type\x03abc", None), (b"", None),
])
def test_the_probe_reads_the_status_of_an_answer(block, answer):
    """RFC 7541's representations of :status: indexed, literal with a new or an indexed name;
    what it cannot read counts as an answer (JAX then decides)."""
    assert distributed._http2_status(block) == answer


def test_the_cli_refuses_a_bad_job_with_exit_2(checkpoint, tmp_path):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-c", CLI, *ANALYZE, "--checkpoint", str(checkpoint), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=environment(JAX_COORDINATOR_ADDRESS="127.0.0.1:1234", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID="3"))
    assert r.returncode == 2 and "JAX_PROCESS_ID must be in 0..1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


# --- two processes against one -----------------------------------------------------------------

def test_analyze_on_two_processes_is_one_process_with_two_devices(checkpoint, tmp_path):
    shared = tmp_path / "shared"  # both processes are given the same --out, as on a cluster file system
    args = [*ANALYZE, "--checkpoint", checkpoint, "--out", shared, "--no-immse"]  # I-MMSE: each process whole
    results = finish(launch(args, 2, free_port()))
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    assert "wrote summary.json" in results[0][1]
    assert [line for line in results[1][1].splitlines() if not line.startswith("[Gloo]")] == []  # process 1: silent
    single = tmp_path / "single"
    r = one_process([*ANALYZE, "--checkpoint", checkpoint, "--out", single, "--no-immse"], devices=2)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = np.load(shared / "curves.npz"), np.load(single / "curves.npz")
    assert set(a.files) == set(b.files) and "online/entropy_bits" in a.files and "snapshots/x0_hat" in a.files
    for key in a.files:
        if a[key].dtype.kind == "f":
            np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert json.loads((shared / "summary.json").read_text())["problems"] == \
        json.loads((single / "summary.json").read_text())["problems"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared", "single"]  # no stage or stray folder


def test_trajectories_that_do_not_split_over_the_processes_are_one_line(checkpoint, tmp_path):
    args = [*ANALYZE, "--checkpoint", checkpoint, "--out", tmp_path / "o", "--samples-per-class", "3",
            "--problem", "0 vs 1=0|1"]
    results = finish(launch(args, 2, free_port(), XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    for code, _, err in results:
        assert code == 2 and "30 trajectories do not split over the 4 devices of 2 processes" in err
    assert not (tmp_path / "o").exists()


TRAIN = ["train", "--config", "micro", "--dataset", "digits", "--num-examples", "64", "--steps", "3",
         "--batch-size", "8", "--lr", "1e-3", "--warmup", "1", "--log-every", "1", "--save-every", "3",
         "--samples-per-class", "0", "--no-progress"]


@pytest.mark.slow  # two trainings in subprocesses: ~1 min on 2 cores
def test_train_on_two_processes_is_one_process_with_two_devices(tmp_path):
    results = finish(launch([*TRAIN, "--checkpoint-dir", tmp_path / "two"], 2, free_port()))
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    r = one_process([*TRAIN, "--checkpoint-dir", tmp_path / "one"], devices=2)
    assert r.returncode == 0, r.stderr[-2000:]
    loss = lambda d: [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    np.testing.assert_allclose(loss(tmp_path / "two"), loss(tmp_path / "one"), rtol=1e-6)


@pytest.mark.slow  # waits for the heartbeat timeout
@pytest.mark.parametrize("dead", [1, 0])  # a worker, or the coordinator
def test_a_process_that_dies_ends_the_others(checkpoint, tmp_path, dead):
    args = [*ANALYZE, "--checkpoint", checkpoint, "--out", tmp_path / "o", "--steps", "1000", "--no-immse"]
    procs = launch(args, 2, free_port(), JAXDIFF_INFO_HEARTBEAT_TIMEOUT="10")
    time.sleep(25)  # started and computing
    procs[dead].kill()
    start = time.monotonic()
    code, _, err = finish(procs[1 - dead:2 - dead], timeout=120)[0]
    assert code != 0 and time.monotonic() - start < 90
    # JAX's termination (error lines, a fatal line, a stack trace) is one line
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "another process of the job died" in lines[-1] \
        and "= 10 s" in lines[-1], err[-2000:]
    assert "Check failure stack trace" not in err and "coordination_service" not in err, err[-2000:]
    assert not list((tmp_path / "o").glob("*.json")) and not list((tmp_path / "o").glob("*.npz"))  # nothing written
    procs[dead].communicate()


# --- JAX's fatal errors as one line (jaxdiff_info/stderr_filter.py) ---------------------------------

FILTER = Path(distributed.__file__).with_name("stderr_filter.py")
TERMINATION = (  # as JAX 0.10 writes it when another process stops sending heartbeats
    b"E1201 22:31:35.398042   10439 coordination_service.cc:1549] [1247] Use error polling to propagate the "
    b"following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n"
    b"1\nThe tasks have crashed. [type.googleapis.com/tensorflow.CoordinationServiceError='']\n"
    b"E1201 22:31:35.398270   10450 coordination_service_agent.cc:289] Polled an error from coordination service.\n"
    b"F1201 22:31:35.398669   10450 client.h:80] Terminating process because the JAX distributed service detected "
    b"fatal errors. This most likely indicates that another task died; see the other task logs.\n"
    b"RPC: /xla.coordination.CoordinationService/PollForError\n*** Check failure stack trace: ***\n"
    b"    @     0x7f6e64440634  absl::lts_20260107::log_internal::LogMessage::SendToLog()\n")

COORDINATOR_LOST = (  # what a worker writes when the coordinator (process 0) was killed
    b"W1201 23:30:08.302461   23708 preemption_sync_manager.cc:147] Failed to retrieve preemption notice from "
    b"coordination service: UNAVAILABLE: Socket closed\nAdditional GRPC error information from remote target "
    b"coordination_service while calling /xla.coordination.CoordinationService/GetKeyValue:\n"
    b"E1201 23:30:08.302512   23708 preemption_sync_manager.cc:159] Failed to cancel preemption barrier\n"
    + TERMINATION[TERMINATION.index(b"F1201"):])


def filtered(chunks, heartbeat="10"):
    """What the filter writes for stderr written in ``chunks``."""
    proc = subprocess.Popen([sys.executable, str(FILTER), heartbeat], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    for chunk in chunks:
        proc.stdin.write(chunk)
        proc.stdin.flush()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return out


def test_the_runtime_s_termination_becomes_one_line_and_the_rest_passes_unchanged():
    before = b"analyze: 10 trajectories\n\r 10%|#   | 1/10\r 20%|##  | 2/10"
    # in pieces, the log line starting on the progress bar's line, split inside its prefix
    for chunks in ([before, TERMINATION[:100], TERMINATION[100:]], [before + TERMINATION[:9], TERMINATION[9:]],
                   [before, COORDINATOR_LOST]):
        out = filtered(chunks)
        assert out.startswith(before)
        tail = out[len(before):].decode()
        assert tail.count("\n") == 1 and tail.startswith(
            "error: Terminating process because the JAX distributed service detected fatal errors: another process "
            "of the job died or did not answer for JAXDIFF_INFO_HEARTBEAT_TIMEOUT = 10 s"), tail
    # runtime error lines with no fatal one after them, and other E lines, pass unchanged
    errors = TERMINATION[:TERMINATION.index(b"F1201")]
    other = b"E1201 22:00:00.000001   17 gloo.cc:12] something else\nTraceback (most recent call last):\n"
    assert filtered([other, errors, b"done\n"]) == other + errors + b"done\n"


def test_a_progress_bar_passes_at_once():
    proc = subprocess.Popen([sys.executable, str(FILTER), "10"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc.stdin.write(b"\r 50%|#####     | 5/10")
    proc.stdin.flush()
    os.set_blocking(proc.stdout.fileno(), False)
    got, deadline = b"", time.monotonic() + 20
    while not got.endswith(b"5/10") and time.monotonic() < deadline:
        time.sleep(0.05)
        got += proc.stdout.read() or b""
    proc.stdin.close()
    proc.wait(timeout=10)
    assert got == b"\r 50%|#####     | 5/10"
