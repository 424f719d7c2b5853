"""scikit-learn's 8x8 digits behind the data interface, their decision problems, the --problem
parser, and the image experiment's CLI on a briefly trained digits model."""

import json

import numpy as np
import pytest

from experiments.cifar10.__main__ import main
from jaxdiff_info import decisions, training, unet
from jaxdiff_info.data import DATASETS, IMAGE_SHAPES, MIRROR_SAFE, digits, load_dataset, to_model_range

sklearn_datasets = pytest.importorskip("sklearn.datasets")
RAW = sklearn_datasets.load_digits()
NAMES = tuple(str(k) for k in range(10))


def rows(images, labels):
    """Each (label, pixels) as one sortable row, for comparing collections of images."""
    flat = np.asarray(images, np.int64).reshape(len(images), -1)
    out = np.concatenate([np.asarray(labels, np.int64)[:, None], flat], axis=1)
    return out[np.lexsort(out.T[::-1])]


@pytest.fixture(scope="module")
def splits():
    return {s: load_dataset("digits", "unused", split=s) for s in ("train", "test")}


# --- the data -----------------------------------------------------------------------------------

def test_splits_have_the_interface_of_the_other_datasets(splits):
    assert "digits" in DATASETS and IMAGE_SHAPES["digits"] == (8, 8, 1) and MIRROR_SAFE["digits"] is False
    train, test = splits["train"], splits["test"]
    assert train.images.shape == (1438, 8, 8, 1) and test.images.shape == (359, 8, 8, 1)
    for d in (train, test):
        assert d.images.dtype == np.uint8 and d.labels.dtype == np.int32
        assert d.class_names == NAMES and d.num_classes == 10
        assert d.images.min() == 0 and d.images.max() == 255
        assert set(np.unique(d.labels)) == set(range(10))


def test_pixels_are_the_17_grey_levels_scaled_to_0_255():
    assert digits.to_uint8(np.arange(17)).tolist() == [int(v * 255 / 16 + 0.5) for v in range(17)]
    assert digits.to_uint8(np.array([0, 1, 8, 15, 16])).tolist() == [0, 16, 128, 239, 255]
    with pytest.raises(ValueError, match="0..16"):
        digits.to_uint8(np.array([17.0]))


def test_the_splits_are_disjoint_and_together_every_image(splits):
    train, test = splits["train"], splits["test"]
    scaled = np.round(RAW.images * 255 / 16)  # independent of the loader's own rounding
    together = rows(np.concatenate([train.images[..., 0], test.images[..., 0]]),
                    np.concatenate([train.labels, test.labels]))
    np.testing.assert_array_equal(together, rows(scaled, RAW.target))
    idx = digits.split_indices(RAW.target, 0)
    assert not set(idx["train"]) & set(idx["test"])
    assert sorted([*idx["train"], *idx["test"]]) == list(range(1797))
    np.testing.assert_array_equal(test.images[..., 0], scaled[idx["test"]])
    np.testing.assert_array_equal(test.labels, RAW.target[idx["test"]])


def test_each_class_holds_out_a_fifth(splits):
    n = np.bincount(RAW.target, minlength=10)
    held = np.bincount(splits["test"].labels, minlength=10)
    np.testing.assert_array_equal(held, np.round(0.2 * n))
    np.testing.assert_array_equal(np.bincount(splits["train"].labels, minlength=10), n - held)
    # the split's order mixes the classes, so that num_examples keeps some of each
    assert len(set(splits["train"].labels[:60])) == 10


def test_the_seed_fixes_the_split(splits):
    again = load_dataset("digits", "unused", split="test", seed=0)
    np.testing.assert_array_equal(again.images, splits["test"].images)
    np.testing.assert_array_equal(again.labels, splits["test"].labels)
    other = digits.split_indices(RAW.target, 1)
    assert set(other["test"]) != set(digits.split_indices(RAW.target, 0)["test"])
    np.testing.assert_array_equal(np.bincount(RAW.target[other["test"]]), np.bincount(splits["test"].labels))


