"""Tests for the fake llama-server that the rest of llamaswap is tested against."""

# trial's assertion helpers (and a few twisted.web constructors) are unannotated.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import treq
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed

import llamaswap
from llamaswap.testing.fake_server import FakeLlamaServer

BASE = "http://fake.invalid"


class _Disconnect(Exception):
    """Raised by a body collector to make treq drop the connection."""


class _Harness:
    """A fake server on a deterministic clock, reached through StubTreq."""

    def __init__(self, **kwargs: Any) -> None:
        self.clock = Clock()
        self.server = FakeLlamaServer(clock=self.clock, **kwargs)
        # StubTreq grows its request methods at runtime, so mypy cannot see them.
        self.stub: Any = StubTreq(self.server.resource())
        self.server.start()

    def advance(self, seconds: float) -> None:
        """Move time forward and deliver whatever the server wrote."""
        self.clock.advance(seconds)
        self.stub.flush()

    def drop_clients(self) -> None:
        """Close every open client connection, as a client giving up would.

        treq's testing agent has no public way to do this, so reach into its
        in-memory pumps.
        """
        for pump in list(self.stub._agent._pumps):
            pump.clientIO.loseConnection()
        self.stub.flush()

    def get(self, test: SynchronousTestCase, path: str) -> tuple[int, Any]:
        response = test.successResultOf(self.stub.get(BASE + path))
        body = test.successResultOf(self.stub.content(response))
        return response.code, json.loads(body)

    def post_response(self, test: SynchronousTestCase, path: str, body: object) -> Any:
        """POST JSON and return the treq response once its headers arrive."""
        d = self.stub.post(
            BASE + path,
            data=json.dumps(body).encode(),
            headers={b"content-type": [b"application/json"]},
        )
        self.stub.flush()
        return test.successResultOf(d)

    def post(self, test: SynchronousTestCase, path: str, body: object) -> tuple[int, Any]:
        response = self.post_response(test, path, body)
        content = test.successResultOf(self.stub.content(response))
        return response.code, json.loads(content)

    def stats(self, test: SynchronousTestCase) -> dict[str, Any]:
        code, stats = self.get(test, "/fake/stats")
        test.assertEqual(code, 200)
        assert isinstance(stats, dict)
        return stats


def _events(chunks: list[bytes]) -> list[str]:
    """Split collected SSE bytes into the ``data:`` payloads."""
    raw = b"".join(chunks).decode()
    events = [e for e in raw.split("\n\n") if e]
    for event in events:
        assert event.startswith("data: "), event
    return [event[len("data: ") :] for event in events]


