"""When does a trained image model decide its class? `python -m experiments.cifar10 analyze`.

    python -m experiments.cifar10 analyze --checkpoint checkpoints/tiny-digits           # a trained network
    python -m experiments.cifar10 analyze --reference gaussian --dataset digits          # an exact reference
    python -m experiments.cifar10 analyze --checkpoint checkpoints/tiny-digits --compare-references

For every class, N trajectories are generated with the trained model; the online Bayesian
classifier tracks P(k | x_t) for all K classes along them, in the same compiled loop as for
mixtures (jaxdiff_info.tracking). The decision problems are the class label and those the
dataset defines, or the class label and those given with --problem. Beside the online
curves, by default, the I-MMSE estimator of the class label and of D_k (the model's
denoisers; x_0 from the held-out split, "immse", and from the generated samples,
"immse_model"; a reference's exact denoisers) with the differences in summary.json
("immse"). Writes into --out: summary.json (the mixture experiment's schema, plus
"classes"), curves.npz, class_entropy_rate.png, entropy_rate.png, posterior_paths.png,
posterior_heatmap.png, class_information.png (with I-MMSE). A reference model (a mixture: `gaussian` or
`empirical`, experiments/cifar10/references.py) adds forward Monte Carlo and the exact state
posterior along the same trajectories; --compare-references analyses both references of the
checkpoint's training images with the same settings and adds references.png and the
differences to summary.json ("references").
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from experiments import cli
from experiments.cifar10.outputs import output_folder, print_immse, write_outputs
from experiments.cli import describe_times, report_written, run_command

PROG = "python -m experiments.cifar10 analyze"
OUTPUTS = ("summary.json", "curves.npz", "class_entropy_rate.png", "entropy_rate.png",
           "posterior_paths.png", "posterior_heatmap.png")
COMPARISON_OUTPUTS = ("references.png",)  # with --compare-references
IMMSE_OUTPUTS = ("class_information.png",)  # with I-MMSE (the default)


@dataclasses.dataclass(frozen=True)
class AnalyzeConfig:
    """Everything one analysis depends on; the CLI builds it."""

    checkpoint: Path | None = None
    out: Path = Path("results/cifar10")
    reference: str | None = None  # "gaussian" or "empirical": analyse that reference of `dataset` instead
    dataset: str | None = None
    data_dir: Path = Path("data")
    num_examples: int | None = None  # training images the reference is built from (None: all)
    compare_references: bool = False
    problems: tuple[str, ...] = ()  # --problem texts (decisions.parse_problem); (): the dataset's
    samples_per_class: int = 64
    steps: int | None = None  # None: every step of the model's training schedule
    variance: str = "large"
    clip_x0: bool = True
    generation: str = "conditional"
    guidance: float = 0.0
    batch_size: int | None = None  # trajectories per network call (None: all at once)
    use_ema: bool = True
    bf16: bool = False  # the network's dense and convolution layers in bfloat16
    checkpoint_step: int | None = None
    seed: int = 0
    bandwidth: float = 0.02
    num_resamples: int = 200
    paths_per_class: int = 2
    num_snapshots: int = 6
    immse: bool = True
    immse_samples_per_class: int | None = None  # held-out images per class (None: --samples-per-class, or fewer)
    overwrite: bool = False
    progress: bool = True


# --- the CLI edge ----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint folder written by `train` (default: none; give it or --reference)")
    p.add_argument("--reference", choices=["gaussian", "empirical"], default=None,
                   help="analyse an exact reference model of --dataset instead of a network: gaussian (each class one "
                        "Gaussian with its mean and covariance) or empirical (each class the mixture of its training "
                        "images) (default: none)")
    p.add_argument("--dataset", default=None, help="the dataset of --reference: digits, shapes or cifar10 (default: none)")
    p.add_argument("--data-dir", type=Path, default=AnalyzeConfig.data_dir, help="where cifar10 is read from")
    p.add_argument("--num-examples", type=int, default=None,
                   help="build --reference from the first N training images (default: all of them)")
    p.add_argument("--compare-references", action="store_true",
                   help="with --checkpoint: also analyse both references of the checkpoint's training images with the "
                        "same settings, and write references.png and the differences")
    p.add_argument("--samples-per-class", type=int, default=AnalyzeConfig.samples_per_class,
                   help="trajectories generated from each class")
    p.add_argument("--problem", action="append", default=None, metavar="NAME=GROUP|GROUP",
                   help="a decision problem to track beside the class label, repeatable: groups of "
                        "comma-separated class names or indices, e.g. \"3 vs 8=3|8\" or "
                        "\"odd vs even=1,3,5,7,9|0,2,4,6,8\", or the name of one the dataset defines "
                        "(default: all those the dataset defines)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps T, respaced from the model's schedule (default: all of them)")
    p.add_argument("--variance", choices=["small", "large"], default=AnalyzeConfig.variance,
                   help="reverse-step variance: large = beta_t (Ho et al. for CIFAR-10), small = beta~_t")
    p.add_argument("--no-clip", action="store_true",
                   help="do not clip the predicted x_0 to [-1, 1] in each step (default: clipped, as in Ho et al.; "
                        "the tracker uses whichever kernel generates)")
    p.add_argument("--generation", choices=["conditional", "unconditional"], default=AnalyzeConfig.generation,
                   help="generate from each class (per-class profiles) or from the null class")
    p.add_argument("--guidance", type=cli.finite_nonnegative, default=AnalyzeConfig.guidance,
                   help="classifier-free guidance weight w >= 0 (0: none)")
    p.add_argument("--batch-size", type=cli.positive_int, default=None,
                   help="trajectories per network call (each call evaluates all K classes) (default: all at once)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of their EMA")
    p.add_argument("--bf16", action="store_true",
                   help="compute the network's dense and convolution layers in bfloat16 (GroupNorm, softmax and the "
                        "output stay float32; faster on GPUs and TPUs) (default: float32)")
    p.add_argument("--checkpoint-step", type=int, default=None, help="which saved step (default: the latest)")
    p.add_argument("--seed", type=int, default=AnalyzeConfig.seed, help="seed of the noise and the bootstrap")
    p.add_argument("--bandwidth", type=cli.finite_nonnegative, default=AnalyzeConfig.bandwidth,
                   help="smoothing of the entropy rates in normalised time")
    p.add_argument("--bootstrap", type=cli.resamples, default=AnalyzeConfig.num_resamples, help="bootstrap resamples")
    p.add_argument("--no-immse", action="store_true",
                   help="skip the I-MMSE cross-check (the class label's H and D_k from the model's denoisers; "
                        "default: computed beside the online curves)")
    p.add_argument("--immse-samples-per-class", type=int, default=None,
                   help="held-out images per class for I-MMSE (default: --samples-per-class, or as many as the "
                        "smallest class of the held-out split has)")
    p.add_argument("--out", type=cli.folder, default=AnalyzeConfig.out, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(a: argparse.Namespace) -> AnalyzeConfig:
    return AnalyzeConfig(
        checkpoint=a.checkpoint, reference=a.reference, dataset=a.dataset, data_dir=a.data_dir,
        num_examples=a.num_examples, compare_references=a.compare_references, out=a.out, problems=tuple(a.problem or ()),
        samples_per_class=a.samples_per_class, steps=a.steps,
        variance=a.variance, clip_x0=not a.no_clip, generation=a.generation, guidance=a.guidance, batch_size=a.batch_size,
        use_ema=not a.raw_weights, bf16=a.bf16, checkpoint_step=a.checkpoint_step, seed=a.seed, bandwidth=a.bandwidth,
        num_resamples=a.bootstrap, immse=not a.no_immse, immse_samples_per_class=a.immse_samples_per_class,
        overwrite=a.overwrite, progress=not a.no_progress)


def run_from_args(a: argparse.Namespace) -> int:
    """The CLI: 0 on success, 2 (and one line on stderr) on bad input, 130 on Ctrl-C."""
    from experiments.cifar10 import references

    start = time.perf_counter()
    config = config_from_args(a)
    status, summary = run_command(PROG, lambda: run(config), out=a.out, outputs=outputs(config))
    if status or summary is None:  # summary None: a process other than 0 of a multi-process run
        return status
    report_written(outputs(config), a.out, start)
    for problem in summary["problems"]:
        present = [est for est in summary["estimators"] if est in problem["peak_time"]]
        if len(present) == 1:
            print(f"  {problem['name']:<24s} {describe_times(problem, 'online')}")
            continue
        print(f"  {problem['name']}")
        for est in present:
            print(f"    {est:<12s} {describe_times(problem, est)}")
    print_immse(summary)
    references.print_comparison(summary)
    return 0


def outputs(config: AnalyzeConfig) -> tuple[str, ...]:
    return (OUTPUTS + (IMMSE_OUTPUTS if config.immse else ())
            + (COMPARISON_OUTPUTS if config.compare_references else ()))


def check_sources(config: AnalyzeConfig) -> None:
    """ValueError, one line, unless the options name one model to analyse."""
    if (config.checkpoint is None) == (config.reference is None):
        raise ValueError("give --checkpoint (a trained network) or --reference gaussian|empirical with --dataset")
    if config.reference is not None and config.dataset is None:
        raise ValueError("--reference needs --dataset (digits, shapes or cifar10)")
    if config.checkpoint is not None and config.dataset is not None:
        raise ValueError("--dataset is for --reference; a checkpoint is analysed on its own dataset")
    if config.compare_references and config.checkpoint is None:
        raise ValueError("--compare-references holds a checkpoint's network against its references: give --checkpoint")
    if config.num_examples is not None and config.num_examples < 1:
        raise ValueError(f"--num-examples must be >= 1, got {config.num_examples}")
    if config.bf16 and config.checkpoint is None:
        raise ValueError("--bf16 sets the precision of a network: give --checkpoint (a reference is computed exactly)")
    if config.immse_samples_per_class is not None:
        if not config.immse:
            raise ValueError("--immse-samples-per-class is for I-MMSE; drop it or --no-immse")
        if config.immse_samples_per_class < 2:
            raise ValueError(f"--immse-samples-per-class must be >= 2 (for confidence intervals), got "
                             f"{config.immse_samples_per_class}")
        if config.reference is not None:
            raise ValueError("--immse-samples-per-class sets the held-out images of a network; a reference's I-MMSE "
                             "uses --samples-per-class draws")


def run(config: AnalyzeConfig) -> dict:
    """Analyse the checkpoint (or the reference), write the result files, and return the summary.

    The files go into a stage folder beside config.out, created before the analysis and moved
    into place when all are written (`results.staged_outputs`). Under jax.distributed
    (`jaxdiff_info.distributed`) every process computes and only process 0 writes; the others
    return None.
    """
    import jax.numpy as jnp

    import jaxdiff_info as jdi
    from experiments.cifar10 import references
    from jaxdiff_info import distributed, plots, results, training, unet
    from jaxdiff_info.analysis import posterior_note

    if config.samples_per_class < 2:
        raise ValueError(f"--samples-per-class must be >= 2, got {config.samples_per_class}")
    check_sources(config)
    if distributed.initialize():
        distributed.one_line_fatal_errors()  # JAX's termination when another process dies: one line
    if config.reference is not None:
        return run_reference(config)
    model = training.load_checkpoint(config.checkpoint, step=config.checkpoint_step, use_ema=config.use_ema)
    check_steps(config, model.num_train_steps)
    problems = choose_problems(config.problems, model.class_names, model.decision_problems)
    schedule = sampling_schedule(config, model.num_train_steps)
    check_memory(config, model.config, unet.count_params(model.params))
    held_out = None
    if config.immse:
        if not model.has_null:
            raise ValueError("I-MMSE needs the unconditional eps(x_t, t, null) and this checkpoint was trained "
                             "without label dropout (no null class); pass --no-immse")
        held_out = load_held_out(model.dataset, config.data_dir)
        fewest = int(np.bincount(held_out[1], minlength=model.config.num_classes).min())
        if config.immse_samples_per_class is not None and config.immse_samples_per_class > fewest:
            raise ValueError(f"--immse-samples-per-class {config.immse_samples_per_class} is more than the "
                             f"{fewest} held-out images of the smallest class; ask for at most {fewest}")
    refs = {}
    if config.compare_references:  # built (and their data read) before anything is written
        examples = references.checkpoint_examples(config.checkpoint)
        for name in ("gaussian", "empirical"):
            mixture, _, _, _, description = references.load_reference(name, model.dataset, config.data_dir, examples)
            cli.check_memory("--samples-per-class", config.samples_per_class, lambda n, m=mixture: references.bytes_needed(
                m, n, config.num_snapshots), minimum=2)
            refs[name] = (mixture, description)
    with output_folder(config.out, outputs(config), config.overwrite) as out:
        K = model.config.num_classes
        shape = (model.config.image_size, model.config.image_size, model.config.channels)
        eps = unet.make_eps_fn(model.config, compute_dtype=jnp.bfloat16 if config.bf16 else None)
        network = jdi.Network(eps, model.params, shape, K, has_null=model.has_null)
        sampler = make_sampler(config)
        result = analyze(config, network, schedule, problems, model.class_names, shape, "analyze", held_out)
        description = f"{model.config_name} on {model.dataset}, step {model.step}"
        settings = {
            "checkpoint": str(config.checkpoint), "checkpoint_step": model.step, "model_config": model.config_name,
            "dataset": model.dataset, "weights": "ema" if config.use_ema else "raw", "model": description,
            "network_compute_dtype": "bfloat16 (dense and convolution layers; GroupNorm, softmax, output float32)"
                                     if config.bf16 else "float32",
            **common_settings(config, schedule, model.num_train_steps),
            "posterior": {"online": result.posterior},
            "posterior_note": posterior_note(result.posterior, sampler),
        }
        plain = dataclasses.replace(config, immse=False)  # the references: online curves only
        compared = {name: (analyze(plain, mixture, schedule, problems, model.class_names, shape, name), desc)
                    for name, (mixture, desc) in refs.items()}
        if compared:
            label = result.curves.index("class")
            settings["references"] = references.compare(result, compared, label)
        summary = write_outputs(out, result, settings, extra={f"{n}/": r.curves for n, (r, _) in compared.items()})
        if compared:
            fig = references.overlay_figure(result, compared, label, f"network: {description}",
                                            f"{description} against its references; {result.sampler}; "
                                            f"{config.samples_per_class} trajectories per class, {schedule.num_steps} steps")
            results.save_figure(fig, out / "references.png")
            plots.plt.close(fig)
        cli.checkpoint()  # a Ctrl-C lost in a finaliser: the results stay unmoved
        return summary if distributed.is_primary() else None


def run_reference(config: AnalyzeConfig) -> dict:
    """Analyse reference `config.reference` of `config.dataset`: online, with forward Monte
    Carlo and the exact state posterior beside it."""
    from experiments.cifar10 import references
    from jaxdiff_info import distributed, unet
    from jaxdiff_info.analysis import posterior_note

    mixture, shape, class_names, named, description = references.load_reference(
        config.reference, config.dataset, config.data_dir, config.num_examples)
    check_steps(config, unet.TRAIN_STEPS)
    problems = choose_problems(config.problems, class_names, named)
    schedule = sampling_schedule(config, unet.TRAIN_STEPS)
    cli.check_memory("--samples-per-class", config.samples_per_class,
                     lambda n: references.bytes_needed(mixture, n, config.num_snapshots), minimum=2)
    with output_folder(config.out, outputs(config), config.overwrite) as out:
        result = analyze(config, mixture, schedule, problems, class_names, shape, config.reference)
        sampler = make_sampler(config)
        summary = write_outputs(out, result, {
            "reference": config.reference, "dataset": config.dataset, "model": description,
            "num_components": mixture.num_components,
            **common_settings(config, schedule, unet.TRAIN_STEPS),
            "posterior": {"online": result.posterior, "online_state": result.curves.exact_state.posterior,
                          "forward_mc": result.forward_mc.posterior},
            "posterior_note": posterior_note(result.posterior, sampler),
        })
        cli.checkpoint()
        return summary if distributed.is_primary() else None




def sampling_schedule(config: AnalyzeConfig, num_train_steps: int):
    """The model's training schedule (linear, num_train_steps), respaced to --steps."""
    import jaxdiff_info as jdi

    train_schedule = jdi.linear_schedule(num_train_steps)
    return train_schedule if config.steps in (None, num_train_steps) else jdi.respace(train_schedule, config.steps)


