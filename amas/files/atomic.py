"""Atomic writes: a temp file beside the destination, renamed into place, so a crash never leaves half a file.

``atomic_path`` is the one place that does it; ``atomic_write_text`` writes text through it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temp path beside path (with path's suffix: torch.export and onnx want it) for the block to write; renamed
    over path when the block ends without an error, deleted otherwise."""
    p = Path(path)
    tmp = temp_beside(p, suffix=f".tmp{p.suffix}")
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to path atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
