"""Atomic file writes: a killed process or a concurrent writer never leaves half a file.

    atomic_write_text(path, json.dumps(data))
    with atomic_path(path) as tmp:      # for writers that want a path (torch, safetensors, PIL)
        save_file(tensors, tmp)

The temporary name carries the process id and thread id, so concurrent writers of one path
never share a temporary file; the last rename wins, and readers see the old or the new file.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; renamed onto ``path`` if the block succeeds."""
    path = Path(path)
    tmp = _tmp_for(path)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