def make_sampler(config: AnalyzeConfig):
    import jaxdiff_info as jdi

    return jdi.Sampler("ddpm", config.variance, clip_x0=1.0 if config.clip_x0 else None)


def common_settings(config: AnalyzeConfig, schedule, num_train_steps: int) -> dict:
    return {"schedule": {"steps": schedule.num_steps, "train_steps": num_train_steps},
            "generation": config.generation, "guidance": config.guidance,
            "num_samples_per_class": config.samples_per_class, "seed": config.seed,
            "rate_bandwidth": config.bandwidth}


def analyze(config: AnalyzeConfig, model, schedule, problems, class_names, shape, desc: str, held_out=None):
    """`analysis.analyze_model` of a network or a mixture with the options of `config`, with a
    progress bar (the online run, then the I-MMSE runs). held_out: (x_0, labels, description)
    of a network's I-MMSE from data."""
    import jax
    from tqdm import tqdm

    from jaxdiff_info.analysis import analyze_model
    from jaxdiff_info.api import Network

    network_runs = 0  # I-MMSE of a network: from data and from its samples, each a pass over the steps
    if config.immse and isinstance(model, Network):
        network_runs = (held_out is not None) + (config.generation != "unconditional")
    total = schedule.num_steps * (1 + network_runs)
    bar = tqdm(total=total, unit="step", desc=desc, disable=not config.progress, file=sys.stderr)
    try:
        return analyze_model(
            model, schedule, problems, samples_per_class=config.samples_per_class, key=jax.random.key(config.seed),
            sampler=make_sampler(config), generation=config.generation, guidance=config.guidance,
            class_names=class_names, batch_size=config.batch_size, bandwidth=config.bandwidth,
            num_resamples=config.num_resamples, paths_per_class=config.paths_per_class,
            num_snapshots=config.num_snapshots, progress=cli.with_checkpoint(bar.update), shape=shape,
            immse=config.immse, held_out=None if held_out is None else held_out[:2],
            held_out_name=held_out[2] if held_out is not None else "", immse_samples_per_class=config.immse_samples_per_class,
            immse_progress=cli.with_checkpoint(bar.update))
    finally:
        bar.close()


