"""Pure ASGI middleware: body size limit and per-route request metrics.

Pure ASGI rather than ``BaseHTTPMiddleware``: the body limit must also stop chunked uploads
that carry no Content-Length, which needs a wrapped ``receive``.
"""

from __future__ import annotations

import json
import time

from starlette.exceptions import HTTPException

from .errors import error_body
from .metrics import Metrics


class BodyTooLarge(HTTPException):
    """An HTTPException so FastAPI's body parsing re-raises it as is (it turns others into 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


async def _send_error(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class LimitAndMeasure:
    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}
        started = {"yes": False}
        too_large = f"request body exceeds the limit of {self.max_body} bytes"

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                started["yes"] = True
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                status["code"] = 413
                await _send_error(send, 413, too_large, "body_too_large")
                return
            seen = 0

            async def receive_wrapper():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:  # chunked upload without Content-Length
                        raise BodyTooLarge(self.max_body)
                return message

            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except BodyTooLarge:
                status["code"] = 413
                if not started["yes"]:
                    await _send_error(send, 413, too_large, "body_too_large")
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - t0)
