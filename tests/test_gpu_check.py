"""benchmarks/gpu_check.py: its CPU dry run (the same code paths as on a GPU, tiny shapes), time
limits, failures recorded, and the refusal without CUDA; plus a CUDA test it runs on a GPU."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ("tests", "pipeline", "prune", "train", "serve")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _numbers(x, path=""):
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    p = _run("--dry-run", "--out", str(out))
    return p, out


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_finite_numbers(dry_run):
    p, out = dry_run
    assert p.returncode == 0, p.stderr[-4000:]
    d = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert d["dry_run"] is True and "DRY RUN" in md
    assert list(d["parts"]) == list(PARTS)
    for part, r in d["parts"].items():
        assert r["status"] == "passed", (part, r.get("error"), r.get("log_tail"))
        assert r["result"]["checks"] and all(r["result"]["checks"].values()), (part, r["result"]["checks"])
        assert f"| {part} | **passed** |" in md
    bad = [(k, v) for k, v in _numbers(d) if not math.isfinite(v)]
    assert not bad, bad
    m = d["machine"]
    assert m["cpu"] and m["torch"] and "gpu" in m  # the CPU line from slimsd.hardware; no GPU here

    tests = d["parts"]["tests"]["result"]
    assert tests["counts"].get("skipped", 0) >= 1 and not tests["counts"].get("failed")
    assert all("needs a CUDA GPU" in s for s in tests["skipped"])
    assert "tests/test_gpu_check.py" in tests["files"] and "tests/test_export.py" in tests["files"]
    assert "-k 'not tensorrt'" in tests["command"] and "tensorrt package is not installed" in tests["note"]

    train = d["parts"]["train"]["result"]
    assert train["checks"]["stage 1: resumed run continued after the checkpoint"]
    assert train["checks"]["stage 2: checkpoint written"]
    assert train["stage1"]["runs"][0]["interrupted"] and train["stage1"]["runs"][1]["steps"] == [2]
    for st in ("stage1", "stage2"):
        assert train[st]["losses_finite"] and len(train[st]["losses"]) == 2
        assert train[st]["s_per_step_training_json"] > 0

    pipe = d["parts"]["pipeline"]["result"]
    (plan,) = pipe["plans"]
    row = pipe["totals"]["eager"]
    assert row["SD 25 steps ms"] > row[f"{plan}, 8 steps ms"] > row[f"{plan}, 4 steps ms"] > 0
    assert set(pipe["e2e_ms"]) == {"SD", plan}

    serve = d["parts"]["serve"]["result"]
    assert [r["steps"] for r in serve["rows"].values()] == [25, 8, 4]
    assert "onnxruntime-gpu is not installed" in serve["onnxruntime"]["note"]  # CPU onnxruntime here
    assert set(serve["speedup"]) == {"SD 25 / ours 8", "SD 25 / ours 4"}
    assert "## Training at SD size" in md and "## Serving" in md and "SD 25 steps ms" in md


def test_a_failing_part_is_recorded_and_a_slow_one_times_out(tmp_path):
    """train without prune's folder fails; serve gets 1 s, less than its imports take: timed out."""
    p = _run("--dry-run", "--parts", "train,serve", "--limit", "serve=1", "--out", str(tmp_path), timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    d = json.loads((tmp_path / "gpu_check.json").read_text())
    assert d["parts"]["train"]["status"] == "failed"
    assert "no pruned student" in d["parts"]["train"]["error"]
    serve = d["parts"]["serve"]
    assert serve["status"] == "timed out" and serve["limit_s"] == 1 and serve["wall_s"] < 30
    assert "time limit of 1 s" in serve["error"]
    for part in ("tests", "pipeline", "prune"):
        assert d["parts"][part]["status"] == "not run"
    assert "| serve | **timed out** |" in (tmp_path / "gpu_check.md").read_text()


def test_without_cuda_it_exits_2_and_writes_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the script would run")
    out = tmp_path / "results"
    p = _run("--out", str(out), timeout=120)
    assert p.returncode == 2
    assert "needs a CUDA GPU" in p.stderr and "--dry-run" in p.stderr
    assert not out.exists()


def test_bad_limit_names_the_option(tmp_path):
    p = _run("--dry-run", "--limit", "trian=5", "--out", str(tmp_path), timeout=60)
    assert p.returncode != 0 and "--limit" in p.stderr and "trian=5" in p.stderr
    p = _run("--dry-run", "--limit", "train=soon", "--out", str(tmp_path), timeout=60)
    assert p.returncode != 0 and "SECONDS must be a number" in p.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_pipeline_totals_sum_the_components():
    gc = _module()
    times = {"text_encoder": {"eager": {"median_s": 0.01}, "cudagraph": {"median_s": 0.008}},
             "vae_decoder": {"eager": {"median_s": 0.05}, "cudagraph": {"median_s": 0.04}},
             "unet": {"eager": {"median_s": 0.02}, "cudagraph": {"median_s": 0.015}, "compile": {"median_s": 0.012}},
             "unet:p": {"eager": {"median_s": 0.016}, "cudagraph": {"median_s": 0.01},
                        "compile": {"error": "skipped: time budget"}}}
    t = gc.pipeline_totals(times, ["p"])
    assert t["eager"]["SD 25 steps ms"] == pytest.approx(1e3 * (0.01 + 0.05 + 25 * 0.02))
    assert t["eager"]["p, 8 steps ms"] == pytest.approx(1e3 * (0.01 + 0.05 + 8 * 0.016))
    assert t["eager"]["p, 4 steps ms"] == pytest.approx(1e3 * (0.01 + 0.05 + 4 * 0.016))
    assert t["eager"]["p, speedup at 8 steps"] == pytest.approx(0.56 / 0.188)
    assert t["cudagraph"]["p, speedup at 4 steps"] == pytest.approx((0.048 + 25 * 0.015) / (0.048 + 4 * 0.01))
    # compile: U-Nets only, text encoder and VAE from the best of cudagraph / eager; the plan's compile failed
    assert t["compile"] == {"SD 25 steps ms": pytest.approx(1e3 * (0.008 + 0.04 + 25 * 0.012))}


@pytest.mark.gpu
def test_torch_runner_on_cuda_matches_the_cpu():  # pragma: no cover - needs CUDA; run by gpu_check.py
    """The serve pipeline's torch runner in fp32 on CUDA (TF32 off) gives the CPU's images."""
    import numpy as np
    import torch

    from slimsd.serve.pipeline import load_pipeline
    from slimsd.serve.settings import ServeSettings

    prompts, seeds = ["a red circle left of a blue square", "a green triangle above a yellow circle"], [0, 1]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        images = {dev: load_pipeline(ServeSettings(model="tiny-sd", backend="torch", device=dev, dtype="float32",
                                                   warmup=False)).generate(prompts, None, seeds, steps=8)
                  for dev in ("cpu", "cuda")}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert images["cuda"].shape == images["cpu"].shape == (2, 64, 64, 3)
    assert np.abs(images["cuda"].astype(int) - images["cpu"].astype(int)).max() <= 3
