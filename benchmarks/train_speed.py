"""U-Net training step: JAX (jaxdiff_info) against the same network in PyTorch, on CPU.

    python -m benchmarks.train_speed                      # tiny and ddpm at b8 and b16 (~10 min)
    python -m benchmarks.train_speed --quick              # tiny b8 and b16, 3 repetitions
    python -m benchmarks.train_speed --configs ddpm:16    # CONFIG[:BATCH[,BATCH...]] ...
    python -m benchmarks.train_speed --breakdown          # + no-dropout and forward-only pairs

One training step, the same in both frameworks (that of jaxdiff_info.training):
uint8 images -> [-1, 1], random horizontal flip, t ~ U{1..1000}, eps ~ N(0, I), each label
replaced by the null label with probability 0.1, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
(DDPM linear schedule), forward with the config's dropout (ddpm 0.1, tiny 0), MSE between eps and the prediction,
backward, clip the global gradient norm to 1, Adam (lr 2e-4, constant), EMA of the weights.
The batch of images (uniform noise, uint8) and its labels are fixed; everything random is
drawn inside the step.

* JAX: ``jaxdiff_info.training.make_train_step`` (the library's compiled step, on a
  ``TrainState`` with an rbg key) when that module provides it; otherwise (or with
  --jax-step local) the equivalent jitted step of this file, `local_jax_step`, built on
  optax.chain(clip_by_global_norm(1), adam(2e-4)). The output says which one ran.
  Compiled ahead of time; the compile time is reported on its own, never timed.
* PyTorch (``benchmarks/torch_unet.py``): eager, NCHW, torch.optim.Adam, clip_grad_norm_,
  ``torch._foreach_lerp_`` for the EMA, torch.set_num_threads(2) and OMP_WAIT_POLICY=PASSIVE
  (see `torch-spin` below for why).

Each variant runs in its own worker process: the XLA flags of a JAX variant are set before
its backend starts, and no idle thread pool of one framework sits in the process of the
other. Workers load the same initial parameters, compile and warm up (2 steps) one after
another; then the timed repetitions alternate between them in a rotating order, so that
machine load hits all alike. A repetition runs the same number of steps in every variant
(about --rep-seconds of work); the figure kept is the median over repetitions. Variants:

    jax           the library's XLA flags (`import jaxdiff_info` turns YNNPACK fusions off)
    jax-xla       XLA's default flags (XLA_FLAGS restored after `import jaxdiff_info`)
    jax-threefry  as `jax`, with a threefry key instead of rbg (mostly: its compile time)
    jax-local     as `jax`, with the local step of this file even if the library has one
    jax-nodrop    as `jax`, network with dropout 0 (no random masks)     [--breakdown]
    jax-fwd       forward and loss only, no gradient, no update          [--breakdown]
    jax-concurrent       as `jax`, + --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED
    jax-legacy-emitters  as `jax`, + --xla_cpu_use_fusion_emitters=false
    torch         PyTorch, 2 threads, OMP_WAIT_POLICY=PASSIVE
    torch-spin    PyTorch, 2 threads, libgomp's default (spinning) wait policy
    torch-1t      PyTorch, 1 thread
    torch-cl      as `torch`, channels_last memory format
    torch-nodrop  as `torch`, dropout 0                                  [--breakdown]
    torch-fwd     as `torch`, forward and loss only under no_grad        [--breakdown]

Every JAX variant is compared with its PyTorch counterpart (jax-nodrop with torch-nodrop,
jax-fwd with torch-fwd, the others with the first of torch / torch-spin / torch-1t /
torch-cl that runs). Before timing, a correctness gate: with the same (perturbed)
parameters, the PyTorch forward must match JAX to --tolerance on a random batch (every
config), and for `tiny` the gradients of an MSE loss too. Output: stdout and
benchmarks/results_train_speed.txt (--out; the default run only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # python benchmarks/train_speed.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
NUM_TRAIN_STEPS = 1000
P_UNCOND = 0.1
LEARNING_RATE = 2e-4
CLIP_NORM = 1.0
PROTOCOL = "@@ "  # prefix of the worker's protocol lines on stdout

# name: (XLA flags, key impl, part, step source)
JAX_VARIANTS = {
    "jax": ("library", "rbg", "step", "auto"),
    "jax-xla": ("default", "rbg", "step", "auto"),
    "jax-threefry": ("library", "threefry2x32", "step", "auto"),
    "jax-local": ("library", "rbg", "step", "local"),
    "jax-nodrop": ("library", "rbg", "nodrop", "auto"),
    "jax-fwd": ("library", "rbg", "fwd", "auto"),
    # the library's flags plus one more (XLA:CPU options that could use both cores)
    "jax-concurrent": ("library --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED", "rbg", "step",
                       "auto"),
    "jax-legacy-emitters": ("library --xla_cpu_use_fusion_emitters=false", "rbg", "step", "auto"),
    "jax-heap": ("library", "rbg", "step", "auto"),  # with HEAP_ENV
}
# name: (threads, OMP_WAIT_POLICY or None, channels_last, part)
TORCH_VARIANTS = {
    "torch": (2, "PASSIVE", False, "step"),
    "torch-spin": (2, None, False, "step"),
    "torch-1t": (1, "PASSIVE", False, "step"),
    "torch-cl": (2, "PASSIVE", True, "step"),
    "torch-nodrop": (2, "PASSIVE", False, "nodrop"),
    "torch-fwd": (2, "PASSIVE", False, "fwd"),
    "torch-heap": (2, "PASSIVE", False, "step"),  # with HEAP_ENV
}
# glibc malloc kept to its main heap, which it never returns to the system: a thread's large
# allocation (XLA:CPU's temporary buffer of a step, 557 MB for ddpm b8) is otherwise mmap-ed and
# unmapped at every step, and its pages fault in anew (137,000 minor faults per step)
HEAP_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 40)}
HEAP_VARIANTS = ("jax-heap", "torch-heap")
LABELS = {
    "jax": "JAX, lib XLA flags", "jax-xla": "JAX, XLA default flags",
    "jax-threefry": "JAX, threefry key", "jax-local": "JAX, local step",
    "jax-nodrop": "JAX, no dropout", "jax-fwd": "JAX, forward only",
    "jax-concurrent": "JAX, concurrency scheduler", "jax-legacy-emitters": "JAX, legacy fusion emitters",
    "jax-heap": "JAX, malloc main heap", "torch-heap": "PyTorch, malloc main heap",
    "torch": "PyTorch 2 thr passive", "torch-spin": "PyTorch 2 thr spin-wait",
    "torch-1t": "PyTorch 1 thread", "torch-cl": "PyTorch channels_last",
    "torch-nodrop": "PyTorch, no dropout", "torch-fwd": "PyTorch, forward only",
}
DEFAULT_VARIANTS = "jax,jax-xla,torch"
BREAKDOWN_VARIANTS = "jax,torch,jax-nodrop,torch-nodrop,jax-fwd,torch-fwd"


def part_of(variant: str) -> str:
    return (JAX_VARIANTS.get(variant) or TORCH_VARIANTS[variant])[-2 if variant in JAX_VARIANTS else -1]


def alpha_bar_linear():
    """DDPM linear schedule, T = 1000 (as jaxdiff_info.schedule.linear_schedule(1000))."""
    import numpy as np

    betas = np.linspace(1e-4, 0.02, NUM_TRAIN_STEPS, dtype=np.float64)
    return np.cumprod(1.0 - betas).astype(np.float32)


def ema_decay(config_name: str) -> float:
    """The EMA decay of jaxdiff_info.training (0.9999 for ddpm, 0.999 otherwise)."""
    return 0.9999 if config_name == "ddpm" else 0.999


def fixed_batch(config, batch: int, seed: int):
    """uint8 images (B, H, W, C) and int32 labels (B,)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, config.image_size, config.image_size, config.channels))
    labels = rng.integers(0, config.num_classes, size=batch)
    return images.astype(np.uint8), labels.astype(np.int32)


