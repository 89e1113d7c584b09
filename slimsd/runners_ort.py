"""ONNX Runtime :class:`~slimsd.denoise.Runners` over a ``slimsd export onnx`` folder.

    runners = OrtRunners("exported/")            # CUDA provider when available, else CPU
    images = runners.generate(["a red circle left of a blue square"], steps=25, seeds=[0])

Tensor names and dtypes come from the folder's specs (``manifest.json``): inputs are cast to
the exported dtype (float16 exports take float32 arrays too) and outputs come back float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slimsd.specs import COMPONENTS, component_specs


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class ExportFolderRunners:
    """What every runner over a ``slimsd export onnx`` folder shares: the three component calls
    on top of ``run(name, **inputs)``, and the folder's tokenizer, scheduler and defaults.

    Subclasses set ``folder``, ``manifest`` and ``specs`` and implement ``run``.
    """

    folder: Path
    manifest: dict
    specs: dict

    def run(self, name: str, **inputs) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # -- the Runners interface -------------------------------------------------------------
    def text_encoder(self, input_ids):
        return self.run("text_encoder", input_ids=input_ids)["last_hidden_state"]

    def unet(self, sample, timestep, encoder_hidden_states):
        return self.run("unet", sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states)["out_sample"]

    def vae_decoder(self, latent_sample):
        return self.run("vae_decoder", latent_sample=latent_sample)["sample"]

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
        """:func:`slimsd.denoise.generate` with this folder's tokenizer, scheduler and defaults."""
        from slimsd.denoise import generate

        info, dims = self.pipeline_info, self.specs["unet"].dims
        dh, dw = dims.image_size
        height, width = height or dh, width or dw
        self.specs["unet"].check_hw((height, width))
        return generate(
            self, tokenizer or self.load_tokenizer(), scheduler or self.load_scheduler(), prompts, negative_prompts,
            steps=steps or info.get("default_steps", 25),
            guidance=info.get("default_guidance", 7.5) if guidance is None else guidance,
            seeds=seeds, height=height, width=width, vae_scaling_factor=dims.vae_scaling_factor,
            vae_scale_factor=dims.vae_scale_factor, latent_channels=dims.latent_channels,
        )


class OrtRunners(ExportFolderRunners):
    """Three ONNX Runtime sessions (``text_encoder``, ``unet``, ``vae_decoder``) of an exported folder."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        manifest = self.folder / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.folder}: no manifest.json (not a `slimsd export onnx` folder)")
        self.manifest = json.loads(manifest.read_text())
        self.specs = component_specs(self.folder)
        self.providers = providers or default_providers()
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.sessions = {}
        for name in COMPONENTS:
            path = self.folder / name / "model.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (export incomplete?)")
            sess = ort.InferenceSession(str(path), so, providers=self.providers)
            spec = self.specs[name]
            got_in, got_out = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
            if set(got_in) != set(spec.input_names) or not set(spec.output_names) <= set(got_out):
                raise ValueError(f"{path}: inputs {got_in} / outputs {got_out} do not match the spec "
                                 f"{spec.input_names} / {spec.output_names}")
            self.sessions[name] = sess

    def run(self, name: str, **inputs) -> dict[str, np.ndarray]:
        spec = self.specs[name]
        feeds = {t.name: np.ascontiguousarray(inputs[t.name], dtype=t.numpy_dtype) for t in spec.inputs}
        outs = self.sessions[name].run(spec.output_names, feeds)
        return {n: o.astype(np.float32, copy=False) for n, o in zip(spec.output_names, outs)}
