"""The serving layer: a bounded queue per model, continuous batching, inference threads off the event loop.

Requests with the same :class:`BatchKey` (size, steps, scheduler, guidance) can share one call
of the denoising loop: N requests of n images become one run over sum(n) images, which costs
far less than N runs on any backend that is not already saturated. **Continuous batching:** a
worker that finishes a batch takes, at once, the oldest waiting request and every waiting
request with its key (up to ``max_batch_size`` images, in arrival order), i.e. the requests that
arrived while the previous batch ran; an idle worker starts a lone request immediately. There
is no timer unless ``max_wait_ms`` > 0 asks for one (then the oldest request waits that long
after its arrival for company). Requests with other keys keep their place. Refill: right after
a batch, for a quarter of its time (at most ``REFILL_MAX_S``), the next batch waits for the
clients just answered to come back (closed-loop clients return together), so they are not split
into a lone request and the rest; a lone client and an engine idle past that window never wait.

Each model has its own :class:`Engine` (queue, workers, metrics labelled with its id);
:class:`Engines` holds them, loads them one after the other (the default first) and answers for
all of them (readiness, drain, stop). While a batch runs, :attr:`Engine.running` tells which
step it is at (``/sdapi/v1/progress``, the job API); a job whose caller cancelled it
(``POST /sdapi/v1/interrupt``, ``DELETE /v1/images/jobs/{id}``) stops its batch before the next
U-Net call once every job of that batch is cancelled, and gets :class:`Interrupted`.

Failure modes are explicit: a full queue raises :class:`QueueFull` (-> 429 + Retry-After),
a request not served within ``request_timeout_s`` :class:`RequestTimeout` (-> 504; if it has
not started it is dropped from the queue), an exception in the backend :class:`BackendError`
for every request of that batch (-> 503) while the worker goes on with the next batch.

(Over ~400 lines on purpose: queueing, batching, refill, progress, interrupt and drain share
one lock and one queue per model; split across files they would have to share that state.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .metrics import Metrics

log = logging.getLogger("slimsd.serve")


# -- errors the HTTP layer maps to status codes -----------------------------------------------
class EngineError(Exception):
    status = 503
    code = "unavailable"
    retry_after: int | None = None

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(EngineError):
    status, code = 429, "queue_full"


class NotReady(EngineError):
    status, code = 503, "not_ready"


class Draining(EngineError):
    status, code = 503, "draining"


class RequestTimeout(EngineError):
    status, code = 504, "timeout"


class BackendError(EngineError):
    status, code = 503, "backend_error"


class Interrupted(EngineError):
    """The job was stopped on request (A1111 interrupt, job cancel): a client's choice, not a fault."""

    status, code = 409, "interrupted"


