"""Issue #5: specs, ONNX export (parity, caching, layout), TensorRT plan, Triton repository.

Everything runs on CPU with a random-weight tiny-sd pipeline exported once per session;
the image-parity test uses the trained tiny-sd when slimsd/assets/tiny-sd exists.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from slimsd.models import SD21_TEXT_ENCODER, SD21_UNET, SD21_VAE, TINY_SD_DIR
from slimsd.specs import COMPONENTS, ModelDims, component_specs

ONNX_TYPES = {1: "float32", 10: "float16", 7: "int64"}
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}


# ---------------------------------------------------------------------------------------
# fixtures: one random tiny pipeline, two exports, per session
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    import torch

    from slimsd.models import build_components, make_pipeline

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny-random") / "pipe"
    make_pipeline(*build_components("tiny-sd")).save_pretrained(folder)
    (folder / "manifest.json").write_text(json.dumps({"default_steps": 12, "default_guidance": 6.0}))
    return folder


@pytest.fixture(scope="session")
def onnx_fp32(tiny_pipeline, tmp_path_factory) -> Path:
    from slimsd.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "fp32"
    export_onnx(tiny_pipeline, out)
    return out


@pytest.fixture(scope="session")
def onnx_fp16_dynamic(tiny_pipeline, tmp_path_factory) -> Path:
    from slimsd.export.onnx import OnnxExportConfig, export_onnx

    out = tmp_path_factory.mktemp("onnx") / "fp16-dyn"
    export_onnx(tiny_pipeline, out, OnnxExportConfig(dtype="float16", dynamic_hw=True, external_data="always"))
    return out


def _sd21_configs():
    return {"unet": SD21_UNET, "vae": SD21_VAE, "text_encoder": SD21_TEXT_ENCODER}


def _graph_io(path: Path):
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def rows(values):
        return {v.name: (ONNX_TYPES[v.type.tensor_type.elem_type],
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values}

    return rows(m.graph.input), rows(m.graph.output), m


# ---------------------------------------------------------------------------------------
# specs
# ---------------------------------------------------------------------------------------
def test_specs_use_optimum_names_and_sd21_sizes():
    specs = component_specs(_sd21_configs(), dtype="float16", dynamic_hw=False)
    assert list(specs) == list(COMPONENTS)
    te, unet, vae = specs["text_encoder"], specs["unet"], specs["vae_decoder"]
    assert te.input_names == ["input_ids"] and te.output_names == ["last_hidden_state", "pooler_output"]
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states"] and unet.output_names == ["out_sample"]
    assert vae.input_names == ["latent_sample"] and vae.output_names == ["sample"]
    assert te.tensor("input_ids").dims == ("batch", 77) and te.tensor("input_ids").dtype == "int64"
    assert te.tensor("last_hidden_state").dims == ("batch", 77, 1024)
    assert unet.tensor("sample").dims == ("batch", 4, 64, 64) and unet.tensor("sample").dtype == "float16"
    assert unet.tensor("timestep").dims == ("batch",) and unet.tensor("timestep").dtype == "float32"
    assert unet.tensor("encoder_hidden_states").dims == ("batch", 77, 1024)
    assert vae.tensor("sample").dims == ("batch", 3, 512, 512)
    assert unet.dims.image_size == (512, 512) and unet.dims.hw_multiple == 64 and unet.dims.vae_scale_factor == 8
    assert unet.dims.vae_scaling_factor == pytest.approx(0.18215)
    assert unet.dynamic_axes() == {"sample": {0: "batch"}, "timestep": {0: "batch"},
                                   "encoder_hidden_states": {0: "batch"}, "out_sample": {0: "batch"}}


def test_dynamic_hw_specs_and_tensorrt_profiles():
    specs = component_specs(_sd21_configs(), dynamic_hw=True)
    unet, vae = specs["unet"], specs["vae_decoder"]
    assert unet.tensor("sample").dims == ("batch", 4, "height", "width")
    assert vae.tensor("sample").dims == ("batch", 3, "image_height", "image_width")
    assert vae.dynamic_axes() == {"latent_sample": {0: "batch", 2: "height", 3: "width"},
                                  "sample": {0: "batch", 2: "image_height", 3: "image_width"}}
    p = unet.profile()  # defaults: batch 1/2/8, 256/512/1024 px
    assert p["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert p["timestep"] == ((1,), (2,), (8,))
    assert p["encoder_hidden_states"] == ((1, 77, 1024), (2, 77, 1024), (8, 77, 1024))
    p = unet.profile(1, 4, 16, min_hw=384, opt_hw=(512, 768), max_hw=768)
    assert p["sample"] == ((1, 4, 48, 48), (4, 4, 64, 96), (16, 4, 96, 96))
    assert specs["text_encoder"].profile(2, 2, 4) == {"input_ids": ((2, 77), (2, 77), (4, 77))}
    with pytest.raises(ValueError, match="multiple of 64"):
        unet.profile(min_hw=200)
    with pytest.raises(ValueError, match="min_batch"):
        unet.profile(4, 2, 8)
    static = component_specs(_sd21_configs())["unet"]
    assert static.profile()["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 64, 64))
    with pytest.raises(ValueError, match="static"):
        static.profile(max_hw=1024)


def test_specs_of_tiny_folder_and_sample_inputs(tiny_pipeline):
    specs = component_specs(tiny_pipeline)
    d = specs["unet"].dims
    assert d.image_size == (64, 64) and (d.latent_height, d.latent_width) == (8, 8)
    assert d.cross_attention_dim == d.text_hidden_size == 128 and d.text_max_length == 77
    x = specs["unet"].sample_inputs(batch=3)
    assert {k: tuple(v.shape) for k, v in x.items()} == {"sample": (3, 4, 8, 8), "timestep": (3,),
                                                         "encoder_hidden_states": (3, 77, 128)}
    ids = specs["text_encoder"].sample_inputs(batch=2, numpy=True)["input_ids"]
    assert ids.dtype == np.int64 and ids.max() < d.vocab_size
    assert ModelDims.from_folder(tiny_pipeline) == d


# ---------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------
def test_onnx_layout_manifest_and_graphs_match_specs(onnx_fp32, tiny_pipeline):
    from slimsd.manifest import verify_manifest

    for name in COMPONENTS:
        assert (onnx_fp32 / name / "model.onnx").is_file()
        assert not (onnx_fp32 / name / "model.onnx_data").exists()  # tiny: one file
    assert (onnx_fp32 / "tokenizer" / "tokenizer_config.json").is_file()
    assert (onnx_fp32 / "scheduler" / "scheduler_config.json").is_file()
    m = verify_manifest(onnx_fp32, patterns=("*",))  # every file's sha256, .onnx included
    assert m["format"] == "slimsd-onnx/1" and m["source"]["folder"] == str(tiny_pipeline)
    assert set(m["versions"]) >= {"slimsd", "torch", "onnx", "onnxruntime"}
    assert m["export"]["dtype"] == "float32" and m["export"]["opset"] >= 17
    assert m["pipeline"]["default_steps"] == 12 and m["pipeline"]["default_guidance"] == 6.0
    assert m["pipeline"]["scheduler"] == "DDIMScheduler"
    specs = component_specs(onnx_fp32)  # read back from the manifest
    for name, spec in specs.items():
        inputs, outputs, model = _graph_io(onnx_fp32 / name / "model.onnx")
        assert inputs == {t.name: (t.dtype, list(t.dims)) for t in spec.inputs}, name
        assert outputs == {t.name: (t.dtype, list(t.dims)) for t in spec.outputs}, name
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "portable ops only (TensorRT, CUDA EP)"
        entry = m["components"][name]
        assert entry["cleanup"]["nodes_after"] < entry["cleanup"]["nodes_before"]
        assert entry["parity"][0]["rel_error"] < 1e-3
        assert entry["parity"][0]["input_shapes"][spec.input_names[0]][0] == 3  # not the traced batch 2


def test_fp16_dynamic_export_with_external_data(onnx_fp16_dynamic):
    import onnxruntime as ort

    m = json.loads((onnx_fp16_dynamic / "manifest.json").read_text())
    specs = component_specs(onnx_fp16_dynamic)
    for name, spec in specs.items():
        files = sorted(p.name for p in (onnx_fp16_dynamic / name).iterdir())
        assert files == ["model.onnx", "model.onnx_data"], name  # one data file per model
        inputs, outputs, _ = _graph_io(onnx_fp16_dynamic / name / "model.onnx")
        assert inputs == {t.name: (t.dtype, list(t.dims)) for t in spec.inputs}
        assert outputs == {t.name: (t.dtype, list(t.dims)) for t in spec.outputs}
        assert all(r["rel_error"] < 1e-2 for r in m["components"][name]["parity"])
    assert specs["unet"].tensor("sample").dims == ("batch", 4, "height", "width")
    assert specs["unet"].tensor("timestep").dtype == "float32"
    # verified at the default and at a non-square size
    assert [r["input_shapes"]["latent_sample"] for r in m["components"]["vae_decoder"]["parity"]] == \
        [[3, 4, 8, 8], [3, 4, 16, 8]]
    sess = ort.InferenceSession(str(onnx_fp16_dynamic / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, specs["vae_decoder"].sample_inputs(batch=1, hw=(128, 192), numpy=True))[0]
    assert out.shape == (1, 3, 128, 192) and out.dtype == np.float16


def test_rerun_skips_cached_stages_and_force_redoes_them(onnx_fp32, tiny_pipeline, tmp_path, monkeypatch):
    from slimsd.export import onnx as ex

    out = tmp_path / "copy"
    shutil.copytree(onnx_fp32, out)
    calls = []
    real = ex.export_component

    def spy(folder, out_, spec, cfg, log=None):
        calls.append(spec.name)
        return real(folder, out_, spec, cfg, log=lambda m: None)

    monkeypatch.setattr(ex, "export_component", spy)
    r = ex.export_onnx(tiny_pipeline, out, log=lambda m: None)
    assert calls == [] and {c["status"] for c in r["components"].values()} == {"cached"}
    # a corrupted file is re-exported, only that stage
    (out / "vae_decoder" / "model.onnx").write_bytes(b"broken")
    r = ex.export_onnx(tiny_pipeline, out, log=lambda m: None)
    assert calls == ["vae_decoder"] and r["components"]["vae_decoder"]["status"] == "exported"
    # changed settings invalidate every stage; --force too (stubbed: no real re-export needed)
    monkeypatch.setattr(ex, "export_component", lambda f, o, spec, cfg, log=None: calls.append(spec.name) or
                        {"files": {}, "sizes": {}, "parity": None, "path": f"{spec.name}/model.onnx"})
    calls.clear()
    ex.export_onnx(tiny_pipeline, out, ex.OnnxExportConfig(optimize=False), log=lambda m: None)
    assert calls == list(COMPONENTS)


def test_force_reexports_everything(onnx_fp32, tiny_pipeline, tmp_path, monkeypatch):
    from slimsd.export import onnx as ex

    out = tmp_path / "copy"
    shutil.copytree(onnx_fp32, out)
    calls = []
    monkeypatch.setattr(ex, "export_component", lambda f, o, spec, cfg, log=None: calls.append(spec.name) or
                        {"files": {}, "sizes": {}, "parity": None, "path": f"{spec.name}/model.onnx"})
    ex.export_onnx(tiny_pipeline, out, ex.OnnxExportConfig(force=True), log=lambda m: None)
    assert calls == list(COMPONENTS)


@pytest.mark.parametrize("change", [{"dtype": "float16"}, {"dynamic_hw": True}, {"opset": 18}])
def test_a_cached_export_is_never_reused_under_other_settings(onnx_fp32, tiny_pipeline, tmp_path, monkeypatch, change):
    """Issue #12's audit: fp32 vs fp16 and static vs dynamic height/width re-export every stage."""
    from slimsd.export import onnx as ex

    out = tmp_path / "copy"
    shutil.copytree(onnx_fp32, out)
    calls = []
    monkeypatch.setattr(ex, "export_component", lambda f, o, spec, cfg, log=None: calls.append(spec.name) or
                        {"files": {}, "sizes": {}, "parity": None, "path": f"{spec.name}/model.onnx"})
    ex.export_onnx(tiny_pipeline, out, ex.OnnxExportConfig(**change), log=lambda m: None)
    assert calls == list(COMPONENTS)


