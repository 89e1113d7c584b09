"""U-Net blocks as removable units, and the physically pruned U-Net class.

Shared by compress/ (sensitivity, pruning, training) and export/ / serve/ (which must load
pruned U-Nets without the training stack), so it lives in the core package.

Block names (stable across diffusers versions; ``i`` = stage, ``j`` = layer in the stage)::

    down.{i}.res.{j}   down_blocks[i].resnets[j]        ResnetBlock2D
    down.{i}.attn.{j}  down_blocks[i].attentions[j]     Transformer2DModel
    mid.res.{j}        mid_block.resnets[j]
    mid.attn.0         mid_block.attentions[0]
    up.{i}.res.{j}     up_blocks[i].resnets[j]
    up.{i}.attn.{j}    up_blocks[i].attentions[j]
    down.{i}.down+up.{k}.up   a down-sampler with the up-sampler that undoes it (BK-SDM-Tiny
                              removes the innermost stage this way)

Removing a block = replacing it with an identity that has no parameters:

* attention blocks are residual (x + f(x)): always removable;
* a down/mid ResNet is removable when its input and output channels are equal;
* an up ResNet sees ``cat([h, skip])``: removing it drops the skip and passes ``h`` on, so it is
  removable when ``h`` already has the block's output channels (every layer but the first of
  a stage whose width changes). Dropping a skip is exactly what BK-SDM does when an up stage
  loses a layer; the down-side tensor is still computed, it is just not consumed.

``ablate(unet, names)`` does this temporarily (weights kept; for sensitivity analysis),
``remove_blocks(unet, names)`` for good; :class:`PrunedUNet2DConditionModel` records the
removed names in its config so ``save_pretrained`` / ``from_pretrained`` round-trip a
physically smaller file.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import asdict, dataclass

import torch
from torch import nn
from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401 - ModelMixin: see below

# diffusers' pipeline loader finds a component's load method by looking the base classes up
# *in the module named by model_index.json* (here ``slimsd.unet_blocks``): exporting
# ``ModelMixin`` from this module is what lets ``StableDiffusionPipeline.from_pretrained`` load
# a pruned U-Net folder.


# ---------------------------------------------------------------------------------------
# identities that stand in for removed blocks (no parameters)
# ---------------------------------------------------------------------------------------
class IdentityResnet(nn.Module):
    """Replaces ``ResnetBlock2D``: ``(x, temb) -> x[:, :keep]`` (``keep`` drops an up-block skip)."""

    def __init__(self, keep_channels: int | None = None):
        super().__init__()
        self.keep_channels = keep_channels

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        return input_tensor if self.keep_channels is None else input_tensor[:, : self.keep_channels]


class IdentityTransformer(nn.Module):
    """Replaces ``Transformer2DModel`` (called with ``return_dict=False`` inside the blocks)."""

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=hidden_states)
        return (hidden_states,)


class IdentityResample(nn.Module):
    """Replaces ``Downsample2D`` / ``Upsample2D``."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


# ---------------------------------------------------------------------------------------
# inventory
# ---------------------------------------------------------------------------------------
@dataclass
class Block:
    name: str  # "down.1.res.0"
    kind: str  # "res" | "attn" | "resample"
    paths: tuple[str, ...]  # module paths inside the U-Net ("down_blocks.1.resnets.0", ...)
    params: int
    removable: bool
    reason: str = ""  # why not removable
    keep_channels: int | None = None  # up ResNets: channels of h kept when the skip is dropped

    def to_dict(self) -> dict:
        d = asdict(self)
        d["paths"] = list(self.paths)
        return d


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters())


def list_blocks(unet: UNet2DConditionModel, include_removed: bool = False) -> list[Block]:
    """Every ResNet / attention block (and resample pair) of ``unet``, in forward order."""
    blocks: list[Block] = []
    removed = set(getattr(unet.config, "removed_blocks", None) or [])

    def add(name, kind, paths, removable, reason="", keep=None):
        if name in removed and not include_removed:
            return
        mods = [unet.get_submodule(p) for p in paths]
        blocks.append(Block(name, kind, tuple(paths), sum(_n(m) for m in mods), removable, reason, keep))

    n_stages = len(unet.down_blocks)
    for i, blk in enumerate(unet.down_blocks):
        attns = getattr(blk, "attentions", None) or []
        for j, res in enumerate(blk.resnets):
            cin, cout = _res_channels(res)
            ok = cin == cout
            add(f"down.{i}.res.{j}", "res", [f"down_blocks.{i}.resnets.{j}"], ok,
                "" if ok else f"changes channels {cin}->{cout}")
            if j < len(attns):
                add(f"down.{i}.attn.{j}", "attn", [f"down_blocks.{i}.attentions.{j}"], True)
    if unet.mid_block is not None:
        mid = unet.mid_block
        attns = getattr(mid, "attentions", None) or []
        add("mid.res.0", "res", ["mid_block.resnets.0"], True)
        for j in range(len(attns)):
            add(f"mid.attn.{j}", "attn", [f"mid_block.attentions.{j}"], True)
            add(f"mid.res.{j + 1}", "res", [f"mid_block.resnets.{j + 1}"], True)
    rev = list(reversed(unet.config.block_out_channels))
    for i, blk in enumerate(unet.up_blocks):
        attns = getattr(blk, "attentions", None) or []
        for j, res in enumerate(blk.resnets):
            cin, cout = _res_channels(res)
            h = rev[i] if j > 0 else rev[max(i - 1, 0)]  # channels of h before the skip is concatenated
            ok = h == cout
            add(f"up.{i}.res.{j}", "res", [f"up_blocks.{i}.resnets.{j}"], ok,
                "" if ok else f"h has {h} channels, block outputs {cout}", keep=h)
            if j < len(attns):
                add(f"up.{i}.attn.{j}", "attn", [f"up_blocks.{i}.attentions.{j}"], True)
    # a down-sampler and the up-sampler that undoes it
    for i in range(n_stages - 1):
        k = n_stages - 2 - i
        if unet.down_blocks[i].downsamplers is not None and unet.up_blocks[k].upsamplers is not None:
            add(f"down.{i}.down+up.{k}.up", "resample",
                [f"down_blocks.{i}.downsamplers.0", f"up_blocks.{k}.upsamplers.0"], True)
    return blocks


