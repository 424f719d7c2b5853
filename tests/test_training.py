"""Tests of jaxdiff_info.training: the objective, the step, exact resume, devices, checkpoints."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff_info import mixture, tracking, training, unet
from jaxdiff_info.data import load_dataset, shapes
from jaxdiff_info.schedule import Sampler, linear_schedule, respace, reverse_step

REPO = Path(__file__).resolve().parents[1]

# A small network that takes the 32x32 images of the datasets and compiles in seconds: two
# resolutions (the middle block's attention at 16x16 stays cheap), no other attention.
MICRO_SOURCE = ("unet.UNetConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), dropout=0.1, "
                "num_classes=10, image_size=32, num_groups=4)")
MICRO = eval(MICRO_SOURCE)


def micro_config(directory, **overrides) -> training.TrainConfig:
    """Every run here: 40 images, batches of 8, a checkpoint every 2 steps, no sample grids."""
    settings = dict(model="micro", unet=MICRO, dataset="shapes", checkpoint_dir=directory, steps=6,
                    batch_size=8, num_examples=40, lr=1e-3, warmup=2, save_every=2, keep=2, log_every=1,
                    samples_per_class=0)
    return training.TrainConfig(**{**settings, **overrides})


def leaves(state) -> list[np.ndarray]:
    """Every array of a TrainState (the key as its raw data, last), on the host."""
    state = state.__class__(state.step, state.params, state.ema_params, state.opt_state,
                            jax.random.key_data(state.rng))
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# The 8-device run goes in a subprocess, started when this module's tests begin, so that it
# compiles while the tests in this process run.
EIGHT_DEVICES = textwrap.dedent(f"""
    import sys
    import jax
    from jaxdiff_info import training, unet
    assert jax.device_count() == 8, jax.devices()
    config = training.TrainConfig(model="micro", unet={MICRO_SOURCE}, dataset="shapes",
                                  checkpoint_dir=sys.argv[1], steps=4, batch_size=8, num_examples=40, lr=1e-3,
                                  warmup=2, save_every=2, keep=2, log_every=1, samples_per_class=0)
    state = training.train(config, progress=False)
    leaf = jax.tree.leaves(state.params)[0]
    print("devices", len(leaf.sharding.device_set), int(state.step))
