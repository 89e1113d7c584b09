"""The console script as users call it: one JSON object on stdout with --json."""

import json
import subprocess
import sys

import pytest


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "slimsd.cli", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def test_info_json_counts_sd21_without_materialising():
    r = json.loads(run("info", "sd21-base-arch", "--json").stdout)
    assert r["params"] == {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}


def test_info_tiny_sd_reads_the_committed_folder():
    r = json.loads(run("info", "tiny-sd", "--json").stdout)
    assert 1e6 < r["params"]["unet"] < 5e6


def test_evaluate_json_prints_one_object_with_fd_and_alignment(tmp_path):
    p = run("evaluate", "tiny-sd", "--steps", "4", "--num-prompts", "16", "--out", str(tmp_path), "--json")
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert {"fd", "alignment"} <= r.keys() and 0.0 <= r["alignment"] <= 1.0 and r["fd"] >= 0
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 16


def test_unknown_model_is_a_clear_error():
    p = run("evaluate", "no-such-model", "--num-prompts", "2", check=False)
    assert p.returncode != 0 and "no-such-model" in p.stderr
