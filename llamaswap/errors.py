"""Errors a client can see, each with its HTTP status and OpenAI error shape."""

from __future__ import annotations

import json
from http import HTTPStatus

_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    415: ("invalid_request_error", "unsupported_media_type"),
    421: ("invalid_request_error", "misdirected_request"),
    431: ("invalid_request_error", "headers_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
}


class ApiError(Exception):
    """An error llamaswap itself answers with (never an upstream's own error)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        kind, default_code = _TYPES.get(status, ("server_error", "internal_error"))
        self.type = kind
        self.code = code or default_code
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)


def error_body(message: str, kind: str, code: str) -> bytes:
    document = {"error": {"message": message, "type": kind, "code": code}}
    return json.dumps(document).encode("utf-8")


def closing_response(error: ApiError, extra: bytes = b"") -> bytes:
    """A whole HTTP response carrying ``error`` that closes the connection, written
    straight to a transport (before any request object exists, or instead of one);
    ``extra``: more header lines, each ending in CRLF."""
    body = error.body()
    reason = HTTPStatus(error.status).phrase.encode("ascii")
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n%s" % (error.status, reason, extra)
    head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    return head + body


class StartFailed(Exception):
    """A model's server did not become ready; the message says why and what it printed."""

    def __init__(self, model_id: str, cause: str, tail: list[str], kind: str = "exit") -> None:
        self.model_id = model_id
        self.cause = cause
        self.kind = kind  # "exit", "timeout", "spawn" or "loop": a bounded label for metrics
        self.tail = tail
        text = f"model {model_id!r} failed to start: {cause}"
        if tail:
            text += "; last output:\n" + "\n".join(tail)
        super().__init__(text)


class ModelStopped(Exception):
    """A start was abandoned because the model was asked to stop."""
