"""Tests of the datasets: CIFAR-10 download and safe reading, the shapes generator, helpers.

The CIFAR-10 tests run the real download code against an HTTP server on 127.0.0.1 that
serves archives built here in the official format (python 2 pickles in a .tar.gz), only
with fewer images.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import shlex
import socket
import struct
import tarfile
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff_info.data import (Dataset, cifar10, from_model_range, load_dataset, random_flip,
                               shapes, to_model_range)

PER_BATCH = 20
FOLDER = "cifar-10-batches-py"
BATCH_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# --------------------------------------------------------------------------------------
# Python 2 pickles, as in the official archive
# --------------------------------------------------------------------------------------

def _py2_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    return b"J" + struct.pack("<i", n)


def _py2_str(s: bytes) -> bytes:
    """A python 2 ``str`` (read back as bytes with encoding='bytes')."""
    if len(s) < 256:
        return b"U" + bytes([len(s)]) + s
    return b"T" + struct.pack("<i", len(s)) + s


def _py2_array(a: np.ndarray) -> bytes:
    """A numpy array as python 2 numpy pickled it (numpy.core.multiarray._reconstruct)."""
    shape = b"".join(_py2_int(d) for d in a.shape) + {1: b"\x85", 2: b"\x86"}[a.ndim]
    order, kind = a.dtype.str[0], a.dtype.str[1:]
    dtype = (b"cnumpy\ndtype\n" + _py2_str(kind.encode()) + _py2_int(0) + _py2_int(1)
             + b"\x87R(" + _py2_int(3) + _py2_str(order.encode()) + b"NNN"
             + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0)
            + b"\x85" + _py2_str(b"b") + b"\x87R(" + _py2_int(1) + shape + dtype
            + b"\x89" + _py2_str(a.tobytes()) + b"tb")


def _py2_value(obj) -> bytes:
    if isinstance(obj, bytes):
        return _py2_str(obj)
    if isinstance(obj, int):
        return _py2_int(obj)
    if isinstance(obj, np.ndarray):
        return _py2_array(obj)
    if isinstance(obj, list):
        return b"]" + (b"(" + b"".join(map(_py2_value, obj)) + b"e" if obj else b"")
    if isinstance(obj, dict):
        items = b"".join(_py2_value(k) + _py2_value(v) for k, v in obj.items())
        return b"}(" + items + b"u"
    raise TypeError(type(obj))


def py2_pickle(obj) -> bytes:
    """Pickle ``obj`` (dicts, lists, bytes, ints, arrays) byte for byte like python 2 did."""
    return b"\x80\x02" + _py2_value(obj) + b"."


def batch_pickle(data: np.ndarray, labels: list[int], name: str) -> bytes:
    return py2_pickle({
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    })


def meta_pickle(names=cifar10.CLASS_NAMES) -> bytes:
    return py2_pickle({b"num_cases_per_batch": PER_BATCH,
                       b"label_names": [n.encode() for n in names],
                       b"num_vis": 3072})


# --------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------

def tar_gz(members: dict[str, bytes], specials: list[tarfile.TarInfo] = ()) -> bytes:
    """A .tar.gz with the folder entry, the given files, then the given special members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        folder = tarfile.TarInfo(FOLDER)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for info in specials:
            tar.addfile(info)
    return buf.getvalue()


def known_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """Random NHWC images whose first image is black but for three known pixels."""
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[0] = 0
    images[0, 2, 5, 0] = 255  # red at row 2, column 5
    images[0, 7, 1, 1] = 128  # green at row 7, column 1
    images[0, 31, 30, 2] = 64  # blue at row 31, column 30
    return images