# --- JAX ---------------------------------------------------------------------------------

def library_dropout(rate: float):
    """jaxdiff_info.layers.Dropout(rate) (the U-Net's dropout), or None where it does not exist."""
    try:
        from jaxdiff_info.layers import Dropout
    except ImportError:
        return None
    return Dropout(rate)


def library_group_norm(channels: int, groups: int):
    """The U-Net's GroupNorm as the training step runs it (jaxdiff_info.layers.GroupNorm with
    fast_backward), or None where it does not exist."""
    try:
        from jaxdiff_info.layers import GroupNorm
    except ImportError:
        return None
    from flax import nnx

    layer = GroupNorm(channels, num_groups=groups, epsilon=1e-6, rngs=nnx.Rngs(0))
    layer.fast_backward = True
    return layer


def library_step_api():
    """jaxdiff_info.training when it provides the pieces used here, else (None, reason)."""
    import importlib.util

    if importlib.util.find_spec("jaxdiff_info.training") is None:
        return None, "jaxdiff_info.training does not exist"
    try:
        import jaxdiff_info.training as training
    except Exception as e:  # being written by someone else: may be broken for a while
        return None, f"jaxdiff_info.training does not import ({type(e).__name__}: {e})"
    needed = ("TrainConfig", "TrainState", "make_train_step", "make_optimizer", "diffusion_loss")
    missing = [n for n in needed if not hasattr(training, n)]
    if missing:
        return None, f"jaxdiff_info.training lacks {', '.join(missing)}"
    return training, "jaxdiff_info.training.make_train_step"


