"""PyTorch :class:`~slimsd.denoise.Runners`: the diffusers / transformers modules themselves.

The reference backend: no export step, any image size the U-Net accepts, and the exact
modules :class:`diffusers.StableDiffusionPipeline` runs, so its images match diffusers' up to
float summation order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimsd.specs import SOURCE_SUBFOLDER, load_module

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


class TorchRunners:
    """Text encoder, U-Net and VAE of a diffusers pipeline folder, on numpy in and out.

    ``dtype`` float32 (the reference), float16 (CUDA) or bfloat16: on a CPU with AVX512-BF16 or
    AMX it runs oneDNN's bf16 kernels (SD v2.1 U-Net batch 2 here: 5.76 s vs 9.44 s in fp32,
    docs/serve.md "CPU runtimes"); inputs are cast, outputs come back float32, the timestep
    stays float32.
    """

    DTYPES = ("float32", "float16", "bfloat16")

    def __init__(self, folder: str | Path, device: str = "auto", dtype: str = "float32", threads: int | None = None):
        import torch

        self.folder = Path(folder)
        self.device = pick_device(device)
        if dtype not in self.DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(self.DTYPES)}; got {dtype!r}")
        if dtype == "float16" and self.device == "cpu":
            raise ValueError("float16 needs a CUDA device with the torch backend (on a CPU: bfloat16)")
        self.dtype = getattr(torch, dtype)
        if threads:
            torch.set_num_threads(threads)
        self.modules = {name: load_module(self.folder, name, self.dtype).to(self.device).eval()
                        for name in SOURCE_SUBFOLDER}

    def _in(self, a: np.ndarray, dtype=None):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        return t.to(dtype or self.dtype) if t.is_floating_point() else t

    @staticmethod
    def _out(t) -> np.ndarray:
        return t.float().cpu().numpy()

    def text_encoder(self, input_ids):
        import torch

        with torch.inference_mode():
            return self._out(self.modules["text_encoder"](self._in(input_ids), return_dict=False)[0])

    def unet(self, sample, timestep, encoder_hidden_states):
        import torch

        with torch.inference_mode():
            # timestep stays float32 (as in the ONNX spec): fractional Euler timesteps survive
            out = self.modules["unet"](self._in(sample), self._in(timestep, torch.float32),
                                       self._in(encoder_hidden_states), return_dict=False)[0]
            return self._out(out)

    def vae_decoder(self, latent_sample):
        import torch

        with torch.inference_mode():
            return self._out(self.modules["vae_decoder"].decode(self._in(latent_sample), return_dict=False)[0])
