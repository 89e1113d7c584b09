"""Per-block cost of a U-Net: parameters, MACs and measured latency.

In core (not compress/) because ``slimsd info MODEL --blocks`` and the pruning toolchain both use it.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2, per module);
latency from forward pre/post hooks around each block during whole-U-Net forwards, so a
block is timed where it really runs (same input shapes, caches, threads).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from slimsd.unet_blocks import Block, list_blocks


def unet_inputs(unet, batch: int = 2, latent_size: int | None = None, dtype=None, device=None, seed: int = 0):
    """Random U-Net inputs: batch 2 = one image with classifier-free guidance."""
    g = torch.Generator().manual_seed(seed)
    s = latent_size or unet.config.sample_size
    dtype = dtype or unet.dtype
    device = device or unet.device
    sample = torch.randn(batch, unet.config.in_channels, s, s, generator=g).to(device, dtype)  # (B,4,h,w)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)  # (B,77,d)
    return sample, t, ctx


@torch.no_grad()
def block_macs(unet, batch: int = 2, latent_size: int | None = None) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        unet(*unet_inputs(unet, batch, latent_size))
    counts = fc.get_flop_counts()
    root = type(unet).__name__
    out = {}
    for b in list_blocks(unet):
        out[b.name] = sum(sum(counts.get(f"{root}.{p}", {}).values()) for p in b.paths) // 2
    out["total"] = sum(counts.get(root, {}).values()) // 2
    return out


@torch.no_grad()
def block_latency(unet, batch: int = 2, latent_size: int | None = None, repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Mean milliseconds per U-Net forward spent in each block (and ``total``)."""
    blocks = list_blocks(unet)
    sync = torch.cuda.synchronize if unet.device.type == "cuda" else (lambda: None)
    acc: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    handles = []
    for b in blocks:
        for p in b.paths:
            m = unet.get_submodule(p)

            def pre(_m, _a, key=(b.name, p)):
                sync()
                starts[key] = time.perf_counter()

            def post(_m, _a, _o, key=(b.name, p)):
                sync()
                acc[key[0]] += time.perf_counter() - starts.pop(key)

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    inputs = unet_inputs(unet, batch, latent_size)
    try:
        for _ in range(warmup):
            unet(*inputs)
        acc.clear()
        total = 0.0
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            unet(*inputs)
            sync()
            total += time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    out = {k: 1000 * v / repeats for k, v in acc.items()}
    out["total"] = 1000 * total / repeats
    return out


def block_table(unet, batch: int = 2, latent_size: int | None = None, latency: bool = True, repeats: int = 3) -> list[dict]:
    """The inventory ``slimsd info MODEL --blocks`` prints."""
    macs = block_macs(unet, batch, latent_size)
    lat = block_latency(unet, batch, latent_size, repeats=repeats) if latency else {}
    rows = []
    for b in list_blocks(unet):
        d = b.to_dict()
        d.update(macs=macs.get(b.name, 0), latency_ms=lat.get(b.name))
        rows.append(d)
    return rows


__all__ = ["Block", "block_latency", "block_macs", "block_table", "unet_inputs"]
