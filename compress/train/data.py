"""Training data: VAE latents and caption embeddings, cached once, and the micro-batches drawn from them.

Scene renders (``--data scenes``) or a user dataset (slimsd.data.user) are encoded once by the
frozen VAE (posterior mean and std kept, a fresh posterior sample every step, as teacher.py does)
and the captions by the frozen text encoder; the result is cached on disk, keyed by the VAE and
text-encoder weights, so a CPU step costs U-Net passes only. Streamed datasets (too big to cache)
are encoded batch by batch instead (:class:`StreamedBatches`).

Every micro-step draws from its own generator (:func:`micro_generator`), a function of its
position only, so a resumed run replays the steps after its checkpoint exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from slimsd.io import atomic_path


def weights_key(*modules) -> str:
    """Cheap fingerprint of frozen weights: shapes + a strided sample of every tensor."""
    h = hashlib.sha256()
    for m in modules:
        for name, t in m.state_dict().items():
            flat = t.detach().flatten().float().cpu()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(flat[:: max(1, flat.numel() // 64)].numpy().tobytes())
    return h.hexdigest()[:16]


def posterior(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent for images x (B, 3, H, W) in [-1, 1], unscaled, (B, C, h, w) each.

    ``AutoencoderKL``: its Gaussian posterior. ``AutoencoderTiny`` (a ``slimsd compress decoder``
    folder) is deterministic: std 0, and its latents already carry the source's scaling
    (its ``scaling_factor`` is 1), so ``mean x scaling_factor`` is the same latent space either way."""
    from diffusers import AutoencoderTiny

    if isinstance(vae, AutoencoderTiny):
        mean = vae.encode(x).latents
        return mean, torch.zeros_like(mean)
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.std


