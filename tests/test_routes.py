"""Every llama-server route at its own path, requests that name no model, children's keys.

In memory: StubTreq in front of the API, one fake llama-server resource per model
behind it (the relay's agent picks the one whose port the URL names).  Over real
sockets: the same with real fake-llama-server children.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import treq
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from llamaswap.api import EXACT_POST_ROUTES, Api
from llamaswap.config import ConfigError, parse_config
from llamaswap.errors import ApiError, ModelStopped, StartFailed
from llamaswap.events import Activity
from llamaswap.guard import is_open_page
from llamaswap.openapi import openapi_document
from llamaswap.process import ModelState
from llamaswap.relay import Relay
from llamaswap.routes import API_ROUTES, MODEL_ROUTES, OWN_ROUTES, Body, ModelRoute
from llamaswap.testing.fake_server import UNAUTHORIZED_BODY, FakeLlamaServer

from .helpers import World, world
from .integration import FAKE, LiveTestCase

CONFIG = """
groups:
  together:
    members: [a, b]
    swap: false
models:
  a:
    cmd: sleep --port ${PORT} --model a
  b:
    cmd: sleep --port ${PORT} --model b
    upstreamApiKey: child-key
    aliases: [bee]
"""

# routes the fake answers with a generation or a fixed document, not a description
GENERATING = frozenset(
    {
        "/v1/chat/completions",
        "/chat/completions",
        "/v1/completions",
        "/completions",
        "/completion",
        "/v1/embeddings",
        "/embeddings",
        "/embedding",
        "/v1/rerank",
        "/v1/reranking",
        "/rerank",
        "/reranking",
        "/props",
        "/slots",
    }
)
# a body as a client may write it: spacing and key order re-encoding would change
RAW_BODY = b'{ "model" : "b",\n  "content": "x y",  "input": "x", "query": "q", "documents": []}'


# What llama-server (llama-cpp-python 0.3.36, tools/server/server.cpp) registers,
# outside router mode and the optional Vertex AI route.
LLAMA_SERVER_ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/health"),
    ("GET", "/v1/health"),
    ("GET", "/metrics"),
    ("GET", "/props"),
    ("POST", "/props"),
    ("GET", "/models"),
    ("GET", "/v1/models"),
    ("POST", "/completion"),
    ("POST", "/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/chat/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions/control"),
    ("POST", "/v1/responses"),
    ("POST", "/responses"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/audio/transcriptions"),
    ("POST", "/v1/messages"),
    ("POST", "/infill"),
    ("POST", "/embedding"),
    ("POST", "/embeddings"),
    ("POST", "/v1/embeddings"),
    ("POST", "/rerank"),
    ("POST", "/reranking"),
    ("POST", "/v1/rerank"),
    ("POST", "/v1/reranking"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/apply-template"),
    ("POST", "/chat/completions/input_tokens"),
    ("POST", "/v1/chat/completions/input_tokens"),
    ("POST", "/responses/input_tokens"),
    ("POST", "/v1/responses/input_tokens"),
    ("POST", "/v1/messages/count_tokens"),
    ("GET", "/lora-adapters"),
    ("POST", "/lora-adapters"),
    ("GET", "/slots"),
    ("POST", "/slots/7"),
    ("GET", "/v1/stream"),
    ("POST", "/v1/streams/lookup"),
    ("DELETE", "/v1/stream"),
    ("GET", "/cors-proxy"),
    ("POST", "/cors-proxy"),
    ("GET", "/tools"),
    ("POST", "/tools"),
)


class RouteTableTests(SynchronousTestCase):
    def test_every_llama_server_route_is_served_at_its_path(self) -> None:
        urls = Api.router.url_map.bind("llamaswap")
        for method, path in LLAMA_SERVER_ROUTES:
            endpoint, _ = urls.match(path, method=method)  # no NotFound, no 405
            self.assertNotIn("upstream", endpoint, f"{method} {path}")
            if path not in OWN_ROUTES:
                self.assertEqual(urls.match(path, method="OPTIONS")[0], endpoint)

    def test_an_exact_post_path_is_the_route_the_router_would_pick(self) -> None:
        urls = Api.router.url_map.bind("llamaswap")
        for path, route in EXACT_POST_ROUTES.items():
            self.assertEqual(urls.match(path.decode(), method="POST")[0], route.path)

    def test_the_docs_list_every_route_of_the_table(self) -> None:
        page = (Path(__file__).parent.parent / "docs" / "routes.md").read_text()
        for route in MODEL_ROUTES:
            self.assertIn(f"`{route.path}`", page)

    def test_the_openapi_document_has_every_method_of_the_table(self) -> None:
        paths = openapi_document()["paths"]
        for route in MODEL_ROUTES:
            methods = {m.lower() for m in (*route.methods, "OPTIONS")}
            self.assertEqual(set(paths[route.path]), methods, route.path)

    def test_every_klein_route_is_in_a_table_and_every_table_route_is_served(self) -> None:
        served = {}
        for rule in Api.router.url_map.iter_rules():
            if rule.endpoint.endswith("_branch"):  # Klein's rule for what is below a branch
                continue
            methods = frozenset(rule.methods or ()) - {"HEAD"}  # werkzeug adds HEAD to GET
            served[rule.endpoint] = (rule.rule, methods)
        table = {
            route.path: (route.rule, frozenset((*route.methods, "OPTIONS")) - {"HEAD"})
            for route in MODEL_ROUTES
        }
        for api_route in API_ROUTES:
            table[api_route.path] = (api_route.rule, frozenset(api_route.methods) - {"HEAD"})
        self.assertEqual(served, table)
        self.assertEqual(len(table), len(MODEL_ROUTES) + len(API_ROUTES))  # no path twice

    def test_each_route_is_answered_by_the_method_it_names(self) -> None:
        for route in API_ROUTES:
            handler = getattr(Api, route.handler, None)
            self.assertTrue(callable(handler), route.handler)
            self.assertNotIn(route.handler, ("render", "resource"))
        self.assertEqual(
            Api.router.url_map.bind("llamaswap").match("/api/models/load/a/b", method="POST"),
            ("/api/models/load/{model}", {"name": "a/b"}),
        )

    def test_the_openapi_document_is_the_tables(self) -> None:
        document = openapi_document()
        paths = document["paths"]
        documented = [r for r in API_ROUTES if r.documented]
        self.assertEqual(set(paths), {r.path for r in MODEL_ROUTES} | {r.path for r in documented})
        schemes = set(document["components"]["securitySchemes"])
        for route in documented:
            self.assertEqual(set(paths[route.path]), {m.lower() for m in route.methods})
            for operation in paths[route.path].values():
                self.assertEqual(operation["summary"], route.summary)
                self.assertEqual(
                    [p["name"] for p in operation.get("parameters", [])],
                    [p.name for p in route.parameters],
                )
                self.assertEqual(
                    {str(a.status) for a in route.answers}, set(operation["responses"])
                )
                needs = {name for option in operation["security"] for name in option}
                self.assertEqual(
                    needs, set() if route.open or route.session else schemes, route.path
                )
        for model_route in MODEL_ROUTES:
            for operation in paths[model_route.path].values():
                self.assertTrue(operation["security"], model_route.path)

    def test_the_open_pages_are_the_routes_the_table_opens(self) -> None:
        for route in API_ROUTES:
            self.assertEqual(is_open_page(route.path.encode()), route.open, route.path)
        for model_route in MODEL_ROUTES:
            self.assertFalse(is_open_page(model_route.path.encode()), model_route.path)
        for path in (b"/ui", b"/ui/app.js", b"/swagger/static", b"/swagger/static/x.css"):
            self.assertTrue(is_open_page(path), path)
        for path in (b"/running", b"/uix", b"/api/events", b"/openapi.json", b"/upstream/a/"):
            self.assertFalse(is_open_page(path), path)


@implementer(IAgent)
class Children:
    """The relay's agent: each request goes to the fake server of the model it is for."""

    def __init__(self, w: World, servers: dict[str, FakeLlamaServer]) -> None:
        self.w = w
        self.agents = {
            model_id: RequestTraversalAgent(server.resource())
            for model_id, server in servers.items()
        }

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        for model_id, agent in self.agents.items():
            base = self.w.process(model_id).base_url
            if base and uri.startswith(base.encode() + b"/"):
                sent: Deferred[IResponse] = agent.request(method, uri, headers, bodyProducer)
                return sent
        raise AssertionError(f"no child listens at {uri!r}")

    def flush(self) -> None:
        for agent in self.agents.values():
            agent.flush()