def local_jax_step(config, config_name: str, optimizer):
    """The jitted step of jaxdiff_info.training, written out: (state, batch) -> (state, metrics).

    state = (step, params, ema_params, opt_state, key); the fallback when the library has none.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from jaxdiff_info import unet

    gdef = unet.graphdef(config)
    alpha_bar = jnp.asarray(alpha_bar_linear())
    decay_max = ema_decay(config_name)

    def step(state, batch):
        n, params, ema_params, opt_state, key = state
        key, k_flip, k_t, k_eps, k_null, k_drop = jax.random.split(key, 6)
        x0 = batch["images"].astype(jnp.float32) / 127.5 - 1.0
        B = x0.shape[0]
        flip = jax.random.bernoulli(k_flip, 0.5, (B,))
        x0 = jnp.where(flip[:, None, None, None], x0[:, :, ::-1, :], x0)
        t = jax.random.randint(k_t, (B,), 1, NUM_TRAIN_STEPS + 1)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        ab = alpha_bar[t - 1][:, None, None, None]
        x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
        k = jnp.where(jax.random.bernoulli(k_null, P_UNCOND, (B,)), config.null_class, batch["labels"])

        def loss_fn(p):
            pred = unet.apply(gdef, p, x_t, t, k, dropout_key=k_drop)
            return jnp.mean((pred - eps) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = jnp.minimum(decay_max, (1.0 + n) / (10.0 + n))
        ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
        return (n + 1, params, ema_params, opt_state, key), {"loss": loss}

    return jax.jit(step, donate_argnums=0)


def jax_worker(args) -> None:
    xla, key_impl, part, source = JAX_VARIANTS[args.worker]
    original_flags = os.environ.get("XLA_FLAGS")
    import jaxdiff_info  # noqa: F401  (sets the library's XLA flag; nothing has run yet)

    if xla == "default":  # back to XLA's defaults before the backend starts
        if original_flags is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = original_flags
    elif xla.startswith("library "):  # one more flag
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla.split(" ", 1)[1]).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxdiff_info import unet

    config = unet.get_config(args.config)
    if part == "nodrop":
        config = dataclasses.replace(config, dropout=0.0)
    images, labels = fixed_batch(config, args.batch, args.seed)
    batch = {"images": jax.device_put(images), "labels": jax.device_put(labels)}
    # the initial parameters written by the main process (the same for every variant)
    saved = np.load(args.init)
    treedef = jax.tree.structure(unet.abstract_params(config))
    params = jax.tree.unflatten(treedef, [jnp.asarray(saved[f"p{i}"]) for i in range(treedef.num_leaves)])
    key = jax.random.key(args.seed + 1, impl=key_impl)

    training, why = library_step_api() if source == "auto" else (None, "--variants jax-local")
    if training is not None:
        tc = training.TrainConfig(model=args.config, dataset="shapes", batch_size=args.batch,
                                  lr=LEARNING_RATE, warmup=0, grad_clip=CLIP_NORM,
                                  label_dropout=P_UNCOND, flip=True, seed=args.seed,
                                  unet=config if part == "nodrop" else None)
        optimizer = training.make_optimizer(tc.lr, tc.warmup, tc.grad_clip)
        state = training.TrainState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params),
                                    optimizer.init(params), key)
        step_source = f"library ({why})"
        if part == "fwd":
            from jaxdiff_info.data import to_model_range
            from jaxdiff_info.schedule import linear_schedule

            schedule = linear_schedule(NUM_TRAIN_STEPS)

            def fwd(state, batch):
                loss = training.diffusion_loss(state.params, config, schedule, state.rng,
                                               to_model_range(batch["images"]), batch["labels"],
                                               label_dropout=P_UNCOND)
                return state, {"loss": loss}

            step = jax.jit(fwd)
        else:
            step = training.make_train_step(config, tc)
    else:
        optimizer = optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.adam(LEARNING_RATE))
        state = (jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params),
                 optimizer.init(params), key)
        step_source = f"local step of benchmarks/train_speed.py ({why})"
        if part == "fwd":
            raise SystemExit("jax-fwd needs jaxdiff_info.training")
        step = local_jax_step(config, args.config, optimizer)
    jax.block_until_ready((state, batch))

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    losses, warm = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        out_state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
        warm.append(time.perf_counter() - t0)
        if part != "fwd":
            state = out_state
    holder = [state]

    def run(n: int):
        s = holder[0]
        t0 = time.perf_counter()
        for _ in range(n):
            out, metrics = compiled(s, batch)
            if part != "fwd":
                s = out
        loss = float(jax.block_until_ready(metrics["loss"]))
        dt = time.perf_counter() - t0
        holder[0] = s
        return dt, loss

    serve(dict(compile_s=compile_s, warmup_s=warm, first_losses=losses, step_source=step_source,
               xla_flags=os.environ.get("XLA_FLAGS", ""), key_impl=key_impl, jax=jax.__version__,
               num_params=unet.count_params(params)), run)


# --- PyTorch -----------------------------------------------------------------------------

def torch_worker(args) -> None:
    threads, wait_policy, channels_last, part = TORCH_VARIANTS[args.worker]
    if wait_policy is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = wait_policy  # read by libgomp when torch loads
    import torch
    import torch.nn.functional as F

    from benchmarks import torch_unet
    from jaxdiff_info.unet import get_config  # imports jax, which stays idle here

    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    config = get_config(args.config)
    model = torch_unet.build(args.config, config)
    model.load_state_dict(torch.load(args.init, weights_only=True))
    if part == "nodrop":
        for block in model.modules():
            if isinstance(block, torch_unet.ResBlock):
                block.dropout = torch.nn.Identity()
    model.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    images, labels = fixed_batch(config, args.batch, args.seed)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=fmt)  # uint8 NCHW
    labels = torch.from_numpy(labels).long()
    alpha_bar = torch.from_numpy(alpha_bar_linear())
    B, decay_max, counter = args.batch, ema_decay(args.config), [0]

    def loss_of_batch():
        x0 = images.to(torch.float32) / 127.5 - 1.0
        flip = torch.rand(B) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        t = torch.randint(1, NUM_TRAIN_STEPS + 1, (B,))
        eps = torch.randn_like(x0)
        ab = alpha_bar[t - 1].view(B, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        k = torch.where(torch.rand(B) < P_UNCOND, config.null_class, labels)
        return F.mse_loss(model(x_t, t, k), eps)

    def step():
        if part == "fwd":
            with torch.no_grad():
                return loss_of_batch()
        loss = loss_of_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        optimizer.step()
        n = counter[0]
        decay = min(decay_max, (1.0 + n) / (10.0 + n))
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - decay)
        counter[0] += 1
        return loss

    losses, warm = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        losses.append(float(step()))
        warm.append(time.perf_counter() - t0)

    def run(n: int):
        t0 = time.perf_counter()
        for _ in range(n):
            loss = step()
        loss = float(loss)
        return time.perf_counter() - t0, loss

    serve(dict(compile_s=0.0, warmup_s=warm, first_losses=losses, torch=torch.__version__,
               threads=torch.get_num_threads(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
               channels_last=channels_last, num_params=torch_unet.count_params(model)), run)


def serve(ready: dict, run) -> None:
    """Protocol: print READY, then answer 'run N' with the seconds taken, until 'quit'."""
    print(PROTOCOL + json.dumps({"ready": ready}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        before = resource.getrusage(resource.RUSAGE_SELF)
        seconds, loss = run(int(cmd[1]))
        after = resource.getrusage(resource.RUSAGE_SELF)
        print(PROTOCOL + json.dumps({"seconds": seconds, "loss": loss, "minflt": after.ru_minflt - before.ru_minflt,
                                     "sys_s": after.ru_stime - before.ru_stime}), flush=True)


# --- layer micro-benchmarks (--ops) --------------------------------------------------------

OPS_SHAPES = {  # (batch, size, channels, groups) of the layers of each case
    "tiny:64": [(64, 32, 16, 8), (64, 16, 32, 8)],
    "ddpm:8": [(8, 32, 128, 32), (8, 16, 256, 32)],
}


def update_case(config_name: str):
    """(name, JAX run, PyTorch run): the parameter update of a training step alone, the
    gradients given: global-norm clipping, Adam and the EMA, over every parameter of the
    config. JAX: the library's optimiser (`training.make_optimizer`) and the EMA of its step,
    jitted with the state donated as the step donates it; PyTorch: `torch_worker`'s update."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch

    from benchmarks import torch_unet
    from jaxdiff_info import training, unet

    config = unet.get_config(config_name)
    tx = training.make_optimizer(LEARNING_RATE, 0, CLIP_NORM)
    params = unet.init_params(config, jax.random.key(0))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    decay = ema_decay(config_name)

    def update(params, ema, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params), opt_state

    state = [params, jax.tree.map(jnp.copy, params), tx.init(params)]
    compiled = jax.jit(update, donate_argnums=(0, 1, 2)).lower(*state, grads).compile()

    def run_jax():
        state[:] = compiled(*state, grads)
        jax.block_until_ready(state)

    model = torch_unet.build(config_name, config)
    tparams = list(model.parameters())
    for p in tparams:
        p.grad = torch.full_like(p, 1e-3)
    tema = [p.detach().clone() for p in tparams]
    optimizer = torch.optim.Adam(tparams, lr=LEARNING_RATE)

    def run_torch():
        torch.nn.utils.clip_grad_norm_(tparams, CLIP_NORM)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(tema, tparams, 1.0 - decay)

    n = sum(p.size for p in jax.tree.leaves(params))
    return f"update: clip+Adam+EMA, {n / 1e6:.1f}M params", run_jax, run_torch


