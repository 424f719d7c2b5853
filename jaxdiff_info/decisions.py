"""Decision problems: questions about the class, as groups of classes.

A problem Z is a list of groups G_1..G_m of class indices. Classes in no group are left out
and the rest renormalised:

    P(z = j | x_t) = sum_{k in G_j} P(k | x_t) / sum_{k in any group} P(k | x_t)

"All classes, one group each" is the plain class label Y.

The formulas: docs/method.md, "Decision problems" and "Conditional entropy in bits and per-class profiles".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LOG2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class DecisionProblem:
    """A named question about the class: groups of class indices (disjoint, at least two)."""

    name: str
    groups: tuple[tuple[int, ...], ...]

    @property
    def classes(self) -> tuple[int, ...]:
        """The classes the problem is about, sorted."""
        return tuple(sorted(k for g in self.groups for k in g))


def make_problem(name: str, groups: Sequence[Sequence[int]], num_classes: int) -> DecisionProblem:
    """Validated decision problem over classes 0..num_classes-1."""
    if not isinstance(groups, (list, tuple)) or len(groups) < 2:
        raise ValueError(f"decision problem {name!r} needs at least two groups of classes")
    seen: set[int] = set()
    clean = []
    for group in groups:
        if not isinstance(group, (list, tuple)) or len(group) == 0:
            raise ValueError(f"decision problem {name!r}: every group must be a non-empty list of class indices")
        for k in group:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise ValueError(f"decision problem {name!r}: class index {k!r} is not an integer")
            if not 0 <= k < num_classes:
                raise ValueError(
                    f"decision problem {name!r} names class {k}, but the classes are 0..{num_classes - 1}"
                )
            if k in seen:
                raise ValueError(f"decision problem {name!r} puts class {k} in two groups")
            seen.add(int(k))
        clean.append(tuple(int(k) for k in group))
    return DecisionProblem(str(name), tuple(clean))


def class_label(num_classes: int, name: str = "all classes") -> DecisionProblem:
    """Y itself: every class its own group."""
    return make_problem(name, [[k] for k in range(num_classes)], num_classes)


def one_vs_rest(k: int, num_classes: int, name: str | None = None) -> DecisionProblem:
    """Class k against all the others."""
    rest = [j for j in range(num_classes) if j != k]
    return make_problem(name or f"{k} vs rest", [[k], rest], num_classes)


def make_problems(spec: Mapping[str, Sequence[Sequence[int]]], num_classes: int) -> tuple[DecisionProblem, ...]:
    """Problems from {name: groups}; names must be unique and non-empty."""
    problems = []
    for name, groups in spec.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError("decision problem names must be non-empty strings")
        problems.append(make_problem(name, groups, num_classes))
    if not problems:
        raise ValueError("give at least one decision problem")
    return tuple(problems)


def parse_problem(text: str, class_names: Sequence[str],
                  named: Mapping[str, Sequence[Sequence[int]]] | None = None) -> DecisionProblem:
    """A problem written as text: "NAME=GROUP|GROUP|...", or the name of one in ``named``.

    Each group is a comma-separated list of classes, each a name of ``class_names`` or else
    an integer index 0..K-1: "3 vs 8=3|8", "odd vs even=1,3,5,7,9|0,2,4,6,8",
    "pets=cat,dog|bird,frog". Spaces around names, groups and members are ignored. Raises
    ValueError, one line, for a missing name or groups, an unknown class, a class named twice
    or fewer than two groups.
    """
    num_classes = len(class_names)
    name, eq, body = (part.strip() for part in str(text).partition("="))
    if not eq:
        if named is not None and name in named:
            return make_problem(name, named[name], num_classes)
        known = f"; the named ones are: {', '.join(named)}" if named else ""
        raise ValueError(f"decision problem {text!r} is not NAME=GROUP|GROUP|... (groups of comma-separated "
                         f"classes){known}")
    if not name:
        raise ValueError(f"decision problem {text!r} needs a name before '='")
    if "=" in body:
        raise ValueError(f"decision problem {text!r} has more than one '='")
    groups: list[list[int]] = []
    for group in body.split("|"):
        members = [m.strip() for m in group.split(",")]
        if not all(members):
            raise ValueError(f"decision problem {text!r} has an empty group or class")
        groups.append([_class_index(m, class_names, text) for m in members])
    if len(groups) < 2:
        raise ValueError(f"decision problem {text!r} needs at least two groups, separated by '|'")
    members = [k for group in groups for k in group]
    twice = sorted({class_names[k] for k in members if members.count(k) > 1})
    if twice:
        raise ValueError(f"decision problem {text!r} names class {', '.join(twice)} more than once")
    return make_problem(name, groups, num_classes)


def _class_index(member: str, class_names: Sequence[str], text: str) -> int:
    """The index of a class given by name or as an integer; ValueError naming the choices."""
    if member in class_names:
        return list(class_names).index(member)
    if member.isdecimal() and int(member) < len(class_names):
        return int(member)
    raise ValueError(f"decision problem {text!r} names an unknown class {member!r}; the classes are "
                     f"{', '.join(class_names)} (or indices 0..{len(class_names) - 1})")


# --- arrays for the compiled loop ---------------------------------------------------------

def membership(problems: Sequence[DecisionProblem], num_classes: int) -> np.ndarray:
    """(P, G, K) bool: membership[p, j, k] = class k is in group j of problem p
    (G = the largest number of groups; missing groups are empty)."""
    num_groups = max(len(p.groups) for p in problems)
    m = np.zeros((len(problems), num_groups, num_classes), dtype=bool)
    for i, problem in enumerate(problems):
        for j, group in enumerate(problem.groups):
            m[i, j, list(group)] = True
    return m


def class_weights(problems: Sequence[DecisionProblem], weights: np.ndarray) -> np.ndarray:
    """(P, K) the weight of class k in problem p: pi_k / sum_{j in problem} pi_j, 0 if left out.
    x_t of a problem is drawn from the mixture of its included classes only."""
    weights = np.asarray(weights, np.float64)
    out = np.zeros((len(problems), weights.shape[0]))
    for i, problem in enumerate(problems):
        idx = list(problem.classes)
        total = weights[idx].sum()
        if not total > 0:
            raise ValueError(f"decision problem {problem.name!r} includes only classes of weight zero")
        out[i, idx] = weights[idx] / total
    return out


def prior_entropy_bits(problems: Sequence[DecisionProblem], weights: np.ndarray) -> np.ndarray:
    """(P,) H(Z) in bits, the entropy of the renormalised group weights."""
    w = class_weights(problems, weights)
    m = membership(problems, w.shape[1])
    pz = np.einsum("pgk,pk->pg", m, w)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(pz > 0, pz * np.log2(pz), 0.0), axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class ProblemArrays:
    """Decision problems with the arrays every estimator needs, derived once.

    problems: the P problems; membership (P, G, K) bool, class k in group j of problem p;
    class_weights (P, K): pi_k / pi_S of each class in each problem's own classes S (0 if
    left out), the weights of the per-class profiles in H(Z | X_t); prior_entropy_bits (P,)
    H(Z).
    """

    problems: tuple[DecisionProblem, ...]
    membership: np.ndarray
    class_weights: np.ndarray
    prior_entropy_bits: np.ndarray

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.problems)


def problem_arrays(problems: Sequence[DecisionProblem] | None, weights: np.ndarray) -> ProblemArrays:
    """The arrays of `problems` over classes with prior weights (K,) (any positive scale).

    problems None: the class label alone. Raises ValueError for a problem that names a class
    outside 0..K-1, for duplicate names, and for an empty list.
    """
    weights = np.asarray(weights, np.float64)
    num_classes = weights.shape[0]
    if problems is None:
        problems = [class_label(num_classes)]
    if isinstance(problems, DecisionProblem):
        problems = [problems]
    problems = tuple(problems)
    if not problems:
        raise ValueError("give at least one decision problem")
    for p in problems:
        if not isinstance(p, DecisionProblem):
            raise ValueError(f"decision problems must be DecisionProblem objects (make_problem), got {p!r}")
    names = [p.name for p in problems]
    for p in problems:
        if max(p.classes) >= num_classes:
            raise ValueError(f"decision problem {p.name!r} names class {max(p.classes)}, but the model has "
                             f"classes 0..{num_classes - 1}")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"decision problem names must be unique; repeated: {', '.join(duplicated)}")
    return ProblemArrays(problems, membership(problems, num_classes), class_weights(problems, weights),
                         prior_entropy_bits(problems, weights))


# --- per-example math ---------------------------------------------------------------------

def entropy_bits(log_p: jax.Array, axis: int = -1) -> jax.Array:
    """-sum p log2 p from log-probabilities; entries of probability 0 contribute 0."""
    p = jnp.exp(log_p)
    terms = jnp.where(p > 0, p * log_p, 0.0)
    return -jnp.sum(terms, axis=axis) / LOG2


def group_log_posterior(log_posterior: jax.Array, membership: jax.Array) -> jax.Array:
    """(P, G) log P(z = j | x_t) for every problem, from (K,) log P(k | x_t) and (P, G, K)
    membership; empty groups get -inf."""
    masked = jnp.where(membership, log_posterior, -jnp.inf)
    log_group = jax.nn.logsumexp(masked, axis=-1)
    return log_group - jax.nn.logsumexp(log_group, axis=-1, keepdims=True)


def problem_entropy_bits(log_posterior: jax.Array, membership: jax.Array) -> jax.Array:
    """(P,) h(P(z | x_t)) in bits for every problem, from (K,) log P(k | x_t).

    Same value as entropy_bits(group_log_posterior(...)), with P*K exponentials instead of
    P*G*K: within each problem the class probabilities are rescaled by the largest included
    one, e_k = exp(log P(k | x_t) - max_{j in problem} log P(j | x_t)) in [0, 1], so the group
    masses q_j = sum_{k in G_j} e_k have a total Z >= 1 and nothing underflows:
    h = log Z - sum_j q_j log q_j / Z.
    """
    included = membership.any(axis=1)  # (P, K)
    shift = jnp.max(jnp.where(included, log_posterior, -jnp.inf), axis=-1, keepdims=True)
    e = jnp.where(included, jnp.exp(log_posterior - shift), 0.0)  # (P, K)
    q = jnp.sum(jnp.where(membership, e[:, None, :], 0.0), axis=-1)  # (P, G)
    z = jnp.sum(q, axis=-1)
    q_log_q = jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0)
    return (jnp.log(z) - jnp.sum(q_log_q, axis=-1) / z) / LOG2


def batch_problem_entropy_bits(log_posterior: jax.Array, membership: np.ndarray) -> jax.Array:
    """(N, P) h(P(z | x_t)) in bits for a batch (N, K) of log P(k | x_t): `problem_entropy_bits`
    of every row, each problem's classes rescaled by its likeliest one, so a problem about
    classes of prior weight 1e-33 is resolved as well as any other. Clamped at 0 against
    float32 rounding."""
    h = jax.vmap(problem_entropy_bits, (0, None))(log_posterior, jnp.asarray(np.asarray(membership, bool)))
    return jnp.maximum(h, 0.0)
