"""benchmarks/immse_cost.py: the cost to a target standard error, from one run's error and time,
on a micro network trained here (the scaling is 1/sqrt(n), the calls K or 2 per sample and step)."""

import json

import numpy as np
import pytest

from benchmarks import immse_cost
from jaxdiff_info import training, unet

MICRO = unet.UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                        num_classes=10, image_size=8, channels=1, num_groups=4)


def test_scaling_to_the_target():
    result = {"samples_per_class": 8, "rows": {
        "online": {"max_standard_error_bits": 0.04, "network_calls": 1000, "seconds": 10.0},
        "immse": {"max_standard_error_bits": 0.02, "network_calls": 200, "seconds": 3.0}}}
    out = immse_cost.to_target(result, 0.02)
    assert out["online"]["samples_per_class"] == pytest.approx(32) and out["online"]["seconds"] == pytest.approx(40)
    assert out["immse"]["samples_per_class"] == pytest.approx(8)
    assert out["immse"]["calls_ratio_to_online"] == pytest.approx(200 / 4000)
    assert out["immse"]["seconds_ratio_to_online"] == pytest.approx(3 / 40)


@pytest.mark.slow  # trains a micro network and compiles three estimators: ~1-2 min on 2 cores
def test_runs_on_a_micro_network(tmp_path, capsys):
    directory = tmp_path / "micro-digits"
    training.train(training.TrainConfig(model="micro", unet=MICRO, dataset="digits", checkpoint_dir=directory,
                                        num_examples=64, steps=2, batch_size=8, lr=1e-3, warmup=1, save_every=2,
                                        samples_per_class=0, log_every=1), progress=False)
    out = tmp_path / "cost.json"
    assert immse_cost.main(["--checkpoint", str(directory), "--steps", "4", "--samples-per-class", "3",
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"online", "immse", "immse_model"}
    assert result["rows"]["online"]["network_calls"] == 10 * 10 * 3 * 4  # K calls x N samples x steps
    assert result["rows"]["immse"]["network_calls"] == 2 * 10 * 3 * 4
    for row in result["to_target"].values():
        assert np.isfinite(row["seconds"]) and row["network_calls"] > 0
    assert "calls/online" in capsys.readouterr().out
