"""Prometheus metrics of one server (its own registry: several apps in one process stay apart).

Everything a model's engine records carries a ``model`` label (the id clients send), so one
server holding several models reports each on its own; HTTP metrics are per route.
"""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds: from a few ms (tiny model, GPU) to minutes (SD on CPU)
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("slimsd_requests", "HTTP requests by route and status code",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("slimsd_request_duration_seconds", "HTTP request duration",
                                         ["route"], buckets=_SECONDS, registry=r)
        self.queue_wait_seconds = Histogram("slimsd_queue_wait_seconds",
                                            "time a generation request waited before its batch started",
                                            ["model"], buckets=_SECONDS, registry=r)
        self.inference_seconds = Histogram("slimsd_inference_duration_seconds",
                                           "backend time of one batch (all its steps)", ["model"], buckets=_SECONDS,
                                           registry=r)
        self.queue_depth = Gauge("slimsd_queue_depth", "generation requests waiting for a worker", ["model"],
                                 registry=r)
        self.batch_size = Histogram("slimsd_batch_size", "images per backend call", ["model"],
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.batch_requests = Histogram("slimsd_batch_requests", "requests merged into one backend call", ["model"],
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.rejections = Counter("slimsd_rejections", "generation requests refused or abandoned by reason "
                                  "(queue_full, not_ready, draining, timeout, backend_error, interrupted)",
                                  ["model", "reason"], registry=r)
        self.images = Counter("slimsd_images", "images generated", ["model"], registry=r)

    def model(self, name: str) -> SimpleNamespace:
        """The per-model series bound to ``model=name`` (``rejections(reason)`` for the counter by reason)."""
        series = {k: getattr(self, k).labels(model=name) for k in (
            "queue_wait_seconds", "inference_seconds", "queue_depth", "batch_size", "batch_requests", "images")}
        return SimpleNamespace(**series, rejections=lambda reason: self.rejections.labels(model=name, reason=reason))

    def render(self) -> bytes:
        return generate_latest(self.registry)
