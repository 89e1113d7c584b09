"""``slimsd info MODEL``: what a pipeline is made of, without loading its weights."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

COMPONENTS = ("unet", "text_encoder", "vae")


def _empty_module(folder: Path, name: str):
    """Instantiate component ``name`` of a pipeline folder on the meta device (no weights read)."""
    from accelerate import init_empty_weights

    index = json.loads((folder / "model_index.json").read_text())
    library, cls_name = index[name]
    cls = getattr(importlib.import_module(library), cls_name)
    with init_empty_weights():
        if library == "transformers":
            from transformers import AutoConfig

            return cls(AutoConfig.from_pretrained(folder / name))
        return cls.from_config(cls.load_config(folder / name))


def component_params(spec) -> dict[str, int]:
    """Parameter count of U-Net, text encoder and VAE of a preset / folder / hub id."""
    from slimsd.models import build_components, count_params, resolve_model

    if str(spec) == "sd21-base-arch":  # never materialize 5 GB just to count
        unet, vae, te, _, _ = build_components("sd21-base-arch", device="meta")
        mods = {"unet": unet, "text_encoder": te, "vae": vae}
    else:
        folder = resolve_model(spec)
        mods = {n: _empty_module(folder, n) for n in COMPONENTS}
    return {n: count_params(m) for n, m in mods.items()}


def info(spec) -> dict:
    params = component_params(spec)
    return {"model": str(spec), "params": params, "total_params": sum(params.values())}


def blocks_table(spec, latency: bool = True, latent_size: int | None = None, batch: int = 2) -> list[dict]:
    """Per-block params / MACs / latency of the U-Net (``slimsd info MODEL --blocks``)."""
    from slimsd.compress.profile import block_table
    from slimsd.models import build_components, load_pipeline

    if str(spec) == "sd21-base-arch":  # random weights: build in memory, no 5 GB folder needed
        unet = build_components("sd21-base-arch")[0].eval()
    else:
        unet = load_pipeline(spec).unet
    return block_table(unet, batch=batch, latent_size=latent_size, latency=latency)
