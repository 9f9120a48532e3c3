"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}, small for any input."""
from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# Error bodies quote at most this many validation errors, each cut to this many characters:
# a request with 10,000 bad fields must not get a megabyte back.
MAX_LISTED_ERRORS = 3
MAX_MESSAGE_CHARS = 300

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error to answer with; carries the HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = _clip(message)
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        """The JSON body (also used as an SSE error event)."""
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_body(status: int, message: str, param: str | None = None, code: str | None = None
               ) -> dict:
    """The OpenAI error object for a status."""
    kind = _TYPES.get(status, "invalid_request_error")
    return {"error": {"message": _clip(message), "type": kind, "param": param, "code": code}}


def error_event(err: APIError) -> bytes:
    """An SSE `data:` event carrying an error (sent when a stream fails after it started)."""
    return b"data: " + json.dumps(err.body(), ensure_ascii=False).encode() + b"\n\n"


# Names pydantic puts into error locations for union members ("str", "list[int]",
# "function-after[...]"): not field names, so left out of `param`.
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "tuple"}


def _param_of(loc: tuple) -> str | None:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif isinstance(p, str) and _FIELD_RE.match(p) and p not in _TYPE_TAGS:
            parts.append(p)
    return ".".join(parts) or None


def from_validation_error(exc: ValidationError, param_names: dict[str, str] | None = None
                          ) -> APIError:
    """A 400 quoting the first few pydantic errors (never the input values)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    params = [_param_of(tuple(e.get("loc", ()))) for e in errors]
    if param_names:
        params = [param_names.get(p, p) if p else p for p in params]
    parts = []
    for p, e in zip(params[:MAX_LISTED_ERRORS], errors[:MAX_LISTED_ERRORS]):
        parts.append(f"{p}: {_clip(str(e.get('msg', 'invalid')), 120)}" if p
                     else _clip(str(e.get("msg", "invalid")), 120))
    more = len(errors) - MAX_LISTED_ERRORS
    message = "; ".join(parts) + (f" (and {more} more errors)" if more > 0 else "")
    return APIError(400, message or "invalid request", params[0] if params else None,
                    "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app can produce OpenAI-shaped, and never leak a traceback."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(exc.status_code, detail, None, code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(FastAPIValidationError)
    async def _fastapi_validation(request: Request, exc: FastAPIValidationError) -> JSONResponse:
        # Only reachable through query/path parameters: request bodies are parsed by hand.
        return APIError(400, "invalid request parameters", None, "invalid_value").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, "internal server error", None, "internal_error"),
                            status_code=500)