def test_num_examples_keeps_the_first_and_bad_arguments_are_refused(splits):
    first = load_dataset("digits", "unused", split="train", num_examples=50)
    np.testing.assert_array_equal(first.images, splits["train"].images[:50])
    with pytest.raises(ValueError, match="0..359"):
        load_dataset("digits", "unused", split="test", num_examples=360)
    with pytest.raises(ValueError, match="unknown digits split"):
        digits.load_digits("validation")


def test_model_range(splits):
    x = to_model_range(splits["test"].images)
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
    assert x[splits["test"].images == 128].min() == pytest.approx(1 / 255, abs=1e-6)


def test_decision_problems_are_valid_and_named_as_documented(splits):
    spec = splits["train"].decision_problems
    problems = decisions.make_problems(spec, 10)
    assert [p.name for p in problems[:5]] == ["1 vs 8", "5 vs 9", "8 vs 9", "3 vs 9", "0 vs 1"]
    for k in range(10):
        assert spec[f"{k} vs rest"] == [[k], [j for j in range(10) if j != k]]
    assert len(problems) == 15
    assert spec == digits.DECISION_PROBLEMS and spec is not digits.DECISION_PROBLEMS  # a copy


# --- the network for the digits -----------------------------------------------------------------

def test_a_named_config_is_sized_for_the_dataset():
    tiny = training.TrainConfig.preset("tiny", "digits")
    assert (tiny.net.image_size, tiny.net.channels) == (8, 1) and tiny.net.ch_mult == unet.CONFIGS["tiny"].ch_mult
    assert tiny.flip is False and tiny.settings()["flip"] is False
    shapes = training.TrainConfig.preset("tiny", "shapes")
    assert shapes.net == unet.CONFIGS["tiny"] and shapes.flip is True
    assert training.TrainConfig.preset("tiny", "digits", flip=True).flip is True
    assert training.TrainConfig(model="ddpm", dataset="digits").net.image_size == 8  # 8 -> 4 -> 2 -> 1


def test_a_config_that_halves_8x8_too_often_is_refused(monkeypatch):
    monkeypatch.setitem(unet.CONFIGS, "deep", unet.UNetConfig(ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
                                                              attn_resolutions=(), dropout=0.0, num_classes=10,
                                                              num_groups=4))
    with pytest.raises(ValueError, match=r"model 'deep' does not fit the digits images of \(8, 8, 1\)"):
        training.TrainConfig(model="deep", dataset="digits")


def test_one_channel_snapshots_are_drawn_in_grey():
    from jaxdiff_info import plots

    time = np.linspace(0.1, 1.0, 4)
    x0 = np.linspace(-1, 1, 2 * 64).reshape(2, 8, 8, 1)
    fig = plots.snapshot_paths_figure(time, np.log(np.full((4, 2, 10), 0.1)), np.array([3, 8]),
                                      [(4, x0, x0), (0, x0, x0)], NAMES, 1000)
    drawn = [im.get_array() for ax in fig.axes for im in ax.get_images()]
    assert len(drawn) == 4 and all(a.shape == (8, 8) for a in drawn)
    np.testing.assert_allclose(drawn[0], (x0[0, ..., 0] + 1) / 2)
    plots.plt.close(fig)


# --- decision problems as text ------------------------------------------------------------------

CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.mark.parametrize("text, names, groups", [
    ("3 vs 8=3|8", NAMES, ((3,), (8,))),
    ("odd vs even=1,3,5,7,9|0,2,4,6,8", NAMES, ((1, 3, 5, 7, 9), (0, 2, 4, 6, 8))),
    ("pets= cat , dog | bird,frog ", CIFAR, ((3, 5), (2, 6))),
    ("mixed=cat,5|0|ship", CIFAR, ((3, 5), (0,), (8,))),
])
def test_parse_problem(text, names, groups):
    problem = decisions.parse_problem(text, names)
    assert problem.groups == groups and problem.name == text.partition("=")[0].strip()


def test_parse_problem_prefers_a_class_name_to_an_index():
    assert decisions.parse_problem("x=1|0", ("1", "0", "2")).groups == ((0,), (1,))


def test_parse_problem_finds_a_named_problem():
    problem = decisions.parse_problem("1 vs 8", NAMES, digits.DECISION_PROBLEMS)
    assert problem.groups == ((1,), (8,))


