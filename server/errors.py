"""Errors as HTTP answers, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every 4xx says what was wrong in `message` (the field, the value, the limit); the openai SDK
raises it as `BadRequestError` etc. with that message. Routes raise `APIError`; the handlers
installed by `install_error_handlers` also turn pydantic's validation errors, unknown routes
and unexpected exceptions into the same shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tpserve.engine.client import EngineDeadError

logger = logging.getLogger(__name__)

# OpenAI's `type` for each status we answer with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def engine_dead(error: str | None) -> APIError:
    return APIError(503, f"the model engine has stopped ({error}); restart the server", code="engine_dead",
                    headers={"Retry-After": "30"})


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "dict", "list"}


def validation_message(errors: list[dict]) -> str:
    """pydantic's errors as one line: `temperature: Input should be >= 0 (got -1)`.

    A value that matches none of a union's types gives one error per type; the same field is
    reported once, and at most five fields."""
    parts: dict[str, str] = {}
    for e in errors:
        if e.get("type") == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", "")
            return f"the request body is not valid JSON: {reason}".rstrip(": ")
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        # Union members show up as extra path items (`prompt.list[int].0`, `content.TextPart`);
        # keep the field path.
        field = ".".join(x for x in loc if not ("[" in x or x[:1].isupper() or x in _TYPE_NAMES))
        if field in parts:
            continue
        message = e.get("msg", "invalid value")
        if e.get("type") == "missing":
            message = "this field is required"
        elif e.get("type") == "extra_forbidden":
            message = "unrecognized request argument"
        elif "input" in e and e.get("type") != "model_attributes_type":
            shown = repr(e["input"])
            message += f" (got {shown[:60]}{'...' if len(shown) > 60 else ''})"
        parts[field or "body"] = message
    if not parts:
        return "invalid request"
    lines = [f"{field}: {message}" for field, message in list(parts.items())[:5]]
    if "body" in parts and parts["body"].startswith("Input should be a valid dictionary"):
        lines.append("send a JSON object with Content-Type: application/json")
    return "; ".join(lines)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        param = next((str(e["loc"][1]) for e in errors if len(e.get("loc", ())) > 1 and e["loc"][0] == "body"), None)
        return APIError(400, validation_message(errors), param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return engine_dead(str(exc)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
