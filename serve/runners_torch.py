"""PyTorch :class:`~slimsd.denoise.Runners`: the diffusers / transformers modules themselves.

The reference backend: no export step, any image size the U-Net accepts, and the exact
modules :class:`diffusers.StableDiffusionPipeline` runs, so its images match diffusers' up to
float summation order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimsd.precision import dtype_name, precision_of
from slimsd.runners import ComponentRunners
from slimsd.specs import SOURCE_SUBFOLDER, component_specs, load_module

_SUB = SOURCE_SUBFOLDER  # old name (benchmarks/cpu_backends.py)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    return device


def load_component(folder: Path, sub: str, dtype=None):
    """Old name (benchmarks/cpu_backends.py) of :func:`slimsd.specs.load_module`."""
    return load_module(folder, sub, dtype)


class TorchRunners(ComponentRunners):
    """Text encoder, U-Net and VAE of a diffusers pipeline folder, on numpy in and out.

    ``dtype`` (any name :func:`slimsd.precision.precision_of` takes) float32 (the reference),
    float16 (CUDA) or bfloat16 (oneDNN's bf16 kernels on a CPU with AVX512-BF16 or AMX;
    docs/serve.md "CPU runtimes" has the measurements); inputs are cast, outputs come back
    float32, the timestep stays float32. The modules are called through the export wrappers
    (:meth:`slimsd.specs.ComponentSpec.wrap`), so outputs are named as in the specs.
    """

    DTYPES = ("float32", "float16", "bfloat16")

    def __init__(self, folder: str | Path, device: str = "auto", dtype: str = "float32", threads: int | None = None):
        import torch

        self.folder = Path(folder)
        self.device = pick_device(device)
        try:
            self.precision = precision_of(dtype, "dtype")
        except ValueError:
            raise ValueError(f"dtype: must be one of {', '.join(self.DTYPES)}; got {dtype!r}") from None
        if self.precision == "int8":
            raise ValueError("precision: int8 is the openvino backend's (slimsd export int8); torch runs "
                             f"{', '.join(self.DTYPES)}")
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("float16 needs a CUDA device with the torch backend (on a CPU: bfloat16)")
        self.dtype = getattr(torch, dtype_name(self.precision))
        if threads:
            torch.set_num_threads(threads)
        self.specs = component_specs(self.folder, dynamic_hw=True)  # eager modules take any valid size
        self.modules = {name: spec.load_module(self.folder, self.dtype).to(self.device).eval()
                        for name, spec in self.specs.items()}
        self._wrapped = {name: spec.wrap(self.modules[name]) for name, spec in self.specs.items()}

    def _in(self, name: str, a: np.ndarray):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        if not t.is_floating_point():
            return t
        # timestep stays float32 (as in the ONNX spec): fractional Euler timesteps survive
        return t.to(torch.float32 if name == "timestep" else self.dtype)

    def run(self, name: str, **inputs) -> dict[str, np.ndarray]:
        import torch

        spec = self.specs[name]
        with torch.inference_mode():
            out = self._wrapped[name](*(self._in(t.name, inputs[t.name]) for t in spec.inputs))
        out = out if isinstance(out, tuple) else (out,)
        return {n: t.float().cpu().numpy() for n, t in zip(spec.output_names, out)}
