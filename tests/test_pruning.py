"""Block inventory, identity ablation, physical pruning, BK-SDM presets, planning, resumable sensitivity."""

import json

import pytest
import torch
from accelerate import init_empty_weights

from slimsd.compress.prune import PRESETS, damage, plan_pruning, prune_pipeline
from slimsd.models import SD21_UNET, count_params, load_pipeline
from slimsd.profile import unet_inputs
from slimsd.unet_blocks import PrunedUNet2DConditionModel, ablate, list_blocks, remove_blocks


@pytest.fixture(scope="module")
def teacher_unet():
    return load_pipeline("tiny-sd").unet.eval()


def test_inventory_names_and_removability(teacher_unet):
    blocks = {b.name: b for b in list_blocks(teacher_unet)}
    assert {"down.0.res.0", "down.0.attn.1", "mid.attn.0", "up.3.attn.2", "down.2.down+up.0.up"} <= blocks.keys()
    assert not blocks["down.1.res.0"].removable and "channels" in blocks["down.1.res.0"].reason  # 32 -> 64
    assert not blocks["up.3.res.0"].removable  # h has 64 channels, the stage outputs 32
    assert blocks["up.1.res.0"].removable and blocks["up.1.res.0"].keep_channels == 64
    # every parameter of the U-Net outside blocks is in conv_in/out, time embedding, norms, samplers
    in_blocks = sum(b.params for b in blocks.values())
    assert 0.85 * count_params(teacher_unet) < in_blocks < count_params(teacher_unet)


@torch.no_grad()
def test_ablating_each_removable_block_changes_output_and_is_undone(teacher_unet):
    x = unet_inputs(teacher_unet, batch=2)
    full = teacher_unet(*x).sample
    for b in list_blocks(teacher_unet):
        if not b.removable:
            with pytest.raises(ValueError, match="cannot be removed"):
                with ablate(teacher_unet, [b.name]):
                    pass
            continue
        with ablate(teacher_unet, [b.name]):
            out = teacher_unet(*x).sample
        assert out.shape == full.shape
        assert not torch.equal(out, full), b.name  # (a trained block can be nearly an identity already)
    assert torch.equal(teacher_unet(*x).sample, full)  # all weights restored


@torch.no_grad()
def test_physically_pruned_equals_ablated_and_round_trips(teacher_unet, tmp_path):
    names = ["down.0.res.1", "down.2.attn.1", "mid.res.0", "up.1.res.2", "up.2.attn.0", "down.1.down+up.1.up"]
    x = unet_inputs(teacher_unet, batch=2)
    with ablate(teacher_unet, names):
        ablated = teacher_unet(*x).sample
    pruned = PrunedUNet2DConditionModel.from_unet(teacher_unet, names).eval()
    torch.testing.assert_close(pruned(*x).sample, ablated, rtol=1e-5, atol=1e-5)
    removed = sum(b.params for b in list_blocks(teacher_unet) if b.name in names)
    assert count_params(pruned) == count_params(teacher_unet) - removed
    assert not any(k.startswith("mid_block.resnets.0.") for k in pruned.state_dict())
    pruned.save_pretrained(tmp_path / "unet")
    size_full = sum(p.numel() * 4 for p in teacher_unet.parameters())
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < size_full - removed * 4 + 200_000
    again = PrunedUNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert again.config.removed_blocks == names
    torch.testing.assert_close(again(*x).sample, ablated, rtol=1e-5, atol=1e-5)
    # pruning a pruned U-Net accumulates, and the names stay those of the unpruned structure
    twice = PrunedUNet2DConditionModel.from_unet(again, ["up.3.attn.2"])
    assert twice.config.removed_blocks == names + ["up.3.attn.2"]


def test_bad_block_names_are_refused(teacher_unet):
    with pytest.raises(ValueError, match="unknown or already removed block 'down.9.res.0'"):
        remove_blocks(teacher_unet, ["down.9.res.0"])
    with pytest.raises(ValueError, match="removed_blocks"):
        PrunedUNet2DConditionModel(**{k: v for k, v in teacher_unet.config.items() if not k.startswith("_")},
                                   removed_blocks=["up.3.res.0"])


