"""Between the routes and the engine: limits from settings and model, jobs, PNG encoding.

Both APIs (OpenAI, AUTOMATIC1111) become one :class:`GenerationParams`, checked once by
:func:`check` and run by :func:`run`; routes only translate shapes.
"""

from __future__ import annotations

import base64
import io
import secrets
from dataclasses import dataclass

import numpy as np

from .engine import BatchKey, Engine, Job
from .errors import APIError
from .pipeline import SCHEDULERS
from .schemas import MAX_SEED, parse_size
from .settings import ServeSettings

# AUTOMATIC1111 sampler names -> ours (ours are accepted too)
A1111_SAMPLERS = {"ddim": "ddim", "euler": "euler", "euler a": "euler_a", "dpm++ 2m": "dpm++",
                  "dpm++ 2m karras": None}  # None: known name, not offered


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


def resolve(engine: Engine, settings: ServeSettings, *, prompt: str, negative_prompt: str | None, n: int,
            size: tuple[int, int] | None, steps: int | None, guidance: float | None, seed: int | None,
            scheduler: str | None, fields: dict[str, str]) -> GenerationParams:
    """Fill defaults from the model and check every limit; ``fields`` maps our names to the API's."""
    pipe = engine.pipeline
    if pipe is None:
        engine.check_open()  # raises NotReady / Draining with the reason
    f = fields.get
    if len(prompt) > settings.max_prompt_chars:
        raise APIError(400, f"{f('prompt', 'prompt')}: {len(prompt)} characters, at most "
                            f"{settings.max_prompt_chars} allowed", f("prompt", "prompt"), "prompt_too_long")
    if negative_prompt and len(negative_prompt) > settings.max_prompt_chars:
        raise APIError(400, f"{f('negative_prompt', 'negative_prompt')}: {len(negative_prompt)} characters, at most "
                            f"{settings.max_prompt_chars} allowed", f("negative_prompt", "negative_prompt"),
                       "prompt_too_long")
    if not 1 <= n <= settings.max_n:
        raise APIError(400, f"{f('n', 'n')}: must be between 1 and {settings.max_n}, got {n}", f("n", "n"),
                       "invalid_value")
    steps = pipe.defaults.steps if steps is None else steps
    if not 1 <= steps <= settings.max_steps:
        raise APIError(400, f"{f('steps', 'steps')}: must be between 1 and {settings.max_steps}, got {steps}",
                       f("steps", "steps"), "invalid_value")
    guidance = pipe.defaults.guidance if guidance is None else guidance
    if not 0 <= guidance <= settings.max_guidance:
        raise APIError(400, f"{f('guidance', 'guidance')}: must be between 0 and {settings.max_guidance:g}, "
                            f"got {guidance:g}", f("guidance", "guidance"), "invalid_value")
    h0, w0 = pipe.image_size
    width, height = size or (w0, h0)
    limit = settings.max_size or 2 * max(h0, w0)
    if width > limit or height > limit:
        raise APIError(400, f"{f('size', 'size')}: {width}x{height} exceeds the maximum of {limit} px per side",
                       f("size", "size"), "size_too_large")
    m = pipe.dims.hw_multiple  # VAE factor x the U-Net's down-sampling: 64 px for SD and tiny-sd
    if width % m or height % m:
        raise APIError(400, f"{f('size', 'size')}: {width}x{height} not supported by this model: width and "
                            f"height must be multiples of {m} px", f("size", "size"), "unsupported_size")
    try:
        pipe.check_size(height, width)
    except ValueError as e:  # a static-shape export (--onnx-dir made without --dynamic-hw)
        raise APIError(400, f"{f('size', 'size')}: {width}x{height} not supported by this backend: {e}",
                       f("size", "size"), "unsupported_size") from None
    scheduler = scheduler or pipe.default_scheduler
    if scheduler not in SCHEDULERS:
        raise APIError(400, f"{f('scheduler', 'scheduler')}: unknown {scheduler!r}; choose one of "
                            f"{', '.join(SCHEDULERS)}", f("scheduler", "scheduler"), "invalid_value")
    if seed is None or seed < 0:  # random, but reported back so the image can be reproduced
        seed = secrets.randbelow(2**32)
    seed = min(int(seed), MAX_SEED)
    return GenerationParams(prompt, negative_prompt or "", n, width, height, int(steps), float(guidance), seed,
                            scheduler)


async def run(engine: Engine, p: GenerationParams) -> np.ndarray:
    job = Job(BatchKey(p.height, p.width, p.steps, p.guidance, p.scheduler), [p.prompt] * p.n,
              [p.negative_prompt] * p.n, [p.seed + i for i in range(p.n)])
    return await engine.submit(job)


def png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def size_of(value: str | None) -> tuple[int, int] | None:
    return None if value in (None, "auto") else parse_size(value)


def a1111_sampler(name: str | None) -> str | None:
    if name is None or name == "":
        return None
    key = name.strip().lower()
    if key in SCHEDULERS:
        return key
    if key in A1111_SAMPLERS and A1111_SAMPLERS[key]:
        return A1111_SAMPLERS[key]
    offered = ["DDIM", "Euler", "Euler a", "DPM++ 2M"]
    raise APIError(400, f"sampler_name: {name!r} is not available; choose one of {', '.join(offered)}",
                   "sampler_name", "invalid_value")
