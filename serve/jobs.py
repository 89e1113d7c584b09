"""The asynchronous job API's store: ``POST /v1/images/jobs`` returns an id at once, the job runs on
its model's engine like any request (same queue, same ``max_queue`` bound and 429), and
``GET /v1/images/jobs/{id}`` reads its status, progress, queue position and, once done, its
result. ``DELETE`` cancels it (a queued job leaves the queue; a running one stops before its
next step unless it shares the batch with other requests, which go on).

Unfinished jobs are bounded by the engines' queues; finished ones are kept ``ttl_s`` seconds
and at most ``max_finished`` (the oldest go first), so memory stays flat however many jobs
nobody collects. Results are PNG-encoded once, on the first read after the job ends.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from .engine import Engine, EngineError, Job
from .errors import APIError, error_body


@dataclass(eq=False)
class Entry:
    id: str
    engine: Engine
    job: Job
    seed: int
    created: float = field(default_factory=time.time)
    finished_at: float | None = None  # monotonic
    result: dict | None = None  # ImagesResponse as a dict, once encoded
    error: dict | None = None

    def status(self) -> str:
        f = self.job.future
        if f.cancelled() or self.job.cancel_reason:
            return "cancelled"
        if not f.done():
            return "running" if f.running() else "queued"
        return "failed" if f.exception() is not None else "succeeded"


class JobStore:
    def __init__(self, ttl_s: float = 600.0, max_finished: int = 64):
        self.ttl_s, self.max_finished = ttl_s, max_finished
        self._jobs: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._jobs)

    def submit(self, engine: Engine, job: Job, seed: int) -> Entry:
        """Enqueue (QueueFull / NotReady / Draining propagate: 429 / 503 like the synchronous routes)."""
        self.prune()
        engine.enqueue(job)
        entry = Entry(secrets.token_hex(12), engine, job, seed)

        def done(_f):
            entry.finished_at = time.monotonic()

        job.future.add_done_callback(done)
        with self._lock:
            self._jobs[entry.id] = entry
        return entry

    def get(self, job_id: str) -> Entry:
        self.prune()
        with self._lock:
            entry = self._jobs.get(job_id)
        if entry is None:
            raise APIError(404, f"id: no job {job_id!r} (unknown, or finished more than {self.ttl_s:g} s ago / "
                                f"beyond the {self.max_finished} kept)", "id", "job_not_found")
        return entry

    def cancel(self, job_id: str) -> Entry:
        entry = self.get(job_id)
        if entry.job.future.done():
            with self._lock:
                self._jobs.pop(job_id, None)  # a finished job: deleting it drops its result
        else:
            entry.engine.cancel(entry.job, "cancelled")
        return entry

    def prune(self) -> None:
        now = time.monotonic()
        with self._lock:
            done = sorted((e for e in self._jobs.values() if e.finished_at is not None), key=lambda e: e.finished_at)
            for e in done:
                if now - e.finished_at > self.ttl_s:
                    del self._jobs[e.id]
            done = [e for e in done if e.id in self._jobs]
            for e in done[:max(0, len(done) - self.max_finished)]:
                del self._jobs[e.id]

    def view(self, entry: Entry) -> dict:
        """The job as :class:`~slimsd.serve.schemas.ImageJob` fields."""
        from .service import png_b64

        job, engine = entry.job, entry.engine
        status = entry.status()
        out = {"id": entry.id, "model": engine.name, "created": int(entry.created), "status": status,
               "steps": job.key.steps, "step": 0, "progress": 0.0, "queue_position": None}
        if status == "queued":
            out["queue_position"] = engine.queue_position(job)
        elif status == "running":
            run = next((r for r in list(engine.running) if job in r.jobs), None)
            if run is not None:
                out.update(step=run.step, progress=run.progress)
        elif status == "succeeded":
            if entry.result is None:
                images = job.future.result()
                entry.result = {"created": int(time.time()), "data": [
                    {"b64_json": png_b64(im), "seed": entry.seed + i} for i, im in enumerate(images)]}
            out.update(step=job.key.steps, progress=1.0, result=entry.result)
        elif status in ("failed", "cancelled") and job.future.done() and not job.future.cancelled():
            e = job.future.exception()
            if isinstance(e, EngineError):
                entry.error = error_body(e.status, str(e), None, e.code)["error"]
            elif e is not None:
                entry.error = error_body(500, f"internal error: {type(e).__name__}", None, "internal_error")["error"]
            out["error"] = entry.error
        return out