def test_export_settings_name_the_exporter_versions():
    import torch

    import slimsd
    from slimsd.export.onnx import OnnxExportConfig

    s = OnnxExportConfig().settings()
    assert (s["torch"], s["slimsd"]) == (torch.__version__, slimsd.__version__)
    assert OnnxExportConfig(dtype="float16").settings() != s and OnnxExportConfig(dynamic_hw=True).settings() != s


def test_serve_onnx_cache_folder_names_model_dtype_and_axes(tmp_path):
    from slimsd.serve.models import onnx_cache_dir

    dirs = {onnx_cache_dir("tiny-sd", tmp_path / m, d, dyn, tmp_path)
            for m in ("a", "b") for d in ("float32", "float16") for dyn in (False, True)}
    assert len(dirs) == 8


def test_tensorrt_timing_cache_is_per_tensorrt_version_and_gpu(tmp_path):
    from slimsd.export.tensorrt import timing_cache_path

    a = timing_cache_path(tmp_path, {"tensorrt": "10.3.0", "gpu": "NVIDIA A100-SXM4-80GB"})
    assert a.parent == tmp_path and a.name == "timing-10.3.0-NVIDIA_A100-SXM4-80GB.cache"
    assert a != timing_cache_path(tmp_path, {"tensorrt": "10.4.0", "gpu": "NVIDIA A100-SXM4-80GB"})
    assert a != timing_cache_path(tmp_path, {"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3"})


