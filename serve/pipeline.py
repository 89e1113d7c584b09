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
    backend = settings.backend
    if backend == "auto":
        backend, why = choose_backend(settings)
        log.info("backend auto -> %s (%s)", backend, why)
    if backend == "torch":
        from .runners_torch import TorchRunners

        runners = TorchRunners(folder, device=settings.device, dtype=settings.dtype, threads=settings.threads)
        spec = component_specs(dims, dynamic_hw=True)["unet"]  # eager modules take any valid size
    else:
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
            runners = OpenVINORunners(onnx_dir, precision=settings.precision, threads=settings.threads,
                                      cache=settings.openvino_cache)
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
                    default_scheduler=settings.scheduler)
    pipe.scheduler(None)  # an unknown default scheduler fails at start-up, not on the first request
    log.info("loaded %s (%s) on %s in %.1f s; defaults %d steps, guidance %.1f", name, folder, backend,
             time.perf_counter() - t0, pipe.defaults.steps, pipe.defaults.guidance)
    return pipe


def choose_backend(settings) -> tuple[str, str]:
    """What ``--backend auto`` runs, and why (measured: docs/serve.md, "OpenVINO").

    * a CUDA GPU (``--device cuda``, or ``auto`` with one visible) -> onnxruntime (CUDA provider);
    * a CPU where OpenVINO would run bf16 (package installed, CPU with BF16, ``--precision``
      auto or bf16) -> openvino: same speed as ONNX Runtime on tiny-sd, ~4x on SD-size U-Net
      and VAE, evaluator scores within noise;
    * any other CPU -> onnxruntime: OpenVINO f32 was not faster than ONNX Runtime fp32.
    """
    from .runners_openvino import available, resolve_precision

    if settings.device == "cuda":
        return "onnxruntime", "device cuda"
    if settings.device == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                return "onnxruntime", "a CUDA GPU is visible"
        except Exception:  # noqa: BLE001 - no torch CUDA: a CPU machine
            pass
    if not available():
        return "onnxruntime", "CPU, openvino not installed (pip install 'slimsd[openvino]')"
    try:
        precision = resolve_precision(settings.precision)
    except ValueError:  # bf16 asked for on a CPU without it: the openvino runner says so clearly
        return "openvino", f"precision {settings.precision} asked for"
    if precision == "bf16":
        return "openvino", "CPU with BF16: OpenVINO bf16"
    return "onnxruntime", "CPU without BF16 (or precision f32): OpenVINO f32 is not faster than ONNX Runtime"


def _ensure_engines(onnx_dir: Path, settings) -> Path:
    """TensorRT engines for the export, built beside it on first use (needs the GPU that serves)."""
    from slimsd.export.tensorrt import TensorRTConfig, export_tensorrt

    out = onnx_dir.with_name(onnx_dir.name + "-trt")
    # the engine batch counts CFG rows: 2 per image
    cfg = TensorRTConfig(max_batch=max(2, 2 * settings.max_batch_size), opt_batch=2)
    export_tensorrt(onnx_dir, out, cfg, log=lambda m: log.info("tensorrt: %s", m))
    return out
