"""The evaluator's intervals and paired comparison (slimsd/evalstats.py, slimsd/evaluator.py).

Against hand computations (Wilson, McNemar, FD), on known image sets (identical -> a
difference of 0 with an interval containing 0; a degraded copy -> a clearly negative one),
and under ``accelerate launch`` (2 CPU processes give the numbers of 1).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from slimsd.evalstats import bootstrap_fd, fd, mcnemar_p, paired_compare, wilson


def test_wilson_matches_a_hand_computation():
    # 30 of 100, z = 1.959964: centre (0.3 + z²/200) / (1 + z²/100), half z/(1 + z²/100) sqrt(.0021 + z²/40000)
    z = 1.959963984540054
    centre = (0.3 + z * z / 200) / (1 + z * z / 100)
    half = z / (1 + z * z / 100) * math.sqrt(0.3 * 0.7 / 100 + z * z / 40000)
    lo, hi = wilson(30, 100)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.2189, 0.3958)  # the published Wilson interval of 30/100
    assert wilson(0, 50)[0] == 0.0 and 0 < wilson(0, 50)[1] < 0.08  # never below 0, unlike p ± z·se
    assert wilson(50, 50)[1] == 1.0
    with pytest.raises(ValueError, match="n: need"):
        wilson(0, 0)
    with pytest.raises(ValueError, match="k: must"):
        wilson(5, 3)


def test_mcnemar_is_the_exact_binomial_test_of_discordant_pairs():
    a = np.array([1] * 10 + [0] * 2 + [1] * 20 + [0] * 8, bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 20 + [0] * 8, bool)
    # 10 vs 2 discordant: two-sided exact p = 2 * P(X <= 2 | n=12, p=.5) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_p(a, b) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_p(a, a) == 1.0


def test_fd_is_torchmetrics_formula():
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(0)
    fake = torch.randn(300, 16, generator=g, dtype=torch.float64) * 1.3 + 0.2
    real = torch.randn(300, 16, generator=g, dtype=torch.float64)
    mu_f, mu_r = fake.mean(0), real.mean(0)
    s_f, s_r = torch.cov(fake.T), torch.cov(real.T)
    assert fd(fake, real) == pytest.approx(float(_compute_fid(mu_r, s_r, mu_f, s_f)), rel=1e-9)
    assert fd(real, real) == pytest.approx(0.0, abs=1e-8)


def test_bootstrap_fd_interval_holds_the_estimate_and_shrinks_with_n():
    g = torch.Generator().manual_seed(1)
    widths = []
    for n in (200, 1600):
        fake = torch.randn(n, 8, generator=g, dtype=torch.float64) + 0.5
        real = torch.randn(n, 8, generator=g, dtype=torch.float64)
        lo, hi = bootstrap_fd(fake, real, resamples=200)
        assert lo < fd(fake, real) < hi
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0]  # ~1/sqrt(n): 8x the prompts, ~0.35x the width
    with pytest.raises(ValueError, match="pair up"):
        bootstrap_fd(torch.zeros(3, 2), torch.zeros(4, 2))


# -- on images ------------------------------------------------------------------------------------
def _renders(prompts, seed):
    from PIL import Image

    from slimsd.data.scenes import parse_caption, render

    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.asarray(render(parse_caption(p), rng))) for p in prompts]


@pytest.fixture(scope="module")
def scored():
    from slimsd.data.scenes import eval_prompts
    from slimsd.evaluator import score_scene_images

    prompts = [p for p, _ in eval_prompts(256, seed=3)]
    clean = _renders(prompts, 123)
    # a degraded copy: every other image is a render of another prompt (wrong objects), and all
    # are blurred (FD compares distributions: swapping prompts alone leaves it where it was)
    from PIL import ImageFilter

    wrong = _renders(prompts[1:] + prompts[:1], 123)
    degraded = [(w if i % 2 else c).filter(ImageFilter.GaussianBlur(2)) for i, (c, w) in enumerate(zip(clean, wrong))]
    out = {}
    for name, imgs in (("clean", clean), ("degraded", degraded)):
        r = score_scene_images(imgs, prompts, seed=3, resamples=200, per_image=True)
        r["per_image"]["seeds"] = list(range(len(prompts)))
        out[name] = r
    return out


def test_scores_carry_intervals_objects_order_and_the_floor(scored):
    r = scored["clean"]
    assert r["alignment"] > 0.9 and r["objects"] >= r["alignment"]  # renders: the evaluator's own accuracy
    for key in ("alignment", "objects", "order"):
        lo, hi = r[f"{key}_ci"]
        assert lo <= r[key] <= hi and hi - lo < 0.1
    assert r["fd_ci"][0] < r["fd"] < r["fd_ci"][1]
    assert r["fd_floor"] < 40 and r["fd"] < 40  # real renders vs real renders, both
    d = scored["degraded"]
    assert d["alignment"] < r["alignment"] - 0.3 and d["objects"] < r["objects"] - 0.3
    assert d["fd"] > r["fd"] and d["fd_floor"] == pytest.approx(r["fd_floor"])  # the floor is the prompts'


def test_paired_comparison_identical_is_zero_degraded_is_negative(scored):
    same = paired_compare(scored["clean"], scored["clean"], resamples=200)
    assert same["alignment_diff"] == 0 and same["alignment_diff_ci"][0] <= 0 <= same["alignment_diff_ci"][1]
    assert same["fd_diff"] == 0 and same["fd_diff_ci"][0] <= 0 <= same["fd_diff_ci"][1]
    assert same["alignment_verdict"] == same["fd_verdict"] == "unresolved"
    worse = paired_compare(scored["degraded"], scored["clean"], resamples=200)
    assert worse["alignment_diff"] < -0.3 and worse["alignment_diff_ci"][1] < 0
    assert worse["alignment_verdict"] == "A lower" and worse["alignment_mcnemar_p"] < 1e-6
    assert worse["fd_diff"] > 0 and worse["fd_diff_ci"][0] > 0 and worse["fd_verdict"] == "A higher"
    assert worse["fd_ratio"] > 1


def test_paired_comparison_refuses_other_prompts(scored):
    other = dict(scored["clean"], per_image=dict(scored["clean"]["per_image"], seeds=[9] * 256))
    with pytest.raises(ValueError, match="same prompts and seeds"):
        paired_compare(scored["clean"], other)


# -- sharded under accelerate ---------------------------------------------------------------------
def _evaluate_json(prefix):
    cmd = prefix + ["-m", "slimsd.cli", "evaluate", "tiny-sd-slim", "--steps", "2", "--num-prompts", "24",
                    "--batch-size", "8", "--resamples", "50", "--json"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, p.stdout  # printed by the main process only
    return json.loads(lines[0])


def test_two_accelerate_processes_give_the_numbers_of_one():
    one = _evaluate_json([sys.executable])
    two = _evaluate_json([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    for key in ("alignment", "alignment_ci", "objects", "objects_ci", "order", "order_ci", "num_images"):
        assert one[key] == two[key], key
    for key in ("fd", "fd_floor"):  # the same images; FD's float sums differ in the last digits by thread count
        assert one[key] == pytest.approx(two[key], rel=1e-5), key