@pytest.mark.parametrize("text, message", [
    ("x=3|eleven", "unknown class 'eleven'; the classes are 0, 1"),
    ("x=3|10", "unknown class '10'"),
    ("x=3|-1", "unknown class '-1'"),
    ("x=3,8|8", "names class 8 more than once"),
    ("x=3,3|8", "names class 3 more than once"),
    ("x=3,8", "at least two groups"),
    ("x=3||8", "an empty group or class"),
    ("x=3,|8", "an empty group or class"),
    ("=3|8", "needs a name"),
    ("x=3|8=9", "more than one '='"),
    ("3|8", "is not NAME=GROUP|GROUP"),
    ("7 vs 2", "the named ones are: 1 vs 8, 5 vs 9"),
])
def test_parse_problem_refuses_bad_text_in_one_line(text, message):
    with pytest.raises(ValueError, match="decision problem") as e:
        decisions.parse_problem(text, NAMES, digits.DECISION_PROBLEMS)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_choose_problems():
    from experiments.cifar10.analyze import choose_problems

    default = choose_problems((), NAMES, digits.DECISION_PROBLEMS)
    assert [p.name for p in default] == ["class", *digits.DECISION_PROBLEMS]
    chosen = choose_problems(("4 vs 9=4|9", "0 vs 1"), NAMES, digits.DECISION_PROBLEMS)
    assert [(p.name, p.groups) for p in chosen[1:]] == [("4 vs 9", ((4,), (9,))), ("0 vs 1", ((0,), (1,)))]
    for repeated in (("a=1|2", "a=3|4"), ("class=0|1",)):
        with pytest.raises(ValueError, match="must be unique"):
            choose_problems(repeated, NAMES, digits.DECISION_PROBLEMS)


# --- the CLI on a digits model --------------------------------------------------------------------

