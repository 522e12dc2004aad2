"""How llamaswap connects to the servers it relays to (its children, peers).

Children listen on an IP literal (``127.0.0.1``), which needs no name resolution,
yet Twisted's standard ``Agent`` endpoint (``HostnameEndpoint``) still resolves it
in a thread-pool thread for every new connection — and llama-server closes the
connection after each streamed answer, so every stream pays that hand-off before
its first token — and it reports a refused connection (a child still loading)
only after its 0.3 s attempt delay.  IP literals therefore get a plain TCP
endpoint; host names keep ``HostnameEndpoint``; ``https`` is wrapped in TLS as
the standard agent does.  Connection factories are made quiet: upstream
connections come and go all the time, so Twisted need not log each one.

The connections they open are remembered per server, so they can be closed when
that server is asked to exit (:meth:`UpstreamEndpoints.close_connections`).
An endpoint is built once per server, not once per request, and forgotten there too.

A child about to be ready gets a *spare* connection (:meth:`UpstreamEndpoints.open_spare`):
the request waiting for it then goes out in the very turn that hears ``ready``,
on a connection one of the child's HTTP threads is already watching, instead of
connecting first (a reactor turn here, an accept and a hand-over to a worker
thread there).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from . import webclient


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """An endpoint per upstream URI: direct TCP for IP literals, resolved names else."""

    def __init__(
        self, reactor: Any, connect_timeout: float, clock: IReactorTime | None = None
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor
        self.connect_timeout = connect_timeout
        #: how ``https`` servers are checked: Twisted's browser-like policy unless set
        self.tls: IPolicyForHTTPS | None = None
        # per server (host, port): the protocols of the connections opened to it
        self._opened: dict[tuple[bytes, int], weakref.WeakSet[IProtocol]] = {}
        # per server: a connection opened ahead of its first request, not yet taken
        self._spares: dict[tuple[bytes, int], _Spare] = {}
        # per server (scheme, host, port): its endpoint; as many as servers relayed to
        # since they were last asked to exit (children, peers)
        self._endpoints: dict[tuple[bytes, bytes, int], _Quiet] = {}

    def open_spare(self, url: str) -> None:
        """Connect to ``url``'s server now, for the next request to take.

        Only for a plain ``http`` server on an IP literal (a child).  Unused, it is
        closed after :data:`SPARE_SECONDS`, before llama-server's keep-alive limit
        (5 s) could close it under a request.
        """
        uri = _uri(url)
        if uri is None or uri.scheme != b"http" or not isIPAddress(_host(uri)):
            return
        key = (uri.host, uri.port)
        if key in self._spares:
            return
        spare = self._spares[key] = _Spare(lambda: self._forget(key, spare))
        factory = Factory.forProtocol(lambda: spare)
        factory.noisy = False
        spare.connecting = self._connector(uri).connect(factory)
        spare.connecting.addErrback(lambda _: spare.close())
        spare.expiry = self.clock.callLater(SPARE_SECONDS, spare.close)

    def _forget(self, key: tuple[bytes, int], spare: _Spare) -> None:
        if self._spares.get(key) is spare:
            del self._spares[key]

    def close_spares(self) -> None:
        """Close every spare connection (llamaswap is stopping)."""
        for spare in list(self._spares.values()):
            spare.close()

    def take_spare(self, key: tuple[bytes, int]) -> _Spare | None:
        """The spare connection to ``key``'s server, if one is open; it is the caller's."""
        spare = self._spares.get(key)
        if spare is None or spare.transport is None:  # none, or still connecting
            return None
        del self._spares[key]
        return spare

    def close_connections(self, url: str, *, cut: bool = True) -> None:
        """Close every connection to ``url``'s server: it is being asked to exit.

        The idle kept-alive ones are closed: llama-server (cpp-httplib) notices
        that it is stopping only every 10 ms on an idle kept-alive connection, and
        waits for that before it exits; closed from our side, it ends at once.
        Those still carrying a request are aborted: a stop cuts what is in flight
        (whoever meant a request to finish waited for it before the stop), and
        llama-server cannot exit while one of its threads is blocked writing an
        answer that a slow client holds up (our side reads only as the client
        does); the abort fails that write, so it exits at once instead of at the
        SIGKILL ``unloadTimeout`` later.  The relay tells the client of a request
        cut mid-answer as for any upstream lost.  Without ``cut`` (the server stays:
        another model relays to it too) those are left alone.
        """
        uri = _uri(url)
        if uri is None:  # not a URL llamaswap could have connected to
            return
        spare = self._spares.get((uri.host, uri.port))
        if spare is not None:
            spare.close()  # and forgotten
        for scheme in (b"http", b"https"):
            endpoint = self._endpoints.pop((scheme, uri.host, uri.port), None)
            if cut and endpoint is not None:
                endpoint.cut = True  # a connect still under way ends as it is made
        opened = self._opened.get((uri.host, uri.port), weakref.WeakSet())
        for protocol in list(opened):
            transport = protocol.transport if isinstance(protocol, Protocol) else None
            if transport is None:
                continue
            # waiting for a request: ChildAgent's connections say so, Twisted's
            # HTTP11ClientProtocol by its state
            idle = getattr(protocol, "idle", False) or (
                getattr(protocol, "state", None) == "QUIESCENT"
            )
            if not idle and not cut:
                continue  # still noted: a later stop may cut it
            opened.discard(protocol)
            if idle or not ITCPTransport.providedBy(transport):
                transport.loseConnection()
            else:
                ITCPTransport(transport).abortConnection()
        if not opened:
            self._opened.pop((uri.host, uri.port), None)

    def endpointForURI(self, uri: webclient.URI) -> IStreamClientEndpoint:
        server = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(server)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            endpoint = self._endpoints[server] = _Quiet(
                self, (uri.host, uri.port), self._connector(uri)
            )
        return endpoint

    def _connector(self, uri: webclient.URI) -> IStreamClientEndpoint:
        """How to reach ``uri``'s server, without the bookkeeping of :class:`_Quiet`."""
        host = _host(uri)
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self.reactor, host, uri.port, self.connect_timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self.reactor, host, uri.port, self.connect_timeout)
        else:
            endpoint = HostnameEndpoint(
                self.reactor, uri.host, uri.port, timeout=self.connect_timeout
            )
        if uri.scheme == b"https":
            if self.tls is None:
                self.tls = webclient.BrowserLikePolicyForHTTPS()
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint

    def note_opened(self, key: tuple[bytes, int], protocol: IProtocol) -> None:
        """A connection to ``key``'s server is open (into the set in use now:
        ``close_connections`` may have taken the one there was when the endpoint was
        made)."""
        self._opened.setdefault(key, weakref.WeakSet()).add(protocol)


