"""benchmarks/serve_latency.py's readiness wait (shared by its process and thread servers)."""

import importlib.util
import socket
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_latency.py"


def _module():
    spec = importlib.util.spec_from_file_location("serve_latency_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_ready_times_out_on_a_server_that_never_answers():
    mod = _module()
    with pytest.raises(TimeoutError, match="not ready after"):
        mod._wait_ready(f"http://127.0.0.1:{_closed_port()}", 0.3)


def test_wait_ready_stops_when_the_server_process_died():
    mod = _module()

    def died():
        raise RuntimeError("slimsd serve exited with 1")

    with pytest.raises(RuntimeError, match="exited with 1"):
        mod._wait_ready(f"http://127.0.0.1:{_closed_port()}", 30, check=died)


def test_server_timing_header_and_paired_ratios():
    mod = _module()
    t = mod._server_timing("queue;dur=0.2, inference;dur=61.0, encode;dur=0.9, total;dur=62.4")
    assert t == {"queue": 0.0002, "inference": 0.061, "encode": 0.0009, "total": 0.0624}
    # per request: 66/60, 50/50, 88/80 -> ratios 1.1, 1.0, 1.1 -> median 1.1; differences 6, 0, 8 ms -> 6
    p = mod._paired([0.066, 0.050, 0.088], [0.060, 0.050, 0.080])
    assert p == {"median_ratio": 1.1, "median_extra_ms": 6.0}
