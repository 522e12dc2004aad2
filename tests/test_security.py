"""The door (API keys and header checks before any body), credential hygiene,
request-size limits, bad input and the exposure warning."""

from __future__ import annotations

import base64
import json
from io import BytesIO
from typing import Any, ClassVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from llamaswap.access import Access, ApiKey
from llamaswap.config import ConfigError, parse_config
from llamaswap.errors import ApiError
from llamaswap.guard import ApiSite, Guard, LimitedRequest
from llamaswap.logs import logger
from llamaswap.tap import _loopback_only, build

from .integration import FAKE, LiveTestCase

KEY = b"sk-first"


def form_bomb(parts: int, model: bytes | None = None) -> bytes:
    """A multipart body of ``parts`` tiny fields (then ``model``, if given)."""
    field = b'--xx\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n'
    tail = b""
    if model is not None:
        tail = b'--xx\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + model + b"\r\n"
    return field * parts + tail + b"--xx--\r\n"


def head(method: bytes, target: bytes, length: int | None = None, *extra: bytes) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: localhost", *extra]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Recorded(LimitedRequest):
    """A LimitedRequest that the test can look at after it has been answered."""

    made: ClassVar[list[Recorded]] = []
    stored_in: object = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.made.append(self)

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        self.stored_in = self.content  # (Twisted drops it once the request is done)


