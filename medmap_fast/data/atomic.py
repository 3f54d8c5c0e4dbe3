"""Writing files and folders so that they appear whole or not at all, and checking output locations first.

Everything is first written under a hidden temporary name next to its destination (the same file
system, so the final rename is one atomic step), and removed again if writing fails: a reader, or the
next run after an interrupted one, sees the old version or the new one, never half of one. Hidden
names also keep the temporary folders out of ``find_cases``.

A process killed while writing cannot remove its temporaries; their names, ``.<name>.<pid>.<8 hex>.tmp...``,
say whose they were, and :func:`remove_stale_temporaries` removes those of processes no longer running.

Errors while writing are :class:`WriteError`: they name the destination (never the temporary) and the
cause. :func:`check_output_dir` finds an unusable output folder before any work is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

PathLike = Union[str, os.PathLike]

_TEMPORARY_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp(?P<suffix>.*)$", re.DOTALL)
_OLD = ".old"  # a folder moved aside to make room for its replacement


class WriteError(OSError):
    """Writing ``path`` failed. ``errno`` is the underlying error's (ENOSPC, EROFS, ...), ``filename`` the
    destination; the original exception is the ``__cause__``."""

    def __init__(self, path: PathLike, reason: str, code: Optional[int] = None):
        super().__init__(code, reason, str(path))
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"

    def __reduce__(self):  # OSError's own would call __init__ with (errno, strerror, filename)
        return type(self), (self.path, self.reason, self.errno)


class OutputPathError(ValueError):
    """An output location that cannot be used (a file where a folder is needed, a folder that cannot be
    written), found before any work is done. The message names the argument, the path and why."""


def write_error(path: PathLike, error: BaseException) -> WriteError:
    """A :class:`WriteError` for ``path`` that says why ``error`` (an OSError met while writing it, or a
    WriteError for the temporary that stands in for ``path``) happened."""
    path = Path(path)
    if isinstance(error, WriteError):
        return WriteError(path, error.reason, error.errno)
    code = getattr(error, "errno", None)
    blocking = _file_in_the_way(path.parent)
    if blocking is not None:
        reason = _not_a_folder(blocking)
    elif path.is_dir():
        reason = "it is a folder"
    else:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return WriteError(path, reason, code)


def _not_a_folder(path: Path) -> str:
    return f"{path} is a file, not a folder" if path.is_file() else f"{path} exists and is not a folder"


def _file_in_the_way(folder: Path) -> Optional[Path]:
    """The nearest existing ancestor of ``folder`` (or ``folder``) if it is not a folder, else None."""
    folder = Path(os.path.abspath(folder))
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return None if folder.is_dir() else folder


def _temporary_name(path: Path, suffix: str = "") -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is that of a temporary made here (by any process)."""
    return _TEMPORARY_RE.match(name) is not None


