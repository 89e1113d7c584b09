"""benchmarks/table1.py: the claims' verdicts are what their definitions say (hand-made paired
results), and its task pool runs each task once, in dependency order."""

import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("table1", Path(__file__).parents[1] / "benchmarks" / "table1.py")
table1 = importlib.util.module_from_spec(spec)
sys.modules["table1"] = table1  # dataclasses look their module up there
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


def test_task_pool_runs_each_task_once_after_its_dependencies(tmp_path):
    """Two workers (threads here; processes in the script) share one pool folder: every task
    runs exactly once, never before the tasks it comes after, and a ready() gate holds a task
    back until another task has written its file."""
    import threading
    import time

    pool = table1.Pool(tmp_path / "pool")
    pool.reset()
    order, lock = [], threading.Lock()
    plan = tmp_path / "plan.json"

    def job(name, seconds=0.02, writes=None):
        def run():
            time.sleep(seconds)
            if writes:
                writes.write_text("{}")
            with lock:
                order.append(name)
        return run

    tasks = [
        table1.Task("build-8", job("build-8", 0.1, writes=plan)),
        table1.Task("build-4", job("build-4"), after=("build-8",)),
        table1.Task("c4", job("c4"), ready=plan.is_file),
        table1.Task("teacher", job("teacher")),
        table1.Task("score-4", job("score-4"), after=("build-4",)),
    ]
    workers = [threading.Thread(target=table1.run_worker, args=(pool, tasks, k, lambda m: None, 0.01))
               for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=10)
    assert sorted(order) == sorted(t.name for t in tasks)  # each once
    assert order.index("build-4") > order.index("build-8")
    assert order.index("score-4") > order.index("build-4")
    assert order.index("c4") > order.index("build-8")  # its plan file comes from build-8
    assert set(pool.record()) == {t.name for t in tasks} and pool.next(tasks) is None


def test_pool_claim_is_exclusive(tmp_path):
    pool = table1.Pool(tmp_path / "pool")
    pool.reset()
    t = [table1.Task("a", lambda: None)]
    assert pool.next(t).name == "a"
    assert pool.next(t) is True  # claimed by the first caller, not done: wait
    pool.finish("a", 1.0, 0)
    assert pool.next(t) is None
