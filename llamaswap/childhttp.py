"""A lean HTTP/1.1 client for the servers llamaswap relays to: its children
(``llama-server`` on ``127.0.0.1:<port>``) and its peers (``http`` or ``https``,
by host name), whose answers are read with the same caps and strict framing.

Twisted's ``Agent`` spends about a third of the proxy's reactor time per request
on generality a child never needs: URI parsing, per-request endpoint and pool
lookups, a line-by-line status/header parser, state machines dispatched by name,
a transport proxy and several Deferreds chained per request.  Here a request is
one ``write`` (request line, headers, an in-memory body), the answer's head is
split at its blank line with ``bytes.find``, and the body is passed on piece by
piece as it arrives (an event stream stays token by token).

:class:`ChildAgent` is an ``IAgent``: callers keep using ``request``; only what
it does not take (another scheme, user info in the URL) goes to the standard
agent given as ``fallback``.  Connections are made by
:class:`~llamaswap.upstream.UpstreamEndpoints` (names resolved, ``https`` wrapped
in TLS, noted per server so a stop can close them, a spare connection taken when
there is one); finished connections
wait in a small per-server pool, closed after ``idle_seconds`` (set below
llama-server's 5 s keep-alive).

A request is never sent twice once its bytes may have reached the server, but
for the rule the standard pool keeps too: a bodiless idempotent request (GET,
HEAD, ...) that met a pooled connection the server had closed (lost before any
answer byte) is sent once more on a fresh connection.
"""

from __future__ import annotations

import re
import typing
from typing import Any

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProducer,
    IProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IClientRequest,
    IResponse,
)
from zope.interface import implementer

from . import webclient
from .connections import send_now

MAX_HEAD = 65_536
"""The longest status line and headers (and the longest chunk trailer) accepted."""
MAX_CHUNK_LINE = 4096
"""The longest chunk-size line (with its extensions) accepted."""
UNHEARD_SECONDS = 0.1
"""How long a request on a connection the server has never answered on waits
before the connections kept idle to that server are closed (:meth:`_Server.overdue`)."""
HEAD_SECONDS = 30.0
"""How long an answer's head may take from its first byte to its blank line.  A
server may be silent for as long as it works (a whole answer is computed before its
head is sent), but one that has begun its head sends the rest at once; one that
dribbles it a byte at a time holds the connection, and the request's lease, for
nothing."""

