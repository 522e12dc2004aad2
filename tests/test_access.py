"""Keys with roles and model scopes, UI sessions, per-key limits and usage per key.

The route table test runs a real llamaswap (real sockets) in front of fake
llama-server children: every role and scope on every route.  The rate limit runs on
llamaswap's own door over an in-memory transport with a Clock.
"""

from __future__ import annotations

import json

import attrs
import treq
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request

from llamaswap import access
from llamaswap.access import GUESSERS, Access, ApiKey
from llamaswap.config import parse_config
from llamaswap.guard import ApiSite, Guard
from llamaswap.relay import BytesProducer
from llamaswap.reload import security_changes
from llamaswap.routes import MODEL_ROUTES

from .integration import FAKE, LiveTestCase

ADMIN, ALICE, BOB, OPS = "sk-admin-0a0a", "sk-alice-1b1b", "sk-bob-2c2c", "sk-ops-3d3d"
SECRETS = (ADMIN, ALICE, BOB, OPS)
KEYS = f"""apiKeys:
  - {ADMIN}
  - {{name: alice, key: {ALICE}, models: [alpha, slow, 'box2/*'], maxConcurrent: 2}}
  - {{name: bob, key: {BOB}, role: inference, models: [beta]}}
  - {{name: ops, key: {OPS}, role: admin, models: [beta]}}
"""
MODELS = f"""models:
  alpha:
    cmd: {FAKE} --token-delay 0 --tokens 2
  beta:
    cmd: {FAKE} --token-delay 0 --tokens 2
  slow:
    cmd: {FAKE} --token-delay 0.1 --tokens 5
groups:
  together:
    members: [alpha, beta, slow]
    swap: false
peers:
  box2:
    proxy: http://127.0.0.1:9
    models: [big]
"""
CONFIG = KEYS + MODELS
WHO = {"admin": ADMIN, "alice": ALICE, "bob": BOB, "ops": OPS, "nobody": None, "wrong": "sk-no"}

OK = "ok"  # anything but 401, 403 and a hidden model: the key was let through
HIDDEN = "hidden"  # a model the key may not use: the 404 of a model that does not exist


def model_request(route: str, method: str, model: str) -> tuple[str, str, bytes | None]:
    path = route.replace("{id_slot}", "0")
    if method == "POST":
        return method, path, json.dumps({"model": model, "prompt": "hi"}).encode()
    return method, f"{path}?model={model}", None


def route_table() -> list[tuple[str, str, bytes | None, dict[str, object]]]:
    """(method, path, body, who → 401, 403, HIDDEN or OK) for every route."""
    rows: list[tuple[str, str, bytes | None, dict[str, object]]] = []
    for route in MODEL_ROUTES:
        for method in route.methods:
            for model, allowed in (
                ("alpha", {"admin", "alice"}),
                ("beta", {"admin", "bob", "ops"}),
            ):
                if model == "beta" and method != "POST":
                    continue  # one model suffices for the GET forms; fewer swaps
                expected: dict[str, object] = {w: OK if w in allowed else HIDDEN for w in WHO}
                expected.update(nobody=401, wrong=401)
                if method in route.admin_methods:  # the inference keys, of their models
                    expected.update({w: 403 for w in ("alice", "bob") if w in allowed})
                rows.append((*model_request(route.path, method, model), expected))
    everyone_in = {"admin": OK, "alice": OK, "bob": OK, "ops": OK, "nobody": 401, "wrong": 401}
    admins_only = {**everyone_in, "alice": 403, "bob": 403}
    for path in ("/v1/models", "/models", "/api/version", "/openapi.json"):
        rows.append(("GET", path, None, everyone_in))
    hidden = {**everyone_in, "bob": HIDDEN, "ops": HIDDEN}
    rows.append(("GET", "/upstream/alpha/health", None, hidden))
    for path in ("/v1/models/alpha", "/models/alpha", "/v1/models/box2/big"):
        rows.append(("GET", path, None, hidden))  # one entry of the list: as the list
    peer = json.dumps({"model": "box2/big", "messages": []}).encode()
    rows.append(("POST", "/v1/chat/completions", peer, hidden))
    for path in (
        "/running",
        "/logs",
        "/logs/stream",
        "/logs/stream/alpha",
        "/api/events",
        "/api/activity",
        "/api/activity/stats",
        "/metrics",
    ):
        rows.append(("GET", path, None, admins_only))
    for method, path in (("POST", "/api/models/load/alpha"), ("POST", "/api/models/unload/alpha")):
        rows.append((method, path, None, {**admins_only, "ops": HIDDEN}))  # ops: beta only
    rows.append(("POST", "/api/models/load/beta", None, {**admins_only}))
    for method, path in (("POST", "/api/models/unload"), ("GET", "/unload")):
        rows.append((method, path, None, admins_only))
    for path in ("/health", "/v1/health", "/ui/", "/swagger/"):
        rows.append(("GET", path, None, {w: OK for w in WHO}))
    return rows


