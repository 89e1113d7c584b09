"""The serving backends, one registry entry each: how it loads, and what ``auto`` needs to know.

============  ==============================================  ==================================
backend       runners                                         runs from
============  ==============================================  ==================================
onnxruntime   :class:`slimsd.runners_ort.OrtRunners`          ONNX export (made on start-up)
openvino      :class:`~slimsd.serve.runners_openvino.OpenVINORunners`  the same ONNX export (CPU)
torch         :class:`slimsd.serve.runners_torch.TorchRunners`  the diffusers folder itself
tensorrt      :class:`~slimsd.serve.runners_tensorrt.TensorRTRunners`  engines (built on start-up)
triton        :class:`~slimsd.serve.runners_triton.TritonRunners`  a Triton server's three models
============  ==============================================  ==================================

Each :class:`Backend` gives ``load(settings, source)`` -> :class:`Loaded` (runners, the U-Net
spec that says which sizes they take, the :data:`~slimsd.precision.Precision` they compute
in) and, for :func:`choose_backend`, where it runs, what it computes in on a CPU and whether
its package is installed. The rule ``auto`` follows is measured (docs/serve.md, "How auto
chooses"; the numbers live there, not here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slimsd.precision import Precision, RequestedPrecision, precision_of
from slimsd.specs import ComponentSpec, ModelDims, component_specs

from .settings import BACKENDS as SETTINGS_BACKENDS

log = logging.getLogger("slimsd.serve")


@dataclass(frozen=True)
class Source:
    """The model being served, resolved once: what every backend's ``load`` gets besides the settings."""

    model: str  # what the user named (preset, folder or hub id)
    folder: Path  # its diffusers folder
    dims: ModelDims

    def onnx_dir(self, settings) -> Path:
        """``--onnx-dir``, else the cached ONNX export of the folder (exported when missing or stale)."""
        if settings.onnx_dir:
            return Path(settings.onnx_dir)
        from .models import ensure_onnx

        return ensure_onnx(self.model, self.folder, settings.dtype, settings.cache_dir)


@dataclass(frozen=True)
class Loaded:
    runners: object  # slimsd.denoise.Runners
    spec: ComponentSpec  # the U-Net's: which image sizes the runners accept
    precision: Precision  # what they compute in (for /v1/models and logs)


@dataclass(frozen=True)
class Backend:
    name: str
    label: str  # for the reasons auto logs
    load: Callable[..., Loaded]  # (settings, source) -> Loaded
    cpu_bf16: bool = False  # computes in bf16 on a CPU with BF16 (a candidate of auto there)
    available: Callable[[], bool] = lambda: True  # whether its Python package imports


def _load_onnxruntime(settings, source: Source) -> Loaded:
    from slimsd.runners_ort import OrtRunners

    if settings.precision == "int8":
        raise ValueError("precision: int8 is the openvino backend's (slimsd export int8 makes its U-Net); "
                         "use --backend openvino")
    providers = ["CPUExecutionProvider"] if settings.device == "cpu" else None
    runners = OrtRunners(source.onnx_dir(settings), providers=providers, threads=settings.threads)
    return Loaded(runners, runners.specs["unet"], precision_of(settings.dtype))  # what the export holds


def _load_openvino(settings, source: Source) -> Loaded:
    from .runners_openvino import OpenVINORunners

    if settings.device == "cuda":
        raise ValueError("backend openvino runs on the CPU; use onnxruntime or tensorrt for --device cuda")
    runners = OpenVINORunners(source.onnx_dir(settings), precision=settings.precision, threads=settings.threads,
                              cache=settings.openvino_cache, static_shapes=settings.openvino_static_shapes)
    return Loaded(runners, runners.specs["unet"], runners.precision)  # auto resolved against the CPU


def _load_torch(settings, source: Source) -> Loaded:
    from .runners_torch import TorchRunners

    if settings.precision == "bf16" and settings.device == "cuda":
        raise ValueError("precision: bf16 is a CPU setting; with --device cuda use --dtype float16")
    dtype = settings.dtype if settings.precision == "auto" else settings.precision
    runners = TorchRunners(source.folder, device=settings.device, dtype=dtype, threads=settings.threads)
    return Loaded(runners, runners.specs["unet"], runners.precision)  # eager modules take any valid size


def _load_tensorrt(settings, source: Source) -> Loaded:
    from .runners_tensorrt import TensorRTRunners

    onnx_dir = source.onnx_dir(settings)
    runners = TensorRTRunners(settings.engines_dir or _ensure_engines(onnx_dir, settings))
    return Loaded(runners, component_specs(onnx_dir)["unet"], precision_of(settings.dtype))


def _load_triton(settings, source: Source) -> Loaded:
    from .runners_triton import TritonRunners

    specs = component_specs(source.onnx_dir(settings))
    prefix = settings.triton_model_prefix.replace("{model}", source.model)
    runners = TritonRunners(settings.triton_url, specs, settings.triton_protocol, timeout_s=settings.request_timeout_s,
                            models={n: prefix + n for n in specs})
    runners.check_ready()
    return Loaded(runners, specs["unet"], precision_of(settings.dtype))


def _openvino_available() -> bool:
    from . import runners_openvino

    return runners_openvino.available()