#: sent once more after meeting a pooled connection the server had closed
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
#: how the connection is framed, not what the answer says (as Twisted's client
#: leaves them out of ``IResponse.headers``)
_CONTROL = frozenset(
    {
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
#: said to have an empty body when they have none, as Twisted's client does
#: (llama-server's HTTP library reads a POST without a length until the close)
_BODY_EXPECTED = frozenset({b"POST", b"PUT"})
#: set here from the body, never taken from the caller's headers
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"[\x21-\x7e]*")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: control characters but HTAB: not in a status line (a bare LF in the phrase,
#: relayed as it is, would start a line of the server's choosing in the client's)
_CONTROLS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_NETLOC = re.compile(rb"[0-9A-Za-z._:\[\]-]+")
_VERSIONS = {b"HTTP/1.1": True, b"HTTP/1.0": False}  # version: keep-alive by default
_NO_BODY_CODES = frozenset({204, 304})
_CLOSED = Failure(ConnectionDone())


class BadResponse(Exception):
    """The server's answer breaks HTTP/1.1 (its framing cannot be trusted).

    Its arguments are what is wrong and, as bytes, what the server sent there
    (shown escaped by :func:`llamaswap.relay.plain_reason`)."""


class Pool(typing.Protocol):
    """What a stop closes: the kept connections of a client."""

    def closeCachedConnections(self) -> Deferred[None]: ...


@implementer(IAgent)
class ChildAgent:
    """``IAgent`` for children and peers: a lean path for ``http://`` and
    ``https://``, ``fallback`` for the rest.  Without ``persistent`` each
    connection carries one request and is closed after it (``Connection: close``),
    as for streams.  ``same_servers_as``: another agent whose servers this one
    shares (their kept connections and the requests waiting on new ones, see
    ``_Server.overdue``): streams and other requests go to the same children."""

    def __init__(
        self,
        endpoints: Any,
        clock: IReactorTime,
        fallback: IAgent,
        *,
        fallback_pool: Pool | None = None,
        persistent: bool = True,
        idle_seconds: float = 3.0,
        max_idle: int = 16,
        same_servers_as: ChildAgent | None = None,
    ) -> None:
        self.endpoints = endpoints  # UpstreamEndpoints: endpointForURI, noting, spares
        self.clock = clock
        self.fallback = fallback
        self.fallback_pool = fallback_pool
        self.persistent = persistent
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        # per netloc as written in request URIs: its server, or None (not ours)
        self.servers: dict[bytes, _Server | None] = (
            {} if same_servers_as is None else same_servers_as.servers
        )

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        if uri.startswith(b"http://"):
            slash = uri.find(b"/", 7)
        elif uri.startswith(b"https://"):
            slash = uri.find(b"/", 8)
        else:
            return self.fallback.request(method, uri, headers, bodyProducer)
        origin, target = (uri, b"/") if slash < 0 else (uri[:slash], uri[slash:])
        server = self.servers.get(origin, _UNSEEN)
        if server is _UNSEEN:
            server = self.servers[origin] = _server(origin)
        if server is None:
            return self.fallback.request(method, uri, headers, bodyProducer)
        assert isinstance(server, _Server)
        target = target.partition(b"#")[0]
        if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
            return fail(ValueError(f"not a valid request: {method!r} {target!r}"))
        call = _Call(self, server, method, uri, headers or Headers(), bodyProducer)
        call.head = call.compose(target)
        call.start()
        return call.deferred

    def closeCachedConnections(self) -> Deferred[None]:
        """Close every finished connection kept, ``fallback_pool``'s too (llamaswap
        is stopping)."""
        for server in self.servers.values():
            if server is not None:
                while server.idle:
                    server.idle.pop().close()
        if self.fallback_pool is not None:
            return self.fallback_pool.closeCachedConnections()
        return succeed(None)


@implementer(IAgent)
class StandardAgent:
    """Twisted's ``Agent`` over ``endpoints``, for what :class:`ChildAgent` leaves to
    it: made with its pool at its first request (see :mod:`llamaswap.webclient`), its
    pool keeping connections as the lean client does."""

    def __init__(
        self,
        reactor: Any,
        endpoints: IAgentEndpointFactory,
        *,
        persistent: bool = True,
        idle_seconds: int = 3,
        max_idle: int = 16,
    ) -> None:
        self.reactor = reactor
        self.endpoints = endpoints
        self.persistent = persistent
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        self._agent: IAgent | None = None
        self._pool: Pool | None = None

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        if self._agent is None:
            pool = webclient.HTTPConnectionPool(self.reactor, persistent=self.persistent)
            pool.maxPersistentPerHost = self.max_idle
            pool.cachedConnectionTimeout = self.idle_seconds
            self._pool = pool
            self._agent = webclient.Agent.usingEndpointFactory(
                self.reactor, self.endpoints, pool=pool
            )
        return self._agent.request(method, uri, headers, bodyProducer)

    def closeCachedConnections(self) -> Deferred[None]:
        """Close the connections its pool keeps, if it was ever used."""
        return succeed(None) if self._pool is None else self._pool.closeCachedConnections()


class _Unseen:
    pass


_UNSEEN = _Unseen()


def _server(origin: bytes) -> _Server | None:
    """The server ``origin`` (``http[s]://netloc``) names, or None for one the
    standard agent is left to (user info, a query right after the port, a name
    that is not plain ASCII)."""
    if not _NETLOC.fullmatch(origin.partition(b"://")[2]):
        return None
    try:
        uri = webclient.URI.fromBytes(origin + b"/")
    except ValueError:
        return None
    return _Server(uri)


class _Server:
    """One server's address and its finished connections, newest last."""

    def __init__(self, uri: webclient.URI) -> None:
        self.uri = uri
        # as Twisted's Agent writes it: the port only when not the scheme's default
        host = uri.host
        if isIPv6Address(host.decode("ascii")):
            host = b"[" + host + b"]"
        if (uri.scheme, uri.port) not in ((b"http", 80), (b"https", 443)):
            host = b"%b:%d" % (host, uri.port)
        self.host_line = b"Host: " + host + b"\r\n"
        self.idle: list[_Connection] = []
        #: requests sent on connections the server has not answered on yet, oldest
        #: first, with when they were sent (see :meth:`overdue`)
        self.unheard: dict[_Call, float] = {}
        self.unheard_check: IDelayedCall | None = None

    def sent_unheard(self, call: _Call, clock: IReactorTime) -> None:
        self.unheard[call] = clock.seconds()
        if self.unheard_check is None:
            self.unheard_check = clock.callLater(UNHEARD_SECONDS, self.look, clock)

    def heard(self, call: _Call) -> None:
        self.unheard.pop(call, None)
        if not self.unheard and self.unheard_check is not None:
            if self.unheard_check.active():
                self.unheard_check.cancel()
            self.unheard_check = None

    def overdue(self, now: float) -> bool:
        """Whether a request has waited :data:`UNHEARD_SECONDS` on a connection the
        server has never answered on.  llama-server (cpp-httplib) gives each open
        connection one thread of a small pool, kept-alive ones included, and reads
        nothing on a connection no thread has taken: connections kept idle here can
        hold every thread while a newer connection's request is never read (into a
        burst of 8 requests to a child with one slot, 3 waited the 3 s until the idle
        ones were closed)."""
        oldest = next(iter(self.unheard.values()), None)
        return oldest is not None and now - oldest >= UNHEARD_SECONDS

    def look(self, clock: IReactorTime) -> None:
        """Close the idle connections if a request is overdue; look again when the
        next one would be."""
        self.unheard_check = None
        now = clock.seconds()
        if self.overdue(now):
            for connection in list(self.idle):
                connection.close()
        later = next((sent for sent in self.unheard.values() if now - sent < UNHEARD_SECONDS), None)
        if later is not None:
            self.unheard_check = clock.callLater(later + UNHEARD_SECONDS - now, self.look, clock)

    def take_idle(self) -> _Connection | None:
        while self.idle:
            connection = self.idle.pop()
            connection.idle = False
            # open, and not being closed (a stop closes idle ones: connectionLost follows)
            if connection.open and not getattr(connection.transport, "disconnecting", False):
                return connection
        return None


class _Connection(Protocol):
    """One TCP connection to a child: passes what arrives to the request it carries."""

    def __init__(self, agent: ChildAgent, server: _Server) -> None:
        self.agent = agent
        self.server = server
        self.call: _Call | None = None
        self.open = False
        self.paused = False
        # waiting in the pool: read by UpstreamEndpoints.close_connections, which
        # closes an idle connection gently and aborts one carrying a request
        self.idle = False
        self.idle_since = 0.0
        self.expiry: IDelayedCall | None = None
        self.answered = False  # the server has answered on it: one of its threads reads it

    def connectionMade(self) -> None:
        self.open = True

    def dataReceived(self, data: bytes) -> None:
        if self.call is not None:
            self.call.received(data)
        elif self.transport is not None:  # nothing asked: an answer no one can place
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        self.open = False
        self.leave_pool()
        self.forget_expiry()
        call, self.call = self.call, None
        if call is not None:
            call.lost(reason)

    def rest(self) -> None:
        """Into the pool; closed when it is full, or when a request on another
        connection may be waiting for the thread this one holds (``overdue``)."""
        self.call = None
        if self.paused:
            self.resume()
        clock = self.agent.clock
        if len(self.server.idle) >= self.agent.max_idle or self.server.overdue(clock.seconds()):
            self.close()
            return
        self.idle = True
        self.server.idle.append(self)
        self.idle_since = clock.seconds()
        # one timer for many rests: a busy connection only moves its start
        if self.expiry is None:
            self.expiry = clock.callLater(self.agent.idle_seconds, self.expire)

    def expire(self) -> None:
        self.expiry = None
        if not self.idle:
            return  # in use: the next rest starts the wait again
        left = self.idle_since + self.agent.idle_seconds - self.agent.clock.seconds()
        if left > 0:
            self.expiry = self.agent.clock.callLater(left, self.expire)
        else:
            self.close()

    def leave_pool(self) -> None:
        """Out of the pool (taken, or lost)."""
        if self.idle:
            self.idle = False
            if self in self.server.idle:
                self.server.idle.remove(self)

    def forget_expiry(self) -> None:
        if self.expiry is not None:
            if self.expiry.active():
                self.expiry.cancel()
            self.expiry = None

    def close(self) -> None:
        self.leave_pool()
        self.forget_expiry()
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]


class _Builds(Factory):
    """Hands the endpoint the one protocol made for this connection."""

    noisy = False

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: Any) -> _Connection:
        return self.connection


