"""slimsd's pipeline against OpenVINO GenAI's ``Text2ImagePipeline`` on the same model, end to end.

    python -m venv --system-site-packages /tmp/ovgenai-venv
    /tmp/ovgenai-venv/bin/pip install "openvino-genai==$(python -c 'import openvino;print(openvino.__version__.split("-")[0])').0" \\
        "openvino-tokenizers==<the same>"
    /tmp/ovgenai-venv/bin/python benchmarks/peer_genai.py --models tiny-sd,tiny-sd-slim --threads 1 --repeats 20

OpenVINO GenAI (Intel's C++ generation pipelines with Python bindings, ``openvino-genai``) is the
strongest CPU peer: the whole denoising loop, scheduler and tokenizer in C++ over the same
OpenVINO CPU plugin. Its folder layout is optimum-intel's export (``<component>/openvino_model.xml``
+ ``config.json``, ``tokenizer/openvino_tokenizer.xml``); optimum-intel cannot load slimsd's pruned
U-Net class, so this script writes that layout from **the same ONNX files** slimsd serves
(``slimsd export onnx``, the serve cache): ``openvino.convert_model`` per component (the U-Net's
``timestep`` input takes GenAI's int64 through a PrePostProcessor conversion to the exported
float32), ``openvino_tokenizers.convert_tokenizer`` for the tokenizer, configs and scheduler copied.

Timed, interleaved per round (one image, the model's default steps and guidance 7.5, 64x64 for the
tiny models): slimsd's served pipeline on OpenVINO at each precision and on ONNX Runtime, GenAI at
each precision, all on ``--threads`` threads. Median over ``--repeats`` rounds after 2 warm-up
rounds. The images cannot match pixel for pixel (GenAI draws its own initial noise), so the script
writes a side-by-side PNG of the first prompts to look at, and checks that each GenAI image is a
real image (not constant).

Writes ``benchmarks/results/peer_genai.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_common import RESULTS, ROOT, log, machine  # noqa: E402

PROMPTS = ["a red circle left of a blue square", "a small green triangle above a yellow circle",
           "two blue squares on a white background", "a purple star right of an orange square"]


def genai_folder(model: str, out: Path) -> Path:
    """optimum-intel's OpenVINO layout for ``model``, converted from slimsd's ONNX export of it."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    from slimsd.models import resolve_model
    from slimsd.serve.models import ensure_onnx

    src = resolve_model(model)
    onnx = ensure_onnx(model, src)
    done = out / "slimsd-genai.json"
    key = {"onnx_manifest": json.loads((onnx / "manifest.json").read_text()).get("files"), "openvino": ov.__version__}
    if done.is_file() and json.loads(done.read_text()) == key:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    index = json.loads((src / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]  # GenAI reads the configs, not the class
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.copytree(src / "scheduler", out / "scheduler")
    for comp, cfg in (("text_encoder", "text_encoder"), ("unet", "unet"), ("vae_decoder", "vae")):
        (out / comp).mkdir()
        shutil.copy(src / cfg / "config.json", out / comp / "config.json")
        m = ov.convert_model(str(onnx / comp / "model.onnx"))
        if comp == "unet":
            ppp = ov.preprocess.PrePostProcessor(m)
            ppp.input("timestep").tensor().set_element_type(ov.Type.i64)
            m = ppp.build()
        if comp == "text_encoder":  # GenAI reads output 0: keep last_hidden_state only
            m = ov.Model([m.output("last_hidden_state")], m.get_parameters(), "text_encoder")
        ov.save_model(m, str(out / comp / "openvino_model.xml"), compress_to_fp16=False)
    tok, detok = convert_tokenizer(AutoTokenizer.from_pretrained(src / "tokenizer"), with_detokenizer=True)
    (out / "tokenizer").mkdir()
    ov.save_model(tok, str(out / "tokenizer" / "openvino_tokenizer.xml"))
    ov.save_model(detok, str(out / "tokenizer" / "openvino_detokenizer.xml"))
    for f in (src / "tokenizer").iterdir():
        shutil.copy(f, out / "tokenizer" / f.name)
    done.write_text(json.dumps(key))
    log(f"wrote {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-sd,tiny-sd-slim")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--work", default=str(ROOT / "runs" / "genai"))
    ap.add_argument("--stem", default="peer_genai")
    a = ap.parse_args()

    import openvino_genai as ov_genai

    from slimsd.serve.pipeline import load_served_pipeline
    from slimsd.serve.runners_openvino import compile_config, cpu_supports_bf16
    from slimsd.serve.settings import ServeSettings

    before = machine(a.threads)
    log(f"load average before: {before['load_average']}")
    t_start = time.time()
    precisions = ["f32"] + (["bf16"] if cpu_supports_bf16() else [])
    rows, grids = [], []
    for model in a.models.split(","):
        folder = genai_folder(model, Path(a.work) / model)
        runs: dict[str, object] = {}
        for prec in precisions:
            pipe = load_served_pipeline(ServeSettings(model=model, backend="openvino", precision=prec,
                                                      threads=a.threads, warmup=False))
            runs[f"slimsd openvino-{prec}"] = pipe
        ort = load_served_pipeline(ServeSettings(model=model, backend="onnxruntime", threads=a.threads, warmup=False))
        runs["slimsd onnxruntime-fp32"] = ort
        steps, guidance = ort.defaults.steps, ort.defaults.guidance
        h, w = ort.image_size
        for prec in precisions:
            g = ov_genai.Text2ImagePipeline(str(folder))
            g.compile("CPU", **compile_config(prec, a.threads))  # the same properties slimsd compiles with
            runs[f"genai openvino-{prec}"] = g

        def call(name, i):
            p = PROMPTS[i % len(PROMPTS)]
            r = runs[name]
            if name.startswith("genai"):
                t = r.generate(p, negative_prompt="", width=w, height=h, num_inference_steps=steps,
                               guidance_scale=guidance, rng_seed=i)
                return np.array(t.data[0], copy=True)  # (H, W, 3) uint8; the tensor is reused by the next call
            return r.generate([p], None, [i], steps=steps, guidance=guidance)[0]

        times = {n: [] for n in runs}
        images = {n: [] for n in runs}
        for i in range(-2, a.repeats):
            for name in runs:
                t0 = time.perf_counter()
                img = call(name, max(i, 0))
                dt = time.perf_counter() - t0
                if i >= 0:
                    times[name].append(dt)
                    if i < len(PROMPTS):
                        images[name].append(img)
            if i >= 0:
                log(f"{model} round {i + 1}/{a.repeats}: " + ", ".join(f"{n} {1000 * times[n][-1]:.1f} ms" for n in runs))
        med = {n: statistics.median(v) for n, v in times.items()}
        for n in runs:
            std = float(np.std(np.stack(images[n]).astype(np.float32)))
            if std < 5:
                log(f"WARNING: {model} {n}: near-constant images (pixel std {std:.1f}): check the conversion")
            rows.append({"model": model, "runtime": n, "steps": steps, "guidance": guidance, "size": [h, w],
                         "median_s": med[n], "min_s": min(times[n]), "all_s": times[n], "pixel_std": std})
        grids.append((model, {n: images[n] for n in runs}))
    after = machine(a.threads)
    after["load_average_before"] = before["load_average"]
    result = {"rows": rows, "machine": after, "threads": a.threads, "repeats": a.repeats,
              "openvino_genai": ov_genai.__version__, "wall_s": time.time() - t_start,
              "command": "python benchmarks/peer_genai.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{a.stem}.md").write_text(markdown(result))
    write_grid(grids, RESULTS / f"{a.stem}.png")
    print(markdown(result))


def markdown(r: dict) -> str:
    from slimsd.loadtest.machine import describe

    L = ["# slimsd vs OpenVINO GenAI `Text2ImagePipeline`, same model, same ONNX, end to end", "",
         f"Machine: {describe(r['machine'])} (load average before: "
         f"{' / '.join(str(x) for x in r['machine']['load_average_before'])}); openvino-genai {r['openvino_genai']}.", "",
         f"Command: `{r['command']}` ({r['wall_s'] / 60:.1f} min wall). One image with CFG, the model's default "
         f"steps and guidance; median of {r['repeats']} interleaved rounds after 2 warm-up rounds; "
         f"{r['threads']} thread(s) everywhere.", "",
         "| model | runtime | steps | median | min | GenAI / this (>1: this is faster) |", "|---|---|---:|---:|---:|---:|"]
    for model in dict.fromkeys(x["model"] for x in r["rows"]):
        rows = [x for x in r["rows"] if x["model"] == model]
        best_genai = min(x["median_s"] for x in rows if x["runtime"].startswith("genai"))
        for x in rows:
            same = next((y for y in rows if y["runtime"] == "genai " + x["runtime"].split(" ", 1)[1]), None)
            ref = same["median_s"] if same and x["runtime"].startswith("slimsd") else best_genai
            ratio = "" if x["runtime"].startswith("genai") else f"**{ref / x['median_s']:.2f}x**"
            L.append(f"| {model} | {x['runtime']} | {x['steps']} | {1000 * x['median_s']:.1f} ms | "
                     f"{1000 * x['min_s']:.1f} ms | {ratio} |")
    L += ["", "The ratio compares slimsd's OpenVINO rows with GenAI at the same precision, and slimsd's ONNX "
          "Runtime row with GenAI's fastest row. Images: `peer_genai.png` (columns: runtimes; GenAI's noise "
          "differs, so only the look compares). Pixel standard deviation over those images, per row: " +
          ", ".join(f"{x['model']} {x['runtime']} {x['pixel_std']:.0f}" for x in r["rows"]) + ". Every time is in the JSON."]
    return "\n".join(L) + "\n"


def write_grid(grids, path: Path) -> None:
    from PIL import Image, ImageDraw

    cell, pad = 128, 4
    rows = [(m, n, imgs) for m, d in grids for n, imgs in d.items()]
    cols = max(len(imgs) for _, _, imgs in rows)
    W, H = 220 + cols * (cell + pad), len(rows) * (cell + pad)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (model, name, imgs) in enumerate(rows):
        y = r * (cell + pad)
        draw.text((4, y + cell // 2 - 8), f"{model}\n{name}", fill="black")
        for c, img in enumerate(imgs):
            canvas.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (220 + c * (cell + pad), y))
    canvas.save(path)


if __name__ == "__main__":
    main()
