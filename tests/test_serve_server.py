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

pytestmark = pytest.mark.skipif(not (TINY_SD_DIR / "model_index.json").is_file(), reason="tiny-sd weights missing")

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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import httpx

    from slimsd.serve.models import ensure_onnx

    cache = tmp_path_factory.getbasetemp() / "slimsd-cache"
    ensure_onnx("tiny-sd", TINY_SD_DIR, cache_dir=cache / "onnx")  # what `slimsd serve` does on a fresh clone
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # onnxruntime named: `auto` would pick OpenVINO where it is installed and compile for a minute
    proc = start(["tiny-sd", "--backend", "onnxruntime", "--port", str(port), "--max-wait-ms", "300",
                  "--drain-timeout-s", "20"],
                 {"SLIMSD_CACHE": str(cache), "SLIMSD_API_KEY": KEY}, log)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() - t0 < 180, f"not ready after 180 s:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
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
    openai = pytest.importorskip("openai")
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
    assert [m.id for m in client.models.list()] == ["tiny-sd"]


def _metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else "")) and not line.startswith("#"):
            if labels or line.split(" ")[0] == name:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


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
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (dev extra)")
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
            assert "seed 42" in page.text_content("#status")
            assert page.text_content("#model") == "tiny-sd"
        finally:
            browser.close()


def test_sigterm_drains_then_exits_cleanly(server):
    """Runs last in this module: a request in flight at SIGTERM still gets its image."""
    import httpx

    proc = server["proc"]
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(httpx.post, server["url"] + "/v1/images/generations", headers=auth(), timeout=60,
                        json={"prompt": PROMPT, "num_inference_steps": 25})
        time.sleep(0.3)  # the request is in (queued or running)
        os.killpg(proc.pid, signal.SIGTERM)
        r = fut.result()
    assert r.status_code == 200, r.text
    # uvicorn re-raises the signal after its graceful shutdown: exit by SIGTERM, as it should be
    assert proc.wait(30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server["log"].read_text()


def test_a_model_that_cannot_load_exits_non_zero(tmp_path):
    log = tmp_path / "server.log"
    proc = start(["no-such-model", "--port", str(free_port())], {"SLIMSD_CACHE": str(tmp_path)}, log)
    try:
        assert proc.wait(120) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "no-such-model" in log.read_text()
