"""The text-to-image denoising loop, written once over pluggable runners.

ONNX Runtime (:mod:`slimsd.runners_ort`), the Triton ``pipeline`` model (BLS calls to the
``text_encoder`` / ``unet`` / ``vae_decoder`` models) and serve/ all call :func:`generate`;
only the :class:`Runners` differ. Runners work on numpy arrays named as in
:mod:`slimsd.specs`; the diffusers scheduler works on torch tensors, so arrays are converted
at that boundary only.

For the same weights, scheduler, prompts and seeds the result equals diffusers'
``StableDiffusionPipeline(..., generator=[torch.Generator().manual_seed(s) for s in seeds])``
(``output_type="pil"``): same tokenisation (padded to 77), negative prompt ``""`` by
default, batch layout ``[negative..., positive...]``, classifier-free guidance only when
``guidance > 1``, initial noise drawn per image as ``randn_tensor`` does for a list of
generators, latents divided by ``vae_scaling_factor`` **before** the (raw) VAE decoder, and
``(x / 2 + 0.5).clamp(0, 1) * 255`` rounded to uint8.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np


class Runners(Protocol):
    """Three callables on numpy arrays (names as in :mod:`slimsd.specs`)."""

    def text_encoder(self, input_ids: np.ndarray) -> np.ndarray:
        """int64 [B, 77] -> last_hidden_state [B, 77, D]"""

    def unet(self, sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray) -> np.ndarray:
        """[B, 4, h, w], float32 [B], [B, 77, D] -> out_sample [B, 4, h, w]"""

    def vae_decoder(self, latent_sample: np.ndarray) -> np.ndarray:
        """[B, 4, h, w] (already divided by the VAE scaling factor) -> sample [B, 3, H, W] in ~[-1, 1]"""


def load_tokenizer(folder: str | Path):
    """The ``CLIPTokenizer`` saved in ``folder`` (a ``tokenizer/`` directory)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def load_scheduler(config: str | Path | dict, name: str | None = None):
    """A diffusers scheduler from ``scheduler_config.json`` (a file, its folder, or a dict).

    ``name`` (a diffusers class name such as ``"EulerDiscreteScheduler"``) overrides the
    class recorded in the config, keeping the noise schedule.
    """
    import diffusers

    if not isinstance(config, dict):
        p = Path(config)
        config = json.loads((p / "scheduler_config.json" if p.is_dir() else p).read_text())
    cls_name = name or config.get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unknown diffusers scheduler {cls_name!r}")
    return cls.from_config(config)