# what a request is waiting for
_CONNECT, _HEAD, _LENGTH, _CHUNKED, _TO_CLOSE, _DONE = range(6)
# where a chunked body is
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


@implementer(IClientRequest)
class _Sent:
    def __init__(self, method: bytes, uri: bytes, headers: Headers) -> None:
        self.method = method
        self.absoluteURI = uri
        self.headers = headers


class _Call:
    """One request and its answer: writes the one, parses the other."""

    def __init__(
        self,
        agent: ChildAgent,
        server: _Server,
        method: bytes,
        uri: bytes,
        headers: Headers,
        producer: IBodyProducer | None,
    ) -> None:
        self.agent = agent
        self.server = server
        self.method = method
        self.uri = uri
        self.headers = headers
        self.producer = producer
        self.head = b""
        self.deferred: Deferred[IResponse] = Deferred(self._cancel)
        self.state = _CONNECT
        self.connection: _Connection | None = None
        self.connecting: Deferred[IProtocol] | None = None
        self.reused = False  # on a pooled connection: may meet one the server closed
        self.heard = False  # a byte of the answer came
        self.sending = False  # a body producer still writing
        self.stopped = False  # the body's reader stopped it
        self.registered = False  # the body producer is the connection's
        self.buffer = b""
        self.interim = 0  # bytes of 1xx interim answers read before the answer
        self.head_deadline: IDelayedCall | None = None  # a head begun must end by then
        self.response: _Response | None = None
        self.keep = False
        self.remaining = 0
        self.chunk = _SIZE
        self.trailer = 0

    def compose(self, target: bytes) -> bytes:
        headers = self.headers
        parts = [self.method, b" ", target, b" HTTP/1.1\r\n"]
        if not headers.hasHeader(b"host"):
            parts.append(self.server.host_line)
        for name, values in headers.getAllRawHeaders():
            if name.lower() in _FRAMING:
                continue
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        producer = self.producer
        if producer is not None:
            if producer.length is UNKNOWN_LENGTH:
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                parts += (b"Content-Length: ", str(producer.length).encode(), b"\r\n")
        elif self.method in _BODY_EXPECTED:
            parts.append(b"Content-Length: 0\r\n")
        if not self.agent.persistent:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def start(self) -> None:
        connection = self.server.take_idle() if self.agent.persistent else None
        if connection is not None:
            self.reused = True
            self.send(connection)
        else:
            self.connect()

    def connect(self) -> None:
        self.state = _CONNECT
        connection = _Connection(self.agent, self.server)
        try:
            endpoint = self.agent.endpoints.endpointForURI(self.server.uri)
            connecting = endpoint.connect(_Builds(connection))
        except Exception:
            self.deferred.errback()
            return
        self.connecting = connecting
        connecting.addCallbacks(lambda _: self.connected(connection), self.not_connected)

    def connected(self, connection: _Connection) -> None:
        self.connecting = None
        if self.state != _CONNECT:  # given up meanwhile
            connection.close()
            return
        self.send(connection)

    def not_connected(self, failure: Failure) -> None:
        self.connecting = None
        if self.state == _CONNECT:  # else cancelled: _cancel says so
            self.deferred.errback(failure)

    def send(self, connection: _Connection) -> None:
        self.state = _HEAD
        self.connection = connection
        connection.call = self
        transport = connection.transport
        assert transport is not None
        if not connection.open:  # a spare whose connection ended as it was taken
            self.lost(Failure(ConnectionDone()))
            return
        if not connection.answered:
            self.server.sent_unheard(self, self.agent.clock)
        producer = self.producer
        if producer is None:
            transport.write(self.head)
            send_now(transport)
            return
        writer = _BodyWriter(self, producer.length is UNKNOWN_LENGTH)
        self.sending = True
        try:
            producing = producer.startProducing(writer)
        except Exception:
            producing = fail()
        writer.flush(self.head)  # with what the producer wrote at once: one write
        if self.sending:  # paused and resumed, then stopped if the connection ends
            self.registered = True
            IConsumer(transport).registerProducer(producer, True)
        producing.addCallbacks(writer.done, writer.failed)

    def body_sent(self) -> None:
        transport = self.connection.transport if self.connection is not None else None
        if self.registered and transport is not None:
            IConsumer(transport).unregisterProducer()
        self.registered = self.sending = False

    def stop_body(self) -> None:
        """The request body is not wanted any more (the connection ended or ends)."""
        if self.sending and self.producer is not None:
            self.sending = False
            if not self.registered:  # else the connection's end stops it
                self.producer.stopProducing()

    def body_failed(self, failure: Failure) -> None:
        self.sending = False
        if self.connection is not None:
            self.connection.abort()
        if not self.deferred.called:
            self.state = _DONE
            self.deferred.errback(webclient.RequestGenerationFailed([failure]))

    def _cancel(self, _: Deferred[IResponse]) -> None:
        self.waits_no_more()
        state, self.state = self.state, _DONE
        if state == _CONNECT and self.connecting is not None:
            self.connecting.cancel()
        elif self.connection is not None:
            self.connection.abort()
        self.stop_body()
        if not self.deferred.called:
            self.deferred.errback(webclient.ResponseNeverReceived([Failure(CancelledError())]))

    # the answer

    def received(self, data: bytes) -> None:
        if not self.heard:
            self.heard = True
            self.heard_of()
        state = self.state
        if state == _LENGTH:
            remaining = self.remaining
            if len(data) < remaining:
                self.remaining = remaining - len(data)
                assert self.response is not None
                self.response.deliver(data)
            else:
                self.remaining = 0
                self.ended(data[:remaining], data[remaining:])
        elif state == _CHUNKED:
            self.chunked(data)
        elif state == _HEAD:
            self.head_part(data)
        elif state == _TO_CLOSE:
            assert self.response is not None
            self.response.deliver(data)

    def head_part(self, data: bytes) -> None:
        """Read the answer's head; its 1xx interim answers count towards its length,
        so a server sending ``100 Continue`` for ever fails the request."""
        rest: bytes | None = data
        while rest is not None:
            old = self.buffer
            buffer = old + rest if old else rest
            end = buffer.find(b"\r\n\r\n", max(0, len(old) - 3))
            if self.interim + (len(buffer) if end < 0 else end) > MAX_HEAD:
                self.bad(
                    BadResponse(
                        f"an answer's head longer than {MAX_HEAD} bytes"
                        " (its interim 1xx answers included)"
                    )
                )
                return
            if end < 0:
                if b"\n\n" in buffer:  # lines ended by LF alone: CRLF CRLF never comes
                    self.bad(BadResponse("an answer's head with lines not ended by CRLF"))
                    return
                self.buffer = buffer
                if buffer and self.head_deadline is None:  # a head read whole needs none
                    self.head_deadline = self.agent.clock.callLater(
                        HEAD_SECONDS, self.head_too_slow
                    )
                return
            self.buffer = b""
            self.no_head_deadline()
            try:
                rest = self.parsed(buffer[:end], buffer[end + 4 :])
            except BadResponse as e:
                self.bad(e)
                return

    def heard_of(self) -> None:
        """The server answers on this connection, or never will."""
        self.server.heard(self)
        if self.heard and self.connection is not None:
            self.connection.answered = True

    def waits_no_more(self) -> None:
        """The call ends (cancelled, lost, or its answer unreadable): no deadline for
        its head, no place among the server's unheard requests."""
        self.no_head_deadline()
        self.heard_of()

    def head_too_slow(self) -> None:
        self.head_deadline = None
        self.bad(BadResponse(f"an answer's head still not whole {HEAD_SECONDS:g} s after it began"))

    def no_head_deadline(self) -> None:
        if self.head_deadline is not None:
            if self.head_deadline.active():
                self.head_deadline.cancel()
            self.head_deadline = None

    def parsed(self, head: bytes, rest: bytes) -> bytes | None:
        """Act on a whole head; what follows an interim answer's head is returned,
        to be read as the rest of the head."""
        lines = head.split(b"\r\n")
        version, _, status = lines[0].partition(b" ")
        digits, _, phrase = status.partition(b" ")
        keep = _VERSIONS.get(version)
        if (
            keep is None
            or len(digits) != 3
            or not digits.isdigit()
            or _CONTROLS.search(phrase) is not None
        ):
            raise BadResponse("not an HTTP/1.x status line", lines[0][:200])
        code = int(digits)
        if 100 <= code < 200:
            if code == 101:
                raise BadResponse("101 Switching Protocols, never asked for")
            self.interim += len(head) + 4  # an interim answer: the real one follows
            return rest
        raw: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise BadResponse("not a header line", line[:200])
            raw.setdefault(name.lower(), []).append(value.strip(b" \t"))
        if b"connection" in raw:
            tokens = {t.strip().lower() for v in raw[b"connection"] for t in v.split(b",")}
            keep = keep and b"close" not in tokens
        # HTTP/1.0 is never kept alive: its keep-alive is not worth its corner cases
        coding = raw.get(b"transfer-encoding")
        sizes = raw.get(b"content-length")
        length: int | object = UNKNOWN_LENGTH
        if self.method == b"HEAD" or code in _NO_BODY_CODES:
            state = _DONE
            length = 0
        elif coding is not None:
            if [c.strip().lower() for v in coding for c in v.split(b",")] != [b"chunked"]:
                raise BadResponse("a transfer coding other than chunked", b", ".join(coding)[:200])
            state = _CHUNKED
            # with a Content-Length too, the framing is ambiguous: chunked wins, and
            # the connection is not trusted with another request
            keep = keep and sizes is None
        elif sizes is not None:
            given = {s.strip() for v in sizes for s in v.split(b",")}
            if len(given) != 1:
                raise BadResponse("conflicting Content-Length", b", ".join(sizes)[:200])
            size = given.pop()
            if not size.isdigit() or len(size) > 18:
                raise BadResponse("not a Content-Length", size[:40])
            self.remaining = int(size)
            length = self.remaining
            state = _LENGTH if self.remaining else _DONE
        else:
            state = _TO_CLOSE
            keep = False
        shown = Headers(
            {
                name: values
                for name, values in raw.items()
                if name not in _CONTROL or (name == b"content-length" and self.method == b"HEAD")
            }
        )
        self.keep = keep and self.agent.persistent
        response = self.response = _Response(self, (b"HTTP", 1, 1 if version == b"HTTP/1.1" else 0))
        response.code = code
        response.phrase = phrase
        response.headers = shown
        response.length = length
        self.state = state
        if state == _DONE:  # kept for the next request before this one's caller goes on
            self.ended(b"", rest)
            self.deferred.callback(response)
            return None
        self.deferred.callback(response)
        if rest:
            self.received(rest)
        return None

    def chunked(self, data: bytes) -> None:
        old = self.buffer
        buffer = old + data if old else data
        response = self.response
        assert response is not None
        at = 0
        size = len(buffer)
        while at < size and self.state == _CHUNKED and not self.stopped:
            step = self.chunk
            if step == _DATA:
                take = min(self.remaining, size - at)
                piece = buffer if (at == 0 and take == size) else buffer[at : at + take]
                at += take
                self.remaining -= take
                if not self.remaining:
                    self.chunk = _DATA_END
                response.deliver(piece)
            elif step == _DATA_END:
                if size - at < 2:
                    break
                if buffer[at : at + 2] != b"\r\n":
                    self.bad(BadResponse("a chunk longer than its size"))
                    return
                at += 2
                self.chunk = _SIZE
            else:
                eol = buffer.find(b"\r\n", at)
                if eol < 0:
                    if size - at > (MAX_CHUNK_LINE if step == _SIZE else MAX_HEAD):
                        self.bad(BadResponse("a chunk line too long"))
                        return
                    if buffer.find(b"\n", at) >= 0:  # ended by LF alone: CRLF never comes
                        self.bad(BadResponse("a chunk line not ended by CRLF"))
                        return
                    break
                line = buffer[at:eol]
                at = eol + 2
                if step == _TRAILER:
                    self.trailer += len(line) + 2
                    if self.trailer > MAX_HEAD:
                        self.bad(BadResponse("chunk trailers too long"))
                        return
                    if not line:
                        self.buffer = b""
                        self.ended(b"", buffer[at:])
                        return
                    continue
                digits = line.partition(b";")[0].strip(b" \t")
                if not _HEX.fullmatch(digits):
                    self.bad(BadResponse("not a chunk size", line[:40]))
                    return
                self.remaining = int(digits, 16)
                self.chunk = _DATA if self.remaining else _TRAILER
        self.buffer = buffer[at:] if at < size else b""

    def ended(self, last: bytes, extra: bytes) -> None:
        """The body is complete; ``extra`` followed it (nothing, from a sound server)."""
        response = self.response
        assert response is not None
        if last:
            response.deliver(last)
            if self.stopped:  # its reader wants no more: the connection is going
                return
        self.state = _DONE
        connection, self.connection = self.connection, None
        if connection is not None:
            if self.keep and not extra and not self.sending and connection.open:
                connection.rest()
            else:
                connection.call = None
                connection.close()
        if self.sending and self.producer is not None:
            self.sending = False  # answered before the whole body was sent
            if self.registered and connection is not None and connection.transport is not None:
                IConsumer(connection.transport).unregisterProducer()
            self.producer.stopProducing()
        response.end(Failure(webclient.ResponseDone()))

    def bad(self, error: BadResponse) -> None:
        """An answer that cannot be read: fail it, drop the connection."""
        self.waits_no_more()
        reason = Failure(error)
        state, self.state = self.state, _DONE
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.call = None
            connection.abort()
        if state == _HEAD:
            if not self.deferred.called:
                self.deferred.errback(webclient.ResponseNeverReceived([reason]))
        elif self.response is not None:
            self.response.end(Failure(webclient.ResponseFailed([reason])))

    def lost(self, reason: Failure) -> None:
        """The connection ended under this request."""
        self.waits_no_more()
        state, self.state = self.state, _DONE
        self.connection = None
        self.stop_body()
        if state == _HEAD:
            if self.deferred.called:
                return
            if (
                self.reused
                and not self.heard
                and self.producer is None
                and self.method in _RETRYABLE
                # aborted here: a stop cut it, the server is going (not a stale
                # connection); a new endpoint would not know of the stop
                and not isinstance(reason.value, ConnectionAborted)
            ):
                self.reused = False  # the server had closed it: once on a fresh one
                self.connect()
                return
            self.deferred.errback(webclient.ResponseNeverReceived([reason]))
            return
        response = self.response
        if response is None or state == _DONE:
            return
        if state == _TO_CLOSE and isinstance(reason.value, ConnectionDone):
            response.end(Failure(PotentialDataLoss()))
        else:
            response.end(Failure(webclient.ResponseFailed([reason])))

    # the body's flow, as the body protocol's transport

    def pause(self) -> None:
        if self.connection is not None:
            self.connection.pause()

    def resume(self) -> None:
        if self.connection is not None:
            self.connection.resume()

    def stop(self) -> None:
        """The reader wants no more: drop the connection (the server stops sending)."""
        if self.state in (_LENGTH, _CHUNKED, _TO_CLOSE) and self.connection is not None:
            self.stopped = True  # the abort's connectionLost ends the body
            self.connection.abort()


