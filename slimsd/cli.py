"""``slimsd`` command line. Subcommands are thin: they parse, call a library function, print.

``--json`` prints exactly one JSON object on stdout (progress bars go to stderr).

One file over ~400 lines on purpose: it is every command's parser and handler side by side,
each a few lines, so a reader sees the whole command surface in one place; the flags of the
big commands come from their settings classes (:mod:`slimsd.cliargs`), and each command's
imports are made only when that command is built or run (``slimsd serve`` never loads the
training stack).
"""

from __future__ import annotations

import argparse
import json
import sys


def _sub(sub, name, **kw) -> argparse.ArgumentParser:
    """A subcommand that takes ``--json`` like every other."""
    p = sub.add_parser(name, **kw)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress goes to stderr)")
    return p


def _add_train_teacher(sub):
    """Flags mirror :class:`slimsd.compress.teacher.TeacherConfig` field by field (help = field metadata)."""
    from slimsd.cliargs import add_fields
    from slimsd.compress.teacher import TeacherConfig

    p = _sub(sub, "train-teacher", help=_HELP["train-teacher"])
    add_fields(p, TeacherConfig)
    p.set_defaults(func=_cmd_train_teacher)


def _cmd_train_teacher(a) -> int:
    from slimsd.cliargs import from_args
    from slimsd.compress.teacher import TeacherConfig, train_teacher

    out = train_teacher(TeacherConfig(**from_args(TeacherConfig, a)))
    print(json.dumps({"out": str(out)}) if a.json else f"wrote {out}")
    return 0


def _add_evaluator(sub):
    p = _sub(sub, "evaluator", help="the offline scene evaluator (FD / alignment)")
    esub = p.add_subparsers(dest="evaluator_command", required=True)
    t = _sub(esub, "train", help="train the scene classifier on rendered scenes")
    t.add_argument("--out", default=None, help="folder (default: the packaged evaluator)")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--n-train", type=int, default=30_000)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_evaluator_train)


def _cmd_evaluator_train(a) -> int:
    from slimsd.evaluator import EVALUATOR_DIR, train_evaluator

    m = train_evaluator(a.out or EVALUATOR_DIR, steps=a.steps, batch=a.batch, n_train=a.n_train, seed=a.seed)
    print(json.dumps(m["heldout_accuracy"]) if a.json else json.dumps(m, indent=2))
    return 0


def _add_evaluate(sub):
    p = _sub(sub, "evaluate", help="generate for held-out prompts and report FD and alignment with 95%% CIs; "
             "--compare B for a paired comparison (docs/evaluation.md)")
    p.add_argument("model", help="preset (tiny-sd, sd21-base-arch), diffusers folder or hub id")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--num-prompts", type=int, default=1024,
                   help="prompts (one image each; default 1024: alignment CI about +-0.03)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--split", default="heldout", choices=("heldout", "train"))
    p.add_argument("--out", default=None, help="folder for samples.png and metrics.json (compare.json with --compare)")
    p.add_argument("--compare", default=None, metavar="MODEL_B",
                   help="paired comparison: MODEL_B on the same prompts and seeds; reports A - B with 95%% CIs")
    p.add_argument("--compare-steps", type=int, default=None,
                   help="steps of MODEL_B (default: its own default steps, e.g. 25 for tiny-sd)")
    p.add_argument("--compare-guidance", type=float, default=None, help="guidance of MODEL_B (default: --guidance)")
    p.add_argument("--resamples", type=int, default=None, help="bootstrap resamples of the FD intervals (default 1000)")
    p.add_argument("--metrics", default="scene", help="'scene' (FD, alignment; offline scene prompts) or a comma list "
                   "of fid,clip,is for real SD (needs --reference and local weights)")
    p.add_argument("--reference", default=None, help="image+caption data for fid/clip/is: folder, CSV/JSONL, "
                   "webdataset shards or HF dataset (e.g. MS-COCO 2014 val captions)")
    p.add_argument("--clip-model", default=None, help="local folder of a transformers CLIPModel + processor")
    p.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--resolution", type=int, default=512, help="reference image size for fid/clip/is")
    p.set_defaults(func=_cmd_evaluate)


