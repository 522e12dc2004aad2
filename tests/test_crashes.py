"""Crashes: clean errors for the clients in flight, restart on demand, crash-loop cooldown."""

from __future__ import annotations

import json
import os
import signal

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llamaswap.crashloop import CrashGuard, CrashLoopPolicy
from llamaswap.errors import ApiError, StartFailed
from llamaswap.relay import BytesProducer

from .helpers import world
from .integration import FAKE, LiveTestCase, StreamReader


class CrashGuardTests(SynchronousTestCase):
    def test_trips_after_n_failures_in_the_window_and_doubles_up_to_the_cap(self) -> None:
        guard = CrashGuard(CrashLoopPolicy(max_failures=3, window=60, cooldown=10, max_cooldown=25))
        guard.failed(0)
        guard.failed(70)
        guard.failed(100)  # the first one is out of the window by now
        self.assertEqual(guard.retry_in(100), 0)
        guard.failed(101)
        self.assertEqual(guard.retry_in(101), 10)
        for now in (111, 112, 113):
            guard.failed(now)
        self.assertEqual(guard.retry_in(113), 20)
        for now in (200, 201, 202):
            guard.failed(now)
        self.assertEqual(guard.retry_in(202), 25)  # capped
        guard.started()
        for now in (300, 301, 302):
            guard.failed(now)
        self.assertEqual(guard.retry_in(302), 10)  # a good start reset the doubling


class CrashLoopSchedulerTests(SynchronousTestCase):
    def test_a_model_that_keeps_failing_gets_fast_503s_with_retry_after(self) -> None:
        w = world(
            "crashLoop: {maxFailures: 2, window: 60, cooldown: 30}\n"
            "models:\n  a:\n    cmd: sleep --port ${PORT} --model a\n"
        )
        for _ in range(2):
            d = w.scheduler.acquire("a")
            w.child("a").say("fatal: out of memory")
            w.child("a").exit(1)
            self.failureResultOf(d, StartFailed)
        spawned = len(w.reactor.spawned)
        error = self.failureResultOf(w.scheduler.acquire("a"), ApiError).value
        self.assertEqual((error.status, error.code), (503, "model_crash_loop"))
        self.assertEqual(error.headers["Retry-After"], "30")
        self.assertIn("out of memory", error.message)
        self.assertEqual(len(w.reactor.spawned), spawned)  # not even tried
        w.reactor.advance(30)
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(d)

    def test_crashes_while_serving_count_too(self) -> None:
        w = world(
            "crashLoop: {maxFailures: 2}\nmodels:\n  a:\n    cmd: sleep --port ${PORT} --model a\n"
        )
        for _ in range(2):
            d = w.scheduler.acquire("a")
            w.make_ready("a")
            self.successResultOf(d).release()
            w.child("a").exit(None, 11)
        self.assertGreater(w.scheduler.retry_in("a"), 0)
        self.assertIn("killed by SIGSEGV unexpectedly", w.process("a").last_error or "")

    def test_a_model_that_became_ready_waits_the_first_cooldown_again(self) -> None:
        # the scheduler learns of the ready model from the process itself, in this
        # in-memory world as in the daemon
        w = world(
            "crashLoop: {maxFailures: 1, window: 60, cooldown: 10, maxCooldown: 100}\n"
            "models:\n  a:\n    cmd: sleep --port ${PORT} --model a\n"
        )

        def start_fails() -> None:
            d = w.scheduler.acquire("a")
            w.child("a").exit(1)
            self.failureResultOf(d, StartFailed)

        start_fails()
        self.assertEqual(w.scheduler.retry_in("a"), 10)
        w.reactor.advance(10)
        start_fails()
        self.assertEqual(w.scheduler.retry_in("a"), 20)  # it doubled
        w.reactor.advance(20)
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(d).release()
        w.child("a").exit(None, 11)  # a crash while serving trips it again
        self.assertEqual(w.scheduler.retry_in("a"), 10)  # back to the first cooldown


class LiveCrashTests(LiveTestCase):
    async def test_a_crash_mid_stream_ends_the_stream_with_an_error_event(self) -> None:
        await self.serve(f"models:\n  alpha:\n    cmd: {FAKE}\n")
        response: IResponse = await self.agent.request(
            b"POST",
            (self.base + "/v1/chat/completions").encode(),
            Headers({"content-type": ["application/json"]}),
            BytesProducer(
                json.dumps(
                    {"model": "alpha", "stream": True, "fake": {"crash_after_tokens": 2}}
                ).encode()
            ),
        )
        reader = StreamReader()
        response.deliverBody(reader)
        await reader.done
        self.assertIn(" t1", reader.text)  # what came before the crash arrived
        events = [line[6:] for line in reader.text.splitlines() if line.startswith("data: ")]
        self.assertEqual(events[-1], "[DONE]")
        error = json.loads(events[-2])["error"]
        self.assertEqual(error["code"], "upstream_disconnected")

        async def stopped() -> bool:
            return self.api.scheduler.processes["alpha"].state.value == "stopped"

        await self.eventually(stopped, "the crash is noticed")
        listing = (await self.request("GET", "/v1/models")).json()["data"][0]
        self.assertIn("unexpectedly", listing["status"]["error"])
        self.assertIn("GGML_ASSERT", listing["status"]["error"])  # the child's last words
        self.assertEqual(self.api.scheduler.in_flight("alpha"), 0)
        again = await self.chat("alpha")  # started again on demand
        self.assertEqual(again.code, 200)

    async def test_a_crash_before_the_answer_is_a_502(self) -> None:
        await self.serve(f"models:\n  alpha:\n    cmd: {FAKE} --token-delay 1\n")
        await self.chat("alpha", fake={"tokens": 0})
        pid = (await self.running())["alpha"]["pid"]
        pending = Deferred.fromCoroutine(self.chat("alpha", fake={"tokens": 5, "delay": 1.0}))

        async def busy() -> bool:
            return self.api.scheduler.in_flight("alpha") == 1

        await self.eventually(busy, "the request is in flight")
        os.kill(pid, signal.SIGKILL)
        reply = await pending
        self.assertEqual(reply.code, 502)
        self.assertEqual(reply.json()["error"]["type"], "server_error")
        self.assertEqual(self.api.scheduler.in_flight("alpha"), 0)
