"""serve/ pipeline and runners: parity with diffusers, Triton over both protocols, model defaults.

The ONNX export goes to the session's temp cache (the path ``slimsd serve`` itself would use
with that ``SLIMSD_CACHE``), so the server tests reuse it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from slimsd.models import TINY_SD_DIR

PROMPTS = ["a red circle left of a blue square", "a green triangle above a yellow cross"]
SEEDS = [0, 7]


def session_cache(tmp_path_factory) -> Path:
    """The cache the conftest points SLIMSD_CACHE at (session fixtures run before it is set)."""
    return tmp_path_factory.getbasetemp() / "slimsd-cache"


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    from slimsd.serve.models import ensure_onnx

    return ensure_onnx("tiny-sd", TINY_SD_DIR, cache_dir=session_cache(tmp_path_factory) / "onnx")


@pytest.fixture(scope="module")
def ort_pipe(onnx_dir):
    from slimsd.serve.pipeline import load_served_pipeline
    from slimsd.serve.settings import ServeSettings

    return load_served_pipeline(ServeSettings(model="tiny-sd", backend="onnxruntime", onnx_dir=onnx_dir))


@pytest.fixture(scope="module")
def torch_pipe():
    from slimsd.serve.pipeline import load_served_pipeline
    from slimsd.serve.settings import ServeSettings

    return load_served_pipeline(ServeSettings(model="tiny-sd", backend="torch"))


@pytest.fixture(scope="module")
def diffusers_pipe():
    from slimsd.models import load_pipeline

    return load_pipeline("tiny-sd")


def _reference(pipe, scheduler: str, steps: int, guidance: float = 7.5) -> np.ndarray:
    """diffusers' own images for PROMPTS / SEEDS, as uint8 (what output_type="pil" gives)."""
    import diffusers
    import torch

    from slimsd.serve.pipeline import SCHEDULERS

    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    return (out * 255).round().astype(np.uint8)


# -- parity -----------------------------------------------------------------------------------
# Stated tolerance: ONNX Runtime within 2/255 per pixel value (fp32 kernels differ from torch's
# in summation order; the loop amplifies it slightly), torch within 1/255 (same modules; only
# the float32 per-row timestep differs from diffusers' scalar one, which the U-Net casts anyway).
@pytest.mark.parametrize("backend,scheduler,tol", [
    ("onnxruntime", "ddim", 2), ("onnxruntime", "euler", 2), ("torch", "ddim", 1), ("torch", "dpm++", 1),
])
def test_backend_matches_diffusers_pipeline(backend, scheduler, tol, ort_pipe, torch_pipe, diffusers_pipe):
    pipe = ort_pipe if backend == "onnxruntime" else torch_pipe
    ref = _reference(diffusers_pipe, scheduler, steps=8)
    got = pipe.generate(PROMPTS, None, SEEDS, steps=8, guidance=7.5, scheduler=scheduler)
    assert got.shape == ref.shape == (2, 64, 64, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - ref.astype(int))
    print(f"\n{backend}/{scheduler}: max |serve - diffusers| = {diff.max()}/255, mean {diff.mean():.4f}")
    assert diff.max() <= tol
    assert ref.std() > 1  # a real image, not a blank one


def test_pipeline_defaults_and_size_checks(ort_pipe, torch_pipe):
    assert ort_pipe.defaults.steps == 25 and ort_pipe.defaults.guidance == 7.5  # tiny-sd's manifest
    assert ort_pipe.image_size == (64, 64)
    ort_pipe.check_size(128, 64)  # the cached export has dynamic height/width
    with pytest.raises(ValueError, match="multiple of 64"):
        ort_pipe.check_size(96, 64)
    with pytest.raises(ValueError, match="unknown scheduler"):
        ort_pipe.scheduler("plms")
    a = ort_pipe.generate(PROMPTS[:1], None, [3], steps=3, height=128, width=64)
    assert a.shape == (1, 128, 64, 3)


def test_batched_generation_equals_one_by_one(ort_pipe):
    """Micro-batching must not change images: row i of a batch == the same request alone."""
    both = ort_pipe.generate(PROMPTS, ["", "blurry"], SEEDS, steps=4)
    one = ort_pipe.generate(PROMPTS[1:], ["blurry"], SEEDS[1:], steps=4)
    assert np.abs(both[1:].astype(int) - one.astype(int)).max() <= 1