class InMemory(SynchronousTestCase):
    config_text = CONFIG

    def setUp(self) -> None:
        self.w = world(self.config_text)
        self.servers = {
            "a": FakeLlamaServer(clock=self.w.reactor, model="a", token_delay=0, tokens=2),
            "b": FakeLlamaServer(
                clock=self.w.reactor, model="b", token_delay=0, tokens=2, api_keys=["child-key"]
            ),
        }
        for server in self.servers.values():
            server.start()
            self.addCleanup(server.stop)
        self.children = Children(self.w, self.servers)
        self.api = self.w.api(Relay(self.children))
        self.client: Any = StubTreq(self.api.resource())

    def flush(self) -> None:
        for _ in range(3):
            self.w.reactor.advance(0)  # the fake's zero-delay tokens
            self.client.flush()
            self.children.flush()

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[IResponse, bytes]:
        d = self.client.request(
            method,
            "http://llamaswap" + path,
            data=body,
            headers={"content-type": "application/json", **(headers or {})},
        )
        self.flush()
        for model_id, process in self.w.scheduler.processes.items():
            if process.state is ModelState.STARTING:
                self.w.make_ready(model_id)
        self.flush()
        response: IResponse = self.successResultOf(d)
        content = treq.content(response)
        self.flush()
        return response, self.successResultOf(content)

    def served_by(self, response: IResponse) -> str | None:
        values = response.headers.getRawHeaders(b"x-fake-served-by")
        return values[0].decode() if values else None

    def loaded(self) -> list[str]:
        return sorted(
            model_id
            for model_id, process in self.w.scheduler.processes.items()
            if process.state is ModelState.READY
        )


