import json

import pytest

from slimsd.models import SD21_UNET, TINY_UNET, build_components, count_params, resolve_model


def test_sd21_base_arch_has_the_published_parameter_counts():
    unet, vae, te, _, sched = build_components("sd21-base-arch", device="meta")
    assert count_params(unet) == 865_910_724
    assert count_params(te) == 340_387_840
    assert count_params(vae) == 83_653_863
    assert te.config.num_hidden_layers == 23
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.prediction_type == "epsilon"


def test_tiny_sd_has_sd21_block_structure():
    unet, vae, te, tok, sched = build_components("tiny-sd")
    for key in ("down_block_types", "up_block_types", "mid_block_type", "layers_per_block", "use_linear_projection"):
        assert unet.config[key] == type(unet.config[key])(SD21_UNET[key]), key
    assert [len(b.resnets) for b in unet.down_blocks] == [2, 2, 2, 2]
    assert [len(b.resnets) for b in unet.up_blocks] == [3, 3, 3, 3]
    assert unet.config.cross_attention_dim == te.config.hidden_size
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4  # 8x down-sampling
    assert (sched.config.beta_start, sched.config.beta_end, sched.config.num_train_timesteps) == (0.00085, 0.012, 1000)
    assert te.config.vocab_size == len(tok)
    assert count_params(unet) < 5e6
    assert TINY_UNET["block_out_channels"] != SD21_UNET["block_out_channels"]


def test_resolve_model_errors_name_the_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="not-a-model"):
        resolve_model("not-a-model")
    # a hub id offline and not cached: a clear error, no hang
    with pytest.raises(FileNotFoundError, match="someone/nothing-here"):
        resolve_model("someone/nothing-here")


def test_resolve_model_accepts_a_pipeline_folder(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert resolve_model(str(tmp_path)) == tmp_path
