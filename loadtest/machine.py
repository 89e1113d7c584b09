"""The machine a measurement ran on: CPU model and SIMD flags, cores, threads, load, versions."""

from __future__ import annotations

import os
import platform
import time

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_bf16", "amx_int8", "amx_tile")
PACKAGES = ("torch", "onnxruntime", "openvino", "diffusers", "transformers", "locust", "numpy", "optimum")


def cpu_info() -> dict:
    from slimsd.hardware import cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    return {"cpu": model, "simd_flags": [f for f in SIMD_FLAGS if f in flags], "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def versions(packages=PACKAGES) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def gpu_info() -> dict | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        p = torch.cuda.get_device_properties(0)
        return {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count()}
    except Exception:  # noqa: BLE001 - no usable torch CUDA: a CPU machine
        return None


def machine_info(threads: int | None = None, with_gpu: bool = False) -> dict:
    """Everything a reader needs to compare a committed number with their own machine."""
    info = {**cpu_info(), "os": f"{platform.system()} {platform.release()}",
            "load_average": [round(x, 2) for x in os.getloadavg()], "versions": versions(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if threads is not None:
        info["threads"] = threads
    if with_gpu:
        info["gpu"] = gpu_info()
    return info


def describe(info: dict) -> str:
    """One line for a report: ``AMD EPYC (avx2, avx512f, ...), 2 cores, load 8.1 / 8.5 / 8.9; torch ...``."""
    v = ", ".join(f"{k} {x}" for k, x in info.get("versions", {}).items())
    gpu = f"; GPU {info['gpu']['name']}" if info.get("gpu") else ""
    thr = f", {info['threads']} threads" if info.get("threads") else ""
    return (f"{info['cpu']} ({', '.join(info['simd_flags']) or 'no SIMD flags read'}), {info['logical_cores']} "
            f"logical cores{thr}{gpu}; load average {' / '.join(str(x) for x in info['load_average'])}; {v}")