def ops_worker(args) -> None:
    """The layers of the U-Net alone, JAX (the library's layers, NHWC) against PyTorch (NCHW),
    and the parameter update of a step (`update_case`), both in this process (torch with 2
    threads, OMP_WAIT_POLICY=PASSIVE), interleaved, median of --reps x (runs of ~0.3 s).
    Forward, and forward+backward: the gradient of the sum of squares of the output with
    respect to every input and parameter."""
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    original_flags = os.environ.get("XLA_FLAGS")
    import jaxdiff_info  # noqa: F401

    if args.worker == "ops-xla":
        if original_flags is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = original_flags
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from flax import nnx

    torch.set_num_threads(2)
    say = print

    def timeit(fn) -> float:
        fn()
        t0 = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t0, 1e-5)
        n = max(1, round(0.3 / once))
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    def jax_fn(f, *xs, grad):
        g = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(xs)))) if grad
                    else f)
        g = g.lower(*xs).compile()
        return lambda: jax.block_until_ready(g(*xs))

    def torch_fn(f, *xs, grad):
        if not grad:
            def run():
                with torch.no_grad():
                    f(*xs)
            return run
        xs = [x.requires_grad_() for x in xs]

        def run():
            for x in xs:
                x.grad = None
            (f(*xs) ** 2).sum().backward()
        return run

    rng = np.random.default_rng(0)
    cases = []
    for B, H, C, G in OPS_SHAPES[args.config]:
        x = rng.standard_normal((B, H, H, C)).astype(np.float32)
        w = (0.05 * rng.standard_normal((3, 3, C, C))).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        tag = f"{B}x{H}x{H}x{C}"

        def conv_j(x, w):
            return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

        def conv_t(x, w):
            return F.conv2d(x, w, padding=1)

        gn = nnx.GroupNorm(C, num_groups=G, epsilon=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0))
        gdef, gstate = nnx.split(gn)

        def gn_j(x, state):
            return nnx.swish(nnx.merge(gdef, state)(x))

        gn_lib = library_group_norm(C, G)
        if gn_lib is not None:
            ldef, lstate = nnx.split(gn_lib)

            def gn_lib_j(x, state):
                return nnx.swish(nnx.merge(ldef, state)(x))

        gscale, gbias = torch.ones(C), torch.zeros(C)

        def gn_t(x, s, b):
            return F.silu(F.group_norm(x, G, s, b, eps=1e-6))

        drop, drop_lib = nnx.Dropout(0.1), library_dropout(0.1)
        key = jax.random.key(0, impl="rbg")

        def drop_j(x, key):
            return drop(x, deterministic=False, rngs=key)

        def drop_lib_j(x, key):
            return drop_lib(x, deterministic=False, rngs=key)

        for grad in (False, True):
            mode = "fwd+bwd" if grad else "fwd"
            cases.append((f"conv3x3 {tag} {mode}", jax_fn(conv_j, xj, wj, grad=grad),
                          torch_fn(conv_t, xt.clone(), wt.clone(), grad=grad)))
            cases.append((f"GroupNorm+swish {tag} {mode}", jax_fn(gn_j, xj, gstate, grad=grad),
                          torch_fn(gn_t, xt.clone(), gscale.clone(), gbias.clone(), grad=grad)))
            if gn_lib is not None:
                cases.append((f"GroupNorm+swish {tag} {mode} (library)", jax_fn(gn_lib_j, xj, lstate, grad=grad),
                              torch_fn(gn_t, xt.clone(), gscale.clone(), gbias.clone(), grad=grad)))
        cases.append((f"dropout 0.1 {tag} fwd (flax, 32-bit mask)",
                      lambda f=jax.jit(drop_j), a=xj: jax.block_until_ready(f(a, key)),
                      lambda a=xt: F.dropout(a, 0.1, training=True)))
        if drop_lib is not None:
            cases.append((f"dropout 0.1 {tag} fwd (library, 16-bit)",
                          lambda f=jax.jit(drop_lib_j), a=xj: jax.block_until_ready(f(a, key)),
                          lambda a=xt: F.dropout(a, 0.1, training=True)))
    cases.append(update_case(args.config.split(":")[0]))
    times = {name: ([], []) for name, _, _ in cases}
    for _ in range(args.reps or 5):
        for name, fj, ft in cases:
            times[name][0].append(timeit(fj))
            times[name][1].append(timeit(ft))
    flags = os.environ.get("XLA_FLAGS") or "XLA defaults"
    say(f"  {'layer':<50} {'JAX ms':>8} {'torch ms':>9} {'torch/JAX':>9}   (XLA_FLAGS: {flags})")
    for name, (tj, tt) in times.items():
        mj, mt = statistics.median(tj), statistics.median(tt)
        say(f"  {name:<50} {mj * 1e3:8.2f} {mt * 1e3:9.2f} {mt / mj:8.2f}x")


