"""AUTOMATIC1111's API (``/sdapi/v1/...``): the routes a front-end calls on connect, to render and while
it renders. Shapes follow A1111's ``modules/api/models.py`` field for field (SDModelItem,
SamplerItem, SchedulerItem, ProgressResponse, TextToImageResponse with ``info`` as a JSON string).

What slimsd cannot do (img2img, extras, upscalers, training, ...) answers 501 ``unsupported_route``
naming the route and listing what is supported, never a 500 or an HTML 404.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import Response

from . import service
from .engine import Engine, Engines
from .errors import APIError, error_response
from .schemas import (ProgressResponse, SamplerItem, SchedulerItem, SDModelItem, Txt2ImgRequest,
                      Txt2ImgResponse)
from .service import A1111_NAMES, A1111_SCHEDULES, SCHEDULERS

router = APIRouter(tags=["automatic1111"])

SUPPORTED = {"/sdapi/v1/txt2img": "POST", "/sdapi/v1/sd-models": "GET", "/sdapi/v1/options": "GET, POST",
             "/sdapi/v1/samplers": "GET", "/sdapi/v1/schedulers": "GET", "/sdapi/v1/progress": "GET",
             "/sdapi/v1/interrupt": "POST", "/sdapi/v1/cmd-flags": "GET"}


def _engines(request: Request) -> Engines:
    return request.app.state.engine


def _loaded(engines: Engines) -> list[Engine]:
    if not engines.ready:
        engines.check_open()  # 503 with the reason while loading / after a failure
    return list(engines)


@router.post("/sdapi/v1/txt2img", response_model=Txt2ImgResponse)
async def txt2img(body: Txt2ImgRequest, request: Request, response: Response):
    t0 = time.perf_counter()
    engine = service.pick_engine(_engines(request), body.model_choice(), body.MODEL_FIELD)
    p = body.to_params(engine, request.app.state.settings)
    images, job = await service.run_timed(engine, p)
    seeds = [p.seed + i for i in range(p.n)]
    sampler = service.a1111_name(p.scheduler)
    title = service.a1111_title(engine.name, engine.pipeline)
    info = {"prompt": p.prompt, "all_prompts": [p.prompt] * p.n, "negative_prompt": p.negative_prompt,
            "all_negative_prompts": [p.negative_prompt] * p.n, "seed": p.seed, "all_seeds": seeds,
            "subseed": -1, "all_subseeds": [-1] * p.n, "subseed_strength": 0, "width": p.width, "height": p.height,
            "sampler_name": sampler, "scheduler": "Automatic", "cfg_scale": p.guidance, "steps": p.steps,
            "batch_size": body.batch_size, "n_iter": body.n_iter, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": engine.name, "sd_model_hash": service.model_sha256(engine.pipeline)[:10],
            "sd_model_checkpoint": title, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": None, "extra_generation_params": {}, "index_of_first_image": 0,
            "infotexts": [f"{p.prompt}\nNegative prompt: {p.negative_prompt}\nSteps: {p.steps}, Sampler: {sampler}, "
                          f"CFG scale: {p.guidance:g}, Seed: {s}, Size: {p.width}x{p.height}, Model: {engine.name}"
                          for s in seeds],
            "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1, "is_using_inpainting_conditioning": False,
            "version": "slimsd"}
    parameters = body.model_dump()
    parameters["seed"] = p.seed
    response.headers.update(service.server_timing(job, time.perf_counter() - t0, engine.name, p.steps))
    return Txt2ImgResponse(images=[service.png_b64(im) for im in images], parameters=parameters, info=json.dumps(info))


@router.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
def sd_models(request: Request):
    out = []
    for e in _loaded(_engines(request)):
        sha = service.model_sha256(e.pipeline)
        out.append(SDModelItem(title=service.a1111_title(e.name, e.pipeline), model_name=e.name, hash=sha[:10],
                               sha256=sha, filename=str(e.pipeline.folder), config=None))
    return out


@router.get("/sdapi/v1/options")
def get_options(request: Request) -> dict[str, Any]:
    engines = _engines(request)
    _loaded(engines)
    e = engines.get()
    return {"sd_model_checkpoint": service.a1111_title(e.name, e.pipeline),
            "sd_checkpoint_hash": service.model_sha256(e.pipeline), "sd_vae": "Automatic", "samples_format": "png",
            "CLIP_stop_at_last_layers": 1, "live_previews_enable": True, "show_progress_every_n_steps": 1,
            "sd_checkpoints_limit": len(engines)}


@router.post("/sdapi/v1/options")
def set_options(request: Request, body: dict[str, Any] = Body(...)):
    """Only ``sd_model_checkpoint`` has an effect: the default model among the loaded ones."""
    engines = _engines(request)
    _loaded(engines)
    name = body.get("sd_model_checkpoint")
    if name is not None:
        if not isinstance(name, str):
            raise APIError(400, f"sd_model_checkpoint: must be a model title (a string), got {name!r}",
                           "sd_model_checkpoint", "invalid_value")
        engines.set_default(service.pick_engine(engines, name, "sd_model_checkpoint").name)
    return None


@router.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
def samplers():
    return [SamplerItem(name=A1111_NAMES[s][0], aliases=A1111_NAMES[s][1] + [s], options={}) for s in SCHEDULERS]


@router.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem])
def schedulers():
    return [SchedulerItem(name=k, label=v, aliases=None, default_rho=-1, need_inner_model=False)
            for k, v in A1111_SCHEDULES.items()]


@router.get("/sdapi/v1/progress", response_model=ProgressResponse)
def progress(request: Request, skip_current_image: bool = False):
    engines = _engines(request)
    runs = [(e, r) for e in engines for r in list(e.running)]
    queued = sum(len(e._pending) for e in engines)
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": queued + len(runs), "job_timestamp": "0",
             "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if not runs:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=state, current_image=None, textinfo=None)
    e, r = next(((e, r) for e, r in runs if e.name == engines.default), runs[0])
    state.update(interrupted=all(j.cancel_reason for j in r.jobs), job=f"{e.name}", sampling_step=r.step,
                 sampling_steps=r.steps,
                 job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(time.time() - (time.monotonic() - r.started))))
    image = None if skip_current_image else _preview(e, r)
    return ProgressResponse(progress=r.progress, eta_relative=r.eta_s(), state=state, current_image=image,
                            textinfo=f"{e.name}: step {r.step}/{r.steps}, {sum(j.n for j in r.jobs)} images")


def _preview(e: Engine, r) -> str | None:
    """The first image's current latents through the VAE (noisy early, the image late)."""
    import numpy as np

    from slimsd.denoise import to_uint8

    x = r.latents
    if x is None or e.pipeline is None:
        return None
    x = np.asarray(x, dtype=np.float32)[:1]
    img = to_uint8(np.asarray(e.pipeline.runners.vae_decoder(x / e.pipeline.dims.vae_scaling_factor)))[0]
    return service.png_b64(img)


@router.post("/sdapi/v1/interrupt")
def interrupt(request: Request):
    """Stops the running batch(es) at the next step; their requests get 409 ``interrupted``; the queue goes on."""
    _engines(request).interrupt()
    return None


@router.get("/sdapi/v1/cmd-flags")
def cmd_flags(request: Request) -> dict[str, Any]:
    s = request.app.state.settings
    return {"api": True, "nowebui": True, "listen": s.host not in ("127.0.0.1", "localhost"), "port": s.port,
            "ckpt": _engines(request).default, "api_auth": None, "skip_torch_cuda_test": True, "lowvram": False,
            "medvram": False}


@router.api_route("/sdapi/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
def unsupported(rest: str, request: Request):
    path = "/sdapi/v1/" + rest
    if path in SUPPORTED:
        return error_response(405, f"{request.method} {path}: method not allowed; use {SUPPORTED[path]}", None,
                              "method_not_allowed")
    listed = "; ".join(f"{m} {r}" for r, m in SUPPORTED.items())
    return error_response(501, f"{request.method} {path} is not supported by slimsd (text-to-image only); "
                               f"supported: {listed}", None, "unsupported_route", type="invalid_request_error")
