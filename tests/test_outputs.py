"""Outputs that survive failure: a run's files land all together or not at all, with the
user's permissions; Ctrl-C, an --out that cannot be written and a full disk are one line each,
and the results already in --out stay as they were."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxdiff_info
from experiments import gmm
from experiments.cli import run_command
from jaxdiff_info import results

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "100", "--num-samples", "64", "--bootstrap", "20", "--no-progress"]
NAMES = ("summary.json", "curves.npz")


def leftovers(parent: Path) -> list[str]:
    """Hidden folders a staged write may leave beside its --out."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and p.name != results.MANIFEST)


def snapshot(folder: Path) -> dict[str, bytes]:
    """The files of `folder` but the run's manifest (`results.MANIFEST`)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != results.MANIFEST}


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    """A complete gmm run, copied into a fresh --out by `earlier`."""
    out = tmp_path_factory.mktemp("previous") / "results"
    assert gmm.main(FAST + ["--out", str(out)]) == 0
    return snapshot(out)


@pytest.fixture
def earlier(tmp_path, previous):
    """An --out holding the results of an earlier run and a file of the user's."""
    out = tmp_path / "results"
    out.mkdir()
    for name, data in previous.items():
        (out / name).write_bytes(data)
    (out / "notes.txt").write_text("mine")
    return out


# --- staged_outputs ------------------------------------------------------------------------------

def test_stage_is_moved_into_place_only_when_complete(tmp_path):
    out = tmp_path / "a" / "out"
    with results.staged_outputs(out, NAMES, overwrite=False) as stage:
        assert stage.parent == out.parent and stage.name.startswith(".out.partial-")
        results.write_json(stage / "summary.json", {"x": 1})
        assert not out.exists()
        results.write_npz(stage / "curves.npz", {"a": np.arange(3)})
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES + (results.MANIFEST,))
    assert results.earlier_outputs(out) == sorted(NAMES)
    assert leftovers(out.parent) == []


def test_failure_removes_the_stage_and_the_folders_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with results.staged_outputs(out, NAMES, overwrite=False) as stage:
            results.write_json(stage / "summary.json", {"x": 1})
            raise RuntimeError("a figure failed")
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_earlier_results_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("old")
    (out / "curves.npz").write_text("old")
    for interrupt in (RuntimeError("failed"), KeyboardInterrupt()):
        with pytest.raises(type(interrupt)):
            with results.staged_outputs(out, NAMES, overwrite=True) as stage:
                results.write_json(stage / "summary.json", {"new": 1})
                raise interrupt
        assert snapshot(out) == {"curves.npz": b"old", "summary.json": b"old"}
        assert leftovers(tmp_path) == []


def test_overwrite_replaces_the_results_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    for name in ("summary.json", "curves.npz", "trajectories.npz", "notes.txt", "sub/data.txt"):
        (out / name).write_text("old")
    with results.staged_outputs(out, NAMES, overwrite=True, replaces=["trajectories.npz"]) as stage:
        for name in NAMES:
            (stage / name).write_text("new")
    assert snapshot(out) == {"curves.npz": b"new", "notes.txt": b"old", "summary.json": b"new"}
    assert (out / "sub" / "data.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_overwrite_removes_every_output_of_the_earlier_run_whatever_wrote_it(tmp_path):
    """The manifest names what a run wrote: a run of another command (other output names) into
    the same --out replaces all of it, and without --overwrite is refused."""
    out = tmp_path / "out"
    with results.staged_outputs(out, ["summary.json", "samples.npz", "samples.png"], overwrite=False) as stage:
        for name in ("summary.json", "samples.npz", "samples.png"):
            (stage / name).write_text("guidance")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"already holds results \(samples.npz, samples.png, summary.json\); pass"):
        with results.staged_outputs(out, ["curves.npz", "entropy.png"], overwrite=False):
            pytest.fail("entered")
    with results.staged_outputs(out, ["curves.npz", "entropy.png"], overwrite=True) as stage:
        for name in ("curves.npz", "entropy.png"):
            (stage / name).write_text("gmm")
    assert snapshot(out) == {"curves.npz": b"gmm", "entropy.png": b"gmm", "notes.txt": b"mine"}
    assert results.earlier_outputs(out) == ["curves.npz", "entropy.png"]
    # the same in place (the working folder), and a manifest that cannot be read names nothing
    (out / results.MANIFEST).write_text("not json")
    assert results.earlier_outputs(out) == []


def test_refuses_to_replace_results_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "curves.npz").write_text("old")
    with pytest.raises(ValueError, match=r"already holds results \(curves.npz\); pass --overwrite"):
        with results.staged_outputs(out, NAMES, overwrite=False):
            pytest.fail("entered")
    assert leftovers(tmp_path) == []