def _ci(ci) -> str:
    return "" if ci is None else f"  [{ci[0]:.3f}, {ci[1]:.3f}]"


def _print_scene_metrics(name: str, r: dict) -> None:
    print(f"{name}: steps={r['steps']} guidance={r['guidance']} prompts={r['num_prompts']} ({r['split']}), "
          f"{r['wall_time_s']} s")
    print(f"  FD        {r['fd']:.3f}{_ci(r.get('fd_ci'))}  (lower is better; real vs real: {r['fd_floor']:.3f})")
    print(f"  alignment {r['alignment']:.3f}{_ci(r['alignment_ci'])}  (higher is better)")
    print(f"  objects   {r['objects']:.3f}{_ci(r['objects_ci'])}  (both objects right, any order)")
    if r.get("order") is not None:
        print(f"  order     {r['order']:.3f}{_ci(r['order_ci'])}  (order right, among images with both objects right)")


def _default_steps(model) -> int:
    """The model's own default steps (its manifest / slimsd.json; 25 if it names none)."""
    from slimsd.defaults import generation_defaults
    from slimsd.models import resolve_model

    return generation_defaults(resolve_model(model)).steps


def _cmd_evaluate(a) -> int:
    from slimsd.evaluator import compare, evaluate, evaluate_coco, is_main_process

    if a.metrics != "scene":
        if not a.reference:
            raise ValueError("--reference is required with --metrics fid,clip,is")
        if a.compare:
            raise ValueError("--compare: the paired comparison is for the scene metrics (--metrics scene)")
        r = evaluate_coco(a.model, a.reference, steps=a.steps, guidance=a.guidance, num_prompts=a.num_prompts,
                          seed=a.seed, out=a.out, clip_model=a.clip_model, inception_weights=a.inception_weights,
                          metrics=[m.strip() for m in a.metrics.split(",")], resolution=a.resolution,
                          batch_size=a.batch_size)
        if is_main_process():
            print(json.dumps(r) if a.json else json.dumps(r, indent=2))
        return 0
    if a.compare:
        steps_b = a.compare_steps or _default_steps(a.compare)
        r = compare(a.model, a.compare, steps=a.steps, guidance=a.guidance, steps_b=steps_b,
                    guidance_b=a.compare_guidance, num_prompts=a.num_prompts, seed=a.seed, split=a.split,
                    batch_size=a.batch_size, resamples=a.resamples, out=a.out)
        if not is_main_process():
            return 0
        if a.json:
            print(json.dumps(r))
            return 0
        _print_scene_metrics(f"A = {a.model}", r["a"])
        _print_scene_metrics(f"B = {a.compare}", r["b"])
        d = r["a_minus_b"]
        print(f"A - B on the same {d['num_prompts']} prompts and seeds (95% paired bootstrap CIs):")
        print(f"  alignment {d['alignment_diff']:+.3f}{_ci(d['alignment_diff_ci'])}  {d['alignment_verdict']} "
              f"(McNemar p = {d['alignment_mcnemar_p']:.3g})")
        print(f"  objects   {d['objects_diff']:+.3f}{_ci(d['objects_diff_ci'])}  {d['objects_verdict']}")
        print(f"  FD        {d['fd_diff']:+.3f}{_ci(d['fd_diff_ci'])}  {d['fd_verdict']}; "
              f"ratio A/B {d['fd_ratio']:.3f}{_ci(d['fd_ratio_ci'])}")
        return 0
    r = evaluate(a.model, steps=a.steps, guidance=a.guidance, num_prompts=a.num_prompts, seed=a.seed,
                 out=a.out, split=a.split, batch_size=a.batch_size, resamples=a.resamples)
    if not is_main_process():
        return 0
    if a.json:
        print(json.dumps(r))
    else:
        _print_scene_metrics(str(a.model), r)
        if a.out:
            print(f"  wrote {a.out}/samples.png and metrics.json")
    return 0


