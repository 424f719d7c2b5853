"""Which digits do simple classifiers confuse? `python -m experiments.digits_confusions`.

Trains 1-nearest-neighbour and logistic regression (scikit-learn) on the pixels of the digits'
train split and prints, for the held-out test split, the accuracy and the pairs of digits
most often confused, counted both ways (a 3 taken for an 8 plus an 8 taken for a 3). One
split has too few errors to rank pairs, so the counts are summed over the splits of seeds
0..N-1 (--splits). The digits' named decision problems (jaxdiff_info.data.digits.PAIRS) are
chosen from this output.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from experiments.cli import Parser

PROG = "python -m experiments.digits_confusions"


def confusions(seed: int = 0) -> dict[str, np.ndarray]:
    """{classifier: (10, 10) confusion counts [true, predicted] on the test split of ``seed``}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix
    from sklearn.neighbors import KNeighborsClassifier

    from jaxdiff_info.data import load_dataset

    train, test = (load_dataset("digits", "", split=s, seed=seed) for s in ("train", "test"))
    x_train, x_test = (d.images.reshape(len(d), -1) / 255.0 for d in (train, test))
    models = {"1-nearest-neighbour": KNeighborsClassifier(n_neighbors=1),
              "logistic regression": LogisticRegression(max_iter=5000)}
    return {name: confusion_matrix(test.labels, m.fit(x_train, train.labels).predict(x_test), labels=range(10))
            for name, m in models.items()}


def top_pairs(matrix: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    """The n pairs (a, b, errors) with a < b most often confused either way, most first."""
    both = matrix + matrix.T
    pairs = [(a, b, int(both[a, b])) for a in range(10) for b in range(a + 1, 10) if both[a, b]]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))[:n]


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--splits", type=int, default=20, help="held-out splits (seeds 0..N-1) to sum over")
    p.add_argument("--top", type=int, default=8, help="pairs to list per classifier")
    a = p.parse_args(argv)
    if not 1 <= a.splits <= 1000:
        p.error(f"--splits must be from 1 to 1000 (each split trains both classifiers, ~2 s), got {a.splits}")
    if not 0 <= a.top <= 45:
        p.error(f"--top must be from 0 to 45 (the pairs of ten digits), got {a.top}")
    per_seed = [confusions(seed) for seed in range(a.splits)]
    totals = {name: sum(c[name] for c in per_seed) for name in per_seed[0]}
    totals["both, summed"] = sum(totals.values())
    for name, matrix in totals.items():
        errors = int(matrix.sum() - np.trace(matrix))
        print(f"{name}: {errors} errors in {int(matrix.sum())} test images of {a.splits} splits "
              f"(accuracy {np.trace(matrix) / matrix.sum():.3f})")
        for x, y, count in top_pairs(matrix, a.top):
            print(f"  {x} vs {y}: {count} ({x} as {y}: {matrix[x, y]}, {y} as {x}: {matrix[y, x]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
