"""Triton Python-backend model for one component (``text_encoder``, ``unet`` or ``vae_decoder``).

Copied to ``<repo>/<component>/1/model.py`` by ``slimsd export triton --backend python``, beside
the component's ONNX files and ``component.json`` (its :class:`slimsd.specs.ComponentSpec`).
It runs ``model.onnx`` with ONNX Runtime's CPU provider: the flavour Triton servers without
an ONNX Runtime backend (the ``nvidia-pytriton`` wheel's) can serve. Inputs and outputs have the
spec's names and dtypes, as in the ``onnxruntime_onnx`` flavour, so the ``pipeline`` model and
``slimsd serve --backend triton`` talk to either flavour alike.

Triton's dynamic batcher hands ``execute`` several requests at once when ``max_batch_size`` > 0:
they are concatenated along the batch axis (every component is row-independent: the U-Net
takes one timestep per row), run as one ONNX Runtime call and split back per request.
Imports core ``slimsd`` only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from slimsd.specs import ComponentSpec, ModelDims, component_specs


def _spec(info: dict) -> ComponentSpec:
    """The component's spec, rebuilt from ``component.json`` as the pipeline model rebuilds its own."""
    return component_specs(ModelDims(**info["model_dims"]), info["dtype"], bool(info["dynamic_hw"]))[info["name"]]


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        here = Path(args["model_repository"]) / str(args["model_version"])
        info = json.loads((here / "component.json").read_text())
        self.spec = _spec(info)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(os.environ.get("SLIMSD_TRITON_THREADS", info.get("threads") or 1))
        path = here / "model.onnx"
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.spec.check_names(path, [i.name for i in self.session.get_inputs()],
                              [o.name for o in self.session.get_outputs()])

    def _inputs(self, request) -> dict[str, np.ndarray]:
        out = {}
        for t in self.spec.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, t.name)
            if tensor is None:
                raise ValueError(f"{self.spec.name}: input {t.name!r} missing")
            a = tensor.as_numpy()
            if a.ndim == len(t.dims) + 1 and a.shape[-1] == 1:  # [batch, 1] of a batch-only tensor
                a = a.reshape(a.shape[:-1])
            out[t.name] = a
        return out

    def execute(self, requests):
        feeds, rows, errors = [], [], {}
        for i, request in enumerate(requests):
            try:
                f = self._inputs(request)
                feeds.append((i, f))
                rows.append(len(next(iter(f.values()))))
            except Exception as e:  # noqa: BLE001 - reported on that request only
                errors[i] = e
        outputs = {}
        if feeds:
            merged = {t.name: np.concatenate([f[t.name] for _, f in feeds], axis=0) for t in self.spec.inputs}
            result = self.session.run(self.spec.output_names, self.spec.cast_inputs(merged))
            bounds = np.cumsum([0] + rows)
            for k, (i, _) in enumerate(feeds):
                outputs[i] = [pb_utils.Tensor(t.name, np.ascontiguousarray(r[bounds[k]:bounds[k + 1]], dtype=t.numpy_dtype))
                              for t, r in zip(self.spec.outputs, result)]
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    f"{type(errors[i]).__name__}: {errors[i]}")))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs[i]))
        return responses

    def finalize(self):
        self.session = None