# --- orchestration -----------------------------------------------------------------------

class Worker:
    def __init__(self, variant: str, config: str, batch: int, args, init_path: str, log_dir: str):
        self.variant = variant
        self.log = open(os.path.join(log_dir, f"{variant}-{config}-{batch}.log"), "w+")
        cmd = [sys.executable, "-m", "benchmarks.train_speed", "--worker", variant,
               "--config", config, "--batch", str(batch), "--seed", str(args.seed), "--init", init_path]
        env = {**os.environ, **HEAP_ENV} if variant in HEAP_VARIANTS else None
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1, env=env)
        self.ready = self._read()["ready"]

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        self.proc.wait()
        self.log.seek(0)
        raise RuntimeError(f"worker {self.variant} died:\n{self.log.read()[-5000:]}")

    def run(self, n: int) -> dict:
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Tee:
    def __init__(self, path: Path | None):
        self.file = open(path, "w") if path else None

    def __call__(self, *parts) -> None:
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()


def machine_info() -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}; {len(os.sched_getaffinity(0))} cores usable; load average {load:.2f} at start; "
            f"Python {platform.python_version()}")


def parse_cases(specs: list[str]) -> list[tuple[str, int]]:
    defaults = {"tiny": [8, 16], "ddpm": [8, 16]}
    cases = []
    for spec in specs:
        name, _, batches = spec.partition(":")
        bs = [int(b) for b in batches.split(",")] if batches else defaults.get(name, [16])
        cases += [(name, b) for b in bs]
    return cases


