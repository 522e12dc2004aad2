"""Every client connection is bounded: in time while a request arrives, and in number.

Twisted's own idle timeout is reset by every byte, so a client that sends its
headers (or a chunked body) one byte every few seconds would be kept forever, and
enough of them exhaust the process's file descriptors: then model servers cannot
be reached (``Couldn't bind: Too many open files``).  Here:

- ``BoundedChannel`` gives the request headers ``headerTimeout`` seconds from their
  first byte, and the body ``bodyTimeout`` seconds plus one second per
  ``bodyMinRate`` bytes received, but never more than ``bodyTimeout`` seconds ahead
  (bytes sent early are no credit for a trickle later); a late request gets 408
  and is closed.  Nothing
  bounds the response (a stream may last long), but a client that reads none of it
  for ``stallTimeout`` seconds is cut off: its lease would keep the model (and
  every swap waiting for it) forever.  One that reads, however slowly, is not
  (the socket tells, :mod:`llamaswap.delivery`) while nobody waits for the model
  its request holds; once a swap (or a stop, a reload) waits for that model, it
  is cut too: a trickle read would otherwise hold every other model's requests
  for as long as its answer lasts.  Between requests the idle timeout still
  applies.
- ``ConnectionGate`` wraps the site and counts open connections, in all and per
  client address; at either cap a new connection gets a short 503 and is closed at
  once.  The total is kept below ``RLIMIT_NOFILE`` with room for the model servers'
  pipes and the upstream connections.  At the total cap, a connection that has
  waited longest with no request in progress (idle, or still sending its headers)
  is closed to make room first: slow clients from many addresses cannot keep
  everyone else out until their header deadline.
"""

from __future__ import annotations

import resource
from collections import Counter
from collections.abc import Callable
from functools import cache
from itertools import count
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    ITransport,
    IWriteDescriptor,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from .addresses import client_key as client_key
from .config.settings import ConnectionLimits as ConnectionLimits
from .delivery import Delivery, delivery
from .errors import ApiError, closing_response
from .logs import logger

if TYPE_CHECKING:
    from .config import Config

# File descriptors kept for everything but client connections: the listening
# sockets, logs, the activity store, NVML, the model servers' pipes.  What is left
# is shared in thirds: each client connection, the spool file of a large request
# body (Twisted stores bodies over 100 kB in a temporary file until the request
# ends) and the upstream connection it causes.
RESERVED_FILES = 128
FILES_PER_CONNECTION = 3
WARN_EVERY = 60.0

#: What waits for the model a request holds to finish, in words ("a swap to b
#: waits for model a"); None when nothing does or the request holds no model.
Awaited = Callable[[object], "str | None"]


def nothing_awaited(request: object) -> str | None:
    """For a gate in front of requests that hold no model."""
    return None