""")


@pytest.fixture(scope="module", autouse=True)
def eight_device_process(tmp_path_factory):
    directory = tmp_path_factory.mktemp("eight") / "run"
    # jaxdiff_info appends its own flag to XLA_FLAGS: both apply
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", EIGHT_DEVICES, str(directory)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, directory
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def eight_device_run(eight_device_process):
    proc, directory = eight_device_process
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert out.split() == ["devices", "8", "4"]
    return directory


# --- configuration and data order ------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be an integer >= 1"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("lr", float("nan"), "lr must be a finite number > 0"),
    ("ema", 1.0, "ema must be in [0, 1)"),
    ("label_dropout", 1.0, "label_dropout must be in [0, 1)"),
    ("sample_steps", 1001, "sample_steps must be at most 1000"),
    ("dataset", "mnist", "unknown dataset 'mnist'"),
])
def test_config_rejects_bad_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        micro_config(tmp_path, **{field: value})


def test_config_defaults():
    with pytest.raises(ValueError, match="unknown model config 'huge'"):
        training.TrainConfig(model="huge")
    ddpm = training.TrainConfig()
    assert (ddpm.lr, ddpm.warmup, ddpm.grad_clip, ddpm.ema_decay, ddpm.label_dropout) == (2e-4, 5000, 1.0, 0.9999, 0.1)
    assert ddpm.checkpoint_dir == Path("checkpoints/ddpm-cifar10")
    tiny = training.TrainConfig.preset("tiny")
    assert tiny.ema_decay == 0.999 and tiny.net == unet.get_config("tiny")
    assert tiny.checkpoint_dir == Path("checkpoints/tiny-shapes")


def test_data_order_is_a_permutation_per_epoch_and_a_function_of_seed_and_step():
    n, b = 23, 4  # 5 batches per epoch, 3 images left out
    epoch = [training.batch_indices(7, s, n, b) for s in range(5)]
    seen = np.concatenate(epoch)
    assert len(set(seen.tolist())) == 20 and seen.min() >= 0 and seen.max() < n
    np.testing.assert_array_equal(epoch[2], training.batch_indices(7, 2, n, b))
    next_epoch = np.concatenate([training.batch_indices(7, s, n, b) for s in range(5, 10)])
    assert not np.array_equal(seen, next_epoch)
    assert not np.array_equal(seen, np.concatenate([training.batch_indices(8, s, n, b) for s in range(5)]))


def test_learning_rate_warms_up_linearly():
    lr = training.learning_rate(2e-4, 4)
    np.testing.assert_allclose([float(lr(n)) for n in range(6)], [5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4, 2e-4], rtol=1e-6)
    assert float(training.learning_rate(1e-3, 0)(0)) == pytest.approx(1e-3)


# --- the objective and the step --------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset():
    """The images train() uses for micro_config."""
    return load_dataset("shapes", "unused", seed=training.DATA_SEED, num_examples=40)


def test_tiny_model_overfits_one_batch(tmp_path, dataset):
    config = micro_config(tmp_path)
    mesh = training.data_mesh()
    batch = training.Batches(dataset, 8, config.seed, mesh).one(0)  # sharded as train() shards it
    state = training.init_state(MICRO, config, mesh)
    p_0 = [np.asarray(x) for x in jax.tree.leaves(state.params)]  # the step donates its input
    step = training.make_train_step(MICRO, config, mesh)
    state, metrics = step(state, batch)
    # zero-initialised output layer: eps_theta = 0, so the first loss is mean(eps^2) = 1
    assert float(metrics["loss"]) == pytest.approx(1.0, abs=0.05)
    # The EMA at step 0 uses the decay min(ema, 1/10): ema_1 = 0.1 p_0 + 0.9 p_1.
    for e, p0, p1 in zip(jax.tree.leaves(state.ema_params), p_0, jax.tree.leaves(state.params)):
        np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p1, rtol=1e-5, atol=1e-7)
    assert float(metrics["lr"]) == pytest.approx(5e-4) and int(state.step) == 1  # warm-up: 1/2 of 1e-3
    losses = []
    for _ in range(100):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-10:]) < 0.4, losses  # from 1


# --- training runs, resume, checkpoints ------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run of 6 steps, and one stopped after 4 steps and resumed to 6."""
    root = tmp_path_factory.mktemp("runs")
    straight = training.train(micro_config(root / "straight"), progress=False)
    training.train(micro_config(root / "resumed", steps=4), progress=False)
    resumed = training.train(micro_config(root / "resumed"), progress=False)
    return root, straight, resumed


