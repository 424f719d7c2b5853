"""Result files: the summary.json schema shared by the experiments, and safe writing.

A run's outputs are written into a stage folder beside its output folder and moved into place
only when all of them are written (`staged_outputs`), so that an error or Ctrl-C leaves the
previous results as they were. Each file is written atomically (a temporary file in the same
folder, then renamed) with the permissions of the user's umask. An output folder that already
holds results is never replaced unless asked to.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from jaxdiff_info.curves import Curves, bootstrap_replicates, local_peaks


class WriteError(OSError):
    """An output file could not be written (its OSError, with the file's path)."""


@contextlib.contextmanager
def staged_outputs(out: str | os.PathLike, outputs: Sequence[str], overwrite: bool, *,
                   replaces: Iterable[str] = ()) -> Iterator[Path]:
    """A stage folder to write a run's outputs into; `out` receives them all together or not at all.

        with results.staged_outputs(out, OUTPUTS, overwrite) as stage:
            ... compute ...
            results.write_json(stage / "summary.json", summary)    # every output, into the stage

    On entry: earlier results in `out` (any of `outputs` or `replaces`) are refused unless
    `overwrite` (ValueError), and the stage `<parent>/.<name>.partial-XXXX` is created with any
    missing parent folders, so that an --out that cannot be written is found before the run.
    On a normal exit the stage takes the place of `out` with SIGINT and SIGTERM blocked; the
    other files the user kept in `out` stay, while `replaces` (outputs of an earlier run that
    this one does not write) and whatever an earlier run of any command listed in its manifest
    (`MANIFEST`, written with every run's outputs) go with the old results: no folder mixes the
    outputs of two runs. A mount point or the working folder
    cannot be moved: its files are replaced one by one. On an exception (Ctrl-C included)
    the stage and the parent folders it created are removed and `out` is left as it was; a
    Ctrl-C held back during the swap came after the run was complete, and is dropped.
    A stage is named after the process that writes it (`.<name>.partial-<pid>@<host>-XXXX`):
    the stages of `out` that a process of this host left when it was killed (SIGKILL, or an
    abort) are removed on entry (`remove_stale_stages`).
    An OSError while creating the stage, writing into it (`WriteError`) or moving it becomes
    ValueError "cannot write results to OUT: <strerror>; choose another --out".
    """
    out = Path(out)
    names = tuple(dict.fromkeys((*outputs, *replaces, *earlier_outputs(out))))
    _refuse_to_replace(out, names, overwrite)
    target = Path(os.path.realpath(out))
    remove_stale_stages(target)
    try:
        stage, in_place, created = _make_stage(target)
    except OSError as e:
        raise _cannot_write(out, e) from None
    phase = "run"
    try:
        yield stage
        phase = "commit"
        _write_manifest(stage)
        with _signals_blocked():
            (_replace_files if in_place else _swap_folders)(stage, target, {*names, MANIFEST})
            phase = "done"
    except KeyboardInterrupt:
        if phase == "done":  # held back during the swap, so it came after the run was complete
            return
        _discard(stage, created)
        raise
    except BaseException as e:
        _discard(stage, created)
        if isinstance(e, WriteError) or (isinstance(e, OSError) and phase == "commit"):
            raise _cannot_write(out, e) from None
        raise


MANIFEST = ".jaxdiff_info-outputs.json"  # in every output folder: the names of the run's outputs


def earlier_outputs(out: str | os.PathLike) -> list[str]:
    """The outputs the last run into `out` wrote, from its manifest (none without one)."""
    try:
        names = json.loads((Path(out) / MANIFEST).read_text())["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..", MANIFEST)]


def _write_manifest(stage: Path) -> None:
    names = sorted(entry.name for entry in stage.iterdir() if entry.name != MANIFEST)
    write_json(stage / MANIFEST, {"outputs": names})


