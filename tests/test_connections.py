"""Bounded connections: deadlines for requests that arrive too slowly, caps on how many
are open, and periodic tasks that survive their errors."""

from __future__ import annotations

import errno
import json
import os
import resource
import select
import socket
import subprocess
import sys
from typing import Any

import attrs
import treq
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from llamaswap.config import ConfigError, parse_config
from llamaswap.connections import (
    BoundedChannel,
    ConnectionGate,
    ConnectionLimits,
    client_key,
    connection_budget,
)
from llamaswap.delivery import Delivery, delivery
from llamaswap.guard import Checked
from llamaswap.periodic import Periodic
from llamaswap.process import ModelState
from llamaswap.relay import Relay
from llamaswap.resources import Footprint, MemoryMonitor
from llamaswap.testing.fake_server import FakeLlamaServer

from .helpers import world
from .integration import FAKE, LiveTestCase, SlowClients

LIMITS = ConnectionLimits(header_timeout=10, body_timeout=5, body_min_rate=100)
BASE = "models:\n  m:\n    cmd: x --port ${PORT}\n"


class Recorder(Resource):
    """Answers every request with the size of its body; ``hold`` keeps answers open."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Request] = []
        self.hold = False

    def render(self, request: Request) -> Any:
        self.seen.append(request)
        if self.hold:
            return NOT_DONE_YET
        assert request.content is not None
        return b"got %d" % len(request.content.read())


class Harness:
    """A site behind a ``ConnectionGate``, on a fake clock, without sockets."""

    def __init__(self, limits: ConnectionLimits = LIMITS) -> None:
        self.clock = Clock()
        self.resource = Recorder()
        self.site = Site(self.resource, reactor=self.clock)
        self.gate = ConnectionGate(self.site, limits, self.clock)

    def connect(self, host: str = "127.0.0.5") -> tuple[Protocol, StringTransport]:
        address = IPv4Address("TCP", host, 40000)
        protocol = self.gate.buildProtocol(address)
        assert protocol is not None
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def trickle(self, protocol: Protocol, data: bytes, every: float) -> None:
        """One byte every ``every`` seconds: what a slowloris does."""
        for i in range(len(data)):
            protocol.dataReceived(data[i : i + 1])
            self.clock.advance(every)


def status_line(transport: StringTransport) -> bytes:
    line: bytes = transport.value().split(b"\r\n", 1)[0]
    return line


class HeaderDeadlineTests(SynchronousTestCase):
    def test_headers_trickled_a_byte_at_a_time_get_408_at_the_deadline(self) -> None:
        h = Harness()
        protocol, transport = h.connect()
        # each byte comes well within the 60 s idle timeout: without a deadline this
        # connection would stay open for as long as the client likes
        h.trickle(protocol, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n", every=0.2)
        self.assertFalse(transport.disconnecting)  # 7 s in: before the 10 s deadline
        h.trickle(protocol, b"X-Slow: " + b"a" * 30, every=0.2)
        self.assertEqual(status_line(transport), b"HTTP/1.1 408 Request Timeout")
        body = json.loads(transport.value().split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["error"]["code"], "request_timeout")
        self.assertIn("connections.headerTimeout", body["error"]["message"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.resource.seen, [])
        # bytes still coming are not read any more
        protocol.dataReceived(b"\r\n\r\n")
        self.assertEqual(h.resource.seen, [])

    def test_a_client_that_reads_nothing_is_aborted_after_the_408(self) -> None:
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        h.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        h.clock.advance(15)
        self.assertTrue(transport.disconnected)  # abortConnection

    def test_the_deadline_starts_at_the_first_byte_of_each_request(self) -> None:
        h = Harness()
        protocol, transport = h.connect()
        h.clock.advance(30)  # idle before the first byte: the idle timeout's business
        protocol.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status_line(transport), b"HTTP/1.1 200 OK")
        transport.clear()
        h.clock.advance(30)  # idle between two requests of a keep-alive connection
        protocol.dataReceived(b"GET /b HTTP/1.1\r\n")
        h.clock.advance(9.9)
        protocol.dataReceived(b"Host: x\r\n\r\n")
        self.assertEqual(status_line(transport), b"HTTP/1.1 200 OK")
        self.assertEqual(len(h.resource.seen), 2)

    def test_a_pipelined_request_gets_its_own_deadline(self) -> None:
        h = Harness()
        protocol, transport = h.connect()
        # the second request starts in the same packet as the first
        protocol.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n")
        self.assertEqual(len(h.resource.seen), 1)
        h.clock.advance(10)
        self.assertIn(b"HTTP/1.1 408 Request Timeout", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_an_idle_keep_alive_connection_still_times_out(self) -> None:
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        h.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        h.clock.advance(2)
        self.assertTrue(transport.disconnecting)


class AddressTests(SynchronousTestCase):
    def test_the_addresses_are_asked_of_the_transport_once_per_connection(self) -> None:
        h = Harness()
        protocol, transport = h.connect()
        asked: list[str] = []
        host, peer = transport.getHost, transport.getPeer

        def get_host() -> IAddress:
            asked.append("host")
            address: IAddress = host()
            return address

        def get_peer() -> IAddress:
            asked.append("peer")
            address: IAddress = peer()
            return address

        transport.getHost = get_host  # type: ignore[method-assign]
        transport.getPeer = get_peer  # type: ignore[method-assign]
        for _ in range(3):
            protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(h.resource.seen), 3)
        for request in h.resource.seen:
            self.assertEqual(request.getHost(), host())
            self.assertEqual(request.getClientAddress(), peer())
        self.assertEqual(sorted(asked), ["host", "peer"])


class BodyRateTests(SynchronousTestCase):
    def post(self, h: Harness, length: int, chunked: bool = False) -> tuple[Protocol, Any]:
        protocol, transport = h.connect()
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % length
        protocol.dataReceived(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
        return protocol, transport

    def test_a_body_slower_than_the_minimum_rate_gets_408(self) -> None:
        h = Harness()
        protocol, transport = self.post(h, 10_000)
        # 10 bytes/s: the 5 s grace, then 0.1 s more per byte (bodyMinRate 100)
        for _ in range(5):
            protocol.dataReceived(b"x" * 10)
            h.clock.advance(1)
        self.assertFalse(transport.disconnecting)
        for _ in range(5):
            protocol.dataReceived(b"x" * 10)
            h.clock.advance(1)
        self.assertEqual(status_line(transport), b"HTTP/1.1 408 Request Timeout")
        self.assertIn(b"bodyMinRate", transport.value())
        self.assertEqual(h.resource.seen, [])

    def test_a_slow_chunked_body_gets_408(self) -> None:
        h = Harness()
        protocol, transport = self.post(h, 0, chunked=True)
        h.trickle(protocol, b"1\r\na\r\n" * 10, every=1)
        self.assertEqual(status_line(transport), b"HTTP/1.1 408 Request Timeout")

    def test_a_body_sent_fast_then_trickled_gets_408(self) -> None:
        # bytes sent early are no credit for later: 99 kB at once, then a byte every
        # 4 s, held a spool file open for hours (the average stayed above the rate)
        h = Harness()
        protocol, transport = self.post(h, 100_000)
        protocol.dataReceived(b"x" * 99_000)
        h.trickle(protocol, b"x" * 3, every=4)
        self.assertEqual(status_line(transport), b"HTTP/1.1 408 Request Timeout")
        self.assertEqual(h.resource.seen, [])

    def test_a_long_body_at_a_steady_rate_above_the_minimum_arrives(self) -> None:
        h = Harness()
        protocol, transport = self.post(h, 6_000)
        for _ in range(30):  # 30 s at 200 bytes/s: far past bodyTimeout, above the rate
            protocol.dataReceived(b"x" * 200)
            h.clock.advance(1)
        self.assertEqual(status_line(transport), b"HTTP/1.1 200 OK")
        self.assertTrue(transport.value().endswith(b"got 6000"))

    def test_a_slow_answer_is_never_cut(self) -> None:
        h = Harness()
        h.resource.hold = True
        protocol, transport = self.post(h, 5)
        protocol.dataReceived(b"hello")
        request = h.resource.seen[0]
        request.write(b"first")
        h.clock.advance(3600)  # an hour-long stream
        self.assertFalse(transport.disconnecting)
        request.write(b"last")
        request.finish()
        self.assertIn(b"first", transport.value())
        self.assertFalse(transport.disconnecting)  # keep-alive


class StallTests(SynchronousTestCase):
    """A client that reads none of its answer is cut off after ``stallTimeout``: its
    request (and the lease on a model that every swap would wait for) would be
    kept forever.  A client that reads, however slowly, keeps its answer."""

    def held(self) -> tuple[Harness, Protocol, StringTransport, Request]:
        h = Harness(attrs.evolve(LIMITS, stall_timeout=30))
        h.resource.hold = True
        protocol, transport = h.connect()
        protocol.dataReceived(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        request = h.resource.seen[0]
        request.write(b"first")
        return h, protocol, transport, request

    def test_a_client_that_reads_nothing_is_cut_off(self) -> None:
        h, protocol, transport, request = self.held()
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        assert transport.producer is not None
        transport.producer.pauseProducing()  # what the transport does: send buffer full
        h.clock.advance(29)
        self.assertFalse(transport.disconnected)
        h.clock.advance(1)
        self.assertTrue(transport.disconnected)  # abortConnection
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(gone), 1)  # the request ends: its lease goes with it

    def test_a_client_that_reads_keeps_its_answer(self) -> None:
        h, _, transport, request = self.held()
        assert transport.producer is not None
        for _ in range(10):  # the buffer fills and drains, for 20 minutes
            transport.producer.pauseProducing()
            h.clock.advance(20)
            transport.producer.resumeProducing()
            h.clock.advance(100)
        self.assertFalse(transport.disconnecting)
        request.write(b"last")
        request.finish()
        self.assertTrue(transport.value().endswith(b"last\r\n0\r\n\r\n"))


class SocketTransport(StringTransport):
    """A ``StringTransport`` whose handle is a real, connected TCP socket: what the
    kernel says the client took is real; the bytes written here and the clock are not."""

    def __init__(self, handle: socket.socket, peerAddress: IAddress) -> None:
        super().__init__(peerAddress=peerAddress)
        self.handle = handle

    def getHandle(self) -> socket.socket:
        return self.handle


def tcp_pair(test: SynchronousTestCase) -> tuple[socket.socket, socket.socket]:
    """(client, server) over loopback, with small buffers so they fill quickly."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server.setblocking(False)
    client.setblocking(False)
    test.addCleanup(client.close)
    test.addCleanup(server.close)
    return client, server


