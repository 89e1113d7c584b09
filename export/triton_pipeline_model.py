"""Triton Python-backend model ``pipeline``: prompts -> uint8 images through BLS calls.

Copied to ``model_repository/pipeline/1/model.py`` by ``slimsd export triton``. The denoising
loop is :func:`slimsd.denoise.generate` (shared with serve/); this file only implements
``run(name, **inputs)`` of :class:`slimsd.runners.ComponentRunners` as BLS requests to the
``text_encoder``, ``unet`` and ``vae_decoder`` models, with the specs rebuilt from
``pipeline.json``. It imports core ``slimsd`` only (never ``slimsd.export`` / ``slimsd.serve``):
the Triton container needs ``slimsd`` importable plus diffusers and transformers (see
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

from slimsd.defaults import GenerationDefaults
from slimsd.denoise import load_scheduler, load_tokenizer
from slimsd.runners import ComponentRunners, generate_with_defaults
from slimsd.specs import MAIN_OUTPUT, ModelDims, component_specs


def _to_numpy(tensor) -> np.ndarray:
    if tensor.is_cpu():
        return tensor.as_numpy()
    import torch.utils.dlpack  # an output left in GPU memory

    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).cpu().numpy()


class BlsRunners(ComponentRunners):
    """:class:`slimsd.denoise.Runners` as BLS calls; names and dtypes from ``pipeline.json`` (the specs)."""

    def __init__(self, info: dict):
        self.models = info["models"]
        self.batched = int(info.get("max_batch_size", 0)) > 0  # batch-only inputs (timestep) go as [batch, 1]
        dtype = info["specs"]["unet"]["dtype"]
        self.specs = component_specs(ModelDims(**info["model_dims"]), dtype, bool(info["dynamic_hw"]))
        self._cpu = None
        if hasattr(pb_utils, "PreferredMemory") and hasattr(pb_utils, "TRITONSERVER_MEMORY_CPU"):
            self._cpu = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    def run(self, name: str, **inputs) -> dict[str, np.ndarray]:
        """One BLS request to model ``name`` asking for its main output only."""
        spec, output = self.specs[name], MAIN_OUTPUT[name]
        tensors = [pb_utils.Tensor(n, a.reshape(-1, 1) if self.batched and a.ndim == 1 else a)
                   for n, a in spec.cast_inputs(inputs).items()]
        kw = {"preferred_memory": self._cpu} if self._cpu is not None else {}
        request = pb_utils.InferenceRequest(model_name=self.models[name], requested_output_names=[output],
                                            inputs=tensors, **kw)
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{name}: {response.error().message()}")
        return {output: _to_numpy(pb_utils.get_output_tensor_by_name(response, output)).astype(np.float32, copy=False)}


def _optional(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _scalar(request, name, kind):
    a = _optional(request, name)
    return None if a is None else kind(a.reshape(-1)[0])


def _strings(a) -> list[str]:
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in np.asarray(a).reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / str(args["model_version"])
        self.info = json.loads((here / "pipeline.json").read_text())
        self.tokenizer = load_tokenizer(here / "tokenizer")
        self.scheduler = load_scheduler(here / "scheduler")
        self.runners = BlsRunners(self.info)
        self.defaults = GenerationDefaults(int(self.info["default_steps"]), float(self.info["default_guidance"]))

    def _generate(self, request) -> np.ndarray:
        neg, seeds = _optional(request, "negative_prompt"), _optional(request, "seed")
        return generate_with_defaults(
            self.runners, self.tokenizer, self.scheduler, self.runners.specs["unet"], self.defaults,
            _strings(_optional(request, "prompt")), None if neg is None else _strings(neg),
            steps=_scalar(request, "num_inference_steps", int), guidance=_scalar(request, "guidance_scale", float),
            seeds=None if seeds is None else [int(s) for s in seeds.reshape(-1)],
            height=_scalar(request, "height", int), width=_scalar(request, "width", int))

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
