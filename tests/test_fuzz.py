"""Fuzzing with Hypothesis: any body, header or config gets a clean answer, never a crash."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from llamaswap.access import Access
from llamaswap.api import Api
from llamaswap.config import ConfigError, parse_config
from llamaswap.guard import ApiSite, Guard
from llamaswap.relay import Relay
from llamaswap.testing.fake_server import FakeLlamaServer

from .helpers import world

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
MODEL_FIELD = st.one_of(
    st.sampled_from(["a", "b", "nope", "", "a:b", "duo:a", "../a", "a\x00"]),
    JSON_VALUES,
)
# JSON nested up to far past Python's recursion limit (the site takes 10 kB)
NESTED = st.builds(
    lambda depth, pair: pair[0] * depth + pair[1] * depth,
    st.integers(1, 4000),
    st.sampled_from([(b"[", b"]"), (b'{"k":', b"}"), (b'[{"m":', b"}]")]),
).map(lambda nested: nested if nested.startswith(b"[") else nested.replace(b"}", b"0}", 1))
FORM_PARTS = st.lists(
    st.tuples(
        st.sampled_from([b"model", b"file", b"prompt", b"", b'mo"del']),
        st.sampled_from([b"a", b"b", b"", b"nope", b"\r\n--x\r\n", b"--x--"]),
        st.booleans(),  # a file part
    ),
    max_size=6,
)


def _form(parts: list[tuple[bytes, bytes, bool]], closed: bool) -> bytes:
    body = b""
    for name, value, is_file in parts:
        disposition = b'form-data; name="' + name + b'"'
        if is_file:
            disposition += b'; filename="model"'
        body += b"--x\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + value + b"\r\n"
    return body + (b"--x--\r\n" if closed else b"")


BODIES = st.one_of(
    st.binary(max_size=200),
    NESTED,
    NESTED.map(lambda nested: b'{"model": "a", "x": ' + nested + b"}"),
    st.builds(_form, FORM_PARTS, st.booleans()),
    st.builds(
        lambda model, rest: json.dumps({"model": model, **rest}).encode(),
        MODEL_FIELD,
        st.dictionaries(st.sampled_from(["messages", "stream", "input", "fake"]), JSON_VALUES),
    ),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
)
HEADER_VALUES = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60
).map(str.encode)
PATHS = st.sampled_from(
    ["/v1/chat/completions", "/v1/embeddings", "/v1/audio/transcriptions", "/completion"]
)


class RequestFuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        path=PATHS,
        body=BODIES,
        content_type=st.sampled_from(
            [
                b"application/json",
                b"text/plain",
                b"multipart/form-data; boundary=x",
                b"application/x-www-form-urlencoded",
                b"image/png",
                b"",
            ]
        ),
        extra=st.dictionaries(
            st.sampled_from([b"x-api-key", b"authorization", b"x-custom", b"accept"]),
            HEADER_VALUES,
            max_size=3,
        ),
    )
    def test_every_request_gets_a_clean_answer_and_leaves_nothing_behind(
        self, path: str, body: bytes, content_type: bytes, extra: dict[bytes, bytes]
    ) -> None:
        w = world(
            "models:\n  a:\n    cmd: sleep --port ${PORT} --model a\n"
            "  b:\n    cmd: sleep --port ${PORT} --model b\nprofiles:\n  duo: [a, b]\n"
        )
        server = FakeLlamaServer(clock=w.reactor, model="a", token_delay=0, tokens=2)
        server.start()
        upstream = RequestTraversalAgent(server.resource())
        api = Api(w.config, w.scheduler, Relay(upstream), w.logs, w.reactor)
        client: Any = StubTreq(Guard(api.resource(), Access((), w.reactor)))
        # serve through llamaswap's own Site (size limit, form parsing), not treq's
        traversal = client._agent
        while not hasattr(traversal, "_serverFactory"):
            traversal = traversal._agent
        traversal._serverFactory = ApiSite(
            traversal._rootResource, 10_000, reactor=traversal._memoryReactor
        )
        self.addCleanup(server.stop)
        headers = {b"content-type": content_type, **extra} if content_type else extra
        d = client.post("http://llamaswap" + path, body, headers=headers)
        client.flush()
        for name in ("a", "b"):
            if w.process(name).state.value == "starting":
                w.make_ready(name)
        client.flush()
        upstream.flush()
        client.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        self.assertLess(response.code, 500, content)
        if response.code >= 400:
            error = json.loads(content)["error"]
            self.assertEqual(set(error), {"message", "type", "code"})
        self.assertEqual(w.scheduler.in_flight("a") + w.scheduler.in_flight("b"), 0)
        self.assertEqual(w.scheduler.queued(), 0)


class RecordingStore:
    """Stands in for the activity store (a thread and SQLite): keeps what it was asked."""

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []

    def query(self, **asked: Any) -> Deferred[dict[str, Any]]:
        self.asked.append(asked)
        return succeed({"rows": [], "total": 0})

    def stats(self, **asked: Any) -> Deferred[dict[str, Any]]:
        self.asked.append(asked)
        return succeed({"models": {}})


ODD_NUMBERS = ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-5", "-0", "0x1A", "1_0"]
PLAIN_NUMBERS = ["0", "1", "1000", "1001", "2.5", "1e300", "9007199254740993", " 3", "", "٣"]
QUERY_NUMBERS = st.one_of(
    st.sampled_from([*ODD_NUMBERS, *PLAIN_NUMBERS]),
    st.floats().map(repr),
    st.integers().map(str),
    st.text(max_size=8),
)


class QueryFuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        path=st.sampled_from(["/api/activity", "/api/activity/stats"]),
        params=st.dictionaries(
            st.sampled_from(["limit", "offset", "since", "until"]), QUERY_NUMBERS, max_size=4
        ),
    )
    def test_every_numeric_query_value_is_a_sane_number_or_a_400(
        self, path: str, params: dict[str, str]
    ) -> None:
        w = world("models:\n  a:\n    cmd: sleep --port ${PORT} --model a\n")
        store = RecordingStore()
        api = Api(
            w.config, w.scheduler, Relay(RequestTraversalAgent(Resource())), w.logs, w.reactor
        )
        api.store = store  # type: ignore[assignment]
        client: Any = StubTreq(Guard(api.resource(), Access((), w.reactor)))
        response = self.successResultOf(client.get("http://llamaswap" + path, params=params))
        content = self.successResultOf(response.content())
        if response.code != 200:
            self.assertEqual(response.code, 400, content)
            self.assertEqual(set(json.loads(content)["error"]), {"message", "type", "code"})
            self.assertEqual(store.asked, [])
            return
        [asked] = store.asked
        for name in ("since", "until"):
            value = asked[name]
            self.assertTrue(value is None or (math.isfinite(value) and value >= 0), asked)
        if path == "/api/activity":
            self.assertIsInstance(asked["limit"], int)
            self.assertTrue(1 <= asked["limit"] <= 1000, asked)
            self.assertIsInstance(asked["offset"], int)
            self.assertTrue(0 <= asked["offset"] <= 2**53, asked)


CONFIG_KEYS = st.sampled_from(
    [
        "models",
        "cmd",
        "ttl",
        "groups",
        "members",
        "profiles",
        "macros",
        "proxy",
        "env",
        "filters",
        "setParams",
        "peers",
        "apiKeys",
        "hooks",
        "preload",
        "healthCheckTimeout",
        "startPort",
        "aliases",
        "x",
        "${PORT}",
    ]
)
CONFIG_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 70000)
    | st.floats(allow_nan=False)
    | st.sampled_from(["s --port ${PORT}", "${nope}", "${env.HOME}", "a", "", "http://x:1"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(CONFIG_KEYS, children, max_size=4)
    ),
    max_leaves=20,
)


class ConfigFuzzTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(document=CONFIG_VALUES)
    def test_any_document_loads_or_gives_a_config_error(self, document: Any) -> None:
        text = yaml.safe_dump(document)
        try:
            parse_config(text, "fuzz.yaml", environ={"HOME": "/home/x"})
        except ConfigError as e:
            self.assertTrue(str(e).startswith("fuzz.yaml: "))

    @settings(max_examples=200, deadline=None)
    @given(text=st.text(max_size=300))
    def test_any_text_loads_or_gives_a_config_error(self, text: str) -> None:
        with contextlib.suppress(ConfigError):
            parse_config(text, "fuzz.yaml", environ={})
