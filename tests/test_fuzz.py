"""Fuzzing with Hypothesis: any body, header or config gets a clean answer, never a crash."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.trial.unittest import SynchronousTestCase

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
BODIES = st.one_of(
    st.binary(max_size=200),
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
        client: Any = StubTreq(Guard(api.resource(), ()))
        # serve through llamaswap's own Site (size limit, form parsing), not treq's
        traversal = client._agent
        while not hasattr(traversal, "_serverFactory"):
            traversal = traversal._agent
        traversal._serverFactory = ApiSite(
            traversal._rootResource, 10_000, reactor=traversal._memoryReactor
        )
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
        server.stop()


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
