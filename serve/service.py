"""Between the routes and the engine: limits from settings and model, jobs, PNG encoding.

Each API's request model converts itself (``to_params``, after vLLM's ``to_sampling_params``)
into one :class:`GenerationParams` through :meth:`Limits.resolve`, which fills the model's
defaults and checks every limit once; a failed check is one :func:`bad_request` naming the
field as that API spells it. Routes only translate shapes.
"""

from __future__ import annotations

import base64
import io
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine import BatchKey, Engine, Engines, Job, UnknownModel
from .errors import APIError, bad_request
from .pipeline import SCHEDULERS
from .schemas import MAX_SEED
from .settings import ServeSettings

# AUTOMATIC1111 sampler names -> ours (ours are accepted too)
A1111_SAMPLERS = {"ddim": "ddim", "euler": "euler", "euler a": "euler_a", "dpm++ 2m": "dpm++",
                  "dpm++ 2m karras": None}  # None: known name, not offered
# ours -> (A1111's name, its aliases as /sdapi/v1/samplers lists them)
A1111_NAMES = {"ddim": ("DDIM", ["ddim"]), "euler": ("Euler", ["k_euler"]), "euler_a": ("Euler a", ["k_euler_a"]),
               "dpm++": ("DPM++ 2M", ["k_dpmpp_2m"])}
# A1111's schedule types (the noise schedule, separate from the sampler since A1111 1.9): slimsd runs the
# model's own timestep spacing from its scheduler config, which is A1111's "Automatic"
A1111_SCHEDULES = {"automatic": "Automatic"}


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    scheduler: str


