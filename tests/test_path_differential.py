"""The door, llamaswap's router and the model's server read a request's path alike.

Three components read the path of every request: the door (``access``: the caller's
role, the admin-only routes, the per-key limits), llamaswap's own router (Klein over
werkzeug: which handler runs, which model and path ``/upstream/`` relays) and the
model's server (the fake llama-server, which decodes a path as llama-server does:
which of its routes answers).  A spelling one of them reads apart from the others
bypasses a check, so Hypothesis writes the routes in many spellings (escapes of any
character, ``%uXXXX`` and surrogates, ``//``, dot segments, ``;params``, case,
trailing slashes, escaped and raw ``?`` and ``#``, detours through other routes,
``/upstream/<id>/`` with ids holding ``/``, an ``--api-prefix``, methods in small
letters) and each answer is checked against what really ran:

(a) a route of llamaswap's own that is not an inference key's ran for no inference
    key, and nothing but the open pages ran without a key;
(b) a request a model's server got was counted against its key's limits;
(c) a model's server acted on an admin-only route (``POST /props``, ``/cors-proxy``,
    ``POST /slots/<n>`` ...) for admin keys only, and never saved or restored a slot
    in llamaswap's KV directory;
(d) what ``/cors-proxy`` fetched is sandboxed, even for a ``trustedPages`` model;
(e) ``/upstream/<id>/<rest>`` reached the model and the path the router read;
(f) the model's server was asked with the method the router matched.

In memory but byte for byte: the request's bytes go into the real door
(``ApiSite``'s channel, with the key check of ``Guard``) in front of the API, and
the relay's Agent talks HTTP to one fake llama-server resource per model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

import attrs
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from werkzeug.exceptions import HTTPException

from llamaswap.access import INFERENCE_ROUTES, Access
from llamaswap.api import Api
from llamaswap.guard import ApiSite, Guard
from llamaswap.kvcache import KvStore
from llamaswap.process import ModelState
from llamaswap.relay import Relay
from llamaswap.routes import API_ROUTES, MODEL_ROUTES
from llamaswap.testing.fake_server import FakeLlamaServer

from .helpers import World, world
from .test_routes import Children as RoutedChildren

ADMIN, INFERENCE, NO_KEY = "sk-ops", "sk-bob", ""
PREFIX = "/api"  # the --api-prefix model p's server is started with

CONFIG = """
apiKeys:
  - {{name: ops, key: sk-ops, role: admin, requestsPerMinute: 1000000}}
  - {{name: bob, key: sk-bob, role: inference, requestsPerMinute: 1000000}}
kvCache:
  path: {kv}
groups:
  all:
    members: [m, org/m2, p]
    swap: false
models:
  m:
    cmd: sleep --port ${{PORT}} --model m
    kvCache: true
    trustedPages: true
  org/m2:
    cmd: sleep --port ${{PORT}} --model org/m2
    trustedPages: true
  p:
    cmd: sleep --port ${{PORT}} --model p --api-prefix {prefix}
    kvCache: true
    trustedPages: true
