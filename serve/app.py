"""The FastAPI app: thin routes over :mod:`~slimsd.serve.service` and one :class:`~slimsd.serve.engine.Engine`.

``create_app(settings)`` builds it; the lifespan starts the engine (the model loads and warms
in the background, so ``/health/live`` answers at once and ``/health/ready`` turns 200 when the
first request can be served) and on shutdown drains it: ``/health/ready`` answers 503 while
queued requests finish.

Routes: ``POST /v1/images/generations`` (OpenAI), ``POST /sdapi/v1/txt2img`` (AUTOMATIC1111),
``GET /v1/models``, ``GET /metrics``, ``GET /health/live``, ``GET /health/ready``, ``GET /``
(playground page). With ``api_key`` set, all but the health probes and the static playground
page (which sends the key the user types with its API calls) need ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import hmac
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from . import errors, service
from .engine import Engine, EngineConfig
from .errors import APIError
from .metrics import Metrics
from .middleware import LimitAndMeasure
from .schemas import (ErrorResponse, Health, ImageData, ImageGenerationRequest, ImagesResponse, ModelCard, ModelList,
                      Txt2ImgRequest, Txt2ImgResponse)
from .settings import ServeSettings

PLAYGROUND = Path(__file__).with_name("playground.html")
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 503, 504)}


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def require_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` when the server has a key (constant-time comparison)."""
    key = _settings(request).api_key
    if not key:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", None,
                       "invalid_api_key", {"WWW-Authenticate": "Bearer"})


# -- health (never guarded: load balancers and orchestrators have no key) -----------------------
health = APIRouter(tags=["health"])


@health.get("/health/live", response_model=Health)
def live(request: Request):
    engine = _engine(request)
    return Health(status="ok", model=engine.pipeline.name if engine.pipeline else None)


@health.get("/health/ready", response_model=Health, responses={503: {"model": ErrorResponse}})
def ready(request: Request):
    engine = _engine(request)
    engine.check_open()  # raises the reason (loading / failed / draining) -> 503 in the error shape
    return Health(status="ok", model=engine.pipeline.name, backend=engine.pipeline.backend)


# -- the API ----------------------------------------------------------------------------------
api = APIRouter(dependencies=[Depends(require_key)], responses=_ERRORS)

@api.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
          tags=["openai"])
async def images_generations(body: ImageGenerationRequest, request: Request):
    engine = _engine(request)
    p = body.to_params(engine, _settings(request))
    images = await service.run(engine, p)
    return ImagesResponse(created=int(time.time()),
                          data=[ImageData(b64_json=service.png_b64(im), seed=p.seed + i) for i, im in enumerate(images)])


@api.post("/sdapi/v1/txt2img", response_model=Txt2ImgResponse, tags=["automatic1111"])
async def txt2img(body: Txt2ImgRequest, request: Request):
    engine = _engine(request)
    p = body.to_params(engine, _settings(request))
    images = await service.run(engine, p)
    info = {"prompt": p.prompt, "negative_prompt": p.negative_prompt, "seed": p.seed,
            "all_seeds": [p.seed + i for i in range(p.n)], "steps": p.steps, "cfg_scale": p.guidance,
            "width": p.width, "height": p.height, "sampler_name": p.scheduler, "sd_model_name": engine.pipeline.name,
            "batch_size": p.n}
    return Txt2ImgResponse(images=[service.png_b64(im) for im in images], parameters=body.model_dump(),
                           info=json.dumps(info))


@api.get("/v1/models", response_model=ModelList, tags=["openai"])
def models(request: Request):
    pipe = _engine(request).pipeline
    if pipe is None:
        _engine(request).check_open()
    return ModelList(data=[ModelCard(id=pipe.name, backend=pipe.backend, precision=pipe.precision, image_size=list(pipe.image_size),
                                     default_steps=pipe.defaults.steps, default_guidance=pipe.defaults.guidance)])


@api.get("/metrics", tags=["ops"])
def metrics(request: Request):
    m: Metrics = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


# -- the playground page ----------------------------------------------------------------------
page = APIRouter()


@page.get("/", response_class=HTMLResponse, include_in_schema=False)
def playground():
    return HTMLResponse(PLAYGROUND.read_text())


# -- assembly ---------------------------------------------------------------------------------
def create_app(settings: ServeSettings | None = None, load: Callable[[], object] | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The server. ``load()`` returns a :class:`~slimsd.serve.pipeline.Pipeline` (default:
    :func:`~slimsd.serve.pipeline.load_pipeline` of ``settings``); tests pass their own."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    if load is None:
        from .pipeline import load_pipeline

        def load():
            return load_pipeline(settings)

    config = EngineConfig(max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                          max_queue=settings.max_queue, workers=settings.workers,
                          request_timeout_s=settings.request_timeout_s, warmup=settings.warmup)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = Engine(load, config, metrics, on_load_error)
        app.state.engine = engine
        engine.start()
        try:
            yield
        finally:
            await engine.stop(settings.drain_timeout_s)

    app = FastAPI(title="slimsd", summary="Stable Diffusion behind the OpenAI Images and AUTOMATIC1111 APIs",
                  version=_version(), lifespan=lifespan)
    app.state.settings, app.state.metrics = settings, metrics
    errors.install(app)
    app.include_router(health)
    app.include_router(api)
    app.include_router(page)
    app.add_middleware(LimitAndMeasure, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app


def _version() -> str:
    import slimsd

    return slimsd.__version__

