"""When does a trained class-conditional model decide its class? The image-model analysis.

    result = analyze_model(jdi.Network(eps, params, shape, num_classes), schedule, problems,
                           samples_per_class=64, key=jax.random.key(0))

For every class, trajectories are generated with the model and the online classifier tracks
P(k | x_t) for all K classes along them (`jaxdiff_info.online_curves`, one compiled loop).
On top of the online curves of every decision problem it gives the per-class curves of the
class label, snapshots of the predicted x_0 along a few trajectories, and the mean
posterior per generating class (the heat map). Beside the online classifier, a second
estimator that shares none of its assumptions: I-MMSE (`jaxdiff_info.immse_curves`), the
class label's H(Y | X_t) and D_k(t) from the model's denoisers, with x_0 from held-out data
("immse") and from the model's own generated samples ("immse_model"). docs/method.md defines
every quantity.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info import mixture as gmm
from jaxdiff_info import results
from jaxdiff_info.api import Network, forward_mc_curves, generating_classes, immse_curves, online_curves, recorded_paths
from jaxdiff_info.curves import Curves, bootstrap_replicates, class_curves
from jaxdiff_info.decisions import DecisionProblem, class_label
from jaxdiff_info.distributed import check_split, to_host
from jaxdiff_info.schedule import Sampler, Schedule, eps_to_x0
from jaxdiff_info.tracking import guided

# Ho et al.'s CIFAR-10 sampler: sigma_t^2 = beta_t, the x_0 prediction clipped to [-1, 1]
IMAGE_SAMPLER = Sampler("ddpm", "large", clip_x0=1.0)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What `analyze_model` measured (host arrays).

    curves: the online curves of every decision problem (`Curves`, with the trajectories);
    class_curves: the class label's curves over the trajectories of each class, "problems"
    named by class (None for unconditional generation); snapshots: list of
    (t, x_t (M, ...), predicted x_0 (M, ...)) of the recorded trajectories, from t = T down
    to t = 0 (the generated sample), x_0 as the generating kernel predicts it (`kernel_x0`:
    guidance and clipping included); class_names (K,); sampler: the kernel, in words.

    For a mixture model (a reference): forward_mc, the forward Monte Carlo curves with the
    exact state posterior, and curves.exact_state, the exact P(k | x_t) read out along the
    same online trajectories; shape: the shape of one example (x_0 and snapshots have it).

    I-MMSE (the class label, with D_k): immse, from held-out examples for a network (None
    without them) and from the exact denoisers for a mixture; immse_model, a network's
    denoisers on its own generated x_0 (conditional generation; None for a mixture, whose
    samples follow its own law: the two are the same).
    """

    curves: Curves
    class_curves: Curves | None
    snapshots: list
    class_names: tuple[str, ...]
    sampler: str
    forward_mc: Curves | None = None
    shape: tuple[int, ...] | None = None
    immse: Curves | None = None
    immse_model: Curves | None = None
    log_prior: np.ndarray | None = None  # (K,) log pi_k of the model

    def estimators(self) -> dict[str, Curves]:
        """Every estimator's curves by key: online, online_state and forward_mc (mixtures),
        immse and immse_model (those computed)."""
        out = {"online": self.curves}
        if self.forward_mc is not None:
            out.update(online_state=self.curves.exact_state, forward_mc=self.forward_mc)
        for name in ("immse", "immse_model"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @property
    def time(self) -> np.ndarray:
        return self.curves.time

    @property
    def posterior(self) -> str:
        """Which posterior the curves are of (`api.posterior_kind`)."""
        return self.curves.posterior

    @property
    def mean_posterior(self) -> np.ndarray:
        """(T, C, K) P(k | x_t) averaged over the trajectories of each generating class."""
        return self.curves.trajectories.mean_posterior

    @property
    def paths(self) -> np.ndarray:
        """(T, M, K) log P(k | x_t) along the recorded trajectories."""
        return self.curves.trajectories.path_log_posterior

    @property
    def path_classes(self) -> np.ndarray:
        """(M,) the generating class of each recorded trajectory (K: the null class)."""
        t = self.curves.trajectories
        return t.classes[t.path_index]

    @property
    def x_0(self) -> np.ndarray:
        x = self.curves.trajectories.x_0
        return x if self.shape is None else x.reshape(x.shape[0], *self.shape)


def analyze_model(
    network: Network | gmm.GaussianMixture,
    schedule: Schedule,
    problems: Sequence[DecisionProblem] | None = None,
    *,
    samples_per_class: int,
    key: jax.Array,
    sampler: Sampler = IMAGE_SAMPLER,
    generation: str = "conditional",
    guidance: float = 0.0,
    class_names: Sequence[str] | None = None,
    batch_size: int | None = None,
    bandwidth: float = 0.02,
    num_resamples: int = 200,
    paths_per_class: int = 2,
    num_snapshots: int = 6,
    progress: Callable[[int], None] | None = None,
    shape: Sequence[int] | None = None,
    immse: bool = True,
    held_out: tuple[np.ndarray, np.ndarray] | None = None,
    held_out_name: str = "held-out examples",
    immse_samples_per_class: int | None = None,
    immse_progress: Callable[[int], None] | None = None,
) -> Analysis:
    """Generate with `network` on `schedule` and track P(k | x_t) online; any class-conditional
    eps(params, x_t, t, k) with k = K the null class, or a mixture (`jaxdiff_info.references`:
    its closed-form eps, with forward Monte Carlo and the exact state posterior beside the
    online curves; shape: the shape of one example, e.g. (8, 8, 1), default (d,)).

    problems: decision problems over the K classes; the class label is put first when it is
    not among them (its per-class curves are `class_curves`). Trajectories are split over all
    devices (of all processes, under jax.distributed) when they divide evenly; several
    processes need them to. The other arguments are those of `online_curves`;
    num_snapshots: times (evenly spaced steps, T and 0 included) at which the predicted x_0 of
    the recorded trajectories is kept.

    immse: also the I-MMSE estimator of the class label on the same steps: for a network
    (it needs a null class) from held_out = (x_0 (n, *shape) in the model's range, labels (n,))
    ("immse", described as held_out_name; immse_samples_per_class of each class, default
    samples_per_class or the smallest class's count if fewer) and from its generated x_0
    ("immse_model", samples_per_class of each class); for a mixture from its exact denoisers
    (samples_per_class draws per class and step). immse_progress(steps_done) for each I-MMSE run.
    """
    model = network
    mixture = isinstance(model, gmm.GaussianMixture)
    shift = None  # a mixture's snapshots use the eps of the centred mixture: x_t moves by sqrt(abar) shift
    if mixture:
        shape = tuple(shape) if shape is not None else (model.dim,)
        if int(np.prod(shape)) != model.dim:
            raise ValueError(f"an example of shape {shape} has {int(np.prod(shape))} entries, the mixture d = {model.dim}")
        centred, shift = gmm.centred(model)
        network = Network(gmm.eps_fn(schedule), centred, (model.dim,), model.num_classes)
    K = network.num_classes
    if samples_per_class < 2:
        raise ValueError(f"--samples-per-class must be >= 2 (for confidence intervals), got {samples_per_class}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    names = tuple(str(n) for n in (class_names if class_names is not None else range(K)))
    if len(names) != K:
        raise ValueError(f"{len(names)} class names for a model of {K} classes")
    problems = list(problems or [])
    label = next((p for p in problems if sorted(map(len, p.groups)) == [1] * K), None)
    if label is None:
        label = class_label(K, "class")
        problems.insert(0, label)

    params = network.params
    snapshot_every = max(1, -(-schedule.num_steps // max(num_snapshots - 1, 1)))
    predict_x0 = jax.jit(jax.vmap(lambda p, x, t, c: kernel_x0(network, schedule, sampler, guidance, p, x, t, c),
                                  (None, 0, None, 0)))
    snapshots = []
    generating = generating_classes(K, samples_per_class, generation)
    path_index = recorded_paths(generating, paths_per_class)  # the paths online_curves records

    def snapshot(t, state):
        x = state.x[jnp.asarray(path_index)]
        x_model = x if shift is None else x - jnp.asarray(np.sqrt(alpha_bar(t)) * shift, x.dtype)
        x0 = x if t == 0 else predict_x0(params, x_model, t, jnp.asarray(generating[path_index]))
        if shift is not None and t > 0:
            x0 = x0 + jnp.asarray(shift, x0.dtype)
        x, x0 = to_host((x, x0))
        if example_shape is not None:
            x, x0 = x.reshape(x.shape[0], *example_shape), x0.reshape(x0.shape[0], *example_shape)
        snapshots.append((t, x, x0))

    example_shape = shape if mixture else None
    alpha_bar = lambda t: float(schedule.alpha_bar[t - 1]) if t > 0 else 1.0  # noqa: E731
    curves = online_curves(
        model, problems, schedule, samples_per_class=samples_per_class, key=key, sampler=sampler,
        generation=generation, guidance=guidance, bandwidth=bandwidth, num_resamples=num_resamples,
        paths_per_class=paths_per_class, batch_size=batch_size, chunk=snapshot_every, progress=progress,
        after_chunk=snapshot, sharding=trajectory_sharding(len(generating)))
    per_class = None
    if generation != "unconditional":
        per_class = class_curves(curves, label.name, names, jax.random.fold_in(key, 8))
    forward = None
    if mixture:
        forward = forward_mc_curves(model, problems, schedule, samples_per_class=samples_per_class,
                                    key=jax.random.fold_in(key, 9), bandwidth=bandwidth, num_resamples=num_resamples,
                                    sharding=trajectory_sharding(K * samples_per_class))
    from_data = from_model = None
    if immse:
        from_data, from_model = information_curves(
            model if mixture else network, schedule, label, curves, generation, samples_per_class, key,
            bandwidth=bandwidth, num_resamples=num_resamples, batch_size=batch_size, progress=immse_progress,
            held_out=held_out, held_out_name=held_out_name, per_class=immse_samples_per_class)
    log_prior = np.asarray(model.class_log_weights if mixture else network.log_prior(), np.float64)
    return Analysis(curves, per_class, snapshots, names, sampler.describe(), forward, example_shape, from_data,
                    from_model, log_prior)


def information_curves(model, schedule: Schedule, label: DecisionProblem, online: Curves, generation: str,
                       samples_per_class: int, key: jax.Array, *, bandwidth: float, num_resamples: int,
                       batch_size: int | None, progress, held_out, held_out_name: str, per_class: int | None):
    """(immse, immse_model) of `analyze_model`: the class label's I-MMSE curves from held-out
    examples (a network) or the exact denoisers (a mixture), and from the generated x_0."""
    K = model.num_classes
    common = dict(bandwidth=bandwidth, num_resamples=num_resamples)
    if isinstance(model, gmm.GaussianMixture):
        return immse_curves(model, [label], schedule, samples_per_class=samples_per_class,
                            key=jax.random.fold_in(key, 10), sharding=trajectory_sharding(K * samples_per_class),
                            **common), None
    model.require_null("the I-MMSE estimator (--no-immse skips it)")
    chunk = max(1, schedule.num_steps // 20)
    from_data = None
    if held_out is not None:
        x_0, labels = np.asarray(held_out[0]), np.asarray(held_out[1])
        if per_class is None:
            counts = np.bincount(labels, minlength=model.num_classes)
            per_class = int(min(samples_per_class, counts.min()))
        from_data = immse_curves(model, [label], schedule, samples_per_class=per_class, key=jax.random.fold_in(key, 10),
                                 x_0=x_0, labels=labels, source=held_out_name, batch_size=batch_size, chunk=chunk,
                                 progress=progress, sharding=trajectory_sharding(K * per_class, required=False),
                                 **common)
    from_model = None
    if generation != "unconditional":
        t = online.trajectories
        from_model = immse_curves(model, [label], schedule, samples_per_class=samples_per_class,
                                  key=jax.random.fold_in(key, 11), x_0=t.x_0, labels=t.classes,
                                  source="the model's own samples (the x_0 of the online trajectories)",
                                  estimator="immse_model", batch_size=batch_size, chunk=chunk, progress=progress,
                                  sharding=trajectory_sharding(K * samples_per_class), **common)
    return from_data, from_model


def immse_differences(result: Analysis) -> dict:
    """The cross-check of the two estimators (summary.json's "immse"): for each I-MMSE curve of
    the analysis ("data": immse, "model_samples": immse_model), how the online curve of the
    class label differs from it (online minus I-MMSE, `results.curve_differences`) and, per
    class, how the two D_k differ; {} without I-MMSE.

    With each, a consistency check: in a model whose unconditional density is the mixture of
    its class densities, D_k <= -log2 pi_k and I(Y; X_t) <= H(Y). A network's I-MMSE is a KL
    between its class-conditional and its null-class models, which need not be consistent: the
    largest t/T at which D_k exceeds its bound (the band's lower edge above it), per class, and
    at which H(Y | X_t) falls below 0 (the band's upper edge below it), or None where never."""
    online = result.curves
    out = {}
    bound = -result.log_prior / np.log(2.0) if result.log_prior is not None else None
    for est in ("immse", "immse_model"):
        other = getattr(result, est)
        if other is None:
            continue
        name = other.problems[0].name
        below_zero = other.time[other.entropy_bits_ci95[0, :, 1] < 0]
        pair = (bootstrap_replicates(online), bootstrap_replicates(other))
        entry = {"estimator": est, "method": other.method, "posterior": other.posterior,
                 "class_label": {"name": name, **results.curve_differences(online, other, online.index(name), 0,
                                                                           replicates=pair),
                                 "immse_entropy_below_zero_until_time": _latest(below_zero)}}
        if online.class_information_bits is not None:
            entry["classes"] = results.information_differences(online, other, result.class_names, replicates=pair)
            if bound is not None:
                for k, row in enumerate(entry["classes"]):
                    over = other.time[other.class_information_bits_ci95[k, :, 0] > bound[k]]
                    row["bound_bits"] = round(float(bound[k]), 6)
                    row["immse_above_bound_until_time"] = _latest(over)
        out["data" if est == "immse" else "model_samples"] = entry
    if out:
        out["difference_method"] = "online minus I-MMSE; " + results.DIFFERENCE_METHOD
        out["consistency"] = CONSISTENCY_NOTE
    return out


CONSISTENCY_NOTE = (
    "D_k <= -log2 pi_k (bound_bits) and H(Y | X_t) >= 0 hold when the unconditional model is the mixture of the "
    "class models, as for exact denoisers. A network's I-MMSE integrates ||eps(x_t, t, k) - eps(x_t, t, null)||^2, a KL "
    "between its class and null-class models: where they disagree (e.g. a null class trained on 10% of the labels), it "
    "keeps growing as t -> 0 where the class is long decided and the pair should agree. *_until_time: the largest t/T "
    "at which the 95% band is past the bound (None: never); below it the I-MMSE curve is not an entropy.")


def _latest(times: np.ndarray) -> float | None:
    return round(float(times.max()), 6) if times.size else None


def kernel_x0(network: Network, schedule: Schedule, sampler: Sampler, guidance: float, params, x_t, t, c):
    """The prediction of x_0 that the generating kernel of class c uses at step t (c = K: the
    null class): from eps_c + w (eps_c - eps_null) for a guided class, clipped to
    [-clip_x0, clip_x0] when the sampler clips."""
    K = network.num_classes
    step = schedule.timesteps[t - 1]
    eps = network.eps(params, x_t, step, c)
    if guidance != 0.0:
        eps = jnp.where(c < K, guided(eps, network.eps(params, x_t, step, K), guidance), eps)
    x0 = eps_to_x0(x_t, eps, schedule.alpha_bar[t - 1])
    return x0 if sampler.clip_x0 is None else jnp.clip(x0, -sampler.clip_x0, sampler.clip_x0)


def posterior_note(posterior: str, sampler: Sampler) -> str:
    """One sentence on what the kernel implies for the tracked posterior (docs/method.md):
    for the summary of an analysis."""
    if posterior == "path":
        return ("the kernels are guided (or DDIM eta < 1), so the tracked P(k | x_t, ..., x_T) is the posterior "
                "of the guided path law, not the state posterior P(k | x_t) of the model")
    variance = "sigma_t^2 = beta_t (Ho et al.'s CIFAR-10 sampler)" if sampler.variance == "large" else \
        "sigma_t^2 = beta~_t"
    return (f"{variance}: the tracker updates with the kernel that generated, so P(k | x_t, ..., x_T) "
            f"approximates the state posterior P(k | x_t) as far as the model's Gaussian reverse steps approximate "
            f"the reverse of its forward chain; coarser with few (respaced) steps and with beta_t than with "
            f"beta~_t, which is exact only for point data")


def trajectory_sharding(num: int, required: bool = True):
    """Data-parallel over all devices of all processes: when `num` trajectories split evenly
    over them (else None); several processes need them to (ValueError, one line) unless
    `required` is False (then every process computes them all: the same numbers)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if required:
        check_split(num)
    devices = jax.devices()
    if len(devices) < 2 or num % len(devices):
        return None
    return NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
