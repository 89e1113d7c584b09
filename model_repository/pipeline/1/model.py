"""Triton Python-backend model ``pipeline``: prompts -> uint8 images through BLS calls.

Copied to ``model_repository/pipeline/1/model.py`` by ``slimsd export triton``. The denoising
loop is :func:`slimsd.denoise.generate` (shared with serve/); this file only implements its
``Runners`` as BLS requests to the ``text_encoder``, ``unet`` and ``vae_decoder`` models.
The Triton container needs ``slimsd`` importable plus diffusers and transformers (see
docs/export.md).

Inputs (all but ``prompt`` optional): prompt [N] string, negative_prompt [N or 1] string,
num_inference_steps [1] int32, guidance_scale [1] fp32, seed [N or 1] int64 (one seed ``s``
means ``s, s+1, ...``), height / width [1] int32 (dynamic-size exports only).
Output: image uint8 [N, H, W, 3].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from slimsd.denoise import generate, load_scheduler, load_tokenizer


def _to_numpy(tensor) -> np.ndarray:
    if tensor.is_cpu():
        return tensor.as_numpy()
    import torch.utils.dlpack  # an output left in GPU memory

    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).cpu().numpy()


class BlsRunners:
    """:class:`slimsd.denoise.Runners` as BLS calls; names and dtypes from ``pipeline.json`` (the specs)."""

    def __init__(self, info: dict):
        self.models = info["models"]
        self.specs = info["specs"]
        self._cpu = None
        if hasattr(pb_utils, "PreferredMemory") and hasattr(pb_utils, "TRITONSERVER_MEMORY_CPU"):
            self._cpu = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    def _call(self, component: str, output: str, **arrays) -> np.ndarray:
        spec = self.specs[component]
        inputs = [pb_utils.Tensor(t["name"], np.ascontiguousarray(arrays[t["name"]], dtype=t["dtype"]))
                  for t in spec["inputs"]]
        kw = {"preferred_memory": self._cpu} if self._cpu is not None else {}
        request = pb_utils.InferenceRequest(model_name=self.models[component], requested_output_names=[output],
                                            inputs=inputs, **kw)
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{component}: {response.error().message()}")
        return _to_numpy(pb_utils.get_output_tensor_by_name(response, output)).astype(np.float32, copy=False)

    def text_encoder(self, input_ids):
        return self._call("text_encoder", "last_hidden_state", input_ids=input_ids)

    def unet(self, sample, timestep, encoder_hidden_states):
        return self._call("unet", "out_sample", sample=sample, timestep=timestep,
                          encoder_hidden_states=encoder_hidden_states)

    def vae_decoder(self, latent_sample):
        return self._call("vae_decoder", "sample", latent_sample=latent_sample)


def _optional(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _strings(a) -> list[str]:
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in np.asarray(a).reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / str(args["model_version"])
        self.info = json.loads((here / "pipeline.json").read_text())
        self.tokenizer = load_tokenizer(here / "tokenizer")
        self.scheduler = load_scheduler(here / "scheduler")
        self.runners = BlsRunners(self.info)
        self.dims = self.info["model_dims"]

    def _generate(self, request) -> np.ndarray:
        prompts = _strings(_optional(request, "prompt"))
        neg = _optional(request, "negative_prompt")
        steps = _optional(request, "num_inference_steps")
        guidance = _optional(request, "guidance_scale")
        seeds = _optional(request, "seed")
        h, w = self.info["image_size"]
        height, width = _optional(request, "height"), _optional(request, "width")
        height = int(height.reshape(-1)[0]) if height is not None else h
        width = int(width.reshape(-1)[0]) if width is not None else w
        m = self.dims["hw_multiple"]
        if not self.info["dynamic_hw"] and (height, width) != (h, w):
            raise ValueError(f"this export is static: {h}x{w} px only, got {height}x{width}")
        if height % m or width % m:
            raise ValueError(f"height and width must be multiples of {m}, got {height}x{width}")
        return generate(
            self.runners, self.tokenizer, self.scheduler, prompts,
            negative_prompts=None if neg is None else _strings(neg),
            steps=int(steps.reshape(-1)[0]) if steps is not None else int(self.info["default_steps"]),
            guidance=float(guidance.reshape(-1)[0]) if guidance is not None else float(self.info["default_guidance"]),
            seeds=None if seeds is None else [int(s) for s in seeds.reshape(-1)],
            height=height, width=width, vae_scaling_factor=float(self.info["vae_scaling_factor"]),
            vae_scale_factor=int(self.dims["vae_scale_factor"]), latent_channels=int(self.dims["latent_channels"]),
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = self._generate(request)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image", images)]))
            except Exception as e:  # one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    f"{type(e).__name__}: {e}")))
        return responses

    def finalize(self):
        self.runners = None
