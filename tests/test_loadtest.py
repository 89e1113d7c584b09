"""Load tests: the report maths from locust CSVs, the bounds, and ``slimsd loadtest compare --short`` end to end."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimsd.loadtest.report import (level_from_locust, percentile, read_locust_stats, speedups, summarize_latencies,
                                    write_report)

# the header locust 2.x writes with --csv (StatsCSV.requests_csv_columns, default percentiles)
HEADER = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
          "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s",
          "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]


def _require_locust():
    """locust is a dev dependency; only *look* for it. Importing it here would run gevent's
    monkey-patching inside pytest, which deadlocks on the import lock once other tests have
    started threads (seen in CI: the suite hung at this test)."""
    import importlib.util

    assert importlib.util.find_spec("locust") is not None, "locust is missing: pip install -e '.[dev]'"



def write_stats(path: Path, requests: int, failures: int, rps: float, p50, p95, p99, mean=1000.0) -> Path:
    row = ["", "Aggregated", requests, failures, p50, mean, 10, p99, 8000, rps, rps * failures / max(requests, 1),
           p50, p50, p50, p95, p95, p95, p99, p99, p99, p99, p99]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerow(["POST", "/v1/images/generations"] + row[2:])
        w.writerow(row)
    return path


def test_level_from_a_locust_csv(tmp_path):
    row = read_locust_stats(write_stats(tmp_path / "a_stats.csv", 40, 0, 2.5, 1500, 2100, 2400))
    lv = level_from_locust(row)
    assert lv == {"requests": 40, "failures": 0, "mean_ms": 1000.0, "rps": 2.5, "images_per_s": 2.5,
                  "p50_ms": 1500.0, "p95_ms": 2100.0, "p99_ms": 2400.0}
    # failures do not count as images; n images per request do
    lv = level_from_locust(read_locust_stats(write_stats(tmp_path / "b_stats.csv", 40, 10, 2.0, 1, 2, 3)), 2)
    assert lv["images_per_s"] == pytest.approx(2.0 * 30 / 40 * 2)
    # a run without requests: locust writes N/A percentiles
    lv = level_from_locust(read_locust_stats(write_stats(tmp_path / "c_stats.csv", 0, 0, 0.0, "N/A", "N/A", "N/A")))
    assert lv["images_per_s"] == 0 and math.isnan(lv["p50_ms"])
    with pytest.raises(ValueError, match="no row named 'nope'"):
        read_locust_stats(write_stats(tmp_path / "d_stats.csv", 1, 0, 1, 1, 1, 1), name="nope")


def test_speedups_are_baseline_over_compressed_latency_and_compressed_over_baseline_throughput():
    rows = [{"label": "baseline", "users": 1, "p50_ms": 1200.0, "p95_ms": 1500.0, "p99_ms": 1800.0, "images_per_s": 0.8},
            {"label": "compressed", "users": 1, "p50_ms": 400.0, "p95_ms": 600.0, "p99_ms": 900.0, "images_per_s": 2.4},
            {"label": "baseline", "users": 4, "p50_ms": 4000.0, "p95_ms": 5000.0, "p99_ms": 6000.0, "images_per_s": 1.0},
            {"label": "compressed", "users": 4, "p50_ms": 1000.0, "p95_ms": 2000.0, "p99_ms": 2000.0, "images_per_s": 3.5},
            {"label": "baseline", "users": 16, "p50_ms": 9.0, "p95_ms": 9.0, "p99_ms": 9.0, "images_per_s": 1.0}]
    s = speedups(rows)
    assert [x["users"] for x in s] == [1, 4]  # 16 has no compressed row
    assert s[0] == pytest.approx({"users": 1, "p50_speedup": 3.0, "p95_speedup": 2.5, "p99_speedup": 2.0,
                                  "throughput_speedup": 3.0})
    assert s[1]["p50_speedup"] == 4.0 and s[1]["throughput_speedup"] == pytest.approx(3.5)


def test_exact_percentiles_match_numpy():
    import numpy as np

    xs = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    for q in (0, 50, 95, 99, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    s = summarize_latencies([100.0, 200.0, 300.0, 400.0], failures=1, images_per_request=2, t_start=10.0, t_last=12.0)
    assert s["requests"] == 5 and s["rps"] == 2.5 and s["images_per_s"] == 4.0 and s["p50_ms"] == 250.0
    assert math.isnan(summarize_latencies([], 0, 1, None, None)["p50_ms"])


def _result(rows):
    return {"backend": "onnxruntime", "threads": 1, "levels": [1, 4], "duration_s": 20, "guidance": 7.5, "size": None,
            "images_per_request": 1, "rows": rows, "machine_line": "test machine", "command": "slimsd loadtest compare",
            "wall_s": 1.0, "notes": ["a note"],
            "models": {"baseline": {"model": "tiny-sd", "steps": 25, "what": "the teacher"},
                       "compressed": {"model": "tiny-sd-slim", "steps": 8, "what": "student"}}}


def test_write_report_from_rows(tmp_path):
    rows = []
    for label, model, steps, f in (("baseline", "tiny-sd", 25, 1.0), ("compressed", "tiny-sd-slim", 8, 3.0)):
        for users in (1, 4):
            rows.append({"label": label, "model": model, "steps": steps, "users": users, "duration_s": 20,
                         "requests": 10, "failures": 0, "p50_ms": 1000 * users / f, "p95_ms": 1200 * users / f,
                         "p99_ms": 1300 * users / f, "mean_ms": 1000 * users / f, "rps": f, "images_per_s": f})
    files = write_report(tmp_path, _result(rows))
    md = Path(files["md"]).read_text()
    assert "| 1 | 3.00x | 3.00x | 3.00x | 3.00x |" in md and "a note" in md
    with open(files["csv"]) as f:
        got = list(csv.DictReader(f))
    assert len(got) == 4 and {r["label"] for r in got} == {"baseline", "compressed"}
    assert Path(files["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(files["json"]).read_text())["speedups"][1]["throughput_speedup"] == 3.0


def test_bounds():
    from slimsd.loadtest.compare import MAX_LEVELS, MAX_USERS, CompareConfig

    assert CompareConfig(short=True).levels == (1, 2) and CompareConfig(short=True).duration_s == 5
    with pytest.raises(ValueError, match="levels"):
        CompareConfig(levels=tuple(range(1, MAX_LEVELS + 2)))
    with pytest.raises(ValueError, match="users"):
        CompareConfig(levels=(MAX_USERS + 1,))
    with pytest.raises(ValueError, match="duration"):
        CompareConfig(duration_s=100_000)
    with pytest.raises(ValueError, match="backend"):
        CompareConfig(backend="tflite")  # not a serve backend (triton is one now)


def test_locustfile_checks_responses():
    from slimsd.loadtest.report import check_response  # what the locustfile counts as a failure

    ok = json.dumps({"created": 1, "data": [{"b64_json": "iVBOR", "seed": 0}]})
    assert check_response(200, ok, 1) is None
    assert check_response(200, ok, 2) == "HTTP 200 without 2 b64_json image(s)"
    assert check_response(429, json.dumps({"error": {"code": "queue_full", "type": "rate_limit_error"}}), 1) == \
        "HTTP 429: queue_full"
    assert check_response(502, "<html>bad gateway</html>", 1) == "HTTP 502: body is not JSON"


def test_a_server_that_cannot_start_is_reported_and_gone(tmp_path):
    """A server that exits while loading stops the run with the server's own log in the error."""
    from slimsd.loadtest.compare import CompareConfig, Server

    cfg = CompareConfig(out=tmp_path, backend="torch", ready_timeout_s=120)
    server = Server(str(tmp_path / "no-such-model"), cfg, tmp_path / "server.log", log=lambda m: None)
    with pytest.raises(RuntimeError, match="exited with 1 before it was ready") as e:
        server.__enter__()
    assert "no-such-model" in (tmp_path / "server.log").read_text()
    assert (tmp_path / "server.log").read_text()[-200:].strip() in str(e.value)  # the log's tail is in the error