def test_resumed_run_equals_uninterrupted_run(runs):
    root, straight, resumed = runs
    assert int(straight.step) == int(resumed.step) == 6
    a, b = leaves(straight), leaves(resumed)
    assert len(a) == len(b) > 100
    for x, y in zip(a, b):  # params, EMA, Adam moments and count, step, key: bitwise
        np.testing.assert_array_equal(x, y)
    # metrics.jsonl: a line per step, none repeated across the resume
    records = {name: [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("straight", "resumed")}
    assert [r["step"] for r in records["straight"]] == [r["step"] for r in records["resumed"]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records["straight"]] == [r["loss"] for r in records["resumed"]]
    rates = [r["images_per_second"] for r in records["straight"]]
    assert rates[0] is None and all(r > 0 for r in rates[1:])  # the first call compiles: no rate
    assert all(np.isfinite(r["loss"]) for r in records["straight"])


@pytest.mark.slow
def test_fused_steps_equal_single_steps(runs, tmp_path):
    """Two or three steps per compiled call (lax.scan) give the run of single steps."""
    _, straight, _ = runs
    fused = training.train(micro_config(tmp_path / "fused", steps_per_call=3), progress=False)
    for x, y in zip(leaves(fused), leaves(straight)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_weights(tmp_path):
    state = training.train(micro_config(tmp_path / "bf16", bf16=True, steps=4), progress=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    records = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and r["loss"] < 1.5 for r in records)


def test_labels_and_the_null_label_are_trained(runs):
    """Adam leaves a row of the class embedding unchanged iff no gradient reached it: after 48
    labels, every class (all present in the 40 images) and the null class (P = 0.1 each) moved."""
    _, straight, _ = runs
    initial = training.init_state(MICRO, micro_config(None), training.data_mesh())
    before = np.asarray(initial.params["class_embed"]["embedding"][...])
    after = np.asarray(straight.params["class_embed"]["embedding"][...])
    assert before.shape == (11, 32)
    moved = np.abs(after - before).max(axis=1) > 0
    assert moved.all(), moved


def test_keeps_the_last_checkpoints_and_writes_the_config(runs):
    root, _, _ = runs
    assert sorted(p.name for p in (root / "straight").iterdir() if p.name.isdigit()) == ["4", "6"]
    meta = json.loads((root / "straight" / "config.json").read_text())
    assert meta["model"]["name"] == "micro"
    assert unet.UNetConfig(**meta["model"]["unet"]) == MICRO
    assert meta["dataset"]["name"] == "shapes" and meta["dataset"]["class_names"] == list(shapes.CLASS_NAMES)
    assert meta["training"]["batch_size"] == 8 and meta["training"]["ema"] == 0.999
    assert meta["schedule"]["num_train_steps"] == 1000


def test_finished_run_is_not_trained_further(runs):
    root, straight, _ = runs
    before = snapshot(root / "straight")
    again = training.train(micro_config(root / "straight"), progress=False)
    for x, y in zip(leaves(straight), leaves(again)):
        np.testing.assert_array_equal(x, y)
    assert snapshot(root / "straight") == before


def test_refuses_another_model_or_other_settings_and_writes_nothing(runs):
    root, _, _ = runs
    directory = root / "straight"
    before = snapshot(directory)
    other = unet.UNetConfig(**{**MICRO.__dict__, "ch": 16})
    with pytest.raises(ValueError, match=r"holds a run of model 'micro' \(other fields\) on shapes") as e:
        training.train(micro_config(directory, unet=other), progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="holds a run of model 'micro' on shapes, not model 'tiny'"):
        training.train(training.TrainConfig.preset("tiny", checkpoint_dir=directory), progress=False)
    with pytest.raises(ValueError, match=r"trained with lr 0.001 \(now 0.002\)"):
        training.train(micro_config(directory, lr=2e-3, steps=8), progress=False)
    with pytest.raises(ValueError, match="already at step 6, beyond steps=4"):
        training.train(micro_config(directory, steps=4), progress=False)
    (root / "stranger").mkdir()
    (root / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and is not a training directory"):
        training.train(micro_config(root / "stranger"), progress=False)
    assert snapshot(directory) == before
    assert snapshot(root / "stranger") == {"notes.txt": b"mine"}


def test_sigint_finishes_the_step_saves_a_checkpoint_and_raises(tmp_path, monkeypatch):
    take = training.Batches.one

    def one(self, step):  # Ctrl-C while the batch of step 3 is being built
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return take(self, step)

    monkeypatch.setattr(training.Batches, "one", one)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(training.TrainingInterrupted, match="stopped by SIGINT at step 4") as e:
        training.train(micro_config(tmp_path / "run", save_every=100), progress=False)
    assert e.value.signum == signal.SIGINT and e.value.step == int(e.value.state.step) == 4
    assert training.latest_step(tmp_path / "run") == 4  # not a checkpoint interval: saved for the signal
    assert signal.getsignal(signal.SIGINT) is handler


# --- load_checkpoint ---------------------------------------------------------------------------

def test_load_checkpoint_contract(runs):
    root, straight, _ = runs
    model = training.load_checkpoint(root / "straight")
    assert isinstance(model, training.LoadedModel)
    assert model.config == MICRO and model.config_name == "micro" and model.step == 6
    assert model.dataset == "shapes" and model.num_train_steps == 1000
    assert model.class_names == shapes.CLASS_NAMES
    assert model.decision_problems == shapes.DECISION_PROBLEMS
    for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(straight.ema_params)):
        np.testing.assert_array_equal(x, y)
    leaf = jax.tree.leaves(model.params)[0]
    assert leaf.sharding.is_fully_replicated and set(leaf.sharding.device_set) == set(jax.local_devices())
    raw = training.load_checkpoint(str(root / "straight"), use_ema=False)
    for x, y in zip(jax.tree.leaves(raw.params), jax.tree.leaves(straight.params)):
        np.testing.assert_array_equal(x, y)
    earlier = training.load_checkpoint(root / "straight", step=4)
    assert earlier.step == 4
    assert not all(np.array_equal(x, y) for x, y in
                   zip(jax.tree.leaves(earlier.params), jax.tree.leaves(model.params)))
    assert jax.tree.structure(model.params) == jax.tree.structure(unet.abstract_params(MICRO))


def test_half_written_checkpoint_never_counts(runs, tmp_path):
    root, _, _ = runs
    directory = tmp_path / "run"
    shutil.copytree(root / "straight", directory)
    # what orbax leaves behind when killed while writing step 8
    partial = directory / "8.orbax-checkpoint-tmp-1234567890"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "junk").write_bytes(b"\0" * 10)
    assert training.latest_step(directory) == 6
    assert training.load_checkpoint(directory).step == 6


def _one_line_error(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as e:
        training.load_checkpoint(*args, **kwargs)
    assert "\n" not in str(e.value)


def _corrupt(directory: Path) -> None:
    """Overwrite the array data of a checkpoint folder with garbage."""
    files = [f for f in directory.rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(b"garbage")


def test_load_checkpoint_errors(runs, tmp_path):
    root, _, _ = runs
    _one_line_error("does not exist; train a model first", tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    _one_line_error("has no config.json", tmp_path / "empty")
    _one_line_error("has no checkpoint of step 5; available: 4, 6", root / "straight", step=5)

    no_config = tmp_path / "no_config"
    shutil.copytree(root / "straight", no_config)
    (no_config / "config.json").unlink()
    _one_line_error("has no config.json", no_config)

    bad_config = tmp_path / "bad_config"
    shutil.copytree(root / "straight", bad_config)
    (bad_config / "config.json").write_text('{"format": "jaxdiff_info.training/1", "model": ')
    _one_line_error("config.json is corrupted", bad_config)
    (bad_config / "config.json").write_text('{"format": "jaxdiff_info.training/1", "model": {"name": "x"}}')
    _one_line_error("config.json is not a training config", bad_config)

    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(root / "straight" / "config.json", only_config / "config.json")
    _one_line_error("holds no complete checkpoint", only_config)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "straight", corrupt)
    _corrupt(corrupt / "6" / "ema_params")
    _one_line_error("the checkpoint of step 6 in .* is corrupted or unreadable", corrupt)
    assert training.load_checkpoint(corrupt, step=4).step == 4


def test_resume_from_a_corrupted_checkpoint_fails_and_writes_nothing(runs, tmp_path):
    root, _, _ = runs
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "straight", corrupt)
    _corrupt(corrupt / "6" / "opt_state")
    before = snapshot(corrupt)
    with pytest.raises(ValueError, match="checkpoint of step 6 .* is corrupted or unreadable"):
        training.train(micro_config(corrupt, steps=8), progress=False)
    assert snapshot(corrupt) == before


# --- several devices -------------------------------------------------------------------------

def test_eight_devices_match_one_and_restore_on_one(eight_device_run, tmp_path):
    assert jax.device_count() == 1
    one = training.train(micro_config(tmp_path / "one", steps=4), progress=False)
    # Resuming with steps=4 restores the 8-device checkpoint onto this 1-device process.
    eight = training.train(micro_config(eight_device_run, steps=4), progress=False)
    assert int(eight.step) == 4
    assert jax.tree.leaves(eight.params)[0].sharding.device_set == {jax.devices()[0]}
    a, b = leaves(one), leaves(eight)
    np.testing.assert_array_equal(a[-1], b[-1])  # the key
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)
    model = training.load_checkpoint(eight_device_run, step=2)
    assert model.step == 2 and model.config == MICRO
    # and it trains on from there
    assert int(training.train(micro_config(eight_device_run, steps=6), progress=False).step) == 6


# --- the sampler of the sample grids (tracking.generate) -------------------------------------

@pytest.mark.parametrize("clip", [False, True])
def test_ancestral_sampler_is_exact_for_a_point_mass(clip):
    """With the exact eps of data at one point x*, every DDPM path ends at x* (the posterior
    mean given x_0 = x* at every step; the last step is noiseless)."""
    train = linear_schedule(1000)
    schedule = respace(train, 50)
    x_star = jnp.linspace(-0.9, 0.9, 4 * 4 * 3).reshape(4, 4, 3)

    def eps_fn(point, x, t, k):  # one example; t: the model's step, on the training schedule
        abar = train.alpha_bar[t - 1]
        return (x - jnp.sqrt(abar) * point) / jnp.sqrt(1.0 - abar)

    key = jax.random.key(0, impl="rbg")
    x_T = jax.random.normal(key, (16, 4, 4, 3))
    sampler = Sampler("ddpm", "small", clip_x0=1.0 if clip else None)
    classes = jnp.zeros(16, jnp.int32)
    x_0 = jax.jit(lambda k, x: tracking.generate(eps_fn, x_star, schedule, sampler, k, x, classes))(
        jax.random.fold_in(key, 1), x_T)
    np.testing.assert_allclose(x_0, jnp.broadcast_to(x_star, x_0.shape), atol=2e-4)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_generate_ends_at_the_class_means_of_point_classes(variance):
    """On a mixture of points, the exact eps of class k takes every path of class k to m_k."""
    train = linear_schedule(1000)
    means = [[-0.8, 0.5], [0.3, -0.6], [0.9, 0.9]]
    classes = jnp.array([0, 1, 2, 2, 1, 0, 1, 2])
    x_T = jax.random.normal(jax.random.key(3), (8, 2))
    points = mixture.make_mixture(means)  # stds 0
    x_0 = jax.jit(lambda k, x: tracking.generate(mixture.eps_fn(train), points, respace(train, 50),
                                                 Sampler("ddpm", variance), k, x, classes))(jax.random.key(4), x_T)
    np.testing.assert_allclose(x_0, np.asarray(means)[classes], atol=2e-4)


def test_sample_is_generate_with_the_network_and_equals_batched_steps():
    """training.sample: x_T from the first key, tracking.generate with the per-example network
    from the second, clipped; the same numbers, up to rounding, as batched network calls in a
    loop of schedule.reverse_step whose step from t uses key S - t."""
    params = unet.init_params(MICRO, jax.random.key(0))  # its output layer starts at zero: perturb all
    leaves_, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in
                                       zip(leaves_, jax.random.split(jax.random.key(5), len(leaves_)))])
    labels = jnp.array([0, 3, 9, MICRO.null_class])
    key = jax.random.key(1)
    x = training.sample(MICRO, params, key, labels, num_steps=5, variance="large", clip=True)

    schedule = respace(linear_schedule(1000), 5)
    sampler = Sampler("ddpm", "large", clip_x0=1.0)
    k_init, k_steps = jax.random.split(key)
    x_t = jax.random.normal(k_init, (4, 32, 32, 3))
    x_0 = jax.jit(lambda x: tracking.generate(unet.make_eps_fn(MICRO), params, schedule, sampler, k_steps, x,
                                              labels))(x_t)
    np.testing.assert_allclose(x, jnp.clip(x_0, -1.0, 1.0), atol=1e-5)

    apply = jax.jit(lambda x, t: unet.apply(MICRO, params, x, jnp.full(4, t), labels))
    keys = jax.random.split(k_steps, 5)
    for t in range(5, 0, -1):
        x_t = reverse_step(schedule, keys[5 - t], t, x_t, apply(x_t, schedule.timesteps[t - 1]), sampler)
    np.testing.assert_allclose(x, jnp.clip(x_t, -1.0, 1.0), atol=1e-4)  # rounding, amplified by 1 / sqrt(abar_T)
