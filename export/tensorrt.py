"""``slimsd export tensorrt ONNX_DIR OUT``: TensorRT engines from a ``slimsd export onnx`` folder.

Layout of ``OUT``::

    text_encoder.plan  unet.plan  vae_decoder.plan
    timing-<TensorRT version>-<GPU>.cache
                        reused (and extended) by every build on that TensorRT and GPU: later
                        builds skip kernel timing (a cache of another TensorRT or GPU is never
                        fed to a build; TensorRT keys tactics by layer, precision and shape itself)
    manifest.json       TensorRT version, GPU, profiles, flags, sha256 of the ONNX sources

The build configuration is pure Python (:func:`plan_engines`, :func:`builder_flags`,
:func:`profile_shapes`), so it is unit-tested without TensorRT; :func:`build_engine` feeds
it to the TensorRT Python API. Needs a CUDA GPU and ``tensorrt`` (>= 10: int64 inputs such
as ``input_ids`` stay int64). A plan only runs on the GPU model and TensorRT version that
built it: build inside the Triton container you serve with.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from slimsd.io import atomic_write_bytes, atomic_write_text
from slimsd.specs import COMPONENTS, ComponentSpec, component_specs


class TensorRTUnavailable(RuntimeError):
    """No TensorRT Python package or no CUDA GPU on this machine."""


def _hw_help(k: str) -> dict:
    return {"help": f"{k} image size in px (--dynamic-hw exports); int or (height, width) from Python"}


@dataclass
class TensorRTConfig:
    """Settings of ``slimsd export tensorrt`` (its flags are these fields: :func:`slimsd.cliargs.add_fields`)."""

    fp16: bool = field(default=True, metadata={"help": "fp16 kernels (I/O types stay as in the ONNX file)"})
    min_batch: int = field(default=1, metadata={"help": "smallest batch of the profile (rows: 2 per image with CFG)"})
    opt_batch: int = field(default=2, metadata={"help": "batch the kernels are tuned for (one image with CFG)"})
    max_batch: int = field(default=8, metadata={"help": "largest batch of the profile"})
    min_hw: int | tuple[int, int] | None = field(default=None, metadata=_hw_help("min"))
    opt_hw: int | tuple[int, int] | None = field(default=None, metadata=_hw_help("opt"))
    max_hw: int | tuple[int, int] | None = field(default=None, metadata=_hw_help("max"))
    workspace_gb: float = field(default=8.0, metadata={"help": "TensorRT workspace memory pool"})
    timing_cache: str | None = field(default=None, metadata={
        "help": "default OUT/timing-<TensorRT version>-<GPU>.cache"})
    components: tuple[str, ...] = field(default=COMPONENTS, metadata={"help": "components to build"})
    force: bool = field(default=False, metadata={"help": "rebuild engines the manifest says are up to date"})


@dataclass
class EngineJob:
    component: str
    onnx: Path
    plan: Path
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    flags: list[str]
    workspace_bytes: int
    settings: dict = field(default_factory=dict)


def builder_flags(spec: ComponentSpec, fp16: bool) -> list[str]:
    """``trt.BuilderFlag`` names for a component.

    FP16 when asked for (fp16 ONNX files need it too: TensorRT only picks fp16 kernels with
    the flag). TF32 stays on (TensorRT's default) for fp32 layers.
    """
    flags = ["TF32"]
    if fp16 or spec.dtype == "float16":
        flags.append("FP16")
    return flags


def profile_shapes(spec: ComponentSpec, cfg: TensorRTConfig) -> dict:
    """One optimisation profile ``{input: (min, opt, max)}`` from the spec."""
    hw = {} if not spec.dynamic_hw else {"min_hw": cfg.min_hw, "opt_hw": cfg.opt_hw, "max_hw": cfg.max_hw}
    if not spec.dynamic_hw and any(x is not None for x in (cfg.min_hw, cfg.opt_hw, cfg.max_hw)):
        raise ValueError(f"{spec.name}: the ONNX export has static height/width "
                         f"({spec.dims.image_size[0]}x{spec.dims.image_size[1]} px); re-export with --dynamic-hw "
                         "to build engines for other sizes")
    return spec.profile(cfg.min_batch, cfg.opt_batch, cfg.max_batch, **hw)


def plan_engines(onnx_dir: str | Path, out: str | Path, cfg: TensorRTConfig | None = None) -> list[EngineJob]:
    """What would be built: one job per component, ``OUT/<component>.plan``."""
    cfg = cfg or TensorRTConfig()
    onnx_dir, out = Path(onnx_dir), Path(out)
    specs = component_specs(onnx_dir)
    jobs = []
    for name in cfg.components:
        if name not in specs:
            raise ValueError(f"unknown component {name!r}; components: {', '.join(COMPONENTS)}")
        spec = specs[name]
        src = onnx_dir / name / "model.onnx"
        if not src.is_file():
            raise FileNotFoundError(f"{src}: missing (run `slimsd export onnx` first)")
        profile = profile_shapes(spec, cfg)
        flags = builder_flags(spec, cfg.fp16)
        ws = int(cfg.workspace_gb * (1 << 30))
        settings = {"profile": {k: [list(s) for s in v] for k, v in profile.items()}, "flags": flags,
                    "workspace_bytes": ws}
        jobs.append(EngineJob(name, src, out / f"{name}.plan", profile, flags, ws, settings))
    return jobs


def check_environment():
    """``tensorrt`` module, or :class:`TensorRTUnavailable` saying what is missing."""
    problems = []
    trt = None
    try:
        import tensorrt as trt  # noqa: F811
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        problems.append(f"the TensorRT Python package is not importable ({type(e).__name__}: {e}); "
                        "install it with `pip install tensorrt` (the `gpu` extra) on a machine with an NVIDIA GPU")
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if not has_gpu:
        problems.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if problems:
        raise TensorRTUnavailable("cannot build TensorRT engines: " + "; ".join(problems) +
                                  ". The ONNX export runs anywhere; build engines on the GPU machine that serves them.")
    return trt


def _network_flags(trt) -> int:
    major = int(trt.__version__.split(".")[0])
    if major < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0  # explicit batch is the only mode in TensorRT 10


def build_engine(job: EngineJob, timing_cache: Path, trt=None, log=print) -> None:
    """Parse ``job.onnx``, apply profile and flags, build ``job.plan``; extend ``timing_cache``."""
    trt = trt or check_environment()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(job.onnx)):  # resolves model.onnx_data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{job.component}: TensorRT could not parse {job.onnx}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, job.workspace_bytes)
    for flag in job.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in job.profile.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{job.component}: TensorRT engine build failed (see the TensorRT log above)")
    job.plan.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(job.plan, bytes(serialized))
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    log(f"[{job.component}] built {job.plan} ({job.plan.stat().st_size / 1e6:.1f} MB) "
        f"in {time.perf_counter() - t0:.0f} s")


def timing_cache_path(out: Path, env: dict) -> Path:
    """``OUT/timing-<tensorrt>-<gpu>.cache``: a timing cache is only valid for the TensorRT and GPU that timed it."""
    from slimsd.models import slug

    return out / f"timing-{slug(env['tensorrt'] + '-' + env['gpu'])}.cache"


def export_tensorrt(onnx_dir, out, cfg: TensorRTConfig | None = None, log=None) -> dict:
    """Build every planned engine (skipping ones whose manifest entry still matches)."""
    from slimsd.manifest import sha256_file

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    cfg = cfg or TensorRTConfig()
    jobs = plan_engines(onnx_dir, out, cfg)  # config errors first, before asking for a GPU
    trt = check_environment()
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
    env = {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0)}
    cache = Path(cfg.timing_cache) if cfg.timing_cache else timing_cache_path(out, env)
    engines = manifest.get("engines", {}) if manifest.get("environment") == env else {}
    for job in jobs:
        src_sha = sha256_file(job.onnx)
        old = engines.get(job.component, {})
        if (not cfg.force and job.plan.is_file() and old.get("onnx_sha256") == src_sha
                and old.get("settings") == job.settings and old.get("plan_sha256") == sha256_file(job.plan)):
            log(f"[{job.component}] cached ({job.plan}), skipped")
            continue
        log(f"[{job.component}] building: flags {job.flags}, profile {job.settings['profile']}")
        build_engine(job, cache, trt, log)
        engines[job.component] = {"plan": job.plan.name, "onnx": str(job.onnx), "onnx_sha256": src_sha,
                                  "settings": job.settings, "plan_sha256": sha256_file(job.plan)}
        manifest = {"format": "slimsd-tensorrt/1", "onnx_dir": str(Path(onnx_dir).resolve()), "environment": env,
                    "timing_cache": str(cache), "engines": engines}
        atomic_write_text(mpath, json.dumps(manifest, indent=2) + "\n")
    return {"out": str(out), "engines": {j.component: str(j.plan) for j in jobs}, "timing_cache": str(cache)}
