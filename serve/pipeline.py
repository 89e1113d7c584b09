"""The served pipeline: one model, one backend, the shared denoising loop.

Text -> tokenizer -> text encoder -> scheduler loop with classifier-free guidance -> VAE
decode is :func:`slimsd.denoise.generate` (shared with ``OrtRunners`` and the Triton
``pipeline`` model); a backend only supplies its :class:`~slimsd.denoise.Runners`:

============  ==============================================  ==================================
backend       runners                                         runs from
============  ==============================================  ==================================
onnxruntime   :class:`slimsd.runners_ort.OrtRunners`          ONNX export (made on start-up)
openvino      :class:`~slimsd.serve.runners_openvino.OpenVINORunners`  the same ONNX export (CPU)
torch         :class:`slimsd.serve.runners_torch.TorchRunners`  the diffusers folder itself
tensorrt      :class:`~slimsd.serve.runners_tensorrt.TensorRTRunners`  engines (built on start-up)
triton        :class:`~slimsd.serve.runners_triton.TritonRunners`  a Triton server's three models
============  ==============================================  ==================================

Tokenizer and scheduler config come from the model's own folder for every backend.
``auto`` (the default) resolves to one of them in :func:`choose_backend`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from slimsd.defaults import GenerationDefaults, generation_defaults
from slimsd.models import stored_params
from slimsd.specs import ComponentSpec, ModelDims, component_specs

log = logging.getLogger("slimsd.serve")

# request name -> diffusers class (all keep the model's noise schedule from its config)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",  # algorithm_type "dpmsolver++" is its default
}


@dataclass
class Pipeline:
    """What the server needs to turn a request into images."""

    name: str  # id clients see
    folder: Path  # the diffusers folder (tokenizer, scheduler config)
    backend: str
    runners: object  # slimsd.denoise.Runners
    tokenizer: object
    scheduler_config: dict
    dims: ModelDims
    spec: ComponentSpec  # the U-Net's: which image sizes the backend accepts
    defaults: GenerationDefaults
    default_scheduler: str = "ddim"
    precision: str = "f32"  # f32 | bf16 | fp16: what the runners compute in (for /v1/models and logs)
    _schedulers: dict = field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.dims.image_size

    def scheduler(self, name: str | None):
        from slimsd.denoise import load_scheduler

        key = name or self.default_scheduler
        if key not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {key!r}; choose one of {', '.join(SCHEDULERS)}")
        if key not in self._schedulers:  # generate() copies it, so one instance serves all threads
            self._schedulers[key] = load_scheduler(self.scheduler_config, SCHEDULERS[key])
        return self._schedulers[key]

    def check_size(self, height: int, width: int) -> None:
        """ValueError with the reason when the backend cannot make ``height`` x ``width``."""
        self.spec.check_hw((height, width))

    def generate(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, seeds: Sequence[int],
                 steps: int | None = None, guidance: float | None = None, height: int | None = None,
                 width: int | None = None, scheduler: str | None = None) -> np.ndarray:
        """uint8 [N, H, W, 3] for N prompts; None picks the model's defaults."""
        from slimsd.denoise import generate

        h, w = height or self.image_size[0], width or self.image_size[1]
        self.check_size(h, w)
        return generate(
            self.runners, self.tokenizer, self.scheduler(scheduler), list(prompts), negative_prompts,
            steps=steps or self.defaults.steps, guidance=self.defaults.guidance if guidance is None else guidance,
            seeds=list(seeds), height=h, width=w, vae_scaling_factor=self.dims.vae_scaling_factor,
            vae_scale_factor=self.dims.vae_scale_factor, latent_channels=self.dims.latent_channels,
        )

    def warmup(self) -> float:
        """One small generation: first-call costs (allocations, kernel selection) off the first user."""
        t0 = time.perf_counter()
        self.generate(["warm-up"], None, [0], steps=2)
        return time.perf_counter() - t0