# bf16 candidates in the order measured fastest: auto takes the first one installed
BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("onnxruntime", "ONNX Runtime", _load_onnxruntime),
    Backend("openvino", "OpenVINO", _load_openvino, cpu_bf16=True, available=_openvino_available),
    Backend("torch", "torch", _load_torch, cpu_bf16=True),
    Backend("tensorrt", "TensorRT", _load_tensorrt),
    Backend("triton", "Triton", _load_triton),
)}

assert set(BACKENDS) == set(SETTINGS_BACKENDS), "serve/settings.py BACKENDS must name the registry's entries"

# -- auto ----------------------------------------------------------------------------------------
# U-Nets below this size run fastest in ONNX Runtime fp32 on a CPU, above it in bf16
# (docs/serve.md, "How auto chooses", has the measurements on either side).
SMALL_UNET_PARAMS = 100_000_000
FP32_BACKEND = "onnxruntime"  # the fastest fp32 runtime measured on CPUs (and the CUDA default)


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    precision: RequestedPrecision  # handed to the runner
    why: str


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch CUDA: a CPU machine
        return False


def choose_backend(settings, unet_params: int | None, bf16: str | None) -> BackendChoice:
    """What ``--backend auto`` runs, and why: the measured fastest accurate runtime for this
    machine and model size (docs/serve.md, "How auto chooses").

    * a CUDA GPU (``--device cuda``, or ``auto`` with one visible) -> onnxruntime (CUDA provider);
    * ``--precision f32`` -> onnxruntime: the fastest fp32 CPU runtime measured at both sizes;
    * a small U-Net (< ``SMALL_UNET_PARAMS``) with precision auto -> onnxruntime fp32;
    * ``--precision int8`` -> openvino (the int8 U-Net of ``slimsd export int8``);
    * an SD-size U-Net on a CPU with BF16 -> the first installed ``cpu_bf16`` backend of
      :data:`BACKENDS` in bf16 (openvino, else torch: no ONNX export needed either); openvino
      gets ``auto``, which is int8 where the export's int8 report vouches for it on this CPU;
    * any other CPU -> onnxruntime fp32.

    ``unet_params``: None = unknown size (treated as SD-size). ``bf16``: the CPU's BF16 kind
    (:func:`slimsd.hardware.cpu_bf16`: ``"amx"``, ``"avx512_bf16"``) or None without BF16.
    """
    if settings.device == "cuda":
        return BackendChoice(FP32_BACKEND, "auto", "device cuda")
    if settings.device == "auto" and _cuda_visible():
        return BackendChoice(FP32_BACKEND, "auto", "a CUDA GPU is visible")
    if settings.precision == "f32":
        return BackendChoice(FP32_BACKEND, "f32", "precision f32: ONNX Runtime is the fastest fp32 CPU runtime measured")
    if settings.precision == "int8":
        if not BACKENDS["openvino"].available():
            raise ValueError("precision: int8 needs the openvino backend: pip install 'slimsd[openvino]'")
        return BackendChoice("openvino", "int8", "precision int8: the OpenVINO int8 U-Net of slimsd export int8")
    size = f"U-Net {unet_params / 1e6:.1f}M params" if unet_params is not None else "U-Net size unknown"
    if settings.precision == "auto" and unet_params is not None and unet_params < SMALL_UNET_PARAMS:
        return BackendChoice(FP32_BACKEND, "f32", f"CPU, {size} (< {SMALL_UNET_PARAMS / 1e6:.0f}M): per-call overhead "
                             "dominates, ONNX Runtime fp32 measured fastest")
    if bf16 is None:
        if settings.precision == "bf16":
            raise ValueError("precision: bf16 needs a CPU with BF16 support (AVX512-BF16 or AMX); this one reports "
                             "neither. Use precision f32 or auto.")
        return BackendChoice(FP32_BACKEND, "f32", f"CPU without BF16, {size}: ONNX Runtime fp32")
    candidates = [b for b in BACKENDS.values() if b.cpu_bf16]
    pick = next(b for b in candidates if b.available())  # torch is always there
    missing = "".join(f", {b.name} not installed (pip install 'slimsd[{b.name}]' is faster: docs/serve.md)"
                      for b in candidates[:candidates.index(pick)])
    if pick.name == "openvino" and settings.precision == "auto":  # bf16 here, or int8 where its report vouches
        return BackendChoice(pick.name, "auto", f"CPU with {bf16}, {size}: OpenVINO bf16, or int8 where "
                             "slimsd export int8 measured it faster and its quality check passed")
    return BackendChoice(pick.name, "bf16", f"CPU with {bf16}, {size}{missing}: {pick.label} bf16")


def _ensure_engines(onnx_dir: Path, settings) -> Path:
    """TensorRT engines for the export, built beside it on first use (needs the GPU that serves)."""
    from slimsd.export.tensorrt import TensorRTConfig, export_tensorrt

    out = onnx_dir.with_name(onnx_dir.name + "-trt")
    # the engine batch counts CFG rows: 2 per image
    cfg = TensorRTConfig(max_batch=max(2, 2 * settings.max_batch_size), opt_batch=2)
    export_tensorrt(onnx_dir, out, cfg, log=lambda m: log.info("tensorrt: %s", m))
    return out
