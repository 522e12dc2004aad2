"""How llamaswap connects to its children: direct endpoints, streams on their own connection."""

from __future__ import annotations

import json
import sys
from io import BytesIO
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol, ServerFactory, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI, Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.error import SchemeNotSupported

from llamaswap.childhttp import ChildAgent
from llamaswap.upstream import SPARE_SECONDS, UpstreamEndpoints

from .integration import LiveTestCase


class EndpointTests(SynchronousTestCase):
    def test_ip_literals_connect_at_once_without_name_resolution(self) -> None:
        memory = MemoryReactorClock()  # has no resolver: a lookup would fail
        endpoints = UpstreamEndpoints(memory, connect_timeout=7)
        factory = Factory.forProtocol(Protocol)
        endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8123/v1/models")).connect(factory)
        ((host, port, _, timeout, _),) = memory.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8123, 7))
        self.assertFalse(factory.noisy)  # one log line per connection is not wanted

    def test_a_spare_still_connecting_at_its_expiry_is_given_up(self) -> None:
        """A slow connect (a loaded box, a LAN peer's lost SYN) outlasts the spare's
        wait: it is given up, or the connection it made at last would be nobody's."""
        memory = MemoryReactorClock()
        endpoints = UpstreamEndpoints(memory, connect_timeout=30)
        endpoints.open_spare("http://127.0.0.1:8123/")
        memory.advance(SPARE_SECONDS)
        self.assertEqual(memory.getDelayedCalls(), [])
        self.assertTrue(memory.connectors[0].stoppedConnecting)
        self.assertIsNone(endpoints.take_spare((b"127.0.0.1", 8123)))

    def test_host_names_are_resolved_and_other_schemes_refused(self) -> None:
        endpoints = UpstreamEndpoints(MemoryReactorClock(), connect_timeout=7)
        named: Any = endpoints.endpointForURI(URI.fromBytes(b"http://gpu-box:8080/"))
        self.assertIsInstance(named.endpoint, HostnameEndpoint)
        with self.assertRaises(SchemeNotSupported):
            endpoints.endpointForURI(URI.fromBytes(b"ftp://127.0.0.1/"))

    def test_one_endpoint_per_server_until_it_is_asked_to_exit(self) -> None:
        endpoints = UpstreamEndpoints(MemoryReactorClock(), connect_timeout=7)

        def endpoint(url: bytes) -> object:
            return endpoints.endpointForURI(URI.fromBytes(url))

        first = endpoint(b"http://127.0.0.1:8123/v1/chat/completions")
        self.assertIs(endpoint(b"http://127.0.0.1:8123/health"), first)  # built once
        self.assertIsNot(endpoint(b"http://127.0.0.1:8124/health"), first)
        self.assertIsNot(endpoint(b"https://127.0.0.1:8123/health"), first)
        endpoints.close_connections("http://127.0.0.1:8123")  # the child stops: forgotten
        self.assertIsNot(endpoint(b"http://127.0.0.1:8123/health"), first)


class _LikeLlamaServer(Protocol):
    """Streams one answer per connection and then drops the connection — but only
    when the next request arrives on it, so the moment in which llama-server's
    close is still on its way is always hit.  Plain answers keep the connection."""

    def __init__(self, seen: dict[str, int]) -> None:
        self.seen = seen
        self.buffer = b""
        self.streamed = False

    def connectionMade(self) -> None:
        self.seen["connections"] += 1

    def connectionLost(self, reason: object = None) -> None:
        self.seen["closed"] = self.seen.get("closed", 0) + 1

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, found, rest = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return
        body, self.buffer = rest[:length], rest[length:]
        assert self.transport is not None
        if self.streamed:  # the server had already closed this connection
            self.seen["cut"] += 1
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        if json.loads(body).get("stream"):
            self.streamed = True
            event = b"data: [DONE]\n\n"
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n0\r\n\r\n"
                % (len(event), event)
            )
            return
        answer = b'{"choices": []}'
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
        )


class _Upstream(ServerFactory):
    def __init__(self, seen: dict[str, int]) -> None:
        self.seen = seen

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return _LikeLlamaServer(self.seen)


