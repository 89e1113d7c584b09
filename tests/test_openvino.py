"""The OpenVINO backend: the serving behaviours of ONNX Runtime, parity, precision, the auto choice.

Uses the session's cached tiny-sd ONNX export (shared with the other serve tests) and the
app helpers of ``test_serve_api``. ``openvino`` is in the ``dev`` extra: without it this file fails
(a broken install), it does not skip; only the bf16 tests skip, with the reason, on CPUs without BF16.

Stated tolerances against the ONNX Runtime runners on the same export, prompts and seeds
(uint8 pixel values, 8 DDIM steps, guidance 7.5):

* OpenVINO f32: max |diff| <= 2/255 (measured 0 to 1: fp32 kernels differ in summation order).
* OpenVINO bf16: mean |diff| <= 2/255, 99th percentile <= 16/255, max <= 64/255 (measured mean
  0.55, p99 6, max 22: bf16 rounds every matmul input to 8 mantissa bits and the loop carries
  it through the steps). Whether that matters for the output distribution is measured with
  the evaluator in docs/serve.md, not here.
"""

from __future__ import annotations

import threading

import numpy as np
import openvino as ov  # dev extra: missing is a failure, not a skip
import pytest

from slimsd.models import TINY_SD_DIR

PROMPTS = ["a red circle left of a blue square", "a green triangle above a yellow cross"]
SEEDS = [0, 7]
GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    from slimsd.serve.models import ensure_onnx

    # the path `slimsd serve` itself uses under the session's SLIMSD_CACHE, so serve tests share it
    return ensure_onnx("tiny-sd", TINY_SD_DIR, cache_dir=tmp_path_factory.getbasetemp() / "slimsd-cache" / "onnx")


def _load(onnx_dir, **kw):
    from slimsd.serve.pipeline import load_served_pipeline
    from slimsd.serve.settings import ServeSettings

    return load_served_pipeline(ServeSettings(model="tiny-sd", onnx_dir=onnx_dir, **kw))


@pytest.fixture(scope="module")
def ort_pipe(onnx_dir):
    return _load(onnx_dir, backend="onnxruntime")


@pytest.fixture(scope="module")
def ov_f32(onnx_dir):
    return _load(onnx_dir, backend="openvino", precision="f32", threads=2)


@pytest.fixture(scope="module")
def ov_bf16(onnx_dir):
    from slimsd.serve.runners_openvino import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no BF16 (OpenVINO OPTIMIZATION_CAPABILITIES)")
    return _load(onnx_dir, backend="openvino", precision="bf16")