@pytest.mark.parametrize("preset,expected", [("bk-base", 583_480_964), ("bk-small", 485_787_524), ("bk-tiny", 326_825_604)])
def test_bk_sdm_presets_match_published_counts_on_sd21(preset, expected):
    with init_empty_weights():
        unet = PrunedUNet2DConditionModel(**SD21_UNET, removed_blocks=PRESETS[preset])
    assert count_params(unet) == expected


def _report(rows, unpruned=None, total=1000, total_ms=100.0):
    return {"model": "x", "unpruned": unpruned or {"fd": 10.0, "alignment": 0.9}, "unet_params": total,
            "unet_latency_ms": total_ms, "blocks": [dict(removable=True, **r) for r in rows]}


def test_policies_order_blocks_as_documented():
    rows = [  # name, params, latency, FD, alignment
        dict(name="a", params=100, latency_ms=1.0, fd=10.5, alignment=0.90),  # cheap damage, slow-ish? no: 1 ms
        dict(name="b", params=400, latency_ms=30.0, fd=12.0, alignment=0.88),  # more damage, big and slow
        dict(name="c", params=300, latency_ms=2.0, fd=11.0, alignment=0.90),
    ]
    rep = _report(rows)
    assert damage(rows[0], rep["unpruned"]) == pytest.approx(0.05)
    p = plan_pruning(rep, "sensitivity", target_params=600, tolerance=0.0)
    assert p["removed_blocks"] == ["a", "c"] and p["met"]
    p = plan_pruning(rep, "sensitivity-per-ms", target_params=600, tolerance=0.0)
    assert p["removed_blocks"][0] == "b"  # most milliseconds per unit of damage
    p = plan_pruning(rep, "sensitivity-per-ms", target_latency_ms=75.0)
    assert p["removed_blocks"] == ["b"] and p["met"]
    p = plan_pruning(rep, "sensitivity", keep_params=0.5, tolerance=0.05)
    assert p["unet_params"]["after"] <= 525 and p["met"]
    with pytest.raises(ValueError, match="exactly one budget"):
        plan_pruning(rep, "sensitivity")
    with pytest.raises(ValueError, match="--policy"):
        plan_pruning(rep, "random", keep_params=0.5)


def test_prune_preset_writes_a_loadable_smaller_pipeline(tmp_path):
    out = prune_pipeline("tiny-sd", PRESETS["bk-small"], tmp_path / "bk-small", {"preset": "bk-small"})
    plan = json.loads((out / "prune_plan.json").read_text())
    assert plan["unet_params"]["after"] < plan["unet_params"]["before"]
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert type(pipe.unet).__name__ == "PrunedUNet2DConditionModel"
    assert count_params(pipe.unet) == plan["unet_params"]["after"]
    img = pipe("a red circle left of a blue square", num_inference_steps=2, output_type="np").images[0]
    assert img.shape == (64, 64, 3)


def test_sensitivity_resumes_to_the_same_report(tmp_path, monkeypatch):
    """A run killed after its first block resumes with only the missing blocks (counted through a spy
    on the ablation); finished files are not rewritten; the report equals an uninterrupted run's."""
    import os

    import slimsd.compress.sensitivity as S

    kw = dict(model="tiny-sd", steps=2, num_prompts=4, blocks=["down.0.res.0", "mid.attn.0", "up.3.attn.2"])
    full = S.run_sensitivity(S.SensitivityConfig(out=str(tmp_path / "a"), **kw))

    real = S.ablate
    ablated = []

    def dying(unet, names):
        ablated.append(list(names))
        if len(ablated) == 2:
            raise KeyboardInterrupt  # killed while starting the second block
        return real(unet, names)

    monkeypatch.setattr(S, "ablate", dying)
    with pytest.raises(KeyboardInterrupt):
        S.run_sensitivity(S.SensitivityConfig(out=str(tmp_path / "b"), **kw))
    blocks_dir = tmp_path / "b" / "blocks"
    done = sorted(p.name for p in blocks_dir.glob("*.json"))
    assert done == ["_unpruned.json", "down.0.res.0.json"]
    old = 1_000_000_000  # 2001: a rewritten file would carry today's mtime
    for name in done:
        os.utime(blocks_dir / name, (old, old))

    def spy(unet, names):
        ablated.append(list(names))
        return real(unet, names)

    ablated.clear()
    monkeypatch.setattr(S, "ablate", spy)
    resumed = S.run_sensitivity(S.SensitivityConfig(out=str(tmp_path / "b"), **kw))
    assert ablated == [["mid.attn.0"], ["up.3.attn.2"]]  # the finished block is not recomputed
    assert [(blocks_dir / name).stat().st_mtime for name in done] == [old, old]  # nor rewritten
    key = lambda r: {b["name"]: (b.get("fd"), b.get("alignment")) for b in r["blocks"]}
    assert key(resumed) == key(full)
    assert resumed["unpruned"] == full["unpruned"]
    assert (tmp_path / "b" / "sensitivity.png").stat().st_size > 0


