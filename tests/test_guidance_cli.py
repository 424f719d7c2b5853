"""`python -m experiments.guidance` as a user meets it: every output with its schema, one-line
errors with exit status 2 that write nothing, and help that states every default."""

import json
import shutil

import numpy as np
import pytest

from experiments import guidance as cmd

FAST = ["--steps", "60", "--num-samples", "200", "--bootstrap", "20", "--no-progress"]
PROG = "python -m experiments.guidance"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("guidance") / "results"
    assert cmd.main(FAST + ["--scales", "negative=1,4", "--out", str(out)]) == 0
    return out


def test_writes_every_output_with_the_documented_schema(default_run):
    for name in cmd.OUTPUTS:
        assert (default_run / name).stat().st_size > 0, name
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["removed"] == {"classes": [2], "names": ["6"], "prior_weight": 0.25}
    assert summary["target"]["classes"] == ["-8", "-4", "8"]
    np.testing.assert_allclose(summary["target"]["class_weights"], 1 / 3, atol=1e-6)
    assert "Wasserstein-1" in summary["metrics"]["distance_to_target"]
    got = [(e["method"], e["scale"]) for e in summary["results"]]
    assert got == [("dng", 1.0), ("dng_published", 1.0), ("negative", 1.0), ("negative", 4.0), ("exact", None)]
    for e in summary["results"]:
        for field in ("forbidden_fraction", "kl_to_target_bits", "distance_to_target"):
            lo, hi = e[f"{field}_ci95"]
            assert np.isfinite(e[field]) and lo <= hi
        assert set(e["class_fractions"]) == set(e["class_fractions_ci95"]) == {"-8", "-4", "8"}
        assert sum(e["class_fractions"].values()) == pytest.approx(1.0, abs=1e-5)
        assert e["distance_floor"] == summary["distance_floor"] > 0
        assert e["guidance"] and e["posterior"] and e["kernel"]
    dng = summary["results"][0]
    assert "unguided" in dng["posterior"] and "not of the guided path law" in dng["posterior"]
    assert dng["forbidden_fraction"] < 0.01 and dng["max_effective_scale"] > 0
    samples = np.load(default_run / "samples.npz")
    assert set(samples.files) == {"dng", "dng_published", "negative", "negative/4", "exact"}
    assert all(samples[k].shape == (200, 1) for k in samples.files)


def test_refuses_to_overwrite(default_run, capsys):
    before = (default_run / "summary.json").read_bytes()
    assert cmd.main(FAST + ["--out", str(default_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds results" in err and "\n" not in err
    assert (default_run / "summary.json").read_bytes() == before


def test_a_gmm_run_over_it_replaces_every_guidance_output(default_run, tmp_path, capsys):
    """gmm writes other names (no samples.npz): the manifest makes it refuse, then replace all."""
    from experiments import gmm
    from jaxdiff_info import results

    out = tmp_path / "results"
    shutil.copytree(default_run, out)
    (out / "notes.txt").write_text("mine")
    gmm_fast = ["--steps", "60", "--num-samples", "16", "--bootstrap", "10", "--no-progress", "--out", str(out)]
    assert gmm.main(gmm_fast) == 2
    assert "samples.npz" in capsys.readouterr().err
    assert gmm.main(gmm_fast + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*gmm.OUTPUTS, "notes.txt", results.MANIFEST])


def _status(argv):
    try:
        return cmd.main(argv)
    except SystemExit as e:  # argparse's errors
        return e.code


BAD = {
    "every class": (["--remove", "0,1,2,3"], "cannot remove every class"),
    "every class by name": (["--remove", "-8", "--remove=-4,6,8"], "cannot remove every class"),
    "no such index": (["--remove", "7"], "no class of that name or index"),
    "no such name": (["--remove", "name:5"], "no class of that name or index"),
    "not an index": (["--remove", "index:9"], "no class index 9"),
    "negative lam": (["--scales", "dng=-0.5"], ">= 0"),
    "negative w": (["--scales", "-1"], ">= 0"),
    "a scale for exact": (["--scales", "exact=1"], "takes no scale"),
    "unknown method": (["--methods", "dng,cfg"], "unknown method"),
    "clamp": (["--p-max", "1"], "p-max"),
    "two models": (["--spec", "s.json", "--checkpoint", "c", "--remove", "0"], "give one model"),
    "no methods": (["--methods", ""], "name at least one method"),
    "a scale that overflows": (["--methods", "dng", "--scales", "dng=1e30"], "non-finite samples from dng"),
    "steps beyond memory": (["--steps", "10000000000"], "--steps 10000000000 needs about"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    args, message = BAD[case]
    out = tmp_path / "out"
    assert _status(FAST + args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{PROG}: error:") and "\n" not in err and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_spec_needs_remove_and_a_readable_file(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"means": [1.0, 2.0, 3.0]}))
    assert _status(FAST + ["--spec", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert "--remove is required" in capsys.readouterr().err
    missing = str(tmp_path / "missing.json")
    assert _status(FAST + ["--spec", missing, "--remove", "0", "--out", str(tmp_path / "o")]) == 2
    assert "cannot read spec" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_class_tokens_are_indices_or_names_and_ambiguity_is_refused():
    names = ["1", "2", "3"]  # a 1-D mixture with means 1, 2, 3
    assert cmd.resolve_classes(["3"], names) == [2]  # no index 3: the name
    assert cmd.resolve_classes(["index:1", "name:1"], names) == [0, 1]
    assert cmd.resolve_classes(["0"], names) == [0]
    with pytest.raises(ValueError, match="ambiguous.*index:1 or name:1"):
        cmd.resolve_classes(["1"], names)
    assert cmd.resolve_classes(["-8", "2"], ["-8", "-4", "6", "8"]) == [0, 2]


def test_a_d_dimensional_spec_uses_the_energy_distance(tmp_path):
    spec = {"means": [[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]], "stds": [0.3, 0.3, 0.2], "weights": [1, 1, 2],
            "classes": [[0, 1], [2]]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "o"
    assert cmd.main(FAST + ["--spec", str(tmp_path / "spec.json"), "--remove", "1", "--methods", "dng,exact",
                            "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "energy distance" in summary["metrics"]["distance_to_target"]
    assert summary["removed"]["names"] == ["class 1"]
    assert [e["method"] for e in summary["results"]] == ["dng", "exact"]
    assert set(np.load(out / "samples.npz").files) == {"dng", "exact"}
    assert summary["results"][0]["forbidden_fraction"] < 0.05


def test_the_cli_defaults_are_the_library_s():
    """experiments/guidance.py keeps its own copy of the published variant's defaults (its module
    does not import JAX, so that --help is quick); they must be jaxdiff_info.guidance.Guidance's."""
    import dataclasses

    from jaxdiff_info.guidance import Guidance

    library = {f.name: f.default for f in dataclasses.fields(Guidance)}
    cli = {f.name: f.default for f in dataclasses.fields(cmd.Config)}
    for name in ("max_ratio", "temperature", "offset", "p_min", "p_max"):
        assert cli[name] == library[name], name
    assert cli["published_prior"] == library["prior"]
