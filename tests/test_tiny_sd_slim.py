"""The committed compressed student `tiny-sd-slim` (issue 4): intact, smaller, 8 steps by default,
and its manifest's 8-step row is what `slimsd evaluate tiny-sd-slim --steps 8` gives."""

import json
from pathlib import Path

import pytest

from slimsd.manifest import verify_manifest
from slimsd.models import TINY_SD_DIR, TINY_SD_SLIM_DIR, resolve_model

def _unet_params(folder) -> int:
    from slimsd.models import stored_params

    return stored_params(folder, "unet")


def test_manifest_records_the_build_and_matches_files():
    """What the manifest says, checked against the committed files and code, not only read back."""
    from accelerate import init_empty_weights

    from slimsd.compress.build import load_build_config
    from slimsd.defaults import generation_defaults
    from slimsd.models import count_params
    from slimsd.unet_blocks import PrunedUNet2DConditionModel

    m = verify_manifest(TINY_SD_SLIM_DIR)  # sha256 of every weight / config file
    assert m["default_steps"] == 8 == generation_defaults(TINY_SD_SLIM_DIR).steps
    assert m["build"]["config_file"].endswith("configs/tiny-sd-slim.json")
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-sd-slim.json"
    # the committed config is the one it was built from (``threads`` aside: not part of a stage's
    # fingerprint, it changes no result)
    no_threads = lambda c: {k: ({f: x for f, x in v.items() if f != "threads"} if isinstance(v, dict) else v)
                            for k, v in c.items()}
    assert no_threads(load_build_config(config)) == no_threads(m["build"]["config"])
    assert any(c.startswith("slimsd compress train --stage 2") for c in m["build"]["commands"])
    plan = m["prune_plan"]
    assert plan["removed_blocks"] and plan["unet_params"]["kept_fraction"] < 0.60  # the paper's 54 %
    # the plan's counts are the stored weights', and those of tiny-sd's U-Net without those blocks
    assert plan["unet_params"]["before"] == _unet_params(TINY_SD_DIR)
    assert plan["unet_params"]["after"] == _unet_params(TINY_SD_SLIM_DIR) == m["params"]["unet"]
    cfg = json.loads((TINY_SD_DIR / "unet" / "config.json").read_text())
    with init_empty_weights():
        rebuilt = PrunedUNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")},
                                             removed_blocks=plan["removed_blocks"])
    assert count_params(rebuilt) == plan["unet_params"]["after"]
    for tag in ("steps8_cfg7.5", "steps25_cfg7.5"):
        assert m["metrics"][tag]["fd"] > 0 and 0 <= m["metrics"][tag]["alignment"] <= 1


def test_is_the_pruned_student_and_serves_at_8_steps():
    from slimsd.defaults import generation_defaults
    from slimsd.serve.models import default_model

    assert resolve_model("tiny-sd-slim") == TINY_SD_SLIM_DIR
    assert _unet_params(TINY_SD_SLIM_DIR) < 0.6 * _unet_params(TINY_SD_DIR)
    assert generation_defaults(TINY_SD_SLIM_DIR).steps == 8
    assert default_model() == "tiny-sd-slim"  # what serve and loadtest use


def test_evaluate_reproduces_the_manifest_row():
    """`slimsd evaluate tiny-sd-slim --steps 8 --num-prompts N --json` (the manifest's row: its N, seed 0)."""
    from slimsd.cli import main

    manifest = json.loads((TINY_SD_SLIM_DIR / "manifest.json").read_text())
    m = manifest["metrics"]["steps8_cfg7.5"]
    n = manifest["build"]["config"]["evaluate"]["num_prompts"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["evaluate", "tiny-sd-slim", "--steps", "8", "--num-prompts", str(n), "--json"]) == 0
    r = json.loads(buf.getvalue())
    # the same machine gives the same numbers; other CPUs may round a few pixels differently
    assert r["fd"] == pytest.approx(m["fd"], rel=0.03)
    assert abs(r["alignment"] - m["alignment"]) <= 0.02


def test_tiny_sd_slim_4_is_tiny_sd_slim_distilled_to_4_steps():
    """The committed 4-step preset: intact, built by configs/tiny-sd-slim-4.json from tiny-sd-slim
    (the same pruned architecture, other weights), 4 steps by default, its manifest row scored."""
    from safetensors.torch import load_file

    from slimsd.compress.build import load_build_config
    from slimsd.defaults import generation_defaults
    from slimsd.models import TINY_SD_SLIM_4_DIR

    assert resolve_model("tiny-sd-slim-4") == TINY_SD_SLIM_4_DIR
    m = verify_manifest(TINY_SD_SLIM_4_DIR)
    assert m["default_steps"] == 4 == generation_defaults(TINY_SD_SLIM_4_DIR).steps
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-sd-slim-4.json"
    built = {k: ({f: x for f, x in v.items() if f != "threads"} if isinstance(v, dict) else v)
             for k, v in m["build"]["config"].items()}
    assert built == load_build_config(config) and built["model"] == "tiny-sd-slim"
    assert m["prune_plan"] == json.loads((TINY_SD_SLIM_DIR / "manifest.json").read_text())["prune_plan"]
    t = json.loads((TINY_SD_SLIM_4_DIR / "training.json").read_text())
    assert t["config"]["student_steps"] == 4 and t["config"]["student"] == t["config"]["teacher"]
    a = load_file(TINY_SD_SLIM_4_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(TINY_SD_SLIM_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and any(not (a[k] == b[k]).all() for k in a)
    row = m["metrics"]["steps4_cfg7.5"]
    assert row["fd"] > 0 and 0 <= row["alignment"] <= 1 and len(row["alignment_ci"]) == 2