def load_held_out(dataset: str, data_dir: Path):
    """(x_0 in [-1, 1], labels, description) of the held-out split of `dataset`, the x_0 of I-MMSE
    "from data". ValueError, one line, when it cannot be loaded."""
    from jaxdiff_info import training
    from jaxdiff_info.data import load_dataset, to_model_range

    data = load_dataset(dataset, data_dir, split="test", seed=training.DATA_SEED)
    return to_model_range(data.images), data.labels, f"the held-out {dataset} test split ({len(data)} images)"




def choose_problems(texts, class_names, named) -> list:
    """The class label ("class"), then the problems of the --problem texts, or else every problem
    the dataset defines (``named``). ValueError, one line, for a bad text or a repeated name."""
    from jaxdiff_info import decisions

    K = len(class_names)
    if texts:
        chosen = [decisions.parse_problem(text, class_names, named) for text in texts]
    else:
        chosen = list(decisions.make_problems(named, K)) if named else []
    problems = [decisions.class_label(K, "class"), *chosen]
    names = [p.name for p in problems]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--problem names must be unique and not \"class\" (the class label's); repeated: "
                         f"{', '.join(repeated)}")
    return problems


def check_steps(config: AnalyzeConfig, num_train_steps: int) -> None:
    """ValueError, one line, unless --steps is between 2 and the model's schedule's steps."""
    if config.steps is not None and not 2 <= config.steps <= num_train_steps:
        raise ValueError(f"--steps must be >= 2 and <= {num_train_steps} (the model's schedule has only "
                         f"{num_train_steps} steps), got {config.steps}")


