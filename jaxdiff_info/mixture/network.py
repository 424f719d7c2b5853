"""The mixture as a class-conditional eps-predictor, with a network's interface."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info.mixture.closed_form import class_eps
from jaxdiff_info.mixture.model import GaussianMixture
from jaxdiff_info.schedule import Schedule


def eps_fn(schedule: Schedule, with_null: bool = True):
    """The mixture as a class-conditional eps-predictor eps(mixture, x_t, t, k), the same
    interface as a network eps(params, x_t, t, k): t is a model timestep of `schedule`
    (`Schedule.timesteps`, so a respaced schedule works too), k = C is the unconditional
    prediction.

    The function also has `all_classes(mixture, x_t, t, with_null)`: (C [+ 1], d), every
    class's eps at once (the component posterior is formed once, not once per class), which
    the online classifier uses; and `check_schedule(sampling)`, which refuses a sampling
    schedule with steps this eps was not built for.

    with_null=False: class-conditional predictions only (k = C returns NaN, loud not wrong).
    """

    def alpha_bar_of(t):
        """alpha_bar at model timestep t: the schedule's step whose timestep is t."""
        i = jnp.searchsorted(schedule.timesteps, t)
        return schedule.alpha_bar[jnp.clip(i, 0, schedule.num_steps - 1)]

    def all_classes(mixture: GaussianMixture, x_t: jax.Array, t: jax.Array, null: bool = True) -> jax.Array:
        rows = class_eps(mixture, x_t, alpha_bar_of(t))
        return rows if null else rows[:-1]

    def mixture_eps(mixture: GaussianMixture, x_t: jax.Array, t: jax.Array, k: jax.Array) -> jax.Array:
        rows = class_eps(mixture, x_t, alpha_bar_of(t))
        e = rows[jnp.clip(k, 0, mixture.num_classes)]
        return e if with_null else jnp.where(k < mixture.num_classes, e, jnp.nan)

    def check_schedule(sampling: Schedule) -> None:
        """Refuse a sampling schedule whose steps this eps was not built for."""
        mine = dict(zip(np.asarray(schedule.timesteps).tolist(), np.asarray(schedule.alpha_bar, np.float64)))
        for t, ab in zip(np.asarray(sampling.timesteps).tolist(), np.asarray(sampling.alpha_bar, np.float64)):
            if t not in mine or abs(mine[t] - ab) > 1e-6:
                raise ValueError(
                    f"the mixture's eps was built for another schedule (it has no step at model timestep {t} with "
                    f"alpha_bar {ab:.6g}); build it with mixture.eps_fn of the schedule you sample with, or of "
                    f"the schedule that one was respaced from")

    mixture_eps.all_classes = all_classes
    mixture_eps.check_schedule = check_schedule
    return mixture_eps
