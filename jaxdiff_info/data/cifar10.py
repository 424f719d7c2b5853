"""CIFAR-10 from the official python archive, downloaded safely and read without trusting it.

The archive ``cifar-10-python.tar.gz`` is looked for in a data directory and downloaded
there when absent. It is never extracted: the expected members are read from the tar
stream in memory, after every member has been checked, and the batches are unpickled by
an unpickler that can only rebuild numpy arrays.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"

CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
DECISION_PROBLEMS: dict[str, list[list[int]]] = {
    "animals vs vehicles": [[2, 3, 4, 5, 6, 7], [0, 1, 8, 9]],
    "cat vs dog": [[3], [5]],
    "automobile vs truck": [[1], [9]],
}

SPLITS = ("train", "test")
_FOLDER = "cifar-10-batches-py"
_SPLIT_MEMBERS = {
    "train": tuple(f"{_FOLDER}/data_batch_{i}" for i in range(1, 6)),
    "test": (f"{_FOLDER}/test_batch",),
}
_META_MEMBER = f"{_FOLDER}/batches.meta"
_MAX_MEMBER_BYTES = 64 * 2**20  # an official batch is about 30 MB
_CHUNK_BYTES = 2**20

# The only globals a CIFAR-10 pickle refers to: numpy's array reconstructor (under its
# numpy 1 and numpy 2 module names), the ndarray type and the dtype type.
_RECONSTRUCT = np.zeros(1, np.uint8).__reduce__()[0]
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that admits numpy arrays and plain containers, and nothing that runs code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}'"
            ) from None


def _unpickle(raw: bytes, member: str) -> Any:
    """Unpickle one archive member (a python 2 pickle) with the restricted unpickler."""
    try:
        return _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"{member} is not a safe CIFAR-10 pickle: {err}") from None
    except Exception as err:  # any malformed pickle
        raise ValueError(f"{member} is not a valid CIFAR-10 pickle ({err})") from None


def archive_path(data_dir: str | os.PathLike) -> Path:
    """Where the CIFAR-10 archive lives (or will be downloaded to) under ``data_dir``."""
    return Path(data_dir) / ARCHIVE_NAME


def file_md5(path: str | os.PathLike) -> str:
    """Hex md5 digest of a file."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_response(response: BinaryIO, out: BinaryIO, total: int | None,
                   progress: bool) -> str:
    """Copy a response body into ``out``; return its md5. Checks the announced length."""
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
              desc=ARCHIVE_NAME, disable=not progress) as bar:
        for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if total is not None and received != total:
        raise http.client.IncompleteRead(b"", total - received)
    return digest.hexdigest()


def _describe(err: Exception) -> str:
    """A short, single-line reason for a failed download."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, http.client.IncompleteRead):
        return "the connection closed before the download finished"
    reason: object = err
    if isinstance(err, urllib.error.URLError):
        reason = err.reason
    if isinstance(reason, Exception):
        reason = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return " ".join(str(reason).split())


def download_archive(data_dir: str | os.PathLike, *, url: str = URL,
                     md5: str | None = MD5, progress: bool = True,
                     timeout: float = 60.0) -> Path:
    """Download the archive into ``data_dir`` atomically and return its path.

    The download goes to a temporary file next to the final one, is checked against
    ``md5`` (skipped when None), and only then renamed into place; on any failure the
    temporary file is removed and a one-line ValueError says what to do.
    """
    final = archive_path(data_dir)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{ARCHIVE_NAME}.", suffix=".part",
                                        dir=final.parent)
    except OSError as err:
        raise ValueError(
            f"cannot write to {final.parent} ({_describe(err)}); choose a writable data "
            f"directory"
        ) from None
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    got = _copy_response(response, out, total, progress)
            except (OSError, http.client.HTTPException, ValueError) as err:
                raise ValueError(
                    f"could not download CIFAR-10 from {url} ({_describe(err)}); if this "
                    f"machine is offline, download {ARCHIVE_NAME} elsewhere and place it "
                    f"manually in {final.parent}"
                ) from None
        if md5 is not None and got != md5.lower():
            raise ValueError(
                f"the CIFAR-10 archive downloaded from {url} is corrupted (md5 {got}, "
                f"expected {md5}); run again, or place a good {ARCHIVE_NAME} manually "
                f"in {final.parent}"
            )
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the data need not be
        os.replace(tmp_name, final)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return final


def ensure_archive(data_dir: str | os.PathLike, *, url: str = URL,
                   md5: str | None = MD5, progress: bool = True) -> Path:
    """Path of a verified archive in ``data_dir``, downloading it only when absent."""
    path = archive_path(data_dir)
    if not path.is_file():
        return download_archive(data_dir, url=url, md5=md5, progress=progress)
    if md5 is not None:
        got = file_md5(path)
        if got != md5.lower():
            raise ValueError(
                f"{path} is corrupted (md5 {got}, expected {md5}); delete it and run "
                f"again to download it afresh, or replace it with a good copy"
            )
    return path


def _check_member(member: tarfile.TarInfo) -> None:
    """Reject members that could escape a directory or are not plain files or folders."""
    parts = PurePosixPath(member.name).parts
    if member.name.startswith(("/", "\\")) or ".." in parts or "\\" in member.name:
        raise ValueError(f"unsafe path {member.name!r} in the archive; this is not CIFAR-10")
    if not (member.isfile() or member.isdir()):
        raise ValueError(
            f"archive member {member.name!r} is a link or special file; this is not CIFAR-10"
        )


def _read_members(path: Path, wanted: set[str]) -> dict[str, bytes]:
    """Read the ``wanted`` members of a .tar.gz in one pass, checking every member."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|gz") as tar:
            for member in tar:
                _check_member(member)
                name = member.name.removeprefix("./")
                if name not in wanted:
                    continue
                if not member.isfile():
                    raise ValueError(f"{name} is not a file; this is not CIFAR-10")
                if name in found:
                    raise ValueError(f"{name} appears twice in the archive; this is not CIFAR-10")
                if member.size > _MAX_MEMBER_BYTES:
                    raise ValueError(
                        f"{name} is unexpectedly large ({member.size} bytes); this is not CIFAR-10"
                    )
                found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(
            f"{path} is not a readable .tar.gz archive ({err}); delete it and run again"
        ) from None
    missing = sorted(wanted - found.keys())
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; this is not CIFAR-10")
    return found