def _refuse_to_replace(out: Path, outputs: Sequence[str], overwrite: bool) -> None:
    """ValueError if `out` is a file, or holds any of `outputs` and not `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    existing = [name for name in outputs if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{out} already holds results ({', '.join(existing)}); pass --overwrite to replace them or choose another --out"
        )


def _cannot_write(out: Path, error: OSError) -> ValueError:
    return ValueError(f"cannot write results to {out}: {error.strerror or error}; choose another --out")


def _owner() -> str:
    """<pid>@<host> of this process, as a stage's name carries it."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_stages(target: str | os.PathLike) -> list[Path]:
    """Remove the stage folders of `target` (beside it, `.<name>.partial-*`, and inside it,
    `.partial-*`) whose writing process, of this host, no longer runs: the incomplete outputs
    of a run killed with SIGKILL (or aborted). Stages of live processes and of other hosts
    stay, and so does a `.<name>.previous-*` folder (the earlier results, moved aside by a swap
    that was killed half-way). Returns the folders removed."""
    target = Path(os.path.realpath(target))
    host = socket.gethostname()
    beside = re.compile(rf"^\.{re.escape(target.name)}\.partial-(\d+)@(.+)-[^-]+$")
    inside = re.compile(r"^\.partial-(\d+)@(.+)-[^-]+$")
    candidates = []
    for folder, pattern in ((target.parent, beside), (target, inside)):
        with contextlib.suppress(OSError):
            for entry in folder.iterdir():
                m = pattern.match(entry.name)
                if m is not None and entry.is_dir() and not entry.is_symlink():
                    candidates.append((entry, int(m.group(1)), m.group(2)))
    removed = []
    for entry, pid, owner_host in candidates:
        if owner_host == host and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _make_stage(target: Path) -> tuple[Path, bool, list[Path]]:
    """A new stage folder for `target`; whether it is inside `target`; the parent folders made.

    The stage goes beside `target`, to take its place, unless `target` is a folder that
    cannot be moved: a mount point, the working folder or one above it, or one in a folder
    that cannot be written. Then it goes inside, and `target`'s files are replaced one by one.
    """
    parent = target.parent
    if target.is_dir():
        cwd = Path.cwd()
        if not (os.path.ismount(target) or target == cwd or target in cwd.parents):
            with contextlib.suppress(OSError):
                return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{_owner()}-", dir=parent)), False, []
        return Path(tempfile.mkdtemp(prefix=f".partial-{_owner()}-", dir=target)), True, []
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        for folder in reversed(created):
            folder.mkdir()
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{_owner()}-", dir=parent)), False, created
    except OSError:
        _remove_folders(created)
        raise


def _discard(stage: Path, created: Sequence[Path]) -> None:
    """Remove the stage and the parent folders made for it, signals held back."""
    with _signals_blocked():
        shutil.rmtree(stage, ignore_errors=True)
        _remove_folders(created)


def _remove_folders(folders: Sequence[Path]) -> None:
    """Remove these folders, deepest first, where they are empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back until the block is done (then delivered)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _swap_folders(stage: Path, target: Path, results: set[str]) -> None:
    """Put the complete `stage` in the place of `target`, with its permissions, and move the
    user's other files over from the old folder, which is then removed."""
    if not target.is_dir():
        os.chmod(stage, 0o777 & ~_umask())
        os.rename(stage, target)
        return
    os.chmod(stage, stat.S_IMODE(target.stat().st_mode))
    aside = stage.with_name(stage.name.replace(".partial-", ".previous-"))
    try:
        os.rename(target, aside)
    except OSError:  # a folder that cannot be moved after all
        _replace_files(stage, target, results)
        return
    try:
        os.rename(stage, target)
    except OSError:
        os.rename(aside, target)
        raise
    for entry in aside.iterdir():
        if entry.name not in results and not (target / entry.name).exists():
            os.rename(entry, target / entry.name)
    shutil.rmtree(aside, ignore_errors=True)


def _replace_files(stage: Path, target: Path, results: set[str]) -> None:
    """Move every file of `stage` into `target`, remove the earlier `results` the run did not
    write, then the stage."""
    written = {entry.name for entry in stage.iterdir()}
    for name in written:
        os.replace(stage / name, target / name)
    for name in results - written:
        with contextlib.suppress(FileNotFoundError):
            (target / name).unlink()
    stage.rmdir()


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in its folder, with the umask's permissions."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(e.errno, e.strerror, str(path)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(e.errno, e.strerror, str(path)) from e
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
    """Decision problem `index` (of the first curves)'s entry of summary.json, the curves of
    every estimator that has a problem of its name (see the README for the schema; intervals
    as [lo, hi], bands as [[lower...], [upper...]])."""
    first = next(iter(curves.values()))
    problem = first.problems[index]
    curves = {name: c for name, c in curves.items() if problem.name in c.names}
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
        index = c.index(problem.name)
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
                "entropy_bits_ci95", "entropy_rate_ci95", "peak_time_ci95", "half_time_ci95",
                "class_information_bits", "class_information_bits_ci95")


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


DIFFERENCE_METHOD = ("a minus b on the same time grid; the two estimates are independent, and every interval is formed "
                     "from every pair of their bootstrap resamples a*, b* (an estimate without sampling error enters "
                     "as its value). Peak-time and half-time differences: the 2.5 and 97.5 percentiles of a* - b*. "
                     "The largest difference of two curves (H, or D_k per class): the value there plus and minus the "
                     "95th percentile over the pairs of max over t of |a*(t) - b*(t) - (a(t) - b(t))|, a simultaneous "
                     "95% band over every step, valid at a step chosen by the data (a pointwise interval there is not)")


