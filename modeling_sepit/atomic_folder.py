"""Folders written all at once: a reader (or a crash) sees the previous complete folder or the new one, never a mix.

A writer killed outright (SIGKILL, power loss) cannot remove its staging folder `.<name>.<random>` beside the target,
nor, if it died between its two renames, its `.<name>.old.<random>` (which then holds the previous version). Each
writer therefore holds an exclusive `flock` on its own staging and retired folders while it works (the kernel drops
it when the process dies, however it dies), and the next write of the same target removes the ones nobody holds:
those are left by dead writers, the live ones stay locked. A previous version found in a retired folder while the
target is missing is put back first. Without `fcntl` (Windows) or where a folder cannot be locked, nothing is removed.
"""

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # no advisory locks: leftovers are never removed, so a live writer's folder is never touched
    fcntl = None

_LEFTOVER = re.compile(r"(old\.)?[a-z0-9_]+")  # what follows ".<name>.": mkdtemp's random part (no dots)


def _locked_mkdtemp(prefix: str, parent: Path) -> tuple[Path, int | None]:
    """A new folder and a descriptor holding an exclusive lock on it (None where locks are unavailable)."""
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        if fcntl is None:
            return path, None
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # another writer's clean-up took it before it was locked: make another
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # that clean-up holds it and is removing it
            os.close(fd)
            continue
        except OSError:  # this file system has no flock: unlocked, so never removed by a clean-up either
            os.close(fd)
            return path, None
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            return path, fd
        os.close(fd)  # locked only after a clean-up had removed it


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _remove_leftovers(folder: Path) -> None:
    """Remove the staging and retired folders of `folder` that no live writer holds locked."""
    if fcntl is None:
        return
    prefix = f".{folder.name}."
    for path in folder.parent.iterdir():
        if not (path.name.startswith(prefix) and _LEFTOVER.fullmatch(path.name[len(prefix) :])):
            continue
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live writer (or not lockable): leave it
            os.close(fd)
            continue
        try:
            previous = path / folder.name
            retired = path.name[len(prefix) :].startswith("old.")
            if retired and previous.is_dir() and not folder.exists():  # its writer died between the two renames
                os.replace(previous, folder)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder beside `folder`; on success it replaces `folder` by renames, on error it is removed.
    Leftovers of writers of `folder` that were killed are removed first (see the module docstring)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder)
    staging, lock = _locked_mkdtemp(f".{folder.name}.", folder.parent)
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the published folder private to its writer
    try:
        yield staging
        if folder.exists():
            retired, retired_lock = _locked_mkdtemp(f".{folder.name}.old.", folder.parent)
            try:
                os.replace(folder, retired / folder.name)
                os.replace(staging, folder)
                shutil.rmtree(retired)
            finally:
                _unlock(retired_lock)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _unlock(lock)


__all__ = ["atomic_folder"]
