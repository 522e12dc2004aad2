"""The proxy in memory: StubTreq in front, the fake llama-server resource behind."""

from __future__ import annotations

import json
from typing import Any

import treq
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from llamaswap.api import Api
from llamaswap.relay import Relay, end_to_end
from llamaswap.testing.fake_server import FakeLlamaServer

from .helpers import World, world

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
    """An agent whose first request dies on a connection the server had closed."""

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
        api = Api(self.w.config, self.w.scheduler, Relay(self.agent), self.w.logs, self.w.reactor)
        self.client: Any = StubTreq(api.resource())
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
            headers={"connection": "x-secret-hop", "x-secret-hop": "1", "x-end": "kept"},
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

    def test_a_request_lost_on_a_stale_pooled_connection_is_sent_once_more(self) -> None:
        self.agent.failures = 1
        response = self.successResultOf(self.post("/v1/responses", {"model": "a", "input": "x"}))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.agent.calls, 2)

    def test_only_once(self) -> None:
        self.agent.failures = 2
        response = self.successResultOf(self.post("/v1/responses", {"model": "a", "input": "x"}))
        self.assertEqual(response.code, 502)
        self.assertEqual(self.agent.calls, 2)

    def test_an_upstream_error_status_and_body_are_relayed_untouched(self) -> None:
        d = self.post("/v1/chat/completions", {"model": "a", "fake": {"status": 500}})
        response = self.successResultOf(d)
        self.assertEqual(response.code, 500)
        body = self.successResultOf(treq.content(response))
        self.assertEqual(
            json.loads(body),
            {"error": {"message": "fake upstream error", "type": "fake", "code": 500}},
        )