def _add_info(sub):
    p = _sub(sub, "info", help="parameters of each component of a model")
    p.add_argument("model", help="preset (tiny-sd, sd21-base-arch), diffusers folder or hub id")
    p.add_argument("--blocks", action="store_true", help="per-block table: params, MACs, latency, removable")
    p.add_argument("--latent-size", type=int, default=None, help="latent size for MACs/latency (default: the U-Net's)")
    p.add_argument("--batch", type=int, default=2, help="batch for MACs/latency (2 = one image with CFG)")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency measurement")
    p.set_defaults(func=_cmd_info)


def _cmd_info(a) -> int:
    from slimsd.info import info

    r = info(a.model)
    if a.blocks:
        from slimsd.info import blocks_table

        r["blocks"] = blocks_table(a.model, latency=a.latency, latent_size=a.latent_size, batch=a.batch)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"{r['model']}")
    for name, n in r["params"].items():
        print(f"  {name:<13} {n:>15,d} params")
    print(f"  {'total':<13} {r['total_params']:>15,d} params")
    if a.blocks:
        print(f"\n{'block':<22}{'kind':<9}{'params':>14}{'GMACs':>10}{'ms':>10}  removable")
        for b in r["blocks"]:
            ms = f"{b['latency_ms']:.2f}" if b.get("latency_ms") is not None else "-"
            rm = "yes" if b["removable"] else f"no ({b['reason']})"
            print(f"{b['name']:<22}{b['kind']:<9}{b['params']:>14,d}{b['macs'] / 1e9:>10.3f}{ms:>10}  {rm}")
    return 0


def _add_compress(sub):
    from slimsd.cliargs import add_fields
    from slimsd.compress.sensitivity import SensitivityConfig

    p = _sub(sub, "compress", help=_HELP["compress"])
    csub = p.add_subparsers(dest="compress_command", required=True)

    s = _sub(csub, "sensitivity", help="quality with each U-Net block replaced by identity (paper Fig. 1)")
    s.add_argument("model", help="preset, diffusers folder or hub id")
    add_fields(s, SensitivityConfig, skip=("model",), required=("out",))
    s.set_defaults(func=_cmd_sensitivity)

    r = _sub(csub, "prune", help="remove blocks under a budget (or a BK-SDM preset) and write a pipeline folder")
    r.add_argument("model")
    r.add_argument("--out", required=True, help="pruned pipeline folder to write")
    r.add_argument("--report", default=None, help="sensitivity.json (from `slimsd compress sensitivity`)")
    r.add_argument("--preset", default=None, choices=sorted(_prune_presets()))
    r.add_argument("--blocks", default=None, help="comma list of blocks to remove (explicit plan)")
    r.add_argument("--policy", default="sensitivity", help="sensitivity | sensitivity-per-param | sensitivity-per-ms")
    r.add_argument("--keep-params", type=float, default=None, help="fraction of U-Net params to keep, e.g. 0.54")
    r.add_argument("--target-params", type=float, default=None, help="U-Net params to keep, e.g. 466e6")
    r.add_argument("--target-latency-ms", type=float, default=None, help="U-Net step latency to reach on this machine")
    r.add_argument("--target-speedup", type=float, default=None,
                   help="U-Net step speedup to reach on this machine, e.g. 1.35 (latency budget = unpruned step / this)")
    r.add_argument("--tolerance", type=float, default=0.02)
    r.add_argument("--latent-size", type=int, default=None, help="latent size for latency (default: the U-Net's)")
    r.add_argument("--plan-only", action="store_true", help="write the plan JSON, not the pipeline")
    r.set_defaults(func=_cmd_prune)

    _add_compress_train(csub)
    _add_compress_decoder(csub)

    b = _sub(csub, "build", help="the whole chain from one config: sensitivity -> prune -> stage 1 -> stage 2 "
             "[-> decoder] (finished stages are skipped on rerun)")
    b.add_argument("config", help="build config, .json or .yaml (configs/tiny-sd-slim.json; docs/training.md)")
    b.add_argument("--out", default=None, help="final pipeline folder (overrides the config's 'out')")
    b.add_argument("--force", action="store_true", help="redo every stage, even finished ones")
    b.set_defaults(func=_cmd_build)


