"""Temp files beside their destination, for writes that rename into place (a crash never leaves half a file), and
the atomic text write built on them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(path: Path, suffix: str = ".tmp") -> str:
    """An empty temp file in path's folder, readable as a file created there normally would be (not mkstemp's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to path through a temp file and rename, so a crash never leaves half a file."""
    p = Path(path)
    tmp = temp_beside(p)
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