def cycle_dataset(ds, skip: int = 0):
    """(image, caption) pairs of a streamed dataset, epoch after epoch, the first ``skip`` dropped
    (a resumed run continues where the checkpointed one stopped); an empty dataset is an error."""
    def forever():
        while True:
            n = 0
            for pair in ds:
                n += 1
                yield pair
            if n == 0:
                raise ValueError(f"dataset {ds.name} yielded no samples")

    it = forever()
    for _ in range(skip):
        next(it)
    return it


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: list[str], device, batch: int = 256) -> torch.Tensor:
    """(N,) captions -> (N, 77, D) last hidden states of the frozen text encoder."""
    out = []
    for i in range(0, len(captions), batch):
        ids = tokenizer(captions[i : i + batch], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(out)


def _latent_cache_key(vae, text_encoder, tokenizer, data: str, num: int, seed: int, resolution: int) -> str:
    """Everything that changes what is stored: the data (and a local copy's mtime), how many,
    the seed, the resolution, the frozen VAE and text encoder, and the tokenizer."""
    local = Path(data)
    data_stamp = local.stat().st_mtime_ns if local.exists() else None
    tok = hashlib.sha256(json.dumps([tokenizer.model_max_length, sorted(tokenizer.get_vocab().items())]).encode())
    return hashlib.sha256(json.dumps([data, data_stamp, num, seed, resolution, weights_key(vae, text_encoder),
                                      tok.hexdigest()[:16]]).encode()).hexdigest()[:20]


def open_images(data: str, num: int, seed: int, resolution: int):
    """``(get(i) -> (image, caption), n)`` for the first ``n <= num`` training pairs of ``data``."""
    if data == "scenes" or data.startswith("scenes:"):
        from slimsd.data.scenes import SceneDataset

        split = data.partition(":")[2] or "train"
        ds = SceneDataset(split, seed=seed, length=num, size=resolution)
        return (lambda i: (ds[i].image, ds[i].caption)), num
    from slimsd.data.user import open_dataset

    ds = open_dataset(data, resolution=resolution, seed=seed)
    if ds.streaming:
        raise ValueError(f"{data} is streamed: it cannot be cached; use --num-latents 0 to encode per batch")
    return ds.__getitem__, min(num, len(ds))


@torch.no_grad()
def build_latent_cache(vae, text_encoder, tokenizer, data: str, num: int, seed: int, resolution: int,
                       device="cpu", batch: int = 64, cache_root: Path | None = None) -> dict:
    """Encode ``num`` training images and their captions once; cached under ``$SLIMSD_CACHE/latents``.

    Returns ``mean, std`` (N, 4, h, w) posterior moments, ``cap_index`` (N,) into ``table``
    (n_captions + 1, 77, D) whose last row is the empty caption, ``scaling``, and ``key`` (what
    it is cached under: caches derived from it extend that key).
    """
    from tqdm.auto import tqdm

    from slimsd.data.scenes import to_tensor
    from slimsd.models import cache_dir

    key = _latent_cache_key(vae, text_encoder, tokenizer, data, num, seed, resolution)
    root = Path(cache_root) if cache_root else cache_dir() / "latents"
    path = root / f"{key}.pt"
    if path.is_file():
        return {**torch.load(path, map_location="cpu", weights_only=True), "key": key}
    get, n = open_images(data, num, seed, resolution)
    means, stds, caps = [], [], []
    for i in tqdm(range(0, n, batch), desc="encode latents", dynamic_ncols=True):
        pairs = [get(j) for j in range(i, min(i + batch, n))]
        x = to_tensor([p[0] for p in pairs]).to(device, dtype=vae.dtype)
        mean, std = posterior(vae, x)
        means.append(mean.float().cpu())
        stds.append(std.float().cpu())
        caps += [p[1] for p in pairs]
    unique = sorted(set(caps))
    index = {c: i for i, c in enumerate(unique)}
    table = encode_captions(text_encoder, tokenizer, unique + [""], device)
    cache = {
        "mean": torch.cat(means), "std": torch.cat(stds), "cap_index": torch.tensor([index[c] for c in caps]),
        "table": table, "empty_id": len(unique), "scaling": float(vae.config.scaling_factor),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # concurrent processes / a kill never leave half a cache
        torch.save(cache, tmp)
    return {**cache, "key": key}


class CachedBatches:
    """Micro-batches from the latent cache: z_0 sampled from the posterior, captions embedded."""

    def __init__(self, cache: dict, caption_dropout: float, device):
        self.c = cache
        self.p_drop = caption_dropout
        self.device = device
        self.uncond = cache["table"][cache["empty_id"]]  # (77, D)

    def __call__(self, batch: int, g: torch.Generator):
        mean, std = self.c["mean"], self.c["std"]
        idx = torch.randint(len(mean), (batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * self.c["scaling"]  # (B, 4, h, w)
        cap = self.c["cap_index"][idx].clone()
        cap[torch.rand(batch, generator=g) < self.p_drop] = self.c["empty_id"]  # caption dropout for CFG
        c = self.c["table"][cap]  # (B, 77, D)
        return z0.to(self.device), c.to(self.device), self.uncond.to(self.device)


class StreamedBatches:
    """Micro-batches encoded on the fly from a streamed dataset (webdataset / streamed HF).

    On resume the stream is fast-forwarded over the samples already used (``skip``)."""

    def __init__(self, data, resolution, seed, vae, text_encoder, tokenizer, caption_dropout, device, skip: int = 0):
        from slimsd.data.user import open_dataset

        self.ds = open_dataset(data, resolution=resolution, seed=seed, shuffle_buffer=1000)
        self.vae, self.te, self.tok = vae, text_encoder, tokenizer
        self.p_drop, self.device = caption_dropout, device
        self.it = cycle_dataset(self.ds, skip)
        self.uncond = encode_captions(text_encoder, tokenizer, [""], device)[0]

    @torch.no_grad()
    def __call__(self, batch: int, g: torch.Generator):
        from slimsd.data.scenes import to_tensor

        pairs = [next(self.it) for _ in range(batch)]
        x = to_tensor([p[0] for p in pairs]).to(self.device, dtype=self.vae.dtype)
        mean, std = posterior(self.vae, x)
        noise = torch.randn(mean.shape, generator=g).to(self.device, mean.dtype)
        z0 = (mean + std * noise).float() * self.vae.config.scaling_factor
        caps = [("" if float(torch.rand((), generator=g)) < self.p_drop else p[1]) for p in pairs]
        return z0, encode_captions(self.te, self.tok, caps, self.device).to(self.device), self.uncond.to(self.device)


def micro_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The generator of one micro-step: a function of its position only (exact resume)."""
    s = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))