def _add_compress_train(csub):
    """Flags mirror :class:`slimsd.compress.train.TrainConfig` field by field (help = field metadata)."""
    from dataclasses import fields

    from slimsd.cliargs import add_fields
    from slimsd.compress.train import TrainConfig

    t = _sub(csub, "train", help="stage 1 (CFG-aware retraining) or stage 2 (CFG-aware step distillation) "
             "on accelerate (docs/training.md)")
    stage_help = next(f.metadata["help"] for f in fields(TrainConfig) if f.name == "stage")
    t.add_argument("--stage", type=int, required=True, choices=(1, 2), help=stage_help)
    add_fields(t, TrainConfig, skip=("stage",), required=("student", "out"))
    t.set_defaults(func=_cmd_compress_train)


def _add_compress_decoder(csub):
    """Flags mirror :class:`slimsd.compress.decoder.DecoderConfig` field by field (help = field metadata)."""
    from slimsd.cliargs import add_fields
    from slimsd.compress.decoder import DecoderConfig

    d = _sub(csub, "decoder", help="distil a tiny VAE (diffusers AutoencoderTiny) from MODEL's and write MODEL's "
             "folder with it (docs/decoder.md)")
    d.add_argument("model", help="preset, diffusers folder or hub id")
    add_fields(d, DecoderConfig, skip=("model",), required=("out",))
    d.set_defaults(func=_cmd_compress_decoder)


def _prune_presets():
    """BK-SDM preset names (built only for `slimsd compress ...`, so serve never imports compress)."""
    from slimsd.compress.prune import PRESETS

    return tuple(PRESETS)


