"""A real Triton server (the ``nvidia-pytriton`` wheel's ``tritonserver``, CPU) serving the
``slimsd export triton --backend python`` repository of tiny-sd, end to end.

Loopback only, free ports, the server's process group killed in the fixture's teardown.
The wheel is installed by ``.ci/run`` (``pip install --no-deps nvidia-pytriton`` plus numpy 1 for
its stubs in ``$SLIMSD_CACHE/triton-python``: docs/export.md says why), so a missing wheel is a
failure naming the install command, not a skip: a skip would let CI go green without ever
starting Triton, which is what these tests exist to do.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from slimsd.models import TINY_SD_DIR, TINY_SD_SLIM_DIR

PROMPT = "a red circle left of a blue square"
STEPS = 4
# readiness wait: this whole file ran in 91 s with one other job on the machine, but the eight Python-backend models
# took over 150 s to load with a training job and the suite on 2 cores (a CI run failed so). Not a speed check.
READY_S = 360


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    from slimsd.serve.models import ensure_onnx

    return ensure_onnx("tiny-sd", TINY_SD_DIR, cache_dir=tmp_path_factory.getbasetemp() / "slimsd-cache" / "onnx")


@pytest.fixture(scope="module")
def slim_onnx_dir(tmp_path_factory):
    from slimsd.serve.models import ensure_onnx

    return ensure_onnx("tiny-sd-slim", TINY_SD_SLIM_DIR, cache_dir=tmp_path_factory.getbasetemp() / "slimsd-cache" / "onnx")


SLIM_PREFIX = "tiny-sd-slim_"


@pytest.fixture(scope="module")
def repo(onnx_dir, slim_onnx_dir, tmp_path_factory):
    from slimsd.export.triton import TritonConfig, export_triton

    out = tmp_path_factory.mktemp("triton") / "model_repository"
    # 50 ms queue delay: long enough on a loaded 2-core machine for concurrent requests to meet
    export_triton(onnx_dir, out, TritonConfig(backend="python", max_batch_size=8, max_queue_delay_us=50_000),
                  log=lambda m: None)
    # the student beside the teacher in the same repository (one server for both)
    export_triton(slim_onnx_dir, out, TritonConfig(backend="python", max_batch_size=8, prefix=SLIM_PREFIX),
                  log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def triton(repo):
    from slimsd.export.triton_server import TritonServer, TritonServerConfig

    http, grpc, metrics = _free_ports(3)
    server = TritonServer(repo, TritonServerConfig(http_port=http, grpc_port=grpc, metrics_port=metrics))
    try:
        server.start().wait_ready(READY_S)
        yield server
    finally:
        server.close()
        assert server.proc.poll() is not None


@pytest.fixture(scope="module")
def ort(onnx_dir):
    from slimsd.runners_ort import OrtRunners

    return OrtRunners(onnx_dir, providers=["CPUExecutionProvider"], threads=1)


def _pipeline_image(server, prompt: str, seed: int, steps: int, model: str = "pipeline") -> np.ndarray:
    import tritonclient.grpc as g

    c = g.InferenceServerClient(server.grpc_url)
    inputs = []
    for name, dtype, value in (("prompt", "BYTES", np.array([prompt.encode()], dtype=object)),
                               ("seed", "INT64", np.array([seed], np.int64)),
                               ("num_inference_steps", "INT32", np.array([steps], np.int32))):
        t = g.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    return c.infer(model, inputs, client_timeout=120).as_numpy("image")


def test_the_launcher_binds_loopback_and_reports_ready(triton):
    assert triton.cfg.host == "127.0.0.1" and "--http-address=127.0.0.1" in triton.command
    assert _get(f"http://{triton.http_url}/v2/health/ready")[0] == 200
    status, body = _get(f"http://{triton.http_url}/v2/models/unet/config")
    cfg = json.loads(body)
    assert status == 200 and cfg["backend"] == "python" and cfg["max_batch_size"] == 8


def test_pipeline_image_equals_the_onnxruntime_pipeline(triton, ort):
    image = _pipeline_image(triton, PROMPT, seed=3, steps=STEPS)
    expected = ort.generate([PROMPT], steps=STEPS, seeds=[3])
    assert image.dtype == np.uint8 and image.shape == expected.shape == (1, 64, 64, 3)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


def test_two_exports_share_one_repository_and_server_by_prefix(triton, repo, slim_onnx_dir):
    """The teacher's models and the student's ``tiny-sd-slim_*`` models side by side: each
    pipeline, and serve's runners with --triton-model-prefix, give that model's own image."""
    from slimsd.defaults import generation_defaults
    from slimsd.runners import generate_with_defaults
    from slimsd.runners_ort import OrtRunners
    from slimsd.serve.backends import BACKENDS, Source
    from slimsd.serve.settings import ServeSettings
    from slimsd.specs import ModelDims

    assert {p.name for p in repo.iterdir()} >= {"unet", "pipeline", SLIM_PREFIX + "unet", SLIM_PREFIX + "pipeline"}
    assert f'name: "{SLIM_PREFIX}unet"' in (repo / (SLIM_PREFIX + "unet") / "config.pbtxt").read_text()
    slim_ort = OrtRunners(slim_onnx_dir, providers=["CPUExecutionProvider"], threads=1)
    expected = slim_ort.generate([PROMPT], steps=STEPS, seeds=[4])
    image = _pipeline_image(triton, PROMPT, seed=4, steps=STEPS, model=SLIM_PREFIX + "pipeline")
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    teacher = _pipeline_image(triton, PROMPT, seed=4, steps=STEPS)
    assert np.abs(teacher.astype(int) - expected.astype(int)).max() > 1  # a different model answered

    settings = ServeSettings(model="tiny-sd-slim", backend="triton", onnx_dir=str(slim_onnx_dir),
                             triton_url=[triton.grpc_url], triton_model_prefix="{model}_")
    loaded = BACKENDS["triton"].load(settings, Source("tiny-sd-slim", TINY_SD_SLIM_DIR, ModelDims.from_folder(TINY_SD_SLIM_DIR)))
    assert loaded.runners.models == {n: SLIM_PREFIX + n for n in ("text_encoder", "unet", "vae_decoder")}
    got = generate_with_defaults(loaded.runners, slim_ort.load_tokenizer(), slim_ort.load_scheduler(), loaded.spec,
                                 generation_defaults(slim_onnx_dir), [PROMPT], steps=STEPS, seeds=[4])
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def _batch_counts(server, model: str) -> dict[int, int]:
    stats = json.loads(_get(f"http://{server.http_url}/v2/models/{model}/stats")[1])["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_concurrent_requests_are_batched_by_triton(triton, ort, onnx_dir):
    from slimsd.serve.runners_triton import TritonRunners
    from slimsd.specs import component_specs

    specs = component_specs(onnx_dir)
    runners = TritonRunners(triton.grpc_url, specs)
    runners.check_ready()
    assert runners.batched == {"text_encoder", "unet", "vae_decoder"}
    feeds = [specs["unet"].sample_inputs(batch=2, seed=i, numpy=True) for i in range(4)]
    for f in feeds:
        f["timestep"] = np.array([999.0, 500.0], np.float32)  # per-row timesteps
    before = _batch_counts(triton, "unet")
    gate = threading.Barrier(4)

    def call(i):
        gate.wait(30)
        return runners.run("unet", **feeds[i])["out_sample"]

    with ThreadPoolExecutor(4) as ex:
        out = [f.result(60) for f in [ex.submit(call, i) for i in range(4)]]  # a failed call raises here
    after = _batch_counts(triton, "unet")
    merged = {b: after[b] - before.get(b, 0) for b in after if b > 2 and after[b] > before.get(b, 0)}
    assert merged, f"no U-Net execution above one request's 2 rows: {before} -> {after}"
    for i in range(4):  # each request gets its own rows back
        np.testing.assert_allclose(out[i], ort.run("unet", **feeds[i])["out_sample"], rtol=1e-4, atol=1e-5)


def test_metrics_are_scraped(triton):
    _pipeline_image(triton, PROMPT, seed=0, steps=2)
    status, body = _get(triton.metrics_url)
    text = body.decode()
    assert status == 200
    counts = [line for line in text.splitlines() if line.startswith("nv_inference_count{") and 'model="unet"' in line]
    assert counts and float(counts[0].rsplit(" ", 1)[1]) > 0, text[:2000]


@pytest.fixture(scope="module")
def serve_api(triton, onnx_dir, tmp_path_factory):
    (port,) = _free_ports(1)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "slimsd.cli", "serve", "tiny-sd", "--backend", "triton", "--onnx-dir", str(onnx_dir),
           "--triton-url", triton.grpc_url, "--port", str(port), "--request-timeout-s", "20", "--no-warmup"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if _get(url + "/health/ready", 2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"slimsd serve not ready in 90 s: {log.read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _openai_image(url: str, seed: int) -> tuple[int, dict, np.ndarray | None]:
    from PIL import Image

    status, body = _post(url + "/v1/images/generations",
                         {"prompt": PROMPT, "seed": seed, "num_inference_steps": STEPS, "guidance_scale": 7.5})
    if status != 200:
        return status, body, None
    png = base64.b64decode(body["data"][0]["b64_json"])
    return status, body, np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_serve_backend_triton_answers_openai_with_the_same_image(serve_api, ort):
    status, body, image = _openai_image(serve_api, seed=5)
    assert status == 200, body
    expected = ort.generate([PROMPT], steps=STEPS, seeds=[5])[0]
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


def test_killing_triton_gives_503_then_serve_recovers(serve_api, triton, ort):
    results = []

    def load():
        for i in range(3):
            results.append(_openai_image(serve_api, seed=100 + i)[:2])

    t = threading.Thread(target=load)
    t.start()
    time.sleep(0.5)
    triton.kill()  # mid-load: every process of the group at once, as a crash would
    t.join(60)
    assert not t.is_alive()
    started = time.monotonic()
    status, body, _ = _openai_image(serve_api, seed=7)
    assert status == 503 and time.monotonic() - started < 20, (status, body)  # within --request-timeout-s
    assert any(s == 503 for s, _ in results) or all(s == 200 for s, _ in results[:1])
    assert all(s in (200, 503) for s, _ in results), results

    triton.start().wait_ready(READY_S)  # back on the same ports
    deadline = time.monotonic() + 60
    while True:
        status, body, image = _openai_image(serve_api, seed=5)
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status == 200, body
    expected = ort.generate([PROMPT], steps=STEPS, seeds=[5])[0]
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


def test_cli_triton_serve_starts_and_stops_on_sigterm(repo, tmp_path):
    small = tmp_path / "repo"  # the VAE decoder alone: the command is under test, not the models
    small.mkdir()
    (small / "vae_decoder").symlink_to(repo / "vae_decoder")
    http, grpc, metrics = _free_ports(3)
    cmd = [sys.executable, "-m", "slimsd.cli", "triton", "serve", str(small), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    log = tmp_path / "cli.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while "tritonserver ready" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
        assert _get(f"http://127.0.0.1:{http}/v2/health/ready")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0, log.read_text()[-3000:]
        assert "tritonserver stopped" in log.read_text()
        with pytest.raises(OSError):
            _get(f"http://127.0.0.1:{http}/v2/health/ready", 2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_missing_wheel_is_a_clear_error(monkeypatch):
    import importlib.util

    from slimsd.export import triton_server

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(triton_server.TritonNotInstalled, match="nvidia-pytriton"):
        triton_server.find_tritonserver()


def test_a_prefix_that_is_not_a_folder_name_is_refused(onnx_dir, tmp_path):
    from slimsd.export.triton import TritonConfig, export_triton

    with pytest.raises(ValueError, match="prefix"):
        export_triton(onnx_dir, tmp_path / "repo", TritonConfig(backend="python", prefix="../x_"), log=lambda m: None)
    assert not (tmp_path / "repo").exists()