def _field(obj: Any, key: str, member: str) -> Any:
    """``obj[key]`` for a pickled dict whose keys are bytes (or str)."""
    if isinstance(obj, dict):
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
    raise ValueError(f"{member} has no '{key}' entry; this is not CIFAR-10")


def _decode_batch(obj: Any, member: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (images NHWC uint8, labels int32) from one unpickled batch."""
    data = _field(obj, "data", member)
    labels = np.asarray(_field(obj, "labels", member))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8
            and data.ndim == 2 and data.shape[1] == 3 * 32 * 32):
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise ValueError(
            f"{member} holds data of shape {shape} and type {dtype}, expected "
            f"(N, 3072) uint8; this is not CIFAR-10"
        )
    if (labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu"
            or (labels.size and (labels.min() < 0 or labels.max() > 9))):
        raise ValueError(
            f"{member} holds {labels.shape} labels of type {labels.dtype} for "
            f"{data.shape[0]} images, expected one integer in 0..9 per image; "
            f"this is not CIFAR-10"
        )
    # Each row is three 32x32 row-major planes (R, G, B).
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _decode_meta(obj: Any, member: str) -> tuple[str, ...]:
    """Class names from the unpickled batches.meta."""
    names = _field(obj, "label_names", member)
    if not (isinstance(names, (list, tuple)) and len(names) == 10
            and all(isinstance(n, (bytes, str)) for n in names)):
        raise ValueError(f"{member} does not list 10 class names; this is not CIFAR-10")
    try:
        return tuple(n.decode("ascii") if isinstance(n, bytes) else n for n in names)
    except UnicodeDecodeError:
        raise ValueError(f"{member} has malformed class names; this is not CIFAR-10") from None


def read_archive(path: str | os.PathLike, split: str = "train",
                 ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int32, class names) of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; choose one of {SPLITS}")
    members = _SPLIT_MEMBERS[split]
    raw = _read_members(Path(path), {*members, _META_MEMBER})
    class_names = _decode_meta(_unpickle(raw[_META_MEMBER], _META_MEMBER), _META_MEMBER)
    batches = [_decode_batch(_unpickle(raw[m], m), m) for m in members]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return images, labels, class_names


def load_cifar10(data_dir: str | os.PathLike, split: str = "train", *, url: str = URL,
                 md5: str | None = MD5, progress: bool = True,
                 ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Load one split of CIFAR-10 from ``data_dir``, downloading the archive if needed.

    Returns (images (N, 32, 32, 3) uint8, labels (N,) int32, class names).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; choose one of {SPLITS}")
    path = ensure_archive(data_dir, url=url, md5=md5, progress=progress)
    return read_archive(path, split)
