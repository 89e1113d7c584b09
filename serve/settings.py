"""Every setting of the server, in one pydantic model (``slimsd serve --help`` mirrors it).

The CLI fills it from flags; ``SLIMSD_API_KEY`` supplies the key so it never shows in ``ps``.
Limits that depend on the model (largest image size) are resolved once the model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from slimsd.precision import ExportDtype, RequestedPrecision

Backend = Literal["auto", "onnxruntime", "openvino", "torch", "tensorrt", "triton"]
BACKENDS: tuple[str, ...] = ("onnxruntime", "openvino", "torch", "tensorrt", "triton")


class ServeSettings(BaseModel):
    model_config = {"extra": "forbid"}

    # -- what to serve --------------------------------------------------------------------
    model: str | None = Field(None, description="preset, diffusers folder or hub id; None = the compressed "
                                                "model (tiny-sd-slim) when it resolves, else the teacher tiny-sd")
    models: list[str] = Field(default_factory=list, json_schema_extra={"flag": "--model"},
                              description="more models in the same server (after MODEL), each as MODEL or "
                                          "NAME=MODEL; clients pick one by id (OpenAI `model`, A1111 "
                                          "override_settings.sd_model_checkpoint); the first served is the default")
    model_name: str | None = Field(None, description="id clients see (OpenAI `model`) for the first model; default: "
                                                     "the model argument")
    max_models: int = Field(4, ge=1, description="most models one server loads; more is a start-up error")
    backend: Backend = Field("auto", description="auto = the measured fastest accurate runtime here: onnxruntime on "
                                                 "a CUDA GPU and for small U-Nets (< 100M params); for SD-size U-Nets "
                                                 "on a BF16 CPU openvino bf16 (torch bf16 without openvino); else "
                                                 "onnxruntime (docs/serve.md, How auto chooses)")
    scheduler: str = Field("ddim", description="default scheduler: ddim | euler | euler_a | dpm++")

    # -- backend details ------------------------------------------------------------------
    onnx_dir: Path | None = Field(None, description="existing `slimsd export onnx` folder; default: exported "
                                                    "into the cache on start-up")
    cache_dir: Path | None = Field(None, description="default $SLIMSD_CACHE/onnx (~/.cache/slimsd/onnx)")
    dtype: ExportDtype = Field("float32", description="export / torch dtype (float16 needs a GPU)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device; cpu also pins ONNX Runtime to "
                                                   "its CPU provider")
    threads: int | None = Field(None, ge=1, description="intra-op threads of ONNX Runtime / OpenVINO / torch "
                                                       "(default: all)")
    precision: RequestedPrecision = Field("auto", description="CPU precision of openvino and torch: auto "
                                                      "= openvino bf16 where the CPU supports it (int8 where its `slimsd "
                                                      "export int8` report vouches for it), torch --dtype; with backend "
                                                      "auto, f32 keeps onnxruntime fp32, bf16 forces bf16, int8 = openvino "
                                                      "with the int8 U-Net")
    openvino_cache: bool = Field(True, description="openvino: keep compiled models in <onnx dir>/openvino "
                                                   "(faster restarts)")
    openvino_static_shapes: int | None = Field(None, ge=0, description="openvino: input shapes per component that also "
                                                                         "get a static-shape compile (own weights each); "
                                                                         "default 1 for small U-Nets (< 400 MB), 0 for "
                                                                         "SD-size ones, where it measured no faster")
    engines_dir: Path | None = Field(None, description="tensorrt: folder of <component>.plan; default built into "
                                                       "the cache from the ONNX export")
    triton_url: list[str] = Field(default_factory=lambda: ["localhost:8001"],
                                  description="triton: one or more servers, round-robin per call")
    triton_protocol: Literal["grpc", "http"] = Field("grpc", description="tritonclient protocol (ports 8001 / 8000)")
    triton_model_prefix: str = Field("", description="triton: prefix of the three model names, '{model}' = the model as "
                                     "named (preset, folder or hub id): '{model}_' reads a repository of `slimsd export triton --prefix NAME_` exports")

    # -- HTTP -----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 to accept other machines")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    api_key: str | None = Field(None, description="when set, `Authorization: Bearer <key>` is required on every "
                                                  "route except /health/*")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")

    # -- limits on one request ------------------------------------------------------------
    max_n: int = Field(4, ge=1, description="images per request")
    max_steps: int = Field(100, ge=1, description="largest num_inference_steps / steps")
    max_guidance: float = Field(30.0, ge=0, description="largest guidance_scale / cfg_scale")
    max_size: int | None = Field(None, ge=8, description="largest width/height in px; default 2x the model's size")
    max_prompt_chars: int = Field(1000, ge=1, description="longest prompt / negative prompt in characters "
                                  "(CLIP reads the first 77 tokens)")

    # -- batching and queueing ------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, description="images per backend call")
    max_wait_ms: float = Field(0.0, ge=0, description="how long the oldest request of an idle engine waits for "
                               "company; 0 = continuous batching: batches form from requests that arrive while one "
                               "runs, a lone request starts at once")
    max_queue: int = Field(32, ge=1, description="requests waiting; beyond it: 429 with Retry-After")
    workers: int = Field(1, ge=1, description="inference threads (more only helps with triton or several GPUs)")
    request_timeout_s: float = Field(120.0, gt=0, description="queue + inference time before a 504")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM: how long running requests may finish")
    warmup: bool = Field(True, description="one 2-step generation before /health/ready turns 200")
    job_ttl_s: float = Field(600.0, gt=0, description="job API: how long a finished job's result is kept")
    max_finished_jobs: int = Field(64, ge=1, description="job API: most finished jobs kept (oldest dropped first)")

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    def served(self) -> list[tuple[str, str]]:
        """``(id, model)`` of every model to serve, the default first: ``model`` then ``models``;
        ``NAME=MODEL`` names one; ``model_name`` names the first; nothing given = :func:`default_model`."""
        specs = ([self.model] if self.model else []) + list(self.models)
        if not specs:
            from .models import default_model

            specs = [default_model()]
        out = []
        for i, spec in enumerate(specs):
            name, sep, model = spec.partition("=")
            if not sep or "/" in name or not name or not model:
                name, model = spec, spec
            out.append((self.model_name if i == 0 and self.model_name else name, model))
        return out

    @model_validator(mode="after")
    def _bounded(self):
        n = len(([self.model] if self.model else []) + list(self.models))
        if n > self.max_models:
            raise ValueError(f"model: {n} models given, at most max_models={self.max_models} (--max-models) load "
                             f"in one server")
        return self

    @model_validator(mode="after")
    def _key_from_env(self):
        # an empty string disables auth explicitly; only None falls back to the environment
        if self.api_key is None:
            self.api_key = os.environ.get("SLIMSD_API_KEY") or None
        return self