def _cmd_sensitivity(a) -> int:
    from slimsd.compress.sensitivity import SensitivityConfig, run_sensitivity

    accelerator = None
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch`
        from accelerate import Accelerator

        accelerator = Accelerator()
    from slimsd.cliargs import from_args

    cfg = SensitivityConfig(**from_args(SensitivityConfig, a))
    r = run_sensitivity(cfg, accelerator)
    if not r:
        return 0
    if a.json:
        print(json.dumps({"out": a.out, "unpruned": r["unpruned"], "blocks": len(r["blocks"])}))
    else:
        print(f"wrote {a.out}/sensitivity.json, sensitivity.csv, sensitivity.png")
    return 0


def _cmd_prune(a) -> int:
    from pathlib import Path

    from slimsd.compress.prune import PLAN_OPTIONS, plan_from_config, prune_pipeline

    if sum(x is not None for x in (a.preset, a.blocks, a.report)) != 1:
        raise ValueError("give exactly one of --preset, --blocks or --report")
    options = {k: getattr(a, k) for k in PLAN_OPTIONS}
    options["blocks"] = a.blocks.split(",") if a.blocks else None
    plan = plan_from_config(a.model, options, a.report)
    out = Path(a.out)
    if a.plan_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        path = out if out.suffix == ".json" else out.with_suffix(".json")
        path.write_text(json.dumps(plan, indent=2))
        print(json.dumps(plan) if a.json else f"wrote {path}")
        return 0
    prune_pipeline(a.model, plan["removed_blocks"], out, plan)
    final = json.loads((out / "prune_plan.json").read_text())
    if a.json:
        print(json.dumps(final))
    else:
        u = final["unet_params"]
        print(f"wrote {out}: U-Net {u['before']:,d} -> {u['after']:,d} params ({u['kept_fraction']:.1%} kept), "
              f"{len(final['removed_blocks'])} blocks removed")
    return 0


def _cmd_compress_train(a) -> int:
    from slimsd.cliargs import from_args
    from slimsd.compress.train import TrainConfig, train

    out = train(TrainConfig(**from_args(TrainConfig, a)))
    info = json.loads((out / "slimsd.json").read_text()) if (out / "slimsd.json").is_file() else {}
    if a.json:
        print(json.dumps({"out": str(out), **info}))
    else:
        print(f"wrote {out} (defaults: {info.get('defaults')})")
    return 0


def _cmd_compress_decoder(a) -> int:
    from slimsd.cliargs import from_args
    from slimsd.compress.decoder import DecoderConfig, distil_decoder

    out = distil_decoder(DecoderConfig(model=a.model, **from_args(DecoderConfig, a, skip=("model",))))
    info = json.loads((out / "slimsd.json").read_text())
    if a.json:
        print(json.dumps({"out": str(out), **info}))
    else:
        check = info["decoder"].get("check") or {}
        print(f"wrote {out} (vae: AutoencoderTiny, {info['params']['vae']:,d} params; decoder PSNR vs the source "
              f"{check.get('decoder_psnr_vs_source_db', 'not checked')} dB)")
    return 0


def _cmd_build(a) -> int:
    from slimsd.compress.build import build, load_build_config

    cfg = load_build_config(a.config)
    if a.out:
        cfg["out"] = a.out
    r = build(cfg, force=a.force, config_path=a.config)
    if a.json:
        print(json.dumps(r))
    else:
        for st in r["stages"]:
            print(f"{st['stage']:<12} {st['status']:<8} {st.get('out', '')}")
        print(f"wrote {r['out']}")
    return 0


def _add_export(sub):
    """Flags of each export command are its config's fields (:func:`slimsd.cliargs.add_fields`);
    positionals, ``--out``, ``--dry-run`` and ``--copy`` (the old spelling of ``--no-link``) are explicit."""
    from slimsd.cliargs import add_fields
    from slimsd.export.onnx import OnnxExportConfig
    from slimsd.export.tensorrt import TensorRTConfig
    from slimsd.export.triton import TritonConfig

    p = _sub(sub, "export", help="ONNX / TensorRT export and the Triton model repository (docs/export.md)")
    esub = p.add_subparsers(dest="export_command", required=True)

    o = _sub(esub, "onnx", help="text encoder, U-Net and VAE decoder as ONNX, with parity checks")
    o.add_argument("model", help="preset (tiny-sd, sd21-base-arch), diffusers folder or hub id")
    o.add_argument("out", help="folder to write (model.onnx per component, tokenizer, scheduler, manifest.json)")
    add_fields(o, OnnxExportConfig)
    o.set_defaults(func=_cmd_export_onnx)

    t = _sub(esub, "tensorrt", help="TensorRT engines from an ONNX export (needs a GPU and tensorrt)")
    t.add_argument("onnx_dir")
    t.add_argument("out", help="folder for <component>.plan, timing.cache, manifest.json")
    add_fields(t, TensorRTConfig)
    t.add_argument("--dry-run", action="store_true", help="print the build plan (profiles, flags); needs no GPU")
    t.set_defaults(func=_cmd_export_tensorrt)

    r = _sub(esub, "triton", help="Triton model repository (onnxruntime or tensorrt models + python pipeline)")
    r.add_argument("onnx_dir")
    r.add_argument("--out", default="model_repository")
    add_fields(r, TritonConfig, skip=("link", "pipeline_instances"))
    r.add_argument("--copy", dest="link", action="store_false", help="copy model files instead of hardlinking")
    r.set_defaults(func=_cmd_export_triton)

    from slimsd.serve.quantize import Int8Config

    q = _sub(esub, "int8", help="int8 U-Net for the openvino backend: NNCF post-training quantization calibrated on "
             "the model's own denoising inputs, with a quality check vs f32 and step times (docs/serve.md, 'int8')")
    q.add_argument("onnx_dir", help="a `slimsd export onnx` folder; writes <onnx_dir>/openvino-int8/")
    add_fields(q, Int8Config)
    q.add_argument("--time-only", action="store_true", help="only re-time the existing int8 U-Net on this CPU "
                   "(a report per CPU: auto takes int8 only where it was timed)")
    q.set_defaults(func=_cmd_export_int8)


def _cmd_export_onnx(a) -> int:
    from slimsd.cliargs import from_args
    from slimsd.export.onnx import OnnxExportConfig, export_onnx

    r = export_onnx(a.model, a.out, OnnxExportConfig(**from_args(OnnxExportConfig, a)))
    if a.json:
        print(json.dumps(r))
    else:
        for name, c in r["components"].items():
            err = "not verified" if c["parity"] is None else f"relative error {c['parity']:.2e}"
            print(f"{name:<13} {c['status']:<9} {err}")
        print(f"wrote {r['out']}")
    return 0


def _cmd_export_tensorrt(a) -> int:
    from slimsd.cliargs import from_args
    from slimsd.export.tensorrt import TensorRTConfig, TensorRTUnavailable, export_tensorrt, plan_engines

    cfg = TensorRTConfig(**from_args(TensorRTConfig, a))
    if a.dry_run:
        plan = {j.component: {"onnx": str(j.onnx), "plan": str(j.plan), **j.settings} for j in plan_engines(a.onnx_dir, a.out, cfg)}
        print(json.dumps(plan) if a.json else json.dumps(plan, indent=2))
        return 0
    try:
        r = export_tensorrt(a.onnx_dir, a.out, cfg)
    except TensorRTUnavailable as e:
        print(f"slimsd export tensorrt: error: {e}", file=sys.stderr)
        return 3
    print(json.dumps(r) if a.json else f"wrote {r['out']}")
    return 0


def _cmd_export_int8(a) -> int:
    from slimsd.cliargs import from_args
    from slimsd.serve.quantize import Int8Config, export_int8, retime

    cfg = Int8Config(**from_args(Int8Config, a))
    r = retime(a.onnx_dir, cfg) if a.time_only else export_int8(
        a.onnx_dir, cfg, log_fn=lambda m: print(f"int8: {m}", file=sys.stderr, flush=True))
    if a.json:
        print(json.dumps(r))
    else:
        q = r["quality"]
        print(f"quality: {q['status']}" + (f" (alignment diff {q['alignment_diff']:+.3f} "
              f"[{q['alignment_diff_ci'][0]:+.3f}, {q['alignment_diff_ci'][1]:+.3f}], FD ratio {q['fd_ratio']:.3f} "
              f"[{q['fd_ratio_ci'][0]:.3f}, {q['fd_ratio_ci'][1]:.3f}])" if "fd_ratio" in q else ""))
        for cpu, t in r["speed"].items():
            times = ", ".join(f"{k[:-3]} {v:.1f} ms" for k, v in t.items() if k.endswith("_ms"))
            print(f"U-Net step on {cpu}: {times}")
        print(f"wrote {a.onnx_dir}/openvino-int8")
    return 0


def _cmd_export_triton(a) -> int:
    from slimsd.cliargs import from_args
    from slimsd.export.triton import TritonConfig, export_triton

    r = export_triton(a.onnx_dir, a.out, TritonConfig(**from_args(TritonConfig, a)))
    print(json.dumps({"out": a.out, "models": r}) if a.json else f"wrote {a.out}: {', '.join(r)}")
    return 0


def _add_serve(sub):
    """Flags mirror :class:`slimsd.serve.settings.ServeSettings` field by field (help = its description)."""
    from slimsd.cliargs import add_fields
    from slimsd.serve.settings import ServeSettings

    p = sub.add_parser("serve", help="HTTP server: OpenAI Images API, AUTOMATIC1111 txt2img, metrics, "
                       "playground (docs/serve.md)")
    p.add_argument("model", nargs="*", default=[], help=ServeSettings.model_fields["model"].description +
                   "; several (MODEL or NAME=MODEL each) serve side by side, the first is the default")
    add_fields(p, ServeSettings, skip=("model",),
               extra_help={"api_key": "; prefer the SLIMSD_API_KEY variable (flags show in ps)"})
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(a) -> int:
    from slimsd.cliargs import from_args
    from slimsd.serve.server import run
    from slimsd.serve.settings import ServeSettings

    given = from_args(ServeSettings, a, skip=("model",))
    models = list(a.model) + given.pop("models", [])  # positional MODELs, then each --model
    first = {"model": models[0], "models": models[1:]} if models else {}
    return run(ServeSettings(**first, **given))


def _add_loadtest(sub):
    """``compare`` flags mirror :class:`slimsd.loadtest.compare.CompareConfig` (help = field metadata)."""
    from slimsd.cliargs import add_fields
    from slimsd.loadtest.compare import CompareConfig

    p = sub.add_parser("loadtest", help="locust load tests of slimsd serve (docs/loadtest.md)")
    lsub = p.add_subparsers(dest="loadtest_command", required=True)
    c = _sub(lsub, "compare", help="baseline (teacher, 25 steps) vs compressed model (8 steps) through "
             "slimsd serve under locust at fixed concurrency levels; writes report.md/.csv/.png")
    add_fields(c, CompareConfig, skip=("command",))
    c.set_defaults(func=_cmd_loadtest_compare)
    pr = _sub(lsub, "prompts", help="write held-out scene prompts, one per line, for locust --prompts-file")
    pr.add_argument("file")
    pr.add_argument("--num", type=int, default=64)
    pr.set_defaults(func=_cmd_loadtest_prompts)


def _cmd_loadtest_compare(a) -> int:
    import shlex

    from slimsd.loadtest.compare import CompareConfig, run_compare

    from slimsd.cliargs import from_args

    cfg = CompareConfig(**from_args(CompareConfig, a, skip=("command",)),
                        command="slimsd " + shlex.join(sys.argv[1:] if sys.argv[1:2] == ["loadtest"] else
                                                       ["loadtest", "compare"]))
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    r = run_compare(cfg, log=log)
    if a.json:
        print(json.dumps({"files": r["files"], "speedups": r["speedups"], "models": r["models"]}, default=str))
    else:
        print(open(r["files"]["md"]).read())
        print(f"wrote {', '.join(r['files'].values())}")
    return 0


def _cmd_loadtest_prompts(a) -> int:
    from slimsd.loadtest.prompts import write_prompts

    path = write_prompts(a.file, a.num)
    print(json.dumps({"file": str(path), "num": a.num}) if a.json else f"wrote {a.num} prompts to {path}")
    return 0


# commands whose flags are read off the training stack's config classes (slimsd.compress)
_HELP = {"train-teacher": "train the tiny-sd teacher (VAE, then U-Net) on the offline scene dataset",
         "compress": "build toolchain: sensitivity analysis, pruning, training, tiny VAE, the whole chain"}


def _add_triton(sub):
    """``slimsd triton serve REPO``: the ``nvidia-pytriton`` wheel's tritonserver (flags: TritonServerConfig)."""
    from slimsd.cliargs import add_fields
    from slimsd.export.triton_server import TritonServerConfig

    p = _sub(sub, "triton", help="run a local tritonserver (nvidia-pytriton wheel, CPU) on a model repository")
    tsub = p.add_subparsers(dest="triton_command", required=True)
    s = _sub(tsub, "serve", help="serve a `slimsd export triton --backend python` repository until SIGTERM")
    s.add_argument("repo", help="the model repository folder")
    add_fields(s, TritonServerConfig)
    s.set_defaults(func=_cmd_triton_serve)


def _cmd_triton_serve(a) -> int:
    from slimsd.cliargs import from_args
    from slimsd.export.triton_server import TritonNotInstalled, TritonServerConfig, TritonStartError, serve

    try:
        return serve(a.repo, TritonServerConfig(**from_args(TritonServerConfig, a)),
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    except (TritonNotInstalled, TritonStartError) as e:
        print(f"slimsd triton serve: error: {e}", file=sys.stderr)
        return 3


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; with ``command`` (the subcommand about to run) the training commands are
    stubs unless it is one of them, so ``slimsd serve`` never imports ``slimsd.compress``."""
    p = argparse.ArgumentParser(prog="slimsd", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    full = command is None or command in _HELP

    def training(name, add):
        if full:
            add(sub)
        else:  # listed in `slimsd --help`, built for real only when run
            sub.add_parser(name, help=_HELP[name])

    _add_info(sub)
    training("train-teacher", _add_train_teacher)
    _add_evaluator(sub)
    _add_evaluate(sub)
    training("compress", _add_compress)
    _add_export(sub)
    _add_serve(sub)
    _add_loadtest(sub)
    _add_triton(sub)
    return p


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    command = next((x for x in args if not x.startswith("-")), None)
    parser = build_parser(command)
    a = parser.parse_args(args)
    try:
        return a.func(a)
    except (FileNotFoundError, ValueError) as e:  # user errors: one line naming what is wrong
        print(f"slimsd {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
