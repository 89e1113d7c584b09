"""Single-request latency of the served pipeline against the same pipeline called directly, per model and backend.

    python benchmarks/serve_latency.py                        # tiny-sd @ its defaults (25 steps), + tiny-sd-slim if built
    python benchmarks/serve_latency.py --models tiny-sd-slim --backends onnxruntime --threads 1 --repeats 30 \\
        --json benchmarks/results/serve_latency_threads1.json

For each (model, backend), one image at the model's default steps and guidance (CFG on: batch 2
through the U-Net), 1 user:

* ``pipeline`` = one ``Pipeline.generate`` call in this process;
* ``http`` = one ``POST /v1/images/generations`` to a real ``slimsd serve`` on loopback through an
  ``httpx`` keep-alive client: JSON, validation, the engine's queue and worker thread, PNG +
  base64, the socket. ``--server process`` (default) runs it as its own process, as it is
  deployed (a client is never inside the server); ``--server thread`` runs the app under uvicorn
  in a thread of this process, where the client's and the server's Python share one GIL;
* ``http_stdlib`` = the same request through Python's ``http.client`` (keep-alive): the share of
  ``http`` that is httpx's own client-side work;
* ``server`` = the ``total`` of the response's ``Server-Timing`` header (arrival at the route to the
  serialized response body, PNG included; the socket and uvicorn not), ``inference`` its backend time.

``--cpus 0`` pins this process and the server it starts to the same core(s). On a virtual machine
whose cores run at different speeds (another tenant on a sibling hyperthread) an unpinned client
and server can land on different cores, and then ``http / pipeline`` compares two cores rather
than HTTP with no HTTP: pin on such machines, and the record says so.

Calls are interleaved (pipeline, http, http_stdlib, then the next round in a rotated order) so
that load from other processes and cold caches hit all alike; median and p90 over ``--repeats``
rounds after 3 warm-up rounds. ``http / pipeline`` (p50 over p50) is the issue's measure of the
serving overhead (target: within 1.05x). ``paired_http_over_inference`` is the median over requests
of the round trip over the inference the server timed for *that* request: the same process and
cache state, so the machine's speed changes cancel (on a VM whose speed jumps between runs, the
p50 ratio of two separately timed calls moves by more than the 5% it is meant to resolve). The load
average before and after is recorded: on a shared machine other processes inflate every number.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_ms": round(1000 * statistics.median(xs), 1),
            "p90_ms": round(1000 * xs[min(len(xs) - 1, int(0.9 * len(xs)))], 1),
            "min_ms": round(1000 * xs[0], 1)}


def _server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: queue;dur=0.2, inference;dur=61.0, ...`` -> seconds by name."""
    return {k.strip(): float(v) / 1000 for k, v in (p.split(";dur=") for p in header.split(","))}


def _paired(a: list[float], b: list[float]) -> dict:
    """Median of the per-request ratios a_i / b_i and of the differences, in ms."""
    return {"median_ratio": round(statistics.median(x / y for x, y in zip(a, b)), 3),
            "median_extra_ms": round(1000 * statistics.median(x - y for x, y in zip(a, b)), 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout_s: float, check=lambda: None, poll_s: float = 0.02) -> None:
    """Poll ``/health/ready`` until 200; ``check()`` raises when the server can no longer come up."""
    import httpx

    t0 = time.monotonic()
    while True:
        check()
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"server at {url} not ready after {timeout_s:.0f} s")
        time.sleep(poll_s)


