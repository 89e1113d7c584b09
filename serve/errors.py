"""One error shape for every failure, OpenAI's: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI's clients raise typed exceptions from the status code and show ``error.message``, so
validation failures, auth, overload, timeouts, backend faults, unknown routes and bugs all
answer in this shape. Validation messages start with the field they are about.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineError

log = logging.getLogger("slimsd.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = type or error_type(status)


def bad_request(field: str, message: str, code: str = "invalid_value") -> APIError:
    """A 400 whose message starts with the field it is about (as the client spelled it)."""
    return APIError(400, f"{field}: {message}", field, code)


def error_type(status: int) -> str:
    return TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``: the one error shape (routes and middleware)."""
    return {"error": {"message": message, "type": type or error_type(status), "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, type: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code, type), status_code=status, headers=headers)


def _field(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def _validation_message(errors: list[dict]) -> tuple[str, str | None, str]:
    first = errors[0]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return f"malformed JSON body: {why}", None, "invalid_json"
    msgs = []
    for e in errors:
        field = _field(e.get("loc", ()))
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        if e.get("type") == "missing" and field is None:
            msg = "a JSON body is required"
        msgs.append(f"{field}: {msg}" if field else msg)
    return "; ".join(msgs), _field(first.get("loc", ())), first.get("type", "invalid_value")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers, e.type)

    @app.exception_handler(EngineError)
    async def _engine(_: Request, e: EngineError):
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
        return error_response(e.status, str(e), None, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        message, param, code = _validation_message(list(e.errors()))
        return error_response(400, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else str(e.detail)
        return error_response(e.status_code, message, None, {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            e.status_code), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", None, "internal_error")