# a "server" that never becomes ready, ignores SIGTERM and has a child in its process group
HUNG_SERVER = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("pids", os.getpid(), child.pid, flush=True)
time.sleep(600)
"""


def test_a_live_server_that_never_gets_ready_is_killed_on_timeout(tmp_path, monkeypatch):
    import signal

    import slimsd.loadtest.compare as C

    monkeypatch.setattr(C, "slimsd_command", lambda: [sys.executable, "-c", HUNG_SERVER])
    cfg = C.CompareConfig(out=tmp_path, backend="torch", ready_timeout_s=2, stop_grace_s=1)
    logged = []
    server = C.Server("tiny-sd", cfg, tmp_path / "server.log", log=logged.append)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="not ready after 2 s"):
        server.__enter__()
    assert time.monotonic() - t0 < 15
    assert server.proc.returncode == -signal.SIGKILL  # SIGTERM was ignored: escalated to SIGKILL
    assert any("SIGKILL" in m for m in logged), logged
    pids = [int(x) for x in (tmp_path / "server.log").read_text().split("pids", 1)[1].split()[:2]]
    t0 = time.monotonic()
    while Path(f"/proc/{pids[1]}").exists() and "zombie" not in _proc_state(pids[1]):
        assert time.monotonic() - t0 < 5, "the server's child survived"  # its whole group is gone
        time.sleep(0.05)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def _slimsd() -> list[str]:
    exe = Path(sys.executable).with_name("slimsd")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "slimsd.cli"]


def _check_report(out: Path, r: dict) -> None:
    files = r["files"]
    for k in ("md", "csv", "png", "json"):
        assert Path(files[k]).is_file() and Path(files[k]).stat().st_size > 0, k
    assert Path(files["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert sorted((x["label"], int(x["users"])) for x in rows) == [
        ("baseline", 1), ("baseline", 2), ("compressed", 1), ("compressed", 2)]
    for x in rows:
        assert int(x["requests"]) > 0 and int(x["failures"]) == 0, x
        for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "rps", "images_per_s"):
            assert float(x[k]) > 0, (k, x)
    assert {int(x["steps"]) for x in rows if x["label"] == "baseline"} == {25}
    assert {int(x["steps"]) for x in rows if x["label"] == "compressed"} == {8}
    assert [s["users"] for s in r["speedups"]] == [1, 2]
    for s in r["speedups"]:
        # 25 vs 8 steps of a pruned U-Net: ~3x; a wide margin for a loaded machine and 5 s windows
        assert s["throughput_speedup"] > 1.3 and s["p50_speedup"] > 1.3, s
    md = Path(files["md"]).read_text()
    assert "Speedup of the compressed model" in md and "pruned" in md
    assert not list(out.glob("*.tmp"))


def test_compare_short_end_to_end(tmp_path):
    """``slimsd loadtest compare --short``: both servers, locust at 1 and 2 users, the report.

    The torch backend needs no ONNX export, so a fresh cache costs only the pruning (the
    default onnxruntime path is the ``slow`` test below).
    """
    _require_locust()
    out = tmp_path / "lt"
    t0 = time.monotonic()
    p = subprocess.run(_slimsd() + ["loadtest", "compare", "--short", "--backend", "torch", "--threads", "1",
                                    "--one-server", "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(Path(json.loads(p.stdout)["files"]["json"]).read_text())
    _check_report(out, r)
    # --one-server: one `slimsd serve baseline=... compressed=...`; each role's requests reached its own model
    assert r["one_server"] and (out / "server.log").is_file() and not (out / "server-baseline.log").exists()
    for role, other in (("baseline", "compressed"), ("compressed", "baseline")):
        served = r["models"][role]["images_served"]
        assert served[role] > 0 and served[other] == 0, (role, served)
        assert r["models"][role]["card"]["id"] == role
    print(f"compare --short --one-server (torch): {time.monotonic() - t0:.0f} s")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SLIMSD_SLOW_TESTS") != "1", reason="opt-in: SLIMSD_SLOW_TESTS=1 (~100 s)")
def test_compare_short_default_backend(tmp_path):
    """The default backend (onnxruntime): both models exported on first start (~100 s on 2 cores)."""
    _require_locust()
    out = tmp_path / "lt"
    p = subprocess.run(_slimsd() + ["loadtest", "compare", "--short", "--threads", "1", "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(Path(json.loads(p.stdout)["files"]["json"]).read_text())
    _check_report(out, r)