def load_pipeline(settings) -> Pipeline:
    """Resolve the model, prepare the backend (export / engines if missing) and load it."""
    import json

    from slimsd.denoise import load_tokenizer
    from slimsd.models import resolve_model

    from .models import default_model, ensure_onnx

    model = settings.model or default_model()
    folder = resolve_model(model)
    name = settings.model_name or model
    dims = ModelDims.from_folder(folder)
    t0 = time.perf_counter()
    backend, precision = settings.backend, settings.precision
    if backend == "auto":
        choice = choose_backend(settings, stored_params(folder, "unet"))
        backend, precision = choice.backend, choice.precision
        log.info("backend auto -> %s, precision %s (%s)", backend, precision, choice.why)
    if backend == "torch":
        from .runners_torch import TorchRunners

        if precision == "bf16" and settings.device == "cuda":
            raise ValueError("precision: bf16 is a CPU setting; with --device cuda use --dtype float16")
        dtype = "bfloat16" if precision == "bf16" else ("float32" if precision == "f32" else settings.dtype)
        runners = TorchRunners(folder, device=settings.device, dtype=dtype, threads=settings.threads)
        computed = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "f32")
        spec = component_specs(dims, dynamic_hw=True)["unet"]  # eager modules take any valid size
    else:
        computed = "fp16" if settings.dtype == "float16" else "f32"  # what the ONNX export holds
        onnx_dir = Path(settings.onnx_dir) if settings.onnx_dir else ensure_onnx(model, folder, settings.dtype,
                                                                                 settings.cache_dir)
        spec = component_specs(onnx_dir)["unet"]
        if backend == "onnxruntime":
            from slimsd.runners_ort import OrtRunners

            providers = ["CPUExecutionProvider"] if settings.device == "cpu" else None
            runners = OrtRunners(onnx_dir, providers=providers, threads=settings.threads)
        elif backend == "openvino":
            from .runners_openvino import OpenVINORunners

            if settings.device == "cuda":
                raise ValueError("backend openvino runs on the CPU; use onnxruntime or tensorrt for --device cuda")
            runners = OpenVINORunners(onnx_dir, precision=precision, threads=settings.threads,
                                      cache=settings.openvino_cache)
            computed = runners.precision  # auto resolved against the CPU
        elif backend == "tensorrt":
            from .runners_tensorrt import TensorRTRunners

            runners = TensorRTRunners(settings.engines_dir or _ensure_engines(onnx_dir, settings))
        elif backend == "triton":
            from .runners_triton import TritonRunners

            runners = TritonRunners(settings.triton_url, component_specs(onnx_dir), settings.triton_protocol,
                                    timeout_s=settings.request_timeout_s)
            runners.check_ready()
        else:  # pragma: no cover - settings validate the name
            raise ValueError(f"unknown backend {backend!r}")
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pipe = Pipeline(name=name, folder=folder, backend=backend, runners=runners,
                    tokenizer=load_tokenizer(folder / "tokenizer"), scheduler_config=scheduler_config,
                    dims=dims, spec=spec, defaults=generation_defaults(folder),
                    default_scheduler=settings.scheduler, precision=computed)
    pipe.scheduler(None)  # an unknown default scheduler fails at start-up, not on the first request
    log.info("loaded %s (%s) on %s %s in %.1f s; defaults %d steps, guidance %.1f", name, folder, backend, computed,
             time.perf_counter() - t0, pipe.defaults.steps, pipe.defaults.guidance)
    return pipe


# U-Nets below this size run fastest in ONNX Runtime fp32 on a CPU, above it in bf16. Measured
# on either side (docs/serve.md, "CPU runtimes", quiet 2-core AVX512-BF16 machine): tiny-sd (3.4M)
# one image 0.347 s in ONNX Runtime vs 0.375 s OpenVINO bf16, 1.07 s torch bf16 (per-call overhead,
# not matrix math, dominates); SD v2.1 (866M) U-Net batch 2: ONNX Runtime fp32 9.14 s, OpenVINO
# bf16 4.16 s, torch bf16 5.76 s. Sizes in between were not measured: the line sits well above
# the largest "small" model we know of.
SMALL_UNET_PARAMS = 100_000_000


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    precision: str  # "auto" | "bf16" | "f32": handed to the runner
    why: str