def fill(server: socket.socket) -> None:
    """Write until the socket takes no more: what Twisted does whenever there is room."""
    while True:
        try:
            server.send(b"x" * 65536)
        except BlockingIOError:
            return


def read_what_arrived(client: socket.socket) -> int:
    taken = 0
    while True:
        try:
            taken += len(client.recv(65536))
        except BlockingIOError:
            return taken


class SlowReaderTests(SynchronousTestCase):
    """Twisted resumes a paused answer only once its buffer has drained completely,
    so a client reading a long answer slowly stays paused past ``stallTimeout``
    while it reads: the stall timer asks the socket before it cuts."""

    def held(self) -> tuple[Harness, StringTransport, socket.socket, socket.socket]:
        h = Harness(attrs.evolve(LIMITS, stall_timeout=30))
        h.resource.hold = True
        client, server = tcp_pair(self)
        address = IPv4Address("TCP", "127.0.0.5", 40000)
        protocol = h.gate.buildProtocol(address)
        assert protocol is not None
        transport = SocketTransport(server, address)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        h.resource.seen[0].write(b"first")
        fill(server)
        assert transport.producer is not None
        transport.producer.pauseProducing()  # the send buffer is full
        return h, transport, client, server

    def test_a_client_reading_slowly_through_one_long_pause_is_not_cut(self) -> None:
        h, transport, client, server = self.held()
        for _ in range(6):  # never resumed: 3 minutes paused, reading all along
            self.assertGreater(read_what_arrived(client), 0)
            # the client's end acknowledged what it read: the kernel has room again...
            _, writable, _ = select.select([], [server], [], 10)
            self.assertEqual(writable, [server])
            fill(server)  # ...and the room is filled again at once (the queue looks as full)
            h.clock.advance(30)
            self.assertFalse(transport.disconnected)
        h.clock.advance(30)  # it stops reading (what was in flight may still land)
        h.clock.advance(30)
        self.assertTrue(transport.disconnected)

    def test_a_client_that_reads_nothing_is_cut(self) -> None:
        h, transport, _, _ = self.held()
        h.clock.advance(29)
        self.assertFalse(transport.disconnected)
        with capturedLogs() as events:
            h.clock.advance(31)  # once stallTimeout passes with nothing taken
        self.assertTrue(transport.disconnected)
        self.assertIn("connections.stallTimeout", "".join(e["log_format"] for e in events))

    def test_on_a_unix_socket_a_shrinking_send_queue_counts_as_read(self) -> None:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        theirs.setblocking(False)
        transport = SocketTransport(ours, IPv4Address("TCP", "127.0.0.5", 40000))
        fill(ours)
        before = delivery(transport)
        self.assertIsNone(before.acked)  # no TCP_INFO: the queue is all there is
        self.assertFalse(delivery(transport).taken_since(before))
        self.assertGreater(read_what_arrived(theirs), 0)
        self.assertTrue(delivery(transport).taken_since(before))

    def test_a_tls_transport_is_asked_through_the_socket_below_it(self) -> None:
        _, server = tcp_pair(self)

        class Tls:
            """What ``TLSMemoryBIOProtocol`` offers: its handle is not a socket."""

            transport = SocketTransport(server, IPv4Address("TCP", "127.0.0.5", 40000))

            def getHandle(self) -> object:
                return object()

        self.assertIsNotNone(delivery(Tls()).acked)

    def test_a_transport_without_a_socket_never_counts_as_read(self) -> None:
        transport = StringTransport()
        self.assertEqual(delivery(transport), Delivery())
        self.assertFalse(delivery(transport).taken_since(Delivery()))