def tokenize(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """int64 [N, model_max_length] ids, padded and truncated as diffusers does."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="np").input_ids
    return np.ascontiguousarray(ids, dtype=np.int64)


def initial_latents(seeds: Sequence[int], shape: tuple[int, int, int]):
    """[N, C, h, w] float32 torch noise, one ``torch.Generator`` per image (as diffusers' ``randn_tensor``).

    Returns ``(latents, generators)``; the generators go on to the scheduler's ``step``.
    """
    import torch

    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    latents = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return latents, generators


def to_uint8(images: np.ndarray) -> np.ndarray:
    """VAE output [N, 3, H, W] in ~[-1, 1] -> uint8 [N, H, W, 3]."""
    x = np.clip(images.astype(np.float32) * 0.5 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (x * 255).round().astype(np.uint8)


def _as_list(x, n: int, what: str) -> list:
    if isinstance(x, (str, bytes, int, np.integer)):
        return [x] * n if what != "seeds" else [int(x) + i for i in range(n)]
    x = list(x)
    if len(x) == 1 and n > 1:
        return x * n if what != "seeds" else [int(x[0]) + i for i in range(n)]
    if len(x) != n:
        raise ValueError(f"{len(x)} {what} for {n} prompts")
    return x


class GenerationError(RuntimeError):
    """A runtime returned values no correct model gives (NaN / inf, or a blank image).

    Raised instead of returning an image, so a server answers an error, never a wrong (e.g.
    all-black) picture as a success: a mis-compiled engine, a corrupt cache blob (issue #12)
    or an fp16 overflow all end up here.
    """


def _check_finite(component: str, values: np.ndarray, where: str = "") -> np.ndarray:
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise GenerationError(f"{component} returned {bad} non-finite values{where} (NaN/inf): the runtime or its "
                              "compiled model is broken; no image was made")
    return values


def _check_not_blank(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8: an image whose every pixel is one value is a failed decode, not a picture."""
    flat = images.reshape(len(images), -1)
    blank = np.flatnonzero((flat == flat[:, :1]).all(1))
    if len(blank):
        raise GenerationError(f"vae_decoder returned {len(blank)} blank image(s) (every pixel "
                              f"{int(flat[blank[0], 0])}): the runtime or its compiled model is broken")
    return images


def generate(
    runners: Runners,
    tokenizer,
    scheduler,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    seeds: int | Sequence[int] | None = None,
    *,
    height: int,
    width: int,
    vae_scaling_factor: float,
    vae_scale_factor: int = 8,
    latent_channels: int = 4,
    eta: float = 0.0,
    callback=None,
) -> np.ndarray:
    """Images for ``prompts`` as uint8 [N, height, width, 3].

    ``seeds``: one per prompt; an int ``s`` means ``s, s+1, ...``; ``None`` draws random ones.
    ``scheduler`` is not modified (a fresh copy runs the loop, so concurrent calls are safe).
    ``callback(steps_done, latents)`` is called after each step with the current latents
    (float32 [N, C, h, w]); an exception it raises stops the loop there (a server's interrupt).
    :class:`GenerationError` when a runner returns
    NaN / inf or the decoder a blank image: never a wrong picture.
    """
    import torch

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts")
    negative_prompts = _as_list("" if negative_prompts is None else negative_prompts, n, "negative prompts")
    if seeds is None:
        seeds = np.random.SeedSequence().generate_state(n, dtype=np.uint32).tolist()
    seeds = _as_list(seeds, n, "seeds")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if height % vae_scale_factor or width % vae_scale_factor:
        raise ValueError(f"height and width must be multiples of {vae_scale_factor}, got {height}x{width}")
    cfg = guidance > 1.0

    # 1. text embeddings, [negative..., positive...] as diffusers concatenates them
    ids = tokenize(tokenizer, (negative_prompts + prompts) if cfg else prompts)
    emb = _check_finite("text_encoder", np.asarray(runners.text_encoder(ids), dtype=np.float32))

    # 2. noise, then the scheduler loop (a fresh scheduler: set_timesteps mutates state)
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(int(steps))
    latents, generators = initial_latents(seeds, (latent_channels, height // vae_scale_factor, width // vae_scale_factor))
    latents = latents * sched.init_noise_sigma
    step_params = set(inspect.signature(sched.step).parameters)
    extra = {k: v for k, v in (("eta", eta), ("generator", generators)) if k in step_params}
    for i, t in enumerate(sched.timesteps):
        x = torch.cat([latents] * 2) if cfg else latents
        x = sched.scale_model_input(x, t)
        ts = np.full((x.shape[0],), float(t), dtype=np.float32)
        eps = torch.from_numpy(_check_finite("unet", np.asarray(runners.unet(x.numpy(), ts, emb), dtype=np.float32),
                                             f" at step {i + 1}"))
        if cfg:
            uncond, text = eps.chunk(2)
            eps = uncond + guidance * (text - uncond)
        latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
        if callback is not None:
            callback(i + 1, latents.numpy())

    # 3. decode: the ONNX decoder is the raw vae.decode, scaling happens here
    images = _check_finite("vae_decoder", np.asarray(runners.vae_decoder((latents / vae_scaling_factor).numpy())))
    return _check_not_blank(to_uint8(images))
