"""The 512x512 load test on the SD v2.1-base architecture: SD at 25 steps vs ours at 8 through ``slimsd serve``.

    python benchmarks/loadtest_sd21.py                                   # openvino (bf16 where the CPU has it)
    python benchmarks/loadtest_sd21.py --backend onnxruntime --duration 1800   # fp32: ~10x longer per request

Speed only: ``sd21-base-arch`` has random weights, so both models' images are noise. The two
pipeline folders:

* **baseline**: the preset ``sd21-base-arch`` (SD v2.1-base's exact architecture, 866M U-Net,
  ``AutoencoderKL``), requests at 25 steps;
* **ours**: ``slimsd compress prune sd21-base-arch --blocks <plan>`` with the time-aware plan of
  ``benchmarks/results/prune_front.json`` (``--plan`` picks another of its plans), and its VAE
  replaced by a diffusers ``AutoencoderTiny`` of the shape ``slimsd compress decoder`` distils at SD
  scale (``slimsd.compress.decoder.tiny_vae_config``; random weights), requests at 8 steps.
  Written once into ``--work`` and reused.

Then ``slimsd loadtest compare`` runs each behind its own ``slimsd serve`` (one after the other,
never both at once) at ``--levels`` closed-loop users for ``--duration`` seconds each, same backend,
same threads. The report (``--out``) has the request counts: choose ``--duration`` so that the
baseline completes at least 5 requests at every level (the script warns when it did not).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plan_blocks(front: Path, name: str | None) -> tuple[str, list[str]]:
    """(plan name, removed blocks) from prune_front.json: ``name``, else its chosen time-aware plan."""
    data = json.loads(front.read_text())
    name = name or data.get("chosen")
    if not name or name not in data["plans"]:
        raise SystemExit(f"--plan: {name!r} is not a plan of {front}; choose one of {', '.join(data['plans'])}")
    return name, list(data["plans"][name]["removed_blocks"])


def with_tiny_decoder(src: Path, out: Path) -> Path:
    """``src`` (a pipeline folder) copied to ``out`` with ``vae/`` a random-weight ``AutoencoderTiny``
    of the shape ``slimsd compress decoder`` gives ``src``'s VAE."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from slimsd.compress.decoder import tiny_vae_config
    from slimsd.io import atomic_dir

    vae_cfg = AutoencoderKL.load_config(src / "vae")
    torch.manual_seed(0)
    tiny = AutoencoderTiny(**tiny_vae_config(vae_cfg)).eval()
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("vae", "manifest.json", "eval"))
        tiny.save_pretrained(tmp / "vae", safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["vae"] = ["diffusers", "AutoencoderTiny"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        info_path = tmp / "slimsd.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        info.update({"vae": "AutoencoderTiny", "note": "random weights: speed only (benchmarks/loadtest_sd21.py)"})
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {out}: tiny decoder {sum(p.numel() for p in tiny.decoder.parameters()):,} params")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--front", default=str(ROOT / "benchmarks" / "results" / "prune_front.json"))
    ap.add_argument("--plan", default=None, help="a plan name of --front (default: its chosen time-aware plan)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "loadtest-sd21"), help="where the pruned folders go")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--threads", type=int, default=None, help="serve's threads (default: all cores)")
    ap.add_argument("--levels", default="1")
    ap.add_argument("--duration", type=int, default=300, help="seconds per level and model")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loadtest_sd21"))
    ap.add_argument("--prepare-only", action="store_true", help="write the folders, run nothing")
    a = ap.parse_args()

    name, removed = plan_blocks(Path(a.front), a.plan)
    work = Path(a.work)
    pruned, ours = work / "ours-pruned", work / "ours-tiny-decoder"
    if not (pruned / "model_index.json").is_file():
        log(f"pruning sd21-base-arch with {name!r}: {len(removed)} blocks")
        subprocess.run([sys.executable, "-m", "slimsd.cli", "compress", "prune", "sd21-base-arch",
                        "--blocks", ",".join(removed), "--out", str(pruned)], check=True)
    if not (ours / "model_index.json").is_file():
        with_tiny_decoder(pruned, ours)
    (work / "plan.json").write_text(json.dumps({"plan": name, "removed_blocks": removed}, indent=2) + "\n")
    if a.prepare_only:
        return
    cmd = [sys.executable, "-m", "slimsd.cli", "loadtest", "compare", "--baseline", "sd21-base-arch",
           "--compressed", str(ours), "--baseline-steps", "25", "--compressed-steps", "8", "--size", "512x512",
           "--backend", a.backend, "--levels", a.levels, "--duration", str(a.duration), "--out", a.out,
           "--ready-timeout", "1800"]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True)
    report = json.loads((Path(a.out) / "report.json").read_text())
    (Path(a.out) / "plan.json").write_text(json.dumps({"plan": name, "removed_blocks": removed,
                                                      "command": "python benchmarks/loadtest_sd21.py " +
                                                      " ".join(sys.argv[1:])}, indent=2) + "\n")
    for row in report.get("rows", []):
        if row["requests"] < 5:
            log(f"WARNING: {row['label']} ({row['model']}) at {row['users']} users completed only {row['requests']} "
                "requests (< 5): raise --duration")


if __name__ == "__main__":
    main()