class _UpstreamTestCase(LiveTestCase):
    async def serve_upstream(self) -> dict[str, int]:
        """llamaswap with model ``m`` relayed to a server like llama-server; its counts."""
        seen = {"connections": 0, "cut": 0}
        port: IListeningPort = reactor.listenTCP(0, _Upstream(seen), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        upstream = port.getHost().port  # type: ignore[attr-defined]
        await self.serve(
            "models:\n  m:\n"
            f'    cmd: {sys.executable} -c "import time; time.sleep(600)"\n'
            f"    proxy: http://127.0.0.1:{upstream}\n"
            "    checkEndpoint: none\n"
        )
        return seen


class StreamConnectionTests(_UpstreamTestCase):
    async def test_back_to_back_streams_never_meet_a_closing_connection(self) -> None:
        seen = await self.serve_upstream()
        for _ in range(2):
            self.assertEqual((await self.chat("m")).code, 200)
        for _ in range(3):
            reply = await self.chat("m", stream=True)
            self.assertEqual(reply.code, 200, reply.body)
            self.assertIn(b"[DONE]", reply.body)
        self.assertEqual((await self.chat("m")).code, 200)
        self.assertEqual(seen["cut"], 0)
        # the plain answers shared one kept connection; each stream had its own
        self.assertEqual(seen["connections"], 4)


class StopClosesIdleConnectionsTests(_UpstreamTestCase):
    async def test_a_stop_closes_the_kept_connections_to_the_model(self) -> None:
        """llama-server exits only once its idle kept-alive connections notice the
        stop (a 10 ms poll each); llamaswap closes its own as it asks the child to go."""
        seen = await self.serve_upstream()
        for _ in range(2):
            self.assertEqual((await self.chat("m")).code, 200)
        self.assertEqual((seen["connections"], seen.get("closed", 0)), (1, 0))  # kept
        await self.api.scheduler.unload(["m"])
        # closed as the stop began: the FIN goes out and the server reads it within a
        # few reactor turns, which the child's exit may beat (nothing else closes it
        # for seconds, and the server here outlives the child)
        for _ in range(10):
            if seen.get("closed", 0):
                break
            await deferLater(reactor, 0)
        self.assertEqual(seen.get("closed", 0), 1)
        self.assertEqual((await self.chat("m")).code, 200)  # a new start: a new connection
        self.assertEqual(seen["connections"], 2)


class _Noted(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[BaseException] = Deferred()  # why its connection ended

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        assert reason.value is not None
        self.lost.callback(reason.value)


class ConnectUnderWayTests(TestCase):
    """A request granted just before its model's stop may still be connecting."""

    def setUp(self) -> None:
        seen = {"connections": 0, "cut": 0}
        port: IListeningPort = reactor.listenTCP(0, _Upstream(seen), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]

    async def connect_then_stop(self, *, cut: bool) -> _Noted:
        endpoints = UpstreamEndpoints(reactor, connect_timeout=5)
        endpoint = endpoints.endpointForURI(URI.fromBytes(self.url.encode() + b"/"))
        made = endpoint.connect(Factory.forProtocol(_Noted))
        endpoints.close_connections(self.url, cut=cut)  # this turn: not connected yet
        protocol = await made
        assert isinstance(protocol, _Noted)
        return protocol

    async def test_it_is_cut_as_it_is_made(self) -> None:
        protocol = await self.connect_then_stop(cut=True)
        for _ in range(10):  # an abort ends the connection in the reactor's next turn
            if protocol.lost.called:
                break
            await deferLater(reactor, 0)
        self.assertTrue(protocol.lost.called)
        self.assertIsInstance(await protocol.lost, ConnectionAborted)

    async def test_unless_another_model_still_uses_that_server(self) -> None:
        protocol = await self.connect_then_stop(cut=False)
        self.assertFalse(protocol.lost.called)
        assert protocol.transport is not None
        protocol.transport.loseConnection()
        await protocol.lost


class SpareConnectionTests(TestCase):
    """A child about to be ready gets a connection its first request goes out on."""

    def setUp(self) -> None:
        self.seen = {"connections": 0, "cut": 0}
        port: IListeningPort = reactor.listenTCP(0, _Upstream(self.seen), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        self.clock = Clock()
        self.endpoints = UpstreamEndpoints(reactor, connect_timeout=5, clock=self.clock)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent.usingEndpointFactory(reactor, self.endpoints, pool=pool)

    async def until(self, what: str, count: int) -> None:
        for _ in range(200):
            if self.seen.get(what, 0) >= count:
                return
            await deferLater(reactor, 0.005)
        self.fail(f"{what} never reached {count}: {self.seen}")

    async def ask(self) -> bytes:
        body = FileBodyProducer(BytesIO(b'{"model": "m"}'))
        response = await self.agent.request(
            b"POST", self.url.encode() + b"/v1/chat/completions", bodyProducer=body
        )
        return await readBody(response)

    async def test_the_first_request_goes_out_on_the_spare(self) -> None:
        self.endpoints.open_spare(self.url)
        self.endpoints.open_spare(self.url)  # one is enough
        await self.until("connections", 1)
        self.assertEqual(await self.ask(), b'{"choices": []}')
        self.assertEqual(self.seen["connections"], 1)
        self.assertEqual(await self.ask(), b'{"choices": []}')  # the next one connects
        self.assertEqual(self.seen["connections"], 2)

    async def test_an_unused_spare_is_closed_before_the_server_would(self) -> None:
        """llama-server drops a silent connection after 5 s; a request must never be
        sent on one it is dropping."""
        self.endpoints.open_spare(self.url)
        await self.until("connections", 1)
        self.clock.advance(SPARE_SECONDS)
        await self.until("closed", 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(await self.ask(), b'{"choices": []}')
        self.assertEqual(self.seen["connections"], 2)

    async def test_a_stop_closes_an_unused_spare(self) -> None:
        self.endpoints.open_spare(self.url)
        await self.until("connections", 1)
        self.endpoints.close_connections(self.url)
        await self.until("closed", 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_llamaswap_stopping_closes_every_spare(self) -> None:
        self.endpoints.open_spare(self.url)
        await self.until("connections", 1)
        self.endpoints.close_spares()
        await self.until("closed", 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_a_refused_spare_is_forgotten(self) -> None:
        closed: IListeningPort = reactor.listenTCP(0, _Upstream(self.seen), interface="127.0.0.1")
        url = f"http://127.0.0.1:{closed.getHost().port}"  # type: ignore[attr-defined]
        stopped = closed.stopListening()
        if stopped is not None:
            await stopped
        self.endpoints.open_spare(url)
        for _ in range(50):
            if not self.clock.getDelayedCalls():
                break
            await deferLater(reactor, 0.005)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_only_plain_http_servers_on_ip_literals_get_one(self) -> None:
        for url in ("https://127.0.0.1:1", "http://gpu-box:8080", "not a url"):
            self.endpoints.open_spare(url)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LeanSpareConnectionTests(SpareConnectionTests):
    """The same through the children's client, as llamaswap relays (streams' agent)."""

    def setUp(self) -> None:
        super().setUp()
        self.agent = ChildAgent(self.endpoints, self.clock, self.agent, persistent=False)
