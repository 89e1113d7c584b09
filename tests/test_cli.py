"""The console script as users call it: one JSON object on stdout with --json."""

import json
import subprocess
import sys

import torch


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "slimsd.cli", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


# runs the console entry point and reports the process's own peak resident memory on stderr
PEAK_RSS = """
import resource, runpy, sys
sys.argv = ["slimsd", *sys.argv[1:]]
try:
    runpy.run_module("slimsd.cli", run_name="__main__")
finally:
    print(f"maxrss_kb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def test_info_json_counts_sd21_without_materialising(tmp_path):
    """1.29 B fp32 parameters are 5.2 GB once materialised; counting them must stay far below
    that (peak RSS of the process) and write no sd21-base-arch folder to the cache."""
    import os

    cache = tmp_path / "cache"
    p = subprocess.run([sys.executable, "-c", PEAK_RSS, "info", "sd21-base-arch", "--json"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "SLIMSD_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert r["params"] == {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}
    peak_gb = int(p.stderr.rsplit("maxrss_kb ", 1)[1].split()[0]) / 1e6
    assert peak_gb < 2.0, f"peak RSS {peak_gb:.1f} GB: the weights were materialised"
    assert not (cache / "sd21-base-arch").exists()


def _resnet_macs(m, batch: int, h: int, w: int) -> int:
    """Multiply-adds of a diffusers ResnetBlock2D by hand: two 3x3 convs, the 1x1 shortcut when
    the width changes, the time-embedding projection (norms and activations are not MACs)."""
    cin, cout = m.conv1.in_channels, m.conv1.out_channels
    per_pixel = 9 * cin * cout + 9 * cout * cout + (cin * cout if m.conv_shortcut is not None else 0)
    return batch * h * w * per_pixel + batch * m.time_emb_proj.in_features * cout


def test_info_blocks_reports_macs_and_per_block_latency(monkeypatch, capsys):
    """`slimsd info tiny-sd --blocks --json`: MACs of two resnet blocks equal the hand count; a block
    made 250 ms slower shows it (per U-Net forward, in ms) in its own row, not spread over the others."""
    import time

    import slimsd.models as M
    from slimsd.cli import main

    real_load = M.load_pipeline
    slow = "down.1.res.1"
    unets = []

    def load(spec, *a, **kw):
        pipe = real_load(spec, *a, **kw)
        block = pipe.unet.get_submodule("down_blocks.1.resnets.1")
        inner = block.forward

        def forward(*args, **kwargs):
            time.sleep(0.25)
            return inner(*args, **kwargs)

        block.forward = forward
        unets.append(pipe.unet)
        return pipe

    monkeypatch.setattr(M, "load_pipeline", load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny blocks: a second thread only waits on a busy machine
    try:
        assert main(["info", "tiny-sd", "--blocks", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = {b["name"]: b for b in json.loads(capsys.readouterr().out)["blocks"]}
    unet = unets[0]
    # batch 2 (one image with CFG) at the 8x8 latent; up.3 is back at 8x8 and widens 96 -> 32 (shortcut)
    assert rows["down.0.res.0"]["macs"] == _resnet_macs(unet.get_submodule("down_blocks.0.resnets.0"), 2, 8, 8)
    assert rows["up.3.res.0"]["macs"] == _resnet_macs(unet.get_submodule("up_blocks.3.resnets.0"), 2, 8, 8)
    assert unet.get_submodule("up_blocks.3.resnets.0").conv_shortcut is not None
    assert all(b["latency_ms"] is not None and b["latency_ms"] > 0 for b in rows.values())
    assert 250 <= rows[slow]["latency_ms"] < 2500, rows[slow]  # milliseconds per forward, not s or us
    others = sorted(b["latency_ms"] for n, b in rows.items() if n != slow)
    assert others[len(others) // 2] < 125, others  # the median block is not slowed (a loaded machine may spike one)


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
