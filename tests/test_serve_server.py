"""``slimsd serve`` as a real process on loopback: curl, the official OpenAI client, batching,
the playground page in headless Chromium, graceful shutdown, and a model that cannot load.

The server reuses the session's ONNX cache (exported by the first serve test to need it).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from slimsd.models import TINY_SD_DIR

KEY = "test-key-123"
PROMPT = "a red circle left of a blue square"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slimsd_command() -> list[str]:
    exe = Path(sys.executable).with_name("slimsd")  # the console script the README runs
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "slimsd.cli"]


def start(args: list[str], env_extra: dict, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.Popen(slimsd_command() + ["serve", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(proc, url: str, log, interval: float = 0.2, limit_s: float = 180) -> None:
    """Until /health/ready answers 200; fails with the server's log if it exits or takes too long."""
    import httpx

    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() - t0 < limit_s, f"not ready after {limit_s:.0f} s:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)


@pytest.fixture(scope="module")
def server(tmp_path_factory):

    from slimsd.serve.models import ensure_onnx

    cache = tmp_path_factory.getbasetemp() / "slimsd-cache"
    ensure_onnx("tiny-sd", TINY_SD_DIR, cache_dir=cache / "onnx")  # what `slimsd serve` does on a fresh clone
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # onnxruntime named: `auto` would pick OpenVINO where it is installed and compile for a minute
    # two ids over one folder (one export): the model picker, `model=` and the compare view have a choice
    proc = start(["tiny-sd", "--model", "copy=tiny-sd", "--backend", "onnxruntime", "--port", str(port),
                  "--max-wait-ms", "300",
                  "--drain-timeout-s", "20"],
                 {"SLIMSD_CACHE": str(cache), "SLIMSD_API_KEY": KEY}, log)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(proc, url, log)
    yield {"url": url, "port": port, "proc": proc, "log": log}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_curl_returns_a_png(server, tmp_path):
    """The docs' curl line, verbatim apart from host and key."""
    if not shutil.which("curl"):
        pytest.skip("curl not installed")
    out = tmp_path / "out.png"
    cmd = (f"curl -sf {server['url']}/v1/images/generations -H 'Authorization: Bearer {KEY}' "
           f"-H 'Content-Type: application/json' "
           f"""-d '{{"prompt": "{PROMPT}", "size": "64x64", "seed": 0, "num_inference_steps": 4}}' """
           f"""| {sys.executable} -c "import sys, json, base64; """
           f"""sys.stdout.buffer.write(base64.b64decode(json.load(sys.stdin)['data'][0]['b64_json']))" > {out}""")
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, timeout=60)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    from PIL import Image

    assert Image.open(out).size == (64, 64)


def test_the_official_openai_client_works_unchanged(server):
    import openai  # dev extra: missing is a broken install, not a skip
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)
    r = client.images.generate(model="tiny-sd", prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                               extra_body={"seed": 3, "num_inference_steps": 4, "guidance_scale": 7.5})
    assert len(r.data) == 2 and r.created > 0
    for d in r.data:
        assert base64.b64decode(d.b64_json)[:8] == PNG_MAGIC
    plain = client.images.generate(prompt=PROMPT, response_format="b64_json")  # model defaults only
    assert base64.b64decode(plain.data[0].b64_json)[:8] == PNG_MAGIC
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt=PROMPT, size="65x64", response_format="b64_json")
    assert "size" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(prompt=PROMPT, response_format="url")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).images.generate(prompt=PROMPT)
    assert [m.id for m in client.models.list()] == ["tiny-sd", "copy"]
    picked = client.images.with_raw_response.generate(model="copy", prompt=PROMPT, response_format="b64_json",
                                                      extra_body={"seed": 3, "num_inference_steps": 2})
    assert picked.headers["x-slimsd-model"] == "copy" and picked.headers["x-slimsd-steps"] == "2"
    with pytest.raises(openai.NotFoundError, match="choose one of 'tiny-sd', 'copy'"):
        client.images.generate(model="dall-e-3", prompt=PROMPT)


