"""The FastAPI app: thin routes over :mod:`~slimsd.serve.service` and one :class:`~slimsd.serve.engine.Engine`
per served model (held by :class:`~slimsd.serve.engine.Engines`, the first model the default).

``create_app(settings)`` builds it; the lifespan starts the engines (the models load and warm
one after the other in the background, so ``/health/live`` answers at once and ``/health/ready``
turns 200 when every model can be served) and on shutdown drains them: ``/health/ready`` answers
503 while queued requests finish.

Routes: ``POST /v1/images/generations`` (OpenAI, ``model`` picks the model), the job API
``POST /v1/images/jobs``, ``GET|DELETE /v1/images/jobs/{id}``, AUTOMATIC1111's ``/sdapi/v1/...``
(:mod:`~slimsd.serve.a1111`), ``GET /v1/models``, ``GET /metrics``, ``GET /health/live``,
``GET /health/ready``, ``GET /`` (playground page). With ``api_key`` set, all but the health
probes and the static playground page (which sends the key the user types with its API calls)
need ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, Mapping

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import HTMLResponse

from . import a1111, errors, service
from .engine import Engine, EngineConfig, Engines
from .errors import APIError
from .jobs import JobStore
from .metrics import Metrics
from .middleware import LimitAndMeasure
from .schemas import (ErrorResponse, Health, ImageData, ImageGenerationRequest, ImageJob, ImagesResponse, ModelCard,
                      ModelList)
from .settings import ServeSettings

PLAYGROUND = Path(__file__).with_name("playground.html")
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 409, 413, 429, 503, 504)}


def _engines(request: Request) -> Engines:
    return request.app.state.engine


def _settings(request: Request) -> ServeSettings:
    return request.app.state.settings


async def require_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` when the server has a key (constant-time comparison).
    ``async`` although it never awaits: FastAPI runs a plain ``def`` dependency in its thread pool,
    a thread hop on every request of the hot route (#17)."""
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
    engines = _engines(request)
    return Health(status="ok", model=engines.default, models=engines.names)


@health.get("/health/ready", response_model=Health, responses={503: {"model": ErrorResponse}})
def ready(request: Request):
    engines = _engines(request)
    engines.check_open()  # raises the reason (loading / failed / draining) -> 503 in the error shape
    return Health(status="ok", model=engines.default, models=engines.names, backend=engines.pipeline.backend)


# -- the API ----------------------------------------------------------------------------------
api = APIRouter(dependencies=[Depends(require_key)], responses=_ERRORS)


@api.post("/v1/images/generations", response_model=ImagesResponse, tags=["openai"])  # the schema; body built below
async def images_generations(body: ImageGenerationRequest, request: Request):
    t0 = time.perf_counter()
    engine = service.pick_engine(_engines(request), body.model_choice(), body.MODEL_FIELD)
    p = body.to_params(engine, _settings(request))
    images, job = await service.run_timed(engine, p)
    t1 = time.perf_counter()
    out = ImagesResponse(created=int(time.time()),
                         data=[ImageData(b64_json=service.png_b64(im), seed=p.seed + i) for i, im in enumerate(images)])
    # serialized here by pydantic-core: FastAPI would validate the model a second time and encode it again (#17)
    body_json, t2 = out.model_dump_json(exclude_none=True), time.perf_counter()
    return Response(body_json, media_type="application/json",
                    headers=service.server_timing(job, t2 - t0, engine.name, p.steps, encode_s=t2 - t1))


@api.post("/v1/images/jobs", response_model=ImageJob, response_model_exclude_none=True, status_code=202,
          tags=["jobs"])
def create_job(body: ImageGenerationRequest, request: Request):
    """The same body as ``/v1/images/generations``; returns at once with the job's id."""
    engine = service.pick_engine(_engines(request), body.model_choice(), body.MODEL_FIELD)
    p = body.to_params(engine, _settings(request))
    store: JobStore = request.app.state.jobs
    entry = store.submit(engine, service.make_job(p), p.seed)
    return store.view(entry)


@api.get("/v1/images/jobs/{job_id}", response_model=ImageJob, response_model_exclude_none=True, tags=["jobs"])
def get_job(job_id: str, request: Request):
    store: JobStore = request.app.state.jobs
    return store.view(store.get(job_id))


@api.delete("/v1/images/jobs/{job_id}", response_model=ImageJob, response_model_exclude_none=True, tags=["jobs"])
def cancel_job(job_id: str, request: Request):
    """A queued job leaves the queue; a running one stops before its next step (unless it shares its batch);
    a finished one is deleted with its result."""
    store: JobStore = request.app.state.jobs
    return store.view(store.cancel(job_id))


@api.get("/v1/models", response_model=ModelList, tags=["openai"])
def models(request: Request):
    engines = _engines(request)
    if not engines.ready:
        engines.check_open()
    cards = []
    for e in engines:
        pipe = e.pipeline
        cards.append(ModelCard(id=e.name, backend=pipe.backend, precision=pipe.precision,
                               image_size=list(pipe.image_size), default_steps=pipe.defaults.steps,
                               default_guidance=pipe.defaults.guidance, default=e.name == engines.default,
                               memory_bytes=e.memory_bytes, load_s=None if e.load_s is None else round(e.load_s, 3)))
    return ModelList(data=cards)


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
Loader = Callable[[], object]


def create_app(settings: ServeSettings | None = None, load: Loader | Mapping[str, Loader] | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The server. ``load`` returns a :class:`~slimsd.serve.pipeline.Pipeline` for the first (only) model,
    or maps each model id to its loader (tests pass their own); default: every model of ``settings``
    through :func:`~slimsd.serve.pipeline.load_served_pipeline`."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    config = EngineConfig(max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                          max_queue=settings.max_queue, workers=settings.workers,
                          request_timeout_s=settings.request_timeout_s, warmup=settings.warmup)
    loaders = _loaders(settings, load)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engines = Engines([Engine(fn, config, metrics, on_load_error, name=name) for name, fn in loaders.items()],
                          config)
        app.state.engine = engines
        engines.start()
        try:
            yield
        finally:
            await engines.stop(settings.drain_timeout_s)

    app = FastAPI(title="slimsd", summary="Stable Diffusion behind the OpenAI Images and AUTOMATIC1111 APIs",
                  version=_version(), lifespan=lifespan)
    app.state.settings, app.state.metrics = settings, metrics
    app.state.jobs = JobStore(settings.job_ttl_s, settings.max_finished_jobs)
    errors.install(app)
    app.include_router(health)
    app.include_router(api)
    app.include_router(a1111.router, dependencies=[Depends(require_key)], responses=_ERRORS)
    app.include_router(page)
    app.add_middleware(LimitAndMeasure, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app


def _loaders(settings: ServeSettings, load: Loader | Mapping[str, Loader] | None) -> dict[str, Loader]:
    if isinstance(load, Mapping):
        return dict(load)
    served = settings.served()
    names = [n for n, _ in served]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"model: the same id served twice: {', '.join(dup)}; name one with NAME=MODEL")
    if load is not None:
        return {served[0][0]: load}
    from .models import check_memory
    from .pipeline import load_served_pipeline

    def loader(name: str, model: str) -> Loader:
        def fn():
            check_memory(model, name)
            return load_served_pipeline(settings.model_copy(update={"model": model, "model_name": name, "models": []}))

        return fn

    return {name: loader(name, model) for name, model in served}


def _version() -> str:
    import slimsd

    return slimsd.__version__