class _HeadersOnly(Protocol):
    """Reads an answer's body to its end, or hangs up on a stream once it has started."""

    def __init__(self, done: Deferred[None], stream: bool) -> None:
        self.done = done
        self.stream = stream

    def connectionMade(self) -> None:
        if self.stream:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if not self.done.called:
            self.done.callback(None)


class AccessCase(LiveTestCase):
    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[IResponse, bytes]:
        """One request; a streamed answer (logs, events) is read up to its headers only."""
        sent = Headers({k: [v] for k, v in (headers or {}).items()})
        if key is not None:
            sent.setRawHeaders("authorization", [f"Bearer {key}"])
        if body is not None:
            sent.setRawHeaders("content-type", ["application/json"])
        response: IResponse = await self.agent.request(
            method.encode(),
            (self.base + path).encode(),
            sent,
            BytesProducer(body) if body is not None else None,
        )
        stream = response.code == 200 and path.startswith(("/logs/stream", "/api/events"))
        done: Deferred[None] = Deferred()
        if stream:
            response.deliverBody(_HeadersOnly(done, stream=True))
            await done
            return response, b""
        reply: bytes = await treq.content(response)
        return response, reply

    def same_origin(self, **extra: str) -> dict[str, str]:
        return {"origin": self.base, "sec-fetch-site": "same-origin", **extra}


class RouteTableTests(AccessCase):
    timeout = 120

    async def test_every_role_and_scope_on_every_route(self) -> None:
        # the "wrong" key guesses on every route, from this one address
        self.patch(access, "GUESSES_PER_MINUTE", 1_000_000)
        await self.serve(CONFIG)
        wrong: list[str] = []
        checked = 0
        for method, path, body, expected in route_table():
            for who, outcome in expected.items():
                response, reply = await self.call(method, path, body, WHO[who])
                got: object = response.code if response.code in (401, 403) else OK
                if response.code == 404 and b'"model_not_found"' in reply:
                    got = HIDDEN
                checked += 1
                if got != outcome:
                    wrong.append(f"{who} {method} {path}: {response.code} {reply[:160]!r}")
                elif outcome == 403:
                    error = json.loads(reply)["error"]
                    # says what the key may do
                    self.assertIn(f"key {who!r} may use", error["message"])
                    self.assertEqual(error["type"], "permission_error")
        self.assertEqual(wrong, [])
        self.assertGreater(checked, 400)

    async def test_the_model_list_shows_only_what_a_key_may_use(self) -> None:
        await self.serve(CONFIG)

        async def listed(key: str) -> set[str]:
            _, reply = await self.call("GET", "/v1/models", key=key)
            return {m["id"] for m in json.loads(reply)["data"]}

        self.assertEqual(await listed(ALICE), {"alpha", "slow", "box2/big"})
        self.assertEqual(await listed(BOB), {"beta"})
        self.assertEqual(await listed(ADMIN), {"alpha", "beta", "slow", "box2/big"})


class UsageTests(AccessCase):
    async def test_usage_is_reported_by_key_name_never_by_key(self) -> None:
        await self.serve(CONFIG)
        chat = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x"}]})
        for _ in range(2):
            response, _ = await self.call("POST", "/v1/chat/completions", chat.encode(), ALICE)
            self.assertEqual(response.code, 200)
        response, _ = await self.call("POST", "/v1/chat/completions", chat.encode(), ADMIN)
        self.assertEqual(response.code, 200)

        _, rows = await self.call("GET", "/api/activity", key=ADMIN)
        self.assertEqual(
            [r["key"] for r in json.loads(rows)["data"]], ["apiKeys[0]", "alice", "alice"]
        )
        _, only = await self.call("GET", "/api/activity?key=alice", key=ADMIN)
        self.assertEqual(json.loads(only)["total"], 2)
        _, stats = await self.call("GET", "/api/activity/stats", key=ADMIN)
        alice = json.loads(stats)["keys"]["alice"]
        self.assertEqual(alice["requests"], 2)
        self.assertEqual(alice["models"]["alpha"]["requests"], 2)
        self.assertEqual(alice["tokens_out"], 4)  # 2 tokens each
        _, metrics = await self.call("GET", "/metrics", key=ADMIN)
        self.assertIn(
            b'llamaswap_key_requests_total{key="alice",model="alpha",status="200"} 2.0', metrics
        )
        self.assertIn(
            b'llamaswap_key_tokens_total{key="alice",kind="completion",model="alpha"} 4.0', metrics
        )
        _, logs = await self.call("GET", "/logs", key=ADMIN)
        for secret in SECRETS:
            for text in (rows, stats, metrics, logs):
                self.assertNotIn(secret.encode(), text)