@implementer(IConsumer)
class _BodyWriter:
    """Where a request body goes: gathered until the head is written (so a body in
    memory leaves with it, in one write), then straight to the connection."""

    def __init__(self, call: _Call, chunked: bool) -> None:
        self.call = call
        self.chunked = chunked
        self.parts: list[bytes] | None = []
        self.written = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.written += len(data)
        call = self.call
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        elif call.producer is not None and self.written > call.producer.length:
            # past its length the server would read it as a request of its own
            if call.sending:
                call.body_failed(
                    Failure(ValueError(f"a body longer than the {call.producer.length} announced"))
                )
            return
        if self.parts is not None:
            self.parts.append(data)
        elif call.sending and call.connection is not None:
            transport = call.connection.transport
            assert transport is not None
            transport.write(data)

    def flush(self, head: bytes) -> None:
        parts, self.parts = self.parts or [], None
        connection = self.call.connection
        if not self.call.sending:  # failed as it began: nothing goes out
            return
        if connection is not None and connection.transport is not None:
            connection.transport.write(b"".join([head, *parts]))
            send_now(connection.transport)

    def done(self, _: object) -> None:
        call = self.call
        if not call.sending:
            return
        length = call.producer.length if call.producer is not None else 0
        if self.chunked:
            self.write_last()
        elif self.written != length:
            call.body_failed(
                Failure(ValueError(f"a body of {self.written} bytes, announced {length}"))
            )
            return
        call.body_sent()

    def write_last(self) -> None:
        connection = self.call.connection
        if connection is not None and connection.transport is not None:
            connection.transport.write(b"0\r\n\r\n")

    def failed(self, failure: Failure) -> None:
        if self.call.sending:
            self.call.body_failed(failure)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass  # the connection is told of the body producer when it writes

    def unregisterProducer(self) -> None:
        pass


