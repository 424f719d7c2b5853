"""`python -m experiments.cifar10 analyze` as a user meets it, on a briefly trained tiny model."""

import json
import re
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


IMMSE_ARGS = ["--samples-per-class", "2", "--steps", "4", "--bootstrap", "10", "--no-progress"]
ARGS = IMMSE_ARGS + ["--no-immse"]  # I-MMSE (two more compiled runs) only in the tests about it


def test_writes_every_output(checkpoint, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out)] + IMMSE_ARGS) == 0
    from experiments.cifar10.analyze import IMMSE_OUTPUTS, OUTPUTS
    for name in OUTPUTS + IMMSE_OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert [p["name"] for p in summary["problems"]] == ["class", "coarse", "fine"]
    assert summary["problems"][1]["groups"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert len(summary["classes"]) == 10 and summary["classes"][0]["name"] == "warm-disk"
    assert summary["schedule"] == {"steps": 4, "train_steps": 1000} and summary["weights"] == "ema"
    assert "x_0 prediction clipped to +-1" in summary["sampler"]  # Ho et al.'s clip, on by default
    assert summary["posterior"] == {"online": "state (DDPM approximation)", "immse": "state (network denoisers)",
                                    "immse_model": "state (network denoisers)"}  # of every estimator
    assert "sigma_t^2 = beta_t" in summary["posterior_note"] and "state posterior" in summary["posterior_note"]
    for p in summary["problems"]:
        assert len(p["time"]) == 4 and np.all(np.isfinite(p["entropy_rate"]["online"]))
        assert p["entropy_bits"]["online"][-1] == pytest.approx(p["prior_entropy_bits"], abs=1e-4)
    arrays = np.load(out / "curves.npz")
    assert arrays["mean_posterior"].shape == (4, 10, 10)
    assert arrays["snapshots/x0_hat"].shape[1:] == (20, 32, 32, 3)
    # I-MMSE beside the online curves, of the class label only, from held-out images and from the samples
    assert summary["estimators"] == ["online", "immse", "immse_model"]
    assert set(summary["problems"][0]["peak_time"]) == {"online", "immse", "immse_model"}
    assert set(summary["problems"][1]["peak_time"]) == {"online"}
    assert "held-out shapes test split" in summary["methods"]["immse"] and "2 per class" in summary["methods"]["immse"]
    assert "own samples" in summary["methods"]["immse_model"]
    for source in ("data", "model_samples"):
        entry = summary["immse"][source]
        assert entry["posterior"] == "state (network denoisers)"
        assert entry["class_label"]["name"] == "class" and len(entry["class_label"]["half_time_difference_ci95"]) == 2
        assert len(entry["classes"]) == 10 and np.isfinite(entry["classes"][3]["max_abs_information_difference_bits"])
        assert entry["classes"][3]["bound_bits"] == pytest.approx(np.log2(10))  # D_k <= -log2 pi_k when consistent
        assert "immse_above_bound_until_time" in entry["classes"][3]
        assert "immse_entropy_below_zero_until_time" in entry["class_label"]
    assert "bound_bits" in summary["immse"]["consistency"]
    assert arrays["immse/entropy_bits"].shape == (1, 4) and arrays["immse_model/class_information_bits"].shape == (10, 4)
    assert np.all(np.isfinite(arrays["online/class_information_bits"]))
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    for problem in summary["problems"]:  # one line per estimator; "never halves" rather than a time of 0
        at = next(i for i, line in enumerate(lines) if line.strip().split("  ")[0] == problem["name"])
        line = lines[at] if len(problem["peak_time"]) == 1 else lines[at + 1]
        assert "peak t/T" in line
        if problem["half_time"]["online"] == 0:
            assert "H never halves" in line and "resolved at" not in line
        else:
            assert "half of H resolved at t/T" in line


def test_a_model_without_null_class_needs_no_immse(tmp_path, capsys):
    directory = tmp_path / "no-null"
    config = training.TrainConfig(model="micro", unet=MICRO, dataset="shapes", checkpoint_dir=directory,
                                  num_examples=16, steps=1, batch_size=8, lr=1e-3, warmup=1, save_every=1,
                                  samples_per_class=0, log_every=1, label_dropout=0.0)
    training.train(config, progress=False)
    code, err = _run_expect_2(["--checkpoint", str(directory), "--out", str(tmp_path / "o")] + IMMSE_ARGS, capsys)
    assert code == 2 and "no null class" in err and "--no-immse" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
    code, err = _run_expect_2(["--checkpoint", str(directory), "--out", str(tmp_path / "o"), "--guidance", "1"] + ARGS,
                              capsys)
    assert code == 2 and "no null class" in err and "classifier-free guidance" in err


def test_no_immse(checkpoint, tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out)] + ARGS) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimators"] == ["online"] and "immse" not in summary
    assert not (out / "class_information.png").exists()
    # --bf16: the same run with the network's layers in bfloat16, said in the summary, close to float32
    assert summary["network_compute_dtype"] == "float32"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "bf16"), "--bf16"] + ARGS) == 0
    low = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert low["network_compute_dtype"].startswith("bfloat16")
    h32, h16 = (np.array([p["entropy_bits"]["online"] for p in s["problems"]]) for s in (summary, low))
    assert 0 < np.abs(h16 - h32).max() < 0.1, np.abs(h16 - h32).max()
    code, err = _run_expect_2(["--reference", "gaussian", "--dataset", "digits", "--bf16", "--out",
                               str(tmp_path / "r")] + ARGS, capsys)
    assert code == 2 and "--bf16 sets the precision of a network: give --checkpoint" in err


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
    (["--immse-samples-per-class", "4"], "drop it or --no-immse"),
    (["--guidance", "nan"], "finite number >= 0"),
    (["--guidance", "-1"], "finite number >= 0"),
    (["--bootstrap", "1"], "must be from 2"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["--bandwidth", "-1"], "argument --bandwidth: must be a finite number >= 0"),
])
def test_bad_settings(checkpoint, tmp_path, capsys, extra, message):
    """(with --no-immse: I-MMSE's own settings are in test_bad_immse_settings)"""
    code, err = _run_expect_2(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")] + ARGS + extra, capsys)
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--immse-samples-per-class", "1"], "--immse-samples-per-class must be >= 2"),
    (["--immse-samples-per-class", "1001"], "more than the 1000 held-out images of the smallest class"),
])
def test_bad_immse_settings(checkpoint, tmp_path, capsys, extra, message):
    code, err = _run_expect_2(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")] + IMMSE_ARGS + extra,
                              capsys)
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint(tmp_path, capsys):
    code, err = _run_expect_2(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")] + ARGS, capsys)
    assert code == 2 and "does not exist" in err and "\n" not in err
    (tmp_path / "a_file").write_text("x")
    code, err = _run_expect_2(["--checkpoint", str(tmp_path / "a_file"), "--out", str(tmp_path / "o")] + ARGS, capsys)
    assert code == 2 and "a_file is a file, not a training directory" in err and "\n" not in err


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


@pytest.mark.parametrize("extra, message", [
    (["--steps", "2000"], "--steps must be >= 2 and <= 1000 (the model's schedule has only 1000 steps), got 2000"),
    (["--steps", "1"], "--steps must be >= 2 and <= 1000 (the model's schedule has only 1000 steps), got 1"),
])
def test_steps_out_of_range_is_one_message(checkpoint, tmp_path, capsys, extra, message):
    code, err = _run_expect_2(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")] + ARGS + extra, capsys)
    assert (code, err) == (2, f"python -m experiments.cifar10 analyze: error: {message}")
    assert not (tmp_path / "o").exists()


@pytest.fixture
def earlier(checkpoint, tmp_path_factory):
    """An --out holding a complete analysis and a file of the user's."""
    out = tmp_path_factory.mktemp("earlier") / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out)] + ARGS) == 0
    (out / "notes.txt").write_text("mine")
    return out


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failing_figure_leaves_the_earlier_analysis_as_it_was(checkpoint, earlier, monkeypatch):
    from jaxdiff_info import plots

    before = _files(earlier)

    def broken(*args, **kwargs):
        raise RuntimeError("the heatmap failed")

    monkeypatch.setattr(plots, "posterior_heatmap_figure", broken)
    with pytest.raises(RuntimeError, match="heatmap"):
        main(["analyze", "--checkpoint", str(checkpoint), "--out", str(earlier), "--overwrite", "--seed", "1"] + ARGS)
    assert _files(earlier) == before
    assert [p.name for p in earlier.parent.iterdir()] == ["analysis"]


