"""Outputs that appear whole or not at all (medmap_fast.data.atomic), tried with processes killed mid-write.

``kill_when_paused`` is shared with the tests of the commands that write through these helpers: it runs
a Python snippet in a new process, waits until the snippet calls ``pause()`` (at the moment of interest,
in the middle of writing), and kills the process with SIGKILL, which no clean-up code can catch.
"""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medmap_fast.data import atomic
from medmap_fast.data.atomic import (OutputPathError, WriteError, atomic_dir, atomic_set, atomic_write,
                                     atomic_write_text, check_output_dir, is_temporary, remove_stale_temporaries)

_PRELUDE = """
import os, sys, time
from pathlib import Path

def pause():
    Path(os.environ["PAUSE_FLAG"]).touch()
    time.sleep(600)
"""
# atomic.py loaded on its own, without the package (and torch): a child that starts in milliseconds
_ATOMIC_ONLY = f"""
import importlib.util
_spec = importlib.util.spec_from_file_location("atomic_alone", {str(Path(atomic.__file__))!r})
atomic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(atomic)
"""


def kill_when_paused(code: str, workdir: Path, setup: str = "", timeout: float = 120.0) -> int:
    """Run ``setup`` and then ``code`` (dedented) in a new Python process until it calls ``pause()``, and
    SIGKILL it there; returns its pid. Fails (with what the process printed) if it ends, or does not
    pause within ``timeout`` seconds.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    flag, log = workdir / "paused.flag", workdir / "child.log"
    flag.unlink(missing_ok=True)
    env = dict(os.environ, PAUSE_FLAG=str(flag))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _PRELUDE + setup + textwrap.dedent(code)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout
            while not flag.exists():
                if proc.poll() is not None:
                    pytest.fail(f"the process ended (status {proc.returncode}) before pausing:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the process did not pause within {timeout} s:\n{log.read_text()}")
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return proc.pid


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder`` (hidden ones included), {} if it is absent."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


# -- leftovers --------------------------------------------------------------------------------------------


def test_only_the_temporaries_of_ended_processes_are_removed(tmp_path):
    dead = dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".table.csv.{dead}.0123abcd.tmp": "stale file",
            f".case.nii.gz.{dead}.89abcdef.tmp.nii.gz": "stale file with a suffix",
            f".table.csv.{sleeper.pid}.0123abcd.tmp": "of a running process",
            f".table.csv.{os.getpid()}.0123abcd.tmp": "of this process",
            ".git": "a user's hidden file",
            f".notes.{dead}.tmp": "not our pattern",
            f"table.csv.{dead}.0123abcd.tmp": "not hidden",
        }
        for name, text in names.items():
            (tmp_path / name).write_text(text)
        (tmp_path / f".eval.{dead}.fedcba98.tmp").mkdir()
        (tmp_path / f".eval.{dead}.fedcba98.tmp" / "table.csv").write_text("half a set")
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == sorted(
            [f".table.csv.{dead}.0123abcd.tmp", f".case.nii.gz.{dead}.89abcdef.tmp.nii.gz",
             f".eval.{dead}.fedcba98.tmp"])
        kept = sorted(p.name for p in tmp_path.iterdir())
        assert kept == sorted(n for n in names if n not in {p.name for p in removed})
        assert all(is_temporary(n) for n in (f".a.{dead}.0123abcd.tmp", f".a.b.{dead}.0123abcd.tmp.old"))
        assert not any(is_temporary(n) for n in (".git", "a.1.0123abcd.tmp", f".a.{dead}.0123abcd"))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(tmp_path / "nowhere") == []


def test_a_folder_moved_aside_comes_back_if_its_replacement_never_arrived(tmp_path):
    dead = dead_pid()
    old = tmp_path / f".data.{dead}.0123abcd.tmp.old"
    old.mkdir()
    (old / "dataset.json").write_text("the only copy")
    (tmp_path / f".data.{dead}.4567abcd.tmp").mkdir()  # the new version, complete or not: it never arrived
    (tmp_path / f".other.{dead}.0123abcd.tmp").write_text("another destination's")
    remove_stale_temporaries(tmp_path, "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.{dead}.0123abcd.tmp", "data"]
    assert (tmp_path / "data" / "dataset.json").read_text() == "the only copy"
    # once the destination is back, a stale copy moved aside is only a leftover
    old.mkdir()
    remove_stale_temporaries(tmp_path, "data")
    assert not old.exists() and (tmp_path / "data" / "dataset.json").exists()


# -- checking output folders ----------------------------------------------------------------------------


def test_output_folder_checks(tmp_path):
    new = tmp_path / "a" / "b"
    assert check_output_dir(new, "--out") == new and not (tmp_path / "a").exists()  # nothing is made
    assert check_output_dir(tmp_path, "--out") == tmp_path
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match=r"^--out '.*file': is a file, not a folder; expected a folder"):
        check_output_dir(tmp_path / "file", "--out")
    for below in ("sub", "sub/deeper"):
        with pytest.raises(OutputPathError) as e:
            check_output_dir(tmp_path / "file" / below, "OUT")
        assert str(e.value).startswith(f"OUT '{tmp_path / 'file' / below}': cannot be created: {tmp_path / 'file'} "
                                       "is a file, not a folder")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputPathError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "link", "--out")


def test_read_only_file_system_is_found_before_writing(tmp_path, monkeypatch):
    statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag = statvfs(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly(path) if Path(path) == tmp_path else statvfs(path))
    with pytest.raises(OutputPathError, match=r"--out '.*': is not writable \(read-only file system\)"):
        check_output_dir(tmp_path, "--out")
    with pytest.raises(OutputPathError, match=rf"cannot be created: {tmp_path} is not writable \(read-only"):
        check_output_dir(tmp_path / "new", "--out")
    (tmp_path / "data").mkdir()
    # a folder to be replaced by a new one needs a writable parent
    with pytest.raises(OutputPathError, match=rf"cannot be replaced: {tmp_path} is not writable"):
        check_output_dir(tmp_path / "data", "OUT", replaced=True)


def test_no_permission_to_write_is_found_before_writing(tmp_path, monkeypatch):
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path and access(path, mode, **kw))
    with pytest.raises(OutputPathError, match=r"--out '.*': is not writable \(permission denied\)"):
        check_output_dir(tmp_path, "--out")
    with pytest.raises(OutputPathError, match=rf"cannot be created: {tmp_path} is not writable \(permission denied"):
        check_output_dir(tmp_path / "a" / "b", "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="file permissions do not stop root")
def test_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputPathError, match=r"is not writable \(permission denied\)"):
            check_output_dir(locked, "--out")
        with pytest.raises(OutputPathError, match="cannot be created"):
            check_output_dir(locked / "new", "--out")
    finally:
        locked.chmod(0o755)


# -- write errors ------------------------------------------------------------------------------------------


def test_write_errors_name_the_destination_and_the_cause(tmp_path):
    (tmp_path / "file").write_text("x")
    dest = tmp_path / "file" / "sub" / "t.csv"
    with pytest.raises(WriteError) as e:
        atomic_write_text(dest, "a")
    assert str(e.value) == f"cannot write {dest}: {tmp_path / 'file'} is a file, not a folder"
    assert isinstance(e.value, OSError) and e.value.filename == str(dest)
    assert isinstance(e.value.__cause__, OSError)

    (tmp_path / "folder").mkdir()
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path / 'folder'}: it is a folder"):
        atomic_write_text(tmp_path / "folder", "a")

    def full(tmp):
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError) as e:
        atomic_write(tmp_path / "t.csv", full)
    assert str(e.value) == f"cannot write {tmp_path / 't.csv'}: No space left on device"
    assert e.value.errno == errno.ENOSPC and e.value.__cause__.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # no temporary left

    def interrupted(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not an error about the file: passed on as it is
        atomic_write(tmp_path / "t.csv", interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


# -- folders replaced whole ----------------------------------------------------------------------------


@pytest.mark.parametrize("exchange", [True, False], ids=["one-step-swap", "two-renames"])
def test_atomic_dir_replaces_a_folder(tmp_path, monkeypatch, exchange):
    swaps = []
    if exchange:
        if atomic._renameat2() is None:
            pytest.skip("this system cannot swap two folders in one step")
        real = atomic._exchange
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: swaps.append(real(a, b)) or swaps[-1])
    else:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "data"
    target.mkdir(mode=0o750)
    (target / "old").write_text("old")
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["data"]
    assert target.stat().st_mode & 0o777 == 0o750  # the replacement keeps the folder's permissions
    assert swaps == ([True] if exchange else [])


def test_killed_between_the_two_renames_the_old_folder_comes_back(tmp_path):
    """Where the system cannot swap two folders in one step, the old one is moved aside first."""
    target = tmp_path / "data"
    target.mkdir()
    (target / "dataset.json").write_text("old")
    kill_when_paused(f"""
        atomic._exchange = lambda a, b: False
        rename = os.rename
        def rename_then_pause(src, dst):
            rename(src, dst)
            if str(dst).endswith(".old"):
                pause()
        os.rename = rename_then_pause
        with atomic.atomic_dir({str(target)!r}, replace=True) as tmp:
            (tmp / "dataset.json").write_text("new")
        """, tmp_path / "child", _ATOMIC_ONLY)
    assert not target.exists()
    remove_stale_temporaries(tmp_path, "data")
    assert (target / "dataset.json").read_text() == "old" and hidden(tmp_path) == []


# -- sets of files in a shared folder ----------------------------------------------------------------------


def _write_set(folder: Path, tag: str):
    for name in ("cases.csv", "table.csv", "config.json"):
        (folder / name).write_text(f"{name} {tag}")
    (folder / "predictions").mkdir()
    (folder / "predictions" / "a.nii.gz").write_text(f"prediction {tag}")


def test_atomic_set_in_a_new_and_in_a_shared_folder(tmp_path):
    out = tmp_path / "eval"
    with atomic_set(out, "config.json") as tmp:
        assert tmp.parent == tmp_path  # beside the folder to be: it appears with the whole set
        _write_set(tmp, "1")
    assert snapshot(out)["table.csv"] == b"table.csv 1"
    (out / "notes.txt").write_text("mine")
    (out / "predictions" / "b.nii.gz").write_text("of run 1 only")
    with atomic_set(out, "config.json") as tmp:
        assert tmp.parent == out  # inside: replacing the set needs no write access to the parent
        _write_set(tmp, "2")
    assert snapshot(out) == {"cases.csv": b"cases.csv 2", "config.json": b"config.json 2", "notes.txt": b"mine",
                             "predictions/a.nii.gz": b"prediction 2", "table.csv": b"table.csv 2"}
    assert hidden(out) == [] and hidden(tmp_path) == []
    with pytest.raises(RuntimeError):
        with atomic_set(out, "config.json") as tmp:
            _write_set(tmp, "3")
            raise RuntimeError("failed half way")
    assert snapshot(out)["table.csv"] == b"table.csv 2" and hidden(out) == []


def test_atomic_set_killed_while_writing_leaves_the_old_set(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    _write_set(out, "old")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    pid = kill_when_paused(f"""
        with atomic.atomic_set({str(out)!r}, "config.json") as tmp:
            (tmp / "cases.csv").write_text("new")
            pause()
        """, tmp_path / "child", _ATOMIC_ONLY)
    leftovers = hidden(out)
    assert leftovers and all(f".{pid}." in name for name in leftovers)  # the killed run's, and only those
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".")} == before
    remove_stale_temporaries(out)
    assert snapshot(out) == before


def test_atomic_set_killed_while_moving_in_says_it_is_incomplete(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    _write_set(out, "old")
    (out / "notes.txt").write_text("mine")
    kill_when_paused(f"""
        replace = os.replace
        def replace_then_pause(src, dst):
            replace(src, dst)
            if Path(dst).parent == Path({str(out)!r}):
                pause()
        os.replace = replace_then_pause
        with atomic.atomic_set({str(out)!r}, "config.json") as tmp:
            for name in ("cases.csv", "table.csv", "config.json"):
                (tmp / name).write_text("new")
        """, tmp_path / "child", _ATOMIC_ONLY)
    files = snapshot(out)
    assert "config.json" not in files and files["cases.csv"] == b"new" and files["table.csv"] == b"table.csv old"
    assert files["notes.txt"] == b"mine"
    remove_stale_temporaries(out)
    with atomic_set(out, "config.json") as tmp:
        _write_set(tmp, "again")
    assert snapshot(out) == {"cases.csv": b"cases.csv again", "config.json": b"config.json again",
                             "notes.txt": b"mine", "predictions/a.nii.gz": b"prediction again",
                             "table.csv": b"table.csv again"}


def test_atomic_set_killed_before_a_new_folder_appears(tmp_path):
    out = tmp_path / "eval"
    pid = kill_when_paused(f"""
        with atomic.atomic_set({str(out)!r}, "config.json") as tmp:
            (tmp / "cases.csv").write_text("new")
            pause()
        """, tmp_path / "child", _ATOMIC_ONLY)
    assert not out.exists() and [n for n in hidden(tmp_path) if n.startswith(f".eval.{pid}.")]
    remove_stale_temporaries(tmp_path, "eval")
    assert hidden(tmp_path) == []


def test_atomic_set_needs_its_marker(tmp_path):
    with pytest.raises(FileNotFoundError, match="marker"):
        with atomic_set(tmp_path / "eval", "config.json") as tmp:
            (tmp / "table.csv").write_text("no marker")
    assert list(tmp_path.iterdir()) == []
