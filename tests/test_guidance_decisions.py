"""`python -m experiments.guidance decisions`: classifier-free guidance moves the decisions.
On the paper's four points, w = 0 is online_curves without guidance (same seed, same numbers),
w > 0 is labelled a path posterior, and guidance moves the class label's half-entropy time
toward t = T by the amount measured (0.238, 0.242, 0.243 for seeds 0, 1, 2 at these settings,
95% intervals about +-0.006)."""

import json

import jax
import numpy as np
import pytest

from experiments import guidance as cmd
from experiments import guidance_decisions as dec

FAST = ["--steps", "100", "--samples-per-class", "64", "--bootstrap", "50", "--no-progress"]


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decisions") / "results"
    assert cmd.main(["decisions", "--weights", "0,4"] + FAST + ["--out", str(out)]) == 0
    return out


def test_writes_every_output(mixture_run):
    for name in dec.OUTPUTS:
        assert (mixture_run / name).stat().st_size > 0, name
    summary = json.loads((mixture_run / "summary.json").read_text())
    assert summary["weights"] == [0.0, 4.0] and summary["class_label"] == "all four"
    assert [e["guidance"] for e in summary["results"]] == [0.0, 4.0]
    for e in summary["results"]:
        assert [c["name"] for c in e["classes"]] == ["-8", "-4", "6", "8"]
        for entry in e["problems"] + e["classes"]:
            for field in ("peak_time", "half_time"):
                lo, hi = entry[f"{field}_ci95"]
                assert lo <= entry[field] <= hi, (entry["name"], field)
    assert "guided path law" in summary["posterior_note"]
    arrays = np.load(mixture_run / "curves.npz")
    assert arrays["w=4/per_class/entropy_bits"].shape == (4, 100)
    assert arrays["w=0/entropy_bits"].shape[1] == 100


def test_w_0_is_online_curves_without_guidance(mixture_run):
    import jaxdiff_info as jdi
    from experiments.gmm import PAPER_SPEC, build_problem

    mix, problems = build_problem(PAPER_SPEC)
    plain = jdi.online_curves(mix, problems, jdi.linear_schedule(100), samples_per_class=64, key=jax.random.key(0),
                              num_resamples=50)
    arrays = np.load(mixture_run / "curves.npz")
    np.testing.assert_array_equal(arrays["w=0/entropy_bits"], plain.entropy_bits)
    np.testing.assert_array_equal(arrays["w=0/half_time_ci95"], plain.half_time_ci95)
    summary = json.loads((mixture_run / "summary.json").read_text())
    label = summary["results"][0]["problems"][0]
    assert label["half_time"] == pytest.approx(float(plain.half_time[0]), abs=1e-6)
    assert summary["results"][0]["posterior"] == plain.posterior == "state (exact kernel)"


def test_guidance_is_a_path_posterior_and_moves_the_half_time_toward_T(mixture_run):
    summary = json.loads((mixture_run / "summary.json").read_text())
    w0, w4 = summary["results"]
    assert w4["posterior"] == "path" and "guidance w = 4" in w4["method"]
    a, b = w0["problems"][0], w4["problems"][0]
    shift = b["half_time"] - a["half_time"]
    assert 0.20 < shift < 0.28  # measured 0.238-0.243
    assert w4["class_label_shift_vs_unguided"]["half_time"] == pytest.approx(shift, abs=1e-5)
    assert b["half_time_ci95"][0] > a["half_time_ci95"][1] + 0.2
    for c0, c4 in zip(w0["classes"], w4["classes"]):  # every class decides earlier in generation
        assert c4["half_time_ci95"][0] > c0["half_time_ci95"][1], c0["name"]


@pytest.mark.parametrize("args, message", [
    (["--weights", "0,-1"], ">= 0"),
    (["--weights", "0,0"], "repeated"),
    (["--weights", "a"], "not a comma list"),
    (["--samples-per-class", "1"], "--samples-per-class must be >= 2"),
    (["--steps", "10"], "--steps must be >= 21"),
    (["--spec", "s.json", "--checkpoint", "c"], "give one model"),
    (["--weights", "0,1e30"], "not finite"),  # the guided eps overflows float32
    (["--steps", "10000000000"], "--steps 10000000000 needs about"),  # the T x T rate operator
    (["--samples-per-class", "100000000000"], "--samples-per-class 100000000000 needs about"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        code = cmd.main(["decisions"] + FAST + args + ["--out", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"{dec.PROG}: error:") and "\n" not in err and message in err, err
    assert not out.exists()
