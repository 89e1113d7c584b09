"""The serving layer: a bounded queue, micro-batching, inference threads off the event loop.

Requests with the same :class:`BatchKey` (size, steps, scheduler, guidance) can share one call
of the denoising loop: N requests of n images become one run over sum(n) images, which costs
far less than N runs on any backend that is not already saturated. A worker takes the oldest
waiting request, waits up to ``max_wait_ms`` after *that request's arrival* for others with
its key (so under load, when requests have already waited, batches form without added delay),
takes up to ``max_batch_size`` images of that key in arrival order, and runs them. Requests
with other keys keep their place.

Failure modes are explicit: a full queue raises :class:`QueueFull` (-> 429 + Retry-After),
a request not served within ``request_timeout_s`` :class:`RequestTimeout` (-> 504; if it has
not started it is dropped from the queue), an exception in the backend :class:`BackendError`
for every request of that batch (-> 503) while the worker goes on with the next batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

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


@dataclass
class Job:
    key: BatchKey
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    enqueued: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def n(self) -> int:
        return len(self.prompts)


@dataclass
class EngineConfig:
    max_batch_size: int = 8
    max_wait_ms: float = 20.0
    max_queue: int = 32
    workers: int = 1
    request_timeout_s: float = 120.0
    warmup: bool = True


class Engine:
    """Owns the pipeline: loads it in the background, then serves jobs from worker threads."""

    def __init__(self, load: Callable[[], object], config: EngineConfig, metrics: Metrics | None = None,
                 on_load_error: Callable[[BaseException], None] | None = None):
        self._load = load
        self.config = config
        self.metrics = metrics or Metrics()
        self.pipeline = None
        self.load_error: BaseException | None = None
        self.ready = False
        self.draining = False
        self._on_load_error = on_load_error
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._batch_seconds = 1.0  # running mean, for Retry-After

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Load (and warm) in a thread: the HTTP server answers /health/live meanwhile."""
        t = threading.Thread(target=self._load_and_run, name="slimsd-load", daemon=True)
        t.start()
        self._threads.append(t)

    def _load_and_run(self) -> None:
        try:
            pipe = self._load()
            if self.config.warmup:
                s = pipe.warmup()
                self._batch_seconds = max(s, 1e-3)
                log.info("warm-up generation took %.2f s", s)
            self.pipeline = pipe
        except BaseException as e:  # noqa: BLE001 - reported on /health/ready and to the owner
            log.exception("loading the model failed")
            self.load_error = e
            if self._on_load_error:
                self._on_load_error(e)
            return
        for i in range(self.config.workers):
            t = threading.Thread(target=self._worker, name=f"slimsd-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self.ready = True

    def drain(self) -> None:
        """Refuse new requests (ready -> 503); queued and running ones still finish."""
        self.draining = True

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Drain, wait for the queue and running batches (up to ``timeout_s``), stop the workers."""
        self.drain()
        await asyncio.to_thread(self.finish, timeout_s)

    def finish(self, timeout_s: float) -> None:
        """Blocking :meth:`stop` without the drain (the caller drains first): wait up to ``timeout_s``,
        then queued jobs get ``draining`` and the workers stop after their running batch."""
        deadline = time.monotonic() + timeout_s
        while (self._pending or self._busy) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cond:
            self._stop = True
            for job in self._pending:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(Draining("server shut down before this request ran"))
            self._pending.clear()
            self._cond.notify_all()
        self.metrics.queue_depth.set(0)

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
            raise NotReady(f"model failed to load: {type(self.load_error).__name__}: {self.load_error}")
        if not self.ready:
            raise NotReady("model is loading; retry shortly", retry_after=5)

    def enqueue(self, job: Job) -> concurrent.futures.Future:
        try:
            self.check_open()
            with self._cond:
                if len(self._pending) >= self.config.max_queue:
                    raise QueueFull(f"server busy: {len(self._pending)} requests queued (max_queue "
                                    f"{self.config.max_queue}); retry later", retry_after=self.retry_after())
                self._pending.append(job)
                self.metrics.queue_depth.set(len(self._pending))
                self._cond.notify_all()
        except EngineError as e:
            self.metrics.rejections.labels(e.code).inc()
            raise
        return job.future

    async def submit(self, job: Job) -> np.ndarray:
        """uint8 images [n, H, W, 3] for ``job``, or an :class:`EngineError`."""
        fut = self.enqueue(job)
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
                    self.metrics.queue_depth.set(len(self._pending))
            self.metrics.rejections.labels("timeout").inc()
            raise RequestTimeout(f"request not served within {self.config.request_timeout_s:g} s "
                                 f"({'running' if started else 'still queued'})") from None
        except BackendError:
            self.metrics.rejections.labels("backend_error").inc()
            raise

    # -- the worker -----------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        """Block until a batch is due; remove it from the queue. None when stopping."""
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
                due = first.enqueued + cfg.max_wait_ms / 1000.0
                now = time.monotonic()
                if sum(j.n for j in same) >= cfg.max_batch_size or now >= due:
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
            self.metrics.queue_depth.set(len(self._pending))
            self._busy += 1
        # set_running fails for jobs whose caller timed out meanwhile: skip them
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
        m, key = self.metrics, batch[0].key
        start = time.monotonic()
        for j in batch:
            m.queue_wait_seconds.observe(start - j.enqueued)
        prompts = [p for j in batch for p in j.prompts]
        m.batch_size.observe(len(prompts))
        m.batch_requests.observe(len(batch))
        try:
            images = self.pipeline.generate(
                prompts, [p for j in batch for p in j.negative_prompts], [s for j in batch for s in j.seeds],
                steps=key.steps, guidance=key.guidance, height=key.height, width=key.width,
                scheduler=key.scheduler)
        except Exception as e:  # noqa: BLE001 - any backend fault fails this batch only
            log.exception("backend failed on a batch of %d images", len(prompts))
            err = BackendError(f"backend error: {type(e).__name__}: {e}", retry_after=1)
            for j in batch:
                j.future.set_exception(err)
            return
        seconds = time.monotonic() - start
        m.inference_seconds.observe(seconds)
        m.images.inc(len(prompts))
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        i = 0
        for j in batch:
            j.future.set_result(images[i:i + j.n])
            i += j.n