def _res_channels(res) -> tuple[int, int]:
    if isinstance(res, IdentityResnet):
        return -1, -1
    return res.in_channels, res.out_channels


def _identity_for(block: Block) -> list[nn.Module]:
    if block.kind == "attn":
        return [IdentityTransformer()]
    if block.kind == "resample":
        return [IdentityResample(), IdentityResample()]
    keep = block.keep_channels if block.name.startswith("up.") else None
    return [IdentityResnet(keep)]


def _set_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = parent[int(attr)] if isinstance(parent, nn.ModuleList) else getattr(parent, attr)
    if isinstance(parent, nn.ModuleList):
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
    return old


def _resolve(unet, names) -> list[Block]:
    by_name = {b.name: b for b in list_blocks(unet)}
    out = []
    for name in names:
        if name not in by_name:
            raise ValueError(f"unknown or already removed block {name!r}; see `slimsd info MODEL --blocks`")
        if not by_name[name].removable:
            raise ValueError(f"block {name!r} cannot be removed: {by_name[name].reason}")
        out.append(by_name[name])
    return out


@contextlib.contextmanager
def ablate(unet: UNet2DConditionModel, names):
    """Temporarily replace blocks ``names`` with identities (weights kept and restored)."""
    saved = []
    try:
        for b in _resolve(unet, names):
            for path, ident in zip(b.paths, _identity_for(b)):
                saved.append((path, _set_module(unet, path, ident)))
        yield unet
    finally:
        for path, old in reversed(saved):
            _set_module(unet, path, old)


def remove_blocks(unet: UNet2DConditionModel, names) -> None:
    """Replace blocks ``names`` with parameter-free identities, for good."""
    for b in _resolve(unet, names):
        for path, ident in zip(b.paths, _identity_for(b)):
            _set_module(unet, path, ident)


# ---------------------------------------------------------------------------------------
# the physically pruned U-Net: a UNet2DConditionModel whose config lists removed blocks
# ---------------------------------------------------------------------------------------
class PrunedUNet2DConditionModel(UNet2DConditionModel):
    """``UNet2DConditionModel`` without the blocks named in ``config.removed_blocks``.

    Its weight file holds no tensors of removed blocks; ``from_pretrained`` rebuilds the
    same structure from the config and loads it. ``model_index.json`` names it as
    ``["slimsd.unet_blocks", "PrunedUNet2DConditionModel"]`` so diffusers'
    ``StableDiffusionPipeline.from_pretrained`` loads it once this module is imported
    (diffusers does not import modules a folder names).
    """

    def __init__(self, *args, removed_blocks=None, **kwargs):
        super().__init__(*args, **kwargs)
        removed = list(removed_blocks or [])
        self.register_to_config(removed_blocks=removed)
        if removed:
            # names refer to the *unpruned* structure; resolve them all before removing any
            blocks = {b.name: b for b in list_blocks(self, include_removed=True)}
            for name in removed:
                if name not in blocks or not blocks[name].removable:
                    raise ValueError(f"removed_blocks: {name!r} is not a removable block of this U-Net")
            for name in removed:
                b = blocks[name]
                for path, ident in zip(b.paths, _identity_for(b)):
                    _set_module(self, path, ident)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, removed_blocks, share_weights: bool = False) -> "PrunedUNet2DConditionModel":
        """A pruned copy of ``unet``: same config, kept weights copied, removed ones dropped.

        Built on the meta device, so no random initialisation (seconds on SD-sized U-Nets).
        ``share_weights=True`` reuses ``unet``'s tensors instead of copying them (no extra
        memory: benchmarks keep several prunings of one 3.5 GB U-Net side by side); the two
        models then change together if either is trained.
        """
        from accelerate import init_empty_weights

        cfg = {k: v for k, v in unet.config.items() if not k.startswith("_") and k != "removed_blocks"}
        previously = list(getattr(unet.config, "removed_blocks", None) or [])
        with init_empty_weights():
            pruned = cls(**cfg, removed_blocks=previously + [n for n in removed_blocks if n not in previously])
        state = unet.state_dict()
        wanted = pruned.state_dict().keys()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise RuntimeError(f"pruned U-Net has weights the source lacks: {missing[:5]}")
        state = {k: (v if share_weights else v.clone()) for k, v in state.items() if k in wanted}
        pruned.load_state_dict(state, strict=True, assign=True)
        return pruned.to(unet.dtype)


# the subclass takes every UNet2DConditionModel argument plus ``removed_blocks``: make that
# visible to diffusers' config machinery, which reads the __init__ signature
_sig = inspect.signature(UNet2DConditionModel.__init__)
PrunedUNet2DConditionModel.__init__.__signature__ = _sig.replace(
    parameters=[*_sig.parameters.values(), inspect.Parameter("removed_blocks", inspect.Parameter.KEYWORD_ONLY, default=None)]
)
