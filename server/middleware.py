"""ASGI middleware, outermost first:

    RequestIdMiddleware   X-Request-Id: taken from the client when sane, made up otherwise,
                          kept in scope["state"], echoed on every response
    HTTPMetricsMiddleware counts answers by method, route and status
    AuthMiddleware        401 without `Authorization: Bearer <--api-key>` (probes, metrics
                          and the API docs stay open)
    BodyGuardMiddleware   413 past --max-request-bytes (read as it arrives, chunked or not);
                          400 for a body that is not UTF-8; then hands the body on

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed responses.
"""

from __future__ import annotations

import hmac
import json
import re
import uuid

from tpserve.server.errors import error_body

OPEN_PATHS = {"/health", "/ready", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}
# Route templates counted by name; any other path (scanners, typos) is counted as "other".
KNOWN_ROUTES = {"/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/api", *OPEN_PATHS}
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


async def send_error(send, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestIdMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = header(scope, b"x-request-id")
        request_id = given if given and _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class HTTPMetricsMiddleware:
    def __init__(self, app, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
            self.metrics.http_requests.labels(scope["method"], route, str(status[0])).inc()


class AuthMiddleware:
    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.api_key is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = header(scope, b"authorization") or ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            what = "no API key was given" if not given else "the API key is not valid"
            return await send_error(
                send, 401, f"{what}: send the server's --api-key as `Authorization: Bearer <key>`",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
        await self.app(scope, receive, send)


class BodyGuardMiddleware:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = (f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                     "(--max-request-bytes)")
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(send, 413, too_large, code="request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await send_error(send, 413, too_large, code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await send_error(
                send, 400, f"the request body is not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 4]!r}); "
                "send JSON encoded as UTF-8")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay, send)
