"""Token counts and speeds read off responses as they stream past.

The relay hands every chunk to a :class:`ResponseMeter`; it never delays or
changes a byte.  For event streams only the ``data:`` lines that mention
``usage`` or ``timings`` are parsed (usually just the last one or two); a plain
JSON body is kept (up to a cap) and parsed once at the end.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from .eventstream import is_event_stream

MAX_JSON = 2_000_000
MAX_ERROR = 500


@attrs.define
class Usage:
    tokens_in: int | None = None
    tokens_out: int | None = None
    prompt_tps: float | None = None
    gen_tps: float | None = None
    error: str | None = None
    cache_n: int | None = None  # prompt tokens the server took from its cache


class ResponseMeter:
    """Watches one response body; :meth:`result` says what it learned."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.streaming = False
        self.bytes = 0
        self._partial = b""
        self._body: list[bytes] = []
        self._kept = 0
        self.usage = Usage()

    def started(self, status: int, content_type: bytes) -> None:
        self.status = status
        self.streaming = is_event_stream(content_type)

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.streaming:
            buffered = self._partial + data
            cut = buffered.rfind(b"\n")
            complete, self._partial = buffered[: cut + 1], buffered[cut + 1 :]
            if len(self._partial) > MAX_JSON:
                self._partial = b""
            if b'"usage"' not in complete and b'"timings"' not in complete:
                return
            for line in complete.split(b"\n"):
                if line.startswith(b"data: {") and (b'"usage"' in line or b'"timings"' in line):
                    self._read(_loads(line[6:]))
        elif self._kept < MAX_JSON:
            self._body.append(data)
            self._kept += len(data)

    def result(self) -> Usage:
        if not self.streaming and self._body and self._kept <= MAX_JSON:
            document = _loads(b"".join(self._body))
            if self.status is not None and self.status >= 400:
                self.usage.error = _error_message(document, b"".join(self._body))
            else:
                self._read(document)
        return self.usage

    def _read(self, document: Any) -> None:
        if isinstance(document, list) and document:  # /infill answers with a list
            document = document[-1]
        if not isinstance(document, dict):
            return
        usage = document.get("usage")
        for nested in ("response", "message"):  # Responses API and Anthropic streams
            inner = document.get(nested)
            if usage is None and isinstance(inner, dict):
                usage = inner.get("usage")
        if isinstance(usage, dict):
            self.usage.tokens_in = _int(
                usage, "prompt_tokens", "input_tokens", self.usage.tokens_in
            )
            self.usage.tokens_out = _int(
                usage, "completion_tokens", "output_tokens", self.usage.tokens_out
            )
        timings = document.get("timings")
        if isinstance(timings, dict):  # llama.cpp's own figures win
            self.usage.tokens_in = _int(timings, "prompt_n", "prompt_n", self.usage.tokens_in)
            self.usage.tokens_out = _int(
                timings, "predicted_n", "predicted_n", self.usage.tokens_out
            )
            self.usage.prompt_tps = _float(timings, "prompt_per_second", self.usage.prompt_tps)
            self.usage.gen_tps = _float(timings, "predicted_per_second", self.usage.gen_tps)
            self.usage.cache_n = _int(timings, "cache_n", "cache_n", self.usage.cache_n)


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _int(source: dict[str, Any], key: str, other: str, default: int | None) -> int | None:
    value = source.get(key, source.get(other))
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _float(source: dict[str, Any], key: str, default: float | None) -> float | None:
    value = source.get(key)
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default
    )


def _error_message(document: Any, raw: bytes) -> str:
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:MAX_ERROR]
        for key in ("error", "message", "detail"):
            if isinstance(document.get(key), str):
                return str(document[key])[:MAX_ERROR]
    return raw.decode("utf-8", errors="replace")[:MAX_ERROR]
