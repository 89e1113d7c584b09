"""FID, CLIP score and Inception Score for real Stable Diffusion, as the paper reports them.

The paper evaluates text-to-image models on MS-COCO-style prompts with three numbers:

* **FID** (lower is better) between generated images and real reference images, on the
  2048-d pool features of the TF-ported Inception-v3 used by every FID implementation;
* **CLIP score** (higher is better): the mean cosine similarity between each image and its
  prompt in CLIP ViT-L/14 space. The paper reports it as a fraction (about 0.30 for SD);
  ``torchmetrics`` reports ``100 * cos``, so :func:`coco_metrics` divides by 100;
* **Inception Score** (higher is better) on the unbiased logits of the same Inception-v3.

All three are computed with ``torchmetrics`` and **only from local files**: nothing here
downloads anything at run time. You need

* ``--clip-model PATH``: a folder holding a ``transformers`` ``CLIPModel`` *and* its
  ``CLIPProcessor`` (``save_pretrained`` of e.g. ``openai/clip-vit-large-patch14``);
* ``--inception-weights PATH``: the FID Inception-v3 weights file
  ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; torch-fidelity ships the
  same file as ``weights-inception-2015-12-05-6726825d.pth``), plus the ``torch-fidelity``
  package, which defines the network (``pip install torch-fidelity``; it needs a
  ``torchvision`` that matches your ``torch``).

Two things about torchmetrics 1.9 that this module works around (see the code):

* ``CLIPScore(model_name_or_path=...)`` only accepts hub names containing ``"openai"``,
  ``"jinaai"`` or ``"zer0int"`` (any other string is rejected), and ``"openai"`` names are
  fetched from the hub. It also accepts a *callable* that returns ``(model, processor)``;
  we pass one that loads the local folder with ``local_files_only=True``. And with
  ``transformers`` 5, ``get_image_features``/``get_text_features`` return a
  ``BaseModelOutputWithPooling`` instead of a tensor, which torchmetrics 1.9 cannot handle
  (Lightning-AI/torchmetrics#3407), so we hand it a thin wrapper that returns the projected
  embedding tensor.
* ``InceptionScore`` has no ``feature_extractor_weights_path`` argument (only
  ``FrechetInceptionDistance`` does); left alone it would download the weights. We build the
  very network torchmetrics builds (``NoTrainInceptionV3("inception-v3-compat", ...)``) from
  the local file ourselves and hand it to both metrics as a module. torch-fidelity only
  downloads when its weights path is ``None``, and we never pass ``None``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

METRICS = ("fid", "clip", "is")
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILE
)
# torch.hub names weight files "<name>-<first 8 hex digits of their sha256>.<ext>".
_INCEPTION_SHA256_PREFIX = "6726825d"


# --------------------------------------------------------------------------- validation


def _check_clip_model(clip_model: str | Path | None) -> Path:
    hint = (
        "CLIP score needs a local CLIP model: a folder with a transformers CLIPModel and its "
        "CLIPProcessor (config.json, model weights, tokenizer and preprocessor files), e.g. "
        "openai/clip-vit-large-patch14 saved with save_pretrained. Pass it with --clip-model PATH "
        "(clip_model= in Python). Nothing is downloaded at run time."
    )
    if clip_model is None:
        raise FileNotFoundError(f"No CLIP model given. {hint}")
    path = Path(clip_model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP model folder not found: {str(path)!r}. {hint}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json, so it is not a saved CLIP model. {hint}")
    return path


def _check_inception_weights(inception_weights: str | Path | None) -> Path:
    hint = (
        f"FID and Inception Score need the FID Inception-v3 weights file {INCEPTION_WEIGHTS_FILE} "
        f"(from {INCEPTION_WEIGHTS_URL}; torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
        "is the same file) stored locally. Pass it with --inception-weights PATH "
        "(inception_weights= in Python). Nothing is downloaded at run time."
    )
    if inception_weights is None:
        raise FileNotFoundError(f"No Inception weights given. {hint}")
    path = Path(inception_weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {str(path)!r}. {hint}")
    return path


def _warn_if_unexpected_weights(path: Path) -> None:
    """FID values are only comparable with the standard weights: warn (don't fail) on others."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    if not sha.hexdigest().startswith(_INCEPTION_SHA256_PREFIX):
        warnings.warn(
            f"{path} is not the standard FID Inception file {INCEPTION_WEIGHTS_FILE} (its sha256 does not "
            f"start with {_INCEPTION_SHA256_PREFIX}); FID/IS will not be comparable with published numbers.",
            UserWarning,
            stacklevel=3,
        )


def _require_torch_fidelity() -> None:
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception-v3 is torch-fidelity's network)
    except ImportError as e:  # ModuleNotFoundError, or torch_fidelity's own missing torchvision
        raise ImportError(
            "FID and Inception Score need the torch-fidelity package (it defines the FID Inception-v3): "
            f"`pip install torch-fidelity` (it also needs torchvision matching your torch). Import failed: {e}"
        ) from e


# --------------------------------------------------------------------------- images


def _to_uint8_chw(img: Any) -> torch.Tensor:
    """PIL image (any mode/size), HWC uint8 array or CHW uint8 tensor -> (3, H, W) uint8 tensor."""
    if isinstance(img, Image.Image):
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(img.copy())
        if img.ndim == 3 and img.shape[-1] in (1, 3, 4) and img.shape[0] not in (1, 3, 4):
            img = img.permute(2, 0, 1)
    if isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8:
            raise TypeError(f"image tensors must be uint8 in [0, 255], got {img.dtype}")
        if img.ndim == 2:
            img = img.unsqueeze(0)
        if img.ndim != 3 or img.shape[0] not in (1, 3, 4):
            raise ValueError(f"expected an image of shape (C, H, W), got {tuple(img.shape)}")
        img = img[:3] if img.shape[0] >= 3 else img.expand(3, -1, -1)
        return img.contiguous()
    raise TypeError(f"unsupported image type {type(img).__name__}; pass PIL images")


def _uint8_batches(images: Sequence[Any], batch_size: int):
    """Yield (N, 3, H, W) uint8 batches. Images of different sizes go into different batches
    (a batch tensor needs one size); the Inception metrics resize to 299 internally and their
    statistics don't depend on the order of images."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    tensors = [_to_uint8_chw(im) for im in images]
    for i, t in enumerate(tensors):
        by_size[tuple(t.shape[1:])].append(i)
    for idx in by_size.values():
        for s in range(0, len(idx), batch_size):
            yield torch.stack([tensors[i] for i in idx[s : s + batch_size]])


# --------------------------------------------------------------------------- CLIP


class _CLIPTensorFeatures(torch.nn.Module):
    """Wraps a transformers ``CLIPModel`` so ``get_*_features`` return tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the
    projected embedding (what transformers 4 returned directly); torchmetrics 1.9 calls
    ``.norm()`` on the result and would crash."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads config.text_config.max_position_embeddings

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values, **kw):
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values, **kw))

    def get_text_features(self, input_ids, attention_mask=None, **kw):
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kw))