def test_a_symlinked_out_keeps_its_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "summary.json").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    with results.staged_outputs(link, NAMES, overwrite=True) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".real.partial-")
        (stage / "summary.json").write_text("new")
    assert link.is_symlink() and (real / "summary.json").read_text() == "new"


def test_the_working_folder_is_updated_in_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("old")
    (out / "notes.txt").write_text("mine")
    monkeypatch.chdir(out)
    with results.staged_outputs(".", NAMES, overwrite=True) as stage:
        assert stage.parent == out
        (stage / "summary.json").write_text("new")
    assert os.getcwd() == str(out) and snapshot(out) == {"notes.txt": b"mine", "summary.json": b"new"}
    assert leftovers(out) == []


@pytest.mark.parametrize("where", ["/proc/jdi-test/out", "FILE/out"])
def test_an_out_that_cannot_be_written_is_found_on_entry(tmp_path, where):
    (tmp_path / "FILE").write_text("a file")
    out = where.replace("FILE", str(tmp_path / "FILE"))
    with pytest.raises(ValueError, match=rf"^cannot write results to {out}: .+; choose another --out$"):
        with results.staged_outputs(out, NAMES, overwrite=False):
            pytest.fail("entered")


def test_a_write_error_is_one_line_and_keeps_earlier_results(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("old")
    with pytest.raises(ValueError, match=rf"^cannot write results to {out}: Is a directory; choose another --out$"):
        with results.staged_outputs(out, NAMES, overwrite=True) as stage:
            (stage / "summary.json").mkdir()
            results.write_json(stage / "summary.json", {})
    assert snapshot(out) == {"summary.json": b"old"} and leftovers(tmp_path) == []


def test_a_mount_point_is_updated_in_place(tmp_path, monkeypatch):
    """A mounted --out (a container's volume) cannot be renamed: its files are replaced one by one."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("summary.json", "trajectories.npz", "notes.txt"):
        (out / name).write_text("old")
    ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or ismount(p))
    with pytest.raises(RuntimeError):
        with results.staged_outputs(out, NAMES, overwrite=True) as stage:
            assert stage.parent == out
            (stage / "summary.json").write_text("new")
            raise RuntimeError("failed")
    assert snapshot(out) == dict.fromkeys(["notes.txt", "summary.json", "trajectories.npz"], b"old")
    assert leftovers(out) == []
    with results.staged_outputs(out, NAMES, overwrite=True, replaces=["trajectories.npz"]) as stage:
        for name in NAMES:
            (stage / name).write_text("new")
    assert snapshot(out) == {"curves.npz": b"new", "notes.txt": b"old", "summary.json": b"new"}
    assert leftovers(out) == []


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_get_the_permissions_of_the_umask(tmp_path, umask, file_mode, folder_mode):
    import matplotlib.pyplot as plt

    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        with results.staged_outputs(out, NAMES, overwrite=False) as stage:
            results.write_json(stage / "summary.json", {})
            results.write_npz(stage / "curves.npz", {"a": np.zeros(2)})
            fig = plt.figure()
            results.save_figure(fig, stage / "figure.png")
            plt.close(fig)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        ["summary.json", "curves.npz", "figure.png", results.MANIFEST], file_mode)
    assert out.stat().st_mode & 0o777 == folder_mode


# --- run_command ---------------------------------------------------------------------------------

def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert run_command("prog", interrupted, out=tmp_path / "none", outputs=NAMES) == (130, None)
    assert capsys.readouterr().err == "prog: interrupted; nothing was written\n"
    (tmp_path / "summary.json").write_text("{}")
    assert run_command("prog", interrupted, out=tmp_path, outputs=NAMES) == (130, None)
    assert capsys.readouterr().err == f"prog: interrupted; nothing was written; the results in {tmp_path} are unchanged\n"


# --- the gmm CLI ---------------------------------------------------------------------------------

def test_a_failing_figure_leaves_the_earlier_results_as_they_were(earlier, monkeypatch):
    before = snapshot(earlier)

    def broken(*args):
        raise RuntimeError("the density figure failed")

    monkeypatch.setattr(gmm, "_density_figure", broken)
    with pytest.raises(RuntimeError, match="density figure"):
        gmm.main(FAST + ["--seed", "1", "--overwrite", "--out", str(earlier)])
    assert snapshot(earlier) == before
    assert leftovers(earlier.parent) == []


def test_overwrite_replaces_every_result_and_keeps_other_files(earlier):
    assert gmm.main(FAST + ["--seed", "1", "--overwrite", "--out", str(earlier)]) == 0
    assert (earlier / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in earlier.iterdir()) == sorted(gmm.OUTPUTS + ("notes.txt", results.MANIFEST))
    assert leftovers(earlier.parent) == []


@pytest.mark.parametrize("where", ["/proc/jdi-test/out", "FILE/out"])
def test_gmm_out_that_cannot_be_written_fails_before_computing(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "FILE").write_text("a file")
    out = where.replace("FILE", str(tmp_path / "FILE"))

    def computed(*args, **kwargs):
        raise AssertionError("the computation started")

    for name in ("exact_curves", "forward_mc_curves", "online_curves"):
        monkeypatch.setattr(jaxdiff_info, name, computed)
    assert gmm.main(FAST + ["--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{gmm.PROG}: error: cannot write results to {out}: ")
    assert err.endswith("; choose another --out\n") and err.count("\n") == 1


def _subprocess(args, prelude="pass"):
    """`python -m args...` in a fresh interpreter, after running `prelude` there."""
    env = {**os.environ, "JAXDIFF_INFO_CACHE": "off", "PYTHONDONTWRITEBYTECODE": "1", "JAX_PLATFORMS": "cpu"}
    run = f"import runpy, sys; {prelude}; sys.argv[1:] = {args[1:]!r}; runpy.run_module({args[0]!r}, " \
          "run_name='__main__', alter_sys=True)"
    return subprocess.Popen([sys.executable, "-c", run], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_full_disk_is_one_line_and_keeps_the_earlier_results(earlier):
    """Writes fail as on a full disk (a file-size limit of 1 kB: EFBIG); exit 2, one line."""
    before = snapshot(earlier)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))"
    proc = _subprocess(["experiments.gmm", *FAST, "--overwrite", "--out", str(earlier)], prelude=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert err == f"{gmm.PROG}: error: cannot write results to {earlier}: File too large; choose another --out\n"
    assert snapshot(earlier) == before and leftovers(earlier.parent) == []


def interrupt_when_staged(args, out: Path, after: float = 1.0):
    """Run a CLI in a subprocess and send it SIGINT `after` seconds into its run (once its
    stage folder exists); returns (exit status, stderr)."""
    proc = _subprocess(args)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(f".{out.name}.partial-") for p in out.parent.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no stage folder after 120 s"
        time.sleep(0.05)
    time.sleep(after)
    assert proc.poll() is None, "finished before the interrupt; make the run longer"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_ctrl_c_during_a_gmm_run(tmp_path, earlier):
    args = ["experiments.gmm", "--num-samples", "20000", "--bootstrap", "20", "--no-progress"]
    out = tmp_path / "fresh"
    code, err = interrupt_when_staged(args + ["--out", str(out)], out)
    assert (code, err) == (130, f"{gmm.PROG}: interrupted; nothing was written\n")
    assert not out.exists() and leftovers(tmp_path) == []

    before = snapshot(earlier)
    code, err = interrupt_when_staged(args + ["--overwrite", "--out", str(earlier)], earlier)
    assert (code, err) == (130, f"{gmm.PROG}: interrupted; nothing was written; the results in {earlier} "
                                f"are unchanged\n")
    assert snapshot(earlier) == before and leftovers(tmp_path) == []


def test_stages_a_killed_run_left_are_removed_and_no_other_folder(tmp_path):
    out, host = tmp_path / "out", socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs
    stale = tmp_path / f".out.partial-{gone.pid}@{host}-abc1de_2"
    stale_inside = out / f".partial-{gone.pid}@{host}-abcdefgh"
    kept = [tmp_path / f".out.partial-{os.getpid()}@{host}-zzzzzzzz",        # a live process's
            tmp_path / f".out.partial-{gone.pid}@elsewhere.example-abcdefgh",  # another host's
            tmp_path / f".out.previous-{gone.pid}@{host}-abc1de_2",           # earlier results moved aside
            tmp_path / f".outer.partial-{gone.pid}@{host}-abc1de_2"]          # another output folder's
    for folder in (stale, stale_inside, *kept):
        folder.mkdir(parents=True)
        (folder / "curves.npz").write_bytes(b"incomplete")
    (out / "notes.txt").write_text("mine")
    with results.staged_outputs(out, ["summary.json"], False) as stage:
        assert stage.name.startswith(f".out.partial-{os.getpid()}@{host}-")
        (stage / "summary.json").write_text("{}")
    assert not stale.exists() and not stale_inside.exists()
    assert all(folder.exists() for folder in kept)
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", "summary.json", results.MANIFEST])
