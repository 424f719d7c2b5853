"""`python -m experiments.cifar10 train` as a user meets it: runs, signals, resume, refusals, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from experiments.cifar10.__main__ import main
from jaxdiff_info import training

REPO = Path(__file__).resolve().parents[1]

# The CLI in a subprocess, with a small network registered as --config micro (without dropout
# it compiles in seconds; tiny and ddpm take minutes).
CLI = textwrap.dedent("""
    import json, sys
    from jaxdiff_info import unet
    unet.CONFIGS["micro"] = unet.UNetConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(),
                                            dropout=0.0, num_classes=10, image_size=32, num_groups=4)
    from experiments.cifar10.__main__ import main
    runs = json.loads(sys.argv[1])  # one or more argument lists, run in turn
    codes = [main(args) for args in runs]
    print("exit codes", *codes)
    sys.exit(codes[-1])
""")

SMALL = ["--config", "micro", "--dataset", "shapes", "--num-examples", "40", "--batch-size", "8", "--lr", "1e-3",
         "--warmup", "2", "--log-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # one compilation cache for this module's subprocesses: each program compiles once
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAXDIFF_INFO_CACHE": str(tmp_path_factory.mktemp("xla"))}


def cli(runs):
    return [sys.executable, "-c", CLI, json.dumps([[str(a) for a in args] for args in runs])]


def run_cli(runs, env, timeout=600, cwd=REPO):
    return subprocess.run(cli(runs), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def metrics_lines(directory: Path) -> int:
    try:
        return len((directory / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, env):
    """A run told to train 100000 steps, two per compiled call, stopped by SIGTERM once past its
    first checkpoint."""
    directory = tmp_path_factory.mktemp("cli") / "run"
    args = ["train", *SMALL, "--steps", "100000", "--steps-per-call", "2", "--save-every", "2", "--keep", "2",
            "--samples-per-class", "1", "--sample-steps", "2", "--checkpoint-dir", directory]
    proc = subprocess.Popen(cli([args]), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 500
        while metrics_lines(directory) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return directory, proc.returncode, out, err


def test_sigterm_saves_a_checkpoint_and_exits_143(interrupted):
    directory, code, _, err = interrupted
    assert code == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m experiments.cifar10 train: stopped by SIGTERM at step ")
    assert "run the same command again to resume" in last
    assert "SIGTERM" not in err.replace(last, "")  # one line (a terminal shows a status line it replaces)
    step = int(last.split("at step ")[1].split(";")[0])
    assert 6 <= step < 100000 and step % 2 == 0  # a signal waits for the end of the call
    assert training.latest_step(directory) == step
    assert all(json.loads(line)["step"] <= step for line in (directory / "metrics.jsonl").read_text().splitlines())
    assert (directory / "samples" / "step_0000002.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = training.load_checkpoint(directory)
    assert model.step == step and model.config_name == "micro" and model.dataset == "shapes"


def test_same_command_resumes_and_finishes(interrupted, env, tmp_path):
    directory, _, _, _ = interrupted
    step = training.latest_step(directory)
    copy = tmp_path / "run"
    shutil.copytree(directory, copy)
    # no model, data or optimiser flags: they come from the run being resumed; the directory
    # is relative, as the CLI's default checkpoints/<config>-<dataset> is
    proc = run_cli([["train", "--checkpoint-dir", "run", "--steps", step + 2, "--no-progress"]], env,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from the checkpoint of step {step} in run" in proc.stderr
    assert f"trained micro on shapes to step {step + 2}" in proc.stdout
    grid = copy / "samples" / f"step_{step + 2:07d}.png"
    assert f"samples: {grid.relative_to(tmp_path)}" in proc.stdout and grid.is_file()
    assert training.latest_step(copy) == step + 2
    stored = json.loads((copy / "config.json").read_text())["training"]
    assert (stored["batch_size"], stored["num_examples"], stored["lr"]) == (8, 40, 1e-3)


def test_batch_size_must_divide_among_the_devices(env, tmp_path):
    eight = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    runs = [["train", *SMALL, "--batch-size", b, "--checkpoint-dir", tmp_path / f"b{b}"] for b in (12, 4)]
    proc = run_cli(runs, eight)
    assert proc.returncode == 2 and "exit codes 2 2" in proc.stdout, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"python -m experiments.cifar10 train: error: batch_size {b} is not divisible by the 8 devices; "
                     f"use a multiple of 8" for b in (12, 4)]
    assert not any(tmp_path.iterdir())


# --- bad input, in this process: every one fails before anything compiles --------------------

@pytest.mark.parametrize("args, message", [
    (["--config", "huge"], "argument --config: invalid choice: 'huge'"),
    (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
    (["--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["--lr", "-1"], "lr must be a finite number > 0"),
    (["--ema", "1"], "ema must be in [0, 1)"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
])
def test_bad_flags_exit_2_with_one_line(args, message, tmp_path, capsys):
    target = tmp_path / "run"
    try:
        code = main(["train", "--checkpoint-dir", str(target), *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert err.startswith("python -m experiments.cifar10 train: error: ")
    assert not target.exists()


def _refused(args, capsys) -> str:
    assert main(["train", "--no-progress", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("python -m experiments.cifar10 train: error: ")
    return err


def test_refuses_a_run_of_another_config_or_dataset(interrupted, capsys):
    directory = interrupted[0]
    before = snapshot(directory)
    err = _refused(["--config", "tiny", "--checkpoint-dir", directory], capsys)
    assert "holds a run of model 'micro' on shapes, not model 'tiny' on shapes" in err
    err = _refused(["--dataset", "cifar10", "--checkpoint-dir", directory], capsys)
    assert "not model 'micro' on cifar10" in err
    err = _refused(["--checkpoint-dir", directory, "--batch-size", "16"], capsys)
    assert "was trained with batch_size 8 (now 16)" in err
    assert snapshot(directory) == before


def test_refuses_missing_or_corrupted_directory_content(interrupted, tmp_path, capsys):
    directory = interrupted[0]
    step = training.latest_step(directory)

    no_config = tmp_path / "no_config"
    shutil.copytree(directory, no_config)
    (no_config / "config.json").unlink()
    before = snapshot(no_config)
    assert "holds checkpoints but no config.json" in _refused(["--checkpoint-dir", no_config], capsys)
    assert snapshot(no_config) == before

    bad_config = tmp_path / "bad_config"
    shutil.copytree(directory, bad_config)
    (bad_config / "config.json").write_text("{not json")
    before = snapshot(bad_config)
    assert "config.json is corrupted" in _refused(["--checkpoint-dir", bad_config], capsys)
    assert snapshot(bad_config) == before

    corrupt = tmp_path / "corrupt"
    shutil.copytree(directory, corrupt)
    files = [f for f in (corrupt / str(step) / "params").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(b"garbage")
    before = snapshot(corrupt)
    err = _refused(["--checkpoint-dir", corrupt, "--steps", step + 2], capsys)
    assert f"the checkpoint of step {step} in {corrupt} is corrupted or unreadable" in err
    assert snapshot(corrupt) == before

    (tmp_path / "a_file").write_text("x")
    assert "is a file" in _refused(["--checkpoint-dir", tmp_path / "a_file"], capsys)

    # its checkpoints removed: training from step 0 would append to the old metrics and grids
    removed = tmp_path / "removed"
    shutil.copytree(directory, removed)
    for folder in removed.iterdir():
        if folder.name.isdigit():
            shutil.rmtree(folder)
    before = snapshot(removed)
    err = _refused(["--checkpoint-dir", removed], capsys)
    assert f"{removed} holds a run that saved checkpoints" in err and f"remove {removed} to train from step 0" in err
    shutil.rmtree(removed / "samples")  # the metrics alone say so too
    assert "holds a run that saved checkpoints" in _refused(["--checkpoint-dir", removed], capsys)
    assert snapshot(removed) == {k: v for k, v in before.items() if not k.startswith("samples")}


def test_a_run_killed_before_its_first_checkpoint_starts_again_without_its_metrics(interrupted, tmp_path, capsys,
                                                                                 monkeypatch):
    """Its metrics lines (below the first save) are dropped: no step is logged twice."""
    from jaxdiff_info import unet

    monkeypatch.setitem(unet.CONFIGS, "micro", training.load_checkpoint(interrupted[0]).config)
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(interrupted[0] / "config.json", killed / "config.json")
    (killed / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert main(["train", "--checkpoint-dir", str(killed), "--steps", "2", "--samples-per-class", "0",
                 "--no-progress"]) == 0
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and rows[0]["loss"] != 1.0  # two steps per call, as resumed
    assert training.latest_step(killed) == 2


def test_a_checkpoint_dir_that_cannot_be_made_is_one_line(tmp_path, capsys, monkeypatch):
    from jaxdiff_info import unet

    monkeypatch.setitem(unet.CONFIGS, "micro", unet.UNetConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1,
                                                               attn_resolutions=(), dropout=0.0, num_classes=10,
                                                               image_size=32, num_groups=4))
    (tmp_path / "a_file").write_text("x")
    err = _refused([*SMALL, "--steps", "2", "--checkpoint-dir", tmp_path / "a_file" / "run"], capsys)
    assert f"cannot write checkpoints to {tmp_path / 'a_file' / 'run'}: Not a directory; choose another" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_analyze_without_its_module_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "experiments.cifar10.analyze", None)  # import fails
    assert main(["analyze", "--checkpoint", "anywhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m experiments.cifar10 analyze: error: the analysis is not available")
    assert "\n" not in err
