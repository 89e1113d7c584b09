"""Artifact manifests: sha256 of every file of a folder, checked before a folder is used.

``manifest.json`` sits in the folder it describes::

    {"files": {"unet/diffusion_pytorch_model.safetensors": "<sha256>", ...}, ...anything else}

A folder whose files do not match its manifest is refused with an error naming the file:
a truncated download or a hand-edited weight file never loads silently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_hashes(folder: Path, exclude=(MANIFEST,)) -> dict[str, str]:
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in exclude and "__pycache__" not in p.parts
    }


def write_manifest(folder: Path, **fields) -> dict:
    """(Re)write ``folder/manifest.json`` with the hashes of all files plus ``fields``."""
    folder = Path(folder)
    path = folder / MANIFEST
    old = json.loads(path.read_text()) if path.exists() else {}
    data = {**old, **fields, "files": folder_hashes(folder)}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


class CorruptArtifactError(ValueError):
    """A file of an artifact folder is missing or does not match its manifest."""


def verify_manifest(folder: Path, patterns=("*.safetensors", "*.json", "*.txt")) -> dict | None:
    """Check the listed files whose names match ``patterns``; ``None`` if there is no manifest."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    for rel, digest in data.get("files", {}).items():
        if not any(Path(rel).match(p) for p in patterns):
            continue
        f = folder / rel
        if not f.is_file():
            raise CorruptArtifactError(f"{f}: listed in {path} but missing")
        if sha256_file(f) != digest:
            raise CorruptArtifactError(f"{f}: sha256 does not match {path} (corrupt or modified file)")
    return data