def test_an_out_that_cannot_be_written_fails_before_the_analysis(checkpoint, tmp_path, capsys, monkeypatch):
    import jaxdiff_info.analysis

    def computed(*args, **kwargs):
        raise AssertionError("the analysis started")

    monkeypatch.setattr(jaxdiff_info.analysis, "analyze_model", computed)
    (tmp_path / "file").write_text("a file")
    code, err = _run_expect_2(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "file" / "o")] + ARGS, capsys)
    assert (code, err) == (2, f"python -m experiments.cifar10 analyze: error: cannot write results to "
                              f"{tmp_path / 'file' / 'o'}: Not a directory; choose another --out")


def test_an_analysis_too_large_for_memory_is_refused_with_what_to_lower(checkpoint, tmp_path, capsys, monkeypatch):
    import jaxdiff_info.analysis
    from experiments import cli

    def computed(*args, **kwargs):
        raise AssertionError("the analysis started")

    monkeypatch.setattr(jaxdiff_info.analysis, "analyze_model", computed)
    monkeypatch.setattr(cli, "available_memory", lambda: (2 * 10**9, ""))
    args = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), "--samples-per-class", "100", "--steps", "4",
            "--no-progress"]
    code, err = _run_expect_2(args, capsys)
    found = re.fullmatch(r"python -m experiments.cifar10 analyze: error: --samples-per-class 100 needs about "
                         r"([\d.]+) GB of memory, 2.0 GB are available; use --samples-per-class (\d+) or less, "
                         r"or --batch-size (\d+)", err)
    assert code == 2 and found, err
    assert float(found[1]) > 2 and 2 <= int(found[2]) < 100 and int(found[3]) >= 1
    assert not (tmp_path / "o").exists()
    for fits in (["--samples-per-class", found[2]], ["--batch-size", found[3]]):
        with pytest.raises(AssertionError, match="the analysis started"):  # past the check
            main(["analyze"] + args + fits)