def server_of(url: str) -> tuple[bytes, int] | None:
    """The server (host, port) ``url`` leads to, as connections are noted by."""
    uri = _uri(url)
    return (uri.host, uri.port) if uri is not None else None


SPARE_SECONDS = 3.0
"""How long a spare connection waits to be taken."""


def _uri(url: str) -> webclient.URI | None:
    uri: webclient.URI
    try:
        uri = webclient.URI.fromBytes(url.encode("ascii", errors="replace"))
    except ValueError:
        return None
    return uri


def _host(uri: webclient.URI) -> str:
    host: bytes = uri.host
    return host.decode("ascii", errors="replace")


_CLOSED = Failure(ConnectionDone())


class _Spare(Protocol):
    """A connection opened before the request that will use it: once taken, it
    passes what the server sends to the request's protocol."""

    def __init__(self, forget: Callable[[], None]) -> None:
        self.forget = forget
        self.owner: IProtocol | None = None
        self.expiry: IDelayedCall | None = None
        self.connecting: Deferred[IProtocol] | None = None  # until connected

    def connectionMade(self) -> None:
        self.connecting = None

    def hand_over(self, owner: IProtocol) -> None:
        self._expire_never()
        self.owner = owner
        assert self.transport is not None
        owner.makeConnection(self.transport)

    def close(self) -> None:
        self.forget()
        self._expire_never()
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()  # a connect slower than the spare's wait: give it up
        if self.owner is None and self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.owner is not None:  # before a request, an HTTP server has nothing to say
            self.owner.dataReceived(data)

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        self._expire_never()
        if self.owner is not None:
            self.owner.connectionLost(reason)
        else:
            self.forget()

    def _expire_never(self) -> None:
        if self.expiry is not None and self.expiry.active():
            self.expiry.cancel()
        self.expiry = None


@implementer(IStreamClientEndpoint)
class _Quiet:
    """Connects without the factory's "Starting factory" log lines; notes each
    connection; takes the server's spare connection when there is one."""

    def __init__(
        self,
        endpoints: UpstreamEndpoints,
        key: tuple[bytes, int],
        endpoint: IStreamClientEndpoint,
    ) -> None:
        self.endpoints = endpoints
        self.key = key
        self.endpoint = endpoint
        # its server was asked to exit, cutting what it carries: a connection made
        # after that (a request granted just before, its connect still under way)
        # would reach a server that is exiting, and might hold its exit up
        self.cut = False

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        protocolFactory.noisy = False  # type: ignore[attr-defined]

        def opened(protocol: IProtocol) -> IProtocol:
            transport = protocol.transport if isinstance(protocol, Protocol) else None
            if self.cut and ITCPTransport.providedBy(transport):
                ITCPTransport(transport).abortConnection()  # the request fails: "stopped"
            else:
                self.endpoints.note_opened(self.key, protocol)
            return protocol

        spare = self.endpoints.take_spare(self.key)
        if spare is not None:
            assert spare.transport is not None
            protocol = protocolFactory.buildProtocol(spare.transport.getPeer())
            if protocol is not None:
                spare.hand_over(protocol)
                return succeed(opened(protocol))
            spare.close()
        return self.endpoint.connect(protocolFactory).addCallback(opened)