class _TruncatingProcessor:
    """torchmetrics tokenizes with ``padding=True`` only and then cuts long captions to the
    model's context, which drops the end-of-text token CLIP pools on. Truncate in the
    tokenizer instead (it keeps EOS), as Stable Diffusion does with its prompts."""

    def __init__(self, processor: Any, max_length: int):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, text=None, images=None, **kw):
        if text is not None:
            kw.setdefault("truncation", True)
            kw.setdefault("max_length", self.max_length)
        return self.processor(text=text, images=images, **kw)


def _clip_loader(path: Path):
    """Callable for ``CLIPScore(model_name_or_path=...)`` that loads only from ``path``."""

    def load():
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        max_len = int(getattr(model.config.text_config, "max_position_embeddings", 77))
        return _CLIPTensorFeatures(model).eval(), _TruncatingProcessor(processor, max_len)

    return load


# --------------------------------------------------------------------------- Inception


def _inception(weights: Path, feature: str) -> torch.nn.Module:
    """The network torchmetrics' FID/IS build, loaded from ``weights`` (never downloaded).

    ``feature`` is ``"2048"`` (FID pool features) or ``"logits_unbiased"`` (IS). Same as
    ``FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)`` builds
    internally; ``InceptionScore`` can't take a weights path, hence the module."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=[feature], feature_extractor_weights_path=str(weights)
    )
    if feature.isdigit():
        net.num_features = int(feature)  # spares FID a dummy forward to find the feature size
    return net


# --------------------------------------------------------------------------- API


def coco_metrics(
    images: list[Image.Image],
    prompts: list[str],
    reference_images: list[Image.Image] | None = None,
    *,
    clip_model: str | None = None,
    inception_weights: str | None = None,
    metrics: tuple[str, ...] = ("fid", "clip", "is"),
    batch_size: int = 32,
    is_splits: int = 10,
    device: str | torch.device | None = None,
) -> dict:
    """FID, CLIP score and Inception Score of generated ``images`` for their ``prompts``.

    Args:
        images: generated images (PIL, any size and mode; converted to RGB uint8).
        prompts: the prompt of each image (same length and order as ``images``).
        reference_images: real images (e.g. the MS-COCO val images of the prompts), any sizes;
            required for FID. Generated images and references need not be the same number.
        clip_model: local folder of a transformers ``CLIPModel`` + ``CLIPProcessor``
            (CLI ``--clip-model PATH``). Required for ``"clip"``.
        inception_weights: local ``pt_inception-2015-12-05-6726825d.pth``
            (CLI ``--inception-weights PATH``). Required for ``"fid"`` and ``"is"``.
        metrics: any of ``"fid"``, ``"clip"``, ``"is"``.
        batch_size: images per forward pass.
        is_splits: Inception Score splits (10, the standard).
        device: where the networks run (default: CUDA if available, else CPU).

    Returns:
        ``{"num_images": n}`` plus, as requested: ``"fid"`` (float; with
        ``"num_reference_images"``), ``"clip_score"`` (mean image-prompt cosine similarity,
        0..1 scale as in the paper, i.e. torchmetrics' ``CLIPScore`` / 100; torchmetrics
        clamps the mean at 0), ``"is_mean"`` and ``"is_std"`` (over the splits).

    Raises:
        ValueError: bad arguments (length mismatch, unknown metric, FID without
            ``reference_images``, too few images).
        FileNotFoundError: the CLIP model folder or the Inception weights file is missing; the
            message names the file and the CLI flag.
        ImportError: FID/IS without a working ``torch-fidelity``.
    """
    metrics = tuple(dict.fromkeys(metrics))  # de-duplicate, keep order
    images, prompts = list(images), list(prompts) if not isinstance(prompts, str) else prompts
    _check_arguments(images, prompts, reference_images, metrics, batch_size, is_splits)
    # Check every local file before any heavy work, so a missing one fails fast.
    clip_path = _check_clip_model(clip_model) if "clip" in metrics else None
    weights = _check_inception_weights(inception_weights) if {"fid", "is"} & set(metrics) else None
    if weights is not None:
        _require_torch_fidelity()
        _warn_if_unexpected_weights(weights)

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {"num_images": len(images)}
    with torch.no_grad():
        if "clip" in metrics:
            out["clip_score"] = _clip_score(images, prompts, clip_path, batch_size, dev)
        if "fid" in metrics:
            out["fid"] = _fid(images, reference_images, weights, batch_size, dev)
            out["num_reference_images"] = len(reference_images)
        if "is" in metrics:
            out["is_mean"], out["is_std"] = _inception_score(images, weights, batch_size, is_splits, dev)
    return out


def _check_arguments(images, prompts, reference_images, metrics, batch_size, is_splits) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {metrics!r}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, one per image, not a single string")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; need one prompt per image")
    if not images:
        raise ValueError("no images given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if "fid" in metrics:
        if reference_images is None or len(reference_images) == 0:
            raise ValueError("FID needs real images: pass reference_images= (e.g. the MS-COCO images of the prompts)")
        if len(images) < 2 or len(reference_images) < 2:
            raise ValueError(
                f"FID needs at least 2 generated and 2 reference images, got {len(images)} and {len(reference_images)}"
            )
    if "is" in metrics and len(images) < is_splits:
        raise ValueError(f"Inception Score with is_splits={is_splits} needs at least that many images, got {len(images)}")


def _clip_score(images, prompts, clip_path, batch_size: int, dev) -> float:
    """torchmetrics' ``CLIPScore`` / 100: the mean image-prompt cosine similarity, 0..1."""
    from torchmetrics.multimodal import CLIPScore

    clip = CLIPScore(model_name_or_path=_clip_loader(clip_path)).to(dev)
    for s in range(0, len(images), batch_size):
        batch = [_to_uint8_chw(im).to(dev) for im in images[s : s + batch_size]]
        clip.update(batch, prompts[s : s + batch_size])
    return float(clip.compute()) / 100.0


def _fid(images, reference_images, weights, batch_size: int, dev) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_inception(weights, "2048"), normalize=False).to(dev)
    for batch in _uint8_batches(reference_images, batch_size):
        fid.update(batch.to(dev), real=True)
    for batch in _uint8_batches(images, batch_size):
        fid.update(batch.to(dev), real=False)
    return float(fid.compute())


def _inception_score(images, weights, batch_size: int, is_splits: int, dev) -> tuple[float, float]:
    """(mean, std over the splits); std is NaN with one split (no spread)."""
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():  # "will save all extracted features in buffer": intended
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        iscore = InceptionScore(feature=_inception(weights, "logits_unbiased"), splits=is_splits).to(dev)
    for batch in _uint8_batches(images, batch_size):
        iscore.update(batch.to(dev))
    with warnings.catch_warnings():  # one split: torch warns that its std is undefined
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
        mean, std = iscore.compute()
    return float(mean), (float(std) if is_splits > 1 else math.nan)