def test_parity_failure_names_the_component(onnx_fp32, tiny_pipeline):
    import torch

    from slimsd.export.onnx import ParityError, check_parity, load_module

    spec = component_specs(onnx_fp32)["unet"]
    module = load_module(tiny_pipeline, "unet")
    assert check_parity(onnx_fp32 / "unet" / "model.onnx", module, spec)["rel_error"] < 1e-3
    with torch.no_grad():
        module.m.conv_out.bias += 0.5  # the torch module no longer matches the file
    with pytest.raises(ParityError, match="unet: ONNX output differs"):
        check_parity(onnx_fp32 / "unet" / "model.onnx", module, spec)


def test_cli_export_onnx_fails_loudly_and_reports_cached(onnx_fp32, tiny_pipeline, tmp_path, capsys):
    from slimsd.cli import main

    rc = main(["export", "onnx", str(tiny_pipeline), str(tmp_path / "strict"), "--tolerance", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and "text_encoder: ONNX output differs" in err
    assert "text_encoder" not in json.loads((tmp_path / "strict" / "manifest.json").read_text())["components"]
    out = tmp_path / "copy"
    shutil.copytree(onnx_fp32, out)
    assert main(["export", "onnx", str(tiny_pipeline), str(out), "--json"]) == 0
    captured = capsys.readouterr()
    r = json.loads(captured.out)
    assert {c["status"] for c in r["components"].values()} == {"cached"}
    assert "[unet] cached" in captured.err


def test_pruned_unet_exports_through_model_index(tiny_pipeline, onnx_fp32, tmp_path):
    """A BK-SDM-Tiny-pruned student (PrunedUNet2DConditionModel via model_index) exports and verifies."""
    from slimsd.compress.prune import PRESETS, prune_pipeline
    from slimsd.export.onnx import OnnxExportConfig, export_component

    pruned = prune_pipeline(str(tiny_pipeline), PRESETS["bk-tiny"], tmp_path / "bk-tiny")
    assert json.loads((pruned / "model_index.json").read_text())["unet"][1] == "PrunedUNet2DConditionModel"
    spec = component_specs(pruned)["unet"]
    entry = export_component(pruned, tmp_path / "out", spec, OnnxExportConfig(), log=lambda m: None)
    assert entry["parity"][0]["rel_error"] < 1e-3
    full = json.loads((onnx_fp32 / "manifest.json").read_text())["components"]["unet"]
    assert entry["cleanup"]["nodes_after"] < full["cleanup"]["nodes_after"]
    assert sum(entry["sizes"].values()) < sum(full["sizes"].values())


def test_clean_up_handles_external_data_written_by_the_exporter(onnx_fp32, tmp_path):
    """Torch writes >2 GB models as one file per tensor; clean-up must produce one data file."""
    import onnx
    import onnxruntime as ort

    from slimsd.export.onnx import clean_up

    raw = tmp_path / "raw"
    raw.mkdir()
    model = onnx.load(str(onnx_fp32 / "vae_decoder" / "model.onnx"))
    onnx.save_model(model, str(raw / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=1024)  # torch's exporter keeps tensors under 1 KiB inline too
    assert len(list(raw.iterdir())) > 10
    for optimize in (True, False):
        dst = tmp_path / f"final-{optimize}" / "model.onnx"
        clean_up(raw / "model.onnx", dst, optimize=optimize, dtype="float32", external=True)
        assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
        spec = component_specs(onnx_fp32)["vae_decoder"]
        feeds = spec.sample_inputs(batch=1, numpy=True)
        a = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        b = ort.InferenceSession(str(onnx_fp32 / "vae_decoder" / "model.onnx"),
                                 providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# the shared denoising loop and the ONNX Runtime runners
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def parity_source(tmp_path_factory, tiny_pipeline) -> tuple[Path, Path]:
    """(pipeline folder, its fp32 ONNX export): the trained tiny-sd when present, else random."""
    if (TINY_SD_DIR / "model_index.json").is_file():
        from slimsd.export.onnx import export_onnx

        out = tmp_path_factory.mktemp("onnx") / "tiny-sd"
        export_onnx("tiny-sd", out)
        return TINY_SD_DIR, out
    return tiny_pipeline, None


def test_onnx_runtime_generate_matches_diffusers_pipeline(parity_source, onnx_fp32):
    """Done-criterion of #5: same DDIM, seed, prompt -> same image within 2/255."""
    import torch
    from diffusers import StableDiffusionPipeline

    from slimsd.runners_ort import OrtRunners

    folder, exported = parity_source
    exported = exported or onnx_fp32
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle left of a blue square", "a green triangle above a yellow cross"]
    seeds = [0, 7]
    ref = pipe(prompts, num_inference_steps=10, guidance_scale=7.5, height=64, width=64, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    ref = (ref * 255).round().astype(np.uint8)  # what output_type="pil" does
    runners = OrtRunners(exported, providers=["CPUExecutionProvider"], threads=1)
    got = runners.generate(prompts, steps=10, guidance=7.5, seeds=seeds)
    assert got.shape == ref.shape == (2, 64, 64, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - ref.astype(int))
    print(f"\nimage parity ({folder.name}): max |onnx - diffusers| = {diff.max()} / 255, "
          f"mean {diff.mean():.4f}, pixels differing {int((diff > 0).sum())} of {diff.size}")
    assert diff.max() <= 2
    assert ref.std() > 1  # not a blank image


def test_initial_noise_is_diffusers_randn_tensor():
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from slimsd.denoise import initial_latents

    lat, gens = initial_latents([3, 5, 11], (4, 8, 8))
    ref = randn_tensor((3, 4, 8, 8), generator=[torch.Generator().manual_seed(s) for s in (3, 5, 11)])
    assert torch.equal(lat, ref) and len(gens) == 3


class _RecordingRunners:
    def __init__(self):
        self.calls = []

    def text_encoder(self, input_ids):
        self.calls.append(("text_encoder", input_ids.shape, input_ids.dtype))
        return np.zeros((input_ids.shape[0], 77, 8), np.float32)

    def unet(self, sample, timestep, encoder_hidden_states):
        self.calls.append(("unet", sample.shape, timestep.dtype, tuple(timestep)))
        return np.zeros_like(sample)

    def vae_decoder(self, latent_sample):
        self.calls.append(("vae_decoder", latent_sample.shape))
        n, _, h, w = latent_sample.shape  # a left-to-right ramp, -1 (black) to 1 (white)
        return np.broadcast_to(np.linspace(-1, 1, w * 8, dtype=np.float32), (n, 3, h * 8, w * 8)).copy()


def test_generate_batches_cfg_and_validates_arguments(tiny_pipeline):
    from slimsd.denoise import generate, load_scheduler, load_tokenizer

    tok = load_tokenizer(tiny_pipeline / "tokenizer")
    sched = load_scheduler(tiny_pipeline / "scheduler")
    r = _RecordingRunners()
    img = generate(r, tok, sched, ["a", "b", "c"], steps=2, guidance=7.5, seeds=0, height=64, width=64,
                   vae_scaling_factor=1.0)
    assert img.shape == (3, 64, 64, 3) and (img[:, :, 0] == 0).all() and (img[:, :, -1] == 255).all()
    assert r.calls[0] == ("text_encoder", (6, 77), np.int64)  # [negative x3, positive x3]
    unet_calls = [c for c in r.calls if c[0] == "unet"]
    assert len(unet_calls) == 2 and unet_calls[0][1] == (6, 4, 8, 8) and unet_calls[0][2] == np.float32
    assert len(set(unet_calls[0][3])) == 1  # one timestep per batch row
    assert sched.timesteps is None or len(sched.timesteps) != 2  # the caller's scheduler is untouched
    r = _RecordingRunners()
    generate(r, tok, sched, "a", steps=1, guidance=1.0, seeds=[1], height=64, width=64, vae_scaling_factor=1.0)
    assert r.calls[0][1] == (1, 77)  # no CFG at guidance <= 1
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        generate(r, tok, sched, ["a", "b", "c"], seeds=[1, 2], height=64, width=64, vae_scaling_factor=1.0)


# ---------------------------------------------------------------------------------------
# TensorRT (configuration only without a GPU)
# ---------------------------------------------------------------------------------------
def test_tensorrt_plan_profiles_flags_and_layout(onnx_fp32, onnx_fp16_dynamic, tmp_path):
    from slimsd.export.tensorrt import TensorRTConfig, plan_engines

    jobs = plan_engines(onnx_fp32, tmp_path / "engines")
    assert [j.component for j in jobs] == list(COMPONENTS)
    assert [j.plan for j in jobs] == [tmp_path / "engines" / f"{c}.plan" for c in COMPONENTS]
    unet = jobs[1]
    assert unet.profile == {"sample": ((1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8)), "timestep": ((1,), (2,), (8,)),
                            "encoder_hidden_states": ((1, 77, 128), (2, 77, 128), (8, 77, 128))}
    assert unet.flags == ["TF32", "FP16"] and unet.onnx == onnx_fp32 / "unet" / "model.onnx"
    assert plan_engines(onnx_fp32, tmp_path, TensorRTConfig(fp16=False))[1].flags == ["TF32"]
    with pytest.raises(ValueError, match="static height/width"):
        plan_engines(onnx_fp32, tmp_path, TensorRTConfig(max_hw=128))
    dyn = plan_engines(onnx_fp16_dynamic, tmp_path, TensorRTConfig(fp16=False, max_batch=4, max_hw=192))
    assert dyn[2].profile["latent_sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 24, 24))
    assert dyn[1].flags == ["TF32", "FP16"]  # fp16 ONNX needs the flag for fp16 kernels


def test_tensorrt_without_gpu_is_a_clear_error(onnx_fp32, tmp_path, monkeypatch, capsys):
    from slimsd.cli import main
    from slimsd.export.tensorrt import TensorRTUnavailable, check_environment

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails even where it is installed
    with pytest.raises(TensorRTUnavailable, match="TensorRT Python package is not importable"):
        check_environment()
    assert main(["export", "tensorrt", str(onnx_fp32), str(tmp_path / "engines")]) == 3
    assert "cannot build TensorRT engines" in capsys.readouterr().err
    assert not (tmp_path / "engines").exists()
    assert main(["export", "tensorrt", str(onnx_fp32), str(tmp_path / "e"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["unet"]["profile"]["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [8, 4, 8, 8]]


def _fake_tensorrt():
    """A stand-in ``tensorrt`` built from a spec of the TensorRT 10 Python API that build_engine uses
    (class, method and argument names as in TensorRT 10): a call outside it, or with other arguments,
    raises instead of being swallowed the way a bare MagicMock swallows everything."""
    import enum

    class Logger:
        WARNING = 2

        def __init__(self, min_severity): ...

    class ITimingCache:
        def serialize(self): ...

    class IOptimizationProfile:
        def set_shape(self, input, min, opt, max): ...

    class IBuilderConfig:
        def set_memory_pool_limit(self, pool, pool_size): ...
        def set_flag(self, flag): ...
        def add_optimization_profile(self, profile): ...
        def create_timing_cache(self, serialized_timing_cache): ...
        def set_timing_cache(self, cache, ignore_mismatch): ...
        def get_timing_cache(self): ...

    class INetworkDefinition:
        num_inputs = 3

    class Builder:
        def __init__(self, logger): ...
        def create_network(self, flags=0): ...
        def create_builder_config(self): ...
        def create_optimization_profile(self): ...
        def build_serialized_network(self, network, config): ...

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger): ...
        def parse_from_file(self, model): ...
        def get_error(self, index): ...

    trt = types.SimpleNamespace(
        __version__="10.3.0", Logger=mock.create_autospec(Logger), Builder=mock.create_autospec(Builder),
        OnnxParser=mock.create_autospec(OnnxParser),
        BuilderFlag=enum.Enum("BuilderFlag", "FP16 BF16 INT8 TF32 STRONGLY_TYPED"),
        MemoryPoolType=enum.Enum("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM"),
        NetworkDefinitionCreationFlag=enum.Enum("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"))
    trt.Logger.WARNING = Logger.WARNING
    builder = trt.Builder.return_value
    builder.create_network.return_value = mock.create_autospec(INetworkDefinition, instance=True)
    builder.create_builder_config.return_value = mock.create_autospec(IBuilderConfig, instance=True)
    builder.create_optimization_profile.return_value = mock.create_autospec(IOptimizationProfile, instance=True)
    timing = mock.create_autospec(ITimingCache, instance=True)
    builder.create_builder_config.return_value.get_timing_cache.return_value = timing
    return trt


def test_build_engine_drives_the_tensorrt_api(onnx_fp32, tmp_path):
    """build_engine against a spec of the TensorRT API: the min/opt/max profile is set and added to the
    config, flags and workspace are set, and build_serialized_network gets that network and config."""
    from slimsd.export.tensorrt import build_engine, plan_engines

    trt = _fake_tensorrt()
    builder = trt.Builder.return_value
    network = builder.create_network.return_value
    config = builder.create_builder_config.return_value
    profile = builder.create_optimization_profile.return_value
    parser = trt.OnnxParser.return_value
    parser.parse_from_file.return_value = True
    config.get_timing_cache.return_value.serialize.return_value = b"CACHE"
    at_build = {}

    def build(net, cfg):  # what the config holds when the engine is built
        at_build.update(profiles=[c.args for c in cfg.add_optimization_profile.call_args_list],
                        flags=[c.args for c in cfg.set_flag.call_args_list])
        return b"PLAN"

    builder.build_serialized_network.side_effect = build
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"OLD")
    job = plan_engines(onnx_fp32, tmp_path / "engines")[1]
    build_engine(job, cache, trt=trt, log=lambda m: None)

    assert job.plan.read_bytes() == b"PLAN" and cache.read_bytes() == b"CACHE"
    trt.Logger.assert_called_once_with(trt.Logger.WARNING)
    builder.create_network.assert_called_once_with(0)  # explicit batch: TensorRT 10's only mode
    trt.OnnxParser.assert_called_once_with(network, trt.Logger.return_value)
    parser.parse_from_file.assert_called_once_with(str(job.onnx))
    config.set_memory_pool_limit.assert_called_once_with(trt.MemoryPoolType.WORKSPACE, job.workspace_bytes)
    assert profile.set_shape.call_args_list == [
        mock.call("sample", (1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8)),
        mock.call("timestep", (1,), (2,), (8,)),
        mock.call("encoder_hidden_states", (1, 77, 128), (2, 77, 128), (8, 77, 128))]
    config.add_optimization_profile.assert_called_once_with(profile)
    assert at_build == {"profiles": [(profile,)], "flags": [(trt.BuilderFlag.TF32,), (trt.BuilderFlag.FP16,)]}
    builder.build_serialized_network.assert_called_once_with(network, config)
    config.create_timing_cache.assert_called_once_with(b"OLD")  # the previous cache is reused
    config.set_timing_cache.assert_called_once_with(config.create_timing_cache.return_value, ignore_mismatch=False)

    builder.build_serialized_network.side_effect, builder.build_serialized_network.return_value = None, None
    with pytest.raises(RuntimeError, match="unet: TensorRT engine build failed"):
        build_engine(job, cache, trt=trt, log=lambda m: None)
    parser.parse_from_file.return_value = False
    parser.num_errors = 1
    parser.get_error.return_value = "unsupported op"
    with pytest.raises(RuntimeError, match="unet: TensorRT could not parse .*unsupported op"):
        build_engine(job, cache, trt=trt, log=lambda m: None)


@pytest.mark.gpu
def test_tensorrt_engines_build_on_a_gpu(onnx_fp32, tmp_path):  # pragma: no cover - needs CUDA + TensorRT
    pytest.importorskip("tensorrt")
    from slimsd.export.tensorrt import export_tensorrt

    r = export_tensorrt(onnx_fp32, tmp_path / "engines")
    for c in COMPONENTS:
        assert Path(r["engines"][c]).stat().st_size > 0
    assert (tmp_path / "engines" / "timing.cache").stat().st_size > 0


# ---------------------------------------------------------------------------------------
# Triton model repository
# ---------------------------------------------------------------------------------------
def _parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("which", ["fp32", "fp16_dynamic"])
def test_triton_configs_match_the_onnx_files(which, onnx_fp32, onnx_fp16_dynamic, tmp_path):
    import tritonclient.grpc.model_config_pb2  # noqa: F401  (dev extra: a missing tritonclient fails, not skips)
    from tritonclient.grpc import model_config_pb2 as pb

    from slimsd.export.triton import export_triton

    src = onnx_fp32 if which == "fp32" else onnx_fp16_dynamic
    repo = tmp_path / "model_repository"
    written = export_triton(src, repo, log=lambda m: None)
    assert set(written) == {*COMPONENTS, "pipeline"}
    for name in COMPONENTS:
        cfg = _parse_config(repo / name / "config.pbtxt")
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
        assert cfg.HasField("dynamic_batching") and cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
        onnx_files = sorted(p.name for p in (src / name).iterdir())
        assert sorted(p.name for p in (repo / name / "1").iterdir()) == onnx_files  # data file beside model.onnx
        inputs, outputs, _ = _graph_io(repo / name / "1" / "model.onnx")
        for entries, graph in ((cfg.input, inputs), (cfg.output, outputs)):
            assert [e.name for e in entries] == list(graph), name
            for e in entries:
                dtype, dims = graph[e.name]
                assert pb.DataType.Name(e.data_type) == TRITON_TYPES[dtype], (name, e.name)
                assert list(e.dims) == [-1 if isinstance(d, str) else d for d in dims], (name, e.name)
    p = _parse_config(repo / "pipeline" / "config.pbtxt")
    assert p.backend == "python" and p.max_batch_size == 0
    ins = {i.name: i for i in p.input}
    assert pb.DataType.Name(ins["prompt"].data_type) == "TYPE_STRING" and not ins["prompt"].optional
    assert all(ins[n].optional for n in ("negative_prompt", "num_inference_steps", "guidance_scale", "seed"))
    assert [(o.name, pb.DataType.Name(o.data_type), list(o.dims)) for o in p.output] == \
        [("image", "TYPE_UINT8", [-1, -1, -1, 3])]
    for f in ("model.py", "pipeline.json", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        assert (repo / "pipeline" / "1" / f).is_file(), f


def test_triton_tensorrt_backend_uses_plans(onnx_fp32, tmp_path):
    import tritonclient.grpc.model_config_pb2  # noqa: F401  (dev extra: a missing tritonclient fails, not skips)
    from slimsd.export.triton import TritonConfig, export_triton

    engines = tmp_path / "engines"
    engines.mkdir()
    for c in COMPONENTS:
        (engines / f"{c}.plan").write_bytes(b"plan")
    repo = tmp_path / "repo"
    export_triton(onnx_fp32, repo, TritonConfig(backend="tensorrt", engines=str(engines), instances=2),
                  log=lambda m: None)
    for c in COMPONENTS:
        cfg = _parse_config(repo / c / "config.pbtxt")
        assert cfg.platform == "tensorrt_plan" and cfg.instance_group[0].count == 2
        assert (repo / c / "1" / "model.plan").read_bytes() == b"plan"
    with pytest.raises(ValueError, match="--engines"):
        export_triton(onnx_fp32, repo, TritonConfig(backend="tensorrt"), log=lambda m: None)


def _fake_pb_utils(runners):
    """A stand-in ``triton_python_backend_utils``: BLS requests run on the ORT runners."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._a = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._a

        def is_cpu(self):
            return True

    class TritonError:
        def __init__(self, msg):
            self._m = msg

        def message(self):
            return self._m

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self._out, self._err = output_tensors, error

        def has_error(self):
            return self._err is not None

        def error(self):
            return self._err

        def output_tensors(self):
            return self._out

    class InferenceRequest:
        log = []

        def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None):
            self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs
            assert preferred_memory is not None

        def exec(self):
            InferenceRequest.log.append(self.model_name)
            feeds = {t.name(): t.as_numpy() for t in self.inputs}
            spec = runners.specs[self.model_name]
            for t in spec.inputs:  # BLS must send exactly the spec's dtypes
                assert feeds[t.name].dtype == t.numpy_dtype, (self.model_name, t.name)
            out = runners.run(self.model_name, **feeds)
            return InferenceResponse([Tensor(n, out[n]) for n in self.outputs])

    class PreferredMemory:
        def __init__(self, kind, device=0):
            self.kind = kind

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest = Tensor, TritonError, InferenceResponse, InferenceRequest
    pb.PreferredMemory, pb.TRITONSERVER_MEMORY_CPU = PreferredMemory, 0
    pb.TritonModelException = type("TritonModelException", (Exception,), {})
    pb.get_input_tensor_by_name = lambda req, name: req.get(name)
    pb.get_output_tensor_by_name = lambda resp, name: next((t for t in resp.output_tensors() if t.name() == name), None)
    return pb


def test_triton_pipeline_model_runs_the_shared_loop_through_bls(onnx_fp32, tmp_path, monkeypatch):
    from slimsd.export.triton import export_triton
    from slimsd.runners_ort import OrtRunners

    repo = tmp_path / "repo"
    export_triton(onnx_fp32, repo, log=lambda m: None)
    runners = OrtRunners(onnx_fp32, providers=["CPUExecutionProvider"], threads=1)
    pb = _fake_pb_utils(runners)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("triton_pipeline_model_under_test", repo / "pipeline" / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.TritonPythonModel()
    config = (repo / "pipeline" / "config.pbtxt").read_text()
    model.initialize({"model_repository": str(repo / "pipeline"), "model_version": "1", "model_config": config})
    prompts = np.array([b"a red circle left of a blue square", b"a blue cross above a red square"], dtype=object)
    ok = {"prompt": pb.Tensor("prompt", prompts), "num_inference_steps": pb.Tensor("num_inference_steps", np.array([4], np.int32)),
          "guidance_scale": pb.Tensor("guidance_scale", np.array([7.5], np.float32)),
          "seed": pb.Tensor("seed", np.array([3, 9], np.int64))}
    bad = {"prompt": pb.Tensor("prompt", prompts[:1]), "height": pb.Tensor("height", np.array([128], np.int32))}
    responses = model.execute([ok, bad])
    assert not responses[0].has_error()
    image = pb.get_output_tensor_by_name(responses[0], "image").as_numpy()
    expected = runners.generate([p.decode() for p in prompts], steps=4, guidance=7.5, seeds=[3, 9])
    assert image.dtype == np.uint8 and image.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(image, expected)
    assert pb.InferenceRequest.log[:2] == ["text_encoder", "unet"] and "vae_decoder" in pb.InferenceRequest.log
    assert responses[1].has_error() and "static" in responses[1].error().message()
    # defaults come from the export (source manifest: 12 steps, guidance 6.0)
    steps = []
    runners_unet = model.runners.unet
    model.runners.unet = lambda *a: steps.append(1) or runners_unet(*a)
    [r] = model.execute([{"prompt": pb.Tensor("prompt", prompts[:1])}])
    assert not r.has_error() and len(steps) == 12


def test_cli_export_triton(onnx_fp32, tmp_path, capsys):
    from slimsd.cli import main

    assert main(["export", "triton", str(onnx_fp32), "--out", str(tmp_path / "repo"), "--kind", "cpu",
                 "--copy", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["models"]) == {*COMPONENTS, "pipeline"}
    assert "kind: KIND_CPU" in (tmp_path / "repo" / "unet" / "config.pbtxt").read_text()
    assert (tmp_path / "repo" / "unet" / "1" / "model.onnx").stat().st_nlink == 1  # copied, not linked


def test_committed_model_repository_is_what_export_triton_writes(onnx_fp32, tmp_path):
    """model_repository/ is committed for users to read; it must not drift from its generator."""
    from slimsd.export.triton import export_triton

    committed = Path(__file__).resolve().parents[1] / "model_repository"
    repo = tmp_path / "model_repository"
    export_triton(onnx_fp32, repo, log=lambda m: None)  # same architecture and specs as tiny-sd
    for name in (*COMPONENTS, "pipeline"):
        assert (committed / name / "config.pbtxt").read_text() == (repo / name / "config.pbtxt").read_text(), name
    model_py = Path(__file__).resolve().parents[1] / "export" / "triton_pipeline_model.py"
    assert (committed / "pipeline" / "1" / "model.py").read_bytes() == model_py.read_bytes()