class HealthTests(SynchronousTestCase):
    def test_loading_then_ok(self) -> None:
        """/health is 503 "Loading model" until load_time has elapsed."""
        h = _Harness(load_time=5.0)
        code, body = h.get(self, "/health")
        self.assertEqual(code, 503)
        self.assertEqual(
            body,
            {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
        )
        h.advance(4.9)
        self.assertEqual(h.get(self, "/health")[0], 503)
        h.advance(0.1)
        self.assertEqual(h.get(self, "/health"), (200, {"status": "ok"}))

    def test_generation_refused_while_loading(self) -> None:
        h = _Harness(load_time=1.0)
        code, _ = h.post(self, "/v1/chat/completions", {"messages": []})
        self.assertEqual(code, 503)
        # Model listing stays available, as with llama-server.
        self.assertEqual(h.get(self, "/v1/models")[0], 200)

    def test_hang_health(self) -> None:
        h = _Harness(load_time=1.0, hang_health=True)
        h.advance(1000)
        self.assertEqual(h.get(self, "/health")[0], 503)
        self.assertFalse(h.server.ready)

    def test_zero_load_time_is_ready_at_once(self) -> None:
        self.assertEqual(_Harness().get(self, "/health")[0], 200)


class InfoTests(SynchronousTestCase):
    def test_models(self) -> None:
        h = _Harness(model="qwen")
        for path in ("/v1/models", "/models"):
            code, body = h.get(self, path)
            self.assertEqual(code, 200)
            self.assertEqual(body["object"], "list")
            self.assertEqual([m["id"] for m in body["data"]], ["qwen"])

    def test_props(self) -> None:
        code, body = _Harness(model="qwen").get(self, "/props")
        self.assertEqual(code, 200)
        self.assertEqual(body["model_path"], "qwen.gguf")
        self.assertEqual(body["total_slots"], 1)
        self.assertIs(body["fake"], True)
        self.assertIn("default_generation_settings", body)

    def test_env(self) -> None:
        name = "LLAMASWAP_FAKE_TEST_VAR"
        self.patch(os, "environ", {**os.environ, name: "hello"})
        h = _Harness()
        self.assertEqual(
            h.get(self, f"/fake/env?name={name}"), (200, {"name": name, "value": "hello"})
        )
        self.assertEqual(h.get(self, "/fake/env?name=NOPE_NOT_SET")[1]["value"], None)

    def test_unknown_get_is_404_json(self) -> None:
        code, body = _Harness().get(self, "/nope")
        self.assertEqual(code, 404)
        self.assertEqual(body["error"]["code"], 404)


class ChatTests(SynchronousTestCase):
    def test_non_streaming(self) -> None:
        """The reply names both models and carries usage and llama.cpp timings."""
        h = _Harness(model="served", tokens=3, token_delay=0.0)
        code, body = h.post(
            self,
            "/v1/chat/completions",
            {"model": "asked", "messages": [{"role": "user", "content": "one two three"}]},
        )
        self.assertEqual(code, 200)
        self.assertEqual(body["object"], "chat.completion")
        content = body["choices"][0]["message"]["content"]
        self.assertEqual(content, "fake-reply model=served requested=asked tokens: t0 t1 t2")
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        self.assertEqual(
            body["usage"], {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
        )
        self.assertEqual(
            set(body["timings"]),
            {
                "cache_n",
                "prompt_n",
                "prompt_ms",
                "prompt_per_second",
                "predicted_n",
                "predicted_ms",
                "predicted_per_second",
            },
        )
        self.assertEqual(body["timings"]["predicted_n"], 3)

    def test_non_streaming_takes_token_time(self) -> None:
        h = _Harness(tokens=4, token_delay=0.5)
        d = h.stub.post(BASE + "/v1/chat/completions", data=b'{"messages": []}')
        h.stub.flush()
        self.assertNoResult(d)
        self.assertEqual(h.get(self, "/slots")[1], [{"id": 0, "is_processing": True}])
        h.advance(2.0)
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(h.get(self, "/slots")[1], [{"id": 0, "is_processing": False}])

    def test_streaming_is_incremental(self) -> None:
        """Tokens arrive one per token_delay as the clock advances."""
        h = _Harness(model="served", tokens=3, token_delay=1.0)
        response = h.post_response(
            self, "/v1/chat/completions", {"model": "asked", "stream": True, "messages": []}
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        h.stub.flush()
        counts = [len(_events(chunks))]
        for _ in range(4):
            h.advance(1.0)
            counts.append(len(_events(chunks)))
        self.successResultOf(done)
        # role chunk, then t0, t1, t2, then final chunk + [DONE] together.
        self.assertEqual(counts, [1, 2, 3, 4, 6])
        events = _events(chunks)
        self.assertEqual(events[-1], "[DONE]")
        parsed = [json.loads(e) for e in events[:-1]]
        self.assertTrue(all(p["object"] == "chat.completion.chunk" for p in parsed))
        text = "".join(p["choices"][0]["delta"].get("content", "") for p in parsed)
        self.assertEqual(text, "fake-reply model=served requested=asked tokens: t0 t1 t2")
        final = parsed[-1]
        self.assertEqual(final["choices"][0]["finish_reason"], "stop")
        self.assertEqual(final["usage"]["completion_tokens"], 3)
        self.assertEqual(final["timings"]["predicted_n"], 3)
        self.assertEqual(h.server.active, 0)

    def test_per_request_tokens_and_delay(self) -> None:
        h = _Harness(tokens=8, token_delay=1.0)
        response = h.post_response(
            self, "/v1/chat/completions", {"stream": True, "fake": {"tokens": 2, "delay": 0.1}}
        )
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        h.advance(0.1)
        h.advance(0.1)
        h.advance(0.1)
        self.successResultOf(done)
        self.assertEqual(len(_events(chunks)), 5)

    def test_prompt_time_comes_before_the_first_token(self) -> None:
        """``prompt_time``: nothing is answered until the prompt is "processed"."""
        h = _Harness(tokens=2, token_delay=0.1, prompt_time=0.5)
        d = h.stub.post(BASE + "/v1/chat/completions", data=json.dumps({"stream": True}).encode())
        h.stub.flush()
        h.advance(0.4)
        self.assertNoResult(d)  # not even the headers
        self.assertEqual(h.server.active, 1)
        h.advance(0.1)
        chunks: list[bytes] = []
        done = treq.collect(self.successResultOf(d), chunks.append)
        h.stub.flush()
        self.assertEqual(len(_events(chunks)), 1)  # the first chunk, with text
        h.advance(0.1)
        h.advance(0.1)
        h.advance(0.1)
        self.successResultOf(done)
        plain = h.stub.post(BASE + "/v1/chat/completions", data=b"{}")
        h.advance(0.5)
        self.assertNoResult(plain)  # the prompt, then two tokens
        h.advance(0.2)
        self.assertEqual(self.successResultOf(plain).code, 200)

    def test_queue_slots_makes_answers_beyond_the_slots_wait(self) -> None:
        """``queue_slots``: as llama-server, a request finds no free slot and waits."""
        h = _Harness(tokens=2, token_delay=0.5, parallel=2, queue_slots=True)
        first, second, third = (
            h.stub.post(BASE + "/v1/chat/completions", data=b"{}") for _ in range(3)
        )
        h.stub.flush()
        self.assertEqual(h.server.active, 3)
        h.advance(1.0)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertNoResult(third)  # it got a slot only now
        h.advance(0.5)
        self.assertNoResult(third)
        fourth = h.stub.post(BASE + "/v1/chat/completions", data=b"{}")
        h.stub.flush()
        h.advance(0.5)
        self.assertEqual(self.successResultOf(third).code, 200)
        h.advance(1.0)
        self.assertEqual(self.successResultOf(fourth).code, 200)
        self.assertEqual(h.server.active, 0)

    def test_without_queue_slots_every_answer_starts_at_once(self) -> None:
        h = _Harness(tokens=2, token_delay=0.5, parallel=1)
        requests = [h.stub.post(BASE + "/v1/chat/completions", data=b"{}") for _ in range(3)]
        h.stub.flush()
        h.advance(1.0)
        for d in requests:
            self.successResultOf(d)

    def test_status_passthrough(self) -> None:
        """ "fake.status" yields an upstream error a proxy must pass untouched."""
        h = _Harness()
        code, body = h.post(self, "/v1/chat/completions", {"fake": {"status": 429}})
        self.assertEqual(code, 429)
        self.assertEqual(
            body, {"error": {"message": "fake upstream error", "type": "fake", "code": 429}}
        )

    def test_bad_json_is_400(self) -> None:
        h = _Harness()
        response = self.successResultOf(h.stub.post(BASE + "/v1/chat/completions", data=b"{"))
        self.assertEqual(response.code, 400)

    def test_client_disconnect_cancels(self) -> None:
        """Dropping the connection mid-stream stops generation at once."""
        h = _Harness(tokens=10, token_delay=1.0)
        response = h.post_response(self, "/v1/chat/completions", {"stream": True})

        def collector(data: bytes) -> None:
            if b" t1" in data:
                raise _Disconnect()

        done = treq.collect(response, collector)
        h.advance(1.0)
        h.advance(1.0)
        self.failureResultOf(done, _Disconnect)
        h.stub.flush()
        stats = h.stats(self)
        self.assertEqual((stats["active"], stats["cancelled"], stats["completed"]), (0, 1, 0))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_hold_until_disconnect(self) -> None:
        """ "fake.hold" streams its tokens, then never ends until the client leaves."""
        h = _Harness(tokens=2, token_delay=1.0)
        response = h.post_response(
            self, "/v1/chat/completions", {"stream": True, "fake": {"hold": True}}
        )
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        h.advance(1.0)
        h.advance(1.0)
        h.advance(100.0)
        self.assertNoResult(done)
        self.assertEqual(len(_events(chunks)), 3)
        self.assertEqual(h.get(self, "/slots")[1], [{"id": 0, "is_processing": True}])
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.drop_clients()
        self.failureResultOf(done, ResponseFailed)
        stats = h.stats(self)
        self.assertEqual((stats["active"], stats["cancelled"]), (0, 1))
        self.assertEqual(h.get(self, "/slots")[1], [{"id": 0, "is_processing": False}])

    def test_crash_after_tokens_in_memory_aborts(self) -> None:
        h = _Harness(tokens=5, token_delay=1.0)
        response = h.post_response(
            self, "/v1/chat/completions", {"stream": True, "fake": {"crash_after_tokens": 2}}
        )
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        h.advance(1.0)
        h.advance(1.0)
        self.failureResultOf(done, ResponseFailed)
        self.assertEqual(len(_events(chunks)), 3)
        stats = h.stats(self)
        self.assertEqual((stats["crashed"], stats["cancelled"], stats["active"]), (1, 0, 0))


class OtherEndpointTests(SynchronousTestCase):
    def test_completions(self) -> None:
        h = _Harness(model="m", tokens=2, token_delay=0.0)
        code, body = h.post(self, "/v1/completions", {"model": "x", "prompt": "hi"})
        self.assertEqual(code, 200)
        self.assertEqual(body["choices"][0]["text"], "fake-reply model=m requested=x tokens: t0 t1")
        code, body = h.post(self, "/completion", {"prompt": "hi"})
        self.assertEqual(code, 200)
        self.assertIs(body["stop"], True)
        self.assertEqual(body["content"], "fake-reply model=m requested=null tokens: t0 t1")
        self.assertIn("timings", body)

    def test_native_completion_stream(self) -> None:
        h = _Harness(tokens=2, token_delay=0.0)
        response = h.post_response(self, "/completion", {"prompt": "hi", "stream": True})
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        h.advance(0)
        self.successResultOf(done)
        events = _events(chunks)
        self.assertEqual(events[-1], "[DONE]")
        self.assertIs(json.loads(events[-2])["stop"], True)

    def test_embeddings(self) -> None:
        h = _Harness(model="emb")
        code, body = h.post(self, "/v1/embeddings", {"model": "emb", "input": ["a", "b c"]})
        self.assertEqual(code, 200)
        self.assertEqual(body["object"], "list")
        self.assertEqual(body["model"], "emb")
        self.assertEqual([d["index"] for d in body["data"]], [0, 1])
        vectors = [d["embedding"] for d in body["data"]]
        self.assertEqual([len(v) for v in vectors], [8, 8])
        self.assertNotEqual(vectors[0], vectors[1])
        # Deterministic, and a bare string works too.
        _, again = h.post(self, "/v1/embeddings", {"input": "a"})
        self.assertEqual(again["data"][0]["embedding"], vectors[0])

    def test_rerank(self) -> None:
        h = _Harness()
        for path in ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking"):
            code, body = h.post(self, path, {"query": "cat", "documents": ["a cat", "a dog"]})
            self.assertEqual(code, 200)
            results = body["results"]
            self.assertEqual([r["index"] for r in results], [0, 1])
            self.assertGreater(results[0]["relevance_score"], results[1]["relevance_score"])

    def test_echo_json(self) -> None:
        h = _Harness(model="served")
        code, body = h.post(self, "/v1/responses", {"model": "asked", "input": "x"})
        self.assertEqual(code, 200)
        self.assertEqual(body["path"], "/v1/responses")
        self.assertEqual(body["method"], "POST")
        self.assertEqual(body["served_by"], "served")
        self.assertEqual(body["model"], "asked")
        self.assertEqual(body["content_type"], "application/json")
        self.assertEqual(body["body_length"], len(json.dumps({"model": "asked", "input": "x"})))

    def test_echo_multipart(self) -> None:
        h = _Harness()
        boundary = "XyZ"
        payload = (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="model"\r\n\r\n'
            "whisper-1\r\n"
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
            "RIFF....\r\n"
            f"--{boundary}--\r\n"
        ).encode()
        ctype = f"multipart/form-data; boundary={boundary}"
        response = self.successResultOf(
            h.stub.post(
                BASE + "/v1/audio/transcriptions",
                data=payload,
                headers={b"content-type": [ctype.encode()]},
            )
        )
        body = json.loads(self.successResultOf(h.stub.content(response)))
        self.assertEqual(body["model"], "whisper-1")
        self.assertEqual(body["content_type"], ctype)
        self.assertEqual(body["body_length"], len(payload))

    def test_stats_counters(self) -> None:
        h = _Harness(model="s", tokens=1, token_delay=0.0)
        h.post(self, "/v1/chat/completions", {})
        h.post(self, "/v1/embeddings", {"input": "x"})
        h.post(self, "/v1/chat/completions", {"fake": {"status": 500}})
        stats = h.stats(self)
        self.assertEqual(stats["model"], "s")
        self.assertEqual(stats["pid"], os.getpid())
        self.assertEqual(stats["argv"], sys.argv)
        self.assertEqual(
            (stats["requests"], stats["active"], stats["cancelled"], stats["completed"]),
            (3, 0, 0, 2),
        )


class _Child(ProcessProtocol):
    """Watches a fake-server child: its stderr, port and exit."""

    def __init__(self) -> None:
        self.stderr = b""
        self.port: Deferred[int] = Deferred()
        self.reason: Failure | None = None
        self._waiters: list[Deferred[None]] = []

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        match = re.search(rb"server is listening on http://[^\s:]+:(\d+) ", self.stderr)
        if match and not self.port.called:
            self.port.callback(int(match.group(1)))

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        if not self.port.called:
            self.port.errback(RuntimeError(f"child exited early: {self.stderr.decode()}"))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def ended(self) -> Deferred[None]:
        """Fires once the child is gone and reaped; see L{reason} for how."""
        if self.reason is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter


class RealProcessTests(TestCase):
    timeout = 30

    def test_serve_and_sigterm(self) -> Deferred[None]:
        """The CLI binds port 0, reports it, gets healthy and exits on SIGTERM."""
        return Deferred.fromCoroutine(self._serve_and_sigterm())

    async def _serve_and_sigterm(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(llamaswap.__file__)))
        child = _Child()
        transport: IProcessTransport = IReactorProcess(reactor).spawnProcess(
            child,
            sys.executable,
            [
                sys.executable,
                "-m",
                "llamaswap.testing.fake_server",
                "--port",
                "0",
                "--load-time",
                "0.2",
                "--model",
                "proc-model",
                "--ctx-size",
                "4096",
            ],
            env=os.environ,
            path=root,
        )

        async def reap() -> None:
            if child.reason is None:
                transport.signalProcess("KILL")
            await child.ended()

        self.addCleanup(lambda: Deferred.fromCoroutine(reap()))

        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, pool=pool))
        clock = IReactorTime(reactor)

        port = await child.port
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            response = await http.get(base + "/health")
            await treq.content(response)
            if response.code == 200:
                break
            self.assertEqual(response.code, 503)
            await deferLater(clock, 0.05)
        self.assertEqual(response.code, 200)

        response = await http.get(base + "/v1/models")
        models = await treq.json_content(response)
        self.assertEqual([m["id"] for m in models["data"]], ["proc-model"])

        transport.signalProcess("TERM")
        await child.ended()
        assert child.reason is not None
        self.assertTrue(child.reason.check(ProcessDone), child.reason)
        self.assertIn(b"srv  update_slots: all slots are idle", child.stderr)