class ContendedSlowReaderTests(SynchronousTestCase):
    """A slow reader keeps its answer only while nobody waits for its model: a swap
    waits for every request in flight on the model it stops, so a client reading a
    long answer at a few bytes a second would hold every other model's requests.

    The whole daemon in memory (scheduler over fake children, the API, the relay, a
    fake llama-server streaming on the clock), behind a gate whose client connection
    has a real TCP socket under it: what the kernel says the client took is real."""

    def setUp(self) -> None:
        self.w = world()  # a and b: one stops for the other
        upstream = FakeLlamaServer(clock=self.w.reactor, token_delay=1.0, tokens=10**4)
        upstream.start()
        self.addCleanup(upstream.stop)
        self.upstream = RequestTraversalAgent(upstream.resource())
        relay = Relay(self.upstream)
        self.api = self.w.api(relay)
        resource = Checked(self.api.resource(), [relay.hop.check])
        site = Site(resource, reactor=self.w.reactor)
        limits = attrs.evolve(LIMITS, stall_timeout=30)
        self.gate = ConnectionGate(site, limits, self.w.reactor, self.api.awaited)
        self.other: Any = StubTreq(resource)  # another client, for another model
        self.client, server = tcp_pair(self)
        address = IPv4Address("TCP", "127.0.0.5", 40000)
        protocol = self.gate.buildProtocol(address)
        assert protocol is not None
        self.protocol: Protocol = protocol
        self.transport = SocketTransport(server, address)
        self.protocol.makeConnection(self.transport)
        body = json.dumps({"model": "a", "stream": True, "messages": []}).encode()
        self.protocol.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.flush()
        self.w.make_ready("a")
        self.flush()
        self.w.reactor.advance(1)
        self.flush()
        self.assertIn(b"data: ", self.transport.value())  # a's answer streams
        fill(server)
        assert self.transport.producer is not None
        self.transport.producer.pauseProducing()  # the client's buffer is full
        self.server = server

    def flush(self) -> None:
        self.other.flush()
        self.upstream.flush()
        self.other.flush()

    def ask_for_b(self) -> Deferred[Any]:
        asked: Deferred[Any] = self.other.post(
            "http://llamaswap/v1/chat/completions",
            json.dumps({"model": "b", "messages": [], "fake": {"tokens": 2}}).encode(),
            headers={"content-type": "application/json"},
        )
        self.flush()
        return asked

    def read_for(self, seconds: float) -> None:
        """The client reads what arrived, then the clock runs ``seconds``."""
        self.assertGreater(read_what_arrived(self.client), 0)
        _, writable, _ = select.select([], [self.server], [], 10)
        self.assertEqual(writable, [self.server])
        fill(self.server)  # Twisted fills the room again at once
        self.w.reactor.advance(seconds)

    def gone(self) -> None:
        """What the reactor does once the transport is aborted."""
        self.assertTrue(self.transport.disconnected)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.flush()

    def test_a_slow_reader_is_cut_when_a_swap_waits_for_its_model(self) -> None:
        asked = self.ask_for_b()
        self.assertEqual(self.w.scheduler.in_flight("a"), 1)
        self.assertNoResult(asked)  # b waits for a's request to end
        with capturedLogs() as events:
            self.read_for(30)
        self.assertTrue(self.transport.disconnected)
        said = [e["why"] for e in events if "why" in e]
        self.assertEqual(
            said, ["it reads its answer too slowly while a swap to b waits for model a"]
        )
        self.gone()
        self.assertEqual(self.w.scheduler.in_flight("a"), 0)  # the lease went with it
        self.assertTrue(self.w.child("a").ended)
        self.w.make_ready("b")
        self.flush()
        self.w.reactor.advance(2)  # b's two tokens
        self.flush()
        response = self.successResultOf(asked)
        self.assertEqual(response.code, 200)
        self.assertIs(self.w.process("b").state, ModelState.READY)
        self.successResultOf(treq.content(response))
        self.assertEqual(self.w.scheduler.in_flight("b"), 0)

    def test_a_slow_reader_keeps_its_answer_while_nobody_waits(self) -> None:
        for _ in range(6):  # 3 minutes, paused all along, reading all along
            self.read_for(30)
            self.assertFalse(self.transport.disconnected)
        self.assertEqual(self.w.scheduler.in_flight("a"), 1)

    def test_a_reader_that_reads_nothing_is_cut_with_nobody_waiting(self) -> None:
        self.w.reactor.advance(29)
        self.assertFalse(self.transport.disconnected)
        self.w.reactor.advance(1)
        self.gone()
        self.assertEqual(self.w.scheduler.in_flight("a"), 0)

    def test_a_reader_that_reads_nothing_is_cut_with_a_swap_waiting(self) -> None:
        asked = self.ask_for_b()
        self.w.reactor.advance(29)
        self.assertFalse(self.transport.disconnected)
        with capturedLogs() as events:
            self.w.reactor.advance(1)
        said = [e["why"] for e in events if "why" in e]
        self.assertEqual(said, ["it read nothing of its answer for 30s"])
        self.gone()
        self.w.make_ready("b")
        self.flush()
        self.w.reactor.advance(2)
        self.flush()
        self.assertEqual(self.successResultOf(asked).code, 200)


