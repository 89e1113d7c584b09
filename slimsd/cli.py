"""``slimsd`` command line. Subcommands are thin: they parse, call a library function, print.

``--json`` prints exactly one JSON object on stdout (progress bars go to stderr).
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
    from dataclasses import asdict

    from slimsd.compress.teacher import TeacherConfig

    D = asdict(TeacherConfig())

    p = _sub(sub, "train-teacher", help="train the tiny-sd teacher (VAE, then U-Net) on the offline scene dataset")
    p.add_argument("--out", default=D["out"], help="pipeline folder to write (default: the packaged tiny-sd)")
    for k in ("seed", "vae_steps", "vae_batch", "unet_steps", "unet_batch", "num_latents", "threads"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=D[k])
    for k in ("vae_lr", "unet_lr", "ema_decay", "caption_dropout"):
        p.add_argument("--" + k.replace("_", "-"), type=float, default=D[k])
    p.set_defaults(func=_cmd_train_teacher)


def _cmd_train_teacher(a) -> int:
    from slimsd.compress.teacher import TeacherConfig, train_teacher

    fields = TeacherConfig.__dataclass_fields__
    cfg = TeacherConfig(**{k: v for k, v in vars(a).items() if k in fields})
    out = train_teacher(cfg)
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
    p = _sub(sub, "evaluate", help="generate for held-out prompts and report FD and alignment")
    p.add_argument("model", help="preset (tiny-sd, sd21-base-arch), diffusers folder or hub id")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--split", default="heldout", choices=("heldout", "train"))
    p.add_argument("--out", default=None, help="folder for samples.png and metrics.json")
    p.add_argument("--metrics", default="scene", help="'scene' (FD, alignment; offline scene prompts) or a comma list "
                   "of fid,clip,is for real SD (needs --reference and local weights)")
    p.add_argument("--reference", default=None, help="image+caption data for fid/clip/is: folder, CSV/JSONL, "
                   "webdataset shards or HF dataset (e.g. MS-COCO 2014 val captions)")
    p.add_argument("--clip-model", default=None, help="local folder of a transformers CLIPModel + processor")
    p.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--resolution", type=int, default=512, help="reference image size for fid/clip/is")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(a) -> int:
    from slimsd.evaluator import evaluate, evaluate_coco

    if a.metrics != "scene":
        if not a.reference:
            raise ValueError("--reference is required with --metrics fid,clip,is")
        r = evaluate_coco(a.model, a.reference, steps=a.steps, guidance=a.guidance, num_prompts=a.num_prompts,
                          seed=a.seed, out=a.out, clip_model=a.clip_model, inception_weights=a.inception_weights,
                          metrics=[m.strip() for m in a.metrics.split(",")], resolution=a.resolution,
                          batch_size=a.batch_size)
        print(json.dumps(r) if a.json else json.dumps(r, indent=2))
        return 0
    r = evaluate(a.model, steps=a.steps, guidance=a.guidance, num_prompts=a.num_prompts, seed=a.seed,
                 out=a.out, split=a.split, batch_size=a.batch_size)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{a.model}: steps={a.steps} guidance={a.guidance} prompts={a.num_prompts} ({a.split})")
        print(f"  FD        {r['fd']:.3f}  (lower is better)")
        print(f"  alignment {r['alignment']:.3f}  (higher is better)")
        if a.out:
            print(f"  wrote {a.out}/samples.png and metrics.json")
    return 0


def _add_info(sub):
    p = _sub(sub, "info", help="parameters of each component of a model")
    p.add_argument("model", help="preset (tiny-sd, sd21-base-arch), diffusers folder or hub id")
    p.set_defaults(func=_cmd_info)


def _cmd_info(a) -> int:
    from slimsd.info import info

    r = info(a.model)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"{r['model']}")
    for name, n in r["params"].items():
        print(f"  {name:<13} {n:>15,d} params")
    print(f"  {'total':<13} {r['total_params']:>15,d} params")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimsd", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    _add_info(sub)
    _add_train_teacher(sub)
    _add_evaluator(sub)
    _add_evaluate(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except (FileNotFoundError, ValueError) as e:  # user errors: one line naming what is wrong
        print(f"slimsd {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
