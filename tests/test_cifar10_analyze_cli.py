"""`python -m experiments.cifar10 analyze` as a user meets it, on a briefly trained tiny model."""

import json
import shutil

import numpy as np
import pytest

from experiments.cifar10.__main__ import main
from jaxdiff_info import training, unet

MICRO = unet.UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0,
                        num_classes=10, image_size=32, channels=3, num_groups=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "micro-shapes"
    config = training.TrainConfig(model="micro", unet=MICRO, dataset="shapes", checkpoint_dir=directory,
                                  num_examples=64, steps=2, batch_size=8, lr=1e-3, warmup=1, save_every=2,
                                  samples_per_class=0, log_every=1)
    training.train(config, progress=False)
    return directory


ARGS = ["--samples-per-class", "2", "--steps", "4", "--bootstrap", "10", "--no-progress"]


def test_writes_every_output(checkpoint, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out)] + ARGS) == 0
    from experiments.cifar10.analyze import OUTPUTS
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert [p["name"] for p in summary["problems"]] == ["class", "coarse", "fine"]
    assert summary["problems"][1]["groups"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert len(summary["classes"]) == 10 and summary["classes"][0]["name"] == "warm-disk"
    assert summary["schedule"] == {"steps": 4, "train_steps": 1000} and summary["weights"] == "ema"
    assert "x_0 prediction clipped to +-1" in summary["sampler"]  # Ho et al.'s clip, on by default
    for p in summary["problems"]:
        assert len(p["time"]) == 4 and np.all(np.isfinite(p["entropy_rate"]["online"]))
        assert p["entropy_bits"]["online"][-1] == pytest.approx(p["prior_entropy_bits"], abs=1e-4)
    arrays = np.load(out / "curves.npz")
    assert arrays["mean_posterior"].shape == (4, 10, 10)
    assert arrays["snapshots/x0_hat"].shape[1:] == (20, 32, 32, 3)
    printed = capsys.readouterr().out
    for problem in summary["problems"]:  # one line each; "never halves" rather than a time of 0
        line = next(line for line in printed.splitlines() if line.strip().startswith(problem["name"] + " "))
        assert "peak t/T" in line
        if problem["half_time"]["online"] == 0:
            assert "H never halves" in line and "resolved at" not in line
        else:
            assert "half of H resolved at t/T" in line


def _run_expect_2(args, capsys):
    try:
        code = main(["analyze"] + args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("extra, message", [
    (["--samples-per-class", "1"], "--samples-per-class must be >= 2"),
    (["--steps", "2000"], "only 1000"),
    (["--steps", "1"], "--steps must be >= 2"),
])
def test_bad_settings(checkpoint, tmp_path, capsys, extra, message):
    code, err = _run_expect_2(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")] + ARGS + extra, capsys)
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_missing_checkpoint(tmp_path, capsys):
    code, err = _run_expect_2(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")] + ARGS, capsys)
    assert code == 2 and "does not exist" in err and "\n" not in err


def test_checkpoint_of_another_config(checkpoint, tmp_path, capsys):
    """config.json naming a network the weights do not fit: a clear error, nothing written."""
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    info = json.loads((other / "config.json").read_text())
    info["model"]["unet"]["ch"] = 16
    (other / "config.json").write_text(json.dumps(info))
    code, err = _run_expect_2(["--checkpoint", str(other), "--out", str(tmp_path / "o")] + ARGS, capsys)
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not (tmp_path / "o" / "summary.json").exists()


def test_refuses_to_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    code, err = _run_expect_2(["--checkpoint", str(checkpoint), "--out", str(out)] + ARGS, capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "summary.json").read_text() == "{}"


def test_no_clip_turns_the_clip_off(checkpoint, tmp_path):
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--no-clip"] + ARGS) == 0
    assert "clipped" not in json.loads((out / "summary.json").read_text())["sampler"]