def _resamples(c: Curves, replicates, field: str, index: int) -> np.ndarray:
    """(R, ...) the bootstrap resamples of row `index` of a field of curves `c` ((1, ...) its
    value without sampling error)."""
    if replicates is None:
        if c.entropy_bits_ci95 is not None:
            raise ValueError(f"the {c.estimator} curves have intervals but no resampling to draw them from")
        return np.asarray(getattr(c, field)[index], np.float64)[None]
    value = getattr(replicates, field)
    if value is None:
        raise ValueError(f"the {c.estimator} curves keep no bootstrap resamples of {field}")
    return np.asarray(value[:, index], np.float64)


def _interval(d: float, a: np.ndarray, b: np.ndarray) -> list:
    """The 95% percentile interval of a* - b* over every pair of resamples (R,); [d, d] (d: the
    estimate) when neither has sampling error."""
    if a.size == 1 and b.size == 1:
        return _round([d, d])
    return _round(np.percentile(np.subtract.outer(a, b), [2.5, 97.5]).tolist())


def simultaneous_half_width(gap: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """c such that gap(t) +- c is a simultaneous 95% band of a(t) - b(t) over every step: the 95th
    percentile, over every pair (i, j) of resamples a* (R_a, T) and b* (R_b, T), of
    max_t |a*_i(t) - b*_j(t) - gap(t)|; 0 when neither has sampling error."""
    if a.shape[0] == 1 and b.shape[0] == 1:
        return 0.0
    if a.shape[0] > b.shape[0]:
        a, b, gap = b, a, -gap
    worst = np.empty((a.shape[0], b.shape[0]))
    for i, row in enumerate(a):  # over the smaller side: (R_b, T) at a time
        worst[i] = np.max(np.abs((row - gap)[None, :] - b), axis=1)
    return float(np.percentile(worst, 95.0))


def _largest_difference(prefix: str, time: np.ndarray, gap: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict:
    at = int(np.argmax(np.abs(gap)))
    c = simultaneous_half_width(gap, a, b)
    return {f"max_abs_{prefix}_difference_bits": round(float(abs(gap[at])), 6),
            f"max_abs_{prefix}_difference_time": round(float(time[at]), 6),
            f"{prefix}_difference_bits_at_max": round(float(gap[at]), 6),
            f"{prefix}_difference_bits_at_max_simultaneous_ci95": _round([gap[at] - c, gap[at] + c])}


def curve_differences(a: Curves, b: Curves, index: int, index_b: int | None = None, *,
                      replicates: tuple | None = None) -> dict:
    """How row `index` of curves `a` (e.g. a network's) differs from row `index_b` (default:
    `index`) of `b` (e.g. a reference model's), for summary.json: the largest |H_a - H_b| in
    bits, the time t/T where it is and the simultaneous band there, and the peak-time and
    half-time differences with intervals (`DIFFERENCE_METHOD`: from the bootstrap resamples of
    both). replicates: (`bootstrap_replicates(a)`, `bootstrap_replicates(b)`), drawn once for
    the rows of several calls; None: drawn here."""
    _check_grids(a, b)
    j = index if index_b is None else index_b
    ra, rb = (bootstrap_replicates(a), bootstrap_replicates(b)) if replicates is None else replicates
    gap = np.asarray(a.entropy_bits[index], np.float64) - np.asarray(b.entropy_bits[j], np.float64)
    out = _largest_difference("entropy", a.time, gap, _resamples(a, ra, "entropy_bits", index),
                              _resamples(b, rb, "entropy_bits", j))
    for field in ("peak_time", "half_time"):
        d = float(getattr(a, field)[index]) - float(getattr(b, field)[j])
        out[f"{field}_difference"] = round(d, 6)
        out[f"{field}_difference_ci95"] = _interval(d, _resamples(a, ra, field, index), _resamples(b, rb, field, j))
    return out


def information_differences(a: Curves, b: Curves, class_names: Sequence[str], *,
                            replicates: tuple | None = None) -> list[dict]:
    """Per class k, how D_k(t) of `a` differs from that of `b` (both with class_information_bits),
    for summary.json: the largest |D_a - D_b| in bits, where, and the simultaneous band there
    (`DIFFERENCE_METHOD`). replicates: as for `curve_differences`."""
    _check_grids(a, b)
    ra, rb = (bootstrap_replicates(a), bootstrap_replicates(b)) if replicates is None else replicates
    out = []
    for k, name in enumerate(class_names):
        gap = np.asarray(a.class_information_bits[k], np.float64) - np.asarray(b.class_information_bits[k], np.float64)
        out.append({"name": str(name), **_largest_difference(
            "information", a.time, gap, _resamples(a, ra, "class_information_bits", k),
            _resamples(b, rb, "class_information_bits", k))})
    return out


def _check_grids(a: Curves, b: Curves) -> None:
    if a.time.shape != b.time.shape or not np.allclose(a.time, b.time):
        raise ValueError("curves on different time grids cannot be compared; use the same schedule and steps")
