"""Streaming reverse proxy to one child: request bytes in, response bytes out.

Nothing is buffered: response chunks are written to the client as they arrive
(so SSE reaches it token by token), the upstream connection is paused while the
client is slow, and it is closed when the client goes away (so llama-server stops
generating).

A request is never sent twice by this module: once its bytes may have reached the
server, the server may be acting on them (a generation, or a crash it would cause
again).  A pooled connection already closed is skipped by the connection pool
before anything is written, and the pool itself resends only bodiless idempotent
requests (GET, HEAD, ...) that met a stale connection.

A request that asks to stream goes over a connection of its own, closed after
the answer: llama-server closes the connection after every streamed answer
anyway, and one returned to the pool would be picked by the next request in the
moment before the server's close arrives — which, never resent, would fail.

Every relayed request carries this llamaswap's :class:`Hop` mark in ``Via``; a
request that comes back with it went round in a circle and is refused at once.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from . import webclient
from .access import SESSION_COOKIE
from .connections import abort, send_now
from .errors import ApiError
from .eventstream import end_event_stream, is_event_stream, unbuffered
from .guard import short_uri
from .logs import logger
from .origin import over_upstream
from .usage import ResponseMeter

#: how much of a server's error answer becomes the error event of a stream under way
MAX_ERROR_BYTES = 65_536

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


def without_session(headers: Headers) -> None:
    """Drop llamaswap's UI session cookie from ``headers`` (other cookies stay, for a
    server that gets the client's credentials): it is a key to llamaswap, no business
    of a model server or a peer."""
    kept = []
    for value in headers.getRawHeaders(b"cookie", []):
        pairs = [
            pair
            for pair in value.split(b";")
            if pair.strip().partition(b"=")[0].strip() != SESSION_COOKIE
        ]
        if any(pair.strip() for pair in pairs):
            kept.append(b";".join(pairs).strip())
    if kept:
        headers.setRawHeaders(b"cookie", kept)
    else:
        headers.removeHeader(b"cookie")


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


class Hop:
    """This llamaswap's entry in the ``Via`` header of every request it relays.

    The name is random per process: a chain of distinct llamaswaps (peers) passes,
    but a request that reaches the llamaswap that already relayed it is recognised,
    whatever name or address led it back (an alias no config check can see).
    """

    log = logger()

    def __init__(self) -> None:
        self.name = b"llamaswap-" + secrets.token_hex(8).encode("ascii")
        self.refused = 0

    def mark(self, headers: Headers) -> None:
        """Append this hop to ``Via`` (one comma-separated list, as proxies do)."""
        entries = [*headers.getRawHeaders(b"via", []), b"1.1 " + self.name]
        headers.setRawHeaders(b"via", [b", ".join(entries)])

    def seen_in(self, headers: Headers) -> bool:
        return any(
            self.name in entry.split()
            for value in headers.getRawHeaders(b"via", [])
            for entry in value.split(b",")
        )

    def check(self, request: Request) -> ApiError | None:
        """The door's loop check: a request carrying this mark went round a loop.

        Refused at once with 508 (nothing is started or queued), so the request that
        came round gets a clear error after one hop instead of circling.
        """
        if not self.seen_in(request.requestHeaders):
            return None
        self.refused += 1
        if self.refused % 100 == 1:  # a health probe may come round several times a second
            self.log.warn(
                "{method} {path} came back to this llamaswap ({count} so far): a model's or "
                "peer's proxy URL leads to llamaswap itself; refused with 508",
                method=request.method.decode("ascii", errors="replace"),
                path=short_uri(request.path),
                count=self.refused,
            )
        return ApiError(
            508,
            "this request came back to the llamaswap that relayed it: a model's or peer's "
            "proxy URL leads to llamaswap itself, so it was refused rather than sent round "
            "again",
            "loop_detected",
        )


class Relay:
    """Sends requests to children through one persistent connection pool.

    ``streams`` (an agent whose connections are never kept) carries requests
    that ask to stream; without it they share ``agent``'s pool.
    """

    log = logger()

    def __init__(
        self, agent: IAgent, hop: Hop | None = None, streams: IAgent | None = None
    ) -> None:
        self._agent = agent
        self._streams = streams or agent
        self.hop = hop or Hop()

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
        sandbox: bool = True,
    ) -> Deferred[None]:
        """Relay ``request`` to ``url``; fires when the response has been relayed.

        Fails with :class:`ApiError` (502) if the child cannot be reached before any
        response byte was sent; cancelling it (client gone) closes the upstream.
        Client credentials go upstream only with ``forward_credentials``.
        With ``stream_started`` an event stream is already under way (loading
        progress): only the body follows, and an upstream error becomes an error event.
        Without ``sandbox`` the server's pages are shown as pages of llamaswap
        (:func:`over_upstream`).
        """
        # the body is already here: a server asked to confirm it first would only
        # answer 100 Continue, which Twisted's client logs and drops
        drop = {b"host", b"content-length", b"expect"}
        if not forward_credentials:
            # a client's key for llamaswap is not the model server's business, nor are
            # its cookies: a browser sends llamaswap every cookie of its host name (ports
            # do not count), other web apps' sessions included
            drop |= {b"authorization", b"x-api-key", b"cookie"}
        headers = end_to_end(request.requestHeaders, frozenset(drop))
        if forward_credentials:  # else no cookie is left to look through
            without_session(headers)
        for name, value in (replace_headers or {}).items():
            headers.setRawHeaders(name, [value])
        self.hop.mark(headers)
        producer = BytesProducer(body) if body is not None else None
        # "stream" as a JSON key or value; a false positive only costs a connect
        agent = self._streams if body is not None and b'"stream"' in body else self._agent
        exchange = _Exchange(self, request, stream_started, meter or ResponseMeter(), sandbox)
        return exchange.run(agent, method, url, headers, producer)


class _Exchange:
    """One proxied request; holds what the client-disconnect path must undo."""

    def __init__(
        self,
        relay: Relay,
        request: Request,
        stream_started: bool,
        meter: ResponseMeter,
        sandbox: bool,
    ) -> None:
        self.relay = relay
        self.request = request
        self.stream_started = stream_started
        self.meter = meter
        self.pending: Deferred[IResponse] | None = None
        self.body: _BodyRelay | None = None
        self.reading: Deferred[bytes] | None = None  # an error answer, for an event
        self.done: Deferred[None] = Deferred(self._client_gone)
        self.gone = False  # the client left (``done`` is being cancelled)
        self.url = ""
        self.has_body = False
        self.sandbox = sandbox

    def run(
        self,
        agent: IAgent,
        method: bytes,
        url: str,
        headers: Headers,
        producer: IBodyProducer | None,
    ) -> Deferred[None]:
        self.url = url
        self.has_body = producer is not None
        pending = agent.request(method, url.encode("ascii"), headers, producer)
        self.pending = pending
        pending.addCallbacks(self._got_response, self._no_response)
        return self.done

    def _client_gone(self, _: Deferred[None]) -> None:
        # said first: cancelling the request fails it at once, inside this very call,
        # before ``done`` counts as called; that failure is the client's leaving, not
        # the server's, and nothing may be written to the client any more
        self.gone = True
        if self.pending is not None:
            self.pending.cancel()
        if self.body is not None:
            self.body.stop()
        if self.reading is not None:
            self.reading.cancel()

    def _no_response(self, failure: Failure) -> None:
        self.pending = None
        if self.gone:
            return
        error = ApiError(502, self._no_answer(failure))
        if self.stream_started:
            self._error_event(error.body())
            return
        self.done.errback(error)

    def _no_answer(self, failure: Failure) -> str:
        lost = failure.value
        if _cut_by_stop(failure):
            return f"the model server at {self.url} was stopped before it answered"
        if not isinstance(lost, webclient.ResponseNeverReceived):
            return f"the model server at {self.url} did not answer: {plain_reason(failure)}"
        closed = all(isinstance(r.value, ConnectionClosed) for r in lost.reasons)
        what = (
            "closed the connection while handling the request, without answering"
            if closed
            else "sent no answer llamaswap could read"
        )
        message = f"the model server at {self.url} {what} ({plain_reason(failure)})"
        if self.has_body:
            # it had the request and may have acted on it (a generation, or a crash
            # it would cause again): sending it twice is not ours to decide
            message += "; it was not retried, since the server may already have acted on it"
        return message

    def _error_event(self, body: bytes) -> None:
        """End a stream already under way with an OpenAI-style error event."""
        if self.gone:
            return
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
                body = CappedBody(MAX_ERROR_BYTES, lambda: ValueError("an error answer too long"))
                response.deliverBody(body)
                reading = self.reading = body.done
                reading.addErrback(lambda f: f.getErrorMessage().encode())
                reading.addCallback(self._error_event)
                return
            self.body = _BodyRelay(self)
            response.deliverBody(self.body)
            return
        request.setResponseCode(response.code, response.phrase)
        out = over_upstream(
            end_to_end(response.headers), request.responseHeaders, sandbox=self.sandbox
        )
        request.responseHeaders = out
        content_type = (out.getRawHeaders(b"content-type") or [b""])[0]
        if is_event_stream(content_type):
            unbuffered(out)
        if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
            # a HEAD answer has no body, yet its length is the one a GET would have
            out.setRawHeaders(b"content-length", [str(response.length).encode()])
        request.defaultContentType = None
        self.body = _BodyRelay(self)
        response.deliverBody(self.body)


def _complete(reason: Failure) -> bool:
    """Whether ``reason`` is how a body that arrived whole ends (not ``Failure.check``,
    which would compare qualified class names up the failure's whole class hierarchy:
    once per response)."""
    return isinstance(reason.value, (webclient.ResponseDone, PotentialDataLoss))


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
            request = self.exchange.request
            request.write(data)
            send_now(_transport_of(request))  # a token, or the answer: out before the meter
            self.exchange.meter.feed(data)

    def stop(self) -> None:
        """The client is gone: drop the upstream connection so generation stops."""
        self.stopped = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        exchange = self.exchange
        request = exchange.request
        if self.stopped or exchange.done.called:
            return
        if request.producer is not None:
            request.unregisterProducer()
        if _complete(reason):
            client = _transport_of(request)  # a finished request lets go of it
            request.finish()
            send_now(client)  # the answer's end, before its bookkeeping
            exchange.done.callback(None)
            return
        stopped = _cut_by_stop(reason)
        exchange.relay.log.warn(
            "response from {url} cut short: {reason}",
            url=exchange.url,
            reason="the model was stopped" if stopped else plain_reason(reason),
        )
        if exchange.meter.streaming:
            # an event stream can say so: an error event, then a proper end
            how = "was stopped" if stopped else "went away"
            error = ApiError(
                502,
                f"the model server at {exchange.url} {how} in the middle of the answer",
                "upstream_disconnected",
            )
            end_event_stream(request, error.body())
        else:
            # a plain body cannot: cut the connection so the truncation is visible
            transport = request.channel.transport if request.channel is not None else None
            if transport is not None:
                abort(transport)
        exchange.done.callback(None)


def _transport_of(request: Request) -> object:
    """The client's connection (None once it is gone)."""
    channel = getattr(request, "channel", None)
    return channel.transport if channel is not None else None


