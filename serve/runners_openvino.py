"""OpenVINO :class:`~slimsd.denoise.Runners` over a ``slimsd export onnx`` folder (CPU).

    runners = OpenVINORunners("exported/tiny-sd", precision="auto", threads=2)
    images = runners.generate(["a red circle left of a blue square"], steps=25, seeds=[0])

The same ONNX files as :class:`slimsd.runners_ort.OrtRunners`, compiled by OpenVINO's CPU
plugin; tensor names and dtypes come from the folder's specs, inputs are cast to the exported
dtype and outputs come back float32.

**Precision** (``INFERENCE_PRECISION_HINT``): ``f32``, ``bf16``, ``int8`` or ``auto``. The float
``auto`` is bf16 only where the CPU plugin reports ``BF16`` in ``OPTIMIZATION_CAPABILITIES``
(AVX512-BF16 or AMX), else f32. The hint changes the precision of the kernels only: weights
stay as stored and I/O stay float32. Asking for ``bf16`` on a CPU without BF16 is an error, not
a silent f32. ``int8`` compiles the U-Net from the int8 IR of ``slimsd export int8``
(:mod:`slimsd.serve.quantize`; refused when missing, stale or corrupt), its float ops and the
other two components at the float ``auto``; ``auto`` becomes int8 only where that artifact's
report says its quality check passed and int8 measured faster on this CPU.

**Threads**: ``threads`` sets ``INFERENCE_NUM_THREADS`` (default: OpenVINO's choice, all
physical cores); one stream per model with the ``LATENCY`` hint, as one ONNX Runtime session
per model. Each calling thread gets its own infer request, so ``--workers`` > 1 is safe.

**Start-up cache**: OpenVINO's own compiled-model cache (``CACHE_DIR``) goes to
``<folder>/openvino/<component>-<hash of its key>/``. The key (:meth:`OpenVINORunners.cache_key`,
written beside the blob as ``slimsd-cache-key.json``) is the ONNX files' sha256 (from the
export's ``manifest.json``), every compile property, the device and the OpenVINO version. So
an f32 and a bf16 compile of one export get two folders, and a re-export can never meet an old
blob, whatever OpenVINO's own key for ``compile_model(path)`` covers. Folders of an older
export are deleted (OpenVINO never deletes blobs; an SD U-Net's is gigabytes). A read-only
folder just compiles without a cache.

**Static shapes**: each component is compiled once with the export's dynamic shapes, and the first
``static_shapes`` distinct input shapes it is called with (1: the serving default, one image
with CFG) also get a compile of the model reshaped to exactly those shapes, as OpenVINO GenAI's
``Text2ImagePipeline`` reshapes before it compiles. The CPU plugin then skips per-call shape
inference and memory planning, which is most of a small model's call: per U-Net call 1.6x faster
on tiny-sd-slim, but 1.02-1.03x (unresolved) at SD size, where each variant would also hold its
own weights (about +1.7 GB for an SD U-Net in bf16) (``benchmarks/ov_static_shapes.py``,
docs/serve.md). So the default (None) is 1 for a U-Net under :data:`STATIC_SHAPES_MAX_UNET_BYTES`
of weights and 0 above. Other shapes run the dynamic compile. The variants compile on first use
(the server's warm-up does it for the default shape), into the same cache folder: OpenVINO keys a
compiled ``ov.Model`` by its content, shapes included.
Converting to OpenVINO IR (``openvino.save_model``) was measured and not kept: a warm cache
starts faster than compiling IR, and a first start would pay the conversion on top
(docs/serve.md, "OpenVINO").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from slimsd.io import atomic_write_text
from slimsd.precision import REQUESTED_PRECISIONS, Precision
from slimsd.runners import ExportFolderRunners
from slimsd.specs import COMPONENTS

log = logging.getLogger("slimsd.serve")

PRECISIONS = REQUESTED_PRECISIONS  # auto | bf16 | f32 | int8
# Static-shape compiles by default only below this U-Net size on disk (100M fp32 parameters, the line
# where backends.SMALL_UNET_PARAMS puts small models): measured to pay on tiny models, not at SD size
STATIC_SHAPES_MAX_UNET_BYTES = 400_000_000
# What ``auto`` picks on a CPU with BF16: bf16 (its images stay within the evaluator's noise
# on tiny-sd: docs/serve.md, "OpenVINO"); set to "f32" here if that ever stops being true.
AUTO_PRECISION_WITH_BF16 = "bf16"


def available() -> bool:
    """Whether the ``openvino`` package imports (the ``openvino`` extra)."""
    try:
        import openvino  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed or broken: not available
        return False
    return True


def _core():
    try:
        import openvino as ov
    except ImportError as e:
        raise RuntimeError("the openvino backend needs the openvino package: pip install 'slimsd[openvino]'") from e
    return ov.Core()


def cpu_capabilities(core=None) -> list[str]:
    """``OPTIMIZATION_CAPABILITIES`` of OpenVINO's CPU plugin (e.g. ``['BF16', 'FP32', 'INT8', ...]``)."""
    core = core or _core()
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def cpu_supports_bf16(core=None) -> bool:
    return "BF16" in cpu_capabilities(core)


