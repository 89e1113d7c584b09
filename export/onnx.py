"""``slimsd export onnx PIPELINE OUT``: text encoder, U-Net and VAE decoder as ONNX.

Layout of ``OUT`` (self-contained: serve/ and ``slimsd export triton`` need nothing else)::

    text_encoder/model.onnx
    unet/model.onnx (+ model.onnx_data when over 2 GB: one external-data file per model)
    vae_decoder/model.onnx
    tokenizer/...                      copied from the pipeline
    scheduler/scheduler_config.json    copied from the pipeline
    manifest.json                      sha256 of every file, source, specs, settings, parity, versions

Each component is one stage: export with the legacy TorchScript exporter
(``torch.onnx.export(dynamo=False)``, as Optimum and TensorRT's SD demo), clean up, check
parity against the torch module on fresh random inputs, record in the manifest. A stage whose
output files, source sha256 and settings match the manifest is skipped (``force`` redoes it).
Names, dtypes, dynamic axes, module loading and wrappers come from :mod:`slimsd.specs`.

A little over 400 lines on purpose: the exporter reads top to bottom in one file (config,
manifest helpers, the stages of one component, the whole folder).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slimsd.io import atomic_dir, atomic_write_text
from slimsd.manifest import MANIFEST, sha256_file
from slimsd.precision import ExportDtype
from slimsd.specs import COMPONENTS, SOURCE_SUBFOLDER, ComponentSpec, ModelDims, component_specs, wrap
from slimsd.specs import load_module as spec_load_module

FORMAT = "slimsd-onnx/1"
DEFAULT_OPSET = 17
EXTERNAL_DATA_BYTES = 2_000_000_000  # protobuf's limit is 2 GiB; above ~2 GB weights go to model.onnx_data
TOLERANCE = {"float32": 1e-3, "float16": 1e-2}  # max|onnx - torch fp32| / max|torch fp32|


class ParityError(ValueError):
    """An exported component does not reproduce its torch module within tolerance."""


@dataclass
class OnnxExportConfig:
    """Settings of ``slimsd export onnx`` (its flags are these fields: :func:`slimsd.cliargs.add_fields`)."""

    dtype: ExportDtype = field(default="float32", metadata={
        "help": "float16: the module is cast and exported in fp16"})
    dynamic_hw: bool = field(default=False, metadata={"help": "dynamic height/width (batch is always dynamic)"})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset (>= 17)"})
    optimize: bool = field(default=True, metadata={
        "help": "the onnxruntime 'basic' offline graph clean-up after shape inference (fp32 exports)"})
    external_data: Literal["auto", "always", "never"] = field(default="auto", metadata={
        "help": "weights in model.onnx_data: auto = over 2 GB"})
    verify: bool = field(default=True, metadata={"help": "the parity check against the torch module"})
    tolerance: float | None = field(default=None, metadata={
        "help": "max relative error (default 1e-3 fp32, 1e-2 fp16)"})
    verify_batch: int = field(default=3, metadata={
        "help": "batch of the parity check; differs from the traced batch (2): proves the batch axis is dynamic"})
    force: bool = field(default=False, metadata={"help": "re-export components the manifest says are up to date"})

    def settings(self) -> dict:
        """What a cached stage must match to be reused: every setting that changes the file.

        Includes the torch and slimsd versions (the exporter and the export wrappers) so an
        upgrade re-exports instead of serving a file another exporter wrote. ``verify`` and
        ``tolerance`` only decide whether a file is accepted, not what it holds.
        """
        import torch

        import slimsd

        return {"dtype": self.dtype, "dynamic_hw": self.dynamic_hw, "opset": self.opset, "optimize": self.optimize,
                "external_data": self.external_data, "exporter": "torch.onnx.export(dynamo=False)",
                "torch": torch.__version__, "slimsd": slimsd.__version__}


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_module(folder: Path, component: str):
    """The torch module of ``component`` in float32, wrapped to return spec-named plain tensors
    (:func:`slimsd.specs.load_module` with eager attention, then :func:`slimsd.specs.wrap`)."""
    import torch

    # no dtype argument (its name differs across diffusers/transformers versions): cast instead
    module = spec_load_module(folder, component, eager_attention=True)
    return wrap(component, module.to(torch.float32)).eval()


def _wrappers():
    """Old name (benchmarks/e2e_sd21.py): component -> wrapper factory (:func:`slimsd.specs.wrap`)."""
    import functools

    return {c: functools.partial(wrap, c) for c in COMPONENTS}


# ---------------------------------------------------------------------------------------
# hashing / manifest helpers
# ---------------------------------------------------------------------------------------
def source_sha256(folder: Path, component: str) -> str:
    """One digest over the files of the component's source subfolder and its model_index entry."""
    sub = SOURCE_SUBFOLDER[component]
    h = hashlib.sha256()
    index = json.loads((folder / "model_index.json").read_text())
    h.update(json.dumps(index.get(sub)).encode())
    base = folder / sub
    for p in sorted(base.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(base).as_posix().encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def _versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    import slimsd

    return {"slimsd": slimsd.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0]}