class LimitTests(AccessCase):
    async def test_max_concurrent_under_concurrency(self) -> None:
        await self.serve(CONFIG)
        chat = json.dumps(
            {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        ).encode()
        await self.call("POST", "/api/models/load/slow", key=ADMIN)

        async def one() -> tuple[int, str | None, bytes]:
            response, body = await self.call("POST", "/v1/chat/completions", chat, ALICE)
            after = response.headers.getRawHeaders("retry-after")
            return response.code, after[0] if after else None, body

        results = await gatherResults([Deferred.fromCoroutine(one()) for _ in range(4)])
        codes = sorted(code for code, _, _ in results)
        self.assertEqual(codes, [200, 200, 429, 429])
        for code, retry_after, body in results:
            if code == 429:
                self.assertEqual(retry_after, "1")
                self.assertIn("maxConcurrent: 2", json.loads(body)["error"]["message"])
            else:
                self.assertIn(b"data: [DONE]", body)  # the admitted ones were not cut
        # the slots are free again once those ended; other keys were never limited
        for key in (ALICE, ALICE, ADMIN):
            response, _ = await self.call("POST", "/v1/chat/completions", chat, key)
            self.assertEqual(response.code, 200)


class Rendered(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"ok"


def through_the_door(site: ApiSite, key: str, path: bytes, peer: str = "192.168.1.1") -> bytes:
    """What the door answers to a POST of ``path`` with ``key`` from ``peer`` (in memory)."""
    channel = site.buildProtocol(None)
    kind = IPv6Address if ":" in peer else IPv4Address
    transport = StringTransport(peerAddress=kind("TCP", peer, 40000))
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 2\r\n\r\n{}"
    )
    channel.connectionLost(Failure(ConnectionError()))
    answer: bytes = transport.value()
    return answer


class RateLimitTests(SynchronousTestCase):
    """``requestsPerMinute`` on the door itself, with a Clock."""

    def test_requests_per_minute_refills_evenly(self) -> None:
        clock = Clock()
        limited = ApiKey("bot", "sk-bot", role="inference", requests_per_minute=3)
        access = Access((limited, ApiKey("admin", "sk-admin")), clock)
        guard = Guard(Rendered(), access)
        site = ApiSite(guard, 1_000_000, checks=[guard.check])

        def send(key: str) -> bytes:
            return through_the_door(site, key, b"/v1/completions")

        self.assertEqual([send("sk-bot")[:12] for _ in range(3)], [b"HTTP/1.1 200"] * 3)
        refused = send("sk-bot")
        self.assertTrue(refused.startswith(b"HTTP/1.1 429 "), refused[:40])
        self.assertIn(b"Retry-After: 20", refused)  # one request per 20 s comes back
        self.assertIn(b"requestsPerMinute", refused)
        self.assertTrue(send("sk-admin").startswith(b"HTTP/1.1 200"))  # others unaffected
        clock.advance(19)
        self.assertTrue(send("sk-bot").startswith(b"HTTP/1.1 429"))
        clock.advance(1)
        self.assertTrue(send("sk-bot").startswith(b"HTTP/1.1 200"))
        self.assertTrue(send("sk-bot").startswith(b"HTTP/1.1 429"))

    def test_a_model_route_counts_however_its_path_is_spelt(self) -> None:
        clock = Clock()
        limited = ApiKey("ops", "sk-ops", role="admin", requests_per_minute=2)
        guard = Guard(Rendered(), Access((limited,), clock))
        site = ApiSite(guard, 1_000_000, checks=[guard.check])

        def send(path: bytes) -> bytes:
            return through_the_door(site, "sk-ops", path)[:12]

        # the router and llama-server both decode these to /v1/chat/completions
        spellings = (b"/v1/chat/completions", b"/v1/%63hat/completions", b"/v1/chat%2Fcompletions")
        self.assertEqual([send(p) for p in spellings], [b"HTTP/1.1 200"] * 2 + [b"HTTP/1.1 429"])
        for path in spellings[1:]:
            self.assertEqual(send(path), b"HTTP/1.1 429", path)

    def test_a_dot_segment_does_not_take_a_model_request_out_of_the_count(self) -> None:
        clock = Clock()
        limited = ApiKey("ops", "sk-ops", role="admin", requests_per_minute=2)
        guard = Guard(Rendered(), Access((limited,), clock))
        site = ApiSite(guard, 1_000_000, checks=[guard.check])
        # the router sends this to /upstream/ (model m, which it starts), whatever
        # the folded path would be (/v1/models, which uses no model)
        path = b"/upstream/m/../../v1/models"
        answers = [through_the_door(site, "sk-ops", path)[:12] for _ in range(3)]
        self.assertEqual(answers, [b"HTTP/1.1 200"] * 2 + [b"HTTP/1.1 429"])


class GuessTests(SynchronousTestCase):
    """Wrong keys, counted per client address on the door itself, with a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.access = Access((ApiKey("admin", "sk-admin"),), self.clock)
        guard = Guard(Rendered(), self.access)
        self.site = ApiSite(guard, 1_000_000, checks=[guard.check])

    def send(self, key: str, peer: str = "192.168.1.7") -> bytes:
        return through_the_door(self.site, key, b"/v1/completions", peer)

    def test_past_ten_wrong_keys_a_minute_an_address_is_refused_even_the_right_key(
        self,
    ) -> None:
        answers = [self.send(f"sk-guess-{i}")[:12] for i in range(10)]
        self.assertEqual(answers, [b"HTTP/1.1 401"] * 10)
        refused = self.send("sk-admin")  # the right key, from the guessing address
        self.assertTrue(refused.startswith(b"HTTP/1.1 429 "), refused[:40])
        self.assertIn(b"Retry-After: 6", refused)  # one more guess every 6 s
        self.assertIn(b"too_many_wrong_keys", refused)
        self.assertTrue(self.send("sk-admin", peer="192.168.1.8").startswith(b"HTTP/1.1 200"))
        self.assertTrue(self.send("", peer="192.168.1.7").startswith(b"HTTP/1.1 401"))
        self.clock.advance(6)
        self.assertTrue(self.send("sk-admin").startswith(b"HTTP/1.1 200"))

    def test_a_guesser_gets_ten_tries_a_minute_however_fast_it_sends(self) -> None:
        tried = 0
        for i in range(120):  # two minutes, a guess every second
            if self.send(f"sk-guess-{i}").startswith(b"HTTP/1.1 401"):
                tried += 1
            self.clock.advance(1)
        self.assertLessEqual(tried, 10 + 2 * 10)

    def test_a_client_retrying_a_stale_key_locks_out_no_one(self) -> None:
        """A program left with a removed key, polling: the same wrong key is no new
        guess, so the right key from its address (another program) still works."""
        answers = [self.send("sk-rotated-away")[:12] for _ in range(50)]
        self.assertEqual(answers, [b"HTTP/1.1 401"] * 50)
        self.assertTrue(self.send("sk-admin").startswith(b"HTTP/1.1 200"))
        # guesses beside it still count
        answers = [self.send(f"sk-guess-{i}")[:12] for i in range(9)]
        self.assertEqual(answers, [b"HTTP/1.1 401"] * 9)
        self.assertTrue(self.send("sk-admin").startswith(b"HTTP/1.1 429"))

    def test_a_guesser_on_an_ipv6_lan_locks_out_no_neighbour_that_got_in(self) -> None:
        """Every host of a LAN shares its /64: a neighbour that used its key keeps it
        while the guesser is refused, and a guessing host never keeps one."""
        self.assertTrue(self.send("sk-admin", peer="fd00::2").startswith(b"HTTP/1.1 200"))
        answers = [self.send(f"sk-guess-{i}", peer="fd00::bad")[:12] for i in range(10)]
        self.assertEqual(answers, [b"HTTP/1.1 401"] * 10)
        self.assertTrue(self.send("sk-admin", peer="fd00::2").startswith(b"HTTP/1.1 200"))
        self.assertTrue(self.send("sk-admin", peer="fd00::bad").startswith(b"HTTP/1.1 429"))
        self.assertTrue(self.send("sk-admin", peer="fd00::3").startswith(b"HTTP/1.1 429"))
        # a neighbour that guesses too loses its excuse (else its 200 would tell a hit)
        self.assertTrue(self.send("sk-guess-x", peer="fd00::2").startswith(b"HTTP/1.1 429"))
        self.assertTrue(self.send("sk-admin", peer="fd00::2").startswith(b"HTTP/1.1 429"))

    def test_behind_one_address_a_guess_ends_every_excuse(self) -> None:
        """A reverse proxy in front: its clients are one host, guessers included."""
        self.assertTrue(self.send("sk-admin").startswith(b"HTTP/1.1 200"))
        for i in range(10):
            self.send(f"sk-guess-{i}")
        self.assertTrue(self.send("sk-admin").startswith(b"HTTP/1.1 429"))

    def test_the_guessers_remembered_are_bounded(self) -> None:
        for i in range(GUESSERS + 50):
            host = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
            self.access.guesses.wrong(host, host, "sk-x")
            self.access.guesses.got_in(host, ApiKey("admin", "sk-admin"))
        self.assertEqual(len(self.access.guesses), GUESSERS)
        self.assertEqual(len(self.access.guesses._known), GUESSERS)


class AdminRouteTests(AccessCase):
    """The llama-server routes that change a model's server for everyone, run its tools
    or make it fetch URLs (``/cors-proxy``) are for admin keys, however they are spelt."""

    async def test_an_inference_key_reaches_no_admin_method_of_a_model_route(self) -> None:
        await self.serve(CONFIG)
        url = "http://127.0.0.1:9/"  # what /cors-proxy would fetch from inside the LAN
        refused = [
            ("POST", "/props", {"model": "beta", "n_ctx": 1}),
            ("POST", "/lora-adapters?model=beta", [{"id": 0, "scale": 1}]),
            ("POST", "/slots/0?action=erase&model=beta", None),
            ("POST", "/tools", {"model": "beta", "tool": "exec_shell_command"}),
            ("POST", f"/cors-proxy?model=beta&url={url}", None),
            ("GET", f"/cors-proxy?model=beta&url={url}", None),
            # the raw pass-through, in the spellings a server reads as the same path
            ("GET", f"/upstream/beta/cors-proxy?url={url}", None),
            ("GET", f"/upstream/beta/%63ors-proxy?url={url}", None),
            # llama-server's HTTP library also decodes %uXXXX, a surrogate to nothing
            ("GET", f"/upstream/beta/%u0063ors-proxy?url={url}", None),
            ("POST", "/upstream/beta/pr%uD800ops", {"n_ctx": 1}),
            ("POST", "/upstream/beta//props", {"n_ctx": 1}),
            ("POST", "/upstream/beta/x/../lora-adapters", []),
            ("PUT", "/upstream/beta/props", {}),
            # a server started with --api-prefix serves its routes under that prefix
            ("POST", "/upstream/beta/api/v2/props", {"n_ctx": 1}),
            ("GET", f"/upstream/beta/api/cors-proxy?url={url}", None),
            # the server's own copy of a route llamaswap keeps for admins
            ("GET", "/upstream/beta/metrics", None),
            ("GET", "/upstream/beta/%6detrics", None),
        ]
        for method, path, document in refused:
            body = json.dumps(document).encode() if document is not None else b""
            response, reply = await self.call(method, path, body, BOB)
            self.assertEqual(response.code, 403, f"{method} {path}: {reply[:200]!r}")
            error = json.loads(reply)["error"]
            self.assertEqual(error["code"], "route_not_allowed", path)
            self.assertIn("admin keys only", error["message"])
        # refused before a model was leased: nothing was started, nothing reached one
        _, running = await self.call("GET", "/running", key=ADMIN)
        self.assertEqual(json.loads(running)["running"], [])
        # the reads stay open to the key's own model ...
        for path in ("/props?model=beta", "/tools?model=beta", "/lora-adapters?model=beta"):
            response, reply = await self.call("GET", path, key=BOB)
            self.assertEqual(response.code, 200, f"{path}: {reply[:200]!r}")
        # ... and an admin key still reaches everything
        response, reply = await self.call("GET", f"/cors-proxy?model=beta&url={url}", key=OPS)
        self.assertEqual(response.code, 200, reply[:200])
        self.assertEqual(json.loads(reply)["path"], "/cors-proxy")


class DotSegmentTests(AccessCase):
    """The door reads a path as llamaswap's router does, which does not fold dot
    segments: a path that folds into an inference route is still the admin route
    the router sends it to."""

    async def test_an_inference_key_reaches_no_admin_route_through_dot_segments(self) -> None:
        await self.serve(CONFIG)
        for method, path in (
            ("POST", "/api/models/unload/../../../v1/models"),
            ("POST", "/api/models/load/..%2f..%2f..%2fv1/models"),
            ("GET", "/logs/stream/beta/../../../v1/models"),
        ):
            response, reply = await self.call(method, path, key=BOB)
            self.assertEqual(response.code, 403, f"{method} {path}: {reply[:200]!r}")
            self.assertEqual(json.loads(reply)["error"]["code"], "route_not_allowed")
            self.assertNotIn(b"alpha", reply)  # not bob's: the admin route lists it
        # runs of slashes are one to the router (it redirects or serves): still open
        for path in ("//v1/models", "/v1//models"):
            response, reply = await self.call("GET", path, key=BOB)
            self.assertIn(response.code, (200, 308), f"{path}: {reply[:200]!r}")


class UnnamedModelTests(AccessCase):
    """A request that names no model goes to a model its key may use, and no answer
    tells a scoped key about the models it may not use."""

    async def test_the_only_loaded_model_is_picked_among_the_key_s_own(self) -> None:
        await self.serve(CONFIG)
        chat = json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()
        await self.call("POST", "/api/models/load/beta", key=ADMIN)
        response, reply = await self.call("POST", "/v1/chat/completions", chat, ALICE)
        self.assertEqual(response.code, 400, reply[:200])
        message = json.loads(reply)["error"]["message"]
        self.assertIn("no model is loaded", message)  # of hers: beta is not her business
        self.assertIn("available models: alpha, slow", message)
        self.assertNotIn("beta", message)
        response, reply = await self.call("GET", "/props?model=nope", key=BOB)
        self.assertEqual(response.code, 404)
        self.assertIn('available models: beta"', reply.decode())
        # alpha and beta both loaded (one group, no swap): bob's is beta
        await self.call("POST", "/api/models/load/alpha", key=ADMIN)
        response, reply = await self.call("POST", "/v1/chat/completions", chat, BOB)
        self.assertEqual(response.code, 200, reply[:200])
        self.assertEqual(json.loads(reply)["model"], "beta")
        response, _ = await self.call("POST", "/v1/chat/completions", chat, ADMIN)
        self.assertEqual(response.code, 400)  # an admin still has two to choose from

    async def test_a_default_model_the_key_may_not_use_is_passed_over(self) -> None:
        """``defaultModel`` is for the keys that may use it; a key scoped to other
        models gets its own loaded model, not a 403 naming one it may not use."""
        await self.serve(CONFIG + "defaultModel: alpha\n")
        chat = json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()
        await self.call("POST", "/api/models/load/beta", key=ADMIN)
        response, reply = await self.call("POST", "/v1/chat/completions", chat, BOB)
        self.assertEqual(response.code, 200, reply[:200])
        self.assertEqual(json.loads(reply)["model"], "beta")
        response, reply = await self.call("POST", "/v1/chat/completions", chat, ALICE)
        self.assertEqual(json.loads(reply)["model"], "alpha")  # hers: the default holds

    async def test_a_pool_is_listed_with_only_the_members_the_key_may_use(self) -> None:
        # bob may use beta only: the pool he sees is beta, whatever else serves it
        await self.serve(CONFIG + "pools:\n  any:\n    models: [alpha, beta]\n")
        await self.call("POST", "/api/models/load/alpha", key=ADMIN)  # alpha: picked first
        _, reply = await self.call("GET", "/v1/models", key=BOB)
        [pool] = [m for m in json.loads(reply)["data"] if m["id"] == "any"]
        self.assertEqual(pool["meta"]["llamaswap"]["pool"], ["beta"])
        self.assertEqual(pool["meta"]["llamaswap"]["serves"], "beta")
        self.assertNotIn(b"alpha", reply)

    async def test_a_profile_starting_a_model_the_key_may_not_use_is_not_its_own(
        self,
    ) -> None:
        """``pair:alpha`` starts beta too: a key scoped to alpha may not start it."""
        profile = "profiles:\n  pair: [alpha, beta]\n  solo: [alpha]\n"
        await self.serve(CONFIG + profile + "defaultModel: pair:alpha\n")
        chat = json.dumps({"model": "pair:alpha", "messages": []}).encode()
        response, reply = await self.call("POST", "/v1/chat/completions", chat, ALICE)
        self.assertEqual(response.code, 404, reply[:200])
        self.assertEqual(json.loads(reply)["error"]["code"], "model_not_found")
        unnamed = json.dumps({"messages": []}).encode()  # the default is the profile
        await self.call("POST", "/v1/chat/completions", unnamed, ALICE)  # passed over
        _, running = await self.call("GET", "/running", key=ADMIN)
        started = {m["model"] for m in json.loads(running)["running"]}
        self.assertNotIn("beta", started)  # nothing outside her scope was started for her
        _, listed = await self.call("GET", "/v1/models", key=ALICE)
        ids = {m["id"] for m in json.loads(listed)["data"]}
        self.assertIn("solo:alpha", ids)
        self.assertNotIn("pair:alpha", ids)
        solo = json.dumps({"model": "solo:alpha", "messages": []}).encode()
        response, reply = await self.call("POST", "/v1/chat/completions", solo, ALICE)
        self.assertEqual(response.code, 200, reply[:200])
        response, reply = await self.call("POST", "/v1/chat/completions", chat, ADMIN)
        self.assertEqual(response.code, 200, reply[:200])

    async def test_a_profile_through_upstream_is_a_scoped_keys_only_if_it_may_use_all(
        self,
    ) -> None:
        """``/upstream/pair:alpha/`` starts beta too, as the body's model does."""
        await self.serve(CONFIG + "profiles:\n  pair: [alpha, beta]\n")
        response, reply = await self.call("GET", "/upstream/pair:alpha/health", key=ALICE)
        self.assertEqual(response.code, 404, reply[:200])
        self.assertEqual(json.loads(reply)["error"]["code"], "model_not_found")
        _, running = await self.call("GET", "/running", key=ADMIN)
        started = {m["model"] for m in json.loads(running)["running"]}
        self.assertNotIn("beta", started)
        response, reply = await self.call("GET", "/upstream/pair:alpha/health", key=ADMIN)
        self.assertEqual(response.code, 200, reply[:200])

    async def test_a_model_the_key_may_not_use_is_answered_as_one_that_does_not_exist(
        self,
    ) -> None:
        """A 403 for a model that exists beside a 404 for one that does not would let
        a scoped key probe which ids are configured: both get the same 404."""
        await self.serve(CONFIG)

        def chat(model: str) -> bytes:
            return json.dumps({"model": model, "messages": []}).encode()

        probes = [
            ("POST", "/v1/chat/completions", chat, BOB),
            ("POST", "/completions", chat, BOB),
            ("GET", "/props?model={}", None, BOB),
            ("GET", "/upstream/{}/health", None, BOB),
            ("POST", "/upstream/{}/slots/0?action=save", None, BOB),
            ("POST", "/api/models/load/{}", None, OPS),
            ("POST", "/api/models/unload/{}", None, OPS),
        ]
        for method, path, body, key in probes:
            # a model that exists beside one that does not: a local one, a peer's (by
            # its full name, and by its bare id, which only one peer offers)
            for pair in (("alpha", "nosuch"), ("box2/big", "box2/nosuch"), ("big", "nosuch")):
                answers = set()
                for model in pair:
                    response, reply = await self.call(
                        method, path.format(model), body(model) if body else None, key
                    )
                    answers.add((response.code, reply.replace(model.encode(), b"NAME")))
                self.assertEqual(len(answers), 1, f"{method} {path}: {answers}")
                [(code, reply)] = answers
                self.assertEqual(code, 404)
                error = json.loads(reply)["error"]
                self.assertEqual(error["code"], "model_not_found")
                self.assertTrue(error["message"].endswith("not available; available models: beta"))
        _, running = await self.call("GET", "/running", key=ADMIN)
        self.assertEqual(json.loads(running)["running"], [])  # nothing was started for them


class SessionTests(AccessCase):
    async def login(self, key: str, **headers: str) -> IResponse:
        body = json.dumps({"key": key}).encode()
        response, _ = await self.call(
            "POST", "/api/login", body, headers=self.same_origin(**headers)
        )
        return response

    def cookie(self, response: IResponse) -> str:
        [set_cookie] = response.headers.getRawHeaders("set-cookie")
        name_and_value: str = set_cookie.split(";")[0]
        return name_and_value

    async def test_the_session_routes_are_routes_like_any_other(self) -> None:
        await self.serve(CONFIG)
        response, body = await self.call("GET", "/api/login", headers=self.same_origin())
        self.assertEqual(response.code, 405)  # OpenAI-shaped, like any route's
        self.assertEqual(json.loads(body)["error"]["code"], "method_not_allowed")
        response, _ = await self.call("GET", "/api/session", headers=self.same_origin())
        self.assertEqual(response.code, 401)  # reached without a key, answered "not logged in"
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        _, document = await self.call("GET", "/openapi.json", key=ALICE)
        login = json.loads(document)["paths"]["/api/login"]["post"]
        self.assertEqual(login["security"], [])  # no key needed

    async def test_login_sets_a_strict_http_only_expiring_cookie(self) -> None:
        await self.serve(CONFIG + "sessionTtl: 600\n")
        response = await self.login(ALICE)
        self.assertEqual(response.code, 200)
        [set_cookie] = response.headers.getRawHeaders("set-cookie")
        attributes = [a.strip().lower() for a in set_cookie.split(";")]
        self.assertTrue(attributes[0].startswith("llamaswap_session="))
        self.assertNotIn(ALICE, set_cookie)
        for attribute in ("httponly", "samesite=strict", "max-age=600", "path=/"):
            self.assertIn(attribute, attributes)
        self.assertNotIn("secure", attributes)  # plain http here; set over TLS
        # a wrong key gets no cookie
        refused = await self.login("sk-guess")
        self.assertEqual(refused.code, 401)

    async def test_wrong_keys_at_the_login_count_as_guesses(self) -> None:
        await self.serve(CONFIG)
        codes = [(await self.login(f"sk-guess-{i}")).code for i in range(10)]
        self.assertEqual(codes, [401] * 10)
        refused = await self.login(ALICE)  # the right key, from the guessing address
        self.assertEqual(refused.code, 429)
        self.assertIsNone(refused.headers.getRawHeaders("set-cookie"))
        self.assertIsNone(refused.headers.getRawHeaders("set-cookie"))

    async def test_the_cookie_works_only_from_this_server_s_own_pages(self) -> None:
        await self.serve(CONFIG)
        cookie = self.cookie(await self.login(ADMIN))
        mine = self.same_origin(cookie=cookie)
        _, body = await self.call("GET", "/api/session", headers=mine)
        self.assertEqual(
            json.loads(body), {"keys": True, "name": "apiKeys[0]", "role": "admin", "models": ["*"]}
        )
        self.assertEqual((await self.call("GET", "/running", headers=mine))[0].code, 200)
        unload = ("POST", "/api/models/unload")
        self.assertEqual((await self.call(*unload, headers=mine))[0].code, 200)
        # the UI's own reads work without browser headers (plain http on a LAN) ...
        self.assertEqual(
            (await self.call("GET", "/running", headers={"cookie": cookie}))[0].code, 200
        )
        # ... but nothing that changes state: no Origin, no Sec-Fetch-Site, no session
        self.assertEqual((await self.call(*unload, headers={"cookie": cookie}))[0].code, 401)
        self.assertEqual(
            (await self.call("GET", "/unload", headers={"cookie": cookie}))[0].code, 401
        )
        # another origin (here a sibling port, which SameSite lets the cookie go to)
        other = {"cookie": cookie, "origin": "http://127.0.0.1:1"}
        self.assertIn((await self.call(*unload, headers=other))[0].code, (401, 403))
        sibling = {"cookie": cookie, "sec-fetch-site": "same-site"}
        self.assertIn((await self.call("GET", "/running", headers=sibling))[0].code, (401, 403))

    async def test_no_cookie_goes_to_a_model_s_server(self) -> None:
        """A browser sends llamaswap every cookie of its host name, whatever the port:
        another web app's session too.  None of them is a model server's business."""
        await self.serve(CONFIG)
        cookie = self.cookie(await self.login(ALICE))
        mine = self.same_origin(cookie=f"token=open-webui-session; {cookie}; lang=en")
        response, reply = await self.call("GET", "/tools?model=alpha", headers=mine)
        self.assertEqual(response.code, 200, reply[:200])
        self.assertNotIn("cookie", json.loads(reply)["headers"])  # what the child received
        self.assertNotIn("open-webui-session", reply.decode())

    async def test_the_session_cookie_never_goes_to_a_model_s_server(self) -> None:
        """A server that gets the client's credentials gets its other cookies, never
        llamaswap's own session."""
        await self.serve(
            CONFIG.replace("--tokens 2\n", "--tokens 2\n    forwardAuthorization: true\n", 1)
        )
        cookie = self.cookie(await self.login(ALICE))
        token = cookie.partition("=")[2]
        mine = self.same_origin(cookie=f"theme=dark; {cookie}; lang=en")
        response, reply = await self.call("GET", "/tools?model=alpha", headers=mine)
        self.assertEqual(response.code, 200, reply[:200])
        seen = json.loads(reply)["headers"]  # what the child received
        self.assertEqual(seen["cookie"], "theme=dark; lang=en")  # the other cookies
        self.assertNotIn(token, reply.decode())
        response, reply = await self.call(
            "GET", "/tools?model=alpha", headers=mine | {"cookie": cookie}
        )
        self.assertEqual(response.code, 200, reply[:200])
        self.assertNotIn("cookie", json.loads(reply)["headers"])

    async def test_an_inference_session_has_the_key_s_scope(self) -> None:
        await self.serve(CONFIG)
        mine = self.same_origin(cookie=self.cookie(await self.login(BOB)))
        self.assertEqual((await self.call("GET", "/running", headers=mine))[0].code, 403)
        _, body = await self.call("GET", "/v1/models", headers=mine)
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["beta"])

    async def test_logout_ends_the_session(self) -> None:
        await self.serve(CONFIG)
        cookie = self.cookie(await self.login(ADMIN))
        mine = self.same_origin(cookie=cookie)
        response, _ = await self.call("POST", "/api/logout", b"{}", headers=mine)
        self.assertIn("max-age=0", response.headers.getRawHeaders("set-cookie")[0].lower())
        self.assertEqual((await self.call("GET", "/running", headers=mine))[0].code, 401)

    async def test_a_login_from_another_page_is_refused(self) -> None:
        await self.serve(CONFIG)
        body = json.dumps({"key": ADMIN}).encode()
        for headers in ({"origin": "http://127.0.0.1:1"}, {"sec-fetch-site": "same-site"}):
            response, _ = await self.call("POST", "/api/login", body, headers=headers)
            self.assertEqual(response.code, 403)
            self.assertIsNone(response.headers.getRawHeaders("set-cookie"))


