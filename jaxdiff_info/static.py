"""Values as static arguments of compiled functions, hashed and compared by value, so that a
second call with equal values (another seed of a study) reuses the compiled program instead of
compiling it again."""

from __future__ import annotations

import numpy as np


class StaticArray:
    """A NumPy array as a static argument of a compiled function (hashed and compared by
    value), so that a second call with an equal array reuses the compilation."""

    def __init__(self, array):
        self.array = np.array(array)
        self.array.flags.writeable = False
        self._key = (self.array.shape, self.array.dtype.str, self.array.tobytes())

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, StaticArray) and self._key == other._key


def schedule_key(schedule) -> tuple:
    """A `Schedule` by value: its arrays and its number of training steps."""
    arrays = (schedule.betas, schedule.alpha_bar, schedule.timesteps)
    return tuple(StaticArray(np.asarray(a)) for a in arrays) + (schedule.num_train_steps,)
