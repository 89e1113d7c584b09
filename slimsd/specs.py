"""One I/O spec per exported component, derived from a pipeline's configs.

ONNX export, TensorRT optimisation profiles, Triton ``config.pbtxt`` files and the serving
runners all read these specs, so tensor names, dtypes and dynamic axes never drift apart.
Names follow Optimum's ONNX export of Stable Diffusion:

==============  ==========================================  ===========================
component       inputs                                      outputs
==============  ==========================================  ===========================
text_encoder    input_ids int64 [batch, 77]                 last_hidden_state, pooler_output
unet            sample [batch, 4, height, width],           out_sample [batch, 4, height, width]
                timestep float32 [batch],
                encoder_hidden_states [batch, 77, dim]
vae_decoder     latent_sample [batch, 4, height, width]     sample [batch, 3, image_height, image_width]
==============  ==========================================  ===========================

* ``batch`` is always dynamic (classifier-free guidance doubles it). ``height`` / ``width``
  are *latent* sizes, ``image_height`` / ``image_width`` pixel sizes; they are symbolic only
  with ``dynamic_hw=True``, otherwise fixed at the model's default image size
  (U-Net ``sample_size`` x VAE factor: 64 px for tiny-sd, 512 px for SD v2.1-base).
* ``timestep`` is **float32** with one value per batch row in every export (also fp16 ones):
  exact for the integer timesteps of DDIM/PNDM/DPM-Solver and also right for schedulers with
  fractional timesteps (Euler, Karras sigmas), which int64 (Optimum's choice) would truncate.
  The U-Net casts it to float for its sinusoidal embedding anyway.
* ``vae_decoder`` is the raw ``vae.decode``: the caller divides latents by
  ``vae.config.scaling_factor`` first (see :mod:`slimsd.denoise`), as diffusers and Optimum do.

Each :class:`ComponentSpec` also owns the component's other facts, so no other module restates
them: its source subfolder (:attr:`~ComponentSpec.source`), how its module loads
(:meth:`~ComponentSpec.load_module`: the class named in ``model_index.json``), the export
wrapper that gives it spec-named plain-tensor outputs (:meth:`~ComponentSpec.wrap`), its main
output (:attr:`~ComponentSpec.main_output`, what the denoising loop reads) and the Triton wire
dtypes of its tensors (:attr:`TensorSpec.triton_dtype` / :attr:`TensorSpec.wire_dtype`).

This module is core (serve/ imports it): it needs only numpy; torch, diffusers and
transformers are imported lazily inside the functions that need them. It is a little over
400 lines on purpose: every fact about a component lives here, in one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from slimsd.precision import EXPORT_DTYPES

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
SOURCE_SUBFOLDER = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae"}
# the output the denoising loop reads: the first output of each spec (runners that hold no
# specs, e.g. TensorRT's engines, look it up here)
MAIN_OUTPUT = {"text_encoder": "last_hidden_state", "unet": "out_sample", "vae_decoder": "sample"}
DTYPES = EXPORT_DTYPES  # what an export stores: float32 | float16

# dtype name -> (numpy dtype, ONNX TensorProto elem type, Triton data type)
_TYPES = {
    "float32": (np.float32, 1, "TYPE_FP32"),
    "float16": (np.float16, 10, "TYPE_FP16"),
    "int64": (np.int64, 7, "TYPE_INT64"),
    "int32": (np.int32, 6, "TYPE_INT32"),
}

Dim = int | str
HW = int | tuple[int, int]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" | "float16" | "int64"
    dims: tuple[Dim, ...]  # ints where fixed, symbol names where dynamic

    @property
    def numpy_dtype(self):
        return np.dtype(_TYPES[self.dtype][0])

    @property
    def onnx_elem_type(self) -> int:
        return _TYPES[self.dtype][1]

    @property
    def triton_dtype(self) -> str:
        return _TYPES[self.dtype][2]

    @property
    def wire_dtype(self) -> str:
        """Triton's client-side name of the dtype (``FP32``): ``triton_dtype`` without ``TYPE_``."""
        return self.triton_dtype.removeprefix("TYPE_")

    @property
    def triton_dims(self) -> list[int]:
        return [-1 if isinstance(d, str) else int(d) for d in self.dims]

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape with every symbol looked up in ``sizes``."""
        return tuple(int(sizes[d]) if isinstance(d, str) else int(d) for d in self.dims)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass(frozen=True)
class ModelDims:
    """The few numbers of a pipeline the specs depend on (read from its component configs)."""

    latent_channels: int
    unet_in_channels: int
    unet_out_channels: int
    cross_attention_dim: int
    text_hidden_size: int
    text_max_length: int
    vocab_size: int
    vae_scale_factor: int  # pixels per latent cell (8 for SD)
    latent_height: int  # U-Net sample_size
    latent_width: int
    hw_multiple: int  # image sizes must be multiples of this (VAE factor x U-Net down-sampling)
    vae_scaling_factor: float  # latents are divided by it before the decoder
    image_channels: int = 3

    @property
    def image_size(self) -> tuple[int, int]:
        return self.latent_height * self.vae_scale_factor, self.latent_width * self.vae_scale_factor

    @classmethod
    def from_configs(cls, unet: Mapping, vae: Mapping, text_encoder: Mapping, tokenizer: Mapping | None = None):
        ss = unet.get("sample_size", 64)
        lh, lw = (ss, ss) if isinstance(ss, int) else (int(ss[0]), int(ss[1]))
        vae_factor = vae_pixel_factor(vae)
        n_down = len(unet.get("block_out_channels", (320, 640, 1280, 1280))) - 1
        max_len = int(text_encoder.get("max_position_embeddings", 77))
        if tokenizer and isinstance(tokenizer.get("model_max_length"), int) and tokenizer["model_max_length"] < 10**6:
            max_len = min(max_len, int(tokenizer["model_max_length"]))
        return cls(
            latent_channels=int(vae.get("latent_channels", 4)),
            unet_in_channels=int(unet.get("in_channels", 4)),
            unet_out_channels=int(unet.get("out_channels", 4)),
            cross_attention_dim=int(unet["cross_attention_dim"]) if not isinstance(unet["cross_attention_dim"], (list, tuple))
            else int(unet["cross_attention_dim"][0]),
            text_hidden_size=int(text_encoder["hidden_size"]),
            text_max_length=max_len,
            vocab_size=int(text_encoder.get("vocab_size", 49408)),
            vae_scale_factor=vae_factor,
            latent_height=lh,
            latent_width=lw,
            hw_multiple=vae_factor * 2**n_down,
            vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            image_channels=int(vae.get("out_channels", 3)),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelDims":
        """From a diffusers pipeline folder or an exported folder (its ``manifest.json``)."""
        folder = Path(folder)
        manifest = folder / "manifest.json"
        if not (folder / "model_index.json").is_file() and manifest.is_file():
            data = json.loads(manifest.read_text())
            if "model_dims" in data:
                return cls(**data["model_dims"])

        def read(sub, name="config.json"):
            p = folder / sub / name
            return json.loads(p.read_text()) if p.is_file() else None

        unet, vae, te = read("unet"), read("vae"), read("text_encoder")
        missing = [n for n, c in (("unet", unet), ("vae", vae), ("text_encoder", te)) if c is None]
        if missing:
            raise FileNotFoundError(f"{folder}: no {', '.join(m + '/config.json' for m in missing)} "
                                    "(not a pipeline folder nor an exported folder with a manifest)")
        return cls.from_configs(unet, vae, te, read("tokenizer", "tokenizer_config.json"))

    def to_dict(self) -> dict:
        return asdict(self)


def vae_pixel_factor(vae: Mapping) -> int:
    """Pixels per latent cell of a VAE config: ``AutoencoderKL`` halves the size once per block
    after the first (``block_out_channels``); ``AutoencoderTiny`` (TAESD, ``slimsd compress
    decoder``) upsamples by ``upsampling_scaling_factor`` once per decoder block but the last.
    (diffusers also writes ``block_out_channels`` into a tiny config, a copy of the decoder's
    channels: right only for factor 2, so the tiny keys are read first.)"""
    if "decoder_block_out_channels" in vae:
        return int(vae.get("upsampling_scaling_factor", 2)) ** (len(vae["decoder_block_out_channels"]) - 1)
    return 2 ** (len(vae.get("block_out_channels", (128, 256, 512, 512))) - 1)


def _hw(hw: HW | None, default: tuple[int, int]) -> tuple[int, int]:
    if hw is None:
        return default
    return (int(hw), int(hw)) if isinstance(hw, (int, np.integer)) else (int(hw[0]), int(hw[1]))


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # "text_encoder" | "unet" | "vae_decoder"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: ModelDims = field(repr=False)
    dtype: str = "float32"
    dynamic_hw: bool = False

    # -- lookups -------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """Subfolder of the diffusers pipeline the component comes from."""
        return SOURCE_SUBFOLDER[self.name]

    @property
    def main_output(self) -> str:
        """The output the denoising loop reads: the first one (``last_hidden_state``, ``out_sample``,
        ``sample``)."""
        return MAIN_OUTPUT[self.name]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def cast_inputs(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The spec's inputs from ``arrays``, C-contiguous in the spec's dtypes (fp16 specs take
        float32 arrays too); KeyError naming a missing input."""
        return {t.name: np.ascontiguousarray(arrays[t.name], dtype=t.numpy_dtype) for t in self.inputs}

    def check_names(self, what, inputs, outputs, exact_inputs: bool = True) -> None:
        """ValueError naming ``what`` when a compiled model's tensor names do not match the spec."""
        got_in, got_out = set(inputs), set(outputs)
        ok_in = got_in == set(self.input_names) if exact_inputs else set(self.input_names) <= got_in
        if not ok_in or not set(self.output_names) <= got_out:
            raise ValueError(f"{what}: inputs {sorted(got_in)} / outputs {sorted(got_out)} do not match the spec "
                             f"{self.input_names} / {self.output_names}")

    # -- the torch side --------------------------------------------------------------------
    def load_module(self, folder: str | Path, dtype=None, *, empty: bool = False, eager_attention: bool = False):
        """This component's module from a diffusers pipeline folder: see :func:`load_module`."""
        return load_module(folder, self.name, dtype, empty=empty, eager_attention=eager_attention)

    def wrap(self, module):
        """``module`` (as :meth:`load_module` returns it) with plain-tensor outputs in the spec's order."""
        return wrap(self.name, module)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``dynamic_axes`` for ``torch.onnx.export``: symbol per dynamic axis of every tensor."""
        return {
            t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            for t in self.inputs + self.outputs
            if any(isinstance(d, str) for d in t.dims)
        }

    # -- concrete shapes -----------------------------------------------------------------
    def check_hw(self, hw: HW | None) -> tuple[int, int]:
        """Pixel (height, width), default size if ``None``; validated against the spec."""
        h, w = _hw(hw, self.dims.image_size)
        if not self.dynamic_hw and (h, w) != self.dims.image_size:
            raise ValueError(f"{self.name}: exported for {self.dims.image_size[0]}x{self.dims.image_size[1]} px only "
                             f"(static shapes); got {h}x{w} (export with --dynamic-hw for other sizes)")
        m = self.dims.hw_multiple
        if h <= 0 or w <= 0 or h % m or w % m:
            raise ValueError(f"{self.name}: image size {h}x{w} must be a positive multiple of {m} px")
        return h, w

    def sizes(self, batch: int, hw: HW | None = None) -> dict[str, int]:
        """Symbol -> size for a batch and a pixel size."""
        if batch < 1:
            raise ValueError(f"{self.name}: batch must be >= 1, got {batch}")
        h, w = self.check_hw(hw)
        f = self.dims.vae_scale_factor
        return {"batch": batch, "height": h // f, "width": w // f, "image_height": h, "image_width": w}

    def shapes(self, batch: int, hw: HW | None = None, outputs: bool = False) -> dict[str, tuple[int, ...]]:
        s = self.sizes(batch, hw)
        return {t.name: t.shape(s) for t in (self.outputs if outputs else self.inputs)}

    def profile(self, min_batch: int = 1, opt_batch: int = 2, max_batch: int = 8,
                min_hw: HW | None = None, opt_hw: HW | None = None, max_hw: HW | None = None
                ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: ``{input: (min_shape, opt_shape, max_shape)}``.

        Batch counts rows as the model sees them (2 per image with CFG). ``*_hw`` are pixel
        sizes (int or (h, w)); with static shapes they must be ``None`` or the export size.
        Dynamic defaults: half, 1x and 2x the default image size (256/512/1024 for SD).
        """
        if not 1 <= min_batch <= opt_batch <= max_batch:
            raise ValueError(f"{self.name}: need 1 <= min_batch <= opt_batch <= max_batch, "
                             f"got {min_batch}, {opt_batch}, {max_batch}")
        dh, dw = self.dims.image_size
        m = self.dims.hw_multiple
        if self.dynamic_hw:
            lo = (max(m, dh // 2 // m * m), max(m, dw // 2 // m * m))
            min_hw, opt_hw, max_hw = _hw(min_hw, lo), _hw(opt_hw, (dh, dw)), _hw(max_hw, (2 * dh, 2 * dw))
            for i, axis in enumerate(("height", "width")):
                if not min_hw[i] <= opt_hw[i] <= max_hw[i]:
                    raise ValueError(f"{self.name}: need min <= opt <= max image {axis}, "
                                     f"got {min_hw[i]}, {opt_hw[i]}, {max_hw[i]}")
        lo, opt, hi = (self.shapes(b, hw) for b, hw in
                       ((min_batch, min_hw), (opt_batch, opt_hw), (max_batch, max_hw)))
        return {name: (lo[name], opt[name], hi[name]) for name in self.input_names}

    def sample_inputs(self, batch: int = 2, hw: HW | None = None, seed: int = 0, numpy: bool = False) -> dict:
        """Random inputs of the spec's shapes and dtypes: torch tensors (or numpy arrays)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        out = {}
        for t, shape in zip(self.inputs, self.shapes(batch, hw).values()):
            if t.name == "input_ids":
                x = torch.randint(0, self.dims.vocab_size, shape, generator=g, dtype=torch.int64)
            elif t.name == "timestep":  # integer timesteps of a 1000-step schedule, as float
                x = torch.randint(0, 1000, shape, generator=g).to(torch.float32)
            else:
                x = torch.randn(shape, generator=g, dtype=torch.float32).to(getattr(torch, t.dtype))
            out[t.name] = x.numpy() if numpy else x
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dynamic_hw": self.dynamic_hw,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


def load_module(folder: str | Path, component: str, dtype=None, *, empty: bool = False,
                eager_attention: bool = False):
    """The module of ``component`` (``text_encoder``, ``unet``, ``vae_decoder`` or a subfolder name)
    with the class ``model_index.json`` names, imported from the library it names.

    So pruned U-Nets (``slimsd.unet_blocks.PrunedUNet2DConditionModel``) load like stock ones.
    ``vae_decoder`` is the whole VAE, ``AutoencoderKL`` or ``AutoencoderTiny`` (:meth:`ComponentSpec.wrap`
    calls its ``decode``).

    * ``dtype``: loaded in that torch dtype (the library keeps what must stay fp32); None = as stored;
    * ``empty``: built from the config on the meta device, no weights read (counting parameters);
    * ``eager_attention``: transformers' eager attention instead of SDPA (the TorchScript ONNX
      exporter mis-types fp16 SDPA graphs: a float32 Cast lands before LayerNormalization).
    """
    import importlib

    folder = Path(folder)
    sub = SOURCE_SUBFOLDER.get(component, component)
    library, cls_name = json.loads((folder / "model_index.json").read_text())[sub]
    cls = getattr(importlib.import_module(library), cls_name)
    if empty:
        from accelerate import init_empty_weights

        with init_empty_weights():
            if library == "transformers":
                from transformers import AutoConfig

                return cls(AutoConfig.from_pretrained(folder / sub))
            return cls.from_config(cls.load_config(folder / sub))
    kw = {"dtype": dtype} if dtype is not None else {}
    if library == "transformers":
        if eager_attention:
            kw["attn_implementation"] = "eager"
        return cls.from_pretrained(folder / sub, **kw)
    return cls.from_pretrained(folder, subfolder=sub, **kw)


def wrap(component: str, module):
    """A ``torch.nn.Module`` around ``module`` whose ``forward`` takes the spec's inputs in order and
    returns plain tensors in the spec's output order (what ``torch.onnx.export`` traces).

    ``vae_decoder`` is the raw ``vae.decode``: latents must already be divided by
    ``vae.config.scaling_factor``.
    """
    import torch

    if component not in _FORWARD:
        raise KeyError(f"unknown component {component!r}; components: {', '.join(COMPONENTS)}")
    forward = _FORWARD[component]

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *inputs):
            return forward(self.m, *inputs)

    Wrapped.__name__ = Wrapped.__qualname__ = _WRAPPER_NAME[component]
    return Wrapped(module)


def _text_encoder_forward(m, input_ids):
    out = m(input_ids=input_ids, return_dict=True)
    return out.last_hidden_state, out.pooler_output


def _unet_forward(m, sample, timestep, encoder_hidden_states):
    return m(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _vae_decoder_forward(m, latent_sample):
    # AutoencoderKL and AutoencoderTiny alike: decode(z, return_dict=False)[0] is the image in ~[-1, 1]
    return m.decode(latent_sample, return_dict=False)[0]


_FORWARD = {"text_encoder": _text_encoder_forward, "unet": _unet_forward, "vae_decoder": _vae_decoder_forward}
_WRAPPER_NAME = {"text_encoder": "TextEncoder", "unet": "UNet", "vae_decoder": "VaeDecoder"}


def _specs_from_dims(d: ModelDims, dtype: str, dynamic_hw: bool) -> dict[str, ComponentSpec]:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dynamic_hw:
        lat_h, lat_w, img_h, img_w = "height", "width", "image_height", "image_width"
    else:
        (img_h, img_w), lat_h, lat_w = d.image_size, d.latent_height, d.latent_width
    B, L = "batch", d.text_max_length
    kw = dict(dims=d, dtype=dtype, dynamic_hw=dynamic_hw)
    return {
        "text_encoder": ComponentSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", "int64", (B, L)),),
            outputs=(TensorSpec(MAIN_OUTPUT["text_encoder"], dtype, (B, L, d.text_hidden_size)),
                     TensorSpec("pooler_output", dtype, (B, d.text_hidden_size))),
            **kw),
        "unet": ComponentSpec(
            "unet",
            inputs=(TensorSpec("sample", dtype, (B, d.unet_in_channels, lat_h, lat_w)),
                    TensorSpec("timestep", "float32", (B,)),
                    TensorSpec("encoder_hidden_states", dtype, (B, L, d.cross_attention_dim))),
            outputs=(TensorSpec(MAIN_OUTPUT["unet"], dtype, (B, d.unet_out_channels, lat_h, lat_w)),),
            **kw),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            inputs=(TensorSpec("latent_sample", dtype, (B, d.latent_channels, lat_h, lat_w)),),
            outputs=(TensorSpec(MAIN_OUTPUT["vae_decoder"], dtype, (B, d.image_channels, img_h, img_w)),),
            **kw),
    }


def component_specs(source, dtype: str | None = None, dynamic_hw: bool | None = None) -> dict[str, ComponentSpec]:
    """Specs of ``text_encoder``, ``unet``, ``vae_decoder``.

    ``source``: a diffusers pipeline folder, an exported folder (``slimsd export onnx`` output;
    dtype / dynamic_hw then default to the export's settings), a :class:`ModelDims`, or a
    dict ``{"unet": cfg, "vae": cfg, "text_encoder": cfg[, "tokenizer": cfg]}`` of configs.
    """
    recorded: dict = {}
    if isinstance(source, ModelDims):
        dims = source
    elif isinstance(source, Mapping):
        dims = ModelDims.from_configs(source["unet"], source["vae"], source["text_encoder"], source.get("tokenizer"))
    else:
        folder = Path(source)
        dims = ModelDims.from_folder(folder)
        m = folder / "manifest.json"
        if not (folder / "model_index.json").is_file() and m.is_file():
            recorded = json.loads(m.read_text()).get("export", {})
    dtype = dtype or recorded.get("dtype", "float32")
    dynamic_hw = recorded.get("dynamic_hw", False) if dynamic_hw is None else dynamic_hw
    return _specs_from_dims(dims, dtype, bool(dynamic_hw))