def to_rows(images: np.ndarray) -> np.ndarray:
    """NHWC images to CIFAR-10 rows: R, G and B planes of 1024 row-major pixels."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def cifar_members(**overrides: bytes) -> tuple[dict[str, bytes], dict]:
    """Members of a small valid CIFAR-10 archive and the images and labels in it."""
    rng = np.random.default_rng(0)
    images = {name: known_images(PER_BATCH, rng) for name in BATCH_NAMES}
    labels = {name: [int(x) for x in rng.integers(0, 10, PER_BATCH)] for name in BATCH_NAMES}
    members = {f"{FOLDER}/batches.meta": meta_pickle()}
    for name in BATCH_NAMES:
        members[f"{FOLDER}/{name}"] = batch_pickle(to_rows(images[name]), labels[name], name)
    members[f"{FOLDER}/readme.html"] = b"<html></html>"
    members.update({f"{FOLDER}/{k}": v for k, v in overrides.items()})
    return members, {"images": images, "labels": labels}


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


@pytest.fixture(scope="module")
def good():
    members, expected = cifar_members()
    blob = tar_gz(members)
    return blob, expected


def place(data_dir: Path, blob: bytes) -> Path:
    """Put an archive where the loader looks for it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / cifar10.ARCHIVE_NAME).write_bytes(blob)
    return data_dir


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{cifar10.ARCHIVE_NAME}"


# --------------------------------------------------------------------------------------
# A local HTTP server
# --------------------------------------------------------------------------------------

class Server:
    """Serves ``files[path]`` = (body, announced length); counts the requests."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, int]] = {}
        self.hits: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                if self.path not in server.files:
                    self.send_error(404)
                    return
                body, length = server.files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, body: bytes, length: int | None = None) -> str:
        """Serve ``body`` at ``path``, announcing ``length`` bytes; return its URL."""
        self.files[path] = (body, len(body) if length is None else length)
        return self.url(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(autouse=True)
def no_proxy_for_localhost(monkeypatch):
    """Reach the local server directly even where an HTTP proxy is configured."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


# --------------------------------------------------------------------------------------
# CIFAR-10: download
# --------------------------------------------------------------------------------------

def test_official_source():
    assert cifar10.URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert cifar10.MD5 == "c58f30108f718f92721af3b95e74349a"