def raise_file_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one; the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # an unlimited hard limit (macOS) cannot be the soft one: the kernel has a cap
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def connection_budget(file_limit: int) -> int:
    """Client connections that fit in ``file_limit`` descriptors with headroom."""
    return max(8, (file_limit - RESERVED_FILES) // FILES_PER_CONNECTION)


_serials = count(1)


def connection_of(request: Any) -> int | None:
    """The connection a request came on, as a token no other connection gets: the
    client of a keep-alive connection (an SDK, an agent, a web app's backend) sends
    its next request on it.  None when the channel is not one of ours."""
    channel = getattr(request, "channel", None)
    return channel.serial if isinstance(channel, BoundedChannel) else None


def abort(transport: ITransport) -> None:
    """Drop a connection now, what is still unsent included (a transport without
    ``abortConnection`` is closed after its writes instead)."""
    getattr(transport, "abortConnection", transport.loseConnection)()


def send_now(transport: object) -> None:
    """Hand what was just written to ``transport`` to the kernel now, not when the
    reactor next polls: whatever else runs in this turn (the rest of a request's
    bookkeeping, log lines, events) then no longer holds those bytes back.

    It does what the reactor does when the socket is writable (``doWrite``); a send
    that fails leaves the bytes queued, for the reactor to fail the connection as
    usual.  Skipped for a connection being closed (``doWrite`` would end it, which is
    the reactor's to do) and for transports that are not sockets (TLS).
    """
    if (
        IWriteDescriptor.providedBy(transport)
        and getattr(transport, "connected", False)
        and not getattr(transport, "disconnecting", True)
    ):
        transport.doWrite()


class ConnectionGate(Factory):
    """Wraps the site: counts open connections, refuses new ones at the caps.

    It also makes the site's channel (``HTTPChannel`` or the site's own subclass of
    it) a ``BoundedChannel``, so connections the site accepts directly are bounded
    in time and counted too.
    """

    log = logger()
    noisy = False

    def __init__(
        self,
        site: Site,
        limits: ConnectionLimits,
        clock: IReactorTime,
        awaited: Awaited = nothing_awaited,
    ) -> None:
        self.site = site
        self.clock = clock
        self.limits = limits
        #: asked when a slow reader's stall timer fires (the API layer's answer)
        self.awaited = awaited
        self.max_connections = 0
        self._per_client = 0
        self.open: Counter[str | None] = Counter()
        self.total = 0
        # connections with no request in progress, longest waiting first
        self.waiting: dict[BoundedChannel, None] = {}
        # connections whose client's buffer is full: their stall timers run
        self.unread: set[BoundedChannel] = set()
        self.closing = 0  # closed to make room, not gone yet
        self.refused = 0
        self._next_warning = 0.0
        self._channel_class = bounded(site.protocol)
        # Factory.protocol is the public hook; Twisted types HTTPFactory's as a method
        site.protocol = self.channel  # type: ignore[method-assign,assignment]
        self.configure(limits)

    def follow(self, config: Config) -> None:
        """A reload: the ``connections`` caps."""
        self.configure(config.connections)

    def configure(self, limits: ConnectionLimits) -> None:
        """Adopt ``limits`` (at start and on reload); open connections stay, and
        running stall timers take the new ``stallTimeout``."""
        stall_changed = limits.stall_timeout != self.limits.stall_timeout
        self.limits = limits
        if stall_changed:
            for channel in list(self.unread):
                channel.follow_stall_timeout()
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        budget = connection_budget(soft)
        wanted = limits.max_connections or budget
        if wanted > budget:
            self.log.warn(
                "connections.maxConnections {wanted} does not fit in the file limit "
                "({soft} open files); using {budget}",
                wanted=wanted,
                soft=soft,
                budget=budget,
            )
        total = min(wanted, budget)
        caps = (total, min(limits.max_per_client, total))
        if caps == (self.max_connections, self._per_client):
            return
        self.max_connections, self._per_client = caps
        self.log.info(
            "serving at most {total} client connections, {per} per client address "
            "(file limit {soft})",
            total=self.max_connections,
            per=self._per_client,
            soft=soft,
        )

    def channel(self) -> BoundedChannel:
        return self._channel_class(self)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        key = client_key(addr)
        if key is not None and self.open[key] >= self._per_client:
            return self._refuse(
                f"{self.open[key]} connections from {key} are open (connections.maxPerClient)"
            )
        if not self._make_room():
            return self._refuse(f"{self.total} connections are open (connections.maxConnections)")
        channel: Protocol | None = self.site.buildProtocol(addr)
        return channel

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def opened(self, channel: BoundedChannel) -> None:
        self.total += 1
        self.open[channel.client] += 1
        self.waits(channel)

    def closed(self, channel: BoundedChannel) -> None:
        self.total -= 1
        self.open[channel.client] -= 1
        if self.open[channel.client] <= 0:
            del self.open[channel.client]
        self.waiting.pop(channel, None)
        if channel.made_room:
            self.closing -= 1

    def waits(self, channel: BoundedChannel) -> None:
        """``channel`` has no request in progress (from now: last in line)."""
        self.waiting.pop(channel, None)
        self.waiting[channel] = None

    def busy(self, channel: BoundedChannel) -> None:
        """``channel`` has a whole request head: it is not closed to make room."""
        self.waiting.pop(channel, None)

    def _make_room(self) -> bool:
        """Below the total cap, or a waiting connection was closed to make room."""
        if self.total - self.closing < self.max_connections:
            return True
        if not self.waiting:
            return False
        oldest = next(iter(self.waiting))
        self.busy(oldest)
        oldest.made_room = True
        self.closing += 1
        self.log.debug("closing {client}'s waiting connection to make room", client=oldest.client)
        transport = oldest.transport
        assert transport is not None
        abort(transport)  # needed now
        return True

    def _refuse(self, why: str) -> Protocol:
        self.refused += 1
        now = self.clock.seconds()
        if now >= self._next_warning:  # one line a minute at most, under a flood
            self._next_warning = now + WARN_EVERY
            self.log.warn(
                "refusing new connections: {why}; {refused} refused so far",
                why=why,
                refused=self.refused,
            )
        error = ApiError(503, f"too many open connections: {why}; try again later")
        return _Refusal(closing_response(error, b"Retry-After: 5\r\n"))


class _Refusal(Protocol):
    """Answers 503 and closes, without reading the request."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.response)
        self.transport.loseConnection()


class BoundedChannel(HTTPChannel):
    """An ``HTTPChannel`` whose requests must arrive in time (see the module doc)."""

    log = logger()

    IDLE, HEADERS, BODY, HANDLING, CLOSED = "idle", "headers", "body", "handling", "closed"

    def __init__(self, gate: ConnectionGate) -> None:
        super().__init__()
        self.gate = gate
        self.phase = self.IDLE
        self.client: str | None = None
        self._deadline: IDelayedCall | None = None
        self._abort: IDelayedCall | None = None
        self._stall: IDelayedCall | None = None  # the client reads nothing of the answer
        self._stall_since = 0.0  # when that timer was armed
        self._delivered = Delivery()  # the socket then
        self._due = 0.0  # when the current phase must be over
        self.made_room = False  # closed by the gate for a newcomer
        #: this connection, never reused for another (``id()`` can be, once it is gone)
        self.serial = next(_serials)
        self._host: IAddress | None = None
        self._peer: IAddress | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        assert self.transport is not None
        self.client = client_key(self.transport.getPeer())
        self.gate.opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel()
        for call in (self._abort, self._stall):
            if call is not None and call.active():
                call.cancel()
        self._abort = self._stall = None
        self.gate.unread.discard(self)
        self.gate.closed(self)
        super().connectionLost(reason)

    def getHost(self) -> IAddress:
        """The connection's local address, asked of the socket once: Twisted's
        ``Request`` asks for it for every request (a ``getsockname`` call each)."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> IAddress:
        """The client's address, made once per connection rather than per request."""
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    # --- a client that reads nothing -------------------------------------
    #
    # The transport pauses its producer (this channel, then the answer's producer:
    # the upstream) when the client's send buffer is full, and resumes it only once
    # that buffer has drained completely: a client reading a long answer slowly can
    # stay paused far longer than ``stallTimeout`` while it reads.  So when the timer
    # fires the socket is asked whether the client took bytes since the timer was
    # armed (:mod:`llamaswap.delivery`): if it did, the timer is armed again, unless
    # something waits for the model its request holds (``gate.awaited``: a swap
    # waits for every request in flight on the model it stops); if it did not (or
    # the socket cannot tell), the client is cut off.

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self._stall is None or not self._stall.active():
            self.gate.unread.add(self)
            self._arm_stall(delivery(self.transport))

    def resumeProducing(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None
        self.gate.unread.discard(self)
        super().resumeProducing()

    def _arm_stall(self, sample: Delivery) -> None:
        self._delivered = sample
        self._stall_since = self.gate.clock.seconds()
        self._stall = self.gate.clock.callLater(self.gate.limits.stall_timeout, self._stalled)

    def follow_stall_timeout(self) -> None:
        """A reload changed ``stallTimeout``: the running timer ends at the new length
        from when it was armed (at once if that is past)."""
        if self._stall is not None and self._stall.active():
            due = self._stall_since + self.gate.limits.stall_timeout
            self._stall.reset(max(0.0, due - self.gate.clock.seconds()))

    def _stalled(self) -> None:
        self._stall = None
        assert self.transport is not None
        now = delivery(self.transport)
        seconds = self.gate.clock.seconds() - self._stall_since
        if not now.taken_since(self._delivered):
            why = f"it read nothing of its answer for {seconds:g}s"
        else:  # slow, but reading: fine while nobody waits for its model
            # the request being answered is the first (Twisted answers in order)
            awaited = self.gate.awaited(self.requests[0]) if self.requests else None
            if awaited is None:
                self._arm_stall(now)
                return
            why = f"it reads its answer too slowly while {awaited}"
        self.gate.unread.discard(self)
        self.log.info(
            "cutting off {client}: {why} (connections.stallTimeout)",
            client=self.client,
            why=why,
        )
        abort(self.transport)

    # --- the request's phases -------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.phase == self.CLOSED:
            return  # answered 408: what is still coming is not read
        if self.phase == self.IDLE and data:
            self._begin_request()
        elif self.phase == self.BODY:
            limits = self.gate.limits
            # each byte buys 1/bodyMinRate s, banked at most bodyTimeout s ahead
            self._due = min(
                self._due + len(data) / max(limits.body_min_rate, 1),
                self.gate.clock.seconds() + limits.body_timeout,
            )
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        # a pipelined request can start inside the data of the one before
        if self.phase == self.IDLE:
            self._begin_request()
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self.gate.busy(self)
        self._begin(self.BODY, self.gate.limits.body_timeout)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        # the request is in: what follows (the answer) may take as long as it takes
        self.phase = self.HANDLING
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self.phase = self.IDLE  # before super(): it replays pipelined data
        self.gate.waits(self)
        super().requestDone(request)

    def _begin_request(self) -> None:
        self._begin(self.HEADERS, self.gate.limits.header_timeout)

    # --- the deadline ---------------------------------------------------
    #
    # One timer per connection, checked lazily: a phase only records when it is
    # due, and the timer, when it fires, compares with the phase then current.  So
    # a keep-alive connection serving many quick requests schedules one call per
    # headerTimeout, not two per request.

    def _begin(self, phase: str, seconds: float) -> None:
        self.phase = phase
        now = self.gate.clock.seconds()
        self._due = now + seconds
        if self._deadline is None or not self._deadline.active():
            self._deadline = self.gate.clock.callLater(seconds, self._expired)
        elif self._deadline.getTime() > self._due:
            self._deadline.reset(seconds)

    def _cancel(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.phase not in (self.HEADERS, self.BODY):
            return  # that request arrived in time
        if getattr(self.transport, "disconnecting", False):
            return  # already answered (a 400) and closing
        limits = self.gate.limits
        late = self._due - self.gate.clock.seconds()
        if late > 0:  # a new request since, or a body faster than bodyMinRate
            self._deadline = self.gate.clock.callLater(late, self._expired)
            return
        if self.phase == self.BODY:
            what = (
                f"the request body did not arrive at {limits.body_min_rate} bytes/s "
                "(connections.bodyMinRate, connections.bodyTimeout)"
            )
        else:
            what = (
                f"the request headers did not arrive within {limits.header_timeout:g}s "
                "(connections.headerTimeout)"
            )
        self.phase = self.CLOSED
        self.log.debug("closing a slow client {client}: {what}", client=self.client, what=what)
        error = ApiError(408, what)
        assert self.transport is not None
        self.transport.write(closing_response(error))
        self.transport.loseConnection()
        # a client that reads nothing would keep its socket open until this
        self._abort = self.gate.clock.callLater(self.abortTimeout or 15, abort, self.transport)


@cache
def bounded(channel: object) -> type[BoundedChannel]:
    """``BoundedChannel`` on top of a site's own channel class, if it has one.

    (Twisted's default ``Site.protocol`` is a factory function for a wrapper that
    can switch to HTTP/2, which needs the optional ``h2`` package: plain HTTP/1.1
    then.)
    """
    if not isinstance(channel, type) or not issubclass(channel, HTTPChannel):
        return BoundedChannel
    if issubclass(channel, BoundedChannel):
        return channel
    return type(f"Bounded{channel.__name__}", (BoundedChannel, channel), {})