def test_from_unet_copies_by_default_and_shares_on_request(teacher_unet):
    copy = PrunedUNet2DConditionModel.from_unet(teacher_unet, ["mid.res.0"])
    shared = PrunedUNet2DConditionModel.from_unet(teacher_unet, ["mid.res.0"], share_weights=True)
    src = teacher_unet.conv_in.weight
    assert shared.conv_in.weight.data_ptr() == src.data_ptr()
    assert copy.conv_in.weight.data_ptr() != src.data_ptr() and torch.equal(copy.conv_in.weight, src)
    assert not any(p.is_meta for p in copy.parameters())


def test_plan_from_a_proxy_report_only_takes_blocks_the_target_can_lose():
    rows = [dict(name="a", params=100, latency_ms=1.0, fd=10.0, alignment=0.9),
            dict(name="b", params=400, latency_ms=3.0, fd=10.5, alignment=0.9)]
    # on the target, "a" changes width (not removable): unet_block_costs leaves it out of params
    p = plan_pruning(_report(rows), "sensitivity", target_params=600, params={"b": 400}, total_params=1000)
    assert p["removed_blocks"] == ["b"] and p["met"]


def test_latency_policy_breaks_ties_by_milliseconds_saved():
    rows = [dict(name="fast", params=300, latency_ms=1.0, fd=10.0, alignment=0.9),   # no damage, saves 1 ms
            dict(name="slow", params=300, latency_ms=9.0, fd=10.0, alignment=0.9)]   # no damage, saves 9 ms
    assert plan_pruning(_report(rows), "sensitivity-per-ms", target_params=700)["removed_blocks"] == ["slow"]


def test_speedup_budget_is_the_measured_step_over_the_target_and_the_front_sweeps_it():
    from slimsd.compress.prune import plan_damage, pruning_front

    rows = [  # total step 100 ms; block a is damage-free but slow, b cheap in damage per ms, c damaging
        dict(name="a", params=100, latency_ms=20.0, fd=10.0, alignment=0.90),
        dict(name="b", params=100, latency_ms=10.0, fd=10.2, alignment=0.90),  # damage 0.02
        dict(name="c", params=100, latency_ms=10.0, fd=11.0, alignment=0.81),  # damage 0.1 + 0.1
    ]
    rep = _report(rows)
    p = plan_pruning(rep, "sensitivity-per-ms", target_speedup=1.25)  # budget 80 ms: a alone saves 20
    assert p["removed_blocks"] == ["a"] and p["met"]
    assert p["budget"]["target_latency_ms"] == pytest.approx(80.0)
    assert p["est_speedup"] == pytest.approx(100 / 80)
    p = plan_pruning(rep, "sensitivity-per-ms", target_speedup=1.5)  # 66.7 ms: a, b, then c
    assert p["removed_blocks"] == ["a", "b", "c"]
    front = pruning_front(rep, [1.1, 1.25, 1.3, 1.5])
    assert [f["removed_blocks"] for f in front] == [["a"], ["a", "b"], ["a", "b", "c"]]  # 1.25 repeats 1.1: kept once
    d = plan_damage(rep, ["b", "c"])
    assert d["per_metric"]["fd"] == pytest.approx(0.02 + 0.1) and d["per_metric"]["alignment"] == pytest.approx(0.1)
    assert d["damage_sum"] == pytest.approx(0.22) and d["unscored"] == []
    assert plan_damage(rep, ["zz"])["unscored"] == ["zz"]
    for bad in (0.9, float("nan")):
        with pytest.raises(ValueError, match="--target-speedup"):
            plan_pruning(rep, "sensitivity-per-ms", target_speedup=bad)
    with pytest.raises(ValueError, match="exactly one budget"):
        plan_pruning(rep, "sensitivity-per-ms", target_speedup=1.2, target_latency_ms=50)
