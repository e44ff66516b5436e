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


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_name)`` on a temporary file beside ``path``, then rename it into place.

    A reader never sees a half-written file, and a failed write leaves no file behind.
    """
    path = ensure_writable(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
