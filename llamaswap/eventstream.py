"""Server-sent events: every event stream llamaswap sends or relays is built here.

An event stream goes out as it is written: ``cache-control: no-cache`` so nothing
between keeps a copy, and ``x-accel-buffering: no`` so a reverse proxy in front
(nginx) does not hold the tokens back.  The live log stream is plain text but needs
the same two headers.
"""

from __future__ import annotations

import json

from twisted.web.http_headers import Headers
from twisted.web.server import Request

EVENT_STREAM = b"text/event-stream"


def is_event_stream(content_type: bytes) -> bool:
    return content_type.startswith(EVENT_STREAM)


def unbuffered(headers: Headers) -> None:
    """Mark a response that is written as it happens: no cache, no proxy buffering."""
    headers.setRawHeaders(b"cache-control", [b"no-cache"])
    headers.setRawHeaders(b"x-accel-buffering", [b"no"])


def begin_event_stream(request: Request) -> None:
    """The headers of an event stream llamaswap writes itself."""
    request.setHeader(b"content-type", EVENT_STREAM)
    unbuffered(request.responseHeaders)


def data_event(document: object) -> bytes:
    """One ``data:`` event holding ``document`` as JSON (the OpenAI stream shape)."""
    return b"data: " + json.dumps(document).encode("utf-8") + b"\n\n"


def named_event(kind: str, payload: str) -> bytes:
    """One ``event: kind`` with its JSON ``payload``."""
    return f"event: {kind}\ndata: {payload}\n\n".encode()


def end_event_stream(request: Request, error: bytes) -> None:
    """End an event stream that is already under way: an error event, then [DONE]."""
    request.write(b"data: " + error + b"\n\n")
    request.write(b"data: [DONE]\n\n")
    request.finish()