class StallReloadTests(SynchronousTestCase):
    """A reload that changes ``stallTimeout`` applies to the timers already running."""

    def paused(self) -> tuple[Harness, StringTransport]:
        h = Harness(attrs.evolve(LIMITS, stall_timeout=30))
        h.resource.hold = True
        protocol, transport = h.connect()
        protocol.dataReceived(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.producer is not None
        transport.producer.pauseProducing()
        h.clock.advance(5)
        return h, transport

    def test_a_shorter_stall_timeout_cuts_a_stalled_client_sooner(self) -> None:
        h, transport = self.paused()
        h.gate.configure(attrs.evolve(LIMITS, stall_timeout=10))
        h.clock.advance(4)
        self.assertFalse(transport.disconnected)
        h.clock.advance(1)  # 10 s after the pause, not 30
        self.assertTrue(transport.disconnected)

    def test_a_stall_timeout_already_past_cuts_at_once(self) -> None:
        h, transport = self.paused()
        h.gate.configure(attrs.evolve(LIMITS, stall_timeout=2))
        h.clock.advance(0)
        self.assertTrue(transport.disconnected)

    def test_a_longer_stall_timeout_gives_a_stalled_client_longer(self) -> None:
        h, transport = self.paused()
        h.gate.configure(attrs.evolve(LIMITS, stall_timeout=100))
        h.clock.advance(90)
        self.assertFalse(transport.disconnected)
        h.clock.advance(5)
        self.assertTrue(transport.disconnected)

    def test_a_resumed_connection_is_no_longer_followed(self) -> None:
        h, transport = self.paused()
        assert transport.producer is not None
        transport.producer.resumeProducing()
        self.assertEqual(h.gate.unread, set())
        h.gate.configure(attrs.evolve(LIMITS, stall_timeout=1))
        h.clock.advance(60)
        self.assertFalse(transport.disconnected)


class CapTests(SynchronousTestCase):
    def test_past_the_per_client_cap_new_connections_get_503_and_are_closed(self) -> None:
        h = Harness(ConnectionLimits(max_per_client=2, max_connections=10))
        first, _ = h.connect()
        h.connect()
        with capturedLogs() as events:
            _, refused = h.connect()
            h.connect()
        self.assertEqual(status_line(refused), b"HTTP/1.1 503 Service Unavailable")
        self.assertIn(b"connections.maxPerClient", refused.value())
        self.assertIn(b"Retry-After: 5\r\n", refused.value())
        self.assertTrue(refused.disconnecting)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)  # not one line per refused connection
        _, other = h.connect("127.0.0.6")  # another client is let in
        self.assertFalse(other.disconnecting)
        first.connectionLost(Failure(ConnectionError()))
        _, again = h.connect()  # a slot was freed
        self.assertFalse(again.disconnecting)
        self.assertEqual(h.gate.total, 3)  # two from .5, one from .6

    def test_past_the_total_cap_with_every_connection_busy_everyone_gets_503(self) -> None:
        h = Harness(ConnectionLimits(max_connections=3))
        h.resource.hold = True
        for i in range(3):
            protocol, _ = h.connect(f"127.0.0.{10 + i}")
            protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _, refused = h.connect("127.0.0.20")
        self.assertIn(b"connections.maxConnections", refused.value())

    def test_at_the_total_cap_the_longest_waiting_slow_client_makes_room(self) -> None:
        # many addresses trickling headers fill the total cap: a newcomer takes the
        # place of the connection that has waited longest without a request in
        # progress, instead of everyone getting 503 until the header deadline
        h = Harness(ConnectionLimits(max_connections=3, max_per_client=3))
        slow = []
        for i in range(3):
            protocol, transport = h.connect(f"127.0.0.{10 + i}")
            protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nX-a: ")
            slow.append(transport)
            h.clock.advance(1)
        newcomer, transport = h.connect("127.0.0.20")
        self.assertFalse(transport.disconnecting)
        self.assertEqual([t.disconnecting for t in slow], [True, False, False])
        newcomer.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status_line(transport), b"HTTP/1.1 200 OK")
        # the room is counted before the closed one is gone: the next takes another
        h.connect("127.0.0.21")
        self.assertEqual([t.disconnecting for t in slow], [True, True, False])

    def test_at_the_total_cap_requests_in_progress_are_never_closed(self) -> None:
        h = Harness(ConnectionLimits(max_connections=2, max_per_client=2))
        h.resource.hold = True  # answers in progress, bodies arriving: both busy
        busy, answering = h.connect("127.0.0.10")
        busy.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        uploading, sending = h.connect("127.0.0.11")
        uploading.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n")
        _, refused = h.connect("127.0.0.20")
        self.assertIn(b"connections.maxConnections", refused.value())
        self.assertFalse(answering.disconnecting or sending.disconnecting)

    def test_the_total_is_kept_below_the_file_limit(self) -> None:
        self.assertEqual(connection_budget(1024), 298)  # socket, spool file, upstream
        self.assertEqual(connection_budget(100), 8)
        h = Harness(ConnectionLimits(max_connections=10**9))
        self.assertLess(h.gate.max_connections, 10**9)

    def test_the_soft_file_limit_is_raised_to_the_hard_one(self) -> None:
        def low_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (300, 400))

        script = "from llamaswap.connections import raise_file_limit as r; print(r())"
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            preexec_fn=low_limit,
        )
        self.assertEqual(result.stdout.strip(), "400")

    def test_the_sites_own_channel_class_keeps_its_behaviour(self) -> None:
        class Marked(HTTPChannel):
            def allHeadersReceived(self) -> None:
                self.requests[-1].responseHeaders.addRawHeader(b"x-marked", b"yes")
                super().allHeadersReceived()

        clock = Clock()
        site = Site(Recorder(), reactor=clock)
        site.protocol = Marked  # type: ignore[assignment]
        gate = ConnectionGate(site, LIMITS, clock)
        channel = gate.buildProtocol(IPv4Address("TCP", "127.0.0.5", 1))
        self.assertIsInstance(channel, Marked)
        self.assertIsInstance(channel, BoundedChannel)
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"x-marked: yes", transport.value().lower())
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        clock.advance(10)
        self.assertIn(b"408 Request Timeout", transport.value())

    def test_ipv6_clients_are_counted_per_64(self) -> None:
        a = client_key(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 1))
        b = client_key(IPv6Address("TCP", "2001:db8:1:2:bbbb::9", 1))
        self.assertEqual(a, b)
        self.assertEqual(a, "2001:db8:1:2::/64")
        self.assertEqual(client_key(IPv6Address("TCP", "::ffff:192.0.2.7", 1)), "192.0.2.7")
        self.assertIsNone(client_key(None))

    def test_config_keys_and_defaults(self) -> None:
        self.assertEqual(parse_config(BASE).connections, ConnectionLimits())
        config = parse_config(BASE + "connections:\n  headerTimeout: 5\n  maxConnections: 50\n")
        self.assertEqual(config.connections.header_timeout, 5)
        self.assertEqual(config.connections.max_connections, 50)
        with self.assertRaises(ConfigError) as caught:
            parse_config(BASE + "connections:\n  maxPerClient: 0\n")
        self.assertIn("connections.maxPerClient", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            parse_config(BASE + "connections:\n  headerTimout: 5\n")
        self.assertIn("did you mean 'headerTimeout'", str(caught.exception))


class RealSocketCapTests(LiveTestCase):
    async def serve_gated(self, connections: str) -> tuple[Any, int]:
        """Serve one fake model behind its ``ConnectionGate`` on a real loopback port."""
        await self.serve(f"connections:\n{connections}models:\n  m:\n    cmd: {FAKE}\n")
        gate: Any = self.service.gate
        listening: Any = reactor.listenTCP(0, gate, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port: int = listening.getHost().port
        self.base = f"http://127.0.0.1:{port}"
        return gate, port

    async def test_one_address_cannot_take_every_connection(self) -> None:
        gate, port = await self.serve_gated("  maxPerClient: 4\n")
        crowd = SlowClients()
        crowd.open(port, 12)  # from 127.0.0.2; the requests below come from 127.0.0.1
        self.addCleanup(crowd.close_all)

        async def settled() -> bool:
            return crowd.settled and crowd.closed >= 8

        await self.eventually(settled, "the connections past the cap are closed")
        self.assertEqual((crowd.held, crowd.closed), (4, 8))
        self.assertEqual(gate.open["127.0.0.2"], 4)
        self.assertEqual(len(crowd.answers), 8)
        self.assertTrue(all(a.startswith(b"HTTP/1.1 503") for a in crowd.answers))
        reply = await self.chat("m")  # from 127.0.0.1: served as usual
        self.assertEqual(reply.code, 200)
        # the caps can change on reload; connections already open stay
        apply: Any = self.service.apply
        apply(parse_config(f"connections:\n  maxPerClient: 5\nmodels:\n  m:\n    cmd: {FAKE}\n"))
        crowd.open(port, 2)

        async def one_more() -> bool:
            return crowd.settled and crowd.closed >= 9

        await self.eventually(one_more, "one more is let in, the next refused")
        self.assertEqual((crowd.held, crowd.closed), (5, 9))

    async def test_slow_clients_from_many_addresses_make_room_for_a_chat(self) -> None:
        # 12 slow connections from 3 addresses against a total cap of 8: before,
        # the chat got 503 until the header deadline cleared the crowd
        gate, port = await self.serve_gated("  maxConnections: 8\n  maxPerClient: 4\n")
        crowd = SlowClients()
        self.addCleanup(crowd.close_all)
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            crowd.open(port, 4, source)

        async def settled() -> bool:
            return crowd.settled and crowd.closed >= 4

        await self.eventually(settled, "the longest waiting connections make room")
        self.assertEqual((crowd.held, crowd.closed, crowd.answers), (8, 4, []))
        reply = await self.chat("m")
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(gate.refused, 0)


class PeriodicTests(SynchronousTestCase):
    def test_memory_sampling_survives_an_error_and_says_so_once(self) -> None:
        clock = Clock()
        footprint = Footprint()
        failures = [OSError(errno.EMFILE, "Too many open files")] * 3

        def running() -> dict[str, int]:
            if failures:
                raise failures.pop()
            return {"m": os.getpid()}

        monitor = MemoryMonitor(clock, running, lambda _: footprint, interval=5)
        with capturedLogs() as events:
            monitor.start()
            for _ in range(3):
                clock.advance(5)
            self.assertTrue(monitor.loop.running)
            self.assertEqual(footprint.measured, {})
            clock.advance(5)
        self.assertGreater(footprint.measured["ram"], 0)  # sampling resumed
        lines = [e["log_format"] for e in events]
        self.assertEqual(len([f for f in lines if "failed" in f]), 1)
        self.assertEqual(len([f for f in lines if "works again" in f]), 1)
        monitor.stop()
        self.assertFalse(monitor.loop.running)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_a_failing_deferred_does_not_stop_it_either(self) -> None:
        clock = Clock()
        calls: list[int] = []

        def task() -> Deferred[None]:
            calls.append(1)
            d: Deferred[None] = Deferred()
            clock.callLater(1, d.errback, RuntimeError("boom"))
            return d

        periodic = Periodic("test task", task, clock, 2)
        with capturedLogs():
            periodic.start()
            for _ in range(10):
                clock.advance(1)
        self.assertGreaterEqual(len(calls), 3)
        self.assertTrue(periodic.running)
        periodic.stop()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