@dataclass
class Limits:
    """What a request may ask for: the settings' limits and the loaded model's sizes and defaults."""

    settings: ServeSettings
    pipeline: object  # slimsd.serve.pipeline.Pipeline

    @classmethod
    def of(cls, engine: Engine, settings: ServeSettings) -> "Limits":
        if engine.pipeline is None:
            engine.check_open()  # raises NotReady / Draining with the reason
        return cls(settings, engine.pipeline)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.pipeline.image_size

    def resolve(self, *, prompt: str, negative_prompt: str | None, n: int, size: tuple[int, int] | None,
                steps: int | None, guidance: float | None, seed: int | None, scheduler: str | None,
                fields: dict[str, str]) -> GenerationParams:
        """Fill defaults from the model and check every limit; ``fields`` maps our names to the API's."""
        cfg, pipe = self.settings, self.pipeline

        def f(name: str) -> str:
            return fields.get(name, name)

        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt or "")):
            if len(text) > cfg.max_prompt_chars:
                raise bad_request(f(name), f"{len(text)} characters, at most {cfg.max_prompt_chars} allowed",
                                  "prompt_too_long")
        steps = pipe.defaults.steps if steps is None else steps
        guidance = pipe.defaults.guidance if guidance is None else guidance
        for name, value, hi in (("n", n, cfg.max_n), ("steps", steps, cfg.max_steps)):
            if not 1 <= value <= hi:
                raise bad_request(f(name), f"must be between 1 and {hi}, got {value}")
        if not 0 <= guidance <= cfg.max_guidance:
            raise bad_request(f("guidance"), f"must be between 0 and {cfg.max_guidance:g}, got {guidance:g}")
        width, height = self._check_size(size, f("size"))
        scheduler = scheduler or pipe.default_scheduler
        if scheduler not in SCHEDULERS:
            raise bad_request(f("scheduler"), f"unknown {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if seed is None or seed < 0:  # random, but reported back so the image can be reproduced
            seed = secrets.randbelow(2**32)
        return GenerationParams(prompt, negative_prompt or "", n, width, height, int(steps), float(guidance),
                                min(int(seed), MAX_SEED), scheduler)

    def _check_size(self, size: tuple[int, int] | None, field: str) -> tuple[int, int]:
        h0, w0 = self.image_size
        width, height = size or (w0, h0)
        limit = self.settings.max_size or 2 * max(h0, w0)
        if width > limit or height > limit:
            raise bad_request(field, f"{width}x{height} exceeds the maximum of {limit} px per side", "size_too_large")
        m = self.pipeline.dims.hw_multiple  # VAE factor x the U-Net's down-sampling: 64 px for SD and tiny-sd
        if width % m or height % m:
            raise bad_request(field, f"{width}x{height} not supported by this model: width and height must be "
                                     f"multiples of {m} px", "unsupported_size")
        try:
            self.pipeline.check_size(height, width)
        except ValueError as e:  # a static-shape export (--onnx-dir made without --dynamic-hw)
            raise bad_request(field, f"{width}x{height} not supported by this backend: {e}",
                              "unsupported_size") from None
        return width, height


def resolve(engine: Engine, settings: ServeSettings, **request) -> GenerationParams:
    """:meth:`Limits.resolve` against the engine's model (NotReady / Draining while there is none)."""
    return Limits.of(engine, settings).resolve(**request)


def make_job(p: GenerationParams) -> Job:
    return Job(BatchKey(p.height, p.width, p.steps, p.guidance, p.scheduler), [p.prompt] * p.n,
               [p.negative_prompt] * p.n, [p.seed + i for i in range(p.n)])


async def run(engine: Engine, p: GenerationParams) -> np.ndarray:
    return await engine.submit(make_job(p))


async def run_timed(engine: Engine, p: GenerationParams) -> tuple[np.ndarray, Job]:
    """The images and the job (its ``timings_ms``: queue wait and inference)."""
    job = make_job(p)
    return await engine.submit(job), job


def server_timing(job: Job, total_s: float, model: str, steps: int, encode_s: float | None = None) -> dict[str, str]:
    """Response headers with the server-side latency (``Server-Timing``, readable by the playground):
    ``queue`` and ``inference`` of the job, ``encode`` (PNG + JSON, where the route measured it) and
    ``total`` (arrival at the route to the response body)."""
    t = dict(job.timings_ms)
    if encode_s is not None:
        t["encode"] = 1000 * encode_s
    parts = [f"{k};dur={v:.1f}" for k, v in t.items()] + [f"total;dur={1000 * total_s:.1f}"]
    return {"Server-Timing": ", ".join(parts), "X-Slimsd-Model": model, "X-Slimsd-Steps": str(steps)}


# zlib level of the PNGs served: 1 encodes several times faster than Pillow's default 6 for slightly
# larger files; the encoding runs on the event loop, per image (measured: docs/serve.md, "Serving overhead")
PNG_COMPRESS_LEVEL = 1


def png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def a1111_sampler(name: str | None) -> str | None:
    if name is None or name == "":
        return None
    key = name.strip().lower()
    if key in SCHEDULERS:
        return key
    if key in A1111_SAMPLERS and A1111_SAMPLERS[key]:
        return A1111_SAMPLERS[key]
    offered = [a for a, _ in A1111_NAMES.values()]
    raise bad_request("sampler_name", f"{name!r} is not available; choose one of {', '.join(offered)}")


def a1111_schedule(name: str | None) -> str | None:
    """``txt2img.scheduler``: None / "Automatic" -> None (the model's own); a sampler name -> that
    name (so a client that sends the sampler there still works); anything else a 400 naming it."""
    if name is None or name.strip().lower() in ("", *A1111_SCHEDULES):
        return None
    key = name.strip().lower()
    if key in SCHEDULERS or A1111_SAMPLERS.get(key):
        return name
    raise bad_request("scheduler", f"{name!r} is not available: slimsd runs the model's own noise schedule; choose "
                                   f"{', '.join(A1111_SCHEDULES.values())} (or leave it out)")


def a1111_name(scheduler: str) -> str:
    return A1111_NAMES.get(scheduler, (scheduler,))[0]


def pick_engine(engines: Engines, name: str | None, field: str) -> Engine:
    """The engine a request names (None: the default); an unknown id is a 404 naming ``field`` and the choices.
    A1111 titles (``"id [hash]"``) are accepted for the id."""
    if name and name not in engines.names:
        base = name.rsplit(" [", 1)[0] if name.endswith("]") else name
        name = base if base in engines.names else name
    try:
        return engines.get(name)
    except UnknownModel as e:
        raise APIError(404, f"{field}: {e}", field, "model_not_found") from None


_HASHES: dict[str, str] = {}


def model_sha256(pipe) -> str:
    """sha256 of the model's U-Net weights (A1111's checkpoint hash): the one ``manifest.json``
    records when it does, else computed once per folder."""
    import hashlib
    import json

    folder = Path(pipe.folder)
    key = str(folder.resolve())
    if key not in _HASHES:
        weights = sorted((folder / "unet").glob("*.safetensors")) or sorted((folder / "unet").glob("*.bin"))
        digest = None
        try:
            files = json.loads((folder / "manifest.json").read_text()).get("files", {})
            digest = files.get(f"unet/{weights[0].name}") if weights else None
        except (OSError, ValueError, AttributeError):
            pass
        if not isinstance(digest, str):
            h = hashlib.sha256()
            for w in weights:
                with open(w, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            if not weights:
                h.update(key.encode())
            digest = h.hexdigest()
        _HASHES[key] = digest
    return _HASHES[key]


def a1111_title(name: str, pipe) -> str:
    """``"name [hash10]"``, as A1111 titles checkpoints (clients send it back as sd_model_checkpoint)."""
    return f"{name} [{model_sha256(pipe)[:10]}]"