def counterparts(variants: list[str]) -> dict[str, str]:
    """JAX variant -> the PyTorch variant it is compared with."""
    torch_step = next((v for v in variants if v in TORCH_VARIANTS and part_of(v) == "step"), None)
    out = {}
    for v in variants:
        if v in JAX_VARIANTS:
            part = part_of(v)
            out[v] = torch_step if part == "step" else f"torch-{part}"
            if v == "jax-heap" and "torch-heap" in variants:  # the same allocator on both sides
                out[v] = "torch-heap"
            if out[v] not in variants:
                out[v] = None
    return out


def correctness_gate(configs: list[str], tolerance: float, say) -> None:
    import jaxdiff_info  # noqa: F401
    from benchmarks import torch_unet

    for name in configs:
        t0 = time.perf_counter()
        r = torch_unet.check_against_jax(name, grads=(name == "tiny"))
        msg = (f"  {name}: forward max|eps_jax - eps_torch| = {r['eps_max_abs_diff']:.1e} "
               f"(max|eps| = {r['eps_max_abs']:.2f})")
        ok = r["eps_max_abs_diff"] <= tolerance
        if "grad_max_abs_diff" in r:
            msg += (f"; gradients: max abs diff {r['grad_max_abs_diff']:.1e} "
                    f"(max|grad| = {r['grad_max_abs']:.1e})")
            ok &= r["grad_max_abs_diff"] <= tolerance * max(1.0, r["grad_max_abs"])
        say(msg + f"  [{'ok' if ok else 'FAIL'}, {time.perf_counter() - t0:.0f} s]")
        if not ok:
            raise SystemExit(f"correctness gate failed for {name}")