def test_default_model_is_the_student_when_it_resolves(monkeypatch):
    import slimsd.models
    from slimsd.serve import models

    assert models.default_model() in ("tiny-sd-slim", "tiny-sd")
    real = slimsd.models.resolve_model
    monkeypatch.setattr(slimsd.models, "resolve_model",
                        lambda s: TINY_SD_DIR if s == "tiny-sd-slim" else real(s))
    assert models.default_model() == "tiny-sd-slim"

    def missing(s):
        raise FileNotFoundError(s)

    monkeypatch.setattr(slimsd.models, "resolve_model", missing)
    assert models.default_model() == "tiny-sd"


def test_generation_defaults_read_from_the_model_folder(tmp_path):
    from slimsd.defaults import generation_defaults

    assert generation_defaults(tmp_path) == generation_defaults(tmp_path / "nope")
    assert (generation_defaults(tmp_path).steps, generation_defaults(tmp_path).guidance) == (25, 7.5)
    (tmp_path / "manifest.json").write_text(json.dumps({"default_steps": 8}))
    assert (generation_defaults(tmp_path).steps, generation_defaults(tmp_path).guidance) == (8, 7.5)
    (tmp_path / "manifest.json").write_text(json.dumps({"defaults": {"steps": 8, "guidance": 4.0}}))
    assert (generation_defaults(tmp_path).steps, generation_defaults(tmp_path).guidance) == (8, 4.0)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "slimsd.json").write_text(json.dumps({"defaults": {"steps": 6}}))
    assert generation_defaults(tmp_path).steps == 6


def test_onnx_cache_is_reused_and_keyed_by_source(onnx_dir, tmp_path_factory):
    from slimsd.serve.models import ensure_onnx, onnx_cache_dir

    root = session_cache(tmp_path_factory) / "onnx"
    assert onnx_dir == onnx_cache_dir("tiny-sd", TINY_SD_DIR, "float32", True, root)
    assert onnx_dir.parent == root and onnx_dir.name.startswith("tiny-sd-")
    before = (onnx_dir / "unet" / "model.onnx").stat().st_mtime_ns
    assert ensure_onnx("tiny-sd", TINY_SD_DIR, cache_dir=root) == onnx_dir  # second start-up: nothing re-exported
    assert (onnx_dir / "unet" / "model.onnx").stat().st_mtime_ns == before
    assert onnx_cache_dir("x", Path("/elsewhere"), "float32", True, root) != onnx_dir
    assert json.loads((onnx_dir / "manifest.json").read_text())["export"]["dynamic_hw"] is True


# -- Triton: the real tritonclient against in-process fake servers ----------------------------
class FakeTriton:
    """Answers like Triton for the models of a generated repository: checks every input
    against that model's ``config.pbtxt`` (name, data type, dims), then runs ONNX Runtime."""

    def __init__(self, repo: Path, runners):
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as pb

        self.runners = runners
        self.configs = {}
        for name in ("text_encoder", "unet", "vae_decoder"):
            cfg = pb.ModelConfig()
            text_format.Parse((repo / name / "config.pbtxt").read_text(), cfg)
            self.configs[name] = cfg
        self.calls: list[tuple[str, dict]] = []

    def infer(self, model: str, tensors: dict[str, tuple[str, list[int], bytes]]) -> dict[str, np.ndarray]:
        from tritonclient.grpc import model_config_pb2 as pb
        from tritonclient.utils import triton_to_np_dtype

        cfg = self.configs[model]
        want = {i.name: i for i in cfg.input}
        assert set(tensors) == set(want), f"{model}: inputs {sorted(tensors)} != config {sorted(want)}"
        arrays = {}
        for name, (datatype, shape, raw) in tensors.items():
            spec = want[name]
            assert "TYPE_" + datatype == pb.DataType.Name(spec.data_type), f"{model}.{name}: {datatype}"
            assert len(shape) == len(spec.dims) and all(d == -1 or d == s for d, s in zip(spec.dims, shape)), \
                f"{model}.{name}: shape {shape} vs dims {list(spec.dims)}"
            arrays[name] = np.frombuffer(raw, dtype=triton_to_np_dtype(datatype)).reshape(shape)
        self.calls.append((model, {k: v.shape for k, v in arrays.items()}))
        return self.runners.run(model, **arrays)


