"""benchmarks/gpu.py: the smoke run writes every field, atomically; the FLOP counter counts right."""

import contextlib
import io
import json
import math
import os
import time
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(results dict, stdout, os.replace calls, out path, folder listing) of one smoke run."""
    out = tmp_path_factory.mktemp("gpu") / "results.json"
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((str(src), str(dst)))
        return real_replace(src, dst)

    stdout = io.StringIO()
    with mock.patch("os.replace", recording_replace), contextlib.redirect_stdout(stdout):
        code = gpu.main(["--smoke", "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text()), stdout.getvalue(), replaced, out, sorted(p.name for p in out.parent.iterdir())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_written_atomically(smoke):
    r, _, replaced, out, listing = smoke
    assert listing == [out.name]  # no temporary file left beside it
    src, dst = replaced[-1]
    assert dst == str(out) and os.path.dirname(src) == str(out.parent) and src != dst
    assert not os.path.exists(src)


def test_top_level_fields(smoke):
    r = smoke[0]
    assert r["smoke"] is True
    for key in ("date", "provenance", "flops_method", "memory_method", "peak_source"):
        assert isinstance(r[key], str) and r[key]
    assert r["device"]["device_kind"] == jax.devices()[0].device_kind
    assert r["device"]["platform"] == jax.devices()[0].platform
    assert r["versions"]["jax"] == jax.__version__
    assert r["anchor"]["images_per_s"] == 21 * 128 and r["target_images_per_s_bf16"] == 8000
    assert r["peak_bf16_flops_per_s"] == gpu.peak_bf16_flops(jax.devices()[0].device_kind)
    assert positive(r["wall_s"]) and r["repeats"] >= 2
    assert all(math.isfinite(x) and x >= 0 for x in numbers(r))


def test_train_fields(smoke):
    r = smoke[0]
    t = r["train"]
    for key in ("batch", "num_params", "forward_flops_per_image", "train_flops_per_image", "anchor_ratio_bf16",
                "wall_s"):
        assert positive(t[key]), key
    # XLA's cost analysis of the lowered step: there on the CPU; null elsewhere if a backend has none
    assert positive(t["xla_flops_per_image"]) or (t["xla_flops_per_image"] is None and r["device"]["accelerator"])
    # forward + backward: about 3 x the forward (the first convolution has no input gradient; the backward's
    # sums over pixels are products with a vector of ones, jaxdiff_info.layers, and count too)
    assert 2.5 < t["train_flops_per_image"] / t["forward_flops_per_image"] <= 3.1
    for dtype in ("float32", "bfloat16"):
        v = t[dtype]
        for key in ("compile_s", "warmup_s", "steps_per_s", "images_per_s", "tflops_per_s", "compiled_bytes"):
            assert positive(v[key]), (dtype, key)
        assert positive(v["step"]["median_s"]) and len(v["step"]["all_s"]) == r["repeats"]
        assert v["images_per_s"] == pytest.approx(t["batch"] / v["step"]["median_s"])
        assert v["tflops_per_s"] * 1e12 == pytest.approx(t["train_flops_per_image"] * v["images_per_s"])
        assert v["loss_finite"] is True
        if r["peak_bf16_flops_per_s"] is None:
            assert v["fraction_of_bf16_peak"] is None
        else:
            assert positive(v["fraction_of_bf16_peak"])
        if jax.devices()[0].memory_stats() is None:
            assert v["peak_bytes_in_use"] is None and "unavailable" in r["memory_stats"]
        else:
            assert positive(v["peak_bytes_in_use"])
    assert t["target_met_bf16"] is None  # judged on the full run only


def test_analyze_fields(smoke):
    a = smoke[0]["analyze"]
    K = a["num_classes"]
    runs = {(v["trajectories"], v["compute_dtype"]): v for v in a["runs"]}
    assert set(runs) == {(n, d) for n in gpu.SMOKE.trajectories for d in ("float32", "bfloat16")}
    for (n, _), v in runs.items():
        assert v["images_per_call"] == n * K
        for key in ("compile_s", "warmup_s", "trajectory_steps_per_s", "images_per_s", "tflops_per_s",
                    "compiled_bytes"):
            assert positive(v[key]), key
        assert v["trajectory_steps_per_s"] == pytest.approx(n / v["step"]["median_s"])
        assert v["finite"] is True
    assert "compute_dtype" in a["bf16_via"] and positive(a["wall_s"])


def test_mixture_fields(smoke):
    m = smoke[0]["mixture"]
    assert (m["N"], m["d"], m["K"], m["T"]) == gpu.SMOKE.mixture
    assert [v["key_impl"] for v in m["runs"]] == ["threefry2x32 (default)", gpu.FAST_IMPL]
    for v in m["runs"]:
        for key in ("compile_s", "warmup_s", "steps_per_s", "trajectory_steps_per_s"):
            assert positive(v[key]), key
        assert v["steps_per_s"] == pytest.approx(m["T"] / v["loop"]["median_s"])


def test_table_printed(smoke):
    text = smoke[1]
    assert "21 steps/s at batch 128 (~2,700 images/s) on a TPU v3-8" in text
    assert ">= 8,000 images/s bf16" in text
    for needle in ("training,", "bfloat16", "trajectory-steps/s", "mixture tracking loop", "written to"):
        assert needle in text


def test_flop_count_by_hand():
    # 3x3 SAME convolution, 4 -> 5 channels on 2 x 6 x 6: 2 x (2*6*6*5 outputs) x (4*3*3) multiply-adds
    x, w = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4, 5))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert gpu.matmul_flops(jax.make_jaxpr(conv)(x, w)) == 2 * (2 * 6 * 6 * 5) * (4 * 9)
    # its gradients: the same count again for each of d/dx and d/dw
    grads = jax.make_jaxpr(jax.grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1)))(x, w)
    assert gpu.matmul_flops(grads) == 3 * 2 * (2 * 6 * 6 * 5) * (4 * 9)
    # a stride-2 convolution: its input gradient runs over the output gradient dilated by 2,
    # whose inserted zeros do no work, so d/dx and d/dw cost the forward's count each again
    strided = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",  # noqa: E731
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    forward = 2 * (2 * 3 * 3 * 5) * (4 * 9)
    assert gpu.matmul_flops(jax.make_jaxpr(strided)(x, w)) == forward
    grads = jax.make_jaxpr(jax.grad(lambda x, w: strided(x, w).sum(), argnums=(0, 1)))(x, w)
    assert gpu.matmul_flops(grads) == 3 * forward
    # a batched matmul inside a scan of 7 steps and a cond (the larger branch counts)
    a = jnp.ones((3, 4, 5))

    def body(c, _):
        c = jax.lax.cond(c.sum() > 0, lambda c: jnp.einsum("bij,bjk->bik", c, jnp.ones((3, 5, 5))), lambda c: c, c)
        return c, None

    scanned = jax.make_jaxpr(lambda a: jax.lax.scan(body, a, None, length=7)[0])(a)
    assert gpu.matmul_flops(scanned) == 7 * 2 * (3 * 4 * 5) * 5


def test_peak_table():
    assert gpu.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gpu.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_bf16_flops("NVIDIA H200 NVL") == 835e12
    assert gpu.peak_bf16_flops("NVIDIA H100 NVL") == 835e12
    assert gpu.peak_bf16_flops("NVIDIA H200 PCIe") is None
    assert gpu.peak_bf16_flops("cpu") is None


def test_full_run_refused_without_accelerator(tmp_path, capsys):
    if jax.devices()[0].platform != "cpu":
        pytest.skip("an accelerator is present: the full run would start")
    out = tmp_path / "never.json"
    assert gpu.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no accelerator" in err and "--smoke" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--parts", "train,sampling"], "--parts: unknown sampling"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_flags_are_one_line_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu.parse_args(["--smoke", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"{gpu.PROG}: error: {message}" + err.split(message, 1)[1], err
    assert "\n" not in err and "usage" not in err


def test_an_out_that_exists_is_a_folder_or_cannot_be_written_is_refused_before_the_run(tmp_path, capsys):
    earlier = tmp_path / "earlier.json"
    earlier.write_text("{}")
    for args, message in (([str(earlier)], "already exists (an earlier run's results); pass --overwrite"),
                          ([str(tmp_path)], "is a folder; give the path of the JSON file")):
        with pytest.raises(SystemExit) as e:
            gpu.parse_args(["--smoke", "--out", *args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and "\n" not in err, err
    assert earlier.read_text() == "{}"
    (tmp_path / "a_file").write_text("x")
    start = time.perf_counter()
    assert gpu.main(["--smoke", "--parts", "mixture", "--out", str(tmp_path / "a_file" / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{gpu.PROG}: error: cannot write {tmp_path / 'a_file' / 'r.json'}: ") and "\n" not in err
    assert time.perf_counter() - start < 5  # before anything is measured


def test_complete_and_float32_said_to_be_tf32_on_gpus(smoke):
    r, text = smoke[0], smoke[1]
    assert r["complete"] is True and "INCOMPLETE" not in text
    assert "TF32" in r["float32_precision"]


def mixture_loop_failing_at(impl, exc):
    real = gpu.build_jax_loop

    def build(case, key_impl=None):
        if key_impl == impl:
            raise exc
        return real(case, key_impl=key_impl)

    return mock.patch.object(gpu, "build_jax_loop", build)


def test_a_failing_variant_keeps_the_others(tmp_path):
    out = tmp_path / "r.json"
    stdout = io.StringIO()
    with mixture_loop_failing_at(gpu.FAST_IMPL, RuntimeError("RESOURCE_EXHAUSTED: out of memory\nmore")), \
            contextlib.redirect_stdout(stdout):
        assert gpu.main(["--smoke", "--parts", "mixture", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    first, second = r["mixture"]["runs"]
    assert positive(first["steps_per_s"]) and r["complete"] is True
    assert second == {"key_impl": gpu.FAST_IMPL, "error": "RuntimeError: RESOURCE_EXHAUSTED: out of memory"}
    assert "error: RuntimeError: RESOURCE_EXHAUSTED" in stdout.getvalue()


def test_an_interrupted_run_leaves_what_it_measured(tmp_path):
    out = tmp_path / "r.json"
    with mixture_loop_failing_at(gpu.FAST_IMPL, KeyboardInterrupt()), contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(KeyboardInterrupt):
            gpu.main(["--smoke", "--parts", "mixture", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["complete"] is False and [v["key_impl"] for v in r["mixture"]["runs"]] == ["threefry2x32 (default)"]
    assert positive(r["mixture"]["runs"][0]["steps_per_s"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_variant_is_not_started_without_budget_left():
    saved, stored = [], []
    guard = gpu.Guard(lambda: saved.append(1), lambda: gpu.RESERVE_S - 1)
    guard("x", lambda: pytest.fail("measured"), stored.append)
    assert saved == [1] and "not started" in stored[0]["skipped"]
    guard = gpu.Guard(lambda: saved.append(2), lambda: gpu.RESERVE_S + 1)
    guard("y", lambda: {"steps_per_s": 1.0}, stored.append)
    assert saved == [1, 2] and stored[1] == {"steps_per_s": 1.0}
    assert gpu.failed(stored[0]).startswith("skipped: ") and gpu.failed(stored[1]) is None