def _metric(text: str, name: str, labels: str = "") -> float:
    """The sum of ``name``'s samples (over every model) whose labels contain ``labels`` ('k="v",...')."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        base, _, rest = series.partition("{")
        if base == name and all(part in rest for part in filter(None, labels.split(","))):
            total += float(value)
    return total


def test_concurrent_requests_are_batched_on_the_real_server(server):
    import httpx

    def one(i):
        return httpx.post(server["url"] + "/v1/images/generations", headers=auth(), timeout=60,
                          json={"prompt": PROMPT, "seed": i, "num_inference_steps": 3})

    before = httpx.get(server["url"] + "/metrics", headers=auth()).text
    with ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(one, range(4)))
    assert [r.status_code for r in rs] == [200] * 4
    after = httpx.get(server["url"] + "/metrics", headers=auth()).text
    batches = _metric(after, "slimsd_batch_size_count") - _metric(before, "slimsd_batch_size_count")
    images = _metric(after, "slimsd_batch_size_sum") - _metric(before, "slimsd_batch_size_sum")
    assert images == 4 and batches < 4, (batches, images)  # at least one batch held > 1 image


def _chromium() -> str | None:
    for name in (os.environ.get("SLIMSD_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


def test_playground_page_in_headless_chromium(server):
    """Debian's chromium driven by Playwright (no browser download): type, click, see the image."""
    from playwright import sync_api  # dev extra; only the system chromium may be absent
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server["url"] + "/")
            page.fill("#prompt", "a blue square below a red circle")
            page.fill("#steps", "4")
            page.fill("#guidance", "7.5")
            page.fill("#seed", "42")
            page.click("#generate")  # no key typed yet: the server refuses, the page says why
            page.wait_for_selector("#status.error", timeout=30_000)
            assert "API key" in page.text_content("#status")
            page.fill("#apikey", KEY)
            page.click("#generate")
            page.wait_for_selector("#image", timeout=60_000)
            page.wait_for_function("document.getElementById('image').naturalWidth > 0")
            size = page.evaluate("[document.getElementById('image').naturalWidth, "
                                 "document.getElementById('image').naturalHeight]")
            assert size == [64, 64]
            assert "seed 42" in page.text_content("#status") and "tiny-sd, 4 steps" in page.text_content("#status")
            assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["tiny-sd", "copy"]
            # compare view: the same prompt and seed on two models, each image large, with latency and steps
            page.fill("#steps", "")  # each at its own default steps
            page.select_option("#model-a", "tiny-sd")
            page.select_option("#model-b", "copy")
            page.click("#compare")
            page.wait_for_function("document.getElementById('compare-status').textContent === 'done'", timeout=60_000)
            for side, model in (("#compare-a", "tiny-sd"), ("#compare-b", "copy")):
                shown = page.evaluate(f"(() => {{ const i = document.querySelector('{side} img'); const r = "
                                      f"i.getBoundingClientRect(); return [i.naturalWidth, r.width, "
                                      f"getComputedStyle(i).imageRendering]; }})()")
                assert shown[0] == 64 and shown[1] >= 256 and shown[2] == "pixelated", shown
                caption = page.text_content(f"{side} figcaption")
                assert caption.startswith(f"{model} · 25 steps · ") and " ms server" in caption, caption
                assert "seed 42" in caption
            a, b = (page.get_attribute(f"{side} img", "src") for side in ("#compare-a", "#compare-b"))
            assert a == b  # one folder under two ids: the same image
        finally:
            browser.close()


# A launcher for a server whose runner is slow on demand: a batch with a "[hold]" prompt writes
# <dir>/started and blocks until <dir>/release exists; everything else runs the real pipeline.
SLOW_LAUNCHER = '''
import sys, time
from pathlib import Path
from slimsd.serve import pipeline
gate = Path(sys.argv[1])
real = pipeline.Pipeline.generate
def generate(self, prompts, *a, **k):
    if any("[hold]" in p for p in prompts):
        (gate / "started").write_text(" | ".join(prompts))
        t0 = time.monotonic()
        while not (gate / "release").exists() and time.monotonic() - t0 < 120:
            time.sleep(0.02)
    return real(self, prompts, *a, **k)
pipeline.Pipeline.generate = generate
from slimsd.cli import main
sys.exit(main(["serve", *sys.argv[2:]]))
'''