MICRO = unet.UNetConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                        num_classes=10, num_groups=4)  # 32x32x3 as registered; sized for the digits by train
ARGS = ["--samples-per-class", "2", "--steps", "4", "--bootstrap", "10", "--no-progress", "--no-immse"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`train --config micro --dataset digits` for two steps."""
    directory = tmp_path_factory.mktemp("ckpt") / "micro-digits"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(unet.CONFIGS, "micro", MICRO)
        code = main(["train", "--config", "micro", "--dataset", "digits", "--checkpoint-dir", str(directory),
                     "--num-examples", "64", "--steps", "2", "--batch-size", "8", "--lr", "1e-3", "--warmup", "1",
                     "--save-every", "2", "--samples-per-class", "0", "--no-progress"])
    assert code == 0
    return directory


def test_train_sizes_the_network_for_the_digits(checkpoint):
    info = training.read_run_info(checkpoint)
    assert (info.config.image_size, info.config.channels, info.config.ch_mult) == (8, 1, (1, 1))
    assert info.dataset == "digits" and info.training["flip"] is False and info.class_names == NAMES


def test_analyze_with_problems(checkpoint, tmp_path):
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--problem", "odd vs even=1,3,5,7,9|0,2,4,6,8",
                 "--problem", "1 vs 8"] + ARGS) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["name"], p["groups"]) for p in summary["problems"]] == [
        ("class", [[k] for k in range(10)]), ("odd vs even", [[1, 3, 5, 7, 9], [0, 2, 4, 6, 8]]),
        ("1 vs 8", [[1], [8]])]
    assert np.load(out / "curves.npz")["snapshots/x0_hat"].shape[1:] == (20, 8, 8, 1)
    assert (out / "posterior_paths.png").stat().st_size > 0


@pytest.mark.parametrize("problem, message", [
    ("3 vs 8=3|eight", "names an unknown class 'eight'"),
    ("3 vs 8=3,8|8", "names class 8 more than once"),
    ("3 vs 8=3", "needs at least two groups"),
    ("3 vs 8", "is not NAME=GROUP|GROUP"),
    ("class=3|8", "must be unique"),
])
def test_a_bad_problem_is_one_line_exit_2_and_nothing_written(checkpoint, tmp_path, capsys, monkeypatch, problem,
                                                               message):
    import jaxdiff_info.analysis

    def computed(*args, **kwargs):
        raise AssertionError("the analysis started")

    monkeypatch.setattr(jaxdiff_info.analysis, "analyze_model", computed)
    out = tmp_path / "o"
    code = main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--problem", "0 vs 1",
                 "--problem", problem] + ARGS)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err
    assert err.startswith("python -m experiments.cifar10 analyze: error: ")
    assert list(tmp_path.iterdir()) == []


# --- the exact references in the analysis CLI -----------------------------------------------------

def test_analyze_a_reference_without_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "ref"
    assert main(["analyze", "--reference", "gaussian", "--dataset", "digits", "--steps", "20",
                 "--samples-per-class", "4", "--bootstrap", "10", "--no-progress", "--out", str(out),
                 "--problem", "1 vs 8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] == "gaussian" and summary["estimators"] == ["online", "online_state", "forward_mc", "immse"]
    assert summary["posterior"]["forward_mc"] == "state (exact posterior)"
    assert "full covariances" in summary["model"] and summary["num_components"] == 10
    assert [p["name"] for p in summary["problems"]] == ["class", "1 vs 8"]
    assert np.load(out / "curves.npz")["x_0"].shape == (40, 8, 8, 1)
    assert "forward_mc" in capsys.readouterr().out


def test_compare_references_writes_the_overlay_and_the_differences(checkpoint, tmp_path):
    out = tmp_path / "cmp"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--compare-references", "--steps", "10",
                 "--samples-per-class", "2", "--bootstrap", "10", "--no-progress", "--out", str(out),
                 "--problem", "0 vs 1", "--no-immse"]) == 0
    assert (out / "references.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    refs = summary["references"]
    assert set(refs) >= {"gaussian", "empirical", "difference_method"}
    assert "64 training images" in refs["empirical"]["model"]  # the checkpoint's own training images
    for name in ("gaussian", "empirical"):
        assert [p["name"] for p in refs[name]["problems"]] == ["class", "0 vs 1"]
        assert [c["name"] for c in refs[name]["classes"]] == list(NAMES)
        for row in refs[name]["problems"] + refs[name]["classes"]:
            lo, hi = row["half_time_difference_ci95"]
            assert lo <= row["half_time_difference"] <= hi and row["max_abs_entropy_difference_bits"] >= 0
    arrays = np.load(out / "curves.npz")
    assert arrays["gaussian/online/entropy_bits"].shape == arrays["online/entropy_bits"].shape


@pytest.mark.parametrize("args, message", [
    (["--reference", "gaussian"], "--reference needs --dataset"),
    (["--dataset", "digits"], "give --checkpoint"),
    ([], "give --checkpoint"),
    (["--reference", "gaussian", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--reference", "empirical", "--dataset", "digits", "--compare-references"], "give --checkpoint"),
    (["--reference", "empirical", "--dataset", "digits", "--num-examples", "0"], "--num-examples must be >= 1"),
    (["--reference", "empirical", "--dataset", "digits", "--num-examples", "5000"], "num_examples must be in 0..1438"),
    (["--reference", "gaussian", "--dataset", "cifar10", "--data-dir", "CORRUPT"], "is corrupted"),
    (["--reference", "gaussian", "--dataset", "digits", "--problem", "3 vs 12=3|12"], "12"),
])
def test_bad_reference_options_are_one_line_exit_2_and_nothing_written(tmp_path, capsys, args, message):
    corrupt = tmp_path / "data"
    corrupt.mkdir()
    (corrupt / "cifar-10-python.tar.gz").write_bytes(b"not an archive")
    args = [str(corrupt) if a == "CORRUPT" else a for a in args]
    out = tmp_path / "o"
    code = main(["analyze", *args, "--steps", "10", "--samples-per-class", "2", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err, err
    assert not out.exists()


def test_dataset_with_a_checkpoint_is_refused(checkpoint, tmp_path, capsys):
    code = main(["analyze", "--checkpoint", str(checkpoint), "--dataset", "digits", "--steps", "10",
                 "--samples-per-class", "2", "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 2 and "--dataset is for --reference" in capsys.readouterr().err