def _consume(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()


@dataclass(frozen=True)
class BatchKey:
    height: int
    width: int
    steps: int
    guidance: float
    scheduler: str


@dataclass(eq=False)
class Job:
    key: BatchKey
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    enqueued: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    started: float | None = None  # monotonic time its batch started
    finished: float | None = None  # ... and ended
    cancel_reason: str | None = None  # set by interrupt / cancel: the batch stops once all its jobs have one

    @property
    def n(self) -> int:
        return len(self.prompts)

    @property
    def timings_ms(self) -> dict[str, float]:
        """Queue wait and inference time of this job (server side), once it ran."""
        if self.started is None or self.finished is None:
            return {}
        return {"queue": 1000 * (self.started - self.enqueued), "inference": 1000 * (self.finished - self.started)}


@dataclass
class Running:
    """A batch on a worker, step by step (``step`` = U-Net steps done)."""

    jobs: list[Job]
    steps: int
    started: float = field(default_factory=time.monotonic)
    step: int = 0
    latents: np.ndarray | None = None  # the first image's U-Net input at ``step`` (for previews)

    @property
    def progress(self) -> float:
        return self.step / self.steps if self.steps else 0.0

    def eta_s(self) -> float:
        """Seconds left, from the time per step so far (the first step's cost is not yet known: 0)."""
        if self.step == 0:
            return 0.0
        per_step = (time.monotonic() - self.started) / self.step
        return per_step * (self.steps - self.step)


REFILL_MAX_S = 0.05
# At shutdown, how long a batch stopped by the drain timeout may take to reach its next step (one
# SD-size step on a CPU is seconds; a hung backend must not hold the process forever)
SHUTDOWN_STEP_WAIT_MAX_S = 30.0
SHUTDOWN = "server shut down"  # the cancel reason of batches stopped past the drain timeout


@dataclass
class EngineConfig:
    max_batch_size: int = 8
    max_wait_ms: float = 0.0
    max_queue: int = 32
    workers: int = 1
    request_timeout_s: float = 120.0
    warmup: bool = True


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Engine:
    """One model: loads its pipeline, then serves jobs from worker threads."""

    def __init__(self, load: Callable[[], object], config: EngineConfig, metrics: Metrics | None = None,
                 on_load_error: Callable[[BaseException], None] | None = None, name: str = "model"):
        self._load = load
        self.name = name
        self.config = config
        self.metrics = metrics or Metrics()
        self.m = self.metrics.model(name)
        self.pipeline = None
        self.load_error: BaseException | None = None
        self.ready = False
        self.draining = False
        self.memory_bytes: int | None = None  # resident memory the load added
        self.load_s: float | None = None
        self._on_load_error = on_load_error
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self.running: list[Running] = []
        self._batch_seconds = 1.0  # running mean, for Retry-After
        self._expect, self._expect_until = 0, 0.0  # refill: requests expected back right after a batch

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Load (and warm) in a thread: the HTTP server answers /health/live meanwhile."""
        t = threading.Thread(target=self.load_and_run, name=f"slimsd-load-{self.name}", daemon=True)
        t.start()
        self._threads.append(t)

    def load_and_run(self) -> bool:
        """Load, warm up, start the workers (blocking); False (and ``load_error`` set) on failure."""
        try:
            rss, t0 = _rss_bytes(), time.perf_counter()
            pipe = self._load()
            self.load_s = time.perf_counter() - t0
            self.memory_bytes = max(0, _rss_bytes() - rss)
            if self.config.warmup:
                s = pipe.warmup()
                self._batch_seconds = max(s, 1e-3)
                log.info("%s: warm-up generation took %.2f s", self.name, s)
            self.pipeline = pipe
        except BaseException as e:  # noqa: BLE001 - reported on /health/ready and to the owner
            log.exception("loading the model %s failed", self.name)
            self.load_error = e
            if self._on_load_error:
                self._on_load_error(e)
            return False
        for i in range(self.config.workers):
            t = threading.Thread(target=self._worker, name=f"slimsd-worker-{self.name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self.ready = True
        return True

    def drain(self) -> None:
        """Refuse new requests (ready -> 503); queued and running ones still finish."""
        self.draining = True

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Drain, wait for the queue and running batches (up to ``timeout_s``), stop the workers."""
        self.drain()
        await asyncio.to_thread(self.finish, timeout_s)

    @property
    def idle(self) -> bool:
        return not self._pending and not self._busy

    def finish(self, timeout_s: float) -> None:
        """Blocking :meth:`stop` without the drain (the caller drains first): wait up to ``timeout_s``,
        then queued jobs get ``draining`` and a batch still running stops at its next step (an
        SD-size batch on a CPU runs for minutes: the process must not outlive its drain timeout by
        that much), waited for up to about one step."""
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        self.close()
        self.stop_running(SHUTDOWN)

    def stop_running(self, reason: str) -> None:
        """After :meth:`close`: a batch still running stops at its next step; wait for that, up to about
        one step (measured on the batch itself) and at most ``SHUTDOWN_STEP_WAIT_MAX_S``."""
        running = list(self.running)
        if not running:
            return
        step_s = max((time.monotonic() - r.started) / max(r.step, 1) for r in running)
        n = self.interrupt(reason)
        log.warning("%s: drain timeout passed with %d request(s) running: stopping them at their next step",
                    self.name, n)
        grace = time.monotonic() + min(SHUTDOWN_STEP_WAIT_MAX_S, 1.5 * step_s + 0.5)
        while self._busy and time.monotonic() < grace:
            time.sleep(0.02)

    def close(self) -> None:
        """Queued jobs get ``draining``; the workers stop after their running batch."""
        with self._cond:
            self._stop = True
            for job in self._pending:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(Draining("server shut down before this request ran"))
            self._pending.clear()
            self._cond.notify_all()
        self.m.queue_depth.set(0)

    # -- submitting -----------------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on by one batch per worker."""
        per_batch = self._batch_seconds
        batches = math.ceil((len(self._pending) + 1) / max(1, self.config.max_batch_size))
        return max(1, math.ceil(per_batch * batches / self.config.workers))

    def check_open(self) -> None:
        if self.draining:
            raise Draining("server is shutting down; retry on another replica", retry_after=1)
        if self.load_error is not None:
            raise NotReady(f"model {self.name!r} failed to load: {type(self.load_error).__name__}: "
                           f"{self.load_error}")
        if not self.ready:
            raise NotReady(f"model {self.name!r} is loading; retry shortly", retry_after=5)

    def enqueue(self, job: Job) -> concurrent.futures.Future:
        try:
            self.check_open()
            with self._cond:
                if len(self._pending) >= self.config.max_queue:
                    raise QueueFull(f"server busy: {len(self._pending)} requests queued for {self.name!r} (max_queue "
                                    f"{self.config.max_queue}); retry later", retry_after=self.retry_after())
                self._pending.append(job)
                self.m.queue_depth.set(len(self._pending))
                self._cond.notify_all()
        except EngineError as e:
            self.m.rejections(e.code).inc()
            raise
        return job.future

    def queue_position(self, job: Job) -> int | None:
        """0 = the next to run; None when not waiting."""
        with self._cond:
            try:
                return self._pending.index(job)
            except ValueError:
                return None

    def cancel(self, job: Job, reason: str = "cancelled") -> bool:
        """A queued job leaves the queue (its future is cancelled: True); a running one is marked,
        and its batch stops before the next U-Net call once every job of it is marked."""
        job.cancel_reason = reason
        with self._cond:
            if job in self._pending and job.future.cancel():
                self._pending.remove(job)
                self.m.queue_depth.set(len(self._pending))
                return True
        return False

    def interrupt(self, reason: str = "interrupted") -> int:
        """Stop every running batch at its next step (A1111 ``/sdapi/v1/interrupt``, shutdown); jobs interrupted."""
        jobs = [j for r in list(self.running) for j in r.jobs]
        for j in jobs:
            j.cancel_reason = j.cancel_reason or reason
        return len(jobs)

    async def submit(self, job: Job) -> np.ndarray:
        """uint8 images [n, H, W, 3] for ``job``, or an :class:`EngineError`."""
        fut = self.enqueue(job)
        return await self.wait(job, fut)

    async def wait(self, job: Job, fut: concurrent.futures.Future | None = None) -> np.ndarray:
        fut = fut or job.future
        try:
            # shield: the timeout must not cancel a batch that other requests share
            wrapped = asyncio.wrap_future(fut)
            wrapped.add_done_callback(_consume)  # an outcome nobody awaits any more is not an error
            return await asyncio.wait_for(asyncio.shield(wrapped), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            started = not fut.cancel()  # a queued job is dropped; a running one finishes unobserved
            if not started:
                with self._cond:
                    if job in self._pending:
                        self._pending.remove(job)
                    self.m.queue_depth.set(len(self._pending))
            self.m.rejections("timeout").inc()
            raise RequestTimeout(f"request not served within {self.config.request_timeout_s:g} s "
                                 f"({'running' if started else 'still queued'})") from None
        except BackendError:
            self.m.rejections("backend_error").inc()
            raise

    # -- the worker -----------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        """Block until there is work; remove a batch from the queue. None when stopping.

        Continuous batching: everything of the oldest request's key that is waiting now (the
        requests that arrived while the previous batch ran), without waiting for more, unless
        ``max_wait_ms`` asks the oldest request to wait that long after its arrival for company.
        """
        cfg = self.config
        with self._cond:
            while True:
                if self._stop:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                first = self._pending[0]
                same = [j for j in self._pending if j.key == first.key]
                now = time.monotonic()
                if sum(j.n for j in same) >= cfg.max_batch_size:
                    break
                if cfg.max_wait_ms > 0:
                    due = first.enqueued + cfg.max_wait_ms / 1000.0
                elif len(same) < self._expect:
                    due = self._expect_until  # refill: the clients just answered come back together
                else:
                    break
                if now >= due:
                    break
                self._cond.wait(due - now)
            batch, images = [], 0
            for j in same:
                if batch and images + j.n > cfg.max_batch_size:
                    continue  # a later, smaller request of the same key may still fit
                batch.append(j)
                images += j.n
            for j in batch:
                self._pending.remove(j)
            self.m.queue_depth.set(len(self._pending))
            self._busy += 1
        # set_running fails for jobs whose caller timed out or cancelled meanwhile: skip them
        return [j for j in batch if j.future.set_running_or_notify_cancel()]

    def _worker(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                if batch:
                    self._run(batch)
            finally:
                with self._cond:
                    self._busy -= 1

    def _run(self, batch: list[Job]) -> None:
        try:
            self._run_batch(batch)
        finally:
            # Refill: the clients of this batch tend to send their next request within milliseconds of
            # their answer. For a short window (a quarter of the batch time, at most REFILL_MAX_S) the
            # next batch waits for them next to those already waiting, so closed-loop clients stay in
            # one batch instead of splitting into a lone request and the rest. A lone client is never
            # kept waiting (it is the one expected), and an engine idle past the window starts at once.
            with self._cond:
                self._expect = len(self._pending) + len(batch) if len(batch) + len(self._pending) > 1 else 0
                self._expect_until = time.monotonic() + min(0.25 * self._batch_seconds, REFILL_MAX_S)

    def _run_batch(self, batch: list[Job]) -> None:
        m, key = self.m, batch[0].key
        start = time.monotonic()
        for j in batch:
            j.started = start
            m.queue_wait_seconds.observe(start - j.enqueued)
        prompts = [p for j in batch for p in j.prompts]
        m.batch_size.observe(len(prompts))
        m.batch_requests.observe(len(batch))
        state = Running(batch, key.steps, start)

        def on_step(i: int, x) -> None:  # after each denoising step: i steps done, x the latents
            state.step, state.latents = i, x
            if all(j.cancel_reason for j in batch):
                raise Interrupted(f"{batch[0].cancel_reason} at step {i} of {key.steps}")

        self.running.append(state)
        try:
            images = self.pipeline.generate(
                prompts, [p for j in batch for p in j.negative_prompts], [s for j in batch for s in j.seeds],
                steps=key.steps, guidance=key.guidance, height=key.height, width=key.width,
                scheduler=key.scheduler, callback=on_step)
        except Interrupted as e:
            log.info("%s: batch of %d images stopped: %s", self.name, len(prompts), e)
            for j in batch:
                j.finished = time.monotonic()
                msg = f"{j.cancel_reason} at step {state.step} of {key.steps}"
                if j.cancel_reason == SHUTDOWN:  # 503 draining: retry on another replica (not the client's 409)
                    m.rejections("draining").inc()
                    j.future.set_exception(Draining(msg, retry_after=1))
                else:
                    m.rejections("interrupted").inc()
                    j.future.set_exception(Interrupted(msg))
            return
        except Exception as e:  # noqa: BLE001 - any backend fault fails this batch only
            log.exception("%s: backend failed on a batch of %d images", self.name, len(prompts))
            err = BackendError(f"backend error: {type(e).__name__}: {e}", retry_after=1)
            for j in batch:
                j.finished = time.monotonic()
                j.future.set_exception(err)
            return
        finally:
            self.running.remove(state)
        end = time.monotonic()
        seconds = end - start
        m.inference_seconds.observe(seconds)
        m.images.inc(len(prompts))
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        i = 0
        for j in batch:
            j.finished = end
            if j.cancel_reason:  # cancelled while its batch mates went on: no result for it
                m.rejections("interrupted").inc()
                j.future.set_exception(Interrupted(f"{j.cancel_reason} while running; its batch finished without it"))
            else:
                j.future.set_result(images[i:i + j.n])
            i += j.n


class UnknownModel(LookupError):
    def __init__(self, name: str, choices: Iterable[str]):
        self.name, self.choices = name, list(choices)
        super().__init__(f"{name!r} is not served here; choose one of {', '.join(map(repr, self.choices))}")


class Engines:
    """Every served model's :class:`Engine`, by id; the first is the default (``/sdapi/v1/options``
    changes it). Loads them one after the other in a background thread (the default first), so a
    model's ``memory_bytes`` is what its own load added. Ready when all are."""

    def __init__(self, engines: list[Engine], config: EngineConfig):
        if not engines:
            raise ValueError("model: no model to serve")
        self.engines = {e.name: e for e in engines}
        if len(self.engines) != len(engines):
            names = [e.name for e in engines]
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"model: the same id served twice: {', '.join(dup)} (name them with NAME=MODEL)")
        self.config = config  # shared by every engine: changing it changes all
        self.default = engines[0].name
        self.draining = False
        self._thread: threading.Thread | None = None

    def __iter__(self):
        return iter(self.engines.values())

    def __len__(self) -> int:
        return len(self.engines)

    @property
    def names(self) -> list[str]:
        return list(self.engines)

    def get(self, name: str | None = None) -> Engine:
        """The engine of ``name`` (None: the default); :class:`UnknownModel` names the choices."""
        if name is None or name == "":
            return self.engines[self.default]
        if name in self.engines:
            return self.engines[name]
        raise UnknownModel(name, self.engines)

    def set_default(self, name: str) -> None:
        self.default = self.get(name).name

    # what the single-model server exposed (server.py, tests): the default model's view
    @property
    def pipeline(self):
        return self.engines[self.default].pipeline

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self)

    @property
    def load_error(self) -> BaseException | None:
        return next((e.load_error for e in self if e.load_error is not None), None)

    def start(self) -> None:
        def load_all():
            for e in self:
                if not e.load_and_run():
                    return  # the owner was told (on_load_error): the server stops

        self._thread = threading.Thread(target=load_all, name="slimsd-load", daemon=True)
        self._thread.start()

    def check_open(self) -> None:
        for e in self:
            e.check_open()

    def drain(self) -> None:
        self.draining = True
        for e in self:
            e.drain()

    async def stop(self, timeout_s: float = 30.0) -> None:
        self.drain()
        await asyncio.to_thread(self.finish, timeout_s)

    def finish(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(e.idle for e in self) and time.monotonic() < deadline:
            time.sleep(0.05)
        for e in self:
            e.close()
        for e in self:
            e.stop_running(SHUTDOWN)

    def interrupt(self) -> int:
        return sum(e.interrupt() for e in self)
