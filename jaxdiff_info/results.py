"""Result files: the summary.json schema shared by the experiments, and safe writing.

Files are written atomically (a temporary file in the same folder, then renamed), and an
output folder that already holds results is never written into unless asked to.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxdiff_info.curves import Curves, local_peaks


def prepare_output_dir(out: str | os.PathLike, outputs: Sequence[str], overwrite: bool) -> Path:
    """Create `out` if needed; refuse to replace earlier results unless `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    existing = [name for name in outputs if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{out} already holds results ({', '.join(existing)}); pass --overwrite to replace them or choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output folder {out}: {e.strerror}") from None
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(Path(path), (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    _atomic_write(Path(path), buf.getvalue())


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _atomic_write(Path(path), buf.getvalue())


def _round(a: np.ndarray, digits: int = 6) -> Any:
    return np.round(np.asarray(a, np.float64), digits).tolist()


def problem_summary(index: int, curves: Mapping[str, Curves]) -> dict:
    """Decision problem `index`'s entry of summary.json, every estimator's curves of it (see
    the README for the schema; intervals as [lo, hi], bands as [[lower...], [upper...]])."""
    first = next(iter(curves.values()))
    problem = first.problems[index]
    time = first.time
    entry: dict[str, Any] = {
        "name": problem.name,
        "groups": [list(g) for g in problem.groups],
        "prior_entropy_bits": round(float(first.prior_entropy_bits[index]), 6),
        "time": _round(time),
        "entropy_bits": {},
        "entropy_rate": {},
        "peak_time": {},
        "peak_time_ci95": {},
        "peaks": {},
        "half_time": {},
        "half_time_ci95": {},
        "entropy_bits_ci95": {},
        "entropy_rate_ci95": {},
    }
    for name, c in curves.items():
        entry["entropy_bits"][name] = _round(c.entropy_bits[index])
        entry["entropy_rate"][name] = _round(c.entropy_rate[index])
        entry["peak_time"][name] = round(float(c.peak_time[index]), 6)
        entry["peaks"][name] = [round(p, 6) for p in local_peaks(time, c.entropy_rate[index])]
        entry["half_time"][name] = round(float(c.half_time[index]), 6)
        if c.peak_time_ci95 is not None:
            entry["peak_time_ci95"][name] = _round(c.peak_time_ci95[index])
            entry["half_time_ci95"][name] = _round(c.half_time_ci95[index])
            entry["entropy_bits_ci95"][name] = _round(c.entropy_bits_ci95[index].T)
            entry["entropy_rate_ci95"][name] = _round(c.entropy_rate_ci95[index].T)
    return entry


def methods(curves: Mapping[str, Curves]) -> dict[str, str]:
    """What each estimator estimated, in words (summary.json's "methods")."""
    return {name: c.method for name, c in curves.items()}


CURVE_FIELDS = ("class_entropy_bits", "entropy_bits", "entropy_rate", "peak_time", "half_time",
                "entropy_bits_ci95", "entropy_rate_ci95", "peak_time_ci95", "half_time_ci95")


def curves_arrays(curves: Mapping[str, Curves]) -> dict[str, np.ndarray]:
    """Every curve as a flat dict of arrays for an NPZ file, keys '<estimator>/<field>', in
    the layout of `Curves` (problem first)."""
    arrays: dict[str, np.ndarray] = {}
    for name, c in curves.items():
        for field in CURVE_FIELDS:
            value = getattr(c, field)
            if value is not None:
                arrays[f"{name}/{field}"] = np.asarray(value)
    return arrays