def _form(**fields: str) -> bytes:
    parts = [
        f'--XyZ\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    return (
        b"".join(parts)
        + b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        + b"Content-Type: audio/wav\r\n\r\nRIFF....\r\n--XyZ--\r\n"
    )


def _calls(route: ModelRoute) -> list[tuple[str, str, bytes | None]]:
    """(method, path with ?model=b where the body cannot say it, body) for one route."""
    path = route.path.replace("{id_slot}", "0")
    calls: list[tuple[str, str, bytes | None]] = []
    for method in route.methods:
        if method != "POST":
            calls.append((method, path + "?model=b&id=s1", None))
        elif route.body is Body.OPAQUE:
            calls.append((method, path + "?model=b&action=save", b'[{"id": 0, "scale": 0.5}]'))
        else:
            calls.append((method, path, RAW_BODY))
    return calls


class RouteTests(InMemory):
    def test_the_exact_path_and_the_router_answer_failures_alike(self) -> None:
        """A POST to a model route's exact path skips Klein; its failures are answered
        as the router answers them (an escaped spelling goes through the router)."""
        failures = [
            ApiError(418, "short and stout"),
            StartFailed("b", "exited with 1", ["out of memory"]),
            ModelStopped("b was unloaded"),
            RuntimeError("a bug"),
        ]
        for failure in failures:

            def boom(*args: object, failure: Exception = failure) -> object:
                raise failure

            self.patch(self.api, "model_from_body", boom)
            answers = []
            for path in ("/v1/chat/completions", "/v1/%63hat/completions"):
                response, content = self.send("POST", path, RAW_BODY)
                answers.append((response.code, content))
            self.assertEqual(answers[0], answers[1], failure)
            self.assertNotEqual(answers[0][0], 200, failure)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_every_route_reaches_the_named_model_with_the_bytes_unchanged(self) -> None:
        key = {"authorization": "Bearer client-key"}
        for route in MODEL_ROUTES:
            for method, path, body in _calls(route):
                where = f"{method} {path}"
                response, content = self.send(method, path, body, key)
                self.assertEqual(response.code, 200, f"{where}: {content[:300]!r}")
                self.assertEqual(self.served_by(response), "b", where)
                if route.path in GENERATING:
                    continue
                echo = json.loads(content)
                self.assertEqual(echo["path"], path.partition("?")[0], where)
                self.assertEqual(echo["method"], method, where)
                self.assertEqual(echo["query"], path.partition("?")[2], where)
                self.assertEqual(echo["body_length"], len(body or b""), where)
                self.assertEqual(echo["headers"]["authorization"], "Bearer child-key", where)
        self.assertEqual(self.loaded(), ["b"])

    def test_a_multipart_form_names_its_model_or_leaves_it_to_the_rule(self) -> None:
        multipart = {"content-type": "multipart/form-data; boundary=XyZ"}
        for path in ("/audio/transcriptions", "/v1/audio/transcriptions"):
            _response, content = self.send("POST", path, _form(model="a"), multipart)
            echo = json.loads(content)
            self.assertEqual((echo["served_by"], echo["model"], echo["path"]), ("a", "a", path))
            self.assertEqual(echo["body_length"], len(_form(model="a")))
        # no model field: the one loaded model
        _response, content = self.send("POST", "/audio/transcriptions", _form(), multipart)
        self.assertEqual(json.loads(content)["served_by"], "a")

    def test_streams_keep_their_framing_on_the_paths_without_v1(self) -> None:
        body = json.dumps({"model": "a", "stream": True, "messages": []}).encode()
        response, content = self.send("POST", "/chat/completions", body)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        events = content.split(b"\n\n")
        self.assertEqual(events[-2:], [b"data: [DONE]", b""])
        self.assertTrue(all(e.startswith(b"data: ") for e in events[:-1]))

    def test_options_answers_with_the_methods_and_starts_nothing(self) -> None:
        for route in MODEL_ROUTES:
            path = route.path.replace("{id_slot}", "3")
            response, _content = self.send("OPTIONS", path)
            self.assertEqual(response.code, 204, path)
            allow = response.headers.getRawHeaders(b"allow")[0].decode().split(", ")
            self.assertEqual(allow, [*route.methods, "OPTIONS"], path)
        self.assertEqual(self.w.reactor.spawned, [])

    def test_a_method_the_route_does_not_have_is_refused(self) -> None:
        response, _content = self.send("DELETE", "/tokenize?model=a")
        self.assertEqual(response.code, 405)
        self.assertEqual(self.w.reactor.spawned, [])

    def test_the_slot_route_counts_as_one_route_in_the_activity_record(self) -> None:
        routes: list[str] = []
        self.api.recorder.events.subscribe(
            lambda e: routes.append(e.row.get("route", "")) if isinstance(e, Activity) else None
        )
        for slot in ("0", "1", "99999"):
            self.send("POST", f"/slots/{slot}?model=a&action=erase", b"")
        self.assertEqual(set(routes), {"/slots/{id_slot}"})