def atomic_write(path: PathLike, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it onto ``path`` in one step.

    suffix: ending of the temporary name, for writers that choose the format from it (``".nii.gz"``).
    An OSError on the way (full disk, read-only file system, a file where a folder should be) is raised
    as a :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary_file(path, suffix)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_error(path, e) from e
        raise
    return path


def _create_temporary_file(path: Path, suffix: str) -> Path:
    # O_EXCL with mode 0666 under the umask: the permissions a plain open() would give (mkstemp's are 0600)
    while True:
        tmp = _temporary_name(path, suffix)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _make_temporary_dir(path: Path) -> Path:
    tmp = _temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise write_error(path, e) from e
    return tmp


@contextlib.contextmanager
def atomic_dir(path: PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a new empty temporary folder to fill; when the block ends without error it becomes ``path``.

    replace: an existing ``path`` is swapped for the new folder (which takes its permissions), in one
    step where the system can (Linux); elsewhere the old folder is first moved aside under a temporary
    name, and should the process die before the new one is in place, :func:`remove_stale_temporaries`
    moves it back. Otherwise, if ``path`` appeared in the meantime (another process made the same
    folder), that one is kept and the new one dropped.
    """
    path = Path(path)
    tmp = _make_temporary_dir(path)
    try:
        yield tmp
        if replace and path.is_dir():
            try:
                shutil.copymode(path, tmp)
                _replace_dir(tmp, path)
            except OSError as e:
                raise write_error(path, e) from e
            return
        try:
            os.rename(tmp, path)
        except OSError as e:
            if not path.is_dir():
                raise write_error(path, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_set(path: PathLike, marker: str) -> Iterator[Path]:
    """Yield a temporary folder in which to write a set of files and folders for the folder ``path``; when
    the block ends without error, they take the place of the entries of the same names in ``path``,
    which may hold other things too (left alone).

    marker: the name of one file of the set (it must be written), moved in last. If ``path`` does not
    exist, the temporary folder becomes it in one rename. Otherwise the set cannot move in as one step,
    so the marker says whether it is whole: the old marker is removed before the first entry moves and
    the new one moved in after the last. A folder without its marker holds an incomplete set. Folders of
    the set replace theirs whole; replacements into one ``path`` by concurrent processes take turns.
    """
    path = Path(os.path.abspath(path))
    inside = path.is_dir()
    # inside an existing folder: replacing its entries must not need write access to its parent
    tmp = _make_temporary_dir(path / path.name if inside else path)
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise FileNotFoundError(f"the new set for {path} lacks its marker file {marker}")
        if inside or not _rename_if_absent(tmp, path):
            _move_entries(tmp, path, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rename_if_absent(tmp: Path, path: Path) -> bool:
    """Rename ``tmp`` to ``path``; False if a folder ``path`` appeared in the meantime."""
    try:
        os.rename(tmp, path)
        return True
    except OSError as e:
        if path.is_dir():
            return False
        raise write_error(path, e) from e


def _move_entries(tmp: Path, path: Path, marker: str) -> None:
    with _locked(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / marker)
        for entry in sorted(os.scandir(tmp), key=lambda e: e.name):
            if entry.name == marker:
                continue
            dest = path / entry.name
            try:
                if entry.is_dir(follow_symlinks=False) and os.path.lexists(dest):
                    _replace_dir(Path(entry.path), dest)
                else:
                    os.replace(entry.path, dest)
            except OSError as e:
                raise write_error(dest, e) from e
        try:
            os.replace(tmp / marker, path / marker)
        except OSError as e:
            raise write_error(path / marker, e) from e


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` while the block runs (on systems with ``flock``; else no lock)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # no flock here, or a folder that can be written but not listed
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace_dir(new: Path, dest: Path) -> None:
    """Put the folder ``new`` in the place of the folder ``dest``, and delete the old one."""
    if _exchange(new, dest):
        _remove(new)  # which now holds the old one
        return
    # a folder cannot be renamed onto a non-empty one: for an instant neither is there
    old = _temporary_name(dest, _OLD)
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    """Delete a file, link or folder, as far as possible."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=None)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28, or none to load
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or the file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


# -- leftovers of killed processes -----------------------------------------------------------------------


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process's temporaries may be in use right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, OSError):
        return True  # another user's process, or a number that is no pid: leave it alone
    return True


def remove_stale_temporaries(folder: PathLike, name: Optional[str] = None) -> List[Path]:
    """Remove from ``folder`` the temporaries (see :func:`is_temporary`) of processes that are no longer
    running; only those for the destination ``name`` if given. Returns what was removed.

    A folder that was moved aside to be replaced and whose destination is missing (the process died
    between the two renames) is moved back instead: it is the last complete version. The temporaries of
    running processes, this one included, are kept: they may be in use. Nothing else is touched.
    """
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no such folder, or not one: nothing of ours there
        return []
    removed = []
    for entry in entries:
        m = _TEMPORARY_RE.match(entry.name)
        if m is None or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
            continue
        dest = folder / m["name"]
        if m["suffix"] == _OLD and not os.path.lexists(dest):
            with contextlib.suppress(OSError):  # if it cannot go back, it stays: it may be all there is
                os.rename(entry.path, dest)
            continue
        with contextlib.suppress(OSError):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


# -- output locations --------------------------------------------------------------------------------------


def check_output_dir(path: PathLike, argument: str, replaced: bool = False) -> Path:
    """``path`` if it can be an output folder: an existing folder that can be written, or a new path
    whose nearest existing ancestor is one. Nothing is created.

    argument: how the caller names the path (``"--out"``), for the message of the
    :class:`OutputPathError` raised otherwise. replaced: the folder itself is to be replaced by a new
    one, so its parent must be writable too.
    """
    path = Path(path)

    def fail(why: str) -> OutputPathError:
        return OutputPathError(f"{argument} {str(path)!r}: {why}; expected a folder that can be written, or a "
                               "new path inside one")

    if os.path.lexists(path) and not path.is_dir():
        raise fail("is a file, not a folder" if path.is_file() else "exists and is not a folder")
    blocking = _file_in_the_way(path)
    if blocking is not None:
        raise fail(f"cannot be created: {_not_a_folder(blocking)}")
    absolute = Path(os.path.abspath(path))
    nearest = absolute
    while not nearest.exists():
        nearest = nearest.parent
    must_write = [nearest] + ([absolute.parent] if replaced and nearest == absolute else [])
    for folder in must_write:
        why = _not_writable(folder)
        if why is not None:
            what = "is" if folder == absolute else f"cannot be {'replaced' if replaced else 'created'}: {folder} is"
            raise fail(f"{what} not writable ({why})")
    return path


def _not_writable(folder: Path) -> Optional[str]:
    """Why files cannot be made in ``folder``, or None if they can."""
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    effective = os.access in os.supports_effective_ids
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=effective):
        return "permission denied"
    return None
