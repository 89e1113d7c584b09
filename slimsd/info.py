"""``slimsd info MODEL``: what a pipeline is made of, without loading its weights."""

from __future__ import annotations


def component_params(spec) -> dict[str, int]:
    """Parameter count of U-Net, text encoder and VAE of a preset / folder / hub id."""
    from slimsd.models import build_in_memory, count_params, resolve_model
    from slimsd.specs import component_specs

    mods = build_in_memory(spec, empty=True)  # never materialize 5 GB just to count
    if mods is None:
        folder = resolve_model(spec)
        specs = component_specs(folder)
        mods = {specs[n].source: specs[n].load_module(folder, empty=True) for n in ("unet", "text_encoder", "vae_decoder")}
    return {n: count_params(m) for n, m in mods.items()}


def info(spec) -> dict:
    params = component_params(spec)
    return {"model": str(spec), "params": params, "total_params": sum(params.values())}


def blocks_table(spec, latency: bool = True, latent_size: int | None = None, batch: int = 2) -> list[dict]:
    """Per-block params / MACs / latency of the U-Net (``slimsd info MODEL --blocks``)."""
    from slimsd.models import build_in_memory, load_pipeline
    from slimsd.profile import block_table

    mods = build_in_memory(spec)  # random weights: build in memory, no 5 GB folder needed
    unet = mods["unet"].eval() if mods else load_pipeline(spec).unet
    return block_table(unet, batch=batch, latent_size=latent_size, latency=latency)