class NoModelNamedTests(InMemory):
    def tokenize(self, document: dict[str, Any]) -> tuple[IResponse, Any]:
        response, content = self.send("POST", "/tokenize", json.dumps(document).encode())
        return response, json.loads(content)

    def test_with_nothing_loaded_the_answer_is_a_400_that_lists_the_ids(self) -> None:
        for method, path, body in (
            ("POST", "/tokenize", b'{"content": "x"}'),
            ("POST", "/v1/chat/completions", b'{"model": "", "messages": []}'),
            ("GET", "/props", None),
            ("GET", "/slots", None),
            ("POST", "/lora-adapters", b"[]"),
        ):
            response, content = self.send(method, path, body)
            self.assertEqual(response.code, 400, path)
            error = json.loads(content)["error"]
            self.assertEqual(error["code"], "model_not_specified")
            self.assertIn("no model is loaded", error["message"])
            self.assertIn("available models: a, b", error["message"])
        self.assertEqual(self.w.reactor.spawned, [])

    def test_the_one_loaded_model_answers(self) -> None:
        self.send("POST", "/tokenize", b'{"model": "a", "content": "x"}')
        response, echo = self.tokenize({"content": "x"})
        self.assertEqual((response.code, echo["served_by"]), (200, "a"))
        self.assertIsNone(echo["model"])  # the body went as it came
        props, _content = self.send("GET", "/props")
        self.assertEqual((props.code, self.served_by(props)), (200, "a"))
        self.assertEqual(self.loaded(), ["a"])

    def test_with_two_loaded_the_400_says_which(self) -> None:
        self.send("POST", "/tokenize?model=a", b"{}")
        self.send("POST", "/tokenize?model=bee", b"{}")
        self.assertEqual(self.loaded(), ["a", "b"])
        response, document = self.tokenize({"content": "x"})
        self.assertEqual(response.code, 400)
        self.assertIn("2 models are loaded (a, b)", document["error"]["message"])

    def test_a_model_that_is_not_a_string_is_refused(self) -> None:
        response, document = self.tokenize({"model": 7})
        self.assertEqual(response.code, 400)
        self.assertIn("'model' must be a string", document["error"]["message"])

    def test_an_unknown_model_is_still_a_404(self) -> None:
        response, content = self.send("GET", "/props?model=nope")
        self.assertEqual(response.code, 404)
        self.assertIn(b"available models: a, b", content)

    def test_an_unknown_model_name_is_shown_cut_short(self) -> None:
        response, document = self.tokenize({"model": "x" * 50_000})
        self.assertEqual(response.code, 404)
        message = document["error"]["message"]
        self.assertLess(len(message), 300)  # not the 50 kB the client sent
        self.assertIn("(50000 characters)", message)


