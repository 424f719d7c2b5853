"""The mixture as a class-conditional eps-predictor, with a network's interface."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info.mixture.closed_form import class_eps, isotropic_eps_gains
from jaxdiff_info.mixture.model import GaussianMixture
from jaxdiff_info.schedule import Schedule
from jaxdiff_info.static import schedule_key


def _component(mixture: GaussianMixture, k: jax.Array) -> GaussianMixture:
    """Component k alone, a mixture of one (its eps is the class eps of k when classes are single components)."""
    one = lambda a: None if a is None else a[k][None]  # noqa: E731
    return GaussianMixture(one(mixture.means), one(mixture.stds), jnp.zeros((1,), mixture.log_weights.dtype),
                           one(mixture.basis), one(mixture.spectrum), None)


def _one_class(mixture: GaussianMixture) -> GaussianMixture:
    """The same components as one class: its class eps is the unconditional eps, O(K d r)."""
    return dataclasses.replace(mixture, class_sizes=(mixture.num_components,))


def eps_fn(schedule: Schedule, with_null: bool = True):
    """The mixture as a class-conditional eps-predictor eps(mixture, x_t, t, k), the same
    interface as a network eps(params, x_t, t, k): t is a model timestep of `schedule`
    (`Schedule.timesteps`, so a respaced schedule works too), k = C is the unconditional
    prediction. When every class is a single component, eps of one k costs O(d r) for a
    class and O(K d r) for the null class: no (K, d) rows per point.

    The function also has
      `all_classes(mixture, x_t, t, with_null)`: (C [+ 1], d), every class's eps at once (the
          component posterior is formed once, not once per class);
      `affine_classes(mixture, t)`: (g (C,), centres (C, d)) with eps(x_t, t, c) =
          g_c (x_t - centres_c) for every class c and every x_t, when every class is a single
          isotropic component or point (g_c = sqrt(1 - abar) / v_c, centres_c =
          sqrt(abar) m_c); None for other mixtures. The online classifier then takes its
          class log-likelihoods in matrix form (`tracking.Tracker`);
      `check_schedule(sampling)`, which refuses a sampling schedule with steps this eps was
          not built for.

    with_null=False: class-conditional predictions only (k = C returns NaN, loud not wrong).

    Equal schedules give the same function (kept for the 64 most recently used), so that the online
    classifier's compiled loop, keyed on it, is reused by the next call.
    """
    key = (schedule_key(schedule), bool(with_null))
    if key not in _EPS_FNS:
        if len(_EPS_FNS) >= 64:
            _EPS_FNS.pop(next(iter(_EPS_FNS)))
        _EPS_FNS[key] = _eps_fn(schedule, bool(with_null))
    _EPS_FNS[key] = _EPS_FNS.pop(key)  # the most recently used last
    return _EPS_FNS[key]


_EPS_FNS: dict = {}  # (schedule by value, with_null) -> its eps function, least recently used first


def _eps_fn(schedule: Schedule, with_null: bool):
    """`eps_fn`, built."""

    def alpha_bar_of(t):
        """alpha_bar at model timestep t: the schedule's step whose timestep is t."""
        i = jnp.searchsorted(schedule.timesteps, t)
        return schedule.alpha_bar[jnp.clip(i, 0, schedule.num_steps - 1)]

    def all_classes(mixture: GaussianMixture, x_t: jax.Array, t: jax.Array, null: bool = True) -> jax.Array:
        rows = class_eps(mixture, x_t, alpha_bar_of(t))
        return rows if null else rows[:-1]

    def affine_classes(mixture: GaussianMixture, t: jax.Array):
        if not (mixture.singleton_classes and mixture.basis is None):
            return None
        alpha_bar = alpha_bar_of(t)
        return isotropic_eps_gains(mixture, alpha_bar), jnp.sqrt(alpha_bar) * mixture.means

    def mixture_eps(mixture: GaussianMixture, x_t: jax.Array, t: jax.Array, k: jax.Array) -> jax.Array:
        C = mixture.num_classes
        alpha_bar = alpha_bar_of(t)
        if mixture.singleton_classes:  # class k is component k: its row alone, and the null row if asked for
            row = class_eps(_component(mixture, jnp.clip(k, 0, C - 1)), x_t, alpha_bar)[0]
            null = class_eps(_one_class(mixture), x_t, alpha_bar)[0] if with_null else jnp.nan
            return jnp.where(k < C, row, null)
        rows = class_eps(mixture, x_t, alpha_bar)
        e = rows[jnp.clip(k, 0, C)]
        return e if with_null else jnp.where(k < C, e, jnp.nan)

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
    mixture_eps.affine_classes = affine_classes
    mixture_eps.check_schedule = check_schedule
    return mixture_eps