def test_py2_pickles_are_faithful(good):
    """The archives built here read back with plain pickle as the official ones do."""
    _, expected = good
    rows = to_rows(expected["images"]["data_batch_1"])
    blob = batch_pickle(rows, expected["labels"]["data_batch_1"], "data_batch_1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core is renamed
        obj = pickle.loads(blob, encoding="bytes")
    assert set(obj) == {b"batch_label", b"labels", b"data", b"filenames"}
    np.testing.assert_array_equal(obj[b"data"], rows)
    assert obj[b"data"].dtype == np.uint8
    assert obj[b"labels"] == expected["labels"]["data_batch_1"]


def test_download_and_load(tmp_path, server, good):
    blob, expected = good
    url = server.serve("/good.tar.gz", blob)
    data_dir = tmp_path / "data"  # does not exist yet
    hits = len(server.hits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing deprecated on the way
        images, labels, names = cifar10.load_cifar10(data_dir, "train", url=url,
                                                     md5=md5(blob), progress=False)
    assert len(server.hits) == hits + 1
    assert sorted(os.listdir(data_dir)) == [cifar10.ARCHIVE_NAME]  # no temporary file
    assert (data_dir / cifar10.ARCHIVE_NAME).read_bytes() == blob

    assert images.shape == (5 * PER_BATCH, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (5 * PER_BATCH,) and labels.dtype == np.int32
    assert names == cifar10.CLASS_NAMES
    train = BATCH_NAMES[:5]
    np.testing.assert_array_equal(images, np.concatenate([expected["images"][b] for b in train]))
    np.testing.assert_array_equal(labels, sum((expected["labels"][b] for b in train), []))

    # Pixel layout: R, G, B planes of row-major 32x32 pixels become HWC.
    first = images[0].astype(int)
    assert first[2, 5].tolist() == [255, 0, 0]
    assert first[7, 1].tolist() == [0, 128, 0]
    assert first[31, 30].tolist() == [0, 0, 64]
    assert first.sum() == 255 + 128 + 64

    # The test split comes from the same archive, without downloading again.
    images, labels, _ = cifar10.load_cifar10(data_dir, "test", url=url, md5=md5(blob),
                                             progress=False)
    assert len(server.hits) == hits + 1
    np.testing.assert_array_equal(images, expected["images"]["test_batch"])
    np.testing.assert_array_equal(labels, expected["labels"]["test_batch"])

    x = to_model_range(images)
    assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0  # the black pixels of the first image


def test_present_archive_is_used_without_download(tmp_path, server):
    names = tuple(f"class{i}" for i in range(10))
    members, expected = cifar_members(**{"batches.meta": meta_pickle(names)})
    blob = tar_gz(members)
    url = server.serve("/never.tar.gz", blob)
    data_dir = place(tmp_path, blob)
    hits = len(server.hits)
    images, labels, got_names = cifar10.load_cifar10(data_dir, "test", url=url, md5=md5(blob))
    assert len(server.hits) == hits
    assert got_names == names  # read from batches.meta
    np.testing.assert_array_equal(images, expected["images"]["test_batch"])


def test_corrupted_download_leaves_nothing(tmp_path, server, good):
    blob, _ = good
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 0xFF
    url = server.serve("/damaged.tar.gz", bytes(damaged))
    with pytest.raises(ValueError, match="corrupted") as err:
        cifar10.load_cifar10(tmp_path, url=url, md5=md5(blob), progress=False)
    assert "\n" not in str(err.value)
    assert os.listdir(tmp_path) == []


def test_truncated_download_leaves_nothing(tmp_path, server, good):
    blob, _ = good
    url = server.serve("/truncated.tar.gz", blob[: len(blob) // 2], length=len(blob))
    with pytest.raises(ValueError, match="could not download"):
        cifar10.load_cifar10(tmp_path, url=url, md5=md5(blob), progress=False)
    assert os.listdir(tmp_path) == []


def test_interrupted_download_leaves_nothing(tmp_path, server, good, monkeypatch):
    blob, _ = good
    url = server.serve("/good.tar.gz", blob)

    def interrupted(response, out, total, progress):
        out.write(response.read(100))
        raise KeyboardInterrupt

    monkeypatch.setattr(cifar10, "_copy_response", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cifar10.load_cifar10(tmp_path, url=url, md5=md5(blob), progress=False)
    assert os.listdir(tmp_path) == []


def test_unreachable_server_says_to_place_archive(tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="manually") as err:
        cifar10.load_cifar10(data_dir, url=closed_port_url(), progress=False)
    message = str(err.value)
    assert cifar10.ARCHIVE_NAME in message and str(data_dir) in message
    assert "\n" not in message
    assert os.listdir(data_dir) == []


def test_missing_file_on_server(tmp_path, server):
    url = server.url("/absent.tar.gz")
    with pytest.raises(ValueError, match="404"):
        cifar10.load_cifar10(tmp_path, url=url, progress=False)
    assert os.listdir(tmp_path) == []


def test_corrupted_present_archive(tmp_path, good):
    blob, _ = good
    data_dir = place(tmp_path, blob[:-10])
    with pytest.raises(ValueError, match="corrupted.*delete it"):
        cifar10.load_cifar10(data_dir, url=closed_port_url(), md5=md5(blob))


# --------------------------------------------------------------------------------------
# CIFAR-10: archives that are not to be trusted
# --------------------------------------------------------------------------------------

def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def load_placed(tmp_path: Path, blob: bytes):
    return cifar10.load_cifar10(place(tmp_path / "data", blob), url=closed_port_url(),
                                md5=md5(blob))


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", f"{FOLDER}/../../evil",
                                  f"{FOLDER}/..\\..\\evil"])
def test_path_traversal_is_rejected(tmp_path, name):
    members, _ = cifar_members()
    members[name] = b"owned"
    with pytest.raises(ValueError, match="unsafe path"):
        load_placed(tmp_path, tar_gz(members))
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("info", [
    _special(f"{FOLDER}/link", tarfile.SYMTYPE, "/etc/passwd"),
    _special(f"{FOLDER}/hard", tarfile.LNKTYPE, f"{FOLDER}/batches.meta"),
    _special(f"{FOLDER}/dev", tarfile.CHRTYPE),
    _special(f"{FOLDER}/fifo", tarfile.FIFOTYPE),
], ids=["symlink", "hardlink", "device", "fifo"])
def test_links_and_special_files_are_rejected(tmp_path, info):
    members, _ = cifar_members()
    with pytest.raises(ValueError, match="link or special file"):
        load_placed(tmp_path, tar_gz(members, [info]))


def test_link_in_place_of_a_batch_is_rejected(tmp_path):
    members, _ = cifar_members()
    del members[f"{FOLDER}/test_batch"]
    link = _special(f"{FOLDER}/test_batch", tarfile.SYMTYPE, "/etc/passwd")
    with pytest.raises(ValueError, match="link or special file"):
        load_placed(tmp_path, tar_gz(members, [link]))


class Exploit:
    """Pickles as a call of ``func(arg)``, run by any unpickler that resolves ``func``."""

    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _exploit(kind: str, sentinel: Path) -> Exploit:
    if kind == "system":
        return Exploit(os.system, f"touch {shlex.quote(str(sentinel))}")
    return Exploit(exec, f"open({str(sentinel)!r}, 'w').close()")


@pytest.mark.parametrize("member", ["data_batch_3", "batches.meta"])
@pytest.mark.parametrize("kind", ["system", "exec"])
def test_code_in_pickles_does_not_run(tmp_path, member, kind):
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _exploit(kind, sentinel), b"labels": [0]}, protocol=3)
    members, _ = cifar_members(**{member: payload})
    with pytest.raises(ValueError, match=rf"refusing to load global '\w+\.{kind}'"):
        load_placed(tmp_path, tar_gz(members))
    assert not sentinel.exists()

    # The payload is live: an ordinary unpickler does run it.
    pickle.loads(payload, encoding="bytes")
    assert sentinel.exists()


@pytest.mark.parametrize("case", ["narrow", "float", "label 10", "negative label",
                                  "label count", "no labels", "not a dict", "meta",
                                  "missing member"])
def test_valid_archive_that_is_not_cifar10(tmp_path, case):
    rows = np.zeros((PER_BATCH, 3072), np.uint8)
    labels = [1] * PER_BATCH
    bad = {
        "narrow": batch_pickle(np.zeros((PER_BATCH, 100), np.uint8), labels, "x"),
        "float": batch_pickle(np.zeros((PER_BATCH, 3072), np.float32), labels, "x"),
        "label 10": batch_pickle(rows, [10] + labels[1:], "x"),
        "negative label": batch_pickle(rows, [-1] + labels[1:], "x"),
        "label count": batch_pickle(rows, labels[1:], "x"),
        "no labels": py2_pickle({b"data": rows}),
        "not a dict": py2_pickle([rows]),
        "meta": None,
        "missing member": None,
    }[case]
    members, _ = cifar_members()
    if case == "meta":
        members[f"{FOLDER}/batches.meta"] = meta_pickle(cifar10.CLASS_NAMES[:9])
    elif case == "missing member":
        del members[f"{FOLDER}/data_batch_5"]
    else:
        members[f"{FOLDER}/data_batch_2"] = bad
    with pytest.raises(ValueError, match="not CIFAR-10") as err:
        load_placed(tmp_path, tar_gz(members))
    assert "\n" not in str(err.value)


def test_garbage_file_is_rejected(tmp_path):
    blob = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(ValueError, match="not a readable .tar.gz"):
        load_placed(tmp_path, blob)


def test_unknown_split(tmp_path, good):
    with pytest.raises(ValueError, match="split"):
        cifar10.load_cifar10(place(tmp_path, good[0]), "validation", md5=md5(good[0]))


# --------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_5000():
    start = time.perf_counter()
    images, labels, names = shapes.load_shapes("train", seed=0, num_examples=5000)
    return images, labels, names, time.perf_counter() - start


def test_shapes_generation_is_fast(shapes_5000):
    assert shapes_5000[3] < 2.0


def test_shapes_format_and_balance(shapes_5000):
    images, labels, names, _ = shapes_5000
    assert images.shape == (5000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int32
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    assert images.min() < 20 and images.max() > 235  # uses the whole range
    assert len(np.unique(labels[:50])) > 5  # shuffled, not sorted by class
    assert len(names) == 10 and names[0] == "warm-disk" and names[9] == "cool-ring"


def test_shapes_images_all_differ(shapes_5000):
    images = shapes_5000[0]
    assert len({image.tobytes() for image in images}) == len(images)


def test_shapes_hierarchy():
    assert shapes.COARSE_GROUPS == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert shapes.FINE_GROUPS == [[0, 5], [1, 6], [2, 7], [3, 8], [4, 9]]
    assert shapes.DECISION_PROBLEMS == {"coarse": shapes.COARSE_GROUPS,
                                        "fine": shapes.FINE_GROUPS}
    for coarse, group in enumerate(shapes.COARSE_GROUPS):
        assert {shapes.CLASS_NAMES[c].split("-")[0] for c in group} == {
            shapes.COARSE_NAMES[coarse]}
    for fine, group in enumerate(shapes.FINE_GROUPS):
        assert {shapes.CLASS_NAMES[c].split("-")[1] for c in group} == {
            shapes.FINE_NAMES[fine]}


def test_shapes_background_shows_the_coarse_class(shapes_5000):
    images, labels, _, _ = shapes_5000
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]],
                            axis=1).astype(float)  # (N, 128, 3)
    red_minus_blue = border[..., 0].mean(1) - border[..., 2].mean(1)
    warm = labels < 5
    assert (red_minus_blue[warm] > 20).all()
    assert (red_minus_blue[~warm] < -20).all()


