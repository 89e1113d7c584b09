"""Request and response bodies: the OpenAI Images API, AUTOMATIC1111's txt2img, errors, health.

Only checks that need no settings live here (types, ranges that hold for any model, the
``WxH`` format); limits that come from settings or the model (largest size, ``n``, steps, prompt
length) are checked in :mod:`slimsd.serve.service`, with the same error shape. Each request
model converts itself to the service's parameters (``to_params``, after vLLM's
``to_sampling_params``), naming fields as its API spells them.
Unknown fields are ignored, as the OpenAI API and AUTOMATIC1111 do (``quality``, ``style``,
``user``, ``enable_hr``, ... have no meaning here).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimsd.precision import Precision

MAX_SEED = 2**63 - 1 - 64  # seeds of one request are seed, seed+1, ...: stay inside int64
_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def _not_blank(v: str | None) -> str | None:
    if v is not None and not v.strip():
        raise ValueError("must not be empty")
    return v


def parse_size(v: str) -> tuple[int, int]:
    """``"WxH"`` -> (width, height), both positive multiples of 8."""
    m = _SIZE.match(v)
    if not m:
        raise ValueError(f"must be 'WIDTHxHEIGHT' in pixels, e.g. '512x512'; got {v!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise ValueError(f"width and height must be positive multiples of 8; got {v!r}")
    return w, h


# -- OpenAI Images API ------------------------------------------------------------------------
class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations`` (OpenAI) plus optional Stable Diffusion fields."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(description="what to draw")
    model: str | None = Field(None, description="id of one of the served models (GET /v1/models); omitted = the "
                                                "default")
    n: int = Field(1, ge=1, description="number of images")
    size: str | None = Field(None, description="'WIDTHxHEIGHT'; default the model's native size")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="only b64_json (the default here): images are not stored, so there is no URL")
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(None, ge=1, description="default: the model's own (25 teacher, 8 student)")
    guidance_scale: float | None = Field(None, ge=0, description="classifier-free guidance; <= 1 disables it")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="image i gets seed+i; None or -1: random")
    scheduler: str | None = Field(None, description="ddim | euler | euler_a | dpm++")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return _not_blank(v)

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if v is not None and v != "auto":  # gpt-image-1 clients send "auto": the native size
            parse_size(v)
        return v

    FIELDS: ClassVar[dict[str, str]] = {"steps": "num_inference_steps", "guidance": "guidance_scale"}
    MODEL_FIELD: ClassVar[str] = "model"

    def model_choice(self) -> str | None:
        return self.model

    def to_params(self, engine, settings):
        """This request as :class:`~slimsd.serve.service.GenerationParams`: defaults filled, limits checked."""
        from .errors import bad_request
        from .service import Limits

        if self.response_format == "url":
            raise bad_request("response_format", "'url' is not supported (images are not stored); use 'b64_json'",
                              "unsupported_value")
        size = None if self.size in (None, "auto") else parse_size(self.size)
        return Limits.of(engine, settings).resolve(
            prompt=self.prompt, negative_prompt=self.negative_prompt, n=self.n, size=size,
            steps=self.num_inference_steps, guidance=self.guidance_scale, seed=self.seed, scheduler=self.scheduler,
            fields=self.FIELDS)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int  # not in OpenAI's schema; its client keeps unknown fields


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


# -- AUTOMATIC1111 ----------------------------------------------------------------------------
class Txt2ImgRequest(BaseModel):
    """``POST /sdapi/v1/txt2img`` in AUTOMATIC1111's shape (the fields that mean something here)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1)
    cfg_scale: float | None = Field(None, ge=0)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    width: int | None = Field(None, gt=0, multiple_of=8)
    height: int | None = Field(None, gt=0, multiple_of=8)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1, description="batches; images = batch_size * n_iter")
    sampler_name: str | None = Field(None, description="DDIM, Euler, Euler a, DPM++ 2M (or ddim/euler/euler_a/dpm++)")
    sampler_index: str | None = Field(None, description="older name of sampler_name")
    scheduler: str | None = Field(None, description="A1111 schedule type: 'Automatic' (the model's own timestep "
                                                    "spacing, the only one slimsd runs); a sampler name is taken as "
                                                    "sampler_name")
    override_settings: dict[str, Any] = Field(default_factory=dict, description="sd_model_checkpoint picks the "
                                              "model for this request; other keys are ignored")
    override_settings_restore_afterwards: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return _not_blank(v)

    FIELDS: ClassVar[dict[str, str]] = {"n": "batch_size", "steps": "steps", "guidance": "cfg_scale",
                                        "size": "width/height", "scheduler": "sampler_name"}

    MODEL_FIELD: ClassVar[str] = "override_settings.sd_model_checkpoint"

    def model_choice(self) -> str | None:
        v = self.override_settings.get("sd_model_checkpoint")
        if v is not None and not isinstance(v, str):
            from .errors import bad_request

            raise bad_request(self.MODEL_FIELD, f"must be a model title (a string), got {v!r}")
        return v

    def to_params(self, engine, settings):
        """This request as :class:`~slimsd.serve.service.GenerationParams`: defaults filled, limits checked."""
        from .service import Limits, a1111_sampler, a1111_schedule

        sampler = self.sampler_name or self.sampler_index
        if a1111_schedule(self.scheduler) is not None and not sampler:  # a sampler sent as the scheduler
            sampler = self.scheduler
        scheduler = a1111_sampler(sampler)
        limits = Limits.of(engine, settings)
        size = None
        if self.width is not None or self.height is not None:
            h0, w0 = limits.image_size
            size = (self.width or w0, self.height or h0)
        return limits.resolve(prompt=self.prompt, negative_prompt=self.negative_prompt, n=self.batch_size * self.n_iter,
                              size=size, steps=self.steps, guidance=self.cfg_scale, seed=self.seed,
                              scheduler=scheduler, fields=self.FIELDS)


class Txt2ImgResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str  # a JSON string, as AUTOMATIC1111 returns it


# the shapes of AUTOMATIC1111's modules/api/models.py, field for field
class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 of the job being computed (0 when idle)")
    eta_relative: float = Field(description="seconds left, estimated from the steps so far")
    state: dict[str, Any] = Field(description="skipped, interrupted, job, job_count, job_timestamp, job_no, "
                                              "sampling_step, sampling_steps")
    current_image: str | None = Field(None, description="base64 PNG of the current latents (None when "
                                                        "skip_current_image or idle)")
    textinfo: str | None = None


# -- the job API ------------------------------------------------------------------------------
class ImageJob(BaseModel):
    id: str
    object: Literal["image.job"] = "image.job"
    model: str
    created: int
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float = Field(0.0, description="0..1: denoising steps done / steps")
    step: int = 0
    steps: int
    queue_position: int | None = Field(None, description="0 = next to run; None unless queued")
    result: ImagesResponse | None = None
    error: "ErrorDetail | None" = None


# -- errors and probes ------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "loading", "draining", "failed"]
    model: str | None = None  # the default model
    models: list[str] | None = None  # every served model, the default first
    backend: str | None = None
    detail: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "slimsd"
    backend: str
    precision: Precision = "f32"  # what the backend computes in (slimsd.precision)
    image_size: list[int]
    default_steps: int
    default_guidance: float
    default: bool = Field(False, description="the model a request without `model` gets")
    memory_bytes: int | None = Field(None, description="resident memory its load added (models load one after the "
                                                       "other)")
    load_s: float | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


ImageJob.model_rebuild()
