"""Integration: real sockets, real child processes (the fake llama-server)."""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Site

from llamaswap.childhttp import MAX_HEAD
from llamaswap.config import parse_config
from llamaswap.relay import BytesProducer
from llamaswap.tap import build

from .integration import FAKE, LiveTestCase, StreamReader, pid_alive
from .test_childhttp import _Server, endless_headers

TWO = f"""
models:
  alpha:
    cmd: {FAKE} --load-time 0.1
    aliases: [a]
    name: Alpha
    description: the first one
  beta:
    cmd: {FAKE} --token-delay 0.02
  hidden:
    cmd: {FAKE}
    unlisted: true
    useModelName: renamed-upstream
  org/with-slash:
    cmd: {FAKE}
"""


class SwapTests(LiveTestCase):
    async def test_two_models_answer_with_a_swap_between_them(self) -> None:
        await self.serve(TWO)
        first = await self.chat("alpha")
        self.assertEqual(first.code, 200)
        self.assertIn("model=alpha", first.json()["choices"][0]["message"]["content"])
        alpha_pid = (await self.running())["alpha"]["pid"]

        second = await self.chat("beta")
        self.assertIn("model=beta", second.json()["choices"][0]["message"]["content"])
        running = await self.running()
        self.assertEqual(list(running), ["beta"])
        self.assertFalse(pid_alive(alpha_pid))

        via_alias = await self.chat("a")
        self.assertIn(
            "model=alpha requested=a", via_alias.json()["choices"][0]["message"]["content"]
        )
        self.assertEqual(list(await self.running()), ["alpha"])

    async def test_no_child_is_left_after_stop_service(self) -> None:
        await self.serve(TWO)
        await self.chat("alpha")
        pid = (await self.running())["alpha"]["pid"]
        self.assertTrue(pid_alive(pid))
        await self.service.stopService()
        self.assertFalse(pid_alive(pid))

    async def test_wrapper_scripts_children_are_stopped_too(self) -> None:
        wrapped = f"sh -c '{FAKE} & wait' "
        await self.serve(f"models:\n  w:\n    cmd: {wrapped}\n".replace("${MODEL_ID}", "w"))
        reply = await self.request("GET", "/upstream/w/fake/stats")
        server_pid = reply.json()["pid"]
        wrapper_pid = (await self.running())["w"]["pid"]
        self.assertNotEqual(server_pid, wrapper_pid)
        await self.post("/api/models/unload/w", {})
        self.assertFalse(pid_alive(wrapper_pid))
        await self.eventually(self._gone(server_pid), "the wrapped server exits")

    def _gone(self, pid: int) -> Any:
        async def check() -> bool:
            return not pid_alive(pid)

        return check

    async def test_port_macro_skips_a_port_that_is_taken(self) -> None:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        start = taken.getsockname()[1]
        await self.serve(f"startPort: {start}\nmodels:\n  alpha:\n    cmd: {FAKE}\n")
        reply = await self.chat("alpha")
        self.assertEqual(reply.code, 200)
        proxy = (await self.running())["alpha"]["proxy"]
        self.assertNotEqual(proxy, f"http://127.0.0.1:{start}")


