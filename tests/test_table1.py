"""benchmarks/table1.py: the claims' verdicts are what their definitions say (hand-made paired results)."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("table1", Path(__file__).parents[1] / "benchmarks" / "table1.py")
table1 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table1)


def d(align_ci, ratio_ci, align=None, ratio=None):
    return {"alignment_diff_ci": list(align_ci), "fd_ratio_ci": list(ratio_ci),
            "alignment_diff": sum(align_ci) / 2 if align is None else align,
            "fd_ratio": sum(ratio_ci) / 2 if ratio is None else ratio}


def test_matches_is_non_inferiority_with_the_issue_margins():
    assert table1.matches(d((-0.021, 0.008), (0.87, 0.94))) == "yes"  # tiny-sd-slim vs the teacher, committed numbers
    assert table1.matches(d((-0.031, 0.0), (0.9, 1.0))) == "unresolved"  # the CI crosses -0.03
    assert table1.matches(d((-0.02, 0.0), (1.0, 1.11))) == "unresolved"  # the CI crosses 1.10
    assert table1.matches(d((-0.08, -0.04), (0.9, 1.0))) == "no"
    assert table1.matches(d((0.0, 0.1), (1.12, 1.3))) == "no"


def test_better_and_worse_need_a_resolved_metric_and_none_against():
    assert table1.better(d((0.01, 0.05), (0.9, 1.05))) == "yes"
    assert table1.better(d((-0.01, 0.05), (0.8, 0.95))) == "yes"
    assert table1.better(d((-0.01, 0.05), (0.9, 1.05))) == "unresolved"
    assert table1.better(d((0.01, 0.05), (1.02, 1.1))) == "mixed"
    assert table1.better(d((-0.05, -0.01), (0.9, 1.05))) == "no"
    assert table1.worse(d((-0.05, -0.01), (0.9, 1.05))) == "yes"  # teacher at 8 vs 25
    assert table1.worse(d((-0.01, 0.01), (1.05, 1.2))) == "yes"
    assert table1.worse(d((0.01, 0.05), (0.9, 1.05))) == "no"
    assert table1.worse(d((-0.01, 0.01), (0.95, 1.05))) == "unresolved"


def test_seed_mean_is_a_t_interval_over_seeds():
    rows = [{"alignment_diff": x, "fd_ratio": r} for x, r in ((0.01, 0.9), (0.03, 1.0), (0.02, 0.95))]
    m = table1.seed_mean(rows)
    # mean 0.02, sd 0.01, t(0.975, 2) = 4.3027 -> half-width 4.3027 * 0.01 / sqrt(3) = 0.02484
    assert m["alignment_diff"] == pytest.approx(0.02)
    assert m["alignment_diff_ci"] == pytest.approx([0.02 - 0.024841, 0.02 + 0.024841], abs=1e-5)
    assert m["fd_ratio_ci"] == pytest.approx([0.95 - 0.12421, 0.95 + 0.12421], abs=1e-4)
    assert m["seeds"] == 3
    assert table1.better(m) == "unresolved"  # three seeds that all agree in sign are still inside the interval