def resolve_precision(precision: str, core=None, capabilities: list[str] | None = None,
                      int8_report: dict | None = None) -> Precision:
    """``"bf16"`` / ``"f32"`` / ``"int8"`` for a requested ``auto`` / ``bf16`` / ``f32`` / ``int8``.

    ValueError naming the ``precision`` setting for any other value, or for ``bf16`` on a CPU
    without BF16. ``capabilities`` overrides the CPU plugin's list (tests). ``int8_report``: the
    export's ``slimsd export int8`` report; ``auto`` takes int8 where
    :func:`slimsd.serve.quantize.int8_verdict` says so.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision in ("f32", "int8"):
        return precision  # type: ignore[return-value]
    caps = cpu_capabilities(core) if capabilities is None else list(capabilities)
    bf16 = "BF16" in caps
    if precision == "bf16":
        if not bf16:
            raise ValueError(f"precision: bf16 needs a CPU with BF16 support (AVX512-BF16 or AMX); OpenVINO reports "
                             f"{', '.join(caps) or 'nothing'}. Use precision f32 or auto.")
        return "bf16"
    floating = AUTO_PRECISION_WITH_BF16 if bf16 else "f32"  # auto
    if int8_report is not None:
        from .quantize import int8_verdict

        take, why = int8_verdict(int8_report, floating)
        log.info("openvino: precision auto: %s (%s)", "int8" if take else floating, why)
        if take:
            return "int8"
    return floating


def make_static(model, shapes: dict[str, tuple[int, ...]]):
    """``model`` (an ``ov.Model``, reshaped in place and returned) with fixed input ``shapes`` (input
    name -> shape): what a static-shape compile compiles (module doc, "Static shapes"). The
    benchmarks use it too."""
    import openvino as ov

    model.reshape({model.input(k).get_any_name(): ov.PartialShape(list(v)) for k, v in shapes.items()})
    return model


def compile_config(hint: str, threads: int | None = None) -> dict[str, str]:
    """The CPU plugin's compile properties slimsd serves with: ``INFERENCE_PRECISION_HINT`` (``f32`` /
    ``bf16``), the LATENCY hint with one stream per model, and ``INFERENCE_NUM_THREADS`` when set.
    The benchmarks compile with the same (benchmarks/e2e_common.py, benchmarks/peer_genai.py)."""
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
    return config


CACHE_KEY_FILE = "slimsd-cache-key.json"  # in each cache folder: what its blob was compiled from


def _stale(folder: Path, files: dict) -> bool:
    """Whether cache ``folder`` belongs to an older export (other ONNX sha256) or has no key file.

    A folder of the same export compiled another way (another precision, threads, OpenVINO
    version) is kept: another process may be using it.
    """
    try:
        key = json.loads((folder / CACHE_KEY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return True  # made before the key file existed (keyed by the ONNX hash alone): unsafe
    return key.get("onnx_sha256") != dict(sorted(files.items()))


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


class OpenVINORunners(ExportFolderRunners):
    """Three OpenVINO compiled models (``text_encoder``, ``unet``, ``vae_decoder``) of an exported folder."""

    def __init__(self, folder: str | Path, precision: str = "auto", threads: int | None = None,
                 cache: bool | str | Path = True, device: str = "CPU", core=None, static_shapes: int | None = None):
        """``cache``: True = ``<folder>/openvino`` (skipped if not writable), False = none, or a folder.
        ``static_shapes``: static-shape compiles kept per component (module doc); 0 = dynamic only,
        None = 1 for a small U-Net, else 0."""
        self._open(folder)
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads: must be >= 1, got {threads}")
        if static_shapes is not None and int(static_shapes) < 0:
            raise ValueError(f"static_shapes: must be >= 0, got {static_shapes}")
        from . import quantize

        self.core = core or _core()
        self.requested_precision = precision
        report = quantize.read_report(self.folder)
        self.precision = resolve_precision(precision, self.core, int8_report=report)
        self.threads = threads
        self.device = device
        # the model files and their hashes (cache keys); int8: the U-Net is the checked int8 IR
        self.paths = {name: self.onnx_path(name) for name in COMPONENTS}
        self.files = {name: self.manifest.get("components", {}).get(name, {}).get("files", {}) for name in COMPONENTS}
        hint = self.precision
        if self.precision == "int8":
            floating = resolve_precision("auto", self.core)  # the float ops and the other components
            try:
                self.paths["unet"] = quantize.check_fresh(self.folder, report)
            except ValueError as e:
                if precision != "auto":
                    raise
                # auto never fails start-up over a stale or corrupt int8 artifact: it serves float
                log.warning("openvino: precision auto: %s; serving %s", e, floating)
                self.precision = floating
            else:
                self.files["unet"] = {f"{quantize.INT8_DIR}/{k}": v for k, v in report["ir_sha256"].items()}
            hint = floating
        self.float_hint = hint
        if static_shapes is None:
            unet_dir = Path(self.paths["unet"]).parent
            unet_bytes = sum(f.stat().st_size for f in unet_dir.iterdir() if f.is_file())
            static_shapes = 1 if unet_bytes < STATIC_SHAPES_MAX_UNET_BYTES else 0
        self.static_shapes = int(static_shapes)
        self.config = compile_config(hint, threads)
        root = (self.folder / "openvino") if cache is True else (Path(cache) if cache else None)
        self.cache_root = root if root is not None and _writable(root) else None
        if cache and self.cache_root is None:
            log.warning("openvino: %s is not writable; compiling without a cache", root)
        self.compiled, self.compile_s = {}, {}
        for name in COMPONENTS:
            path = self.paths[name]
            t0 = time.perf_counter()
            compiled = self.core.compile_model(str(path), device, self._config_for(name))
            self.compile_s[name] = round(time.perf_counter() - t0, 3)
            self.specs[name].check_names(path, [n for i in compiled.inputs for n in i.get_names()],
                                         [n for o in compiled.outputs for n in o.get_names()], exact_inputs=False)
            self.compiled[name] = compiled
        self._local = threading.local()
        # (component, ((input, shape), ...)) -> a compile of the model reshaped to those shapes
        self.static: dict[tuple, object] = {}
        self._static_lock = threading.Lock()
        log.info("openvino: compiled %s in %s s (precision %s, threads %s, cache %s)", self.folder, self.compile_s,
                 self.precision, threads or "auto", self.cache_root)

    # -- compiled-model cache, one folder per component, ONNX content and compile settings --
    def cache_key(self, name: str, files: dict) -> dict:
        """Everything that changes the blob OpenVINO stores for component ``name``.

        The ONNX files' sha256, every compile property passed (precision hint, performance
        hint, streams, threads), the device and the OpenVINO version. Two compiles that differ
        in any of them get two folders: OpenVINO's own key for ``compile_model(path)`` does not
        cover the precision hint, and a bf16 compile that meets an f32 blob gives black images
        or heap corruption on AMX CPUs (issue #12).
        """
        import openvino as ov

        return {"component": name, "onnx_sha256": dict(sorted(files.items())), "device": self.device,
                "compile": dict(sorted(self.config.items())), "openvino": ov.__version__}

    def _config_for(self, name: str) -> dict:
        if self.cache_root is None:
            return dict(self.config)
        files = self.files[name]
        if not files:  # an export without hashes: no safe cache key
            return dict(self.config)
        import hashlib

        key = self.cache_key(name, files)
        # the int8 U-Net's blobs live apart: its files differ from the ONNX's, and sharing the prefix
        # would make each compile delete the other's cache as "an older export"
        label = "unet_int8" if name == "unet" and self.precision == "int8" else name
        sub = self.cache_root / f"{label}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"
        for old in self.cache_root.glob(f"{label}-*"):
            if old != sub and old.is_dir() and _stale(old, files):
                shutil.rmtree(old, ignore_errors=True)
        sub.mkdir(parents=True, exist_ok=True)
        if not (sub / CACHE_KEY_FILE).is_file():
            atomic_write_text(sub / CACHE_KEY_FILE, json.dumps(key, indent=2) + "\n")
        return {**self.config, "CACHE_DIR": str(sub)}

    # -- the Runners interface -------------------------------------------------------------
    def _variant(self, name: str, inputs: dict[str, np.ndarray]) -> tuple:
        """The key of the compile that runs ``inputs``: a static-shape one where there is (or may
        now be) one for their shapes, else the dynamic one (``(name,)``)."""
        if not self.static_shapes:
            return (name,)
        key = (name, tuple((k, v.shape) for k, v in sorted(inputs.items())))
        if key in self.static:
            return key
        with self._static_lock:
            if key not in self.static:
                if sum(k[0] == name for k in self.static) >= self.static_shapes:
                    return (name,)
                t0 = time.perf_counter()
                model = make_static(self.core.read_model(str(self.paths[name])), dict(key[1]))
                self.static[key] = self.core.compile_model(model, self.device, self._config_for(name))
                log.info("openvino: %s compiled for static shapes %s in %.1f s", name, dict(key[1]),
                         time.perf_counter() - t0)
        return key

    def _request(self, key: tuple):
        reqs = getattr(self._local, "requests", None)
        if reqs is None:
            reqs = self._local.requests = {}
        if key not in reqs:
            compiled = self.static[key] if len(key) > 1 else self.compiled[key[0]]
            reqs[key] = compiled.create_infer_request()
        return reqs[key]

    def run(self, name: str, **inputs) -> dict[str, np.ndarray]:
        spec = self.specs[name]
        inputs = spec.cast_inputs(inputs)
        req = self._request(self._variant(name, inputs))
        req.infer(inputs)
        # copies: the request's output tensors are reused by its next call
        return {n: np.array(req.get_tensor(n).data, dtype=np.float32, copy=True) for n in spec.output_names}
