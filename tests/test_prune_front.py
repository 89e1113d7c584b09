"""benchmarks/prune_front.py (the quality/latency front) and benchmarks/plan_retrain.py's configs,
on tiny-sd: the chain runs, the speedups are the timed ones, the damage is the report's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "results" / "sensitivity-tiny-sd" / "sensitivity.json"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def test_front_times_every_plan_and_sums_the_reports_damage(bench, tmp_path):
    import statistics

    import prune_front

    from slimsd.compress.prune import plan_damage

    assert prune_front.main(["--preset", "tiny-sd", "--report", str(REPORT), "--target-params", "2.5e6",
                             "--speedups", "1.05,1.2,1.5", "--repeats", "1", "--threads", "1",
                             "--results-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "prune_front.json").read_text())
    report = json.loads(REPORT.read_text())
    rows = {x["plan"]: x for x in r["rows"]}
    assert rows["unpruned"]["speedup"] == 1.0 and rows["unpruned"]["removed_blocks"] == []
    assert {"paper 466M (sensitivity)", "bk-base", "bk-small", "bk-tiny"} <= set(rows)
    front = [k for k in rows if k.startswith("time-aware")]
    assert front, "the sweep made no time-aware plan"
    base = statistics.median(rows["unpruned"]["all_s"])
    for k, x in rows.items():
        assert x["speedup"] == pytest.approx(base / statistics.median(x["all_s"]))  # measured, not estimated
        assert x["damage_sum"] == pytest.approx(plan_damage(report, x["removed_blocks"])["damage_sum"])
        if k in r["plans"] and k != "unpruned":
            assert x["removed_blocks"] == r["plans"][k]["removed_blocks"]
    assert r["plans"]["paper 466M (sensitivity)"]["unet_params"]["after"] <= 2.5e6 * 1.02
    if r["chosen"] is not None:  # only a plan that *measured* >= the goal may be chosen
        assert r["chosen"] in front and rows[r["chosen"]]["speedup"] >= prune_front.GOAL
    assert (tmp_path / "prune_front.png").stat().st_size > 10_000
    assert "time-aware" in (tmp_path / "prune_front.md").read_text()


def test_plan_retrain_trains_both_plans_with_one_stage1_budget(bench, tmp_path):
    import plan_retrain

    plan = {"removed_blocks": ["up.3.attn.0", "mid.attn.0"]}
    paper = plan_retrain.part_config("paper", plan, tmp_path, 1, False)
    time_ = plan_retrain.part_config("time", plan, tmp_path, 1, False)
    base = json.loads((ROOT / "configs" / "tiny-sd-slim.json").read_text())
    assert paper["prune"] == base["prune"]  # the paper's plan: tiny-sd-slim's own
    assert time_["prune"] == {"blocks": plan["removed_blocks"]}
    assert paper["stage1"] == time_["stage1"] and paper["stage1"]["max_steps"] == base["stage1"]["max_steps"]
    assert paper["stage2"] is None and time_["stage2"] is None and paper["out"] != time_["out"]
    # another training seed: both arms get it; the paper arm prunes its recorded blocks, so only training differs
    blocks = ["up.3.attn.1", "mid.res.0"]
    p1 = plan_retrain.part_config("paper", plan, tmp_path, 1, False, seed=1, paper_blocks=blocks)
    t1 = plan_retrain.part_config("time", plan, tmp_path, 1, False, seed=1, paper_blocks=blocks)
    assert p1["seed"] == t1["seed"] == 1 and "seed" not in paper
    assert p1["prune"] == {"blocks": blocks} and t1["prune"] == time_["prune"] and p1["stage1"] == paper["stage1"]


def test_plan_retrains_paper_part_can_reuse_table1s_build(bench, tmp_path):
    """--paper-work points the paper part at Table 1's build folder: every section the build
    fingerprints up to stage 1 is the same there, so the build reuses Table 1's stage 1."""
    from types import SimpleNamespace

    import plan_retrain
    import table1

    t1, _ = table1.build_configs(SimpleNamespace(config=str(table1.CONFIG), config_4=str(table1.CONFIG_4), quick=False,
                                                 threads=1), tmp_path / "t1")
    plan = {"removed_blocks": ["up.3.attn.0"]}
    import os

    rel = os.path.relpath(t1["work_dir"])  # as a user types it: the same folder, spelled relative
    paper = plan_retrain.part_config("paper", plan, tmp_path / "pr", 1, False, paper_work=rel)
    time_ = plan_retrain.part_config("time", plan, tmp_path / "pr", 1, False, paper_work=rel)
    assert paper["work_dir"] == t1["work_dir"] and time_["work_dir"] != t1["work_dir"]
    for k in ("model", "sensitivity", "prune", "stage1", "seed"):
        assert paper.get(k) == t1.get(k), k