def _read_manifest(out: Path) -> dict:
    p = out / MANIFEST
    if p.is_file():
        try:
            data = json.loads(p.read_text())
            if data.get("format") == FORMAT:
                return data
        except json.JSONDecodeError:
            pass
    return {}


def _write_manifest(out: Path, data: dict) -> None:
    files = {}
    for entry in data.get("components", {}).values():
        files.update(entry["files"])
    for rel in sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()):
        top = rel.split("/")[0]
        if top in ("tokenizer", "scheduler") and rel not in files:
            files[rel] = sha256_file(out / rel)
    data["files"] = dict(sorted(files.items()))
    atomic_write_text(out / MANIFEST, json.dumps(data, indent=2) + "\n")


def _cached(out: Path, entry: dict | None, src_sha: str, settings: dict) -> bool:
    if not entry or entry.get("source_sha256") != src_sha or entry.get("settings") != settings:
        return False
    for rel, digest in entry.get("files", {}).items():
        p = out / rel
        if not p.is_file() or p.stat().st_size != entry.get("sizes", {}).get(rel, p.stat().st_size):
            return False
        if sha256_file(p) != digest:
            return False
    return bool(entry.get("files"))


# ---------------------------------------------------------------------------------------
# one stage
# ---------------------------------------------------------------------------------------
def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _count_nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def torch_export(module, spec: ComponentSpec, path: Path, opset: int) -> None:
    """Trace ``module`` with the spec's sample inputs (batch 2) into ``path``."""
    import torch

    args = tuple(spec.sample_inputs(batch=2, seed=0).values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about python bools in diffusers code
        torch.onnx.export(
            module, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def stamp_io(path: Path, spec: ComponentSpec) -> None:
    """Write the spec's names, dtypes and dims onto the graph inputs/outputs of ``path`` (in place).

    The exporter sometimes leaves an output dim it could not infer as a made-up symbol (e.g.
    the 77 of fp16 ``last_hidden_state``); the spec is the contract, so it is stamped on.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # external tensors keep their references
    for kind, values, tensors in (("input", model.graph.input, spec.inputs), ("output", model.graph.output, spec.outputs)):
        by_name = {v.name: v for v in values}
        for t in tensors:
            if t.name not in by_name:
                raise ValueError(f"{spec.name}: exported graph has no {kind} {t.name!r} (has {list(by_name)})")
            tt = by_name[t.name].type.tensor_type
            if tt.elem_type != t.onnx_elem_type:
                raise ValueError(f"{spec.name}: {kind} {t.name} is ONNX type {tt.elem_type}, spec says {t.dtype}")
            tt.shape.ClearField("dim")
            for d in t.dims:
                dim = tt.shape.dim.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = d
    onnx.save(model, str(path))


def clean_up(raw: Path, dst: Path, *, optimize: bool, dtype: str, external: bool) -> dict:
    """Shape inference, then ONNX Runtime's offline ``basic`` optimisation (fp32 only), into ``dst``.

    ``basic`` rewrites are provider-independent (constant folding, Identity / redundant node
    elimination) and keep only ai.onnx ops, so the file stays portable to the CUDA and
    TensorRT providers. Not for fp16: ONNX Runtime's CPU session inserts Cast-to-float nodes
    around fp16 ops it lacks CPU kernels for and would save them into the file.
    """
    import onnx

    si = raw.with_name("model.si.onnx")
    onnx.shape_inference.infer_shapes_path(str(raw), str(si))  # path-based: fine beyond 2 GB
    dst.parent.mkdir(parents=True, exist_ok=True)
    data_name = dst.name + "_data"
    if optimize and dtype == "float32":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        if external:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(si), so, providers=["CPUExecutionProvider"])
        how = "shape inference + onnxruntime basic"
    else:
        model = onnx.load(str(si))  # pulls in any external data the exporter wrote
        onnx.save_model(model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        del model
        how = "shape inference"
    return {"steps": how, "nodes_before": _count_nodes(raw), "nodes_after": _count_nodes(dst)}


def check_parity(session_path: Path, module, spec: ComponentSpec, batch: int = 3, hw=None, seed: int = 1234,
                 tolerance: float | None = None) -> dict:
    """Relative error ``max|onnx - torch| / max|torch|`` per output on fresh random inputs.

    The reference is the float32 torch module (also for fp16 exports, fed the same fp16-rounded
    inputs). Raises :class:`ParityError` naming the component above ``tolerance``.
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    tol = TOLERANCE[spec.dtype] if tolerance is None else tolerance
    feeds = spec.sample_inputs(batch=batch, hw=hw, seed=seed, numpy=True)
    sess = ort.InferenceSession(str(session_path), providers=["CPUExecutionProvider"])
    got = sess.run(spec.output_names, feeds)
    with torch.no_grad():
        ref = module(*(torch.from_numpy(v).float() if v.dtype.kind == "f" else torch.from_numpy(v)
                       for v in feeds.values()))
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    per_output = {}
    for name, a, b in zip(spec.output_names, got, ref):
        b = b.float().numpy()
        if a.shape != b.shape:
            raise ParityError(f"{spec.name}: output {name} has shape {a.shape}, torch gives {b.shape}")
        a = a.astype(np.float32)
        err = float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))
        if not np.isfinite(err):
            err = float("inf")
        per_output[name] = err
    worst = max(per_output.values())
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    result = {"rel_error": worst, "per_output": per_output, "tolerance": tol, "input_shapes": shapes}
    if worst > tol:
        detail = ", ".join(f"{k} {v:.2e}" for k, v in per_output.items())
        raise ParityError(f"{spec.name}: ONNX output differs from the torch module: relative error {detail} "
                          f"> tolerance {tol:.0e} (inputs {shapes}); files left in place, not recorded as done")
    return result