def run_ops(args) -> None:
    """--ops: the layer micro-benchmarks of `ops_worker`, once per XLA flag setting."""
    say = Tee(Path(args.out) if args.out else None)
    say(f"# U-Net layers, JAX vs PyTorch on CPU ({time.strftime('%Y-%m-%d %H:%M')}); "
        f"command: python -m benchmarks.train_speed {' '.join(sys.argv[1:])}")
    say(f"# machine: {machine_info()}")
    specs = args.configs or list(OPS_SHAPES)
    for spec in specs:
        if spec not in OPS_SHAPES:
            raise SystemExit(f"--ops takes --configs from {', '.join(OPS_SHAPES)}")
        for worker, what in (("ops", "library XLA flags"), ("ops-xla", "XLA default flags")):
            say(f"\n## layers of {spec}, {what}")
            cmd = [sys.executable, "-m", "benchmarks.train_speed", "--worker", worker, "--config", spec,
                   "--reps", str(args.reps or 5)]
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            for line in out.stdout.splitlines():
                say(line)
    if say.file:
        say.file.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny only (b8, b16), 3 repetitions")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="CONFIG[:BATCH,...] (default: tiny:8,16 ddpm:8,16; --quick: tiny:8,16)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated (default {DEFAULT_VARIANTS}); choices: "
                         f"{', '.join(list(JAX_VARIANTS) + list(TORCH_VARIANTS))}")
    ap.add_argument("--breakdown", action="store_true",
                    help=f"variants {BREAKDOWN_VARIANTS}: where the difference comes from")
    ap.add_argument("--ops", action="store_true",
                    help="instead: layer micro-benchmarks (conv, GroupNorm, dropout), JAX vs PyTorch, "
                         "under both XLA flag settings")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 9; --quick 3)")
    ap.add_argument("--ddpm-reps", type=int, default=7, help="at most this many repetitions for ddpm")
    ap.add_argument("--rep-seconds", type=float, default=None,
                    help="work per repetition and variant (default 3; --quick 1.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--no-gate", action="store_true", help="skip the correctness gate")
    ap.add_argument("--out", default=None,
                    help="copy of the output ('' for none; default benchmarks/results_train_speed.txt, "
                         "none with --quick, --ops, --breakdown or --variants)")
    # internal: the worker processes
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--init", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.out is None and not (args.worker or args.ops or args.breakdown or args.variants or args.quick):
        args.out = str(REPO / "benchmarks" / "results_train_speed.txt")
    if args.worker in JAX_VARIANTS:
        return jax_worker(args)
    if args.worker in TORCH_VARIANTS:
        return torch_worker(args)
    if args.worker in ("ops", "ops-xla"):
        return ops_worker(args)
    if args.ops:
        return run_ops(args)

    reps = args.reps or (3 if args.quick else 9)
    rep_seconds = args.rep_seconds or (1.5 if args.quick else 3.0)
    try:
        cases = parse_cases(args.configs or (["tiny"] if args.quick else ["tiny", "ddpm"]))
    except ValueError:
        ap.error(f"--configs takes NAME or NAME:B1,B2 with integer batch sizes, got {' '.join(args.configs)}")
    for name, batch in cases:
        if name not in ("tiny", "ddpm") or batch < 1:
            ap.error(f"--configs: tiny or ddpm with batch sizes >= 1, got {name}:{batch}")
    variants = (args.variants or (BREAKDOWN_VARIANTS if args.breakdown else DEFAULT_VARIANTS)).split(",")
    for v in variants:
        if v not in JAX_VARIANTS and v not in TORCH_VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(list(JAX_VARIANTS) + list(TORCH_VARIANTS))}")
    pairs = counterparts(variants)
    jax_main = next((v for v in variants if v in JAX_VARIANTS), None)
    torch_main = pairs.get(jax_main)

    say = Tee(Path(args.out) if args.out else None)
    say(f"# U-Net training step, JAX vs PyTorch on CPU  ({time.strftime('%Y-%m-%d %H:%M')})")
    say(f"# command: python -m benchmarks.train_speed {' '.join(argv if argv is not None else sys.argv[1:])}")
    say(f"# machine: {machine_info()}")
    say(f"# reps: {reps} (ddpm at most {args.ddpm_reps}), ~{rep_seconds:g} s of work per repetition and "
        "variant, rotating order; medians; compilation and 2 warm-up steps excluded")

    import numpy as np
    import torch

    import jaxdiff_info  # noqa: F401  (before any JAX computation)
    import jax
    from benchmarks import torch_unet
    from jaxdiff_info import unet

    import flax
    import optax

    say(f"# versions: jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
        f"torch {torch.__version__}")
    if not args.no_gate:
        say(f"correctness gate (PyTorch port vs JAX, same parameters, tolerance {args.tolerance:g}):")
        correctness_gate(sorted({c for c, _ in cases}, key=lambda c: c != "tiny"), args.tolerance, say)

    rows = []
    kernel = {}  # (config, batch, variant) -> per repetition (minor page faults, system CPU s) per step
    with tempfile.TemporaryDirectory() as tmp:
        for name, batch in cases:
            config = unet.get_config(name)
            params = unet.init_params(config, jax.random.key(args.seed, impl="rbg"))
            leaves = jax.tree.leaves(params)
            np.savez(os.path.join(tmp, f"{name}.npz"), **{f"p{i}": np.asarray(l) for i, l in enumerate(leaves)})
            model = torch_unet.build(name, config)
            torch_unet.load_jax_params(model, params)
            torch.save(model.state_dict(), os.path.join(tmp, f"{name}.pt"))
            del model, params, leaves

            say(f"\n## {name}, batch {batch} "
                f"({unet.count_params(unet.abstract_params(config), include_class_embedding=False):,} "
                "parameters without the class embedding)")
            workers = []
            try:
                for v in variants:  # one after another: compilations do not overlap
                    t0 = time.perf_counter()
                    init = os.path.join(tmp, f"{name}.{'npz' if v in JAX_VARIANTS else 'pt'}")
                    w = Worker(v, name, batch, args, init, tmp)
                    workers.append(w)
                    r = w.ready
                    extra = f", {r['step_source']}" if "step_source" in r else ""
                    say(f"  {LABELS[v]:<24} ready in {time.perf_counter() - t0:5.1f} s: compile "
                        f"{r['compile_s']:5.1f} s, warm-up steps {', '.join(f'{s:.2f}' for s in r['warmup_s'])} s, "
                        f"losses {', '.join(f'{l:.3f}' for l in r['first_losses'])}{extra}")
                step_est = min(w.ready["warmup_s"][-1] for w in workers)
                n = max(1, round(rep_seconds / step_est))
                n_reps = min(reps, args.ddpm_reps) if name == "ddpm" else reps
                times = {w.variant: [] for w in workers}
                for rep in range(n_reps):
                    i = rep % len(workers)
                    for w in workers[i:] + workers[:i]:
                        out = w.run(n)
                        if not math.isfinite(out["loss"]):
                            raise SystemExit(f"{w.variant}: loss {out['loss']}")
                        times[w.variant].append(out["seconds"] / n)
                        kernel.setdefault((name, batch, w.variant), []).append((out["minflt"] / n, out["sys_s"] / n))
                    say(f"  rep {rep + 1}/{n_reps} ({n} step{'s' * (n > 1)} each), ms/step: " + ", ".join(
                        f"{v} {ts[-1] * 1e3:.0f}" for v, ts in times.items()))
            finally:
                for w in workers:
                    w.close()
            rows.append((name, batch, times, {w.variant: w.ready for w in workers}))

    med = lambda ts: statistics.median(ts)  # noqa: E731
    say("\n## results: median over repetitions; images/s = batch x steps/s; ratio = JAX steps/s / "
        "PyTorch steps/s")
    if jax_main and torch_main:
        say(f"JAX = {LABELS[jax_main]} ({jax_main}), PyTorch = {LABELS[torch_main]} ({torch_main})\n")
        header = ("| config | batch | JAX steps/s | JAX img/s | torch steps/s | torch img/s | JAX/torch |")
        say(header)
        say("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
        for name, batch, times, _ in rows:
            j, t = med(times[jax_main]), med(times[torch_main])
            say(f"| {name:<6} | {batch:>5} | {1 / j:>11.2f} | {batch / j:>9.1f} | {1 / t:>13.2f} | "
                f"{batch / t:>11.1f} | {t / j:>8.2f}x |")
    say("\nevery variant (ms per step: median [min, max]; ratio against its PyTorch counterpart):")
    for name, batch, times, ready in rows:
        for v, ts in times.items():
            m = med(ts)
            line = (f"  {name:<5} b{batch:<4} {v:<13} {LABELS[v]:<24} {m * 1e3:8.1f} "
                    f"[{min(ts) * 1e3:7.1f}, {max(ts) * 1e3:7.1f}] ms  {batch / m:7.1f} img/s")
            if pairs.get(v):
                line += f"  {med(times[pairs[v]]) / m:5.2f}x vs {pairs[v]}"
            if v in JAX_VARIANTS:
                line += f"  (compile {ready[v]['compile_s']:.0f} s)"
            faults, sys_s = zip(*kernel[(name, batch, v)])
            line += f"  page faults/step {med(faults):.0f}, system CPU {med(sys_s) * 1e3:.0f} ms/step"
            say(line)
    if jax_main and torch_main:
        say("\nratio per repetition (the two ran back to back): median [min, max] of torch / JAX ms per step")
        for name, batch, times, _ in rows:
            r = [t / j for t, j in zip(times[torch_main], times[jax_main])]
            say(f"  {name:<5} b{batch:<4} {med(r):.2f}x [{min(r):.2f}, {max(r):.2f}] over {len(r)} repetitions")
    if say.file:
        say.file.close()
        print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