class Rendered(Resource):
    """The application stand-in: says which requests reached it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[bytes] = []

    def render(self, request: Request) -> bytes:
        self.paths.append(request.path)
        return b"ok"


class DoorTests(SynchronousTestCase):
    """Raw HTTP bytes into llamaswap's own site, over an in-memory transport."""

    def setUp(self) -> None:
        Recorded.made = []
        self.app = Rendered()
        self.guard = Guard(self.app, Access((ApiKey("first", KEY.decode()),), Clock()))
        self.site = ApiSite(self.guard, 1_000_000, checks=[self.guard.check])
        self.site.requestFactory = Recorded

    def connect(self) -> tuple[Any, StringTransport]:
        """A server channel, and its transport (``disconnecting``: the server hung up)."""
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, Failure(ConnectionError()))
        return channel, transport

    def send(self, data: bytes) -> StringTransport:
        channel, transport = self.connect()
        channel.dataReceived(data)
        return transport

    def test_an_unauthenticated_form_bomb_is_refused_unread(self) -> None:
        bomb = form_bomb(50_000)
        content_type = b"Content-Type: multipart/form-data; boundary=xx"
        # the headers and the first 64 kB arrive together, as they would off a socket
        start = head(b"POST", b"/v1/audio/transcriptions", len(bomb), content_type)
        transport = self.send(start + bomb[:65536])
        reply = transport.value()
        self.assertTrue(reply.startswith(b"HTTP/1.1 401 "), reply[:100])
        self.assertIn(b'"invalid_api_key"', reply)
        self.assertIn(b"Connection: close", reply)
        self.assertTrue(transport.disconnecting)
        [request] = Recorded.made
        self.assertEqual(request.received, 0)  # no body byte was handled
        # nothing was stored: no spool file was made (only an in-memory buffer)
        self.assertIsInstance(request.stored_in, BytesIO)
        self.assertEqual(self.app.paths, [])

    def test_a_client_that_expects_100_continue_gets_the_401_instead(self) -> None:
        start = head(b"POST", b"/v1/chat/completions", 5_000_000, b"Expect: 100-continue")
        reply = self.send(start).value()
        self.assertNotIn(b"100 Continue", reply)
        self.assertTrue(reply.startswith(b"HTTP/1.1 401 "), reply[:100])

    def test_a_keyed_request_and_the_open_pages_pass_the_door(self) -> None:
        body = b'{"model": "a"}'
        keyed = head(b"POST", b"/v1/chat/completions", len(body), b"x-api-key: " + KEY)
        self.assertIn(b"200 OK", self.send(keyed + body).value())
        self.assertIn(b"200 OK", self.send(head(b"GET", b"/health")).value())
        self.assertIn(b"200 OK", self.send(head(b"GET", b"/ui/app.js")).value())
        # open pages are open to reading only
        refused = self.send(head(b"POST", b"/health", 4) + b"data").value()
        self.assertIn(b"401 ", refused)
        self.assertEqual(self.app.paths, [b"/v1/chat/completions", b"/health", b"/ui/app.js"])

    def test_plugged_header_checks_run_in_order_before_the_body(self) -> None:
        seen: list[tuple[bytes, bytes, bytes | None]] = []

        def no_foreign_origin(request: Request) -> ApiError | None:
            seen.append((request.method, request.path, request.getHeader(b"origin")))
            if request.getHeader(b"origin") == b"http://evil.example":
                return ApiError(403, "cross-site request refused", "forbidden_origin")
            return None

        self.site.checks = [no_foreign_origin, self.guard.check]
        origin = b"Origin: http://evil.example"
        keyed = b"Authorization: Bearer " + KEY
        transport = self.send(head(b"POST", b"/v1/embeddings?x=1", 10_000, origin, keyed))
        self.assertIn(b"403 ", transport.value())
        self.assertIn(b'"forbidden_origin"', transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(seen, [(b"POST", b"/v1/embeddings", b"http://evil.example")])
        # the first refusal wins: a check after the key check sees only keyed requests
        self.site.checks = [self.guard.check, no_foreign_origin]
        self.assertIn(b"401 ", self.send(head(b"POST", b"/v1/embeddings", 10, origin)).value())
        self.assertEqual(len(seen), 1)
        self.assertEqual(Recorded.made[-1].received, 0)

    def test_a_declared_oversize_body_is_413_unread_and_the_connection_closes(self) -> None:
        keyed = b"x-api-key: " + KEY
        transport = self.send(head(b"POST", b"/v1/completions", 2_000_000, keyed) + b"x" * 4096)
        reply = transport.value()
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply[:100])
        self.assertIn(b"Connection: close", reply)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(Recorded.made[-1].received, 0)

    def test_a_chunked_body_past_the_limit_is_413_and_the_connection_closes(self) -> None:
        self.site.max_request_bytes = 1000
        channel, transport = self.connect()
        start = head(b"POST", b"/v1/completions", None, b"x-api-key: " + KEY)
        channel.dataReceived(start[:-2] + b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):
            channel.dataReceived(b"400\r\n" + b"x" * 0x400 + b"\r\n")
        channel.dataReceived(b"0\r\n\r\n")
        reply = transport.value()
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply[:100])
        self.assertIn(b"Connection: close", reply)
        self.assertTrue(transport.disconnecting)  # as it says
        self.assertEqual(self.app.paths, [])

    def test_an_oversize_uri_is_414_and_its_log_lines_stay_short(self) -> None:
        target = b"/health?" + b"x" * 9000
        with capturedLogs() as events:
            reply = self.send(head(b"GET", target)).value()
            self.send(head(b"HEAD", b"/v1/models?" + b"y" * 9000))
            self.send(head(b"HEAD", b"/v1/models?" + b"y" * 8000))  # 401, HEAD: no body
        self.assertTrue(reply.startswith(b"HTTP/1.1 414 "), reply[:100])
        self.assertIn(b'"uri_too_long"', reply)
        self.assertEqual(self.app.paths, [])
        self.assertEqual([e for e in events if len(repr(e)) > 2000], [])
        self.assertLess(len(repr(Recorded.made[0])), 300)

    def test_a_head_refused_by_the_guard_alone_logs_no_body_warning(self) -> None:
        # a Guard reached without the door (no checks on the site) still refuses,
        # and answers HEAD without a body Twisted would complain about in the log
        self.site.checks = []
        with capturedLogs() as events:
            reply = self.send(head(b"HEAD", b"/v1/models?" + b"y" * 8000)).value()
        self.assertTrue(reply.startswith(b"HTTP/1.1 401 "), reply[:100])
        self.assertNotIn(b'"error"', reply)
        self.assertEqual([e["log_format"] for e in events], [])


KEYED = f"""
apiKeys: [sk-first, sk-second]
models:
  alpha:
    cmd: {FAKE}
  trusting:
    cmd: {FAKE}
    forwardAuthorization: true
"""


