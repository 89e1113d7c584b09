"""Atomic file writes: a killed process or a concurrent writer never leaves half a file.

    atomic_write_text(path, json.dumps(data))
    with atomic_path(path) as tmp:      # for writers that want a path (torch, safetensors, PIL)
        save_file(tensors, tmp)
    with atomic_dir(folder) as tmp:     # a whole folder (save_pretrained): all of it or none
        pipe.save_pretrained(tmp)

The temporary name carries the process id and thread id, so concurrent writers of one path
never share a temporary file; the last rename wins, and readers see the old or the new file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` if the block succeeds.

    A killed or failed writer leaves no half folder under the final name (the temporary one
    is removed). The old folder, if any, is removed just before the rename: readers see the
    old folder, then (briefly) none, then the new one.
    """
    path = Path(path)
    tmp = _tmp_for(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
