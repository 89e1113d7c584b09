"""FID / CLIP score / IS on COCO-style prompts (slimsd.metrics_coco), offline.

The CLIP score runs end to end through torchmetrics' CLIPScore on a tiny random CLIP saved
to disk and is checked against a hand computation with the same model. FID and IS run
through torchmetrics' real FrechetInceptionDistance / InceptionScore with a tiny stand-in
feature network (the real Inception weights can't be fetched offline) and are checked
against hand computations; the test with the real weights runs only when
SLIMSD_INCEPTION_WEIGHTS points at pt_inception-2015-12-05-6726825d.pth.
"""

from __future__ import annotations

import math
import os
import socket
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from slimsd import metrics_coco
from slimsd.metrics_coco import INCEPTION_WEIGHTS_FILE, coco_metrics

PROMPTS = [
    "a red circle on the left",
    "a blue square above a green triangle",
    "a photo of a small yellow cross",
    "an orange shape next to a large purple object",
    # longer than CLIP's 77-token context: must be truncated keeping the end-of-text token
    " ".join(["a big red circle and a small blue square"] * 12),
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the network (a hub download) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def _images(sizes, seed=0, modes=None):
    rng = np.random.default_rng(seed)
    out = []
    for i, (w, h) in enumerate(sizes):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if modes:
            im = im.convert(modes[i % len(modes)])
        out.append(im)
    return out


# --------------------------------------------------------------------------- CLIP score


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from slimsd.tokenizer import build_clip_tokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    tok = build_clip_tokenizer(path)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(
            **small,
            vocab_size=len(tok),
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(**small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    # Give image and text embeddings a shared component (same bias after the final layer
    # norms, same projection) so the cosines are clearly positive and differ per pair:
    # torchmetrics clamps the mean at 0, which would hide a wrong pairing.
    with torch.no_grad():
        shared = 2 * torch.randn(32)
        for ln in (model.vision_model.post_layernorm, model.text_model.final_layer_norm):
            ln.bias.copy_(shared)
            ln.weight.mul_(0.5)
        model.visual_projection.weight.copy_(model.text_projection.weight)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _hand_clip_cosines(path, images, prompts):
    """Cosine of each (image, prompt) pair with the saved model, one pair at a time."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(path, local_files_only=True)
    cos = []
    with torch.no_grad():
        for im, p in zip(images, prompts):
            enc = proc(text=[p], images=[im.convert("RGB")], return_tensors="pt", truncation=True, max_length=77)
            out = model(**enc)  # image_embeds / text_embeds come out L2-normalised
            cos.append(float((out.image_embeds * out.text_embeds).sum()))
    return cos


def test_clip_score_matches_hand_computation(tiny_clip):
    # mixed sizes and modes; 5 images in batches of 2 (last batch partial)
    images = _images([(40, 48), (32, 32), (64, 40), (50, 50), (33, 70)], modes=["RGB", "L", "RGBA"])
    cos = _hand_clip_cosines(tiny_clip, images, PROMPTS)
    assert min(cos) > 0.05 and max(cos) - min(cos) > 1e-3  # positive, and pairs differ

    res = coco_metrics(images, PROMPTS, clip_model=str(tiny_clip), metrics=("clip",), batch_size=2, device="cpu")
    assert set(res) == {"clip_score", "num_images"}
    assert res["num_images"] == 5
    assert math.isfinite(res["clip_score"]) and 0.0 < res["clip_score"] <= 1.0
    assert res["clip_score"] == pytest.approx(float(np.mean(cos)), abs=1e-5)

    # pairing matters: with the prompts rotated against the images the score changes
    rolled = PROMPTS[1:] + PROMPTS[:1]
    res_rolled = coco_metrics(images, rolled, clip_model=str(tiny_clip), metrics=("clip",), batch_size=5)
    assert res_rolled["clip_score"] == pytest.approx(float(np.mean(_hand_clip_cosines(tiny_clip, images, rolled))), abs=1e-4)
    assert abs(res_rolled["clip_score"] - res["clip_score"]) > 1e-4


def test_clip_model_missing_names_the_flag(tmp_path):
    images = _images([(32, 32)] * 2)
    for bad in (None, tmp_path / "nope", tmp_path):  # None, no folder, folder without config.json
        with pytest.raises(FileNotFoundError, match="--clip-model PATH"):
            coco_metrics(images, PROMPTS[:2], clip_model=bad, metrics=("clip",))


# --------------------------------------------------------------------------- input validation


def test_length_mismatch_and_bad_arguments(tiny_clip):
    images = _images([(32, 32)] * 3)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        coco_metrics(images, PROMPTS[:2], clip_model=str(tiny_clip), metrics=("clip",))
    with pytest.raises(ValueError, match="reference_images"):
        coco_metrics(images, PROMPTS[:3], metrics=("fid",), inception_weights="x.pth")
    with pytest.raises(ValueError, match="reference_images"):
        coco_metrics(images, PROMPTS[:3], [], metrics=("fid",), inception_weights="x.pth")
    with pytest.raises(ValueError, match="subset"):
        coco_metrics(images, PROMPTS[:3], metrics=("kid",))
    with pytest.raises(ValueError, match="no images"):
        coco_metrics([], [], metrics=("clip",), clip_model=str(tiny_clip))
    with pytest.raises(TypeError, match="list of strings"):
        coco_metrics(images[:1], "a red circle", metrics=("clip",), clip_model=str(tiny_clip))


# --------------------------------------------------------------------------- Inception weights


@pytest.mark.parametrize("metric", ["fid", "is"])
def test_missing_inception_weights_names_file_and_flag(tmp_path, metric):
    images = _images([(32, 32)] * 10)
    for bad in (None, tmp_path / INCEPTION_WEIGHTS_FILE):
        with pytest.raises(FileNotFoundError) as e:
            coco_metrics(images, ["p"] * 10, images, inception_weights=bad, metrics=(metric,))
        assert "--inception-weights PATH" in str(e.value)
        assert INCEPTION_WEIGHTS_FILE in str(e.value)


def test_missing_files_fail_before_any_work(tiny_clip, monkeypatch):
    """A missing Inception file is reported before the CLIP model is even loaded."""
    monkeypatch.setattr(metrics_coco, "_clip_loader", lambda p: pytest.fail("loaded CLIP before checking files"))
    images = _images([(32, 32)] * 10)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        coco_metrics(images, ["p"] * 10, images, clip_model=str(tiny_clip), inception_weights=None)


def test_without_torch_fidelity_a_clear_import_error(tmp_path, monkeypatch):
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"not really weights")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import torch_fidelity -> ImportError
    images = _images([(32, 32)] * 10)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        coco_metrics(images, ["p"] * 10, images, inception_weights=str(weights), metrics=("fid", "is"))


class _TinyFeatures(torch.nn.Module):
    """Stand-in for the Inception network: uint8 (N,3,H,W) of any size -> fixed features."""

    def __init__(self, dim):
        super().__init__()
        g = torch.Generator().manual_seed(dim)
        self.proj = torch.randn(3 * 4 * 4, dim, generator=g, dtype=torch.float64) * 4
        self.num_features = dim

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3
        x = torch.nn.functional.adaptive_avg_pool2d(x.double() / 255, 4).flatten(1)
        return (x - 0.5) @ self.proj


@pytest.fixture
def stub_inception(tmp_path, monkeypatch):
    """Real torchmetrics FID/IS, tiny feature network; returns a (fake) weights path."""
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"stand-in")
    built = []

    def fake_inception(path, feature):
        assert path == weights  # the given local file is what would be loaded
        built.append(feature)
        return _TinyFeatures(6 if feature == "2048" else 10)

    monkeypatch.setattr(metrics_coco, "_require_torch_fidelity", lambda: None)
    monkeypatch.setattr(metrics_coco, "_inception", fake_inception)
    return weights, built


def _hand_fid(real, fake):
    from scipy import linalg

    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _feats(net, images):
    return np.concatenate([net(metrics_coco._to_uint8_chw(im)[None]).numpy() for im in images])


def test_fid_and_is_pipeline_against_hand_computation(stub_inception):
    weights, built = stub_inception
    fake = _images([(48, 48)] * 7 + [(64, 32)] * 5, seed=1)  # mixed sizes -> several batches
    real = _images([(40, 30), (40, 30), (80, 80), (33, 47)] * 3, seed=2, modes=["RGB", "L"])
    with pytest.warns(UserWarning, match="not the standard FID Inception file"):
        res = coco_metrics(
            fake, ["p"] * len(fake), real, inception_weights=str(weights), metrics=("fid", "is"), batch_size=4, is_splits=1
        )
    assert built == ["2048", "logits_unbiased"]
    assert set(res) == {"fid", "num_reference_images", "is_mean", "is_std", "num_images"}
    assert res["num_images"] == 12 and res["num_reference_images"] == 12

    expected_fid = _hand_fid(_feats(_TinyFeatures(6), real), _feats(_TinyFeatures(6), fake))
    assert expected_fid > 0.01
    assert res["fid"] == pytest.approx(expected_fid, rel=1e-4)

    logits = torch.from_numpy(_feats(_TinyFeatures(10), fake))
    p, logp = logits.softmax(1), logits.log_softmax(1)
    expected_is = float(torch.exp((p * (logp - p.mean(0, keepdim=True).log())).sum(1).mean()))
    assert res["is_mean"] == pytest.approx(expected_is, rel=1e-6)
    assert res["is_mean"] >= 1.0 and math.isnan(res["is_std"])

    # identical sets -> FID ~ 0
    with pytest.warns(UserWarning, match="not the standard"):
        same = coco_metrics(fake, ["p"] * 12, fake, inception_weights=str(weights), metrics=("fid",))
    assert abs(same["fid"]) < 1e-6


def test_is_with_splits_reports_spread(stub_inception):
    """IS over 5 splits against a hand computation: torchmetrics shuffles with torch's global RNG
    (``randperm``) before splitting, so the same seed gives the hand computation the same splits."""
    weights, _ = stub_inception
    fake = _images([(32, 32)] * 20, seed=3)
    torch.manual_seed(11)
    with pytest.warns(UserWarning, match="not the standard FID Inception file"):
        res = coco_metrics(fake, ["p"] * 20, inception_weights=str(weights), metrics=("is",), is_splits=5)
    torch.manual_seed(11)
    logits = torch.from_numpy(_feats(_TinyFeatures(10), fake))[torch.randperm(20)]
    per_split = []
    for part in logits.chunk(5):
        p, logp = part.softmax(1), part.log_softmax(1)
        per_split.append(float(torch.exp((p * (logp - p.mean(0, keepdim=True).log())).sum(1).mean())))
    assert res["is_mean"] == pytest.approx(float(np.mean(per_split)), rel=1e-6)
    assert res["is_std"] == pytest.approx(float(np.std(per_split, ddof=1)), rel=1e-6)  # the spread over splits
    assert res["is_std"] > 0.01  # splits that really differ


# --------------------------------------------------------------------------- real weights


REAL_WEIGHTS = os.environ.get("SLIMSD_INCEPTION_WEIGHTS")


@pytest.mark.skipif(not REAL_WEIGHTS, reason="set SLIMSD_INCEPTION_WEIGHTS to pt_inception-2015-12-05-6726825d.pth")
def test_fid_and_is_with_real_inception_weights():
    pytest.importorskip("torch_fidelity")
    fake = _images([(64, 64)] * 10, seed=4)
    real = _images([(80, 60)] * 10, seed=5)
    res = coco_metrics(fake, ["p"] * 10, real, inception_weights=REAL_WEIGHTS, metrics=("fid", "is"), batch_size=5)
    assert math.isfinite(res["fid"]) and res["fid"] > 0
    assert math.isfinite(res["is_mean"]) and res["is_mean"] >= 1.0
    same = coco_metrics(fake, ["p"] * 10, fake, inception_weights=REAL_WEIGHTS, metrics=("fid",))
    assert abs(same["fid"]) < 1e-2 * res["fid"]