class StreamingTests(LiveTestCase):
    async def test_sse_arrives_incrementally_and_a_hang_up_stops_generation(self) -> None:
        await self.serve(TWO)
        response, reader = await self.stream(
            {"model": "beta", "stream": True, "messages": [], "fake": {"hold": True, "tokens": 3}}
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        # the upstream is still generating ("hold"), yet the tokens are here
        await reader.until(b" t2")
        self.assertNotIn("[DONE]", reader.text)
        stats = (await self.request("GET", "/upstream/beta/fake/stats")).json()
        self.assertEqual(stats["active"], 1)

        reader.hang_up()
        await reader.done

        async def cancelled() -> bool:
            stats = (await self.request("GET", "/upstream/beta/fake/stats")).json()
            return bool(stats["cancelled"] == 1 and stats["active"] == 0)

        await self.eventually(cancelled, "the upstream generation is cancelled")
        # the lease was released: nothing in flight
        self.assertEqual(self.api.scheduler.in_flight("beta"), 0)

    async def test_a_complete_stream_ends_with_done(self) -> None:
        await self.serve(TWO)
        _response, reader = await self.stream({"model": "alpha", "stream": True, "messages": []})
        await reader.done
        self.assertTrue(reader.text.rstrip().endswith("data: [DONE]"))
        self.assertGreater(reader.text.count("data: "), 5)

    async def test_a_client_that_leaves_while_queued_leaves_the_queue(self) -> None:
        await self.serve(TWO)
        # alpha busy with a held stream; a request for beta waits behind it
        _, holder = await self.stream(
            {"model": "alpha", "stream": True, "messages": [], "fake": {"hold": True}}
        )
        await holder.until(b"t0")
        waiting = self.agent.request(
            b"POST",
            (self.base + "/v1/chat/completions").encode(),
            Headers({"content-type": ["application/json"]}),
            BytesProducer(b'{"model": "beta", "messages": []}'),
        )

        async def queued() -> bool:
            return self.api.scheduler.queued("beta") == 1

        await self.eventually(queued, "beta is queued")
        waiting.cancel()
        self.failureResultOf(waiting)

        async def left() -> bool:
            return self.api.scheduler.queued("beta") == 0

        await self.eventually(left, "beta leaves the queue")
        holder.hang_up()
        await holder.done
        # beta was never started, alpha keeps running
        self.assertEqual(list(await self.running()), ["alpha"])


class ErrorTests(LiveTestCase):
    def assertError(self, reply: Any, status: int, *fragments: str) -> dict[str, Any]:
        self.assertEqual(reply.code, status, reply.body)
        self.assertEqual(reply.header("content-type"), "application/json")
        error: dict[str, Any] = reply.json()["error"]
        self.assertEqual(set(error), {"message", "type", "code"})
        for fragment in fragments:
            self.assertIn(fragment, error["message"])
        return error

    async def test_bad_requests_are_400_with_an_openai_error(self) -> None:
        await self.serve(TWO)
        json_ct = {"content-type": "application/json"}
        self.assertError(
            await self.request("POST", "/v1/chat/completions", b'{"model": ', json_ct),
            400,
            "not valid JSON",
        )
        self.assertError(
            await self.request("POST", "/v1/chat/completions", b"", json_ct),
            400,
            "the request body is empty: send a JSON object",
        )
        self.assertError(
            await self.request("POST", "/v1/chat/completions", b"[1, 2]", json_ct),
            400,
            "must be a JSON object",
        )
        self.assertError(await self.post("/v1/chat/completions", {"messages": []}), 400, "'model'")
        self.assertError(await self.post("/v1/embeddings", {"model": 7}), 400, "'model'")
        self.assertError(await self.request("GET", "/props"), 400, "?model=")
        form = (
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            b"RIFF\r\n--XyZ--\r\n"
        )
        self.assertError(
            await self.request(
                "POST",
                "/v1/audio/transcriptions",
                form,
                {"content-type": "multipart/form-data; boundary=XyZ"},
            ),
            400,
            "'model' field",
        )
        self.assertEqual(self.api.scheduler.processes["alpha"].state.value, "stopped")

    async def test_unknown_model_is_404_and_lists_the_valid_ids(self) -> None:
        await self.serve(TWO)
        error = self.assertError(
            await self.chat("gpt-5"), 404, "'gpt-5'", "alpha, beta, org/with-slash"
        )
        self.assertEqual(error["code"], "model_not_found")
        self.assertNotIn("hidden", error["message"])
        self.assertError(await self.request("GET", "/upstream/nope/health"), 404, "'nope'")
        self.assertError(await self.request("GET", "/no/such/route"), 404, "/no/such/route")

    async def test_start_failure_is_503_naming_model_cause_and_output(self) -> None:
        await self.serve(f"models:\n  broken:\n    cmd: {FAKE} --fail-start 3\n")
        self.assertError(
            await self.chat("broken"),
            503,
            "'broken'",
            "exited with code 3",
            "error loading model: fake failure",
        )

    async def test_health_timeout_is_503(self) -> None:
        await self.serve(
            f"healthCheckTimeout: 0.5\nmodels:\n  stuck:\n    cmd: {FAKE} --hang-health\n"
        )
        self.assertError(await self.chat("stuck"), 503, "'stuck'", "not ready after 0.5s")
        self.assertEqual(await self.running(), {})

    async def test_missing_binary_is_503(self) -> None:
        await self.serve("models:\n  gone:\n    cmd: /nonexistent/llama-server --port ${PORT}\n")
        self.assertError(await self.chat("gone"), 503, "command not found")

    async def test_unreachable_upstream_is_502(self) -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        await self.serve(
            f"models:\n  deaf:\n    cmd: sleep 60\n    proxy: http://127.0.0.1:{port}\n"
            "    checkEndpoint: none\n"
        )
        self.assertError(await self.chat("deaf"), 502, "did not answer")
        self.assertEqual(self.api.scheduler.in_flight("deaf"), 0)

    async def test_upstream_errors_pass_through_untouched(self) -> None:
        await self.serve(TWO)
        reply = await self.chat("alpha", fake={"status": 418})
        self.assertEqual(reply.code, 418)
        self.assertEqual(
            reply.json(),
            {"error": {"message": "fake upstream error", "type": "fake", "code": 418}},
        )


ANY_PAYLOAD = {"prompt": "x", "input": "x", "query": "q", "documents": ["d"]}


class RouteTests(LiveTestCase):
    async def test_every_model_route_reaches_the_model(self) -> None:
        await self.serve(TWO)
        for path in (
            "/v1/completions",
            "/v1/responses",
            "/v1/embeddings",
            "/v1/rerank",
            "/v1/reranking",
            "/rerank",
            "/reranking",
            "/v1/messages",
            "/v1/messages/count_tokens",
            "/infill",
            "/completion",
            "/v1/audio/speech",
            "/v1/images/generations",
        ):
            document = {
                "model": "alpha",
                "prompt": "x",
                "input": "x",
                "query": "q",
                "documents": ["d"],
            }
            reply = await self.post(path, document)
            self.assertEqual(reply.code, 200, path)
            self.assertEqual(reply.header("x-fake-served-by"), "alpha", path)

    async def test_multipart_model_comes_from_the_form(self) -> None:
        await self.serve(TWO)
        form = (
            b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nbeta\r\n'
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\nRIFF....\r\n--XyZ--\r\n"
        )
        for path in ("/v1/audio/transcriptions", "/v1/images/edits"):
            reply = await self.request(
                "POST", path, form, {"content-type": "multipart/form-data; boundary=XyZ"}
            )
            self.assertEqual(reply.code, 200)
            echo = reply.json()
            self.assertEqual(
                (echo["served_by"], echo["model"], echo["path"]), ("beta", "beta", path)
            )
            self.assertEqual(echo["body_length"], len(form))

    async def test_use_model_name_rewrites_the_model_sent_upstream(self) -> None:
        await self.serve(TWO)
        echo = (await self.post("/v1/responses", {"model": "hidden", "input": "x"})).json()
        self.assertEqual((echo["served_by"], echo["model"]), ("hidden", "renamed-upstream"))

    async def test_props_and_upstream_passthrough_with_slash_ids(self) -> None:
        await self.serve(TWO)
        props = await self.request("GET", "/props?model=alpha")
        self.assertEqual(props.code, 200)
        self.assertTrue(props.json()["fake"])
        models = await self.request("GET", "/upstream/org/with-slash/v1/models")
        self.assertEqual(models.json()["data"][0]["id"], "org/with-slash")
        echo = (await self.post("/upstream/a/anything?x=1", {"model": "whatever"})).json()
        self.assertEqual(
            (echo["served_by"], echo["path"], echo["query"]), ("alpha", "/anything", "x=1")
        )


class ManagementTests(LiveTestCase):
    async def test_models_list_hides_unlisted_and_shows_state(self) -> None:
        await self.serve(TWO)
        await self.chat("alpha")
        for path in ("/v1/models", "/models"):
            listing = (await self.request("GET", path)).json()
            self.assertEqual(listing["object"], "list")
            by_id = {m["id"]: m for m in listing["data"]}
            self.assertEqual(sorted(by_id), ["alpha", "beta", "org/with-slash"])
            self.assertEqual(by_id["alpha"]["status"]["value"], "ready")
            self.assertEqual(by_id["alpha"]["name"], "Alpha")
            self.assertEqual(by_id["alpha"]["description"], "the first one")
            self.assertEqual(by_id["beta"]["status"]["value"], "stopped")

    async def test_one_model_is_retrieved_by_id_or_alias(self) -> None:
        """OpenAI's "retrieve model" (the SDK's ``models.retrieve``)."""
        await self.serve(TWO)
        listing = (await self.request("GET", "/v1/models")).json()["data"]
        for path in ("/v1/models/org/with-slash", "/models/org/with-slash"):
            one = await self.request("GET", path)
            self.assertEqual(one.code, 200)
            self.assertEqual(one.json(), next(m for m in listing if m["id"] == "org/with-slash"))
        alias = (await self.request("GET", "/v1/models/a")).json()
        self.assertEqual((alias["id"], alias["alias_of"], alias["name"]), ("a", "alpha", "Alpha"))
        hidden = (await self.request("GET", "/v1/models/hidden")).json()
        self.assertEqual(hidden["id"], "hidden")
        self.assertNotIn("alias_of", hidden)
        missing = await self.request("GET", "/v1/models/nope")
        self.assertEqual(missing.code, 404)
        self.assertEqual(missing.json()["error"]["code"], "model_not_found")
        self.assertIn("available models: alpha, beta, org/with-slash", missing.body.decode())
        self.assertEqual(await self.running(), {})  # asking starts nothing

    async def test_a_doubled_v1_in_the_base_url_is_pointed_out(self) -> None:
        await self.serve(TWO)
        reply = await self.post("/v1/v1/chat/completions", {"model": "alpha"})
        self.assertEqual(reply.code, 404)
        self.assertIn("give it http://<host>:<port>/v1 once", reply.json()["error"]["message"])

    async def test_a_wrong_method_is_told_the_right_one(self) -> None:
        await self.serve(TWO)
        chat = await self.request("GET", "/v1/chat/completions")
        self.assertEqual(chat.code, 405)
        self.assertIn("(allowed: OPTIONS, POST)", chat.json()["error"]["message"])
        router = await self.post("/models/load", {"model": "alpha"})  # llama-server's router
        self.assertIn("llamaswap's own is POST /api/models/load/<model id>", router.body.decode())
        self.assertEqual(await self.running(), {})

    async def test_health_and_unload_endpoints(self) -> None:
        await self.serve(TWO)
        health = await self.request("GET", "/health")
        self.assertEqual((health.code, health.body), (200, b"OK"))
        await self.chat("alpha")
        reply = await self.post("/api/models/unload/a", {})
        self.assertEqual(reply.json(), {"msg": "ok"})
        self.assertEqual(await self.running(), {})
        await self.chat("beta")
        self.assertEqual((await self.request("GET", "/unload")).body, b"OK")
        self.assertEqual(await self.running(), {})
        await self.chat("beta")
        self.assertEqual((await self.post("/api/models/unload", {})).json(), {"msg": "ok"})
        self.assertEqual(await self.running(), {})
        missing = await self.post("/api/models/unload/nope", {})
        self.assertEqual(missing.code, 404)

    async def test_logs_history_and_live_stream(self) -> None:
        await self.serve(TWO)
        await self.chat("alpha")
        text = (await self.request("GET", "/logs")).body.decode()
        self.assertIn("starting alpha", text)  # llamaswap's own line
        self.assertIn("[alpha] main: model loaded", text)  # the child's line

        response: IResponse = await self.agent.request(
            b"GET", (self.base + "/logs/stream/alpha").encode()
        )
        reader = StreamReader()
        response.deliverBody(reader)
        await reader.until(b"main: model loaded")  # history first
        await self.chat("alpha", fake={"tokens": 1})
        await reader.until(b"log_server_r: request: POST /v1/chat/completions")  # then live
        reader.hang_up()
        await reader.done

        no_history: IResponse = await self.agent.request(
            b"GET", (self.base + "/logs/stream?no-history").encode()
        )
        quiet = StreamReader()
        no_history.deliverBody(quiet)
        await self.request("GET", "/unload")
        await quiet.until(b"stopping alpha")
        self.assertNotIn("starting alpha", quiet.text)
        quiet.hang_up()
        await quiet.done


MANAGED = f"""
hooks:
  on_startup:
    preload: [embed]
groups:
  resident:
    members: [embed]
    persistent: true
    exclusive: false
profiles:
  pair: [chat, helper]
models:
  chat:
    cmd: {FAKE}
    concurrencyLimit: 1
    metadata: {{family: '${{MODEL_ID}}', params_b: 7}}
    filters:
      stripParams: top_k
      setParams: {{temperature: 0.1}}
      setParamsByID:
        chat-creative: {{temperature: 1.5}}
  helper:
    cmd: {FAKE}
  embed:
    cmd: {FAKE} --embedding
"""


class ModelManagementTests(LiveTestCase):
    async def test_preload_starts_models_at_boot_without_a_request(self) -> None:
        await self.serve(MANAGED)

        async def preloaded() -> bool:
            entry = (await self.running()).get("embed")
            return entry is not None and entry["state"] == "ready"

        await self.eventually(preloaded, "embed is preloaded")

    async def test_filters_and_variants_rewrite_the_body_of_one_loaded_model(self) -> None:
        await self.serve(MANAGED)
        plain = (await self.post("/v1/responses", {"model": "chat", "top_k": 3, "x": 1})).json()
        self.assertEqual(plain["json"], {"model": "chat", "x": 1, "temperature": 0.1})
        pid = (await self.running())["chat"]["pid"]
        variant = (await self.post("/v1/responses", {"model": "chat-creative"})).json()
        self.assertEqual(variant["json"], {"model": "chat-creative", "temperature": 1.5})
        self.assertEqual(variant["served_by"], "chat")
        self.assertEqual((await self.running())["chat"]["pid"], pid)  # no reload

    async def test_profile_runs_its_models_together_and_persistent_groups_stay(self) -> None:
        await self.serve(MANAGED)
        await self.chat("embed")
        reply = await self.chat("pair:helper")
        self.assertEqual(reply.code, 200)
        self.assertEqual(sorted(await self.running()), ["chat", "embed", "helper"])
        listing = {m["id"] for m in (await self.request("GET", "/v1/models")).json()["data"]}
        self.assertTrue(
            {"pair:chat", "pair:helper", "chat-creative"} - listing == {"chat-creative"}
        )

    async def test_explicit_load_answers_when_ready_or_with_the_start_error(self) -> None:
        await self.serve(MANAGED + f"  broken:\n    cmd: {FAKE} --fail-start 4\n")
        loaded = await self.request("POST", "/api/models/load/helper")
        self.assertEqual(loaded.code, 200)
        self.assertEqual(loaded.json()["state"], "ready")
        self.assertEqual((await self.running())["helper"]["state"], "ready")
        failed = await self.request("POST", "/api/models/load/broken")
        self.assertEqual(failed.code, 503)
        self.assertIn("exited with code 4", failed.json()["error"]["message"])
        self.assertEqual((await self.request("POST", "/api/models/load/nope")).code, 404)

    async def test_concurrency_limit_is_429_and_running_shows_the_details(self) -> None:
        await self.serve(MANAGED)
        held = self.agent.request(
            b"POST",
            (self.base + "/v1/chat/completions").encode(),
            Headers({"content-type": ["application/json"]}),
            BytesProducer(b'{"model": "chat", "stream": true, "fake": {"hold": true}}'),
        )
        response = await held
        reader = StreamReader()
        response.deliverBody(reader)
        await reader.until(b"t0")
        refused = await self.chat("chat")
        self.assertEqual(refused.code, 429)
        self.assertEqual(refused.header("retry-after"), "1")
        self.assertEqual(refused.json()["error"]["code"], "concurrency_limit")
        entry = (await self.running())["chat"]
        self.assertEqual(entry["in_flight"], 1)
        self.assertGreater(entry["uptime"], 0)
        self.assertIsInstance(entry["port"], int)
        models = {m["id"]: m for m in (await self.request("GET", "/v1/models")).json()["data"]}
        self.assertEqual(
            models["chat"]["meta"],
            {"llamaswap": {"family": "chat", "params_b": 7}},
        )
        reader.hang_up()
        await reader.done


LOADING = f"""
sendLoadingState: true
models:
  slow:
    cmd: {FAKE} --load-time 1.2
  broken:
    cmd: {FAKE} --fail-start 5
  quiet:
    cmd: {FAKE}
    sendLoadingState: false
"""


class LoadingStateTests(LiveTestCase):
    async def stream_text(self, model: str) -> tuple[int, str]:
        response: IResponse = await self.agent.request(
            b"POST",
            (self.base + "/v1/chat/completions").encode(),
            Headers({"content-type": ["application/json"]}),
            BytesProducer(json.dumps({"model": model, "stream": True, "messages": []}).encode()),
        )
        reader = StreamReader()
        response.deliverBody(reader)
        await reader.done
        return response.code, reader.text

    def deltas(self, text: str, key: str) -> list[str]:
        found = []
        for line in text.splitlines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                for choice in event.get("choices", []):
                    if key in choice["delta"]:
                        found.append(choice["delta"][key])
        return found

    async def test_progress_then_the_models_own_stream_on_one_response(self) -> None:
        await self.serve(LOADING)
        code, text = await self.stream_text("slow")
        self.assertEqual(code, 200)
        progress = "".join(self.deltas(text, "reasoning_content"))
        self.assertIn("slow is not loaded yet", progress)
        self.assertIn("Starting slow", progress)
        self.assertIn("Loading slow: 50%", progress)  # the child's own progress lines
        self.assertIn("slow is ready after", progress)
        content = "".join(self.deltas(text, "content"))
        self.assertIn("fake-reply model=slow", content)
        self.assertTrue(text.rstrip().endswith("data: [DONE]"))
        # once loaded, no progress any more
        _, again = await self.stream_text("slow")
        self.assertEqual(self.deltas(again, "reasoning_content"), [])

    async def test_a_start_failure_ends_the_stream_with_an_error_event(self) -> None:
        await self.serve(LOADING)
        code, text = await self.stream_text("broken")
        self.assertEqual(code, 200)
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        self.assertIn("error", events[-1])
        self.assertIn("exited with code 5", events[-1]["error"]["message"])
        self.assertTrue(text.rstrip().endswith("data: [DONE]"))

    async def test_non_streaming_and_opted_out_requests_are_unaffected(self) -> None:
        await self.serve(LOADING)
        reply = await self.chat("slow")
        self.assertEqual(reply.code, 200)
        self.assertIn("fake-reply", reply.json()["choices"][0]["message"]["content"])
        _, text = await self.stream_text("quiet")
        self.assertEqual(self.deltas(text, "reasoning_content"), [])


async def _close_all(server: _Server) -> None:
    for peer in server.peers:
        if peer.transport is not None:
            peer.transport.abortConnection()  # type: ignore[attr-defined]
        await peer.lost


class PeerTests(LiveTestCase):
    async def test_a_peer_llamaswap_serves_its_models_through_this_one(self) -> None:
        # the "GPU box": another llamaswap with its own model
        remote_config = (
            f"store: {{path: ':memory:'}}\n"
            f"models:\n  big:\n    cmd: {FAKE}\n    forwardAuthorization: true\n"
        )
        remote = build(parse_config(remote_config, "remote.yaml"), reactor)
        remote.startService()
        self.addCleanup(remote.stopService)
        site: Any = Site(remote.api.resource())
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # by host name: resolved, and read by the lean client as children are
        remote_url = f"http://localhost:{port.getHost().port}"  # type: ignore[attr-defined]
        await self.serve(
            f"models:\n  small:\n    cmd: {FAKE}\n"
            f"peers:\n  gpu-box:\n    proxy: {remote_url}\n    models: [big]\n"
            "    apiKey: sekrit\n    filters:\n      setParams: {temperature: 0.5}\n"
        )
        by_fqn = await self.post("/v1/responses", {"model": "gpu-box/big", "input": "x"})
        self.assertEqual(by_fqn.code, 200)
        echo = by_fqn.json()
        self.assertEqual(echo["served_by"], "big")
        self.assertEqual(echo["json"], {"model": "big", "input": "x", "temperature": 0.5})
        self.assertEqual(echo["headers"]["authorization"], "Bearer sekrit")
        bare = await self.chat("big")
        self.assertIn("model=big", bare.json()["choices"][0]["message"]["content"])
        self.assertEqual(await self.running(), {})  # nothing started locally
        listing = {m["id"]: m for m in (await self.request("GET", "/v1/models")).json()["data"]}
        self.assertEqual(listing["gpu-box/big"]["owned_by"], "gpu-box")

    async def test_a_peer_sending_headers_for_ever_is_a_502_naming_the_cap(self) -> None:
        """Twisted's client has no cap on a head: this held the client for ever while
        llamaswap's memory grew by tens of MB a second."""
        hostile = _Server([endless_headers])
        port = reactor.listenTCP(0, hostile, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(_close_all, hostile)
        number = port.getHost().port  # type: ignore[attr-defined]
        await self.serve(
            f"models:\n  small:\n    cmd: {FAKE}\n"
            f"peers:\n  hostile:\n    proxy: http://localhost:{number}\n    models: [big]\n"
        )
        reply = await Deferred.fromCoroutine(self.chat("hostile/big")).addTimeout(10, reactor)
        self.assertEqual(reply.code, 502)
        message = reply.json()["error"]["message"]
        self.assertIn(f"an answer's head longer than {MAX_HEAD} bytes", message)
        self.assertIn("peer 'hostile'", message)
        await hostile.peers[0].lost  # the connection is dropped

    async def test_an_unreachable_peer_is_a_502_naming_it(self) -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
        closed.close()
        await self.serve(
            f"models:\n  small:\n    cmd: {FAKE}\n"
            f"peers:\n  far:\n    proxy: http://127.0.0.1:{dead}\n    models: [big]\n"
        )
        reply = await self.chat("far/big")
        self.assertEqual(reply.code, 502)
        self.assertIn("peer 'far'", reply.json()["error"]["message"])
