"""benchmarks/peer_genai.py's report: which rows it compares, and how (no openvino-genai needed)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peer_genai.py"


def _module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("peer_genai_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ratios_compare_same_precision_and_the_pick_with_genais_best(monkeypatch):
    from slimsd.loadtest.machine import machine_info

    mod = _module(monkeypatch)
    m = machine_info(1)
    m["load_average_before"] = [0.1, 0.1, 0.1]
    row = lambda rt, s: {"model": "tiny-sd", "runtime": rt, "steps": 25, "median_s": s, "min_s": s, "pixel_std": 30.0}  # noqa: E731
    r = {"rows": [row("slimsd openvino-f32", 0.200), row("slimsd onnxruntime-fp32", 0.150),
                  row("genai openvino-f32", 0.180), row("genai openvino-bf16", 0.120)],
         "machine": m, "threads": 1, "repeats": 3, "openvino_genai": "x", "wall_s": 60, "command": "c"}
    md = mod.markdown(r)
    lines = {ln.split("|")[2].strip(): ln for ln in md.splitlines() if ln.startswith("| tiny-sd")}
    assert "**0.90x**" in lines["slimsd openvino-f32"]  # vs GenAI f32: 0.180 / 0.200
    assert "**0.80x**" in lines["slimsd onnxruntime-fp32"]  # vs GenAI's fastest row: 0.120 / 0.150
    assert "**" not in lines["genai openvino-bf16"]
