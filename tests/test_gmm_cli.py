"""`python -m experiments.gmm` as a user meets it: outputs, schema, and bad input."""

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import gmm

FAST = ["--steps", "100", "--num-samples", "64", "--bootstrap", "20", "--no-progress"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gmm") / "results"
    assert gmm.main(FAST + ["--out", str(out)]) == 0
    return out


def test_writes_every_output_with_the_documented_schema(default_run):
    for name in gmm.OUTPUTS:
        assert (default_run / name).stat().st_size > 0, name
    summary = json.loads((default_run / "summary.json").read_text())
    names = [p["name"] for p in summary["problems"]]
    assert names == list(gmm.PAPER_SPEC["decisions"])
    for p in summary["problems"]:
        assert p["groups"] == gmm.PAPER_SPEC["decisions"][p["name"]]
        assert len(p["time"]) == 100 and p["time"][0] == pytest.approx(0.01) and p["time"][-1] == pytest.approx(1.0)
        for field in ("entropy_bits", "entropy_rate", "peak_time", "half_time"):
            assert set(p[field]) == {"exact", "forward_mc", "online", "online_state", "immse"}
        for est in ("exact", "forward_mc", "online", "online_state", "immse"):
            assert len(p["entropy_bits"][est]) == 100 and np.all(np.isfinite(p["entropy_rate"][est]))
            assert 0 < p["peak_time"][est] <= 1
            assert 0 < p["half_time"][est] <= 1
        for est in ("forward_mc", "online", "immse"):
            lo, hi = p["peak_time_ci95"][est]
            assert lo <= hi
            lo, hi = p["half_time_ci95"][est]
            assert lo <= p["half_time"][est] <= hi
            assert np.shape(p["entropy_bits_ci95"][est]) == (2, 100)
        assert p["entropy_bits"]["online"][-1] == pytest.approx(p["prior_entropy_bits"], abs=1e-5)
    # which posterior each estimator's curves are, and how: the path effect is visible in every run
    assert summary["posterior"] == {"exact": "state (exact posterior)", "forward_mc": "state (exact posterior)",
                                    "online": "state (exact kernel)", "online_state": "state (exact posterior)",
                                    "immse": "state (exact denoisers)"}
    assert "denoisers" in summary["methods"]["immse"]
    assert "beta~_t" in summary["methods"]["online"] and "online trajectories" in summary["methods"]["online_state"]
    arrays = np.load(default_run / "curves.npz")
    assert arrays["online/entropy_bits"].shape == (8, 100)  # the layout of Curves: problem first
    assert arrays["online/class_entropy_bits"].shape == (8, 4, 100)
    assert arrays["mean_posterior"].shape == (100, 4, 4)
    np.testing.assert_allclose(arrays["mean_posterior"].sum(-1), 1.0, atol=1e-5)
    # D_k(t) = KL(p(x_t | k) || p(x_t)) per class, from I-MMSE and from the online classifier
    for est in ("immse", "online"):
        assert arrays[f"{est}/class_information_bits"].shape == (4, 100)
        assert arrays[f"{est}/class_information_bits_ci95"].shape == (4, 100, 2)
    # the I-MMSE curves agree with quadrature (to the Monte Carlo error of 64 samples per class)
    for p in summary["problems"]:
        assert np.abs(np.subtract(p["entropy_bits"]["immse"], p["entropy_bits"]["exact"])).max() < 0.15


def test_refuses_to_overwrite(default_run, capsys):
    before = (default_run / "summary.json").read_bytes()
    assert gmm.main(FAST + ["--out", str(default_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds results" in err and "--overwrite" in err and "\n" not in err
    assert (default_run / "summary.json").read_bytes() == before


def test_d_dimensional_spec_skips_quadrature(tmp_path):
    spec = {"means": [[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], "stds": [0.3, 0.3, 0.0],
            "weights": [1, 1, 2], "decisions": {"y": [[0], [1], [2]], "0 vs 1": [[0], [1]]}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert gmm.main(FAST + ["--spec", str(tmp_path / "spec.json"), "--out", str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["estimators"] == ["forward_mc", "online", "online_state", "immse"]  # no quadrature in d > 1
    assert [p["name"] for p in summary["problems"]] == ["y", "0 vs 1"]
    assert summary["problems"][0]["prior_entropy_bits"] == pytest.approx(1.5)


def test_whole_trajectories_every_nth_step(tmp_path):
    assert gmm.main(FAST + ["--save-every", "25", "--out", str(tmp_path / "o")]) == 0
    saved = np.load(tmp_path / "o" / "trajectories.npz")
    np.testing.assert_array_equal(saved["t"], [100, 75, 50, 25, 0])
    assert saved["x"].shape == (5, 4 * 64, 1) and saved["log_posterior"].shape == (5, 256, 4)
    # x_T ~ N(0, I) with the prior as posterior; x_0 on the data points
    np.testing.assert_allclose(np.exp(saved["log_posterior"][0]), 0.25, atol=1e-6)
    np.testing.assert_allclose(saved["x"][-1, :, 0], np.repeat([-8.0, -4.0, 6.0, 8.0], 64), atol=1e-2)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    online = np.load(tmp_path / "o" / "curves.npz")["x_0"]
    np.testing.assert_allclose(online, saved["x"][-1])
    assert summary["problems"][0]["entropy_bits"]["online"][-1] == pytest.approx(2.0, abs=1e-5)


def test_spec_without_decisions_gets_label_and_one_vs_rest(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps({"means": [-2, 0, 3], "stds": [0.5, 0, 0]}))
    assert gmm.main(FAST + ["--spec", str(tmp_path / "spec.json"), "--out", str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [p["name"] for p in summary["problems"]] == ["all classes", "0 vs rest", "1 vs rest", "2 vs rest"]


BAD_SPECS = [
    ({"means": [0, 1], "stds": [0, -1]}, "stds must be finite numbers >= 0"),
    ({"means": [0, 1], "stds": [0, 0], "weights": [-1, 2]}, "weights must be finite numbers >= 0"),
    ({"means": [0, 1], "stds": [0, 0], "weights": [0, 0]}, "weights must not all be zero"),
    ({"means": [-2, 0, 2], "stds": [0.5, 0.5, 0.5], "weights": [1, 0, 1]}, "class 1 has weight 0"),
    ({"means": [0, 1, 2], "stds": [0, 0]}, "stds must have one entry per component"),
    ({"means": [[0, 1], [1, 2, 3]]}, "means must be numbers"),
    ({"means": [0, 1], "decisions": {"p": [[0], [2]]}}, "names class 2, but the classes are 0..1"),
    ({"means": [0, 1, 2], "decisions": {"p": [[0, 1], [1, 2]]}}, "puts class 1 in two groups"),
    ({"means": [0, 1], "decisions": {"p": [[0, 1]]}}, "at least two groups"),
    ({"means": [0, 1], "decisions": [[0], [1]]}, "'decisions' must be an object"),
    ({"stds": [0]}, "needs 'means'"),
    ({"means": [0, 1], "colour": "red"}, "unknown keys"),
    ([1, 2], "must be a JSON object"),
    ({"means": [[0, 0], [1, 1]], "covs": [[[1, 0], [0, 1]], [[1, 2], [2, 1]]]},
     "the covariance of component 1 is not positive semi-definite"),
    ({"means": [[0, 0], [1, 1]], "covs": [[[1, 0], [0, 1]], [[1, 0.5], [0, 1]]]}, "component 1 is not symmetric"),
    ({"means": [[0, 0], [1, 1]], "covs": [[[1, 0], [0, 1]]]}, "covs must be one 2 x 2 matrix per component"),
    ({"means": [[0, 0], [1, 1]], "covs": [[1, 0], [0, 1]]}, "covs must be one 2 x 2 matrix per component"),
    ({"means": [0, 1], "stds": [0, 0], "covs": [[[1]], [[1]]]}, "both 'stds' and 'covs'"),
    ({"means": [0, 1, 2], "classes": [[0, 1], [1, 2]]}, "component 1 is in class 0 and class 1"),
    ({"means": [0, 1, 2], "classes": [[0, 1, 2], []]}, "class 1 must be a non-empty list"),
    ({"means": [0, 1, 2], "classes": [[0, 1], [5]]}, "class 1 names component 5"),
    ({"means": [0, 1, 2], "classes": [[0, 1]]}, "component 2 is in no class"),
    ({"means": [0, 1, 2], "classes": [[0, 1], [2]], "decisions": {"p": [[0], [2]]}},
     "names class 2, but the classes are 0..1"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_bad_spec_is_one_line_and_exit_2(tmp_path, capsys, spec, message):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as exc:
        code = gmm.main(FAST + ["--spec", str(path), "--out", str(tmp_path / "o")])
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "0"], "--num-samples must be >= 2"),
    (["--num-samples", "1"], "--num-samples must be >= 2"),
    (["--steps", "1"], "--steps must be >= 2"),
    (["--spec", "/nonexistent/spec.json"], "cannot read spec"),
    (["--schedule", "quadratic"], "invalid choice"),
    (["--num-samples", "many"], "invalid int value"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--bandwidth", "inf"], "argument --bandwidth: must be a finite number >= 0"),
])
def test_bad_flags(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        gmm.main(FAST + args + ["--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_malformed_json(tmp_path, capsys):
    (tmp_path / "spec.json").write_text('{"means": [0, 1],')
    with pytest.raises(SystemExit) as exc:
        gmm.main(FAST + ["--spec", str(tmp_path / "spec.json"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "not valid JSON" in capsys.readouterr().err


def test_a_spec_that_is_not_utf8_names_the_file(tmp_path, capsys):
    (tmp_path / "spec.json").write_bytes(b'\xff\xfe{"means": [0, 1]}')  # UTF-16's byte order mark
    with pytest.raises(SystemExit) as exc:
        gmm.main(FAST + ["--spec", str(tmp_path / "spec.json"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and f"spec {tmp_path / 'spec.json'} is not UTF-8 text (byte 0)" in err, err


def test_runs_as_a_module(tmp_path):
    """The README's entry point, in a fresh interpreter: exit status 2 and one line on bad input."""
    r = subprocess.run([sys.executable, "-m", "experiments.gmm", "--steps", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--steps must be >= 2" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps", "5"], "--steps must be >= 21 for the linear schedule, got 5"),
    (["--steps", "20"], "--steps must be >= 21 for the linear schedule, got 20"),
    (["--steps", "1", "--schedule", "cosine"], "--steps must be >= 2 for the cosine schedule, got 1"),
])
def test_too_few_steps_is_one_message_naming_the_schedule(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        gmm.main(FAST + args + ["--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"{gmm.PROG}: error: {message}\n"


def test_the_fewest_steps_run(tmp_path):
    assert gmm.main(FAST + ["--steps", "21", "--out", str(tmp_path / "o")]) == 0


def test_weights_of_any_scale_are_renormalised_and_said_so(tmp_path, capsys):
    for weights, said in (([1, 2, 3, 4], True), ([0.25, 0.25, 0.25, 0.25], False)):
        spec = {**gmm.PAPER_SPEC, "weights": weights}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        out = tmp_path / f"o{said}"
        assert gmm.main(FAST + ["--spec", str(tmp_path / "spec.json"), "--out", str(out)]) == 0
        printed = capsys.readouterr().out.splitlines()
        note = [line for line in printed if "renormalised" in line]
        assert note == (["weights renormalised to sum to 1: 0.1, 0.2, 0.3, 0.4"] if said else [])
        assert json.loads((out / "summary.json").read_text())["mixture"]["weights"] == pytest.approx(
            np.asarray(weights) / np.sum(weights))


def test_a_run_too_large_for_memory_is_refused_at_once(tmp_path, capsys, monkeypatch):
    import jaxdiff_info

    def computed(*args, **kwargs):
        raise AssertionError("the computation started")

    for name in ("exact_curves", "forward_mc_curves", "online_curves", "immse_curves"):
        monkeypatch.setattr(jaxdiff_info, name, computed)
    start = time.perf_counter()
    assert gmm.main(FAST + ["--num-samples", "1000000000", "--out", str(tmp_path / "o")]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    found = re.fullmatch(rf"{re.escape(gmm.PROG)}: error: --num-samples 1000000000 needs about ([\d.]+) GB of memory, "
                         r"([\d.]+) GB are available; use --num-samples (\d+) or less\n", err)
    assert found, err
    need, available, largest = float(found[1]), float(found[2]), int(found[3])
    assert need > available and 1 <= largest < 1_000_000_000
    assert not (tmp_path / "o").exists()

    from experiments import cli

    monkeypatch.setattr(cli, "available_memory", lambda: (20 * 10**9, ""))
    config = gmm.Config(spec=gmm.PAPER_SPEC, steps=100)
    gmm.check_memory(config)  # the default run fits
    with pytest.raises(ValueError, match=r"20 GB are available; use --num-samples (\d+) or less") as refused:
        gmm.check_memory(dataclasses.replace(config, num_samples=10**9))
    largest = int(re.search(r"use --num-samples (\d+)", str(refused.value))[1])
    gmm.check_memory(dataclasses.replace(config, num_samples=largest))  # the suggestion fits, exactly
    with pytest.raises(ValueError, match="needs about"):
        gmm.check_memory(dataclasses.replace(config, num_samples=largest + 1))
    # the steps: the T x T rate and smoothing operators (float64) grow as T^2
    with pytest.raises(ValueError, match=r"--steps 1000000000 needs about [\d.]+ GB of memory, 20 GB are available; "
                                         r"use --steps (\d+) or less") as refused:
        gmm.check_memory(dataclasses.replace(config, steps=10**9))
    largest = int(re.search(r"use --steps (\d+)", str(refused.value))[1])
    assert 5_000 < largest < 50_000
    gmm.check_memory(dataclasses.replace(config, steps=largest, num_samples=2))
    assert gmm.bytes_needed(4, 1, 3, 2, 8000) > 64 * 8000**2  # measured: 3.9 GB peak at T = 8000


def test_steps_beyond_memory_are_refused_before_the_schedule_is_built(tmp_path, capsys):
    """--steps 1e11 was a numpy MemoryError traceback (the schedule's arrays), 1e9 killed."""
    assert gmm.main(["--steps", str(10**11), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"{re.escape(gmm.PROG)}: error: --steps 100000000000 needs about [\d.]+ GB of memory, "
                        r"[\d.]+ GB are available; use --steps \d+ or less", err), err
    assert not (tmp_path / "o").exists()


def test_readme_states_weights_and_save_every():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    spec = next(line for line in readme.split("\n- ") if line.startswith("`--spec`"))
    assert "renormalised to sum to 1" in spec
    save = next(line for line in readme.split("\n- ") if line.startswith("`--save-every N`"))
    assert "default 0: off" in save


def test_full_covariances_and_classes_of_components_run(tmp_path):
    """A spec with covs and classes: the summary echoes them, the curves are over classes."""
    spec = {"means": [[-2, 0], [2, 1], [0, 3], [1, -2]],
            "covs": [[[1, 0.5], [0.5, 1]], [[0.3, 0], [0, 0.1]], [[0, 0], [0, 0]], [[0.2, -0.1], [-0.1, 0.4]]],
            "weights": [1, 2, 1, 1], "classes": [[0, 2], [1, 3]]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert gmm.main(FAST + ["--spec", str(path), "--out", str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["mixture"]["covs"] == spec["covs"] and summary["mixture"]["classes"] == spec["classes"]
    np.testing.assert_allclose(summary["mixture"]["class_weights"], [0.4, 0.6], rtol=1e-6)
    assert [p["name"] for p in summary["problems"]] == ["all classes"]  # two classes: no one-vs-rest
    assert summary["posterior"]["online"] == "state (DDPM approximation)"
    p = summary["problems"][0]
    gap = np.abs(np.subtract(p["entropy_bits"]["online"], p["entropy_bits"]["forward_mc"])).max()
    assert gap < 0.15 and p["entropy_bits"]["online"][-1] == pytest.approx(p["prior_entropy_bits"], abs=1e-5)
    # I-MMSE with the denoisers of classes made of full-covariance components
    assert np.abs(np.subtract(p["entropy_bits"]["immse"], p["entropy_bits"]["forward_mc"])).max() < 0.15


@pytest.mark.parametrize("after", [0.3, 1.2])
def test_ctrl_c_while_starting_is_one_line_and_nothing_written(tmp_path, after):
    """SIGINT while Python still imports JAX (before the command's own handler): it used to be a
    traceback, or a KeyboardInterrupt that a finaliser swallowed, after which the run went on
    and wrote everything with exit status 0."""
    import signal

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.gmm", "--out", str(out), "--no-progress"] + FAST,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(gmm.__file__).parents[1])
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-1000:]
    assert stderr.strip().splitlines() == ["python -m experiments.gmm: interrupted; nothing was written"]
    assert not out.exists() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("flag, value, message", [
    ("--bootstrap", "1000000000000", "must be from 2"), ("--bootstrap", "1", "must be from 2"),
    ("--out", "", "must name a folder")])
def test_flags_out_of_range_are_one_line(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        gmm.parse_args([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
