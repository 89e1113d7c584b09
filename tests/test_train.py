"""compress/train.py and compress/build.py: stages run, resume exactly, build chains and skips.

A bk-tiny pruned tiny-sd is the student; a few steps of batch 2 on 64 cached latents keep the
whole file well under a minute on 2 cores.
"""

import json
import time

import pytest
import torch

from slimsd.cli import main
from slimsd.compress.prune import PRESETS, prune_pipeline
from slimsd.compress.train import TrainConfig, list_checkpoints, student_grid, train

FAST = dict(num_latents=64, batch_size=2, logging_steps=1, final_eval_prompts=0, report_to="none")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny U-Nets run ~1000 small ops per pass: on a busy 2-core machine two threads spend
    most of their time waiting for each other, one thread does not."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return prune_pipeline("tiny-sd", PRESETS["bk-tiny"], tmp_path_factory.mktemp("s") / "bk-tiny", {"preset": "bk-tiny"})


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_stage1_then_stage2_write_loadable_pipelines(student, tmp_path):
    from diffusers import StableDiffusionPipeline

    from slimsd.manifest import verify_manifest
    from slimsd.unet_blocks import PrunedUNet2DConditionModel

    s1 = train(TrainConfig(stage=1, student=str(student), teacher="tiny-sd", out=str(tmp_path / "s1"), max_steps=2,
                           cfg_prob=1.0, lambda_feat_kd=1.0, checkpointing_steps=0, **FAST))
    log = json.loads((s1 / "loss_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2]
    assert {"l_diff", "l_out_kd", "l_cfg_kd", "l_feat_kd", "w"} <= set(log[0])  # eq. 2 + eq. 1 + BK-SDM feature KD
    assert 2.0 <= log[0]["w"] <= 14.0
    assert json.loads((s1 / "slimsd.json").read_text())["defaults"] == {"steps": 25, "guidance": 7.5}
    assert (s1 / "loss_curve.png").stat().st_size > 0 and (s1 / "prune_plan.json").is_file()

    # stage 2: the stage-1 student is teacher and initial student; 2-step grid, scored at the end
    s2 = train(TrainConfig(stage=2, student=str(s1), teacher=str(s1), out=str(tmp_path / "s2"), max_steps=2,
                           student_steps=2, checkpointing_steps=0, **{**FAST, "final_eval_prompts": 8}))
    info = json.loads((s2 / "slimsd.json").read_text())
    assert info["defaults"] == {"steps": 2, "guidance": 7.5} and info["stage"] == 2
    m = verify_manifest(s2)  # sha256 of every file matches
    assert m["defaults"] == info["defaults"] and m["default_steps"] == 2
    assert set(m["metrics"]["steps2_cfg7.5"]) >= {"fd", "alignment"}
    assert {"l_step_reduc", "l_diff"} <= set(json.loads((s2 / "loss_log.json").read_text())[0])
    pipe = StableDiffusionPipeline.from_pretrained(s2, safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipe.unet, PrunedUNet2DConditionModel)
    assert pipe.unet.config.removed_blocks == PRESETS["bk-tiny"]
    img = pipe("a red circle left of a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary folder left


def test_student_grid_is_the_ddim_sampling_grid():
    from diffusers import DDIMScheduler

    from slimsd.models import SD21_SCHEDULER

    sched = DDIMScheduler(**SD21_SCHEDULER)
    t, tp, tpp = student_grid(sched, 8)
    assert t.tolist() == [876, 751, 626, 501, 376, 251, 126, 1]  # what 8-step DDIM sampling visits
    assert (t - tpp).tolist() == [125] * 8 and (t - tp).tolist() == [62] * 8
    assert student_grid(sched, 4)[0].tolist() == [751, 501, 251, 1]


def test_killed_and_resumed_run_equals_uninterrupted_run(student, tmp_path):
    kw = dict(stage=1, student=str(student), teacher="tiny-sd", max_steps=3, checkpointing_steps=2,
              checkpoints_total_limit=1, use_ema=True, lr_scheduler="cosine", lr_warmup_steps=1, learning_rate=1e-3,
              cfg_prob=0.5, gradient_accumulation_steps=2, **FAST)
    full = train(TrainConfig(out=str(tmp_path / "full"), **kw))

    class Killed(Exception):
        pass

    def kill_after_3(step, accelerator):
        if step == 3:  # step 3 is done but not checkpointed (every 2 steps): it is lost, as in a real kill
            raise Killed

    with pytest.raises(Killed):
        train(TrainConfig(out=str(tmp_path / "run"), **kw), callback=kill_after_3)
    assert [p.name for p in list_checkpoints(tmp_path / "run.work")] == ["checkpoint-2"]
    assert not (tmp_path / "run").exists()  # no half output
    resumed = train(TrainConfig(out=str(tmp_path / "run"), resume_from_checkpoint="latest", **kw))

    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    log_a = json.loads((full / "loss_log.json").read_text())
    log_b = json.loads((resumed / "loss_log.json").read_text())
    assert [r["step"] for r in log_b] == [1, 2, 3]
    for ra, rb in zip(log_a, log_b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["step"], k)
    # the last K=1 checkpoint is kept, no half-written one is left
    assert [p.name for p in list_checkpoints(tmp_path / "run.work")] == ["checkpoint-2"]
    assert not list((tmp_path / "run.work").glob(".checkpoint-*"))


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", "train", "--stage", "3", "--student", "x", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err
    rc = main(["compress", "train", "--stage", "1", "--student", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "error" in err and "nope" in err
    with pytest.raises(SystemExit):
        main(["compress", "train", "--stage", "1", "--out", str(tmp_path / "o")])  # --student missing
    assert "--student" in capsys.readouterr().err
    rc = main(["compress", "build", str(tmp_path / "missing.json")])
    assert rc == 2 and "missing.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "tiny-sd", "out": str(tmp_path / "o"), "prune": {"preset": "bk-tiny"},
                               "stage1": {"max_stepz": 3}}))
    rc = main(["compress", "build", str(bad)])
    assert rc == 2 and "max_stepz" in capsys.readouterr().err


def test_cli_train_then_resume_with_other_settings_is_refused(student, tmp_path, capsys):
    args = ["compress", "train", "--student", str(student), "--out", str(tmp_path / "o"), "--max-steps", "1",
            "--checkpointing-steps", "1", "--num-latents", "64", "--batch-size", "2", "--final-eval-prompts", "0",
            "--report-to", "none"]
    assert main([*args, "--stage", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["out"] == str(tmp_path / "o") and r["defaults"] == {"steps": 25, "guidance": 7.5}
    assert (tmp_path / "o.work" / "checkpoint-1").is_dir()
    rc = main([*args, "--stage", "2", "--resume-from-checkpoint", "latest"])
    assert rc == 2 and "other settings" in capsys.readouterr().err


def test_build_chain_skips_finished_stages(tmp_path):
    """sensitivity -> prune -> stage 1 -> stage 2 from one YAML config; a rerun skips everything."""
    cfg = tmp_path / "build.yaml"
    cfg.write_text(f"""
model: tiny-sd
out: {tmp_path / 'slim'}
sensitivity: {{steps: 2, num_prompts: 4, batch_size: 8, blocks: [up.3.attn.2, mid.attn.0, down.0.attn.1]}}
prune: {{policy: sensitivity, keep_params: 0.97}}
stage1: {{max_steps: 1, num_latents: 32, batch_size: 2, report_to: none, final_eval_prompts: 0}}
stage2: {{max_steps: 1, num_latents: 32, batch_size: 2, student_steps: 4, report_to: none, final_eval_prompts: 0}}
""")
    assert main(["compress", "build", str(cfg), "--json"]) == 0
    out = tmp_path / "slim"
    m = json.loads((out / "manifest.json").read_text())
    assert m["default_steps"] == 4 and m["defaults"]["steps"] == 4
    assert m["prune_plan"]["removed_blocks"] and m["params"]["unet"] < 3_400_000
    assert any(c.startswith("slimsd compress train --stage 2") for c in m["build"]["commands"])
    assert "unet/diffusion_pytorch_model.safetensors" in m["files"]
    assert not any(p.name.startswith("checkpoint-") for p in out.rglob("*"))  # checkpoints stay in the work dir
    t0 = time.time()
    from slimsd.compress.build import build, load_build_config

    r = build(load_build_config(cfg), config_path=str(cfg))
    assert [s["status"] for s in r["stages"]] == ["skipped"] * 5
    assert time.time() - t0 < 10


def test_tiny_sd_slim_preset_names_its_build_command(tmp_path, monkeypatch):
    """The committed preset resolves; where it is absent (a checkout without it) the error says how to build it."""
    import slimsd.models as M

    assert M.resolve_model("tiny-sd-slim") == M.TINY_SD_SLIM_DIR
    monkeypatch.setattr(M, "TINY_SD_SLIM_DIR", tmp_path / "tiny-sd-slim")
    with pytest.raises(FileNotFoundError, match="compress build configs/tiny-sd-slim.json"):
        M.resolve_model("tiny-sd-slim")
    monkeypatch.setattr(M, "TINY_SD_SLIM_4_DIR", tmp_path / "tiny-sd-slim-4")
    with pytest.raises(FileNotFoundError, match="compress build configs/tiny-sd-slim-4.json"):
        M.resolve_model("tiny-sd-slim-4")


def test_build_killed_mid_stage_resumes_from_its_checkpoint(tmp_path, capsys):
    """`slimsd compress build` SIGKILLed inside stage 1 (after a checkpoint): the rerun skips the
    finished prune stage, resumes stage 1 from that checkpoint, and its loss log has each step once."""
    import os
    import signal
    import subprocess
    import sys

    from slimsd.compress.build import build, load_build_config

    cfg = tmp_path / "build.json"
    steps = 12
    cfg.write_text(json.dumps({
        "model": "tiny-sd", "out": str(tmp_path / "slim"), "prune": {"preset": "bk-tiny"}, "stage2": None,
        "stage1": {"max_steps": steps, "checkpointing_steps": 2, "num_latents": 16, "batch_size": 2,
                   "logging_steps": 1, "report_to": "none", "final_eval_prompts": 0, "threads": 1}}))
    work = tmp_path / "slim.build"
    ckpts = work / "stage1.work"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "slimsd.cli", "compress", "build", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        t0 = time.monotonic()
        while not list_checkpoints(ckpts):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 300, "no checkpoint after 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # a kill -9 in the middle of stage 1
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    done = int(list_checkpoints(ckpts)[-1].name.split("-")[1])
    assert done < steps, "stage 1 finished before the kill: nothing to resume"
    pruned_plan = work / "pruned" / "prune_plan.json"
    pruned_mtime = pruned_plan.stat().st_mtime_ns

    capsys.readouterr()
    r = build(load_build_config(cfg), config_path=str(cfg))
    err = capsys.readouterr().err
    assert [(s["stage"], s["status"]) for s in r["stages"]] == [("prune", "skipped"), ("stage1", "ran"), ("final", "ran")]
    assert pruned_plan.stat().st_mtime_ns == pruned_mtime
    resumed = [line for line in err.splitlines() if line.startswith("resumed from")]
    assert resumed and resumed[0].endswith(f"at step {done}"), err[-2000:]
    steps_logged = [row["step"] for row in json.loads((work / "stage1" / "loss_log.json").read_text())]
    assert steps_logged == list(range(1, steps + 1))  # the steps before the kill kept, none repeated
    assert json.loads((tmp_path / "slim" / "manifest.json").read_text())["default_steps"] == 25


def test_constant_lr_with_warmup_really_warms_up():
    """diffusers' get_scheduler("constant") ignores num_warmup_steps; ours must not."""
    from slimsd.compress.train import make_lr_scheduler

    def lrs(name, warmup, n=6):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = make_lr_scheduler(opt, name, warmup, max_steps=10)
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("constant", 0) == [1e-3] * 6
    warm = lrs("constant", 4)
    assert warm[0] == 0 and warm[2] == pytest.approx(5e-4) and warm[4:] == [1e-3, 1e-3]
    assert lrs("cosine", 2)[:3] == pytest.approx([0, 5e-4, 1e-3])
    with pytest.raises(ValueError, match="^lr_scheduler: 'nope' is not a valid"):
        lrs("nope", 0)


def test_build_reruns_when_the_teacher_weights_change_under_the_same_name(tmp_path):
    """The cache key is the teacher's content, not its name: a new decoder rebuilds the chain."""
    import shutil

    from safetensors.torch import load_file, save_file

    from slimsd.compress.build import build
    from slimsd.models import TINY_SD_DIR

    teacher = tmp_path / "teacher"
    shutil.copytree(TINY_SD_DIR, teacher, ignore=shutil.ignore_patterns("eval", "manifest.json"))
    cfg = {"model": str(teacher), "out": str(tmp_path / "slim"),
           "prune": {"blocks": ["up.3.attn.2"]},
           "stage1": {"max_steps": 1, "num_latents": 32, "batch_size": 2, "report_to": "none", "final_eval_prompts": 0}}
    build(cfg)
    assert [s["status"] for s in build(cfg)["stages"]] == ["skipped"] * 3
    (teacher / "eval_notes.txt").write_text("not a component: no rebuild")
    assert [s["status"] for s in build(cfg)["stages"]] == ["skipped"] * 3
    f = teacher / "vae" / "diffusion_pytorch_model.safetensors"
    w = load_file(f)
    k = next(k for k in w if k.startswith("decoder."))
    w[k] = w[k] + 0.01
    save_file(w, f)
    assert [s["status"] for s in build(cfg)["stages"]] == ["ran"] * 3


def test_build_without_prune_and_stage1_distils_the_model_itself(student, tmp_path):
    """Progressive distillation (configs/tiny-sd-slim-4.json): no prune, no stage 1; MODEL (a
    pruned, distilled student) is stage 2's student and teacher, the result keeps MODEL's plan."""
    from slimsd.compress.build import build
    from slimsd.models import load_pipeline

    cfg = {"model": str(student), "out": str(tmp_path / "four"),
           "stage2": {"max_steps": 1, "student_steps": 4, **FAST}}
    r = build(cfg)
    assert [s["stage"] for s in r["stages"]] == ["stage2", "final"]
    m = json.loads((tmp_path / "four" / "manifest.json").read_text())
    assert m["defaults"]["steps"] == 4 and m["source_model"] == str(student)
    assert m["prune_plan"] == json.loads((student / "prune_plan.json").read_text())
    cmd = next(c for c in m["build"]["commands"] if c.startswith("slimsd compress train"))
    assert f"--student {student} --teacher {student}" in cmd
    t = json.loads((tmp_path / "four" / "training.json").read_text())
    assert t["config"]["student"] == t["config"]["teacher"] == str(student)
    a = load_pipeline(str(tmp_path / "four")).unet.state_dict()
    b = load_pipeline(str(student)).unet.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # trained, same architecture
    assert [s["status"] for s in build(cfg)["stages"]] == ["skipped"] * 2
    with pytest.raises(ValueError, match="needs a 'prune' section"):
        build({**cfg, "stage1": {}})
    with pytest.raises(ValueError, match="'stage1' and/or a 'stage2'"):
        build({"model": str(student), "out": str(tmp_path / "x")})


def test_cycle_dataset_repeats_epochs_skips_on_resume_and_refuses_an_empty_stream():
    """Streamed data (--num-latents 0), shared by training and `compress decoder`."""
    from slimsd.compress.train.data import cycle_dataset

    class DS(list):
        name = "toy"

    it = cycle_dataset(DS(["a", "b", "c"]), skip=2)
    assert [next(it) for _ in range(4)] == ["c", "a", "b", "c"]
    with pytest.raises(ValueError, match="toy yielded no samples"):
        next(cycle_dataset(DS()))