class ApiKeyTests(LiveTestCase):
    async def test_every_endpoint_but_health_and_ui_assets_needs_a_key(self) -> None:
        await self.serve(KEYED)
        for path in ("/v1/models", "/running", "/metrics", "/logs", "/api/activity"):
            reply = await self.request("GET", path)
            self.assertEqual(reply.code, 401, path)
            self.assertEqual(reply.header("www-authenticate"), 'Bearer realm="llamaswap"')
            self.assertEqual(reply.json()["error"]["code"], "invalid_api_key")
        refused = await self.chat("alpha")
        self.assertEqual(refused.code, 401)
        self.assertEqual(await self.running_with("sk-first"), {})  # nothing was started
        self.assertEqual((await self.request("GET", "/health")).code, 200)
        self.assertEqual((await self.request("GET", "/ui/")).code, 200)

    async def running_with(self, key: str) -> dict[str, object]:
        reply = await self.request("GET", "/running", headers={"authorization": f"Bearer {key}"})
        return {r["model"]: r for r in reply.json()["running"]}

    async def test_bearer_basic_and_x_api_key_are_accepted(self) -> None:
        await self.serve(KEYED)
        basic = base64.b64encode(b"anyone:sk-second").decode()
        for headers in (
            {"authorization": "Bearer sk-first"},
            {"authorization": f"Basic {basic}"},
            {"x-api-key": "sk-second"},
        ):
            reply = await self.request("GET", "/v1/models", headers=headers)
            self.assertEqual(reply.code, 200, headers)
        for headers in (
            {"authorization": "Bearer sk-firs"},
            {"authorization": "Bearer sk-first-and-more"},
            {"authorization": "Basic !!!"},
            {"x-api-key": ""},
        ):
            reply = await self.request("GET", "/v1/models", headers=headers)
            self.assertEqual(reply.code, 401, headers)

    async def test_client_keys_reach_a_model_only_when_configured_and_never_the_logs(
        self,
    ) -> None:
        await self.serve(KEYED)
        auth = {"authorization": "Bearer sk-first", "content-type": "application/json"}
        body = json.dumps({"model": "alpha", "input": "x"}).encode()
        echo = (await self.request("POST", "/v1/responses", body, auth)).json()
        self.assertNotIn("authorization", echo["headers"])
        body = json.dumps({"model": "trusting", "input": "x"}).encode()
        echo = (await self.request("POST", "/v1/responses", body, auth)).json()
        self.assertEqual(echo["headers"]["authorization"], "Bearer sk-first")
        logs = (await self.request("GET", "/logs", headers=auth)).body.decode()
        self.assertNotIn("sk-first", logs)

    async def test_a_child_key_on_its_command_line_stays_out_of_the_logs(self) -> None:
        child = "sk-child-9z9z"
        await self.serve(
            "apiKeys: [sk-first]\nmodels:\n"
            f"  m:\n    cmd: {FAKE} --api-key {child}\n    upstreamApiKey: {child}\n"
            f"  n:\n    cmd: {FAKE} --api-key={child}\n    upstreamApiKey: {child}\n"
        )
        auth = {"authorization": "Bearer sk-first", "content-type": "application/json"}
        for model in ("m", "n"):
            body = json.dumps({"model": model, "input": "x"}).encode()
            reply = await self.request("POST", "/v1/responses", body, auth)
            self.assertEqual(reply.code, 200)  # the child got its key
        logs = (await self.request("GET", "/logs", headers=auth)).body.decode()
        self.assertIn("--api-key ***", logs)
        self.assertIn("--api-key=***", logs)
        self.assertNotIn(child, logs)


class LimitTests(LiveTestCase):
    async def test_an_oversized_body_is_413_and_nothing_starts(self) -> None:
        await self.serve(f"maxRequestBytes: 1000\nmodels:\n  alpha:\n    cmd: {FAKE}\n")
        big = json.dumps({"model": "alpha", "prompt": "x" * 5000}).encode()
        reply = await self.request(
            "POST", "/v1/completions", big, {"content-type": "application/json"}
        )
        self.assertEqual(reply.code, 413)
        self.assertEqual(reply.json()["error"]["code"], "request_too_large")
        self.assertEqual(await self.running(), {})
        small = await self.post("/v1/completions", {"model": "alpha", "prompt": "x"})
        self.assertEqual(small.code, 200)

    async def test_bad_bodies_are_400_and_leave_no_lease(self) -> None:
        await self.serve(f"models:\n  alpha:\n    cmd: {FAKE}\n")
        json_type = {"content-type": "application/json"}
        for body in (b"\xff\xfe{", b'{"model": "alpha"', b"null", b'"alpha"', b'{"model": ["a"]}'):
            reply = await self.request("POST", "/v1/chat/completions", body, json_type)
            self.assertEqual(reply.code, 400, body)
            self.assertEqual(set(reply.json()["error"]), {"message", "type", "code"})
        reply = await self.request(
            "POST", "/v1/chat/completions", b"<model>alpha</model>", {"content-type": "text/xml"}
        )
        self.assertEqual(reply.code, 415)
        self.assertEqual(self.api.scheduler.in_flight("alpha"), 0)
        self.assertEqual(self.api.scheduler.queued(), 0)


