"""The lean client for children: framing, the connection pool, flow control.

Over real sockets against a raw server written here (each case says byte for byte
what the server sends), plus the byte-by-byte splits and the flow control in
memory, where every split and every pause can be seen.
"""

from __future__ import annotations

import datetime
import itertools
import socket
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL.SSL import Error as SSLError
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IAddress, IConsumer, IListeningPort, IReactorSSL
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestGenerationFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from llamaswap.childhttp import (
    HEAD_SECONDS,
    MAX_HEAD,
    UNHEARD_SECONDS,
    BadResponse,
    ChildAgent,
    StandardAgent,
)
from llamaswap.connections import send_now
from llamaswap.relay import BytesProducer
from llamaswap.upstream import UpstreamEndpoints

from .helpers import next_request

#: what the server does with one request it has read
Reply = Callable[["_Scripted"], None]


def send(data: bytes, *, close: bool = False) -> Reply:
    def reply(peer: _Scripted) -> None:
        assert peer.transport is not None
        peer.transport.write(data)
        if close:
            peer.transport.loseConnection()

    return reply


def drop(peer: _Scripted) -> None:
    """Read the request, close without a word (a kept connection timing out)."""
    assert peer.transport is not None
    peer.transport.loseConnection()


def silent(peer: _Scripted) -> None:
    """Never answer."""


_CLOSED = Failure(ConnectionDone())
_DONE = Failure(ResponseDone())
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


class _Scripted(Protocol):
    """Reads whole requests (head and Content-Length body); answers each by script."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.buffer = b""
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.server.peers.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while (found := next_request(self.buffer)) is not None:
            request, self.buffer = found
            self.server.requests.append(request)
            reply = self.server.replies.pop(0) if self.server.replies else send(OK)
            reply(self)

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        self.lost.callback(None)


class _Server(ServerFactory):
    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.requests: list[bytes] = []
        self.peers: list[_Scripted] = []

    def buildProtocol(self, addr: IAddress | None) -> _Scripted:
        return _Scripted(self)


class _Body(Protocol):
    """Collects a body: its pieces as they came, and how it ended."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.ended: Deferred[BaseException] = Deferred()  # why it ended

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        assert reason.value is not None
        self.ended.callback(reason.value)


async def _read(response: IResponse) -> tuple[bytes, BaseException]:
    body = _Body()
    response.deliverBody(body)
    reason = await body.ended
    return b"".join(body.pieces), reason


class _LiveCase(TestCase):
    """A raw server on 127.0.0.1 and a ChildAgent with a Clock for its pool."""

    def serve(self, *replies: Reply) -> _Server:
        server = _Server(list(replies))
        self.listen(server)
        self.addCleanup(self.close_all, server)
        return server

    def listen(self, server: ServerFactory) -> None:
        """``server`` on a free port; ``self.agent`` for it, its pool on ``self.clock``."""
        port: IListeningPort = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        self.clock = Clock()
        self.agent = ChildAgent(
            UpstreamEndpoints(reactor, connect_timeout=5), self.clock, Agent(reactor)
        )

    async def close_all(self, server: _Server) -> None:
        self.agent.closeCachedConnections()
        for peer in server.peers:
            if peer.transport is not None:
                peer.transport.loseConnection()
            await peer.lost
        # the client's side reads the close a turn later
        for _ in range(3):
            await _turn()

    async def get(self, path: str = "/", method: bytes = b"GET", body: bytes | None = None) -> Any:
        producer = BytesProducer(body) if body is not None else None
        return await self.agent.request(
            method, (self.base + path).encode(), Headers({b"x-a": [b"1"]}), producer
        )


async def _received(peer: socket.socket) -> bytes:
    """What ``peer`` reads once the reactor has run as many turns as that takes."""
    while True:
        try:
            return peer.recv(65536)
        except BlockingIOError:
            await _turn()


def _turn() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0, d.callback, None)
    return d


