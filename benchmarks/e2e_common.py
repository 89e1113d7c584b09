"""Shared parts of the end-to-end benchmarks (``e2e_tiny.py``, ``e2e_sd21.py``, ``gpu_e2e.py``).

* :func:`matmul_peak`: this machine's measured fp32 matrix-multiply rate (torch, the given
  threads) - the yardstick for "achieved FLOP/s";
* :func:`count_flops`: FLOPs of one call, counted by ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls, convolutions, attention; 1 multiply-add = 2 FLOPs; elementwise ops not counted);
* component callables (text encoder at batch 2, one U-Net step at batch 2, VAE decode at
  batch 1 - one image with classifier-free guidance) for torch eager, ONNX Runtime and OpenVINO
  (f32 / bf16), fed the same random inputs;
* :func:`time_calls`: wall time of each call after warm-up.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine(threads: int | None = None, with_gpu: bool = False) -> dict:
    from slimsd.loadtest.machine import machine_info

    return machine_info(threads, with_gpu=with_gpu)


def matmul_peak(threads: int | None = None, n: int = 2048, repeats: int = 20, device: str = "cpu",
                dtype: str = "float32") -> dict:
    """Best of ``repeats`` ``n x n @ n x n`` products: 2 n^3 FLOPs each."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "dtype": dtype, "threads": torch.get_num_threads(), "best_s": best,
            "gflops": 2 * n**3 / best / 1e9, "median_gflops": 2 * n**3 / statistics.median(times) / 1e9}


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` as FlopCounterMode counts them (run once, under no_grad)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def time_calls(fn, repeats: int, warmup: int = 1, sync=None) -> list[float]:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return out


def stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times), "all_s": times}


def component_inputs(dims, batch_cfg: int = 2, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Random inputs of each component at the model's native size (numpy, float32 / int64)."""
    rng = np.random.default_rng(seed)
    lh, lw = dims.latent_height, dims.latent_width
    return {
        "text_encoder": {"input_ids": rng.integers(0, dims.vocab_size, (batch_cfg, dims.text_max_length)).astype(np.int64)},
        "unet": {"sample": rng.standard_normal((batch_cfg, dims.unet_in_channels, lh, lw)).astype(np.float32),
                 "timestep": np.full((batch_cfg,), 500.0, dtype=np.float32),
                 "encoder_hidden_states": rng.standard_normal((batch_cfg, dims.text_max_length,
                                                               dims.cross_attention_dim)).astype(np.float32)},
        "vae_decoder": {"latent_sample": rng.standard_normal((1, dims.latent_channels, lh, lw)).astype(np.float32)},
    }


class TorchComponents:
    """torch eager modules: ``call(name, inputs)`` runs one component on numpy inputs."""

    def __init__(self, text_encoder, unet, vae, device: str = "cpu", dtype=None):
        import torch

        self.device, self.dtype = device, dtype or torch.float32
        self.m = {"text_encoder": text_encoder.eval(), "unet": unet.eval(), "vae_decoder": vae.eval()}

    def _t(self, a: np.ndarray):
        import torch

        t = torch.from_numpy(a).to(self.device)
        return t if t.dtype == torch.int64 else t.to(self.dtype)

    def fn(self, name: str, inputs: dict):
        import torch

        x = {k: self._t(v) for k, v in inputs.items()}
        m = self.m[name]
        if name == "text_encoder":
            def f():
                with torch.no_grad():
                    return m(input_ids=x["input_ids"]).last_hidden_state
        elif name == "unet":
            def f():
                with torch.no_grad():
                    return m(x["sample"], x["timestep"], x["encoder_hidden_states"], return_dict=False)[0]
        else:
            def f():
                with torch.no_grad():
                    return m.decode(x["latent_sample"], return_dict=False)[0]
        return f


class OrtComponents:
    """ONNX Runtime sessions of a ``slimsd export onnx`` folder (or single component files)."""

    def __init__(self, paths: dict[str, Path], threads: int | None = None, providers=None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.sessions, self.load_s = {}, {}
        for name, path in paths.items():
            t0 = time.perf_counter()
            self.sessions[name] = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
            self.load_s[name] = time.perf_counter() - t0

    def fn(self, name: str, inputs: dict):
        sess = self.sessions[name]
        names = {i.name for i in sess.get_inputs()}
        feeds = {k: v for k, v in inputs.items() if k in names}
        out = [sess.get_outputs()[0].name]
        return lambda: sess.run(out, feeds)


class OvComponents:
    """OpenVINO CPU compiled models of the same ONNX files, at one ``INFERENCE_PRECISION_HINT``
    (``f32`` or ``bf16``), with the serving runner's compile settings
    (``slimsd.serve.runners_openvino.compile_config``); no compiled-model cache, so nothing stale is timed.
    ``static``: compiled for the timed inputs' shapes, as the serving runner compiles its first shape
    (``--openvino-static-shapes``); else the export's dynamic shapes. Compiled in :meth:`fn`."""

    def __init__(self, paths: dict[str, Path], threads: int | None = None, precision: str = "f32",
                 static: bool = True):
        import openvino as ov

        from slimsd.serve.runners_openvino import compile_config

        self.core, self.paths, self.static = ov.Core(), paths, static
        self.cfg = compile_config(precision, threads)
        self.requests, self.load_s = {}, {}

    def fn(self, name: str, inputs: dict):
        from slimsd.serve.runners_openvino import make_static

        t0 = time.perf_counter()
        model = self.core.read_model(str(self.paths[name]))
        names = {n for i in model.inputs for n in i.get_names()}
        feeds = {k: v for k, v in inputs.items() if k in names}
        if self.static:
            make_static(model, {k: v.shape for k, v in feeds.items()})
        req = self.requests[name] = self.core.compile_model(model, "CPU", self.cfg).create_infer_request()
        self.load_s[name] = time.perf_counter() - t0
        return lambda: req.infer(feeds)


def fmt_s(x: float) -> str:
    if x != x:
        return "n/a"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def export_component_only(module, component: str, spec, out_dir: Path, opset: int = 17) -> Path:
    """``module`` as ``slimsd export onnx`` writes ``component`` (trace, stamp names, clean-up) into
    ``out_dir/<component>/model.onnx``, without the parity check; kept if already there."""
    import shutil

    from slimsd.export.onnx import _wrappers, clean_up, stamp_io, torch_export

    final = out_dir / component / "model.onnx"
    if final.is_file():
        return final
    tmp = out_dir / f".{component}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "raw").mkdir(parents=True)
    torch_export(_wrappers()[component](module).eval(), spec, tmp / "raw" / "model.onnx", opset)
    stamp_io(tmp / "raw" / "model.onnx", spec)
    clean_up(tmp / "raw" / "model.onnx", tmp / "final" / "model.onnx", optimize=True, dtype="float32", external=True)
    shutil.rmtree(tmp / "raw")
    shutil.rmtree(out_dir / component, ignore_errors=True)
    (tmp / "final").rename(out_dir / component)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


def export_unet_only(unet, spec, out_dir: Path, opset: int = 17) -> Path:
    """``unet`` as ``slimsd export onnx`` writes it into ``out_dir/unet/model.onnx`` (no parity check)."""
    return export_component_only(unet, "unet", spec, out_dir, opset)


def write_results(stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    j, m = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    j.write_text(json.dumps(data, indent=2, default=str) + "\n")
    m.write_text(markdown)
    return j, m
