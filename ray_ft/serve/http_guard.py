"""What the ingress does to a request before and after the endpoints: bearer-token auth and the
body-size limit (an ASGI middleware, before the body is parsed), and the error handlers that give
every refusal, FastAPI's own included, the OpenAI error shape `{"error": {"message", "type"}}`."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_ft.serve.engines import InvalidMessages, InvalidStructuredOutput, PromptTooLong, UnknownModelError
from ray_ft.serve.openai_format import error_body
from ray_ft.serve.resilience import UpstreamTimeout, UpstreamUnavailable

OPEN_PATHS = {"/healthz"}  # no auth, no size check: load balancers and probes call it


def cause_message(exc: BaseException) -> str:
    """The message of an error raised in another deployment, without Ray's traceback around it."""
    return str(getattr(exc, "cause", None) or exc)


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, kind, code))


class GuardMiddleware:
    """Bearer-token auth and the body-size limit, before a request is parsed (plain ASGI, so
    streamed responses and client disconnects pass through untouched). `settings` is the
    ingress's `IngressSettings` (its `auth_token` and `max_request_bytes` are read)."""

    def __init__(self, app, settings):
        self.app, self.s = app, settings
        token = settings.auth_token.get_secret_value() if settings.auth_token else None
        self._expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
            if path not in OPEN_PATHS:
                headers = dict(scope["headers"])
                refusal = self._refusal(headers)
                if refusal is None and b"content-length" not in headers:
                    # A chunked body states no length: read it here, up to the limit.
                    body = await self._body_within_limit(receive)
                    if body is None:
                        refusal = _error(413, f"request body exceeds the limit of {self.s.max_request_bytes} "
                                         "bytes", "invalid_request_error")
                    else:
                        receive = _replayed(body, receive)
                if refusal is not None:
                    await refusal(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _body_within_limit(self, receive) -> bytes | None:
        """The whole request body, or None once it passes max_request_bytes (the rest unread)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.s.max_request_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _refusal(self, headers: dict[bytes, bytes]) -> JSONResponse | None:
        if self._expected is not None:
            given = headers.get(b"authorization")
            if given is None:
                return _error(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                              "authentication_error")
            if not hmac.compare_digest(given, self._expected):  # constant time
                return _error(401, "invalid bearer token", "authentication_error")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.s.max_request_bytes:
            return _error(413, f"request body of {int(length)} bytes exceeds the limit of "
                          f"{self.s.max_request_bytes}", "invalid_request_error")
        return None


def _replayed(body: bytes, receive):
    """An ASGI receive that hands the app `body` as one message, then waits on the real one
    (which reports the client's disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def install_error_handlers(api: FastAPI, refusal_type: type) -> None:
    # FastAPI's own 4xx (a body it cannot parse: invalid UTF-8, JSON nested past the decoder's
    # depth; unknown routes and methods) in the same error shape as every other answer.
    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        response = _error(exc.status_code, str(exc.detail), kind)
        response.headers.update(exc.headers or {})
        return response

    @api.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error(400, f"{where}: {first.get('msg')}", "invalid_request_error")

    statuses = {
        refusal_type: None, UnknownModelError: (404, "model_not_found", None),
        InvalidStructuredOutput: (400, "invalid_request_error", "invalid_response_format"),
        PromptTooLong: (400, "invalid_request_error", "context_length_exceeded"),
        InvalidMessages: (400, "invalid_request_error", "invalid_messages"),
        UpstreamTimeout: (504, "timeout", None), UpstreamUnavailable: (503, "service_unavailable", None),
    }
    for exc_type, answer in statuses.items():
        def handler(_: Request, exc: Exception, answer=answer):
            status, kind, code = answer or (exc.status, exc.kind, exc.code)
            return _error(status, cause_message(exc), kind, code)

        api.add_exception_handler(exc_type, handler)

    @api.exception_handler(Exception)
    async def _server_error(_: Request, exc: Exception):
        return _error(500, f"{type(getattr(exc, 'cause', None) or exc).__name__}: {cause_message(exc)}",
                      "server_error")