"""

MODELS = ("m", "org/m2", "p")

# llamaswap's own routes that are not an inference key's (no live streams: they
# never end, and the door's verdict on them is the one on /logs)
OWN_ADMIN = (
    ("POST", "/api/models/unload"),
    ("POST", "/api/models/unload/{model}"),
    ("POST", "/api/models/load/{model}"),
    ("GET", "/running"),
    ("GET", "/unload"),
    ("GET", "/metrics"),
    ("GET", "/logs"),
    ("GET", "/api/activity"),
)
OWN_INFERENCE = (
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/models/{model}"),
    ("GET", "/api/version"),
)
OWN_OPEN = (("GET", "/health"), ("GET", "/v1/health"), ("GET", "/ui/"), ("GET", "/swagger/"))
UPSTREAM = "/upstream/{model}/{path}"
DETOURS = (
    "/ui",
    "/swagger/static",
    "/v1/models",
    "/models/m",
    "/api/models/unload/m",
    "/upstream/m",
)

# what the fake llama-server logs for each request it routed
_SERVED = re.compile(r"request: (\S+) (.*) \S+ \d+$")


class Children(RoutedChildren):
    """The relay's agent (each request to its model's fake server), noting what it sent."""

    def __init__(self, w: World, servers: dict[str, FakeLlamaServer]) -> None:
        super().__init__(w, servers)
        self.sent: list[tuple[bytes, bytes]] = []  # (method, target)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        self.sent.append((method, b"/" + uri.split(b"/", 3)[3]))
        return super().request(method, uri, headers, bodyProducer)


class Harness:
    """One llamaswap (door, router, relay) over three fake llama-servers."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.kv_dir = os.path.abspath(case.mktemp())
        self.w = world(CONFIG.format(kv=self.kv_dir, prefix=PREFIX))
        self.served: list[tuple[str, str, str]] = []  # (model, method, path) as routed
        self.servers = {
            model_id: FakeLlamaServer(
                self.w.reactor,
                model_id,
                token_delay=0,
                tokens=2,
                slot_save_path=self.w.config.models[model_id].slot_save_path,
                api_prefix=PREFIX if model_id == "p" else "",
                log=self._logger(model_id),
            )
            for model_id in MODELS
        }
        for server in self.servers.values():
            server.start()
            case.addCleanup(server.stop)
        self.children = Children(self.w, self.servers)
        relay = Relay(self.children)
        self.api = self.w.api(relay)
        self.api.kvcache = KvStore(self.w.config, self.children, self.w.reactor)
        self.access: Access = self.api.access
        guard = Guard(self.api.resource(), self.access)
        self.site = ApiSite(guard, 1 << 20, checks=[guard.check], reactor=self.w.reactor)

    def _logger(self, model_id: str) -> Any:
        def log(line: str) -> None:
            found = _SERVED.search(line)
            if found is not None:
                self.served.append((model_id, found[1], found[2]))

        return log

    def flush(self) -> None:
        for _ in range(3):
            self.w.reactor.advance(0)
            self.children.flush()

    def tokens(self, key: str) -> float:
        usage = self.access.usage.get("ops" if key == ADMIN else "bob")
        return usage.tokens if usage is not None else float("inf")

    def send(self, method: str, target: bytes, body: bytes, key: str) -> Answer:
        """Send the request's bytes as they are (a client's library would tidy them)."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        head = (
            f"{method} {target.decode('latin-1')} HTTP/1.0\r\nHost: llamaswap\r\n"
            + (f"Authorization: Bearer {key}\r\n" if key else "")
            + "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        channel.dataReceived(head.encode("latin-1") + body)
        self.flush()
        for model_id, process in self.w.scheduler.processes.items():
            if process.state is ModelState.STARTING:
                self.w.make_ready(model_id)
        self.flush()
        self.case.assertTrue(transport.disconnecting, f"{method} {target!r}: no whole answer")
        return Answer.parse(transport.value())


@attrs.frozen
class Answer:
    code: int
    headers: dict[bytes, list[bytes]]
    body: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Answer:
        head, _, body = raw.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers: dict[bytes, list[bytes]] = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        return cls(int(status.split(b" ")[1]), headers, body)


# --- the router's own reading: Twisted's segments, then werkzeug's match ---------------


def router_match(method: str, target: bytes) -> tuple[str, Mapping[str, Any]] | None:
    """The route llamaswap's router runs for ``target`` (its table path) and its
    arguments, None for a 404, 405 or redirect: Twisted unquotes each segment, Klein
    joins them and asks werkzeug."""
    path = target.split(b"?", 1)[0]
    info = b"/" + b"/".join(unquote_to_bytes(s) for s in path[1:].split(b"/"))
    try:
        text = info.decode("utf-8")
        endpoint, arguments = Api.router.url_map.bind("llamaswap").match(text, method=method)
    except (UnicodeDecodeError, HTTPException):
        return None
    return str(endpoint), arguments


_ADMIN_OWN = {
    r.path
    for r in API_ROUTES
    if not (r.open or r.session or r.path in INFERENCE_ROUTES) and r.handler != "upstream"
}
_OPEN = {r.path for r in API_ROUTES if r.open or r.session}
_ADMIN_MODEL = {r.path: r.admin_methods for r in MODEL_ROUTES if r.admin_methods}


def fake_admin(method: str, path: str) -> bool:
    """Whether the fake (as llama-server) acted on an admin-only route."""
    if re.fullmatch("/slots/[^/]+", path):
        return method == "POST"
    return method in _ADMIN_MODEL.get(path, ())


# --- spellings ---------------------------------------------------------------------


def _bases() -> list[tuple[str, str, bool]]:
    """(method, path with {model}, whether a model route) of every route to spell."""
    bases = [(m, p, False) for m, p in (*OWN_ADMIN, *OWN_INFERENCE, *OWN_OPEN)]
    for route in MODEL_ROUTES:
        if not route.llama_server:
            continue
        for method in route.methods:
            bases.append((method, route.path.replace("{id_slot}", "0"), True))
    return bases


BASES = _bases()


KINDS = ("hex", "HEX", "wide", "case", "surrogate")


@st.composite
def spelt(draw: st.DrawFn, text: str) -> bytes:
    """``text`` (one segment) with a few of its characters spelt another way."""
    out = [char.encode() for char in text]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        at = draw(st.integers(0, len(text) - 1)) if text else 0
        how = draw(st.sampled_from(KINDS))
        char = text[at] if text else "x"
        if how == "hex" or (how == "case" and not char.isalpha()):
            out[at] = b"%%%02x" % ord(char)
        elif how == "HEX":
            out[at] = b"%%%02X" % ord(char)
        elif how == "wide":
            out[at] = b"%%u%04x" % ord(char)
        elif how == "case":
            out[at] = char.swapcase().encode()
        else:
            out[at] = draw(st.sampled_from([b"%uD800", b"%udfff"])) + out[at]
    return b"".join(out)


SEPARATORS = st.sampled_from(
    [b"/"] * 20
    + [b"//", b"/./", b"/x/../", b"%2F", b"%2f", b"/%2e/", b"/x/%2E%2E/", b"%u002f"]
    + [b"\\", b"%5C", b"/x\\..\\"]
)


@st.composite
def spelt_path(draw: st.DrawFn, path: str) -> bytes:
    segments = path.strip("/").split("/")
    raw = b""
    for segment in segments:
        raw += draw(SEPARATORS) if raw else b"/"
        raw += draw(spelt(segment))
        if draw(st.integers(0, 9)) == 0:
            raw += b";a=1"
    tail = draw(
        st.sampled_from(
            [b""] * 20
            + [
                b"/",
                b"%3Fx",
                b"%23x",
                b"%u003f",
                b"/.",
                b"/..",
                b"#x",
                b"/#/../x",
                b"%u002f..",
                b"%2F..",
            ]
        )
    )
    return raw + tail


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, bytes, str]:
    """(method, request target, body, key)."""
    method, path, model_route = draw(st.sampled_from(BASES))
    model = draw(st.sampled_from(MODELS))
    key = draw(st.sampled_from([ADMIN, ADMIN, INFERENCE, INFERENCE, NO_KEY]))
    upstream = model_route and draw(st.booleans())
    query = b""
    if "/slots/" in path:
        query = draw(
            st.sampled_from(
                [
                    b"?action=save",
                    b"?action=restore",
                    b"?action=erase&action=save",
                    b"?action=save#",
                ]
            )
        )
    if upstream:
        slash = draw(st.sampled_from([b"/", b"%2F", b"%2f"]))
        spelt_id = slash.join(draw(spelt(part)) for part in model.split("/"))
        prefix = PREFIX if model == "p" else draw(st.sampled_from(["", PREFIX]))
        target = draw(spelt_path("/upstream")) + b"/" + spelt_id + draw(spelt_path(prefix + path))
    else:
        # a detour through another route's segments, dot segments back
        detour = draw(st.sampled_from(["", "", "", *DETOURS]))
        back = "/.." * draw(st.integers(1, 3)) if detour else ""
        target = draw(spelt_path(detour + back + path.replace("{model}", model)))
        if method != "POST":
            query += (b"&" if query else b"?") + b"model=" + model.encode()
    body = json.dumps({"model": model, "filename": "f.bin"}).encode() if method == "POST" else b""
    if method == "GET" and draw(st.booleans()):
        method = "HEAD"
    if draw(st.integers(0, 19)) == 0:
        method = method.lower()
    return method, target + query, body, key


class PathDifferentialTests(SynchronousTestCase):
    """Whatever the spelling, the door's verdict is the verdict on what really ran."""

    @settings(
        max_examples=1000,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests())
    # a raw "#": the relay's Agent (and llama-server) cut the fragment off, the checks
    # read it as part of the path or of the last ?action=
    @example(("POST", b"/upstream/m/slots/0?action=save#x", b'{"filename": "f.bin"}', ADMIN))
    @example(("POST", b"/slots/0?action=save#", b'{"model": "m", "filename": "f.bin"}', ADMIN))
    @example(("POST", b"/upstream/m/props#x", b"{}", INFERENCE))
    @example(("GET", b"/upstream/m/cors-proxy#x", b"", ADMIN))
    @example(("GET", b"/upstream/m/cors-proxy#x", b"", INFERENCE))
    # the upstream handler cut the router's "upstream" off at a fixed length: m got it
    @example(("POST", b"/%75pstream/p/api/completions", b"{}", ADMIN))
    @example(("GET", b"/upstream%2Fm/props", b"", ADMIN))
    # one model's entry is an inference key's; what is below it must not be /running
    @example(("GET", b"/v1/models/../running", b"", INFERENCE))
    @example(("GET", b"/v1/models/..;a=1/running;a=1?model=m", b"", INFERENCE))
    # werkzeug reads "post" as POST, the handler took it for a GET (no body read, no
    # slot check) and relayed "post" (llama-server answers 400)
    @example(("post", b"/slots/0?action=save&model=m", b'{"filename": "f.bin"}', ADMIN))
    def test_the_door_judges_what_really_runs(self, call: tuple[str, bytes, bytes, str]) -> None:
        self.check(*call)

    def check(self, method: str, target: bytes, body: bytes, key: str) -> None:
        h = Harness(self)
        before = h.tokens(key)
        answer = h.send(method, target, body, key)
        reply = answer.body
        who = {ADMIN: "admin", INFERENCE: "inference", NO_KEY: "no key"}[key]
        where = f"{method} {target!r} as {who}"
        code = answer.code
        shown = f"{where}: {code} {reply[:300]!r}"
        error = _error_code(reply)

        event(f"{key} {code} {error} served={bool(h.served)}")
        matched = router_match(method, target)
        endpoint, arguments = matched if matched is not None else (None, {})
        # the key's 403, or the door's 400 for a request no client sends (the door
        # closes the connection after its refusals: the body was never read)
        at_door = answer.headers.get(b"connection") == [b"close"]
        refused = code == 403 or (code == 400 and at_door)
        if key == NO_KEY and endpoint is not None:
            # (a) without a key, only the open pages run; llamaswap's own admin routes
            # and the admin methods of model routes for no inference key
            opened = endpoint.removesuffix("_branch") in _OPEN
            self.assertTrue(opened or code == 401 or refused, shown)
        if key == INFERENCE and endpoint in _ADMIN_OWN:
            self.assertTrue(refused, shown)
        if key == INFERENCE and endpoint in _ADMIN_MODEL and method in _ADMIN_MODEL[endpoint]:
            self.assertTrue(refused, shown)
        if endpoint == UPSTREAM and h.children.sent:
            # (e) /upstream/<id>/<rest>: the model and the path the router read
            [(model_id, _, _)] = h.served
            [(_, sent)] = h.children.sent
            rest = "/" + arguments["rest"]
            relayed = unquote_to_bytes(sent.split(b"?", 1)[0]).decode("utf-8", "replace")
            self.assertEqual(rest, f"/{model_id}{relayed}", f"{shown}; relayed to {model_id}")
        for sent_method, _ in h.children.sent:
            # (f) the model's server is asked with the method the router matched
            self.assertEqual(sent_method, method.upper().encode(), shown)
        for model_id, served_method, served in h.served:
            acted = f"{shown}; {model_id}'s server served {served_method} {served}"
            # (b) a request a model's server got was counted against the key's limits
            self.assertNotEqual(key, NO_KEY, acted)
            self.assertLess(h.tokens(key), before, acted)
            # (c) admin-only routes ran for admin keys only; never a slot save or
            # restore in llamaswap's KV directory
            if fake_admin(served_method, served):
                self.assertEqual(key, ADMIN, acted)
            slot_action = fake_admin(served_method, served) and served.startswith("/slots/")
            if slot_action and h.w.config.models[model_id].slot_save_added:
                actions = _actions(h.children.sent)
                self.assertFalse({"save", "restore"} & set(actions), acted)
            # (d) what /cors-proxy fetched is sandboxed, even for a trusted model
            if served == "/cors-proxy":
                policy = answer.headers.get(b"content-security-policy", [])
                self.assertIn(b"sandbox", policy, acted)
        if error == "slot_action_forbidden":
            self.assertEqual(h.served, [], shown)
        saved = [f for _, _, files in os.walk(h.kv_dir) for f in files if f == "f.bin"]
        self.assertEqual(saved, [], shown)


def _error_code(reply: bytes) -> str | None:
    try:
        document = json.loads(reply)
    except ValueError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def _actions(sent: list[tuple[bytes, bytes]]) -> list[str]:
    actions: list[str] = []
    for _, uri in sent:
        query = uri.partition(b"?")[2].decode("latin-1")
        actions += parse_qs(query).get("action", [])
    return actions
