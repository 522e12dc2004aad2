"""The relay: in memory (StubTreq in front, the fake llama-server resource behind),
and over real sockets against a scripted upstream and against llamaswap itself."""

from __future__ import annotations

import json
import socket
from typing import Any

import treq
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from llamaswap.events import Activity
from llamaswap.guard import Checked
from llamaswap.relay import Hop, Relay, end_to_end, plain_reason
from llamaswap.testing.fake_server import FakeLlamaServer

from .daemon import free_port
from .helpers import World, next_request, world
from .integration import LiveTestCase

CONFIG = """
models:
  a:
    cmd: sleep --port ${PORT} --model a
    useModelName: upstream-name
"""


class HeaderTests(SynchronousTestCase):
    def test_hop_by_hop_and_connection_named_headers_are_dropped(self) -> None:
        headers = Headers(
            {
                "Connection": ["keep-alive, X-Trace-Hop"],
                "Keep-Alive": ["timeout=5"],
                "Transfer-Encoding": ["chunked"],
                "TE": ["trailers"],
                "Upgrade": ["h2c"],
                "Proxy-Authorization": ["Basic eA=="],
                "X-Trace-Hop": ["1"],
                "Authorization": ["Bearer sk-1"],
                "Content-Type": ["application/json"],
            }
        )
        kept = {name.decode().lower() for name, _ in end_to_end(headers).getAllRawHeaders()}
        self.assertEqual(kept, {"authorization", "content-type"})


@implementer(IAgent)
class StaleFirst:
    """An agent whose first requests die after sending: the server closed without answering."""

    def __init__(self, real: IAgent, failures: int = 1) -> None:
        self.real = real
        self.failures = failures
        self.calls = 0

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        self.calls += 1
        if self.calls <= self.failures:
            return fail(ResponseNeverReceived([Failure(ConnectionDone())]))
        return self.real.request(method, uri, headers, bodyProducer)


class InMemoryProxy(SynchronousTestCase):
    def setUp(self) -> None:
        self.w: World = world(CONFIG)
        self.server = FakeLlamaServer(clock=self.w.reactor, model="a", token_delay=1.0, tokens=3)
        self.server.start()
        self.upstream = RequestTraversalAgent(self.server.resource())
        self.agent = StaleFirst(self.upstream, failures=0)
        self.relay = Relay(self.agent)
        api = self.w.api(self.relay)
        self.client: Any = StubTreq(Checked(api.resource(), [self.relay.hop.check]))
        self.addCleanup(self.server.stop)

    def flush(self) -> None:
        self.client.flush()
        self.upstream.flush()
        self.client.flush()

    def post(self, path: str, document: dict[str, Any], **kwargs: Any) -> Any:
        d = self.client.post(
            "http://llamaswap" + path,
            json.dumps(document).encode(),
            headers={"content-type": "application/json", **kwargs.pop("headers", {})},
            **kwargs,
        )
        self.flush()
        self.w.make_ready("a")
        self.flush()
        return d

    def test_request_headers_and_rewritten_body_reach_the_model(self) -> None:
        d = self.post(
            "/v1/responses",
            {"model": "a", "input": "x"},
            headers={
                "connection": "x-secret-hop",
                "x-secret-hop": "1",
                "x-end": "kept",
                "expect": "100-continue",
            },
        )
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        body = self.successResultOf(treq.json_content(response))
        self.assertEqual(body["model"], "upstream-name")
        sent = json.dumps({"model": "upstream-name", "input": "x"}).encode()
        self.assertEqual(body["body_length"], len(sent))
        received = {k.lower() for k in body["headers"]}
        self.assertIn("x-end", received)
        self.assertNotIn("x-secret-hop", received)
        self.assertNotIn("expect", received)  # the body is here: nothing to confirm
        self.assertEqual(response.headers.getRawHeaders("x-fake-served-by"), ["a"])

    def test_stream_chunks_are_relayed_as_the_model_writes_them(self) -> None:
        d = self.post("/v1/chat/completions", {"model": "a", "stream": True, "messages": []})
        response = self.successResultOf(d)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        self.flush()
        seen = len(chunks)
        self.assertGreater(seen, 0)
        self.assertNoResult(done)
        for _ in range(4):
            self.w.reactor.advance(1.0)
            self.flush()
            self.assertGreater(len(chunks), seen)  # one more token arrived, stream still open
            seen = len(chunks)
        self.successResultOf(done)
        self.assertIn(b"data: [DONE]", b"".join(chunks))
        self.assertEqual(self.w.scheduler.in_flight("a"), 0)

    def test_a_post_the_server_may_have_received_is_not_sent_again(self) -> None:
        self.agent.failures = 1
        response = self.successResultOf(self.post("/v1/responses", {"model": "a", "input": "x"}))
        self.assertEqual(response.code, 502)
        self.assertEqual(self.agent.calls, 1)
        error = json.loads(self.successResultOf(treq.content(response)))["error"]
        self.assertIn("closed the connection while handling the request", error["message"])
        self.assertIn("not retried", error["message"])
        self.assertEqual(error["type"], "server_error")
        self.assertEqual(self.w.scheduler.in_flight("a"), 0)

    def test_relayed_requests_carry_this_llamaswaps_via_mark(self) -> None:
        d = self.post("/v1/responses", {"model": "a", "input": "x"}, headers={"via": "1.1 edge"})
        body = self.successResultOf(treq.json_content(self.successResultOf(d)))
        via = {k.lower(): v for k, v in body["headers"].items()}["via"]
        self.assertEqual(via, f"1.1 edge, 1.1 {self.relay.hop.name.decode()}")

    def test_an_upstream_error_status_and_body_are_relayed_untouched(self) -> None:
        d = self.post("/v1/chat/completions", {"model": "a", "fake": {"status": 500}})
        response = self.successResultOf(d)
        self.assertEqual(response.code, 500)
        body = self.successResultOf(treq.content(response))
        self.assertEqual(
            json.loads(body),
            {"error": {"message": "fake upstream error", "type": "fake", "code": 500}},
        )

    def test_a_request_bearing_this_llamaswaps_own_mark_is_refused_at_once(self) -> None:
        via = {"via": "1.1 " + self.relay.hop.name.decode()}
        response = self.successResultOf(
            self.client.post(
                "http://llamaswap/v1/chat/completions",
                json.dumps({"model": "a", "messages": []}).encode(),
                headers={"content-type": "application/json", **via},
            )
        )
        self.assertEqual((response.code, response.phrase), (508, b"Loop Detected"))
        error = json.loads(self.successResultOf(treq.content(response)))["error"]
        self.assertEqual(error["code"], "loop_detected")
        self.assertIn("proxy URL leads to llamaswap itself", error["message"])
        self.assertEqual(self.w.spawned_models(), [])  # nothing started for it
        health = self.successResultOf(self.client.get("http://llamaswap/health", headers=via))
        self.assertEqual(health.code, 508)  # so a health probe cannot take it for a child's

    def test_another_llamaswaps_mark_passes(self) -> None:
        other = Hop()
        headers = {"via": "1.1 " + other.name.decode()}
        d = self.post("/v1/responses", {"model": "a", "input": "x"}, headers=headers)
        self.assertEqual(self.successResultOf(d).code, 200)