class FramingTests(_LiveCase):
    async def test_a_content_length_body_ends_complete(self) -> None:
        server = self.serve(send(OK))
        response = await self.get("/v1/models?x=1")
        self.assertEqual((response.code, response.phrase, response.length), (200, b"OK", 5))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertIsNone(response.headers.getRawHeaders(b"content-length"))  # framing
        body, reason = await _read(response)
        self.assertEqual(body, b"hello")
        self.assertIsInstance(reason, ResponseDone)
        request = server.requests[0]
        self.assertTrue(request.startswith(b"GET /v1/models?x=1 HTTP/1.1\r\n"), request)
        self.assertIn(b"\r\nHost: 127.0.0.1:", request)
        self.assertIn(b"\r\nX-A: 1\r\n", request)

    async def test_a_body_goes_in_one_write_with_its_length(self) -> None:
        server = self.serve(send(OK))
        response = await self.get("/v1/chat/completions", b"POST", b'{"a": 1}')
        await _read(response)
        self.assertTrue(server.requests[0].endswith(b'Content-Length: 8\r\n\r\n{"a": 1}'))

    async def test_a_body_from_a_producer_that_takes_its_time(self) -> None:
        server = self.serve(send(OK), send(OK))
        url = (self.base + "/upload").encode()
        producer = FileBodyProducer(BytesIO(b"x" * 100_000), readSize=30_000)
        await _read(await self.agent.request(b"PUT", url, None, producer))
        self.assertTrue(
            server.requests[0].endswith(b"Content-Length: 100000\r\n\r\n" + b"x" * 100_000)
        )
        unknown = _LaterProducer([b"ab", b"cd"])
        pending = self.agent.request(b"PUT", url, None, unknown)
        unknown.go()
        await _read(await pending)
        self.assertTrue(
            server.requests[1].endswith(
                b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
            ),
            server.requests[1],
        )

    async def test_a_body_its_reader_stops_drops_the_connection(self) -> None:
        server = self.serve(send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"))
        response = await self.get()
        body = _Body()
        response.deliverBody(body)
        body.transport.stopProducing()  # type: ignore[union-attr]
        self.assertIsInstance(await body.ended, ResponseFailed)
        await server.peers[0].lost
        await _read(await self.get())  # on a new connection
        self.assertEqual(len(server.peers), 2)

    async def test_a_chunked_body_comes_piece_by_piece_with_extensions_and_trailers(
        self,
    ) -> None:
        answer = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
        )
        server = self.serve(send(answer), send(OK))
        response = await self.get()
        self.assertIs(response.length, UNKNOWN_LENGTH)
        body, reason = await _read(response)
        self.assertEqual(body, b"hello world")
        self.assertIsInstance(reason, ResponseDone)
        await _read(await self.get())  # the connection was fit for another request
        self.assertEqual(len(server.peers), 1)

    async def test_a_body_read_until_close_may_have_lost_data(self) -> None:
        server = self.serve(send(b"HTTP/1.1 200 OK\r\n\r\nall there is", close=True))
        response = await self.get()
        self.assertIs(response.length, UNKNOWN_LENGTH)
        body, reason = await _read(response)
        self.assertEqual(body, b"all there is")
        self.assertIsInstance(reason, PotentialDataLoss)
        self.assertEqual(len(server.requests), 1)

    async def test_head_204_and_304_have_no_body_whatever_their_length_says(self) -> None:
        server = self.serve(
            send(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n"),
            send(b"HTTP/1.1 204 No Content\r\nContent-Length: 42\r\n\r\n"),
            send(b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"),
        )
        head = await self.get(method=b"HEAD")
        self.assertEqual(head.length, 0)
        self.assertEqual(head.headers.getRawHeaders(b"content-length"), [b"42"])
        for response in (head, await self.get(), await self.get()):
            body, reason = await _read(response)
            self.assertEqual((body, type(reason)), (b"", ResponseDone))
        self.assertEqual(len(server.peers), 1)  # all on one kept connection

    async def test_interim_answers_are_skipped(self) -> None:
        self.serve(send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n" + OK))
        response = await self.get()
        self.assertEqual(response.code, 200)
        self.assertEqual((await _read(response))[0], b"hello")

    async def test_http_1_0_and_connection_close_are_not_kept(self) -> None:
        server = self.serve(
            send(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\na"),
            send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nb"),
            send(OK),
        )
        for expected in (b"a", b"b", b"hello"):
            self.assertEqual((await _read(await self.get()))[0], expected)
        self.assertEqual(len(server.peers), 3)

    async def test_chunked_with_a_content_length_is_read_as_chunked_and_not_kept(self) -> None:
        server = self.serve(
            send(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            ),
            send(OK),
        )
        self.assertEqual((await _read(await self.get()))[0], b"hello")
        await _read(await self.get())
        self.assertEqual(len(server.peers), 2)

    async def test_a_head_too_long_fails_the_request_and_the_connection(self) -> None:
        server = self.serve(send(b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * MAX_HEAD))
        with self.assertRaises(ResponseNeverReceived) as caught:
            await self.get()
        self.assertIsInstance(caught.exception.reasons[0].value, BadResponse)
        await server.peers[0].lost  # dropped

    async def test_endless_interim_answers_fail_the_request_and_the_connection(self) -> None:
        """``100 Continue`` for ever (in one read, past Python's recursion limit, and
        in many): the interim heads count towards the head's cap."""
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        many = interim * (MAX_HEAD // len(interim) + 1)
        server = self.serve(send(many), send(b"".join([interim] * 100) * 30))
        for _ in range(2):
            with self.assertRaises(ResponseNeverReceived) as caught:
                await self.get()
            self.assertIsInstance(caught.exception.reasons[0].value, BadResponse)
        await server.peers[0].lost
        await server.peers[1].lost

    async def test_a_head_dribbled_past_its_deadline_fails_the_request_and_the_connection(
        self,
    ) -> None:
        """A server that begins its head and never ends it (a byte now and then, as a
        slowloris would) is given up ``HEAD_SECONDS`` after the head began."""
        server = self.serve(send(b"HTTP/1.1 200 OK\r\nContent-"))
        pending = Deferred.fromCoroutine(self.get())
        while not server.requests:
            await _turn()
        for _ in range(3):
            await _turn()  # the first bytes have come: the head's deadline runs
        self.clock.advance(HEAD_SECONDS - 1)
        self.assertNoResult(pending)
        assert server.peers[0].transport is not None
        server.peers[0].transport.write(b"Type: text/plain\r\nX-A: ")  # more, not all
        for _ in range(3):
            await _turn()
        self.clock.advance(1)
        with self.assertRaises(ResponseNeverReceived) as caught:
            await pending
        error = caught.exception.reasons[0].value
        self.assertIsInstance(error, BadResponse)
        self.assertIn("head still not whole 30 s after it began", str(error))
        await server.peers[0].lost  # dropped

    async def test_silence_before_a_head_and_between_interim_answers_is_not_timed(
        self,
    ) -> None:
        """A server computing a whole answer says nothing until it is done; an interim
        answer's head that came whole leaves no deadline behind."""
        server = self.serve(send(b"HTTP/1.1 102 Processing\r\n\r\n"))
        pending = Deferred.fromCoroutine(self.get())
        while not server.requests:
            await _turn()
        for _ in range(3):
            await _turn()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(HEAD_SECONDS * 10)
        self.assertNoResult(pending)
        assert server.peers[0].transport is not None
        server.peers[0].transport.write(OK)
        self.assertEqual((await _read(await pending))[0], b"hello")

    async def test_a_broken_chunk_size_fails_the_body_and_the_connection(self) -> None:
        server = self.serve(
            send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n")
        )
        body, reason = await _read(await self.get())
        self.assertEqual(body, b"ok")
        assert isinstance(reason, ResponseFailed)
        self.assertIsInstance(reason.reasons[0].value, BadResponse)
        await server.peers[0].lost

    async def test_not_http_and_bad_lengths_are_refused(self) -> None:
        for answer in (
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ):
            self.serve(send(answer))
            with self.assertRaises(ResponseNeverReceived) as caught:
                await self.get()
            self.assertIsInstance(caught.exception.reasons[0].value, BadResponse, answer)

    async def test_a_connection_lost_mid_body_fails_the_body(self) -> None:
        self.serve(send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", close=True))
        body, reason = await _read(await self.get())
        self.assertEqual(body, b"half")
        self.assertIsInstance(reason, ResponseFailed)

    async def test_a_connection_lost_mid_head_fails_the_request(self) -> None:
        self.serve(send(b"HTTP/1.1 200 OK\r\nContent-Le", close=True))
        with self.assertRaises(ResponseNeverReceived):
            await self.get()

    async def test_a_post_without_a_body_says_its_length_is_0(self) -> None:
        """As Twisted's client does: llama-server's HTTP library reads a POST
        without a length until the connection closes."""
        server = self.serve(send(OK), send(OK), send(OK))
        for method in (b"POST", b"PUT"):
            await _read(await self.get(method=method))
        await _read(await self.get())
        self.assertIn(b"\r\nContent-Length: 0\r\n", server.requests[0])
        self.assertIn(b"\r\nContent-Length: 0\r\n", server.requests[1])
        self.assertNotIn(b"Content-Length", server.requests[2])


class SendNowTests(TestCase):
    """Bytes a request writes leave in the same reactor turn (``send_now``), so what
    else runs in that turn does not hold them back."""

    def listener(self) -> socket.socket:
        """A plain listening socket on 127.0.0.1, read without the reactor."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        return listener

    async def accepted(self, listener: socket.socket) -> socket.socket:
        """The next connection to ``listener``, once the reactor has made it."""
        while True:
            try:
                peer, _ = listener.accept()
                break
            except BlockingIOError:
                await _turn()
        self.addCleanup(peer.close)
        peer.setblocking(False)
        return peer

    async def peer(self) -> tuple[socket.socket, Protocol]:
        listener = self.listener()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getsockname()[1])
        protocol = await connectProtocol(endpoint, Protocol())
        assert protocol.transport is not None
        self.addCleanup(protocol.transport.loseConnection)
        return await self.accepted(listener), protocol

    async def test_written_bytes_reach_the_peer_without_a_reactor_turn(self) -> None:
        peer, protocol = await self.peer()
        assert protocol.transport is not None
        protocol.transport.write(b"later")
        self.assertRaises(BlockingIOError, peer.recv, 100)  # the reactor's way: a turn on
        self.assertEqual(await _received(peer), b"later")
        protocol.transport.write(b"now")
        send_now(protocol.transport)
        self.assertEqual(peer.recv(100), b"now")

    async def test_a_closing_connection_is_left_to_the_reactor(self) -> None:
        peer, protocol = await self.peer()
        assert protocol.transport is not None
        protocol.transport.write(b"last")
        protocol.transport.loseConnection()
        send_now(protocol.transport)  # would empty the buffer and not close
        self.assertRaises(BlockingIOError, peer.recv, 100)
        self.assertEqual(await _received(peer), b"last")
        self.assertEqual(await _received(peer), b"")

    async def test_a_request_on_a_kept_connection_is_sent_before_the_call_returns(
        self,
    ) -> None:
        listener = self.listener()
        base = f"http://127.0.0.1:{listener.getsockname()[1]}"
        agent = ChildAgent(UpstreamEndpoints(reactor, connect_timeout=5), Clock(), Agent(reactor))
        self.addCleanup(agent.closeCachedConnections)
        first = agent.request(b"GET", f"{base}/first".encode())
        peer = await self.accepted(listener)
        self.assertTrue((await _received(peer)).startswith(b"GET /first "))
        peer.sendall(OK)
        await _read(await first)
        second = agent.request(b"POST", f"{base}/second".encode(), None, BytesProducer(b"{}"))
        self.assertTrue(peer.recv(65536).startswith(b"POST /second "))
        peer.sendall(OK)
        await _read(await second)


class _OneThread(ServerFactory):
    """A server that reads one connection at a time, as llama-server does with a
    pool of one HTTP thread: a connection it serves keeps the thread until it closes,
    and the next connection's request is read only then."""

    def __init__(self) -> None:
        self.serving: _Threaded | None = None
        self.waiting: list[_Threaded] = []
        self.answered = 0
        self.connections = 0
        self.hold = False  # read requests, answer none

    def buildProtocol(self, addr: IAddress | None) -> _Threaded:
        self.connections += 1
        return _Threaded(self)

    def next(self) -> None:
        self.serving = self.waiting.pop(0) if self.waiting else None
        if self.serving is not None:
            self.serving.serve()


class _Threaded(Protocol):
    def __init__(self, server: _OneThread) -> None:
        self.server = server
        self.buffer = b""
        self.served = False

    def connectionMade(self) -> None:
        if self.server.serving is None:
            self.server.serving = self
            self.served = True
        else:
            self.server.waiting.append(self)

    def serve(self) -> None:
        self.served = True
        self.dataReceived(b"")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.served or self.server.hold:
            return
        while (found := next_request(self.buffer)) is not None:
            _, self.buffer = found
            self.server.answered += 1
            assert self.transport is not None
            self.transport.write(OK)

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        if self in self.server.waiting:
            self.server.waiting.remove(self)
        if self.server.serving is self:
            self.server.next()


class PoolTests(_LiveCase):
    def one_thread(self) -> _OneThread:
        """A server that reads one connection at a time, and a ChildAgent for it."""
        server = _OneThread()
        self.listen(server)
        self.addCleanup(self.agent.closeCachedConnections)
        return server

    async def test_a_kept_connection_does_not_hold_the_thread_a_newer_one_waits_for(
        self,
    ) -> None:
        """Two requests at once to a server that reads one connection at a time: once
        the other has waited ``UNHEARD_SECONDS`` unread, the connection kept from the
        first is closed, so the server gets to it (before: at the 3 s idle timeout)."""
        server = self.one_thread()
        both = [Deferred.fromCoroutine(self.get()) for _ in range(2)]
        while not (both[0].called or both[1].called) or not server.waiting:
            await _turn()
        first, second = both if both[0].called else both[::-1]
        await _read(await first)
        for _ in range(5):
            await _turn()
        self.assertNoResult(second)  # unread: the one thread holds the kept connection
        self.clock.advance(UNHEARD_SECONDS)
        self.assertEqual((await _read(await second))[0], b"hello")
        # nothing waits unread any more: a finished connection is kept again
        for _ in range(2):
            await _read(await self.get())
        self.assertEqual((server.answered, server.connections), (4, 2))

    async def test_a_connection_finishing_while_a_request_waits_unread_is_closed(
        self,
    ) -> None:
        server = self.one_thread()
        # the first connection's answer is held back until the second waits overdue
        server.hold = True
        both = [Deferred.fromCoroutine(self.get()) for _ in range(2)]
        while len(server.waiting) < 1 or server.serving is None or not server.serving.buffer:
            await _turn()
        self.clock.advance(UNHEARD_SECONDS)  # nothing idle to close yet
        server.hold = False
        server.serving.dataReceived(b"")
        for pending in both:
            self.assertEqual((await _read(await pending))[0], b"hello")

    test_a_connection_finishing_while_a_request_waits_unread_is_closed.timeout = 10  # type: ignore[attr-defined]

    test_a_kept_connection_does_not_hold_the_thread_a_newer_one_waits_for.timeout = 10  # type: ignore[attr-defined]

    async def test_a_finished_connection_is_used_again(self) -> None:
        server = self.serve()
        for _ in range(3):
            await _read(await self.get())
        self.assertEqual((len(server.peers), len(server.requests)), (1, 3))

    async def test_a_get_meeting_a_closed_kept_connection_is_sent_once_more(self) -> None:
        server = self.serve(send(OK), drop, send(OK))
        await _read(await self.get())
        response = await self.get()  # the kept connection is dropped under it
        self.assertEqual((await _read(response))[0], b"hello")
        self.assertEqual((len(server.peers), len(server.requests)), (2, 3))

    async def test_a_post_or_a_body_meeting_a_closed_kept_connection_is_not(self) -> None:
        server = self.serve(send(OK), drop, send(OK), drop, send(OK))
        await _read(await self.get())
        with self.assertRaises(ResponseNeverReceived):
            await self.get(method=b"POST")
        self.assertEqual(len(server.requests), 2)  # sent once: the server may have acted
        await _read(await self.get())
        with self.assertRaises(ResponseNeverReceived):
            await self.get(body=b"{}")  # a GET, but with a body
        self.assertEqual(len(server.requests), 4)

    async def test_a_get_failing_on_a_fresh_connection_is_not_sent_again(self) -> None:
        server = self.serve(drop, send(OK))
        with self.assertRaises(ResponseNeverReceived):
            await self.get()
        self.assertEqual(len(server.requests), 1)

    async def test_an_idle_connection_is_closed_after_the_idle_time(self) -> None:
        server = self.serve()
        await _read(await self.get())
        self.clock.advance(2.9)
        self.assertFalse(server.peers[0].lost.called)
        await _read(await self.get())  # used again at 2.9 s: its wait starts over
        self.clock.advance(2.9)
        self.assertFalse(server.peers[0].lost.called)
        self.clock.advance(0.2)
        for _ in range(10):  # the FIN reaches the server within a few reactor turns
            if server.peers[0].lost.called:
                break
            await _turn()
        self.assertTrue(server.peers[0].lost.called)
        await _read(await self.get())
        self.assertEqual(len(server.peers), 2)

    async def test_a_kept_connection_the_server_closes_leaves_the_pool(self) -> None:
        server = self.serve()
        await _read(await self.get())
        server.peers[0].transport.loseConnection()  # type: ignore[union-attr]
        await server.peers[0].lost
        for _ in range(3):
            await _turn()
        await _read(await self.get())
        self.assertEqual(len(server.peers), 2)
        self.assertEqual(len(server.requests), 2)  # never written to the closed one

    async def test_cancelling_before_the_answer_drops_the_connection(self) -> None:
        server = self.serve(silent)
        pending = self.agent.request(b"POST", (self.base + "/").encode())
        while not server.requests:
            await _turn()
        pending.cancel()
        failure = self.failureResultOf(pending, ResponseNeverReceived)
        self.assertIsInstance(failure.value.reasons[0].value, CancelledError)
        await server.peers[0].lost

    async def test_non_persistent_connections_carry_one_request(self) -> None:
        server = self.serve()
        self.agent = ChildAgent(
            UpstreamEndpoints(reactor, connect_timeout=5),
            self.clock,
            Agent(reactor),
            persistent=False,
        )
        for _ in range(2):
            await _read(await self.get())
        self.assertEqual(len(server.peers), 2)
        self.assertIn(b"\r\nConnection: close\r\n", server.requests[0])
        await server.peers[0].lost

    async def test_a_get_cut_by_a_stop_is_not_sent_again(self) -> None:
        """A stop aborts a kept connection whose GET waits for its answer: that is
        not a stale connection, and sending the GET once more (on a new endpoint the
        stop knows nothing of) would reach the server being stopped."""
        server = self.serve(send(OK), silent, send(OK))
        await _read(await self.get())
        pending = self.agent.request(b"GET", (self.base + "/").encode())
        while len(server.requests) < 2:
            await _turn()
        self.agent.endpoints.close_connections(self.base)
        with self.assertRaises(ResponseNeverReceived) as caught:
            await pending
        self.assertIsInstance(caught.exception.reasons[0].value, ConnectionAborted)
        self.assertEqual((len(server.peers), len(server.requests)), (1, 2))

    async def test_an_answer_before_the_whole_body_stops_it_and_drops_the_connection(
        self,
    ) -> None:
        """A child may answer (413, say) while the body is still being written: the
        answer is read, the body's producer stopped, the connection not kept."""
        server = self.serve(send(OK))
        early = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 5\r\n\r\nlarge"

        class AnswersEarly(_Scripted):
            def dataReceived(self, data: bytes) -> None:
                self.buffer += data
                if b"\r\n\r\n" in self.buffer and not self.server.requests:
                    self.server.requests.append(self.buffer)
                    assert self.transport is not None
                    self.transport.write(early)

        server.buildProtocol = lambda addr: AnswersEarly(server)  # type: ignore[method-assign]
        producer = _LaterProducer([b"x" * 10])
        producer.length = 100
        response = await self.agent.request(b"PUT", (self.base + "/").encode(), None, producer)
        self.assertEqual(response.code, 413)
        body, reason = await _read(response)
        self.assertEqual((body, type(reason)), (b"large", ResponseDone))
        self.assertTrue(producer.stopped)
        await server.peers[0].lost  # not kept: the server would read the rest as a request


def endless_headers(peer: _Scripted) -> None:
    """``200 OK``, then header lines for ever, a few kilobytes a reactor turn (a
    hostile peer: Twisted's client keeps them all, growing without a bound)."""
    transport = peer.transport
    assert transport is not None
    transport.write(b"HTTP/1.1 200 OK\r\n")
    count = itertools.count()

    def more() -> None:
        if peer.lost.called or transport.disconnecting:  # type: ignore[attr-defined]
            return
        transport.write(b"".join(b"X-H%d: v\r\n" % next(count) for _ in range(500)))
        reactor.callLater(0, more)

    more()


class _NoFallback:
    """A fallback no request may reach: peers go the lean way too."""

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        return fail(AssertionError(f"{uri!r} went to the standard agent"))


def _certificate(name: str) -> tuple[PrivateCertificate, Certificate]:
    """A self-signed certificate for ``name`` (its subjectAltName, as TLS clients
    check) and the same as a trust root."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    return PrivateCertificate.loadPEM(key_pem + cert_pem), Certificate.loadPEM(cert_pem)


class PeerTests(_LiveCase):
    """Peers (a host name, ``https``) go through the lean client, its caps included."""

    def serve_peer(self, *replies: Reply, tls: bool = False) -> _Server:
        server = _Server(list(replies))
        self.endpoints = UpstreamEndpoints(reactor, connect_timeout=5)
        port: IListeningPort
        if tls:
            private, trusted = _certificate("localhost")
            tls_reactor = cast(IReactorSSL, reactor)
            port = tls_reactor.listenSSL(0, server, private.options(), interface="127.0.0.1")
            # the policy of llamaswap's endpoints, with this test's root trusted
            self.endpoints.tls = BrowserLikePolicyForHTTPS(trustRoot=trusted)
        else:
            port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        scheme = "https" if tls else "http"
        self.base = f"{scheme}://localhost:{port.getHost().port}"  # type: ignore[attr-defined]
        self.agent = ChildAgent(self.endpoints, Clock(), _NoFallback())  # type: ignore[arg-type]
        self.addCleanup(self.close_all, server)
        return server

    async def fetch(self, path: str = "/x") -> IResponse:
        pending = self.agent.request(b"GET", (self.base + path).encode())
        # bounded: a client without a cap on the head would wait (and grow) for ever
        return await pending.addTimeout(10, reactor)

    async def test_a_peer_by_host_name_goes_the_lean_way_with_twisteds_host(self) -> None:
        server = self.serve_peer(send(OK), send(OK))
        response = await self.fetch()
        self.assertEqual((await _read(response))[0], b"hello")
        twisted = Agent.usingEndpointFactory(reactor, self.endpoints)
        await _read(await twisted.request(b"GET", (self.base + "/x").encode()))
        lean, standard = (_host_line(r) for r in server.requests)
        self.assertEqual(lean, standard)
        self.assertEqual(lean, b"Host: " + self.base[7:].encode())

    async def test_an_https_peer_goes_the_lean_way_over_tls(self) -> None:
        server = self.serve_peer(send(OK), send(OK), tls=True)
        for _ in range(2):  # the second on the kept TLS connection
            self.assertEqual((await _read(await self.fetch()))[0], b"hello")
        self.assertEqual((len(server.peers), len(server.requests)), (1, 2))
        self.assertEqual(_host_line(server.requests[0]), b"Host: " + self.base[8:].encode())

    async def test_an_https_peer_is_checked_by_the_same_policy(self) -> None:
        self.serve_peer(send(OK), tls=True)
        # llamaswap's own: none set, so the one made at the first https server (Twisted's
        # browser-like policy, which does not know the test's root)
        self.endpoints.tls = UpstreamEndpoints(reactor, connect_timeout=5).tls
        with self.assertRaises(ResponseNeverReceived) as caught:
            await self.fetch()
        self.assertIsInstance(caught.exception.reasons[0].value, SSLError)
        self.assertIsInstance(self.endpoints.tls, BrowserLikePolicyForHTTPS)

    async def test_a_peer_sending_headers_for_ever_fails_at_the_cap(self) -> None:
        for tls in (False, True):
            server = self.serve_peer(endless_headers, tls=tls)
            with self.assertRaises(ResponseNeverReceived) as caught:
                await self.fetch()
            error = caught.exception.reasons[0].value
            self.assertIsInstance(error, BadResponse)
            self.assertIn(f"longer than {MAX_HEAD} bytes", str(error))
            await server.peers[0].lost  # the connection is dropped


def _host_line(request: bytes) -> bytes:
    return next(line for line in request.split(b"\r\n") if line.lower().startswith(b"host:"))


@implementer(IBodyProducer)
class _LaterProducer:
    """A body of unknown length, written when the test says."""

    length: int | object = UNKNOWN_LENGTH

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.stopped = False
        self.consumer: IConsumer | None = None
        self.finished: Deferred[None] = Deferred()

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self.consumer = consumer
        return self.finished

    def go(self) -> None:
        assert self.consumer is not None
        for piece in self.pieces:
            self.consumer.write(piece)
        self.finished.callback(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


class _Fallback:
    def __init__(self) -> None:
        self.uris: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        self.uris.append(uri)
        return Deferred()


class _TcpLike(StringTransport):
    """Aborted as TCP is: ``connectionLost`` comes a turn later (here: never), and
    ``disconnecting`` is not set in between."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class _InMemory:
    """Endpoints whose connections are StringTransports, kept for the test to drive."""

    def __init__(self) -> None:
        self.connections: list[tuple[Protocol, _TcpLike]] = []

    def endpointForURI(self, uri: URI) -> _InMemory:
        return self

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, Protocol)
        transport = _TcpLike()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)


class InMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.endpoints = _InMemory()
        self.fallback = _Fallback()
        self.agent = ChildAgent(self.endpoints, Clock(), self.fallback)  # type: ignore[arg-type]

    def respond(self, pieces: list[bytes]) -> tuple[IResponse | None, _Body]:
        pending = self.agent.request(b"GET", b"http://127.0.0.1:9/x")
        protocol, _ = self.endpoints.connections[-1]
        body = _Body()
        got: list[IResponse] = []

        def deliver(response: IResponse) -> None:
            got.append(response)
            response.deliverBody(body)

        pending.addCallback(deliver)
        for piece in pieces:
            protocol.dataReceived(piece)
        return (got[0] if got else None), body

    def test_chunked_split_at_every_byte_boundary(self) -> None:
        answer = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n"
        )
        splits = [[answer[:at], answer[at:]] for at in range(1, len(answer))]
        splits.append([answer[i : i + 1] for i in range(len(answer))])  # byte by byte
        for pieces in splits:
            response, body = self.respond(pieces)
            self.assertIsNotNone(response, pieces)
            self.assertEqual(b"".join(body.pieces), b"abc0123456789abcdef", pieces)
            reason = self.successResultOf(body.ended)
            self.assertIsInstance(reason, ResponseDone, pieces)

    def test_content_length_split_at_every_byte_boundary(self) -> None:
        for at in range(1, len(OK)):
            _, body = self.respond([OK[:at], OK[at:]])
            self.assertEqual(b"".join(body.pieces), b"hello", at)
            self.assertIsInstance(self.successResultOf(body.ended), ResponseDone)

    def test_a_body_comes_as_it_arrives(self) -> None:
        _, body = self.respond(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\na\r\n"]
        )
        self.assertEqual(body.pieces, [b"a"])  # before the end is known
        self.assertNoResult(body.ended)

    def test_pause_resume_and_stop_reach_the_connection(self) -> None:
        pending = self.agent.request(b"GET", b"http://127.0.0.1:9/x")
        protocol, transport = self.endpoints.connections[-1]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        response = self.successResultOf(pending)
        body = _Body()
        response.deliverBody(body)
        flow: Any = body.transport
        flow.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        flow.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        flow.stopProducing()
        protocol.connectionLost(Failure(ConnectionAborted()))
        reason = self.successResultOf(body.ended)
        assert isinstance(reason, ResponseFailed)
        self.assertIsInstance(reason.reasons[0].value, ConnectionAborted)

    def test_a_body_stopped_by_its_reader_at_its_last_byte_is_not_kept(self) -> None:
        class StopsAtOnce(_Body):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                self.transport.stopProducing()  # type: ignore[union-attr]

        pending = self.agent.request(b"GET", b"http://127.0.0.1:9/x")
        protocol, transport = self.endpoints.connections[-1]
        pending.addCallback(lambda response: response.deliverBody(StopsAtOnce()))
        protocol.dataReceived(OK)
        self.assertTrue(transport.aborted)
        self.agent.request(b"GET", b"http://127.0.0.1:9/x")
        self.assertEqual(len(self.endpoints.connections), 2)  # the stopped one is going

    def test_a_body_waits_paused_for_its_reader(self) -> None:
        pending = self.agent.request(b"GET", b"http://127.0.0.1:9/x")
        protocol, transport = self.endpoints.connections[-1]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        response = self.successResultOf(pending)
        self.assertEqual(transport.producerState, "paused")
        body = _Body()
        response.deliverBody(body)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"cd")
        self.assertEqual(body.pieces, [b"ab", b"cd"])

    def test_a_status_line_with_a_line_break_in_its_phrase_is_refused(self) -> None:
        """The phrase goes to llamaswap's client as it is: a bare LF in it would
        start a header of the child's choosing there (Twisted's client ends lines
        at LF, so its phrase never held one)."""
        for answer in (
            b"HTTP/1.1 200 OK\nSet-Cookie: s=1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\rSet-Cookie: s=1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
        ):
            pending = self.agent.request(b"GET", b"http://127.0.0.1:9/x")
            protocol, transport = self.endpoints.connections[-1]
            protocol.dataReceived(answer)
            failure = self.failureResultOf(pending, ResponseNeverReceived)
            self.assertIsInstance(failure.value.reasons[0].value, BadResponse, answer)
            self.assertTrue(transport.aborted)

    def test_a_head_of_bare_line_feeds_fails_at_once(self) -> None:
        """Lines ended by LF alone never hold the CRLF CRLF a head ends with: the
        request would wait until the server closed a connection it keeps open."""
        pending = self.agent.request(b"GET", b"http://127.0.0.1:9/x")
        protocol, transport = self.endpoints.connections[-1]
        protocol.dataReceived(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi")
        failure = self.failureResultOf(pending, ResponseNeverReceived)
        self.assertIsInstance(failure.value.reasons[0].value, BadResponse)
        self.assertTrue(transport.aborted)

    def test_a_chunk_line_ended_by_a_bare_line_feed_fails_at_once(self) -> None:
        _, body = self.respond(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\nhello\n0\n\n"]
        )
        reason = self.successResultOf(body.ended)
        assert isinstance(reason, ResponseFailed)
        self.assertIsInstance(reason.reasons[0].value, BadResponse)

    def test_a_reader_pausing_as_held_data_comes_keeps_the_connection_paused(self) -> None:
        class PausesAtOnce(_Body):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                self.transport.pauseProducing()  # type: ignore[union-attr]

        pending = self.agent.request(b"GET", b"http://127.0.0.1:9/x")
        protocol, transport = self.endpoints.connections[-1]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        response = self.successResultOf(pending)
        self.assertEqual(transport.producerState, "paused")  # held for its reader
        body = PausesAtOnce()
        response.deliverBody(body)
        self.assertEqual(body.pieces, [b"ab"])
        self.assertEqual(transport.producerState, "paused")  # as the reader asked
        body.transport.resumeProducing()  # type: ignore[union-attr]
        self.assertEqual(transport.producerState, "producing")

    def test_a_body_longer_than_its_length_is_not_sent_past_it(self) -> None:
        """Past its Content-Length the server would read the rest as a request of
        its own (Twisted's client refuses such a write too)."""
        smuggled = b"GET /smuggled HTTP/1.1\r\n\r\n"
        late = _LaterProducer([b"ab", smuggled])
        at_once = BytesProducer(b"ab" + smuggled)
        for producer in (late, at_once):
            producer.length = 2
            pending = self.agent.request(b"PUT", b"http://127.0.0.1:9/x", None, producer)
            _, transport = self.endpoints.connections[-1]
            if producer is late:
                late.go()
            self.failureResultOf(pending, RequestGenerationFailed)
            self.assertNotIn(b"smuggled", transport.value())
            self.assertTrue(transport.aborted)

    def test_user_info_and_other_schemes_go_to_the_standard_agent(self) -> None:
        uris = (
            b"ftp://127.0.0.1:9/x",
            b"http://u@1.2.3.4/",
            b"https://u:p@gpu-box/",
            b"http://127.0.0.1:9?x",
            b"https://gpu-box#x",
        )
        for uri in uris:
            self.agent.request(b"GET", uri)
        self.assertEqual(self.fallback.uris, list(uris))
        self.assertEqual(self.endpoints.connections, [])

    def test_the_standard_agent_is_made_at_its_first_request(self) -> None:
        standard = _InMemory()
        agent = StandardAgent(Clock(), standard)  # type: ignore[arg-type]
        self.assertIsNone(self.successResultOf(agent.closeCachedConnections()))  # none yet
        agent.request(b"GET", b"http://u:p@10.0.0.2:8080/x")
        ((_, transport),) = standard.connections  # through the endpoints given
        self.assertTrue(transport.value().startswith(b"GET /x HTTP/1.1\r\n"))
        self.assertIsNone(self.successResultOf(agent.closeCachedConnections()))

    def test_the_host_header_is_the_one_twisteds_agent_sends(self) -> None:
        """The port only when it is not the scheme's default; the name as written."""
        standard = _InMemory()
        agent = Agent.usingEndpointFactory(
            Clock(), standard, pool=HTTPConnectionPool(Clock(), persistent=False)
        )
        uris = b"""http://gpu-box/x http://Gpu-Box:80/x http://gpu-box:8080/x
            https://gpu-box:443/x https://gpu-box:80/x https://10.0.0.2:8443
            http://[::1]:8080/x http://box_1:8080/x"""
        for uri in uris.split():
            self.agent.request(b"GET", uri)
            agent.request(b"GET", uri)
            lean = self.endpoints.connections[-1][1].value()
            twisted = standard.connections[-1][1].value()
            self.assertEqual(_host_line(lean), _host_line(twisted), uri)
        self.assertEqual(self.fallback.uris, [])

    def test_a_request_line_cannot_be_forged(self) -> None:
        for method, uri in (
            (b"GET", b"http://127.0.0.1:9/x HTTP/1.1\r\nX-Evil: 1"),
            (b"GET\r\n", b"http://127.0.0.1:9/x"),
        ):
            self.failureResultOf(self.agent.request(method, uri), ValueError)
        self.assertEqual(self.endpoints.connections, [])
