"""``slimsd export triton ONNX_DIR [--out model_repository]``: a Triton model repository.

::

    model_repository/
      text_encoder/config.pbtxt  1/model.onnx (or model.plan)
      unet/config.pbtxt          1/model.onnx [+ model.onnx_data]
      vae_decoder/config.pbtxt   1/model.onnx
      pipeline/config.pbtxt      1/model.py  1/tokenizer/  1/scheduler/  1/pipeline.json

``text_encoder`` / ``unet`` / ``vae_decoder`` are ONNX Runtime (``onnxruntime_onnx``), with
``backend="tensorrt"`` TensorRT (``tensorrt_plan``), or with ``backend="python"`` Python-backend
models (``export/triton_component_model.py``: the ONNX files run by ONNX Runtime inside the
model, for Triton builds without an ONNX Runtime backend such as the ``nvidia-pytriton``
wheel's). Every flavour's ``config.pbtxt`` comes from the one spec per component: same names
and dtypes as the ONNX files. With ``max_batch_size: 0`` (default) the batch is written into
``dims`` as -1 and Triton never merges requests (batching happens per request: N prompts ->
one 2N-row U-Net call); with ``max_batch_size: N`` > 0 the batch axis leaves ``dims`` and
Triton's dynamic batcher merges concurrent requests up to N rows (every component is
row-independent, the U-Net has one timestep per row, so the classifier-free-guidance layout
``[negative..., positive...]`` of each request survives). ``dynamic_batching`` is on in both.
``--prefix NAME_`` names every model ``NAME_text_encoder`` ... ``NAME_pipeline``, so a teacher
and its student live in one repository and one server (other models in ``--out`` are kept).

``pipeline`` is a Python-backend model: tokenises, runs :func:`slimsd.denoise.generate`
(the one denoising loop serve/ uses too) with BLS calls to the three models, returns uint8
images. The container needs slimsd importable (see docs/export.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slimsd.specs import COMPONENTS, ComponentSpec, component_specs

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "python": None}
MODEL_FILE = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py"}
PIPELINE = "pipeline"
PIPELINE_TEMPLATE = Path(__file__).with_name("triton_pipeline_model.py")
COMPONENT_TEMPLATE = Path(__file__).with_name("triton_component_model.py")


@dataclass
class TritonConfig:
    """Settings of ``slimsd export triton`` (its flags are these fields: :func:`slimsd.cliargs.add_fields`)."""

    backend: Literal["onnxruntime", "tensorrt", "python"] = field(default="onnxruntime", metadata={
        "help": "platform of the three component models (python: ONNX Runtime inside Python-backend models, "
                "for the nvidia-pytriton wheel's tritonserver; always KIND_CPU)"})
    engines: str | None = field(default=None, metadata={
        "help": "folder of <component>.plan (`slimsd export tensorrt`), with --backend tensorrt"})
    kind: Literal["gpu", "cpu"] = field(default="gpu", metadata={"help": "instance kind of the three models"})
    instances: int = field(default=1, metadata={"help": "instances of each component model"})
    pipeline_instances: int = field(default=1, metadata={"help": "instances of the python pipeline model"})
    max_queue_delay_us: int = field(default=0, metadata={"help": "dynamic batching queue delay"})
    max_batch_size: int = field(default=0, metadata={
        "help": "0: the batch axis is in dims and Triton never merges requests; N > 0: Triton's dynamic batcher "
                "merges concurrent requests up to N rows (a request may then hold at most N rows: N/2 prompts with CFG)"})
    link: bool = field(default=True, metadata={"help": "hardlink model files when possible (else copy)"})
    prefix: str = field(default="", metadata={
        "help": "prefix of every model name (e.g. tiny-sd-slim_), so several exports share one repository and "
                "one server; `slimsd serve --backend triton --triton-model-prefix` names the same"})

    def model_name(self, component: str) -> str:
        return self.prefix + component


def _dims(values) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _io_block(kind: str, tensors, extra=None, batched: bool = False) -> str:
    """``input [...]`` / ``output [...]``; ``batched``: the batch axis (first) leaves ``dims``, and a
    batch-only tensor (``timestep``) becomes dims [1] reshaped to [] (Triton wants non-empty dims)."""
    rows = []
    for t in tensors:
        name, dtype, dims = t if isinstance(t, tuple) else (t.name, t.triton_dtype, t.triton_dims)
        reshape = ""
        if batched:
            dims = dims[1:]
            if not dims:
                dims, reshape = [1], "\n    reshape: { shape: [ ] }"
        opt = "\n    optional: true" if extra and name in extra else ""
        rows.append(f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {_dims(dims)}{reshape}{opt}\n  }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def model_config(spec: ComponentSpec, cfg: TritonConfig) -> str:
    """``config.pbtxt`` text of one component model."""
    if cfg.backend not in PLATFORMS:
        raise ValueError(f"backend must be one of {', '.join(PLATFORMS)}, got {cfg.backend!r}")
    if cfg.max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0, got {cfg.max_batch_size}")
    kind = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}[cfg.kind]
    if cfg.backend == "python":
        kind, platform = "KIND_CPU", 'backend: "python"\n'  # ONNX Runtime's CPU provider inside the model
    else:
        platform = f'platform: "{PLATFORMS[cfg.backend]}"\n'
    batched = cfg.max_batch_size > 0
    return (
        f'# generated by `slimsd export triton` from slimsd.specs ({spec.dtype}, '
        f'{"dynamic" if spec.dynamic_hw else "static"} height/width)\n'
        f'name: "{cfg.model_name(spec.name)}"\n'
        + platform
        + f"max_batch_size: {cfg.max_batch_size}\n"
        + _io_block("input", spec.inputs, batched=batched)
        + _io_block("output", spec.outputs, batched=batched)
        + f"instance_group [\n  {{\n    count: {cfg.instances}\n    kind: {kind}\n  }}\n]\n"
        + f"dynamic_batching {{\n  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n}}\n"
    )


PIPELINE_INPUTS = [  # (name, type, dims); all but prompt optional
    ("prompt", "TYPE_STRING", [-1]),
    ("negative_prompt", "TYPE_STRING", [-1]),
    ("num_inference_steps", "TYPE_INT32", [1]),
    ("guidance_scale", "TYPE_FP32", [1]),
    ("seed", "TYPE_INT64", [-1]),
    ("height", "TYPE_INT32", [1]),
    ("width", "TYPE_INT32", [1]),
]
PIPELINE_OUTPUTS = [("image", "TYPE_UINT8", [-1, -1, -1, 3])]


def pipeline_config(cfg: TritonConfig) -> str:
    optional = {n for n, _, _ in PIPELINE_INPUTS if n != "prompt"}
    return (
        "# generated by `slimsd export triton`: text -> uint8 images [N, H, W, 3] through BLS calls\n"
        f'name: "{cfg.model_name(PIPELINE)}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        + _io_block("input", PIPELINE_INPUTS, optional)
        + _io_block("output", PIPELINE_OUTPUTS)
        + f"instance_group [\n  {{\n    count: {cfg.pipeline_instances}\n    kind: KIND_CPU\n  }}\n]\n"
    )


def _place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system: copy
    shutil.copy2(src, dst)


def export_triton(onnx_dir, out="model_repository", cfg: TritonConfig | None = None, log=None) -> dict:
    """Write the repository; returns ``{model: [files]}``."""
    import sys

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    cfg = cfg or TritonConfig()
    onnx_dir, out = Path(onnx_dir), Path(out)
    manifest_path = onnx_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{onnx_dir}: no manifest.json (not a `slimsd export onnx` folder)")
    if cfg.backend not in PLATFORMS:
        raise ValueError(f"backend must be one of {', '.join(PLATFORMS)}, got {cfg.backend!r}")
    if cfg.kind not in ("gpu", "cpu"):
        raise ValueError(f"kind must be gpu or cpu, got {cfg.kind!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]*", cfg.prefix):
        raise ValueError(f"prefix: letters, digits, '_', '.' and '-' only (a model folder name), got {cfg.prefix!r}")
    if cfg.backend == "tensorrt" and not cfg.engines:
        raise ValueError("--backend tensorrt needs --engines DIR (the output of `slimsd export tensorrt`)")
    manifest = json.loads(manifest_path.read_text())
    specs = component_specs(onnx_dir)
    written: dict[str, list[str]] = {}
    out.mkdir(parents=True, exist_ok=True)
    for name in COMPONENTS:
        model_dir = out / cfg.model_name(name)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        version = model_dir / "1"
        version.mkdir(parents=True)
        if cfg.backend in ("onnxruntime", "python"):
            for f in sorted((onnx_dir / name).iterdir()):  # model.onnx and its model.onnx_data
                if f.is_file():
                    _place(f, version / f.name, cfg.link)
        if cfg.backend == "python":
            shutil.copy2(COMPONENT_TEMPLATE, version / "model.py")
            component = {"name": name, "dtype": specs[name].dtype, "dynamic_hw": specs[name].dynamic_hw,
                         "model_dims": specs[name].dims.to_dict(), "spec": specs[name].to_dict()}
            (version / "component.json").write_text(json.dumps(component, indent=2) + "\n")
        elif cfg.backend == "tensorrt":
            plan = Path(cfg.engines) / f"{name}.plan"
            if not plan.is_file():
                raise FileNotFoundError(f"{plan}: missing (run `slimsd export tensorrt` first)")
            _place(plan, version / MODEL_FILE["tensorrt"], cfg.link)
        (model_dir / "config.pbtxt").write_text(model_config(specs[name], cfg))
        written[cfg.model_name(name)] = sorted(p.relative_to(out).as_posix() for p in model_dir.rglob("*") if p.is_file())
        log(f"[{cfg.model_name(name)}] {PLATFORMS[cfg.backend] or 'python backend (ONNX Runtime)'}: {', '.join(written[cfg.model_name(name)])}")

    # the Python-backend pipeline
    model_dir = out / cfg.model_name(PIPELINE)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    version = model_dir / "1"
    version.mkdir(parents=True)
    shutil.copy2(PIPELINE_TEMPLATE, version / "model.py")
    shutil.copytree(onnx_dir / "tokenizer", version / "tokenizer")
    shutil.copytree(onnx_dir / "scheduler", version / "scheduler")
    dims = specs["unet"].dims
    info = {
        "models": {n: cfg.model_name(n) for n in COMPONENTS},
        "max_batch_size": cfg.max_batch_size,  # > 0: batch-only inputs travel as [batch, 1]
        "specs": {n: s.to_dict() for n, s in specs.items()},
        "model_dims": dims.to_dict(),
        "dynamic_hw": specs["unet"].dynamic_hw,
        "image_size": list(dims.image_size),
        "vae_scaling_factor": dims.vae_scaling_factor,
        "default_steps": manifest.get("pipeline", {}).get("default_steps", 25),
        "default_guidance": manifest.get("pipeline", {}).get("default_guidance", 7.5),
        "source": manifest.get("source", {}).get("model"),
    }
    (version / "pipeline.json").write_text(json.dumps(info, indent=2) + "\n")
    (model_dir / "config.pbtxt").write_text(pipeline_config(cfg))
    written[cfg.model_name(PIPELINE)] = sorted(p.relative_to(out).as_posix() for p in model_dir.rglob("*") if p.is_file())
    log(f"[{cfg.model_name(PIPELINE)}] python backend: {cfg.model_name(PIPELINE)}/1/model.py (+ tokenizer, scheduler, pipeline.json)")
    return written
