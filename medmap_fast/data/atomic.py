"""Writing files and folders so that they appear whole or not at all.

Everything is first written under a hidden temporary name next to its destination (the same file
system, so the final rename is one atomic step), and removed again if writing fails: a reader, or the
next run after an interrupted one, sees the old version or the new one, never half of one. Hidden
names also keep the temporary folders out of ``find_cases``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


def _temporary_name(path: Path, suffix: str = "") -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}"


def atomic_write(path: PathLike, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it onto ``path`` in one step.

    suffix: ending of the temporary name, for writers that choose the format from it (``".nii.gz"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL with mode 0666 under the umask: the permissions a plain open() would give (mkstemp's are 0600)
    while True:
        tmp = _temporary_name(path, suffix)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(path: PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a new empty temporary folder to fill; when the block ends without error it becomes ``path``.

    replace: an existing ``path`` is swapped for the new folder (moved aside first, as a folder cannot be
    renamed onto a non-empty one: for that instant neither is there); otherwise, if ``path`` appeared in
    the meantime (another process made the same folder), that one is kept and the new one dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if replace and path.exists():
            old = _temporary_name(path, ".old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