def _verify_sizes(spec: ComponentSpec) -> list:
    """Pixel sizes to verify at: the default, plus a non-square one when height/width are dynamic."""
    h, w = spec.dims.image_size
    return [None] + ([(h + spec.dims.hw_multiple, w)] if spec.dynamic_hw and spec.name != "text_encoder" else [])


def export_component(folder: Path, out: Path, spec: ComponentSpec, cfg: OnnxExportConfig, log=_log_stderr) -> dict:
    """Export, clean up and verify one component into ``out/<name>/``; returns its manifest entry."""
    import torch

    name = spec.name
    t0 = time.perf_counter()
    log(f"[{name}] loading torch module from {folder}")
    module = load_module(folder, name)
    export_module = module
    if cfg.dtype == "float16":
        import copy

        export_module = copy.deepcopy(module).to(torch.float16)
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "raw").mkdir(parents=True)
    log(f"[{name}] exporting (opset {cfg.opset}, {cfg.dtype}, dynamic batch"
        f"{', dynamic height/width' if cfg.dynamic_hw else ''})")
    torch_export(export_module, spec, tmp / "raw" / "model.onnx", cfg.opset)
    del export_module
    stamp_io(tmp / "raw" / "model.onnx", spec)
    raw_bytes = _dir_bytes(tmp / "raw")
    external = cfg.external_data == "always" or (cfg.external_data == "auto" and raw_bytes > EXTERNAL_DATA_BYTES)
    log(f"[{name}] clean-up ({'external data, ' if external else ''}{raw_bytes / 1e6:.1f} MB)")
    cleanup = clean_up(tmp / "raw" / "model.onnx", tmp / "final" / "model.onnx", optimize=cfg.optimize,
                       dtype=cfg.dtype, external=external)
    log(f"[{name}] {cleanup['steps']}: {cleanup['nodes_before']} -> {cleanup['nodes_after']} nodes")
    shutil.rmtree(tmp / "raw")
    final = out / name
    with atomic_dir(final) as staged:  # the component folder is replaced whole, never half-written
        staged.rmdir()
        (tmp / "final").rename(staged)
    shutil.rmtree(tmp, ignore_errors=True)
    for f in final.iterdir():
        f.chmod(0o644)  # onnx writes model.onnx_data 0600; Triton containers may run as another user
    parity = None
    if cfg.verify:
        parity = _verify(final / "model.onnx", module, spec, cfg, log)
    del module
    files = {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(final.iterdir()) if p.is_file()}
    sizes = {rel: (out / rel).stat().st_size for rel in files}
    log(f"[{name}] done: {sum(sizes.values()) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
    return {"path": f"{name}/model.onnx", "files": files, "sizes": sizes, "external_data": external,
            "cleanup": cleanup, "parity": parity, "seconds": round(time.perf_counter() - t0, 2)}


def _verify(path: Path, module, spec: ComponentSpec, cfg: OnnxExportConfig, log) -> list[dict]:
    results = []
    for hw in _verify_sizes(spec):
        r = check_parity(path, module, spec, batch=cfg.verify_batch, hw=hw, tolerance=cfg.tolerance)
        log(f"[{spec.name}] parity {r['input_shapes']}: relative error {r['rel_error']:.2e} "
            f"(tolerance {r['tolerance']:.0e}) ok")
        results.append(r)
    return results


# ---------------------------------------------------------------------------------------
# the whole folder
# ---------------------------------------------------------------------------------------
def export_onnx(pipeline, out, cfg: OnnxExportConfig | None = None, log=_log_stderr) -> dict:
    """Export ``pipeline`` (preset, folder or hub id) into ``out``; returns a summary dict."""
    from slimsd.models import resolve_model

    cfg = cfg or OnnxExportConfig()
    if cfg.external_data not in ("auto", "always", "never"):
        raise ValueError(f"external_data must be auto, always or never, got {cfg.external_data!r}")
    if cfg.opset < 17:
        raise ValueError(f"opset must be >= 17, got {cfg.opset}")
    folder = resolve_model(pipeline)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dims = ModelDims.from_folder(folder)
    specs = component_specs(dims, cfg.dtype, cfg.dynamic_hw)
    old = _read_manifest(out)
    index = json.loads((folder / "model_index.json").read_text())
    src_manifest = folder / MANIFEST
    src_info = json.loads(src_manifest.read_text()) if src_manifest.is_file() else {}
    pipeline_info = {
        "scheduler": index.get("scheduler", [None, "DDIMScheduler"])[1],
        "image_size": list(dims.image_size),
        "vae_scaling_factor": dims.vae_scaling_factor,
        "vae_scaling": "latents / vae_scaling_factor before vae_decoder (done by slimsd.denoise.generate)",
        **{k: src_info[k] for k in ("default_steps", "default_guidance") if k in src_info},
    }
    data = {
        "format": FORMAT,
        "source": {"model": str(pipeline), "folder": str(folder), "model_index": index},
        "model_dims": dims.to_dict(),
        "export": cfg.settings(),
        "specs": {n: s.to_dict() for n, s in specs.items()},
        "pipeline": pipeline_info,
        "components": {},
        "versions": _versions(),
    }
    # keep entries of stages that are still valid while we go (an interrupted run resumes)
    data["components"] = {k: v for k, v in old.get("components", {}).items() if k in COMPONENTS}
    settings = cfg.settings()
    summary = {"out": str(out), "components": {}}
    for name in COMPONENTS:
        spec = specs[name]
        src_sha = source_sha256(folder, name)
        entry = data["components"].get(name)
        if not cfg.force and _cached(out, entry, src_sha, settings):
            if cfg.verify and not entry.get("parity"):
                log(f"[{name}] cached, verifying")
                module = load_module(folder, name)
                entry["parity"] = _verify(out / entry["path"], module, spec, cfg, log)
                del module
            else:
                log(f"[{name}] cached (source sha256 and export settings match {MANIFEST}), skipped")
            summary["components"][name] = {"status": "cached", "parity": _worst(entry.get("parity"))}
            continue
        data["components"].pop(name, None)
        _write_manifest(out, data)  # the stage is not valid until it finishes
        entry = export_component(folder, out, spec, cfg, log)
        entry.update(source_sha256=src_sha, settings=settings)
        data["components"][name] = entry
        _write_manifest(out, data)
        summary["components"][name] = {"status": "exported", "parity": _worst(entry["parity"]),
                                       "mb": round(sum(entry["sizes"].values()) / 1e6, 2)}
    # tokenizer + scheduler config: the folder is all serve/ and Triton need
    for sub in ("tokenizer", "scheduler"):
        shutil.rmtree(out / sub, ignore_errors=True)
    shutil.copytree(folder / "tokenizer", out / "tokenizer")
    (out / "scheduler").mkdir()
    shutil.copy2(folder / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    _write_manifest(out, data)
    log(f"wrote {out}/{MANIFEST}")
    return summary


def _worst(parity) -> float | None:
    return max(r["rel_error"] for r in parity) if parity else None
