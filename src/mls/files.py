"""Writing output files safely: fail before the work if the path cannot be written, never leave half a file."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def ensure_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any computation, when ``path`` cannot be written (tries a file beside it)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output path {str(path)!r} is a folder; expected a file name")
    parent = path.parent
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "does not exist"
        raise ValueError(f"output folder {str(parent)!r} {what}; create it or choose another output path")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise PermissionError(f"output path {str(path)!r} is not writable: {err.strerror}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"output path {str(path)!r} is not writable")
    return path


def ensure_writable_folder(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (and its parents) and check that a file can be written in it, before
    any work; a plain-words error otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {str(path)!r} is a file; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise PermissionError(f"output folder {str(path)!r} cannot be created or written: "
                              f"{err.strerror or err}; choose another --out") from None
    return path


class CheckpointNotWritten(OSError):
    """A checkpoint could not be written (full disk, read-only folder): the run stops, older files stay as they were."""

    def __init__(self, path: str | os.PathLike, error: OSError):
        super().__init__(f"cannot write checkpoint {path}: {error.strerror or error}; the run stopped, and the "
                         "checkpoints written before are unchanged (free some space or fix the folder's "
                         "permissions, then --resume auto)")
        self.errno = error.errno


def _fsync(path: str | os.PathLike, folder: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to the disk, so that it survives a power cut too."""
    if folder and os.name == "nt":  # Windows cannot open a folder for syncing; its rename is durable enough
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if folder else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_name)`` on a temporary file beside ``path``, sync it, then rename it into place.

    A reader never sees a half-written file, whenever the writer is killed: ``path`` is either the
    old file or the complete new one. A failed write (e.g. a full disk) leaves the old file as it was
    and no temporary file behind. The folder is synced after the rename, so that the new name is on
    the disk too.
    """
    path = ensure_writable(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private (0600); give it a new file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync(path.parent, folder=True)
    return path