def _diff(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return np.abs(a.astype(int) - b.astype(int))


# -- parity with the ONNX Runtime runner ---------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_f32_matches_onnxruntime(ov_f32, ort_pipe, scheduler):
    ref = ort_pipe.generate(PROMPTS, None, SEEDS, steps=8, guidance=7.5, scheduler=scheduler)
    got = ov_f32.generate(PROMPTS, None, SEEDS, steps=8, guidance=7.5, scheduler=scheduler)
    d = _diff(got, ref)
    print(f"\nopenvino f32/{scheduler}: max {d.max()}/255, mean {d.mean():.4f}")
    assert d.max() <= 2
    assert ref.std() > 1  # a real image


def test_bf16_close_to_onnxruntime(ov_bf16, ort_pipe):
    assert ov_bf16.runners.precision == "bf16"
    assert ov_bf16.runners.compiled["unet"].get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    ref = ort_pipe.generate(PROMPTS, None, SEEDS, steps=8, guidance=7.5)
    got = ov_bf16.generate(PROMPTS, None, SEEDS, steps=8, guidance=7.5)
    d = _diff(got, ref)
    print(f"\nopenvino bf16: max {d.max()}/255, mean {d.mean():.3f}, p99 {np.percentile(d, 99)}")
    assert d.mean() <= 2 and np.percentile(d, 99) <= 16 and d.max() <= 64
    assert d.max() > 0  # really bf16: f32 kernels would give (near) identical pixels


def test_other_sizes_batches_and_threads(ov_f32, ort_pipe):
    """Dynamic height/width of the export, micro-batching invariance, thread setting, concurrent workers."""
    a = ov_f32.generate(PROMPTS[:1], None, [3], steps=3, height=128, width=64)
    assert a.shape == (1, 128, 64, 3)
    assert _diff(a, ort_pipe.generate(PROMPTS[:1], None, [3], steps=3, height=128, width=64)).max() <= 2
    both = ov_f32.generate(PROMPTS, ["", "blurry"], SEEDS, steps=3)
    one = ov_f32.generate(PROMPTS[1:], ["blurry"], SEEDS[1:], steps=3)
    assert _diff(both[1:], one).max() <= 1
    assert int(ov_f32.runners.compiled["unet"].get_property("INFERENCE_NUM_THREADS")) == 2
    # two workers at once: each thread has its own infer requests, results equal the serial ones
    out = {}
    ts = [threading.Thread(target=lambda i=i: out.__setitem__(i, ov_f32.generate(PROMPTS[i:i + 1], None, [SEEDS[i]],
                                                                                   steps=3))) for i in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    for i in range(2):
        assert _diff(out[i], ov_f32.generate(PROMPTS[i:i + 1], None, [SEEDS[i]], steps=3)).max() == 0


def test_static_shape_compiles_are_bounded_and_give_the_same_images(onnx_dir, monkeypatch):
    """The first ``static_shapes`` input shapes of each component get a compile of the model
    reshaped to them (the cause of the speed-up: static inputs, docs/serve.md); later shapes run
    the dynamic compile; 0 turns it off. Images equal the dynamic compile's either way."""
    from slimsd.serve.runners_openvino import OpenVINORunners

    dyn = OpenVINORunners(onnx_dir, precision="f32", threads=2, cache=False, static_shapes=0)
    sta = OpenVINORunners(onnx_dir, precision="f32", threads=2, cache=False, static_shapes=1)
    a, b = dyn.generate(PROMPTS, steps=3, seeds=SEEDS), sta.generate(PROMPTS, steps=3, seeds=SEEDS)
    assert _diff(a, b).max() <= 1 and a.std() > 1
    assert dyn.static == {}
    assert sorted(k[0] for k in sta.static) == ["text_encoder", "unet", "vae_decoder"]
    for (name, shapes), compiled in sta.static.items():
        assert all(i.get_partial_shape().is_static for i in compiled.inputs), name
        assert dict(shapes)["sample" if name == "unet" else next(iter(dict(shapes)))][0] in (2, 4)
    assert not sta.compiled["unet"].inputs[0].get_partial_shape().is_static  # the fallback stays dynamic
    # another shape (one prompt): over the bound, so the dynamic compile runs it; same images
    first = dict(sta.static)
    assert _diff(sta.generate(PROMPTS[:1], steps=3, seeds=SEEDS[:1]),
                 dyn.generate(PROMPTS[:1], steps=3, seeds=SEEDS[:1])).max() <= 1
    assert sta.static == first
    with pytest.raises(ValueError, match="static_shapes"):
        OpenVINORunners(onnx_dir, precision="f32", cache=False, static_shapes=-1)
    # the default: static for a small U-Net (tiny-sd's 14 MB), dynamic only above the size line
    import slimsd.serve.runners_openvino as rov

    assert OpenVINORunners(onnx_dir, precision="f32", cache=False).static_shapes == 1
    monkeypatch.setattr(rov, "STATIC_SHAPES_MAX_UNET_BYTES", 1_000_000)
    assert OpenVINORunners(onnx_dir, precision="f32", cache=False).static_shapes == 0


# -- through the app --------------------------------------------------------------------------------
def test_generation_through_the_app_returns_a_png(ov_f32):
    from test_serve_api import png, serving

    with serving(ov_f32) as c:
        assert c.get("/health/ready").json()["backend"] == "openvino"
        assert c.get("/v1/models").json()["data"][0]["backend"] == "openvino"
        r = c.post(GEN, json={"prompt": PROMPTS[0], "n": 2, "num_inference_steps": 3, "seed": 5})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        imgs = [png(d["b64_json"]) for d in data]
        assert len(imgs) == 2 and imgs[0].shape == (64, 64, 3) and imgs[0].std() > 1
        assert np.array_equal(imgs[0], ov_f32.generate(PROMPTS[:1], None, [5], steps=3)[0])
        a = c.post("/sdapi/v1/txt2img", json={"prompt": PROMPTS[1], "steps": 2, "seed": 1, "batch_size": 1})
        assert a.status_code == 200 and png(a.json()["images"][0]).shape == (64, 64, 3)


# -- precision: resolution and errors ---------------------------------------------------------------
class _Core:
    def __init__(self, caps):
        self.caps = caps

    def get_property(self, device, name):
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.caps


def test_precision_resolution():
    from slimsd.serve.runners_openvino import resolve_precision

    with_bf16, without = _Core(["BF16", "FP32", "INT8"]), _Core(["FP32", "INT8", "BIN"])
    assert resolve_precision("auto", with_bf16) == "bf16"
    assert resolve_precision("auto", without) == "f32"
    assert resolve_precision("f32", with_bf16) == "f32"
    assert resolve_precision("bf16", with_bf16) == "bf16"
    assert resolve_precision("auto", capabilities=[]) == "f32"
    with pytest.raises(ValueError, match=r"^precision: bf16 needs a CPU with BF16.*FP32, INT8, BIN"):
        resolve_precision("bf16", without)
    for bad in ("fp16", "BF16", "", "float32"):
        with pytest.raises(ValueError, match=r"^precision: must be one of auto, bf16, f32, int8; got"):
            resolve_precision(bad, with_bf16)


def test_auto_precision_follows_the_cpu(onnx_dir, monkeypatch):
    """A CPU without BF16 (mocked) gets f32 from auto; explicit bf16 there fails at start-up."""
    from slimsd.serve import runners_openvino as rov

    monkeypatch.setattr(rov, "cpu_capabilities", lambda core=None: ["FP32", "INT8"])
    pipe = _load(onnx_dir, backend="openvino")  # precision auto
    assert pipe.runners.precision == "f32"
    assert pipe.runners.compiled["unet"].get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    with pytest.raises(ValueError, match="precision: bf16 needs"):
        _load(onnx_dir, backend="openvino", precision="bf16")


def test_bad_precision_is_a_clear_error_naming_the_field(capsys):
    from pydantic import ValidationError

    from slimsd.cli import build_parser
    from slimsd.serve.settings import ServeSettings

    with pytest.raises(ValidationError) as e:
        ServeSettings(backend="openvino", precision="fp16")
    assert e.value.errors()[0]["loc"] == ("precision",) and "'auto', 'bf16', 'f32' or 'int8'" in str(e.value)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--backend", "openvino", "--precision", "fp16"])
    assert "--precision: invalid choice: 'fp16'" in capsys.readouterr().err
    a = build_parser().parse_args(["serve", "--backend", "openvino", "--precision", "bf16", "--threads", "2",
                                   "--no-openvino-cache"])
    assert (a.backend, a.precision, a.threads, a.openvino_cache) == ("openvino", "bf16", 2, False)


# -- the auto backend and the compiled-model cache --------------------------------------------------
def test_auto_backend_choice(monkeypatch):
    """The size- and CPU-aware rule of docs/serve.md "CPU runtimes", case by case."""
    from slimsd.serve import runners_openvino as rov
    from slimsd.serve.backends import SMALL_UNET_PARAMS, choose_backend
    from slimsd.serve.settings import ServeSettings

    sd, tiny = 865_910_724, 3_390_000  # SD v2.1-base U-Net, tiny-sd U-Net

    def pick(params, bf16, **kw):
        c = choose_backend(ServeSettings(**kw), params, bf16=bf16)
        return c.backend, c.precision

    assert ServeSettings().backend == "auto"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(rov, "available", lambda: True)
    # small U-Nets: ONNX Runtime fp32 whatever the CPU (tiny-sd: 0.347 s vs OpenVINO bf16 0.375 s)
    for bf16 in ("amx", "avx512_bf16", None):
        assert pick(tiny, bf16) == pick(SMALL_UNET_PARAMS - 1, bf16) == ("onnxruntime", "f32")
    # SD-size: bf16 where the CPU has it, on OpenVINO (torch bf16 when openvino is missing); OpenVINO
    # gets auto, which is bf16 there unless the export's int8 report vouches for int8 (test_int8.py)
    assert pick(sd, "amx") == pick(None, "amx") == ("openvino", "auto")
    assert pick(sd, "avx512_bf16") == pick(SMALL_UNET_PARAMS, "avx512_bf16") == ("openvino", "auto")
    assert rov.resolve_precision("auto", capabilities=["BF16", "FP32"]) == "bf16"
    # int8 is OpenVINO's, whatever the size and CPU
    assert pick(tiny, None, precision="int8") == pick(sd, "amx", precision="int8") == ("openvino", "int8")
    assert pick(sd, None) == ("onnxruntime", "f32")
    # the precision setting overrides the size rule
    assert pick(sd, "amx", precision="f32") == ("onnxruntime", "f32")
    assert pick(tiny, "amx", precision="bf16") == ("openvino", "bf16")
    with pytest.raises(ValueError, match="^precision: bf16 needs a CPU with BF16"):
        pick(sd, None, precision="bf16")
    monkeypatch.setattr(rov, "available", lambda: False)
    with pytest.raises(ValueError, match="^precision: int8 needs the openvino backend"):
        pick(sd, "amx", precision="int8")
    for bf16 in ("amx", "avx512_bf16"):
        c = choose_backend(ServeSettings(), sd, bf16=bf16)
        assert (c.backend, c.precision) == ("torch", "bf16") and "pip install 'slimsd[openvino]'" in c.why
    assert pick(tiny, "amx") == ("onnxruntime", "f32")
    # a GPU: ONNX Runtime's CUDA provider
    assert pick(sd, "amx", device="cuda")[0] == "onnxruntime"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert pick(sd, "amx")[0] == "onnxruntime"


def test_auto_backend_reads_the_unet_size_and_serves(onnx_dir, tmp_path, monkeypatch):
    """End to end on tiny-sd: the safetensors header gives the size; auto loads ONNX Runtime fp32;
    /v1/models says so. An SD-size count on a BF16 CPU without openvino loads torch bf16."""
    from slimsd.models import resolve_model
    from slimsd.serve import pipeline as sp
    from slimsd.hardware import cpu_bf16
    from slimsd.models import stored_params

    folder = resolve_model("tiny-sd")
    n = stored_params(folder, "unet")
    import torch
    from diffusers import UNet2DConditionModel

    assert n == sum(p.numel() for p in UNet2DConditionModel.from_pretrained(folder, subfolder="unet").parameters())
    assert stored_params(tmp_path, "unet") is None
    assert cpu_bf16() in ("amx", "avx512_bf16", None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    pipe = _load(onnx_dir, backend="auto")
    assert (pipe.backend, pipe.precision) == ("onnxruntime", "f32")
    ref = pipe.generate(["a red circle left of a blue square"], None, [0], steps=8).astype(int)
    if cpu_bf16() is not None:  # bf16 torch really runs bf16 modules on this CPU
        monkeypatch.setattr(sp, "stored_params", lambda folder, component: 865_910_724)
        monkeypatch.setattr("slimsd.serve.runners_openvino.available", lambda: False)
        pipe = _load(onnx_dir, backend="auto")
        assert (pipe.backend, pipe.precision) == ("torch", "bf16")
        assert pipe.runners.modules["unet"].dtype == torch.bfloat16
        img = pipe.generate(["a red circle left of a blue square"], None, [0], steps=8)
        assert img.shape == ref.shape and img.dtype.name == "uint8"
        diff = np.abs(img.astype(int) - ref)
        print("torch bf16 vs ONNX Runtime fp32, 8 steps: max", diff.max(), "mean", diff.mean())
        assert diff.mean() < 4.0, diff.mean()  # the same picture (bf16 rounding), not another one


def _cache_folders(root, name):
    return sorted(p for p in root.glob(f"{name}-*") if p.is_dir())


def _blobs(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix == ".blob"}


@pytest.mark.parametrize("second", ["bf16", "f32-1-thread"])
def test_f32_then_bf16_compile_into_their_own_cache_folders(second, onnx_dir, ort_pipe, tmp_path):
    """Issue #12: the same export compiled f32 and then bf16 under one cache root.

    Two folders per component, each compiled model reports its own precision hint, a second
    load of each is served from its own blob (OpenVINO's ``LOADED_FROM_CACHE``, the blob
    untouched), and the bf16 images stay within the bf16 tolerances. Under the old keying (the
    ONNX hash alone) the bf16 compile met the f32 blob: one folder, black images, or heap
    corruption on AMX CPUs. The second compile is bf16 (skipped, with the reason, on a CPU
    without BF16) or f32 with other threads, which must get its own folder for the same reason.
    """
    from slimsd.serve.runners_openvino import OpenVINORunners, cpu_supports_bf16

    root = tmp_path / "ovcache"
    if second == "bf16" and not cpu_supports_bf16():
        pytest.skip("this CPU has no BF16 (OpenVINO OPTIMIZATION_CAPABILITIES)")
    second = {"precision": "bf16"} if second == "bf16" else {"precision": "f32", "threads": 1}
    a = OpenVINORunners(onnx_dir, precision="f32", threads=2, cache=root)
    b = OpenVINORunners(onnx_dir, cache=root, **second)
    want = {"f32": "f32", "bf16": "bf16"}
    for name in ("text_encoder", "unet", "vae_decoder"):
        folders = _cache_folders(root, name)
        assert len(folders) == 2, f"{name}: {folders} (one folder: the two compiles share a blob)"
        assert all(len(_blobs(f)) == 1 for f in folders), [list(f.iterdir()) for f in folders]
        for r in (a, b):
            hint = r.compiled[name].get_property("INFERENCE_PRECISION_HINT")
            assert hint.get_type_name() == want[r.precision], (name, r.precision, hint)
            assert r.compiled[name].get_property("LOADED_FROM_CACHE") is False
    before = {f: _blobs(f) for name in ("text_encoder", "unet", "vae_decoder") for f in _cache_folders(root, name)}
    a2 = OpenVINORunners(onnx_dir, precision="f32", threads=2, cache=root)
    b2 = OpenVINORunners(onnx_dir, cache=root, **second)
    for name in ("text_encoder", "unet", "vae_decoder"):
        for r in (a2, b2):
            assert r.compiled[name].get_property("LOADED_FROM_CACHE") is True, (name, r.precision)
            hint = r.compiled[name].get_property("INFERENCE_PRECISION_HINT")
            assert hint.get_type_name() == want[r.precision], (name, r.precision, hint)
    assert {f: _blobs(f) for f in before} == before  # each hit its own blob, none rewritten
    ref = ort_pipe.generate(PROMPTS, None, SEEDS, steps=8, guidance=7.5)
    for r in (a, b, a2, b2):
        img = r.generate(PROMPTS, None, steps=8, guidance=7.5, seeds=SEEDS)
        assert img.mean() > 10, f"{r.precision}: a black image"
        d = _diff(img, ref)
        if r.precision == "f32":
            assert d.max() <= 2, (r.precision, d.max())
        else:
            assert d.mean() <= 2 and np.percentile(d, 99) <= 16 and d.max() <= 64, (d.mean(), d.max())


def test_compiled_model_cache_is_keyed_by_the_onnx_hash(onnx_dir, ov_f32, tmp_path):
    """A re-export gets a fresh cache folder and the older export's folder goes."""
    import json
    import shutil

    from slimsd.serve.runners_openvino import CACHE_KEY_FILE, OpenVINORunners

    folder = tmp_path / "export"
    shutil.copytree(onnx_dir, folder)  # with the cache ov_f32 filled
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("text_encoder", "unet", "vae_decoder"):
        for sub in _cache_folders(folder / "openvino", name):
            key = json.loads((sub / CACHE_KEY_FILE).read_text())
            assert key["onnx_sha256"] == manifest["components"][name]["files"]
            assert key["compile"]["INFERENCE_PRECISION_HINT"] in ("f32", "bf16")
            assert _blobs(sub), f"{name}: no blob cached in {sub}"
    old = _cache_folders(folder / "openvino", "vae_decoder")
    # a "re-export" of the VAE decoder: other bytes, so other sha256 in the export's manifest
    shutil.copy(folder / "text_encoder" / "model.onnx", folder / "vae_decoder" / "model.onnx")
    manifest["components"]["vae_decoder"]["files"] = {"vae_decoder/model.onnx": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="do not match the spec"):  # the new file, not the old blob
        OpenVINORunners(folder, precision="f32")
    new = _cache_folders(folder / "openvino", "vae_decoder")
    assert len(new) == 1 and new[0] not in old and not any(o.exists() for o in old)
    none = OpenVINORunners(onnx_dir, precision="f32", cache=False)
    assert none.cache_root is None and "CACHE_DIR" not in none._config_for("unet")
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert np.array_equal(none.vae_decoder(x), ov_f32.runners.vae_decoder(x))  # cached blob == fresh compile