def choose_backend(settings, unet_params: int | None = None, bf16: str | None | bool = False) -> BackendChoice:
    """What ``--backend auto`` runs, and why: the measured fastest accurate runtime for this
    machine and model size (docs/serve.md, "CPU runtimes"; benchmarks/results/cpu_backends*.md).

    * a CUDA GPU (``--device cuda``, or ``auto`` with one visible) -> onnxruntime (CUDA provider);
    * ``--precision f32`` -> onnxruntime: the fastest fp32 CPU runtime measured at both sizes;
    * a small U-Net (< ``SMALL_UNET_PARAMS``) with precision auto -> onnxruntime fp32;
    * an SD-size U-Net on a CPU with BF16 (AVX512-BF16 or AMX) -> openvino bf16 (U-Net batch 2
      4.16 s vs torch bf16 5.76 s vs ONNX Runtime fp32 9.14 s; VAE 6.60 / 7.28 / 13.25 s);
      without openvino installed -> torch bf16 (no ONNX export needed either); evaluator scores
      within noise of fp32 for both;
    * any other CPU -> onnxruntime fp32.

    ``unet_params`` None = unknown size (treated as SD-size); ``bf16`` is :func:`cpu_bf16`'s
    answer (``False``: look it up).
    """
    from .runners_openvino import available
    from slimsd.hardware import cpu_bf16

    if settings.device == "cuda":
        return BackendChoice("onnxruntime", "auto", "device cuda")
    if settings.device == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                return BackendChoice("onnxruntime", "auto", "a CUDA GPU is visible")
        except Exception:  # noqa: BLE001 - no torch CUDA: a CPU machine
            pass
    if settings.precision == "f32":
        return BackendChoice("onnxruntime", "f32", "precision f32: ONNX Runtime is the fastest fp32 CPU runtime measured")
    size = f"U-Net {unet_params / 1e6:.1f}M params" if unet_params is not None else "U-Net size unknown"
    if settings.precision == "auto" and unet_params is not None and unet_params < SMALL_UNET_PARAMS:
        return BackendChoice("onnxruntime", "f32", f"CPU, {size} (< {SMALL_UNET_PARAMS / 1e6:.0f}M): per-call overhead "
                             "dominates, ONNX Runtime fp32 measured fastest")
    kind = cpu_bf16() if bf16 is False else bf16
    if kind is None:
        if settings.precision == "bf16":
            raise ValueError("precision: bf16 needs a CPU with BF16 support (AVX512-BF16 or AMX); this one reports "
                             "neither. Use precision f32 or auto.")
        return BackendChoice("onnxruntime", "f32", f"CPU without BF16, {size}: ONNX Runtime fp32")
    if available():
        return BackendChoice("openvino", "bf16", f"CPU with {kind}, {size}: OpenVINO bf16")
    return BackendChoice("torch", "bf16", f"CPU with {kind}, {size}, openvino not installed "
                         "(pip install 'slimsd[openvino]' for ~1.4x more): torch bf16")


def _ensure_engines(onnx_dir: Path, settings) -> Path:
    """TensorRT engines for the export, built beside it on first use (needs the GPU that serves)."""
    from slimsd.export.tensorrt import TensorRTConfig, export_tensorrt

    out = onnx_dir.with_name(onnx_dir.name + "-trt")
    # the engine batch counts CFG rows: 2 per image
    cfg = TensorRTConfig(max_batch=max(2, 2 * settings.max_batch_size), opt_batch=2)
    export_tensorrt(onnx_dir, out, cfg, log=lambda m: log.info("tensorrt: %s", m))
    return out