class RawUpstream(Protocol):
    """HTTP/1.1 in raw bytes, so a test says what happens after each request is read."""

    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while (found := next_request(self.buffer)) is not None:
            request, self.buffer = found
            self.server.requests.append(request.split(b"\r\n")[0])
            action = self.server.actions.pop(0) if self.server.actions else "answer"
            assert self.transport is not None
            if action == "drop":  # read it all, then close without a word
                self.transport.loseConnection()
                return
            if action == "garbage":  # an answer that is not HTTP
                self.transport.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
                self.transport.loseConnection()
                return
            body = b'{"ok": true}'
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s"
                % (len(body), b"" if request.startswith(b"HEAD ") else body)
            )
            if action == "answer_and_close":  # as a keep-alive timeout would, later
                self.transport.loseConnection()
                return


class RawServer(ServerFactory):
    def __init__(self, *actions: str) -> None:
        self.actions = list(actions)
        self.requests: list[bytes] = []
        self.connections = 0

    def buildProtocol(self, addr: IAddress | None) -> RawUpstream:
        self.connections += 1
        return RawUpstream(self)


class LiveRelayTests(LiveTestCase):
    """Real sockets: llamaswap between a real client and a scripted upstream."""

    async def upstream(self, *actions: str) -> RawServer:
        server = RawServer(*actions)
        await self.serve_in_front_of(server)
        return server

    async def test_a_post_the_server_read_then_dropped_is_not_sent_again(self) -> None:
        server = await self.upstream("drop")
        reply = await self.chat("m")
        self.assertEqual(reply.code, 502)
        self.assertEqual(len(server.requests), 1)  # the generation did not run twice
        message = reply.json()["error"]["message"]
        self.assertIn("closed the connection while handling the request", message)
        self.assertIn("not retried", message)
        self.assertEqual(self.api.scheduler.in_flight("m"), 0)

    async def test_an_answer_that_is_not_http_is_named_in_plain_words(self) -> None:
        await self.upstream("garbage")
        reply = await self.chat("m")
        self.assertEqual(reply.code, 502)
        message = reply.json()["error"]["message"]
        self.assertIn("BadResponse: not an HTTP/1.x status line: SSH-2.0-OpenSSH_9.6", message)
        self.assertNotIn("twisted", message)  # not Twisted's reprs of its private classes
        self.assertNotIn("Failure", message)

    def test_what_a_server_sent_is_named_without_its_control_characters(self) -> None:
        sent = ValueError("wrong number of parts", b"SSH\r\n2026-12-01 [-] forged\x1b[2J")
        reason = plain_reason(Failure(ResponseNeverReceived([Failure(sent)])))
        self.assertEqual(
            reason, "ValueError: wrong number of parts: SSH\\r\\n2026-12-01 [-] forged\\x1b[2J"
        )

    async def test_nor_on_a_pooled_connection(self) -> None:
        server = await self.upstream("answer", "drop")
        self.assertEqual((await self.chat("m")).code, 200)
        self.assertEqual((await self.chat("m")).code, 502)  # the keep-alive race, for a POST
        self.assertEqual(server.requests, [b"POST /v1/chat/completions HTTP/1.1"] * 2)
        self.assertEqual(server.connections, 1)

    async def test_a_pooled_connection_closed_before_use_is_skipped(self) -> None:
        server = await self.upstream("answer_and_close", "answer")
        self.assertEqual((await self.chat("m")).code, 200)
        self.assertEqual((await self.chat("m")).code, 200)
        self.assertEqual(len(server.requests), 2)  # sent once, on a fresh connection
        self.assertEqual(server.connections, 2)

    async def test_a_bodiless_get_on_a_stale_pooled_connection_is_sent_once_more(self) -> None:
        server = await self.upstream("answer", "drop", "answer")
        self.assertEqual((await self.request("GET", "/upstream/m/props")).code, 200)
        self.assertEqual((await self.request("GET", "/upstream/m/props")).code, 200)
        self.assertEqual(server.requests, [b"GET /props HTTP/1.1"] * 3)  # idempotent: safe
        self.assertEqual(server.connections, 2)

    async def test_a_head_answer_keeps_the_length_the_server_gave(self) -> None:
        await self.upstream("answer")
        reply = await self.request("HEAD", "/upstream/m/props")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.headers.getRawHeaders(b"content-length"), [b"12"])

    async def test_the_client_has_the_whole_answer_before_its_bookkeeping(self) -> None:
        """The answer leaves as it is relayed: the request's record, metrics and
        events, done in the same reactor turn, do not hold its last bytes back."""
        await self.upstream("answer")
        host, port = self.base.removeprefix("http://").split(":")
        client = socket.create_connection((host, int(port)))
        self.addCleanup(client.close)
        client.setblocking(False)
        had: list[bytes] = []

        def finished(_: object) -> None:
            try:
                had.append(client.recv(65536))
            except BlockingIOError:
                had.append(b"")

        self.api.events.subscribe(finished, [Activity])
        body = b'{"model": "m", "messages": []}'
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (self.base.removeprefix("http://").encode(), len(body), body)
        )
        while not had:
            await deferLater(reactor, 0.01)
        self.assertTrue(had[0].startswith(b"HTTP/1.1 200 OK\r\n"), had[0])
        self.assertTrue(had[0].endswith(b'\r\n\r\n{"ok": true}'), had[0])

    async def test_a_proxy_leading_back_to_llamaswap_stops_after_one_hop(self) -> None:
        # build() takes the config as given: like a host name alias, a path the
        # load-time check (refuse_self_proxy) cannot see
        port = free_port()
        await self.serve(
            f"models:\n  self:\n    cmd: sleep 60\n    proxy: http://127.0.0.1:{port}\n"
            "    checkEndpoint: none\n",
            listen_port=port,
        )
        reply = await self.chat("self")
        self.assertEqual(reply.code, 508)
        self.assertEqual(reply.json()["error"]["code"], "loop_detected")
        self.assertEqual(self.api.relay.hop.refused, 1)  # it came back once and went no further
        self.assertEqual(self.api.scheduler.in_flight("self"), 0)

    async def test_llamaswaps_own_health_answer_does_not_make_a_child_ready(self) -> None:
        port = free_port()
        await self.serve(
            # far beyond the test's timeout: the start must fail at the first 508
            "healthCheckTimeout: 300\n"
            f"models:\n  self:\n    cmd: sleep 60\n    proxy: http://127.0.0.1:{port}\n",
            listen_port=port,
        )
        reply = await self.chat("self")
        self.assertEqual(reply.code, 503)
        message = reply.json()["error"]["message"]
        self.assertIn("answered 508 Loop Detected", message)
        self.assertIn("leads back to llamaswap itself", message)
        self.assertGreater(self.api.relay.hop.refused, 0)  # the probes came back and were refused