class NoModelNamedBesideAnEmbeddingsModelTests(InMemory):
    """The demo's shape: an embeddings model resident beside the chat model.  A
    request that names no model goes to the loaded model that is for its route."""

    config_text = CONFIG.replace("--model b", "--model b --embedding")

    def test_each_route_goes_to_the_loaded_model_that_is_for_it(self) -> None:
        self.send("POST", "/tokenize?model=a", b"{}")
        self.send("POST", "/tokenize?model=b", b"{}")
        self.assertEqual(self.loaded(), ["a", "b"])
        for path, body, model in (
            ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', "a"),
            ("/completion", b'{"prompt": "x"}', "a"),
            ("/v1/embeddings", b'{"input": "x"}', "b"),
            ("/embedding", b'{"content": "x"}', "b"),
        ):
            response, _content = self.send("POST", path, body)
            self.assertEqual((response.code, self.served_by(response)), (200, model), path)
        props, _content = self.send("GET", "/props")
        self.assertEqual((props.code, self.served_by(props)), (200, "a"))
        # no loaded model is for reranking: still a 400 that says which are loaded
        response, content = self.send("POST", "/v1/rerank", b'{"query": "q", "documents": []}')
        self.assertEqual(response.code, 400)
        self.assertIn("2 models are loaded (a, b)", json.loads(content)["error"]["message"])

    def test_with_none_loaded_for_the_route_the_one_configured_for_it_starts(self) -> None:
        response, _content = self.send("POST", "/v1/embeddings", b'{"input": "x"}')
        self.assertEqual((response.code, self.served_by(response)), (200, "b"))
        self.assertEqual(self.loaded(), ["b"])
        # a look at the server is no reason to start another model: the one loaded reads
        props, _content = self.send("GET", "/props")
        self.assertEqual((props.code, self.served_by(props)), (200, "b"))
        self.assertEqual(self.loaded(), ["b"])
        # the embeddings model is loaded, but a chat is not for it: the chat model starts
        chat = b'{"messages": [{"role": "user", "content": "x"}]}'
        response, _content = self.send("POST", "/v1/chat/completions", chat)
        self.assertEqual((response.code, self.served_by(response)), (200, "a"))
        self.assertEqual(self.loaded(), ["a", "b"])