class RawClient(Protocol):
    """One HTTP/1.1 connection driven by raw bytes; ``closed`` fires when the server
    ends it."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()
        self.waiting: list[tuple[bytes, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for marker, d in list(self.waiting):
            if marker in self.data:
                self.waiting.remove((marker, d))
                d.callback(None)

    def until(self, marker: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if marker in self.data:
            d.callback(None)
        else:
            self.waiting.append((marker, d))
        return d

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.closed.callback(self.data)


class _Connect(ClientFactory):
    def __init__(self, client: RawClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> RawClient:
        return self.client


class DoorLiveTests(LiveTestCase):
    """The door and the bounds over real sockets, in front of the real application."""

    async def connect(self) -> RawClient:
        client = RawClient()
        port = int(self.base.rsplit(":", 1)[1])
        connected: Deferred[None] = Deferred()
        client.connectionMade = lambda: connected.callback(None)  # type: ignore[method-assign]
        reactor.connectTCP("127.0.0.1", port, _Connect(client))
        await connected
        self.addCleanup(client.transport.loseConnection)  # type: ignore[union-attr]
        return client

    async def test_health_is_served_while_a_keyed_form_bomb_arrives_and_the_bomb_is_bounded(
        self,
    ) -> None:
        await self.serve(KEYED)
        bomb = form_bomb(400_000, model=b"alpha")  # 22 MB; old parser: 90 s on the reactor
        content_type = b"Content-Type: multipart/form-data; boundary=xx"
        auth = b"Authorization: Bearer " + KEY
        client = await self.connect()
        client.transport.write(  # type: ignore[union-attr]
            head(b"POST", b"/v1/audio/transcriptions", len(bomb), content_type, auth)
        )
        order = []
        piece = len(bomb) // 8
        for start in range(0, len(bomb), piece):
            client.transport.write(bomb[start : start + piece])  # type: ignore[union-attr]
            health = await self.request("GET", "/health")
            self.assertEqual(health.code, 200)
            order.append("health")
        await client.until(b"}}")
        order.append("bomb answered")
        self.assertEqual(order, ["health"] * 9 + ["bomb answered"])
        self.assertIn(b"HTTP/1.1 400 ", client.data)
        self.assertIn(b"more than 1000 parts", client.data)
        self.assertEqual(await self.running_with_key(), {})  # nothing was started

    async def running_with_key(self) -> dict[str, Any]:
        reply = await self.request("GET", "/running", headers={"x-api-key": KEY.decode()})
        return {entry["model"]: entry for entry in reply.json()["running"]}

    async def test_a_keyed_form_names_its_model_after_a_big_file_part(self) -> None:
        await self.serve(KEYED)
        audio = bytes(range(256)) * 8192  # 2 MB of binary, CRLFs and all
        body = (
            b'--xx\r\nContent-Disposition: form-data; name="file"; filename="model"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n" + form_bomb(3, b"alpha")
        )
        headers = {
            "authorization": "Bearer sk-first",
            "content-type": "multipart/form-data; boundary=xx",
        }
        reply = await self.request("POST", "/v1/audio/transcriptions", body, headers)
        self.assertEqual(reply.code, 200, reply.body[:300])
        self.assertIn("alpha", await self.running_with_key())

    async def test_a_413_closes_the_connection(self) -> None:
        await self.serve(f"maxRequestBytes: 1000\nmodels:\n  alpha:\n    cmd: {FAKE}\n")
        client = await self.connect()
        body = json.dumps({"model": "alpha", "prompt": "x" * 5000}).encode()
        client.transport.write(  # type: ignore[union-attr]
            head(b"POST", b"/v1/completions", len(body)) + body
        )
        data = await client.closed  # the server hangs up after the answer
        self.assertTrue(data.startswith(b"HTTP/1.1 413 "), data[:100])
        self.assertIn(b"Connection: close", data)

    async def test_heads_past_twisted_s_bounds_get_a_clear_error(self) -> None:
        """A request line or header line over 16 kB (Twisted hung up without a word),
        a head over 16 kB in all or with over 500 headers (a bare 400): an
        OpenAI-shaped 414 or 431, and the connection closed; a model is never started."""
        await self.serve(f"models:\n  alpha:\n    cmd: {FAKE}\n")
        body = json.dumps({"model": "alpha", "messages": []}).encode()
        many = [b"X-%d: v" % number for number in range(600)]
        cases = {
            head(b"GET", b"/v1/models?" + b"q" * 20_000): (414, b"request line is longer"),
            head(b"GET", b"/v1/models", None, b"X-Big: " + b"v" * 20_000): (
                431,
                b"header line is longer",
            ),
            head(b"POST", b"/v1/chat/completions", len(body), *[b"X-A: " + b"v" * 8000] * 3)
            + body: (431, b"head is longer than 16384"),
            head(b"POST", b"/v1/chat/completions", len(body), *many) + body: (
                431,
                b"more than 500 headers",
            ),
        }
        for request, (status, words) in cases.items():
            client = await self.connect()
            client.transport.write(request)  # type: ignore[union-attr]
            data = await client.closed
            self.assertTrue(data.startswith(b"HTTP/1.1 %d " % status), data[:200])
            answer = json.loads(data.partition(b"\r\n\r\n")[2])
            self.assertIn(words.decode(), answer["error"]["message"])
        # the bounds are per request: 30 heads of 10 kB and 20 headers each, on one
        # connection, are all served
        headers = [b"X-%d: " % number + b"v" * 500 for number in range(20)]
        keep = await self.connect()
        pipelined = head(b"GET", b"/health", None, *headers) * 29
        pipelined += head(b"GET", b"/health", None, b"Connection: close", *headers)
        keep.transport.write(pipelined)  # type: ignore[union-attr]
        data = await keep.closed
        self.assertEqual(data.count(b"HTTP/1.1 200 OK"), 30, data[:300])
        self.assertEqual(await self.running(), {})

    async def test_a_body_s_end_is_read_one_way_only(self) -> None:
        """A ``Transfer-Encoding`` other than one ``chunked``: 400 and closed, its body
        unread.  Twisted read ``chunked`` then ``identity`` as chunked, and a lone
        ``identity`` as no body at all: what a proxy in front sent as a body was
        served as a request of its own."""
        await self.serve(f"models:\n  alpha:\n    cmd: {FAKE}\n")
        smuggled = head(b"GET", b"/v1/models")
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
        post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        for codings in (
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: identity\r\n",
        ):
            client = await self.connect()
            client.transport.write(post + codings + b"\r\n" + chunked)  # type: ignore[union-attr]
            data = await client.closed
            self.assertTrue(data.startswith(b"HTTP/1.1 400 "), (codings, data[:200]))
            self.assertIn(b"Transfer-Encoding may only be one 'chunked'", data)
            self.assertEqual(data.count(b"HTTP/1.1 "), 1, data)  # nothing else was served
        # one chunked body is fine, in any case
        body = json.dumps({"model": "alpha", "messages": []}).encode()
        client = await self.connect()
        client.transport.write(  # type: ignore[union-attr]
            post
            + b"Transfer-Encoding: Chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
        data = await client.closed
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data[:300])

    async def test_unauthenticated_heads_with_long_uris_leave_the_log_alone(self) -> None:
        await self.serve(KEYED)
        logger("llamaswap.test").info("an earlier line worth keeping")
        codes = set()
        for number in range(20):
            path = "/health" if number % 2 else "/v1/models"
            for length in (16_000, 8_000):
                codes.add((await self.request("HEAD", f"{path}?{'q' * length}")).code)
        logs = await self.request("GET", "/logs", headers={"x-api-key": KEY.decode()})
        self.assertIn("an earlier line worth keeping", logs.body.decode())
        self.assertNotIn("q" * 300, logs.body.decode())
        self.assertEqual(codes, {200, 401, 414})

    async def test_unauthenticated_heads_of_missing_ui_files_leave_the_log_alone(self) -> None:
        # /ui/ is open to anyone; a missing file is a 404 page, which Twisted logs a
        # ~400-byte "HEAD request ... returning a message body" line for: 300 such
        # requests (about 1 s) wiped every real line from /logs
        await self.serve(KEYED)
        logger("llamaswap.test").info("an earlier line worth keeping")
        for _ in range(300):
            reply = await self.request("HEAD", f"/ui/{'q' * 8000}")
            self.assertEqual(reply.code, 404)
        logs = await self.request("GET", "/logs", headers={"x-api-key": KEY.decode()})
        self.assertIn("an earlier line worth keeping", logs.body.decode())
        self.assertNotIn("q" * 100, logs.body.decode())


class BadInputTests(LiveTestCase):
    async def test_deeply_nested_json_is_400(self) -> None:
        await self.serve(f"models:\n  alpha:\n    cmd: {FAKE}\n")
        json_type = {"content-type": "application/json"}
        for depth in (1_000, 100_000):
            nested = b'{"model": "alpha", "x": ' + b"[" * depth + b"]" * depth + b"}"
            reply = await self.request("POST", "/v1/chat/completions", nested, json_type)
            self.assertEqual(reply.code, 400, reply.body[:300])
            self.assertIn("nested too deeply", reply.json()["error"]["message"])
        self.assertEqual(await self.running(), {})

    async def test_odd_query_numbers_are_400_on_every_numeric_parameter(self) -> None:
        await self.serve(f"models:\n  alpha:\n    cmd: {FAKE}\n")
        cases = {
            "/api/activity": ("limit", "offset", "since", "until"),
            "/api/activity/stats": ("since", "until"),
        }
        for path, names in cases.items():
            for name in names:
                for value in ("nan", "inf", "-inf", "-5", "1e400", "NaN", "x"):
                    reply = await self.request("GET", f"{path}?{name}={value}")
                    self.assertEqual(reply.code, 400, (path, name, value, reply.body))
                    self.assertIn(f"?{name}=", reply.json()["error"]["message"])
        for query in ("limit=0", "limit=1001", "limit=2.5", "offset=1e300", "offset=0.5"):
            reply = await self.request("GET", f"/api/activity?{query}")
            self.assertEqual(reply.code, 400, (query, reply.body))
        reply = await self.request("GET", "/api/activity?limit=1000&offset=3&since=0&until=1e12")
        self.assertEqual(reply.code, 200, reply.body)

    async def test_a_non_finite_deadline_is_400(self) -> None:
        await self.serve(f"models:\n  alpha:\n    cmd: {FAKE}\n")
        body = json.dumps({"model": "alpha", "prompt": "x"}).encode()
        for value in ("inf", "nan", "1e400", "-1"):
            headers = {"content-type": "application/json", "x-request-deadline": value}
            reply = await self.request("POST", "/v1/completions", body, headers)
            self.assertEqual(reply.code, 400, value)
        self.assertEqual(await self.running(), {})


class ConfigAndExposureTests(SynchronousTestCase):
    def test_keys_must_be_usable_and_are_never_echoed(self) -> None:
        error = self.assertRaises(
            ConfigError,
            parse_config,
            "apiKeys: ['has space']\nmodels:\n  m:\n    cmd: s --port ${PORT}\n",
        )
        self.assertIn("apiKeys[0]", str(error))
        self.assertNotIn("has space", str(error))
        config = parse_config(
            "apiKeys: ['${env.KEY}']\nmodels:\n  m:\n    cmd: s --port ${PORT}\n",
            environ={"KEY": "from-env"},
        )
        self.assertEqual([k.key for k in config.api_keys], ["from-env"])

    def test_loopback_detection(self) -> None:
        self.assertTrue(_loopback_only("tcp:8080:interface=127.0.0.1"))
        self.assertTrue(_loopback_only("tcp6:8080:interface=\\:\\:1"))
        self.assertTrue(_loopback_only("unix:/run/llamaswap.sock"))
        self.assertFalse(_loopback_only("tcp:8080"))
        self.assertFalse(_loopback_only("tcp:8080:interface=0.0.0.0"))
        self.assertFalse(_loopback_only("tcp:8080:interface=192.168.1.5"))

    def test_a_lan_address_without_keys_gets_a_loud_warning(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        config = parse_config(
            "store: {path: ':memory:'}\nmodels:\n  m:\n    cmd: s --port ${PORT}\n"
        )
        with capturedLogs() as events:
            build(config, MemoryReactorClock(), ["tcp:8080:interface=0.0.0.0"])
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("without apiKeys", warnings[0]["log_format"])
        keyed = parse_config(
            "apiKeys: [k]\nstore: {path: ':memory:'}\nmodels:\n  m:\n    cmd: s --port ${PORT}\n"
        )
        with capturedLogs() as events:
            build(keyed, MemoryReactorClock(), ["tcp:8080:interface=0.0.0.0"])
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.warn], [])