def test_sigterm_drains_then_exits_cleanly(tmp_path):
    """SIGTERM with one request running and one queued: while draining the server still listens and
    answers 503 ``draining`` (ready probe and new work, ``Retry-After: 1``); the queued request gets its
    503 once ``--drain-timeout-s`` has passed; the running one, still running then, is stopped at its
    next step with 503 ``draining`` (an SD-size batch must not hold the process for minutes); then it
    exits."""
    import httpx

    from slimsd.serve.models import ensure_onnx

    cache = Path(os.environ["SLIMSD_CACHE"])  # the session's ONNX cache (conftest)
    ensure_onnx("tiny-sd", TINY_SD_DIR, cache_dir=cache / "onnx")
    (tmp_path / "launch.py").write_text(SLOW_LAUNCHER)
    gate = tmp_path / "gate"
    gate.mkdir()
    port, drain_s = free_port(), 3.0
    log = tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMSD_CACHE": str(cache), "SLIMSD_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "launch.py"), str(gate), "tiny-sd", "--backend", "onnxruntime",
         "--port", str(port), "--max-batch-size", "1", "--max-wait-ms", "0", "--no-warmup",
         "--drain-timeout-s", str(drain_s)],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    gen = url + "/v1/images/generations"
    try:
        _wait_ready(proc, url, log, interval=0.1)
        with ThreadPoolExecutor(2) as ex:
            running = ex.submit(httpx.post, gen, headers=auth(), timeout=60,
                                json={"prompt": "[hold] " + PROMPT, "num_inference_steps": 2, "seed": 1})
            t0 = time.monotonic()
            while not (gate / "started").exists():  # the runner itself says the request is in flight
                assert time.monotonic() - t0 < 30 and not running.done(), running.result().text
                time.sleep(0.02)
            queued = ex.submit(httpx.post, gen, headers=auth(), timeout=60,
                               json={"prompt": PROMPT, "num_inference_steps": 2, "seed": 2})
            t0 = time.monotonic()
            while _metric(httpx.get(url + "/metrics", headers=auth()).text, "slimsd_queue_depth") != 1:
                assert time.monotonic() - t0 < 10, "the second request never queued"
                time.sleep(0.02)

            os.killpg(proc.pid, signal.SIGTERM)
            t_term = time.monotonic()
            t0 = time.monotonic()
            while (ready := httpx.get(url + "/health/ready", timeout=2)).status_code == 200:
                assert time.monotonic() - t0 < 1.0, "still ready 1 s after SIGTERM"
                time.sleep(0.02)
            assert ready.status_code == 503, ready.text
            fresh = httpx.post(gen, headers=auth(), timeout=10, json={"prompt": PROMPT, "num_inference_steps": 2})
            assert fresh.status_code == 503 and fresh.json()["error"]["code"] == "draining", fresh.text
            assert fresh.headers["retry-after"] == "1"
            assert not running.done() and not queued.done()

            q = queued.result(timeout=30)  # not run: the only worker is held past the drain timeout
            waited = time.monotonic() - t_term
            assert q.status_code == 503 and q.json()["error"]["code"] == "draining", q.text
            assert drain_s - 0.5 <= waited < drain_s + 5, waited
            assert not running.done()  # held before its first step: it cannot stop before it gets there
            (gate / "release").touch()
            r = running.result(timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining", r.text
        assert "server shut down at step 1 of 2" in r.json()["error"]["message"], r.text
        # uvicorn re-raises the signal after its graceful shutdown: exit by SIGTERM, as it should be
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log.read_text()
    finally:
        (gate / "release").touch()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_a_model_that_cannot_load_exits_non_zero(tmp_path):
    log = tmp_path / "server.log"
    proc = start(["no-such-model", "--port", str(free_port())], {"SLIMSD_CACHE": str(tmp_path)}, log)
    try:
        assert proc.wait(120) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "no-such-model" in log.read_text()
