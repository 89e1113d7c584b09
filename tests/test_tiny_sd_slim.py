"""The committed compressed student `tiny-sd-slim` (issue 4): intact, smaller, 8 steps by default,
and its manifest's 8-step row is what `slimsd evaluate tiny-sd-slim --steps 8` gives."""

import json

import pytest

from slimsd.manifest import verify_manifest
from slimsd.models import TINY_SD_DIR, TINY_SD_SLIM_DIR, resolve_model

pytestmark = pytest.mark.skipif(not (TINY_SD_SLIM_DIR / "model_index.json").is_file(),
                                reason="tiny-sd-slim not built (slimsd compress build configs/tiny-sd-slim.json)")


def _unet_params(folder) -> int:
    from slimsd.models import stored_params

    return stored_params(folder, "unet")


def test_manifest_records_the_build_and_matches_files():
    m = verify_manifest(TINY_SD_SLIM_DIR)  # sha256 of every weight / config file
    assert m["default_steps"] == 8
    assert m["build"]["config_file"].endswith("configs/tiny-sd-slim.json")
    assert any(c.startswith("slimsd compress train --stage 2") for c in m["build"]["commands"])
    plan = m["prune_plan"]
    assert plan["removed_blocks"] and plan["unet_params"]["kept_fraction"] < 0.60  # the paper's 54 %
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
    """`slimsd evaluate tiny-sd-slim --steps 8 --num-prompts 256 --json` (the manifest's row: seed 0)."""
    from slimsd.cli import main

    m = json.loads((TINY_SD_SLIM_DIR / "manifest.json").read_text())["metrics"]["steps8_cfg7.5"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["evaluate", "tiny-sd-slim", "--steps", "8", "--num-prompts", "256", "--json"]) == 0
    r = json.loads(buf.getvalue())
    # the same machine gives the same numbers; other CPUs may round a few pixels differently
    assert r["fd"] == pytest.approx(m["fd"], rel=0.03)
    assert abs(r["alignment"] - m["alignment"]) <= 0.02