class ReloadTests(AccessCase):
    async def test_key_changes_apply_to_new_requests_and_sessions_of_removed_keys_end(
        self,
    ) -> None:
        await self.serve(CONFIG)
        config = self.api.config
        sessions = {}
        for key in (ADMIN, ALICE):
            response, _ = await self.call(
                "POST", "/api/login", json.dumps({"key": key}).encode(), headers=self.same_origin()
            )
            [set_cookie] = response.headers.getRawHeaders("set-cookie")
            sessions[key] = set_cookie.split(";")[0]
        await self.call("POST", "/api/models/load/slow", key=ADMIN)
        # a request of alice's in flight while alice's key is removed
        chat = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "x"}]})
        in_flight = Deferred.fromCoroutine(
            self.call("POST", "/v1/chat/completions", chat.encode(), ALICE)
        )
        scheduler = self.api.scheduler

        async def started() -> bool:
            return scheduler.in_flight("slow") == 1

        await self.eventually(started, "alice's request is in flight")
        without_alice = parse_config(
            CONFIG.replace(f"  - {{name: alice, key: {ALICE}", "  - {name: carol, key: sk-carol"),
            "test.yaml",
        )
        without_alice = attrs.evolve(
            without_alice, start_port=config.start_port, store_path=":memory:"
        )
        changes = security_changes(config, without_alice)
        self.service.apply(without_alice)
        response, body = await in_flight
        self.assertEqual(response.code, 200)  # finished, under the key it started with
        self.assertIn(b"fake-reply", body)
        # new requests: alice's key and session are gone, the admin's session stays
        self.assertEqual((await self.call("GET", "/v1/models", key=ALICE))[0].code, 401)
        alice = self.same_origin(cookie=sessions[ALICE])
        self.assertEqual((await self.call("GET", "/v1/models", headers=alice))[0].code, 401)
        admin = self.same_origin(cookie=sessions[ADMIN])
        self.assertEqual((await self.call("GET", "/running", headers=admin))[0].code, 200)
        self.assertEqual((await self.call("GET", "/v1/models", key="sk-carol"))[0].code, 200)
        # the change is logged by name, never by key
        [line] = changes
        self.assertIn("removed: alice", line)
        self.assertIn("added: carol", line)
        for secret in (*SECRETS, "sk-carol"):
            self.assertNotIn(secret, line)