class TwoChatModelsBesideAnEmbeddingsModelTests(InMemory):
    """The demo's shape: only the embeddings model is loaded, two chat models could
    take a chat that names none: it is not sent to the embeddings model, nor guessed."""

    config_text = CONFIG.replace("--model b", "--model b --embedding") + (
        "  c:\n    cmd: sleep --port ${PORT} --model c\n"
    )

    def test_a_chat_that_names_no_model_gets_a_400_naming_the_two(self) -> None:
        self.send("POST", "/v1/embeddings?model=b", b'{"input": "x"}')
        self.assertEqual(self.loaded(), ["b"])
        chat = b'{"messages": [{"role": "user", "content": "x"}]}'
        response, content = self.send("POST", "/v1/chat/completions", chat)
        self.assertEqual(response.code, 400)
        message = json.loads(content)["error"]["message"]
        self.assertIn("1 model is loaded (b); 2 could take it (a, c)", message)
        self.assertEqual(self.loaded(), ["b"])
        response, _content = self.send("POST", "/v1/embeddings", b'{"input": "x"}')
        self.assertEqual((response.code, self.served_by(response)), (200, "b"))


class OneModelTests(InMemory):
    """A config of one model is a single llama-server: requests need not name it."""

    config_text = "models:\n  a:\n    cmd: sleep --port ${PORT} --model a\n"

    def test_a_request_that_names_no_model_starts_the_only_one(self) -> None:
        self.assertEqual(self.loaded(), [])
        props, _content = self.send("GET", "/props")
        self.assertEqual((props.code, self.served_by(props)), (200, "a"))
        chat = b'{"messages": [{"role": "user", "content": "x"}]}'
        response, _content = self.send("POST", "/v1/chat/completions", chat)
        self.assertEqual((response.code, self.served_by(response)), (200, "a"))