def bytes_needed(net, num_params: int, samples_per_class: int, batch_size: int | None, classes_per_call: int,
                 num_snapshots: int) -> int:
    """A generous estimate of an analysis' peak memory in bytes (`net`: the UNetConfig).

    N = K * samples_per_class trajectories hold x_t, the noise, the next x_t, x_0 and two
    images per snapshot (float32 images of H * W * C); each network call takes
    min(batch_size, N) trajectories times `classes_per_call` classes (K, or K + 1 with the
    null class), each image with the U-Net's activations: (num_res_blocks + 2) feature maps
    per level and the attention matrices. Twice the arrays and three times the activations,
    for intermediates; plus the weights (three copies) and 0.5 GB for compilation and the bootstrap.
    """
    n = net.num_classes * samples_per_class
    image = net.image_size**2 * net.channels
    sizes = [net.image_size // 2**level for level in range(len(net.ch_mult))]
    activations = sum((net.num_res_blocks + 2) * net.ch * mult * size**2 for mult, size in zip(net.ch_mult, sizes))
    activations += sum(size**4 for size in sizes if size in net.attn_resolutions)
    per_call = min(batch_size or n, n) * classes_per_call
    return (FIXED_BYTES + 3 * 4 * num_params
            + 4 * (2 * n * image * (4 + 2 * num_snapshots) + 3 * per_call * activations))


FIXED_BYTES = 512 * 2**20


def check_memory(config: AnalyzeConfig, net, num_params: int) -> None:
    """ValueError, one line, if the analysis cannot fit in the memory available, with the
    largest --samples-per-class that fits and, without --batch-size, a batch size that does."""
    calls = net.num_classes + (1 if config.generation == "unconditional" or config.guidance != 0 else 0)

    def needed(samples_per_class, batch_size=config.batch_size):
        return bytes_needed(net, num_params, samples_per_class, batch_size, calls, config.num_snapshots)

    def batched(available):
        if config.batch_size is not None:
            return None
        n = net.num_classes * config.samples_per_class
        batch = cli.largest_fitting(lambda b: needed(config.samples_per_class, b), available, 1, n)
        return None if batch is None else f"--batch-size {batch}"

    cli.check_memory("--samples-per-class", config.samples_per_class, needed, minimum=2, alternative=batched)