class ProcessServer:
    """``slimsd serve MODEL`` as a subprocess on a free loopback port (its own process group)."""

    def __init__(self, settings):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = settings.model
        self.args = [sys.executable, "-m", "slimsd.cli", "serve", settings.model, "--backend", settings.backend,
                     "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        if settings.threads:
            self.args += ["--threads", str(settings.threads)]

    def __enter__(self):
        self.proc = subprocess.Popen(self.args, start_new_session=True, stdout=subprocess.DEVNULL)

        def exited():
            if self.proc.poll() is not None:
                raise RuntimeError(f"slimsd serve exited with {self.proc.returncode}: {' '.join(self.args)}")

        _wait_ready(self.url, 300, check=exited)
        return self

    def mean_batch_images(self) -> float | None:
        """From the server's own Prometheus histogram ``slimsd_batch_size``."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        vals = {}
        for fam in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=5).text):
            for smp in fam.samples:
                if smp.name in ("slimsd_batch_size_sum", "slimsd_batch_size_count"):
                    vals[smp.name] = vals.get(smp.name, 0) + smp.value
        n = vals.get("slimsd_batch_size_count", 0)
        return round(vals.get("slimsd_batch_size_sum", 0) / n, 2) if n else None

    def __exit__(self, *exc):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class LoopbackServer:
    """``create_app`` under uvicorn on 127.0.0.1 in a daemon thread."""

    def __init__(self, app, model: str = ""):
        import uvicorn

        self.model = model
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        _wait_ready(self.url, 120)
        return self

    def mean_batch_images(self) -> float | None:
        app = self.server.config.app
        m = app.state.metrics if hasattr(app, "state") else None
        if m is None:
            return None
        labels = {"model": self.model}
        n = m.registry.get_sample_value("slimsd_batch_size_count", labels) or 0
        return round((m.registry.get_sample_value("slimsd_batch_size_sum", labels) or 0) / max(n, 1), 2)

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def _server(mode: str, settings, pipe):
    if mode == "process":
        return ProcessServer(settings)
    from slimsd.serve.app import create_app

    return LoopbackServer(create_app(settings, load=lambda: pipe), pipe.name)


def measure(model: str, backend: str, repeats: int, threads: int | None, users: int = 1,
            seconds: float = 10.0, mode: str = "process", rounds: int = 2) -> dict:
    import httpx

    from slimsd.serve.pipeline import load_served_pipeline
    from slimsd.serve.settings import ServeSettings

    settings = ServeSettings(model=model, backend=backend, threads=threads, warmup=False)
    pipe = load_served_pipeline(settings)
    steps, guidance = pipe.defaults.steps, pipe.defaults.guidance
    prompt = "a red circle left of a blue square"
    times = {k: [] for k in ("pipeline", "http", "http_stdlib", "server", "inference", "inference_stdlib")}
    with _server(mode, settings, pipe) as srv, httpx.Client(base_url=srv.url, timeout=600) as c:
        raw = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=600)

        def direct(seed: int) -> dict:
            pipe.generate([prompt], None, [seed])
            return {}

        def via_httpx(seed: int) -> dict:
            r = c.post("/v1/images/generations", json={"prompt": prompt, "seed": seed})
            assert r.status_code == 200, r.text
            return _server_timing(r.headers["server-timing"])

        def via_stdlib(seed: int) -> dict:
            raw.request("POST", "/v1/images/generations", json.dumps({"prompt": prompt, "seed": seed}),
                        {"Content-Type": "application/json"})
            rr = raw.getresponse()
            data = rr.read()
            assert rr.status == 200, data[:500]
            return _server_timing(rr.getheader("server-timing"))

        calls = [("pipeline", direct), ("http", via_httpx), ("http_stdlib", via_stdlib)]
        for i in range(-3, repeats):
            seed = max(i, 0)
            # rotate the order every round: a call right after the other process's run finds its caches
            # cold (on a small machine the two processes' weights evict each other), so no method may
            # always be the one that follows the pipeline
            for name, fn in calls[i % 3:] + calls[:i % 3]:
                t0 = time.perf_counter()
                timing = fn(seed)
                dt = time.perf_counter() - t0
                if i < 0:
                    continue  # warm-up
                times[name].append(dt)
                if name == "http":
                    times["server"].append(timing["total"])
                    times["inference"].append(timing["inference"])
                elif name == "http_stdlib":
                    times["inference_stdlib"].append(timing["inference"])
        raw.close()
    out = {"model": model, "backend": backend, "steps": steps, "guidance": guidance, "image": list(pipe.image_size),
           **{k: _stats(v) for k, v in times.items()}}
    out["http_over_pipeline_p50"] = round(out["http"]["median_ms"] / out["pipeline"]["median_ms"], 3)
    out["http_stdlib_over_pipeline_p50"] = round(out["http_stdlib"]["median_ms"] / out["pipeline"]["median_ms"], 3)
    # paired, per request: the HTTP round trip over the inference the server timed for that same request
    # (same process, same cache state: the serving overhead alone, robust to the machine's speed changes)
    out["paired_http_over_inference"] = _paired(times["http"], times["inference"])
    out["paired_http_stdlib_over_inference"] = _paired(times["http_stdlib"], times["inference_stdlib"])
    if users > 1:
        out["throughput"] = throughput(pipe, settings, users, seconds, prompt, mode, rounds)
    return out


def throughput(pipe, settings, users: int, seconds: float, prompt: str, mode: str = "process", rounds: int = 2) -> dict:
    """Images/s of ``users`` closed-loop clients through the server vs the pipeline called with batches of
    ``users`` images back to back (what perfect batching would reach); each for ``seconds``, ``rounds``
    times, alternating and rotating (pipeline, http; http, pipeline; ...) so that outside load hits
    both alike. ``median_round_ratio`` is the median over rounds of http / pipeline within the round:
    on a VM whose speed jumps between runs (25% here) a ratio of means over few runs drifts with it."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def pipeline_run() -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pipe.generate([prompt] * users, None, list(range(n, n + users)))
            n += users
        return n / (time.perf_counter() - t0)

    def http_run(url: str) -> float:
        stop = time.perf_counter() + seconds

        def client(k: int) -> int:
            done = 0
            with httpx.Client(base_url=url, timeout=600) as c:
                while time.perf_counter() < stop:
                    r = c.post("/v1/images/generations", json={"prompt": prompt, "seed": k * 100000 + done})
                    assert r.status_code == 200, r.text
                    done += 1
            return done

        t0 = time.perf_counter()
        with ThreadPoolExecutor(users) as ex:
            n = sum(ex.map(client, range(users)))
        return n / (time.perf_counter() - t0)

    runs = {"pipeline": [], "http": []}
    with _server(mode, settings, pipe) as srv:
        http_run(srv.url)  # warm the batch shapes
        for k in range(rounds):
            for side in (("pipeline", "http") if k % 2 == 0 else ("http", "pipeline")):
                runs[side].append(pipeline_run() if side == "pipeline" else http_run(srv.url))
        mean_batch = srv.mean_batch_images()
    ratios = [h / p for h, p in zip(runs["http"], runs["pipeline"])]
    out = {"users": users, "seconds_each": seconds, "rounds": rounds,
           "pipeline_images_per_s": round(statistics.mean(runs["pipeline"]), 3),
           "http_images_per_s": round(statistics.mean(runs["http"]), 3), "runs": runs, "mean_batch_images": mean_batch,
           "round_ratios": [round(r, 3) for r in ratios], "median_round_ratio": round(statistics.median(ratios), 3)}
    out["http_over_pipeline"] = round(out["http_images_per_s"] / out["pipeline_images_per_s"], 3)
    return out


def main() -> None:
    from slimsd.serve.models import STUDENT, TEACHER

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help=f"comma list (default {TEACHER}, plus {STUDENT} if it resolves)")
    ap.add_argument("--backends", default="onnxruntime,torch")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--users", type=int, default=4, help="throughput: closed-loop clients vs pipeline batches of "
                    "this many images (1: skip)")
    ap.add_argument("--seconds", type=float, default=10.0, help="throughput: seconds per run")
    ap.add_argument("--rounds", type=int, default=4, help="throughput: alternating (pipeline, http) rounds")
    ap.add_argument("--server", choices=("process", "thread"), default="process",
                    help="slimsd serve as its own process (as deployed) or uvicorn in a thread of this one")
    ap.add_argument("--cpus", default=None, help="comma list of CPU ids to pin this process and its server to "
                    "(e.g. 0: client, server and pipeline on one core; see the module docstring)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})  # inherited by the server subprocess
    if a.models:
        models = a.models.split(",")
    else:
        from slimsd.serve.models import default_model

        models = [TEACHER] + ([STUDENT] if default_model() == STUDENT else [])
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    rows = []
    for model in models:
        for backend in a.backends.split(","):
            r = measure(model, backend, a.repeats, a.threads, a.users, a.seconds, a.server, a.rounds)
            rows.append(r)
            print(f"{model:<14} {backend:<12} {r['steps']:>3} steps  pipeline {r['pipeline']['median_ms']:>8.1f} ms "
                  f"(p90 {r['pipeline']['p90_ms']:.1f})  http {r['http']['median_ms']:>8.1f} ms "
                  f"(p90 {r['http']['p90_ms']:.1f})  server {r['server']['median_ms']:.1f}  "
                  f"inference {r['inference']['median_ms']:.1f}  http/pipeline {r['http_over_pipeline_p50']:.3f}  "
                  f"(http.client {r['http_stdlib']['median_ms']:.1f} ms, {r['http_stdlib_over_pipeline_p50']:.3f}); "
                  f"paired http/inference {r['paired_http_over_inference']}, http.client/inference "
                  f"{r['paired_http_stdlib_over_inference']}",
                  flush=True)
            if "throughput" in r:
                t = r["throughput"]
                print(f"{'':<27} {t['users']} users: pipeline batches {t['pipeline_images_per_s']:.2f} images/s, "
                      f"http {t['http_images_per_s']:.2f} images/s ({t['http_over_pipeline']:.3f}x; median of the rounds' "
                      f"ratios {t['median_round_ratio']:.3f}x, {t['round_ratios']}), mean batch "
                      f"{t.get('mean_batch_images')} images", flush=True)
    import onnxruntime
    import torch

    from slimsd.loadtest.machine import describe, machine_info

    mach = machine_info(a.threads)
    env = {"cpu": mach["cpu"], "simd_flags": mach["simd_flags"], "machine": describe(mach),
           "pinned_cpus": sorted(os.sched_getaffinity(0)) if a.cpus else None, "cores": os.cpu_count(),
           "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "repeats": a.repeats,
           "threads": a.threads, "wall_s": round(time.monotonic() - t0, 1), "http": ("slimsd serve subprocess" if a.server == "process" else "uvicorn in a thread of the client's process")
           + " on loopback, httpx keep-alive", "server": a.server}
    print(f"load average before {env['load_average_before']}, after {env['load_average_after']} on {env['cores']} cores")
    if a.json:
        from slimsd.io import atomic_write_text

        atomic_write_text(a.json, json.dumps({"environment": env, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