class DefaultModelTests(InMemory):
    config_text = CONFIG + "defaultModel: bee\n"

    def test_the_default_model_answers_even_when_another_is_loaded(self) -> None:
        self.send("POST", "/tokenize?model=a", b"{}")
        self.assertEqual(self.loaded(), ["a"])
        for method, path, body in (
            ("POST", "/tokenize", b'{"content": "x"}'),
            ("GET", "/props", None),
            ("POST", "/slots/0?action=erase", b""),
        ):
            response, _content = self.send(method, path, body)
            self.assertEqual((response.code, self.served_by(response)), (200, "b"), path)

    def test_a_named_model_wins_over_the_default(self) -> None:
        response, _content = self.send("POST", "/tokenize", b'{"model": "a"}')
        self.assertEqual(self.served_by(response), "a")

    def test_an_unknown_default_is_a_config_error(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config(CONFIG + "defaultModel: bea\n", "x.yaml")
        self.assertEqual(caught.exception.path, "defaultModel")
        self.assertIn("did you mean 'bee'", str(caught.exception))


class UpstreamKeyTests(InMemory):
    def echo(self, model: str) -> tuple[int, Any]:
        response, content = self.send(
            "POST",
            "/apply-template",
            json.dumps({"model": model, "messages": []}).encode(),
            {"authorization": "Bearer client-key", "x-api-key": "client-key"},
        )
        return response.code, json.loads(content)

    def test_the_child_gets_its_own_key_and_never_the_clients(self) -> None:
        code, echo = self.echo("b")
        self.assertEqual(code, 200)
        self.assertEqual(echo["headers"]["authorization"], "Bearer child-key")
        self.assertEqual(echo["headers"]["x-api-key"], "child-key")
        code, echo = self.echo("a")
        self.assertEqual(code, 200)
        self.assertNotIn("authorization", echo["headers"])
        self.assertNotIn("x-api-key", echo["headers"])

    def test_the_raw_pass_through_sends_it_too(self) -> None:
        _response, content = self.send("POST", "/upstream/b/tokenize", b"{}")
        self.assertEqual(json.loads(content)["headers"]["authorization"], "Bearer child-key")

    def test_without_it_a_protected_child_refuses(self) -> None:
        self.servers["a"].api_keys = frozenset({"other-key"})
        code, document = self.echo("a")
        self.assertEqual((code, document), (401, UNAUTHORIZED_BODY))

    def test_the_key_shows_nowhere(self) -> None:
        self.echo("b")
        shown = [
            repr(self.w.config),
            str(self.w.config.models["b"]),
            *self.w.logs.combined_history(),
        ]
        for path in ("/running", "/v1/models", "/openapi.json", "/logs"):
            _response, content = self.send("GET", path)
            shown.append(content.decode())
        # an error about this model (it is gone) does not carry it either
        self.w.child("b").exit(1)
        self.flush()
        self.servers["b"].api_keys = frozenset()
        _response, content = self.send("GET", "/props?model=b")
        shown.append(content.decode())
        for text in shown:
            self.assertNotIn("child-key", text)

    def test_it_may_not_be_combined_with_forwarding_the_clients(self) -> None:
        text = CONFIG.replace(
            "upstreamApiKey: child-key", "upstreamApiKey: k\n    forwardAuthorization: true"
        )
        with self.assertRaises(ConfigError) as caught:
            parse_config(text, "x.yaml")
        self.assertEqual(caught.exception.path, "models.b.upstreamApiKey")

    def test_it_comes_from_the_environment_and_is_never_echoed_when_bad(self) -> None:
        text = CONFIG.replace("child-key", "${env.CHILD_KEY}")
        config = parse_config(text, "x.yaml", environ={"CHILD_KEY": "from-env"})
        self.assertEqual(config.models["b"].upstream_api_key, "from-env")
        with self.assertRaises(ConfigError) as caught:
            parse_config(text, "x.yaml", environ={"CHILD_KEY": "two words"})
        self.assertNotIn("two words", str(caught.exception))


class LiveRoutes(LiveTestCase):
    CONFIG = f"""
apiKeys: [client-key]
groups:
  together:
    members: [alpha, beta]
    swap: false
models:
  alpha:
    cmd: {FAKE}
  beta:
    cmd: {FAKE} --api-key child-secret
    upstreamApiKey: child-secret
"""
    KEY = {"authorization": "Bearer client-key", "content-type": "application/json"}

    async def test_llama_server_routes_reach_the_right_child_over_sockets(self) -> None:
        await self.serve(self.CONFIG)
        for model in ("alpha", "beta"):
            body = json.dumps({"model": model, "content": "a b c"}).encode()
            reply = await self.request("POST", "/tokenize", body, self.KEY)
            self.assertEqual(reply.code, 200, reply.body)
            echo = reply.json()
            self.assertEqual((echo["served_by"], echo["body_length"]), (model, len(body)))
            slots = await self.request(
                "GET", "/slots?" + urlencode({"model": model}), None, self.KEY
            )
            self.assertEqual(slots.header("x-fake-served-by"), model)

    async def test_a_protected_child_gets_its_key_and_a_client_without_one_is_refused(
        self,
    ) -> None:
        await self.serve(self.CONFIG)
        body = json.dumps({"model": "beta", "messages": []}).encode()
        reply = await self.request("POST", "/apply-template", body, self.KEY)
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.json()["headers"]["authorization"], "Bearer child-secret")
        refused = await self.request(
            "POST", "/apply-template", body, {"content-type": "application/json"}
        )
        self.assertEqual(refused.code, 401)  # llamaswap's own key is still required

    async def test_a_client_written_for_one_server_needs_no_model(self) -> None:
        await self.serve(self.CONFIG)
        first = await self.request("POST", "/tokenize", b'{"content": "x"}', self.KEY)
        self.assertEqual(first.code, 400)
        self.assertIn("alpha, beta", first.json()["error"]["message"])
        await self.request("POST", "/api/models/load/beta", b"", self.KEY)
        reply = await self.request("POST", "/completions", b'{"prompt": "hi"}', self.KEY)
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.header("x-fake-served-by"), "beta")
        props = await self.request("GET", "/props", None, self.KEY)
        self.assertEqual(props.json()["model_path"], "beta.gguf")
        health = await self.request("GET", "/v1/health")
        self.assertEqual((health.code, health.json()), (200, {"status": "ok"}))