def _grpc_server(fake: FakeTriton):
    from concurrent import futures

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ModelReady(self, request, context):
            return service_pb2.ModelReadyResponse(ready=request.name in fake.configs)

        def ModelInfer(self, request, context):
            tensors = {t.name: (t.datatype, list(t.shape), raw)
                       for t, raw in zip(request.inputs, request.raw_input_contents)}
            outs = fake.infer(request.model_name, tensors)
            wanted = [o.name for o in request.outputs] or list(outs)
            resp = service_pb2.ModelInferResponse(model_name=request.model_name)
            for name in wanted:
                a = np.ascontiguousarray(outs[name], dtype=np.float32)
                resp.outputs.add(name=name, datatype="FP32", shape=list(a.shape))
                resp.raw_output_contents.append(a.tobytes())
            return resp

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _http_server(fake: FakeTriton):
    """KServe v2 HTTP with Triton's binary-tensor extension (what tritonclient.http speaks)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def _send(self, code: int, body: bytes, headers: dict | None = None):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # /v2/models/<name>/ready
            parts = self.path.strip("/").split("/")
            ok = len(parts) == 4 and parts[3] == "ready" and parts[2] in fake.configs
            self._send(200 if ok else 400, b"")

        def do_POST(self):  # /v2/models/<name>/infer
            model = self.path.strip("/").split("/")[2]
            body = self.rfile.read(int(self.headers["Content-Length"]))
            n = int(self.headers.get("Inference-Header-Content-Length", len(body)))
            header, blob = json.loads(body[:n]), body[n:]
            tensors, off = {}, 0
            for t in header["inputs"]:
                size = t["parameters"]["binary_data_size"]  # the client must send raw bytes, not JSON lists
                tensors[t["name"]] = (t["datatype"], t["shape"], blob[off:off + size])
                off += size
            outs = fake.infer(model, tensors)
            wanted = [o["name"] for o in header.get("outputs", [])] or list(outs)
            meta, raw = [], b""
            for name in wanted:
                a = np.ascontiguousarray(outs[name], dtype=np.float32).tobytes()
                meta.append({"name": name, "datatype": "FP32", "shape": list(outs[name].shape),
                             "parameters": {"binary_data_size": len(a)}})
                raw += a
            head = json.dumps({"model_name": model, "outputs": meta}).encode()
            self._send(200, head + raw, {"Content-Type": "application/octet-stream",
                                         "Inference-Header-Content-Length": str(len(head))})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def triton_repo(onnx_dir, tmp_path_factory) -> Path:
    from slimsd.export.triton import TritonConfig, export_triton

    repo = tmp_path_factory.mktemp("triton") / "model_repository"
    export_triton(onnx_dir, repo, TritonConfig(kind="cpu", link=False), log=lambda m: None)
    return repo


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_runners_speak_the_tritonclient_api(protocol, triton_repo, ort_pipe, onnx_dir):
    """The Triton backend, through the real tritonclient, gives the ONNX Runtime images; every
    request matches the generated config.pbtxt (names, TYPE_*, dims)."""
    from slimsd.serve.runners_triton import TritonRunners
    from slimsd.specs import component_specs

    fake = FakeTriton(triton_repo, ort_pipe.runners)
    server, url = (_grpc_server if protocol == "grpc" else _http_server)(fake)
    try:
        runners = TritonRunners([f"{protocol}://{url}"], component_specs(onnx_dir), protocol)
        runners.check_ready()
        pipe = replace(ort_pipe, runners=runners, backend="triton")
        got = pipe.generate(PROMPTS, None, SEEDS, steps=3)
        want = ort_pipe.generate(PROMPTS, None, SEEDS, steps=3)
        np.testing.assert_array_equal(got, want)
        models = [m for m, _ in fake.calls]
        assert models == ["text_encoder"] + ["unet"] * 3 + ["vae_decoder"]
        assert fake.calls[1][1] == {"sample": (4, 4, 8, 8), "timestep": (4,), "encoder_hidden_states": (4, 77, 128)}
    finally:
        server.stop(0) if protocol == "grpc" else server.shutdown()


def test_triton_runners_round_robin_and_report_unready_models(onnx_dir):
    from slimsd.serve.runners_triton import TritonRunners
    from slimsd.specs import component_specs

    class Client:
        def __init__(self, url):
            self.url = url

        def is_model_ready(self, name):
            return name != "unet"

    r = TritonRunners(["a:1", "grpc://b:2"], component_specs(onnx_dir), "grpc", client_factory=Client)
    assert [r._client().url for _ in range(3)] == ["a:1", "b:2", "a:1"]
    with pytest.raises(RuntimeError, match="'unet'.*not ready"):
        r.check_ready()
    inputs = r.build_inputs("unet", sample=np.zeros((2, 4, 8, 8)), timestep=np.array([1, 1]),
                            encoder_hidden_states=np.zeros((2, 77, 128)))
    assert [(i.name(), i.datatype(), i.shape()) for i in inputs] == [
        ("sample", "FP32", [2, 4, 8, 8]), ("timestep", "FP32", [2]), ("encoder_hidden_states", "FP32", [2, 77, 128])]


@pytest.mark.skipif(not __import__("os").environ.get("SLIMSD_TRITON_URL"),
                    reason="needs a live Triton server: set SLIMSD_TRITON_URL=host:8001 (repository from "
                           "`slimsd export triton` of this model)")
def test_triton_backend_against_a_live_server(ort_pipe, onnx_dir):  # pragma: no cover - needs Triton
    import os

    from slimsd.serve.runners_triton import TritonRunners
    from slimsd.specs import component_specs

    runners = TritonRunners(os.environ["SLIMSD_TRITON_URL"], component_specs(onnx_dir), "grpc")
    runners.check_ready()
    got = replace(ort_pipe, runners=runners).generate(PROMPTS, None, SEEDS, steps=4)
    want = ort_pipe.generate(PROMPTS, None, SEEDS, steps=4)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


# -- TensorRT ---------------------------------------------------------------------------------
def test_tensorrt_backend_without_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    from slimsd.export.tensorrt import TensorRTUnavailable
    from slimsd.serve.runners_tensorrt import TensorRTRunners

    with pytest.raises(TensorRTUnavailable, match="no CUDA GPU"):
        TensorRTRunners(tmp_path)


@pytest.mark.gpu
def test_tensorrt_backend_matches_onnxruntime(onnx_dir, ort_pipe, tmp_path):  # pragma: no cover - needs CUDA
    pytest.importorskip("tensorrt")
    from slimsd.export.tensorrt import TensorRTConfig, export_tensorrt
    from slimsd.serve.runners_tensorrt import TensorRTRunners

    export_tensorrt(onnx_dir, tmp_path / "engines", TensorRTConfig(fp16=False, max_batch=8))
    pipe = replace(ort_pipe, runners=TensorRTRunners(tmp_path / "engines"), backend="tensorrt")
    got = pipe.generate(PROMPTS, None, SEEDS, steps=8)
    want = ort_pipe.generate(PROMPTS, None, SEEDS, steps=8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 3  # TF32 kernels


def test_slimsd_serve_command_line_does_not_load_the_training_stack():
    """`slimsd serve ...` builds only stubs of the training commands: slimsd.compress stays unloaded."""
    import subprocess
    import sys

    code = ("import sys; from slimsd.cli import build_parser; "
            "a = build_parser('serve').parse_args(['serve', 'tiny-sd', '--backend', 'torch']); "
            "assert a.backend == 'torch'; "
            "print(sorted(m for m in sys.modules if m.startswith('slimsd.compress')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    from slimsd.cli import build_parser

    # the full parser (no command named) and the compress command itself still build every flag
    assert build_parser().parse_args(["compress", "train", "--stage", "1", "--student", "s", "--out", "o"]).stage == 1
    assert build_parser("compress").parse_args(["compress", "build", "c.json"]).compress_command == "build"
