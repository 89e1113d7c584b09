"""The runners base: the three :class:`slimsd.denoise.Runners` calls on top of ``run(name, **inputs)``.

    class MyRunners(ComponentRunners):
        def run(self, name, **inputs):          # inputs named as in slimsd.specs
            return {"out_sample": ...}          # outputs by name (at least the main one)

Every backend implements only ``run``: ONNX Runtime (:mod:`slimsd.runners_ort`), OpenVINO,
TensorRT, Triton and torch (serve/) and the BLS calls of the Triton ``pipeline`` model
(export/triton_pipeline_model.py). :class:`ExportFolderRunners` adds what runners over a
``slimsd export onnx`` folder share, and :func:`generate_with_defaults` is the one place that
fills what a caller left out (image size, steps, guidance) before :func:`slimsd.denoise.generate`.
Core: numpy only; torch and diffusers are imported where a scheduler or tokenizer is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from slimsd.defaults import GenerationDefaults, generation_defaults
from slimsd.specs import MAIN_OUTPUT, ComponentSpec, component_specs


class ComponentRunners:
    """``text_encoder`` / ``unet`` / ``vae_decoder`` as calls of :meth:`run`, returning the main
    output of each (:data:`slimsd.specs.MAIN_OUTPUT`). Subclasses implement ``run``."""

    def run(self, name: str, **inputs) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _main(self, name: str, **inputs) -> np.ndarray:
        return self.run(name, **inputs)[MAIN_OUTPUT[name]]

    def text_encoder(self, input_ids):
        return self._main("text_encoder", input_ids=input_ids)

    def unet(self, sample, timestep, encoder_hidden_states):
        return self._main("unet", sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states)

    def vae_decoder(self, latent_sample):
        return self._main("vae_decoder", latent_sample=latent_sample)


def generate_with_defaults(runners, tokenizer, scheduler, spec: ComponentSpec, defaults: GenerationDefaults,
                           prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                           steps: int | None = None, guidance: float | None = None, seeds=None,
                           height: int | None = None, width: int | None = None, callback=None) -> np.ndarray:
    """:func:`slimsd.denoise.generate` with what the caller left out filled from the model.

    Height / width default to the model's image size and are checked against ``spec`` (the
    U-Net's: static exports take one size only); ``steps`` (None or 0) and ``guidance`` (None)
    come from ``defaults``. uint8 [N, H, W, 3].
    """
    from slimsd.denoise import generate

    dims = spec.dims
    height, width = height or dims.image_size[0], width or dims.image_size[1]
    spec.check_hw((height, width))
    return generate(
        runners, tokenizer, scheduler, list(prompts), negative_prompts,
        steps=steps or defaults.steps, guidance=defaults.guidance if guidance is None else guidance,
        seeds=None if seeds is None else list(seeds), height=height, width=width,
        vae_scaling_factor=dims.vae_scaling_factor, vae_scale_factor=dims.vae_scale_factor,
        latent_channels=dims.latent_channels, callback=callback,
    )


class ExportFolderRunners(ComponentRunners):
    """What every runner over a ``slimsd export onnx`` folder shares: opening the folder (its
    manifest and specs), the path of each ``model.onnx``, and the folder's tokenizer, scheduler
    and defaults. Subclasses call :meth:`_open` and implement ``run``.
    """

    folder: Path
    manifest: dict
    specs: dict

    def _open(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest = self.folder / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.folder}: no manifest.json (not a `slimsd export onnx` folder)")
        self.manifest = json.loads(manifest.read_text())
        self.specs = component_specs(self.folder)

    def onnx_path(self, name: str) -> Path:
        path = self.folder / name / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (export incomplete?)")
        return path

    # -- what generate() needs besides the runners -------------------------------------------
    @property
    def pipeline_info(self) -> dict:
        return self.manifest.get("pipeline", {})

    def load_tokenizer(self):
        from slimsd.denoise import load_tokenizer

        return load_tokenizer(self.folder / "tokenizer")

    def load_scheduler(self, name: str | None = None):
        from slimsd.denoise import load_scheduler

        return load_scheduler(self.folder / "scheduler", name)

    def generate(self, prompts, negative_prompts=None, steps: int | None = None, guidance: float | None = None,
                 seeds=None, height: int | None = None, width: int | None = None, scheduler=None, tokenizer=None):
        """:func:`generate_with_defaults` with this folder's tokenizer, scheduler and defaults."""
        return generate_with_defaults(
            self, tokenizer or self.load_tokenizer(), scheduler or self.load_scheduler(), self.specs["unet"],
            generation_defaults(self.folder), prompts, negative_prompts, steps=steps, guidance=guidance,
            seeds=seeds, height=height, width=width)