def test_shapes_have_pixel_noise(shapes_5000):
    """Along the top row (never touched by a shape) second differences cancel the smooth
    background gradient and leave the noise."""
    top = shapes_5000[0][:, 0].astype(float)  # (N, 32, 3)
    second = top[:, :-2] - 2 * top[:, 1:-1] + top[:, 2:]
    assert (second.std(axis=(1, 2)) > 2).mean() > 0.95


def test_shapes_are_drawn_as_named():
    """Coverage of each shape (centre (16, 16), radius 10, unrotated) at probe pixels."""
    # Probe pixels, as (dx, dy) from the centre: centre, right 9, right 12, diagonal 7,
    # up 9, down 7, down 4 (y grows downwards).
    probes = [(0, 0), (9, 0), (12, 0), (7, 7), (0, -9), (0, 7), (0, 4)]
    expected = {  # covered (1) or not (0) at each probe
        "disk": "1101111",
        "square": "1001011",
        "triangle": "1000101",
        "cross": "1100111",
        "ring": "0101110",
    }
    one = np.ones(1, np.float32)
    coverages = []
    for fine, name in enumerate(shapes.FINE_NAMES):
        alpha = shapes._coverage(fine, 16 * one, 16 * one, 10 * one, 0 * one,
                                 0.4 * one).reshape(32, 32)
        assert alpha.min() >= 0 and alpha.max() <= 1
        got = "".join(str(int(alpha[16 + dy, 16 + dx] > 0.5)) for dx, dy in probes)
        assert got == expected[name], name
        coverages.append(alpha > 0.5)
    for i in range(5):
        for j in range(i):
            iou = (coverages[i] & coverages[j]).sum() / (coverages[i] | coverages[j]).sum()
            assert iou < 0.8, (shapes.FINE_NAMES[i], shapes.FINE_NAMES[j])


