"""ONNX Runtime :class:`~slimsd.denoise.Runners` over a ``slimsd export onnx`` folder.

    runners = OrtRunners("exported/")            # CUDA provider when available, else CPU
    images = runners.generate(["a red circle left of a blue square"], steps=25, seeds=[0])

Tensor names and dtypes come from the folder's specs (``manifest.json``): inputs are cast to
the exported dtype (float16 exports take float32 arrays too) and outputs come back float32.
The shared part (the three component calls, the folder's tokenizer, scheduler and defaults)
is :class:`slimsd.runners.ExportFolderRunners`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimsd.runners import ExportFolderRunners  # noqa: F401 - also its old import path
from slimsd.specs import COMPONENTS


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtRunners(ExportFolderRunners):
    """Three ONNX Runtime sessions (``text_encoder``, ``unet``, ``vae_decoder``) of an exported folder."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self._open(folder)
        self.providers = providers or default_providers()
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.sessions = {}
        for name in COMPONENTS:
            path = self.onnx_path(name)
            sess = ort.InferenceSession(str(path), so, providers=self.providers)
            self.specs[name].check_names(path, [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
            self.sessions[name] = sess

    def run(self, name: str, **inputs) -> dict[str, np.ndarray]:
        spec = self.specs[name]
        outs = self.sessions[name].run(spec.output_names, spec.cast_inputs(inputs))
        return {n: o.astype(np.float32, copy=False) for n, o in zip(spec.output_names, outs)}
