"""The outputs of the experiments, pinned: the same seed and settings give the same numbers as
when these were recorded (tests/pinned_outputs.json, from commit ebea39a; the Monte Carlo
half-entropy times re-pinned when they moved to the smoothed curve), so that moving code
between modules cannot change results unnoticed."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import gmm
from experiments.cifar10.__main__ import main
from jaxdiff_info import training, unet

PINNED = json.loads((Path(__file__).parent / "pinned_outputs.json").read_text())
MICRO = unet.UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0,
                        num_classes=10, image_size=32, channels=3, num_groups=4)
ATOL = 2e-5  # float32 rounding of a reordered sum; a changed computation moves these by far more


def test_gmm_summary_is_unchanged(tmp_path):
    out = tmp_path / "gmm"
    assert gmm.main(["--steps", "100", "--num-samples", "64", "--bootstrap", "20", "--no-progress",
                     "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(p["name"] for p in summary["problems"]) == sorted(PINNED["gmm"])
    for p in summary["problems"]:
        want = PINNED["gmm"][p["name"]]
        assert {est: p["peak_time"][est] for est in want["peak_time"]} == want["peak_time"]
        for est, value in want["half_time"].items():
            assert p["half_time"][est] == pytest.approx(value, abs=ATOL), (p["name"], est)
            assert p["entropy_bits"][est][49] == pytest.approx(want["H50"][est], abs=ATOL), (p["name"], est)
            assert p["entropy_rate"][est][29] == pytest.approx(want["R30"][est], abs=1e-3), (p["name"], est)
        for est in ("forward_mc", "online"):
            np.testing.assert_allclose(p["peak_time_ci95"][est], want["peak_ci"][est], atol=ATOL)
            np.testing.assert_allclose(p["half_time_ci95"][est], want["half_ci"][est], atol=ATOL)


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pin") / "micro-shapes"
    config = training.TrainConfig(model="micro", unet=MICRO, dataset="shapes", checkpoint_dir=directory,
                                  num_examples=64, steps=2, batch_size=8, lr=1e-3, warmup=1, save_every=2,
                                  samples_per_class=0, log_every=1)
    training.train(config, progress=False)
    return directory


def test_training_losses_are_unchanged(micro_checkpoint):
    lines = (micro_checkpoint / "metrics.jsonl").read_text().splitlines()
    np.testing.assert_allclose([json.loads(line)["loss"] for line in lines], PINNED["train_loss"], rtol=1e-5)


def test_analyze_summary_is_unchanged(micro_checkpoint, tmp_path):
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(micro_checkpoint), "--out", str(out), "--samples-per-class", "2",
                 "--steps", "4", "--bootstrap", "10", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for p in summary["problems"]:
        want = PINNED["analyze"][p["name"]]
        np.testing.assert_allclose(p["entropy_bits"]["online"], want["H"], atol=ATOL)
        np.testing.assert_allclose(p["entropy_rate"]["online"], want["R"], atol=1e-4)
        assert p["peak_time"]["online"] == pytest.approx(want["peak"])
    np.testing.assert_allclose([c["half_time"] for c in summary["classes"]], PINNED["analyze_classes"], atol=ATOL)
    x0 = np.load(out / "curves.npz")["x_0"]
    np.testing.assert_allclose([x0.mean(), x0[0, 0, 0, 0], x0[-1, -1, -1, -1]], PINNED["analyze_x0"], atol=1e-4)


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("clip", [True, False])
def test_training_samples_are_unchanged(variance, clip):
    params = unet.init_params(MICRO, jax.random.key(0))
    x = np.asarray(training.sample(MICRO, params, jax.random.key(1), np.array([0, 3, 9]), num_steps=5,
                                   variance=variance, clip=clip))
    got = [x.mean(), x[0, 0, 0, 0], x[1, 5, 7, 2], x[2, -1, -1, -1]]
    np.testing.assert_allclose(got, PINNED["sample"][f"{variance}_{clip}"], atol=1e-4)


def test_mixture_curves_in_16_dimensions_are_unchanged():
    """Online (path and exact-state readout) and forward Monte Carlo curves of an isotropic
    mixture in d = 16, pinned before the mixture core moved to matrix products (norms and dot
    products round differently: 1e-4 bits is far below any change of method)."""
    import jaxdiff_info as jdi
    from jaxdiff_info import mixture as M
    from jaxdiff_info import schedule as S

    want = PINNED["mixture_d16"]
    rng = np.random.default_rng(3)
    mix = M.make_mixture(rng.normal(size=(4, 16)) * 0.5 + 1.0, stds=[0.3, 0.0, 0.5, 0.2], weights=[1, 2, 1, 1])
    sch = S.linear_schedule(100)
    on = jdi.online_curves(mix, None, sch, samples_per_class=64, key=jax.random.key(0), num_resamples=20)
    fm = jdi.forward_mc_curves(mix, None, sch, samples_per_class=64, key=jax.random.key(1), num_resamples=20)
    np.testing.assert_allclose(on.entropy_bits[0, ::10], want["online_H"], atol=1e-4)
    np.testing.assert_allclose(on.exact_state.entropy_bits[0, ::10], want["state_H"], atol=1e-4)
    np.testing.assert_allclose(fm.entropy_bits[0, ::10], want["fmc_H"], atol=1e-4)
    assert float(np.asarray(on.trajectories.x_0).mean()) == pytest.approx(want["x0"], abs=1e-4)