def test_shapes_are_deterministic_by_seed_and_split():
    a = shapes.load_shapes("train", seed=1, num_examples=300)
    b = shapes.load_shapes("train", seed=1, num_examples=300)
    c = shapes.load_shapes("train", seed=2, num_examples=300)
    d = shapes.load_shapes("test", seed=1, num_examples=300)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for other in (c, d):
        assert not np.array_equal(a[1], other[1])
        assert (a[0] != other[0]).any(axis=(1, 2, 3)).all()  # every image differs


def test_shapes_default_sizes_and_bad_split():
    assert shapes.DEFAULT_SIZES == {"train": 50_000, "test": 10_000}
    with pytest.raises(ValueError, match="split"):
        shapes.load_shapes("valid")


# --------------------------------------------------------------------------------------
# Common interface and helpers
# --------------------------------------------------------------------------------------

def test_load_dataset_shapes():
    ds = load_dataset("shapes", "unused", split="test", seed=3, num_examples=200)
    assert isinstance(ds, Dataset) and len(ds) == 200 and ds.num_classes == 10
    images, labels, _ = shapes.load_shapes("test", seed=3, num_examples=200)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.class_names == shapes.CLASS_NAMES
    assert ds.decision_problems == {"coarse": shapes.COARSE_GROUPS, "fine": shapes.FINE_GROUPS}
    ds.decision_problems["coarse"].append([0])  # a copy: the module's groups stay intact
    assert shapes.DECISION_PROBLEMS["coarse"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_load_dataset_cifar10(tmp_path, good, monkeypatch):
    blob, expected = good
    monkeypatch.setattr(cifar10, "MD5", md5(blob))
    monkeypatch.setattr(cifar10, "URL", closed_port_url())
    ds = load_dataset("cifar10", place(tmp_path, blob), split="test", num_examples=5)
    np.testing.assert_array_equal(ds.images, expected["images"]["test_batch"][:5])
    np.testing.assert_array_equal(ds.labels, expected["labels"]["test_batch"][:5])
    assert ds.class_names == cifar10.CLASS_NAMES
    assert ds.decision_problems == {
        "animals vs vehicles": [[2, 3, 4, 5, 6, 7], [0, 1, 8, 9]],
        "cat vs dog": [[3], [5]],
        "automobile vs truck": [[1], [9]],
    }
    with pytest.raises(ValueError, match="num_examples"):
        load_dataset("cifar10", tmp_path, split="test", num_examples=PER_BATCH + 1)


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match="cifar10.*shapes"):
        load_dataset("mnist", "data")