def test_ctrl_c_during_an_analysis(checkpoint, tmp_path):
    from test_outputs import interrupt_when_staged

    out = tmp_path / "analysis"
    args = ["experiments.cifar10", "analyze", "--checkpoint", str(checkpoint), "--samples-per-class", "2",
            "--bootstrap", "10", "--no-progress", "--out", str(out)]
    code, err = interrupt_when_staged(args, out, after=2.0)
    assert (code, err) == (130, "python -m experiments.cifar10 analyze: interrupted; nothing was written\n")
    assert list(tmp_path.iterdir()) == []


def test_unconditional_generation_with_guidance_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "analysis"
    status = main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--generation", "unconditional",
                   "--guidance", "1.5"] + ARGS)
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and "unconditional generation with guidance" in err
    assert not out.exists()


def test_the_immse_line_says_why_h_falls_below_0(capsys):
    """A network's I-MMSE below 0 bits is its denoisers' inconsistency; an exact reference's is
    Monte Carlo noise."""
    from experiments.cifar10.outputs import print_immse

    row = {"half_time_difference_ci95": [-0.02, 0.0], "immse_entropy_below_zero_until_time": 0.12,
           "max_abs_entropy_difference_bits": 0.19, "max_abs_entropy_difference_time": 0.12,
           "half_time_difference": -0.009}
    entry = {"estimator": "immse", "class_label": row}
    print_immse({"immse": {"immse": entry}})
    print_immse({"reference": "gaussian", "immse": {"immse": entry}})
    network, reference = capsys.readouterr().out.strip().splitlines()
    assert network.endswith("I-MMSE H < 0 (inconsistent denoisers) below t/T 0.12"), network
    assert reference.endswith("I-MMSE H < 0 (Monte Carlo noise: exact denoisers) below t/T 0.12"), reference