@implementer(IPushProducer)
class _BodyFlow:
    """The body protocol's transport: pauses, resumes or drops the connection."""

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.paused = False  # by the reader

    def pauseProducing(self) -> None:
        self.paused = True
        self.call.pause()

    def resumeProducing(self) -> None:
        self.paused = False
        self.call.resume()

    def stopProducing(self) -> None:
        self.call.stop()

    def abortConnection(self) -> None:
        """As ``stopProducing`` (``readBody``, cancelled, calls this)."""
        self.call.stop()


@implementer(IResponse)
class _Response:
    """A child's answer; its body goes to the protocol given to :meth:`deliverBody`
    as it arrives (kept until then, with the connection paused)."""

    def __init__(self, call: _Call, version: tuple[bytes, int, int]) -> None:
        self.call = call
        self.version = version
        self.code = 0
        self.phrase = b""
        self.headers = Headers()
        self.length: Any = UNKNOWN_LENGTH
        self.request = _Sent(call.method, call.uri, call.headers)
        self.previousResponse: IResponse | None = None
        self.protocol: IProtocol | None = None
        self.waiting: list[bytes] = []
        self.ending: Failure | None = None
        self.over = False
        self.held = False  # the connection paused until there is a protocol

    def deliverBody(self, protocol: IProtocol) -> None:
        if self.protocol is not None:
            raise RuntimeError("a response body can be delivered only once")
        self.protocol = protocol
        flow = _BodyFlow(self.call)
        protocol.makeConnection(flow)  # type: ignore[arg-type]
        waiting, self.waiting = self.waiting, []
        for data in waiting:
            protocol.dataReceived(data)
        if self.ending is not None:
            ending, self.ending = self.ending, None
            protocol.connectionLost(ending)
        elif self.held:
            self.held = False
            if not flow.paused:  # else the reader paused it meanwhile: its to resume
                self.call.resume()

    def deliver(self, data: bytes) -> None:
        if self.protocol is not None:
            self.protocol.dataReceived(data)
        else:
            self.waiting.append(data)
            if not self.held:
                self.held = True
                self.call.pause()

    def end(self, reason: Failure) -> None:
        if self.over:
            return
        self.over = True
        if self.protocol is not None:
            self.protocol.connectionLost(reason)
        else:
            self.ending = reason

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response
