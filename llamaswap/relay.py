"""Streaming reverse proxy to one child: request bytes in, response bytes out.

Nothing is buffered: response chunks are written to the client as they arrive
(so SSE reaches it token by token), the upstream connection is paused while the
client is slow, and it is closed when the client goes away (so llama-server stops
generating).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent
from twisted.web.client import ResponseDone, ResponseNeverReceived, readBody
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from .errors import ApiError
from .logs import logger
from .origin import over_upstream
from .usage import ResponseMeter

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def end_to_end(headers: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """A copy without hop-by-hop headers (and those named in ``Connection``)."""
    named = {
        token.strip().lower()
        for value in headers.getRawHeaders(b"connection", [])
        for token in value.split(b",")
    }
    skip = HOP_BY_HOP | named | drop
    result = Headers()
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in skip:
            result.setRawHeaders(name, values)
    return result


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written at once (no cooperator needed)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def end_event_stream(request: Request, error: bytes) -> None:
    """End an event stream that is already under way: an error event, then [DONE]."""
    request.write(b"data: " + error + b"\n\n")
    request.write(b"data: [DONE]\n\n")
    request.finish()


class Relay:
    """Sends requests to children through one persistent connection pool."""

    log = logger()

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def forward(
        self,
        request: Request,
        method: bytes,
        url: str,
        body: bytes | None,
        *,
        stream_started: bool = False,
        replace_headers: Mapping[bytes, bytes] | None = None,
        meter: ResponseMeter | None = None,
        forward_credentials: bool = False,
    ) -> Deferred[None]:
        """Relay ``request`` to ``url``; fires when the response has been relayed.

        Fails with :class:`ApiError` (502) if the child cannot be reached before any
        response byte was sent; cancelling it (client gone) closes the upstream.
        Client credentials go upstream only with ``forward_credentials``.
        With ``stream_started`` an event stream is already under way (loading
        progress): only the body follows, and an upstream error becomes an error event.
        """
        drop = {b"host", b"content-length"}
        if not forward_credentials:
            # a client's key for llamaswap is not the model server's business
            drop |= {b"authorization", b"x-api-key"}
        headers = end_to_end(request.requestHeaders, frozenset(drop))
        for name, value in (replace_headers or {}).items():
            headers.setRawHeaders(name, [value])
        producer = BytesProducer(body) if body is not None else None
        exchange = _Exchange(self, request, stream_started, meter or ResponseMeter())
        return exchange.run(method, url, headers, producer)


def _closed_while_idle(failure: Failure) -> bool:
    """The connection closed before a single response byte, cleanly or not."""
    if failure.check(RequestNotSent):
        return True
    error = failure.value
    if not isinstance(error, ResponseNeverReceived):
        return False
    return bool(error.reasons) and all(
        r.check(ConnectionDone, ConnectionLost) for r in error.reasons
    )


class _Exchange:
    """One proxied request; holds what the client-disconnect path must undo."""

    def __init__(
        self, relay: Relay, request: Request, stream_started: bool, meter: ResponseMeter
    ) -> None:
        self.relay = relay
        self.request = request
        self.stream_started = stream_started
        self.meter = meter
        self.pending: Deferred[IResponse] | None = None
        self.body: _BodyRelay | None = None
        self.done: Deferred[None] = Deferred(self._client_gone)
        self.url = ""

    def run(
        self, method: bytes, url: str, headers: Headers, producer: IBodyProducer | None
    ) -> Deferred[None]:
        self.url = url
        self._send = lambda: self.relay._agent.request(
            method, url.encode("ascii"), headers, producer
        )
        self._retried = False
        self._request()
        return self.done

    def _request(self) -> None:
        pending = self._send()
        self.pending = pending
        pending.addCallbacks(self._got_response, self._no_response)

    def _client_gone(self, _: Deferred[None]) -> None:
        if self.pending is not None:
            self.pending.cancel()
        if self.body is not None:
            self.body.stop()

    def _no_response(self, failure: Failure) -> None:
        self.pending = None
        if self.done.called:  # the client left first
            return
        if not self._retried and _closed_while_idle(failure):
            # a pooled keep-alive connection the server had just closed: the request
            # never reached it, so sending it once more on a fresh connection is safe
            self._retried = True
            self._request()
            return
        reason = failure.getErrorMessage() or repr(failure.value)
        error = ApiError(502, f"the model server at {self.url} did not answer: {reason}")
        if self.stream_started:
            self._error_event(error.body())
            return
        self.done.errback(error)

    def _error_event(self, body: bytes) -> None:
        """End a stream already under way with an OpenAI-style error event."""
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not (isinstance(document, dict) and "error" in document):
            text = body.decode("utf-8", errors="replace")[:2000]
            document = {
                "error": {"message": text, "type": "server_error", "code": "upstream_error"}
            }
        end_event_stream(self.request, json.dumps(document).encode())
        self.done.callback(None)

    def _got_response(self, response: IResponse) -> None:
        self.pending = None
        if self.done.called:
            response.deliverBody(_Discard())
            return
        request = self.request
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        self.meter.started(response.code, content_type)
        if self.stream_started:
            if response.code != 200:
                reading = readBody(response)
                reading.addErrback(lambda f: f.getErrorMessage().encode())
                reading.addCallback(self._error_event)
                return
            self.body = _BodyRelay(self)
            response.deliverBody(self.body)
            return
        request.setResponseCode(response.code, response.phrase)
        out = over_upstream(end_to_end(response.headers), request.responseHeaders)
        request.responseHeaders = out
        content_type = (out.getRawHeaders(b"content-type") or [b""])[0]
        if content_type.startswith(b"text/event-stream"):
            out.setRawHeaders(b"x-accel-buffering", [b"no"])
            out.setRawHeaders(b"cache-control", [b"no-cache"])
        if response.length is not UNKNOWN_LENGTH:
            out.setRawHeaders(b"content-length", [str(response.length).encode()])
        request.defaultContentType = None
        self.body = _BodyRelay(self)
        response.deliverBody(self.body)


_RESPONSE_DONE = Failure(ResponseDone())


class _BodyRelay(Protocol):
    """Writes each upstream chunk to the client, with backpressure both ways."""

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.stopped = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        producer: Any = self.transport
        if IPushProducer.providedBy(producer):
            self.exchange.request.registerProducer(producer, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.stopped:
            self.exchange.request.write(data)
            self.exchange.meter.feed(data)

    def stop(self) -> None:
        """The client is gone: drop the upstream connection so generation stops."""
        self.stopped = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
        exchange = self.exchange
        request = exchange.request
        if self.stopped or exchange.done.called:
            return
        if request.producer is not None:
            request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
            exchange.done.callback(None)
            return
        exchange.relay.log.warn(
            "response from {url} cut short: {reason}",
            url=exchange.url,
            reason=reason.getErrorMessage(),
        )
        if exchange.meter.streaming:
            # an event stream can say so: an error event, then a proper end
            error = ApiError(
                502,
                f"the model server at {exchange.url} went away in the middle of the answer",
                "upstream_disconnected",
            )
            end_event_stream(request, error.body())
        else:
            # a plain body cannot: cut the connection so the truncation is visible
            transport = request.channel.transport if request.channel is not None else None
            if transport is not None:
                abort = getattr(transport, "abortConnection", transport.loseConnection)
                abort()
        exchange.done.callback(None)


class _Discard(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]
