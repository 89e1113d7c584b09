"""Choose blocks to remove under a budget, and write the physically pruned pipeline.

Policies (``damage`` = relative quality loss when the block alone is removed, from the
sensitivity report: relative increase of lower-is-better metrics plus relative drop of
higher-is-better ones, e.g. FD and alignment, or FID and CLIP score):

============================  ===================================================
``sensitivity``               the paper: remove the least damaging blocks first
``sensitivity-per-param``     damage per parameter removed
``sensitivity-per-ms``        damage per millisecond saved on this machine (beyond the
                              paper, which prunes for parameters: this prunes for time;
                              what each buys is measured in docs/pruning.md)
============================  ===================================================

Budgets: keep a fraction / number of U-Net parameters (``--keep-params 0.54`` or
``--target-params 466e6``), a latency (``--target-latency-ms``) or a U-Net step speedup
(``--target-speedup 1.35``: the latency budget is the measured unpruned step / 1.35). Blocks are
taken in policy order and skipped when they would overshoot a parameter budget by more than
``tolerance``. :func:`pruning_front` sweeps the latency budget: the quality/latency front.

Presets reproduce BK-SDM's removals on SD-v2-structured U-Nets (``bk-base``, ``bk-small``,
``bk-tiny``; their U-Net parameter counts on SD v2.1-base are BK-SDM's published ones, tested,
and listed in docs/pruning.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from slimsd.io import atomic_dir
from slimsd.unet_blocks import PrunedUNet2DConditionModel, list_blocks

POLICIES = ("sensitivity", "sensitivity-per-param", "sensitivity-per-ms")

# BK-SDM (Kim et al., 2024): remove the second ResNet/attention pair of every down stage and
# the middle pair of every up stage (Base), plus the mid-block (Small), plus the innermost
# stage with its down/up-sampler (Tiny).
_BK_BASE = (
    [f"down.{i}.res.1" for i in range(4)] + [f"down.{i}.attn.1" for i in range(3)]
    + ["up.0.res.1"] + [f"up.{i}.res.1" for i in (1, 2, 3)] + [f"up.{i}.attn.1" for i in (1, 2, 3)]
)
_BK_SMALL = _BK_BASE + ["mid.res.0", "mid.attn.0", "mid.res.1"]
_BK_TINY = _BK_SMALL + ["down.3.res.0", "up.0.res.0", "up.0.res.2", "down.2.down+up.0.up"]
PRESETS = {"bk-base": _BK_BASE, "bk-small": _BK_SMALL, "bk-tiny": _BK_TINY}


def damage_terms(row: dict, unpruned: dict) -> dict[str, float]:
    """Per metric, the relative quality loss of one ablated block (relative FD increase, relative
    alignment drop, ...; < 0 where removing it helps)."""
    from slimsd.compress.sensitivity import METRIC_DIRECTION

    return {m: -sign * (row[m] - unpruned[m]) / (abs(unpruned[m]) or 1e-8)
            for m, sign in METRIC_DIRECTION.items() if m in row and m in unpruned}


def damage(row: dict, unpruned: dict) -> float:
    """Relative quality loss of one ablated block (0 = none; can be < 0 if it helps)."""
    return sum(damage_terms(row, unpruned).values())


def _policy_order(rows: list[dict], policy: str, unpruned: dict, params: dict, latency_ms: dict) -> list[dict]:
    """The candidate blocks in policy order. Blocks whose removal *improves* quality (damage < 0)
    sort first in every policy; ties (often many blocks with no measurable damage) go to the
    block that saves more."""
    eps = 1e-9

    def key(r):
        d = damage(r, unpruned)
        if policy == "sensitivity":
            return (d,)
        if policy == "sensitivity-per-param":
            return (d / max(params[r["name"]], 1), -params[r["name"]])
        ms = latency_ms.get(r["name"], 0.0)
        return (d / max(ms, eps), -ms)

    return sorted(rows, key=key)


def plan_pruning(report: dict, policy: str = "sensitivity", keep_params: float | None = None,
                 target_params: int | None = None, target_latency_ms: float | None = None,
                 target_speedup: float | None = None, latency_ms: dict | None = None, params: dict | None = None, total_params: int | None = None,
                 total_latency_ms: float | None = None, tolerance: float = 0.02) -> dict:
    """Pick blocks greedily in policy order until the budget is met.

    ``latency_ms`` / ``params`` / totals override the report's (e.g. measured on the target
    model when the sensitivity came from a smaller proxy with the same block names).
    """
    if policy not in POLICIES:
        raise ValueError(f"--policy must be one of {POLICIES}, got {policy!r}")
    rows = [r for r in report["blocks"] if r.get("removable") and any(k in r for k in ("fd", "fid", "alignment", "clip_score"))]
    if not rows:
        raise ValueError("the sensitivity report has no scored removable blocks")
    params = params or {r["name"]: r["params"] for r in report["blocks"]}
    # a report from a proxy model (tiny-sd for sd21) may score blocks the target cannot lose
    # (e.g. down.2.res.0 changes width 640 -> 1280 on SD v2.1 but not on tiny-sd): only blocks
    # in ``params`` (the target's removable blocks, see unet_block_costs) are candidates
    rows = [r for r in rows if r["name"] in params]
    latency_ms = latency_ms or {r["name"]: r.get("latency_ms") or 0.0 for r in report["blocks"]}
    total_params = total_params or report["unet_params"]
    total_latency_ms = total_latency_ms or report.get("unet_latency_ms")
    if sum(x is not None for x in (keep_params, target_params, target_latency_ms, target_speedup)) != 1:
        raise ValueError("give exactly one budget: --keep-params, --target-params, --target-latency-ms or --target-speedup")
    if target_speedup is not None:
        if not target_speedup >= 1:
            raise ValueError(f"--target-speedup must be >= 1, got {target_speedup}")
        if not total_latency_ms:
            raise ValueError("--target-speedup needs the unpruned U-Net's measured step latency")
        target_latency_ms = total_latency_ms / target_speedup
    if target_latency_ms is not None and not target_latency_ms > 0:
        raise ValueError(f"--target-latency-ms must be > 0, got {target_latency_ms}")
    if keep_params is not None:
        if not 0 < keep_params <= 1:
            raise ValueError(f"--keep-params must be a fraction in (0, 1], got {keep_params}")
        target_params = int(round(keep_params * total_params))

    order = _policy_order(rows, policy, report["unpruned"], params, latency_ms)

    def greedy(skip: frozenset):
        chosen, cur_p, cur_ms = [], total_params, total_latency_ms or 0.0
        for r in order:
            n = r["name"]
            if n in skip:
                continue
            if target_params is not None:
                if cur_p <= target_params * (1 + tolerance):
                    break
                if cur_p - params[n] < target_params * (1 - tolerance):
                    continue  # would overshoot the band: try a smaller block
            elif cur_ms <= target_latency_ms:
                break
            chosen.append(n)
            cur_p -= params[n]
            cur_ms -= latency_ms.get(n, 0.0)
        ok = (cur_p <= target_params * (1 + tolerance)) if target_params is not None else (cur_ms <= target_latency_ms)
        return chosen, cur_p, ok

    chosen, cur_p, met = greedy(frozenset())
    if not met:
        # repair: a greedy pick can leave a gap no remaining block fits into (params budget with
        # a tolerance band). Leave out one chosen block at a time, most damaging first, and keep
        # the first plan that meets the budget.
        for n in reversed(chosen):
            c2, p2, ok2 = greedy(frozenset([n]))
            if ok2:
                chosen, cur_p, met = c2, p2, ok2
                break
    saved_ms = sum(latency_ms.get(n, 0.0) for n in chosen)
    return {
        "policy": policy,
        "removed_blocks": chosen,
        "budget": {"target_params": target_params, "target_latency_ms": target_latency_ms,
                   "target_speedup": target_speedup, "tolerance": tolerance},
        "met": bool(met),
        "unet_params": {"before": total_params, "after": cur_p, "kept_fraction": cur_p / total_params},
        "est_block_latency_saved_ms": saved_ms,
        # the step speedup the block timings predict (the real one: time the pruned U-Net)
        "est_speedup": total_latency_ms / max(total_latency_ms - saved_ms, 1e-9) if total_latency_ms else None,
        "damage_sum": sum(damage(r, report["unpruned"]) for r in rows if r["name"] in chosen),
        "source_report_model": report.get("model"),
    }


def pruning_front(report: dict, speedups, policy: str = "sensitivity-per-ms", **costs) -> list[dict]:
    """The quality/latency front: one plan per U-Net step speedup target (``speedups``, e.g.
    1.1 ... 1.6), each the cheapest in ``damage`` that the policy finds for that latency budget.
    ``costs``: the target model's ``params`` / ``latency_ms`` / ``total_params`` /
    ``total_latency_ms`` (see :func:`plan_pruning`). Plans that a larger target reproduces exactly
    are kept once (the smallest target that gives them)."""
    out, seen = [], set()
    for s in sorted(speedups):
        p = plan_pruning(report, policy, target_speedup=float(s), **costs)
        key = frozenset(p["removed_blocks"])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def plan_damage(report: dict, removed: list[str]) -> dict:
    """The report's single-block damage summed over ``removed`` (an additive estimate: blocks
    removed together can interact), in total and per metric (relative FD increase, relative
    alignment drop...), and the removed blocks the report has no score for."""
    rows = {r["name"]: r for r in report["blocks"]}
    per = {m: 0.0 for m in damage_terms(report["unpruned"], report["unpruned"])}
    unscored = []
    for n in removed:
        terms = damage_terms(rows[n], report["unpruned"]) if n in rows else {}
        if not terms:
            unscored.append(n)
        for m, v in terms.items():
            per[m] += v
    return {"damage_sum": sum(per.values()), "per_metric": per, "unscored": unscored}


# the options of a prune plan: `slimsd compress prune` flags and a build config's ``prune`` keys
PLAN_OPTIONS = ("preset", "blocks", "policy", "keep_params", "target_params", "target_latency_ms", "target_speedup",
                "tolerance", "latent_size")


def plan_from_config(model: str, options: dict, report: str | Path | None = None) -> dict:
    """The prune plan of ``model`` from ``options`` (:data:`PLAN_OPTIONS`; None = not given), in order:

    * ``preset``: BK-SDM's removals (:data:`PRESETS`);
    * ``blocks``: an explicit list of block names;
    * otherwise a budget (``keep_params`` / ``target_params`` / ``target_latency_ms``, ``policy``,
      ``tolerance``) over the sensitivity ``report`` (a ``sensitivity.json``), with the parameter
      counts (and, when the policy or budget needs them, latencies) of ``model`` itself: the
      report may come from a proxy model with the same block names.
    """
    opt = {k: v for k, v in options.items() if v is not None}
    if "preset" in opt:
        if opt["preset"] not in PRESETS:
            raise ValueError(f"prune preset must be one of {sorted(PRESETS)}, got {opt['preset']!r}")
        return {"preset": opt["preset"], "removed_blocks": PRESETS[opt["preset"]]}
    if "blocks" in opt:
        return {"removed_blocks": list(opt["blocks"])}
    if report is None:
        raise ValueError("a prune plan needs a preset, a block list or a sensitivity report")
    scores = json.loads(Path(report).read_text())
    policy = opt.get("policy", "sensitivity")
    need_latency = policy == "sensitivity-per-ms" or "target_latency_ms" in opt or "target_speedup" in opt
    params, lat, total, total_ms = unet_block_costs(model, need_latency, opt.get("latent_size"))
    tp = opt.get("target_params")
    if tp is not None and float(tp) <= 0:
        raise ValueError(f"--target-params must be > 0, got {tp}")
    plan = plan_pruning(scores, policy, keep_params=opt.get("keep_params"),
                        target_params=int(float(tp)) if tp is not None else None,
                        target_latency_ms=opt.get("target_latency_ms"), target_speedup=opt.get("target_speedup"),
                        latency_ms=lat or None, params=params,
                        total_params=total, total_latency_ms=total_ms, tolerance=opt.get("tolerance", 0.02))
    plan["sensitivity_report"] = str(report)
    return plan


def prune_pipeline(model: str, removed_blocks: list[str], out: str | Path, plan: dict | None = None) -> Path:
    """Write a complete pipeline folder whose U-Net lacks ``removed_blocks`` (+ ``prune_plan.json``)."""
    from slimsd.manifest import write_manifest
    from slimsd.models import count_params, load_pipeline, resolve_model

    out = Path(out)
    src = resolve_model(model)
    pipe = load_pipeline(model)
    before = count_params(pipe.unet)
    pruned = PrunedUNet2DConditionModel.from_unet(pipe.unet, removed_blocks)
    pipe.unet = pruned
    pipe.register_modules(unet=pruned)
    after = count_params(pruned)
    plan = dict(plan or {})
    plan.update(source_model=str(model), source_folder=str(src), removed_blocks=list(pruned.config.removed_blocks),
                unet_params={"before": before, "after": after, "kept_fraction": after / before})
    with atomic_dir(out) as tmp:  # OUT is complete or absent
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "prune_plan.json").write_text(json.dumps(plan, indent=2))
        write_manifest(tmp, model=f"{model} pruned", prune_plan=plan)
    return out


def unet_block_costs(model: str, latency: bool, latent_size: int | None = None, batch: int = 2):
    """(params, latency_ms, total_params, total_ms) of the *target* model's removable blocks."""
    from slimsd.profile import block_latency
    from slimsd.models import build_components, count_params, load_pipeline

    if model == "sd21-base-arch" and not latency:
        unet = build_components("sd21-base-arch", device="meta")[0]
    elif model == "sd21-base-arch":
        unet = build_components("sd21-base-arch")[0].eval()
    else:
        unet = load_pipeline(model).unet
    params = {b.name: b.params for b in list_blocks(unet) if b.removable}
    total = count_params(unet)
    lat = block_latency(unet, batch=batch, latent_size=latent_size) if latency else None
    return params, (lat or {}), total, (lat or {}).get("total")
