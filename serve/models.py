"""Which model to serve, and the ONNX export it runs from (made on first start-up).

A fresh clone has only the diffusers folder of tiny-sd; ``slimsd serve`` exports it into a
cache folder keyed by the source folder and export settings, then reuses it. The exporter
(:func:`slimsd.export.onnx.export_onnx`) re-checks source and output sha256 on every call, so
a retrained model is re-exported and a half-written cache is repaired.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("slimsd.serve")

TEACHER = "tiny-sd"
STUDENT = "tiny-sd-slim"  # the compressed 8-step model (committed preset; the default when it resolves)


def default_model() -> str:
    """The compressed model when its preset resolves, else the teacher."""
    from slimsd.models import resolve_model

    try:
        resolve_model(STUDENT)
        return STUDENT
    except Exception:  # noqa: BLE001 - not there (yet): any failure means "use the teacher"
        return TEACHER


def onnx_cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from slimsd.models import cache_dir as slimsd_cache

    return slimsd_cache() / "onnx"


def onnx_cache_dir(model: str, folder: Path, dtype: str, dynamic_hw: bool, cache_dir=None) -> Path:
    """``<cache>/<model>-<hash of resolved folder + settings>``: one export per source and settings."""
    key = f"{Path(folder).resolve()}|{dtype}|{'dynamic' if dynamic_hw else 'static'}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    from slimsd.models import slug

    return onnx_cache_root(cache_dir) / f"{slug(model.strip('/').split('/')[-1])}-{digest}"


@contextmanager
def _file_lock(path: Path):
    """Exclusive lock so replicas started together on one machine export once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_onnx(model: str, folder: Path, dtype: str = "float32", cache_dir=None) -> Path:
    """The ONNX export of ``folder``, exported into the cache when missing or stale.

    Exports use dynamic height/width so one export serves every allowed size.
    """
    from slimsd.export.onnx import OnnxExportConfig, export_onnx

    out = onnx_cache_dir(model, folder, dtype, True, cache_dir)
    with _file_lock(out.with_name(out.name + ".lock")):
        t = _mtime(out / "manifest.json")
        export_onnx(str(folder), out, OnnxExportConfig(dtype=dtype, dynamic_hw=True),
                    log=lambda m: log.info("export: %s", m))
        if t is None:
            log.info("exported %s to %s", model, out)
    return out


def _mtime(p: Path) -> float | None:
    try:
        return os.stat(p).st_mtime
    except OSError:
        return None


def weights_bytes(folder: Path) -> int:
    """Bytes of the model's weight files (safetensors / bin / onnx): what loading it needs at least."""
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin", "*.onnx", "*.onnx_data")
               for f in Path(folder).rglob(pat) if f.is_file())


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(model: str, name: str | None = None, available: int | None = None) -> None:
    """Refuse to load ``model`` when its weights alone exceed the memory still available (a clear
    start-up error instead of the OOM killer halfway through loading several models)."""
    from slimsd.models import resolve_model

    need = weights_bytes(resolve_model(model))
    free = available if available is not None else available_memory_bytes()
    if free is not None and need > free:
        raise MemoryError(f"model {name or model!r}: its weights take {need / 2**20:.0f} MiB but only "
                          f"{free / 2**20:.0f} MiB of memory is available; serve fewer models (--max-models) or a "
                          f"smaller one")