def plain_reason(failure: Failure) -> str:
    """Why a request to a server failed, in words.  Twisted's client wraps the causes
    in lists of failures, whose text is a list of reprs naming its private modules
    ("[<...Failure twisted.web._newclient.ParseError: ('wrong number of parts',
    b'x')>]"); here each cause is its class's name and its arguments."""
    reasons = getattr(failure.value, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return "; ".join(plain_reason(r) for r in reasons if isinstance(r, Failure))
    value = failure.value
    if isinstance(value, ConnectionClosed | ConnectionRefusedError | TimeoutError):
        return failure.getErrorMessage()  # Twisted's words are plain for these
    args = getattr(value, "args", ())
    shown = [a.decode("utf-8", errors="replace") if isinstance(a, bytes) else str(a) for a in args]
    # what the server sent, cut and with its control characters escaped: a line
    # break or a terminal escape in it must not forge a line of llamaswap's log
    detail = ": ".join(_printable(part[:200]) for part in shown if part)
    return f"{type(value).__name__}: {detail}" if detail else type(value).__name__


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


#: how a connection ends by itself (the server closed it, or it broke)
ConnectionClosed = ConnectionDone | ConnectionLost


def _cut_by_stop(failure: Failure) -> bool:
    """Did llamaswap abort the connection itself?  Only a stop of the model does
    (``UpstreamEndpoints.close_connections``); a client gone closes it gently."""
    reasons = getattr(failure.value, "reasons", None) or [failure]
    return any(isinstance(r.value, ConnectionAborted) for r in reasons)


class CappedBody(Protocol):
    """Collects a body of at most ``limit`` bytes (longer: ``too_large()``); cancelling
    ``done`` stops the reading, so the connection is dropped."""

    def __init__(self, limit: int, too_large: Callable[[], Exception]) -> None:
        self.limit = limit
        self.too_large = too_large
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.done.called:
                self.done.errback(self.too_large())
            self._stop()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if _complete(reason):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class _Discard(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]
