"""Single-request latency of the served pipeline: ONNX Runtime vs torch, per model.

    python benchmarks/serve_latency.py                        # tiny-sd @ its defaults (25 steps), + tiny-sd-slim if built
    python benchmarks/serve_latency.py --models tiny-sd --repeats 20 --json benchmarks/serve_latency.json

For each (model, backend): ``pipeline`` = one ``Pipeline.generate`` call (1 image, the model's
default steps and guidance, CFG on: batch 2 through the U-Net); ``http`` = one
``POST /v1/images/generations`` through the whole app in-process (validation, queue, worker
thread, PNG + base64), ``max_wait_ms=0`` so batching adds no wait. Median and p90 over
``--repeats`` runs after 2 warm-up runs. The load average is printed: on a shared machine
other processes inflate every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_ms": round(1000 * statistics.median(xs), 1),
            "p90_ms": round(1000 * xs[min(len(xs) - 1, int(0.9 * len(xs)))], 1),
            "min_ms": round(1000 * xs[0], 1)}


def measure(model: str, backend: str, repeats: int, threads: int | None) -> dict:
    from fastapi.testclient import TestClient

    from slimsd.serve.app import create_app
    from slimsd.serve.pipeline import load_pipeline
    from slimsd.serve.settings import ServeSettings

    settings = ServeSettings(model=model, backend=backend, threads=threads, max_wait_ms=0, warmup=False)
    pipe = load_pipeline(settings)
    steps, guidance = pipe.defaults.steps, pipe.defaults.guidance
    prompt = ["a red circle left of a blue square"]
    for _ in range(2):
        pipe.generate(prompt, None, [0])
    direct = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pipe.generate(prompt, None, [i])
        direct.append(time.perf_counter() - t0)
    http = []
    with TestClient(create_app(settings, load=lambda: pipe)) as c:
        while c.get("/health/ready").status_code != 200:
            time.sleep(0.01)
        body = {"prompt": prompt[0], "seed": 0}
        for _ in range(2):
            c.post("/v1/images/generations", json=body)
        for i in range(repeats):
            t0 = time.perf_counter()
            r = c.post("/v1/images/generations", json={**body, "seed": i})
            http.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return {"model": model, "backend": backend, "steps": steps, "guidance": guidance,
            "image": list(pipe.image_size), "pipeline": _stats(direct), "http": _stats(http)}


def main() -> None:
    from slimsd.serve.models import STUDENT, TEACHER

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help=f"comma list (default {TEACHER}, plus {STUDENT} if it resolves)")
    ap.add_argument("--backends", default="onnxruntime,torch")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    if a.models:
        models = a.models.split(",")
    else:
        from slimsd.serve.models import default_model

        models = [TEACHER] + ([STUDENT] if default_model() == STUDENT else [])
    rows = []
    for model in models:
        for backend in a.backends.split(","):
            r = measure(model, backend, a.repeats, a.threads)
            rows.append(r)
            print(f"{model:<14} {backend:<12} {r['steps']:>3} steps  pipeline {r['pipeline']['median_ms']:>8.1f} ms "
                  f"(p90 {r['pipeline']['p90_ms']:.1f})  http {r['http']['median_ms']:>8.1f} ms "
                  f"(p90 {r['http']['p90_ms']:.1f})", flush=True)
    import onnxruntime
    import torch

    env = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "load_average_after": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
           "onnxruntime": onnxruntime.__version__, "repeats": a.repeats, "threads": a.threads}
    print(f"load average after: {env['load_average_after']} on {env['cores']} cores")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