def test_dataset_validates():
    images = np.zeros((4, 32, 32, 3), np.uint8)
    labels = np.array([0, 1, 2, 3], np.int32)
    names = ("a", "b", "c", "d")
    Dataset(images, labels, names, {"a vs b": [[0], [1]]})
    with pytest.raises(ValueError):
        Dataset(images.astype(np.float32), labels, names, {})
    with pytest.raises(ValueError):
        Dataset(images, labels.astype(np.int64), names, {})
    with pytest.raises(ValueError):
        Dataset(images, labels, names[:3], {})
    with pytest.raises(ValueError):
        Dataset(images, labels, names, {"bad": [[0], [0, 1]]})


def test_model_range_round_trip():
    x = np.arange(256, dtype=np.uint8).reshape(1, 4, 4, 16)
    y = to_model_range(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert y.min() == -1.0 and y.max() == 1.0
    np.testing.assert_array_equal(from_model_range(y), x)
    z = to_model_range(jnp.asarray(x))
    assert isinstance(z, jax.Array) and z.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(z), y, rtol=0, atol=1e-6)


def test_random_flip():
    images = jax.random.normal(jax.random.key(0), (64, 8, 8, 3))
    flip = jax.jit(random_flip)
    out = np.asarray(flip(jax.random.key(1), images))
    x = np.asarray(images)
    same = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)])
    assert (same ^ flipped).all()  # each image exactly kept or exactly mirrored
    assert 0 < flipped.sum() < 64
    np.testing.assert_array_equal(np.asarray(flip(jax.random.key(1), images)), out)
    again = np.asarray(flip(jax.random.key(2), images))
    assert not np.array_equal(again, out)
    assert flip(jax.random.key(1), images).dtype == images.dtype
