"""`python -m experiments.guidance --checkpoint` and `... decisions --checkpoint` on a micro
digits model trained for two steps in a fixture: every output, the judged metrics with their
intervals and floors, and a checkpoint without a null class refused with one line, exit 2."""

import json

import numpy as np
import pytest

from experiments import guidance as cmd
from experiments import guidance_decisions as dec
from experiments import guidance_images as images
from jaxdiff_info import removal, training, unet

MICRO = unet.UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                        num_classes=10, image_size=8, channels=1, num_groups=4)
FAST = ["--steps", "4", "--num-samples", "16", "--bootstrap", "10", "--no-progress"]


def _train(directory, label_dropout=0.1):
    config = training.TrainConfig(model="micro", unet=MICRO, dataset="digits", checkpoint_dir=directory,
                                  num_examples=64, steps=2, batch_size=8, lr=1e-3, warmup=1, save_every=2,
                                  samples_per_class=0, log_every=1, label_dropout=label_dropout)
    training.train(config, progress=False)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ckpt") / "micro-digits")


@pytest.fixture(scope="module")
def removal_run(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("guidance") / "results"
    assert cmd.main(["--checkpoint", str(checkpoint), "--remove", "1", "--scales", "negative=1,4", "--out", str(out)]
                    + FAST) == 0
    return out


def test_writes_every_output_with_the_judged_metrics(removal_run):
    for name in images.OUTPUTS:
        assert (removal_run / name).stat().st_size > 0, name
    assert not (removal_run / "density.png").exists()
    s = json.loads((removal_run / "summary.json").read_text())
    assert s["removed"]["names"] == ["1"] and s["target"]["classes"] == [str(k) for k in range(10) if k != 1]
    assert sum(s["target"]["class_weights"]) == pytest.approx(1.0, abs=1e-5)
    assert 0.85 < s["judge"]["held_out_accuracy"] <= 1.0  # logistic regression on the digits: about 0.96
    assert s["judge"]["num_train"] == 1438 and s["judge"]["num_test"] == 359
    assert "LogisticRegression" in s["metrics"]["judge"] and "not FID" in s["metrics"]["frechet_distance_judge_logits"]
    got = [(e["method"], e["scale"]) for e in s["results"]]
    assert got == [("unguided", None), ("dng", 1.0), ("dng_published", 1.0), ("negative", 1.0), ("negative", 4.0),
                   ("held_out", None)]
    floor = s["held_out"]["floor"]
    assert set(floor) == {"judge_logits", "pixels"} and all(f["distance"] > 0 for f in floor.values())
    for e in s["results"]:
        for field in ("forbidden_fraction", "kl_to_target_bits", "frechet_distance_judge_logits",
                      "frechet_distance_pixels"):
            lo, hi = e[f"{field}_ci95"]
            assert np.isfinite(e[field]) and lo <= hi, (e["method"], field)
        assert 0.0 <= e["forbidden_fraction"] <= 1.0
        if e["method"] != "held_out":
            assert "not of the guided path law" in e["posterior"]
            assert np.isfinite(e["frechet_distance_pixels_matched"])
    held = s["results"][-1]
    assert held["frechet_distance_pixels"] == floor["pixels"]["distance"]
    assert held["forbidden_fraction"] < 0.1  # the judge's own errors on held-out images of the rest
    samples = np.load(removal_run / "samples.npz")
    assert set(samples.files) == {"unguided", "dng", "dng_published", "negative", "negative/4"}
    assert samples["dng"].shape == (16, 8, 8, 1)


def test_a_checkpoint_without_a_null_class_is_refused(tmp_path, capsys):
    directory = _train(tmp_path / "no-null", label_dropout=0.0)
    for argv, prog in ((["--checkpoint", str(directory), "--remove", "1"] + FAST, cmd.PROG),
                       (["decisions", "--checkpoint", str(directory), "--steps", "4", "--samples-per-class", "2",
                         "--no-progress"], dec.PROG)):
        out = tmp_path / "out"
        assert cmd.main(argv + ["--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"{prog}: error:") and "no null class" in err and "\n" not in err, err
        assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--remove", "1", "--methods", "dng,exact"], "no exact p(x | not C)"),
    ([], "--remove is required with --checkpoint"),
    (["--remove", "1", "--steps", "2000"], "only 1000"),
    (["--remove", "0,1,2,3,4,5,6,7,8,9"], "cannot remove every class"),
])
def test_bad_input_is_one_line_exit_2(checkpoint, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    try:
        code = cmd.main(["--checkpoint", str(checkpoint), "--out", str(out)] + FAST + args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err, err
    assert not out.exists()


def test_decisions_on_a_network(checkpoint, tmp_path):
    out = tmp_path / "decisions"
    assert cmd.main(["decisions", "--checkpoint", str(checkpoint), "--weights", "0,2", "--steps", "4",
                     "--samples-per-class", "2", "--bootstrap", "10", "--no-progress", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["class_label"] == "class" and s["model"]["dataset"] == "digits"
    assert [e["posterior"] for e in s["results"]] == ["state (DDPM approximation)", "path"]
    assert len(s["results"][1]["classes"]) == 10 and "class_label_shift_vs_unguided" in s["results"][1]
    assert (out / "decisions.png").stat().st_size > 0


def test_decisions_beyond_memory_on_a_network_is_one_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "decisions"
    assert cmd.main(["decisions", "--checkpoint", str(checkpoint), "--steps", "4", "--samples-per-class",
                     str(10**11), "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{dec.PROG}: error: --samples-per-class 100000000000 needs about") and "\n" not in err, err
    assert "use --samples-per-class" in err and not out.exists()


def test_frechet_distance_matches_its_closed_form():
    """Two Gaussians with diagonal covariances: |m_a - m_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3)) * [1.0, 2.0, 0.5]
    b = rng.normal(size=(20000, 3)) * [0.5, 1.0, 1.0] + [1.0, 0.0, 0.0]
    exact = 1.0 + (1.0 - 0.5) ** 2 + (2.0 - 1.0) ** 2 + (0.5 - 1.0) ** 2
    assert float(removal.frechet_distance(a, b)) == pytest.approx(exact, abs=0.05)
    same = removal.frechet_distance(a, a, np.full((1, len(a)), 1.0 / len(a)))
    assert abs(float(same[0])) < 1e-6
