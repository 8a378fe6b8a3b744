"""Folders written all at once: a reader (or a crash) sees the previous complete folder or the new one, never a mix.

A writer killed outright (SIGKILL, power loss) cannot remove its staging folder `.<name>.<random>` beside the target,
nor, if it died between its two renames, its `.<name>.old.<random>` (which then holds the previous version). Each
writer therefore holds an exclusive `flock` on its own staging and retired folders while it works (the kernel drops
it when the process dies, however it dies), and the next write of the same target removes the ones nobody holds:
those are left by dead writers, the live ones stay locked. A previous version found in a retired folder while the
target is missing is put back first. Without `fcntl` (Windows) or where a folder cannot be locked, nothing is removed.

Nothing is lost through an output path either (`check_output_path`): every folder a command writes carries a marker
file naming that command, and a command replaces (or writes into) only a path that is missing, an empty folder, or a
folder with its own marker; anything else (a regular file, a folder of other files, another command's output such as a
trained model) takes `overwrite=True` (`--overwrite`). An output path that is an input, holds one or lies inside one
is refused always: writing there would destroy or change what the command reads.
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # no advisory locks: leftovers are never removed, so a live writer's folder is never touched
    fcntl = None

_LEFTOVER = re.compile(r"(old\.)?[a-z0-9_]+")  # what follows ".<name>.": mkdtemp's random part (no dots)
MARKER = ".sepit-output"  # in every folder a command of this project writes: {"writer": <the command>}


def _writer_of(folder: Path) -> str | None:
    """The command named by `folder`'s marker; None when there is no readable marker."""
    try:
        writer = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("writer")
    except (OSError, ValueError, AttributeError):  # no marker, not JSON, or JSON that is not an object
        return None
    return writer if isinstance(writer, str) else None


def _input_paths(inputs: Iterable[str | os.PathLike | None]) -> Iterator[tuple[str, Path]]:
    """(as given, resolved) for each input that is a local path; Hub ids and unset arguments name no local path."""
    for given in inputs:
        if given is None or str(given) == "" or not os.path.lexists(given):
            continue
        yield str(given), Path(given).resolve()


def check_output_path(
    path: str | os.PathLike,
    writer: str,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    field: str = "output_dir",
    may_hold_inputs: bool = False,
) -> Path:
    """`path` as a Path if command `writer` may write it (see the module docstring); else a ValueError naming `field`,
    what is there and the fix. `inputs` are the paths the command reads (files, folders, or Hub ids, which are
    skipped). `may_hold_inputs`: the command writes only into new sub-folders of `path`, each checked by the command
    that writes it, so an input below `path` is safe (the main job reading a dataset it built before)."""
    path = Path(path)
    if str(path) == "":
        raise ValueError(f"{field}: empty path; give the folder to write")
    target = path.resolve()
    for given, source in _input_paths(inputs):
        if target == source or (target in source.parents and not may_hold_inputs):
            raise ValueError(f"{field}: {path} is or holds the input {given}; writing it would destroy what is read")
        if source in target.parents:
            raise ValueError(f"{field}: {path} lies inside the input {given}; write the output elsewhere")
    if overwrite or not os.path.lexists(path):
        return path
    if path.is_symlink():
        raise ValueError(
            f"{field}: {path} is a symbolic link (to {os.readlink(path)}); give the folder itself, or --overwrite to "
            "replace the link"
        )
    if not path.is_dir():
        raise ValueError(
            f"{field}: {path} is an existing file, not a folder this command wrote; choose another path, or "
            "--overwrite to replace it"
        )
    found = _writer_of(path)
    if found == writer or (found is None and not any(path.iterdir())):
        return path
    held = f"the output of {found}" if found else f"files no command of this project wrote (no {MARKER} marker)"
    raise ValueError(f"{field}: {path} holds {held}; choose a new or empty folder, or --overwrite to replace it")


def _mark(folder: Path, writer: str) -> None:
    (folder / MARKER).write_text(json.dumps({"writer": writer}) + "\n", encoding="utf-8")


def claim_output_folder(
    path: str | os.PathLike,
    writer: str,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    field: str = "output_dir",
    may_hold_inputs: bool = False,
) -> Path:
    """For commands that write into their folder as they go (trainers, the main job): `check_output_path`, then the
    folder is created (a file or link there is removed when `overwrite`) and marked as `writer`'s."""
    path = check_output_path(path, writer, inputs, overwrite, field, may_hold_inputs)
    if overwrite and (path.is_symlink() or (os.path.lexists(path) and not path.is_dir())):
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    _mark(path, writer)
    return path


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
def atomic_folder(
    folder: str | os.PathLike,
    writer: str = "sepit",
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    field: str = "output_dir",
) -> Iterator[Path]:
    """Yield a staging folder beside `folder`, marked as written by `writer`; on success it replaces `folder` by
    renames, on error it is removed. `folder` is checked first (`check_output_path`: ValueError naming `field`), then
    the leftovers of writers of `folder` that were killed are removed (see the module docstring)."""
    folder = check_output_path(folder, writer, inputs, overwrite, field)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder)
    staging, lock = _locked_mkdtemp(f".{folder.name}.", folder.parent)
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the published folder private to its writer
    try:
        _mark(staging, writer)
        yield staging
        if os.path.lexists(folder):
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


__all__ = ["MARKER", "atomic_folder", "check_output_path", "claim_output_folder"]
