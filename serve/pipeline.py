"""The served pipeline: one model, one backend, the shared denoising loop.

Text -> tokenizer -> text encoder -> scheduler loop with classifier-free guidance -> VAE
decode is :func:`slimsd.denoise.generate` (shared with ``OrtRunners`` and the Triton
``pipeline`` model); a backend only supplies its :class:`~slimsd.denoise.Runners`. The
backends, and how ``auto`` (the default) picks one, are in :mod:`slimsd.serve.backends`.
Tokenizer and scheduler config come from the model's own folder for every backend.

:func:`load_served_pipeline` is serve's loader (settings -> :class:`Pipeline`); the core
:func:`slimsd.models.load_pipeline` loads a diffusers ``StableDiffusionPipeline``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from slimsd.defaults import GenerationDefaults, generation_defaults
from slimsd.models import stored_params
from slimsd.precision import Precision
from slimsd.runners import generate_with_defaults
from slimsd.specs import ComponentSpec, ModelDims

from .backends import BACKENDS, SMALL_UNET_PARAMS, BackendChoice, Source, choose_backend  # noqa: F401 - re-exported

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
    precision: Precision = "f32"  # what the runners compute in (for /v1/models and logs)
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
                 width: int | None = None, scheduler: str | None = None,
                 callback: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
        """uint8 [N, H, W, 3] for N prompts; None picks the model's defaults.

        ``callback(i, x)`` runs after each denoising step (``i`` steps done, ``x`` the latents, as
        :func:`slimsd.denoise.generate` calls it); an exception it raises stops the loop there (the
        engine's interrupt)."""
        return generate_with_defaults(self.runners, self.tokenizer, self.scheduler(scheduler), self.spec,
                                      self.defaults, prompts, negative_prompts, steps=steps, guidance=guidance,
                                      seeds=seeds, height=height, width=width, callback=callback)

    def warmup(self) -> float:
        """One small generation: first-call costs (allocations, kernel selection) off the first user."""
        t0 = time.perf_counter()
        self.generate(["warm-up"], None, [0], steps=2)
        return time.perf_counter() - t0


def load_served_pipeline(settings) -> Pipeline:
    """Resolve the model, prepare the backend (export / engines if missing) and load it."""
    import json

    from slimsd.denoise import load_tokenizer
    from slimsd.hardware import cpu_bf16
    from slimsd.models import resolve_model

    from .models import default_model

    model = settings.model or default_model()
    folder = resolve_model(model)
    name = settings.model_name or model
    dims = ModelDims.from_folder(folder)
    t0 = time.perf_counter()
    if settings.backend == "auto":
        choice = choose_backend(settings, stored_params(folder, "unet"), bf16=cpu_bf16())
        settings = settings.model_copy(update={"backend": choice.backend, "precision": choice.precision})
        log.info("backend auto -> %s, precision %s (%s)", choice.backend, choice.precision, choice.why)
    loaded = BACKENDS[settings.backend].load(settings, Source(model, folder, dims))
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pipe = Pipeline(name=name, folder=folder, backend=settings.backend, runners=loaded.runners,
                    tokenizer=load_tokenizer(folder / "tokenizer"), scheduler_config=scheduler_config,
                    dims=dims, spec=loaded.spec, defaults=generation_defaults(folder),
                    default_scheduler=settings.scheduler, precision=loaded.precision)
    pipe.scheduler(None)  # an unknown default scheduler fails at start-up, not on the first request
    log.info("loaded %s (%s) on %s %s in %.1f s; defaults %d steps, guidance %.1f", name, folder, pipe.backend,
             pipe.precision, time.perf_counter() - t0, pipe.defaults.steps, pipe.defaults.guidance)
    return pipe


load_pipeline = load_served_pipeline  # old name (benchmarks/)
