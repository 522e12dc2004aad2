"""Load with faults: many requests over three models, clients hanging up, children killed.

Every request must end with a response or a clear error; afterwards nothing is in
flight or queued, and no file descriptor, memory or process is left over.  The
figures go to ``test-artifacts/reliability.json`` (quoted in docs/reliability.md).
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import psutil
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, DeferredSemaphore
from twisted.internet.task import deferLater
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llamaswap.relay import BytesProducer
from llamaswap.tap import Supervisor

from .integration import FAKE, LiveTestCase, StreamReader

REQUESTS = int(os.environ.get("LLAMASWAP_LOAD_REQUESTS", "2000"))
CONCURRENCY = 24
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

CONFIG = f"""
queueLimit: 1000
crashLoop: {{maxFailures: 1000}}
models:
  a:
    cmd: {FAKE} --token-delay 0.002
    concurrencyLimit: 1000
  b:
    cmd: {FAKE} --token-delay 0.002
    concurrencyLimit: 1000
  c:
    cmd: {FAKE} --token-delay 0.002
    concurrencyLimit: 1000
groups:
  pair:
    members: [a, b]
    swap: false
"""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class LoadTests(LiveTestCase):
    timeout = 600

    async def test_thousands_of_requests_with_disconnects_and_kills(self) -> None:
        await self.serve(CONFIG)
        rng = random.Random(20261121)
        me = psutil.Process()
        # warm up, so steady-state buffers are not counted as leaks
        for model in ("a", "b", "c", "a"):
            await self.chat(model)
        await self.settle()
        fds_before, rss_before = open_fds(), me.memory_info().rss
        outcomes: collections.Counter[str] = collections.Counter()
        faults: collections.Counter[str] = collections.Counter()
        gate = DeferredSemaphore(CONCURRENCY)

        async def one(index: int) -> None:
            model = rng.choices(["a", "b", "c"], weights=[45, 45, 10])[0]
            stream = rng.random() < 0.5
            hang_up = rng.random() < 0.1
            if index % 150 == 75:
                await self.kill_one(faults)
            outcome = await self.exchange(model, stream, hang_up)
            if hang_up:
                faults["client disconnects"] += 1
            outcomes[outcome] += 1

        runs = [gate.run(one, i) for i in range(REQUESTS)]
        results = await DeferredList(runs, consumeErrors=True)
        failed = [r for ok, r in results if not ok]
        self.assertEqual(failed, [], failed[:3])

        await self.settle()
        scheduler = self.api.scheduler
        self.assertEqual(sum(scheduler.in_flight(m) for m in "abc"), 0)
        self.assertEqual(scheduler.queued(), 0)
        fds_after, rss_after = open_fds(), me.memory_info().rss
        # every outcome is a response or a clear error, nothing hung
        unclear = {k: v for k, v in outcomes.items() if k.startswith("unclear")}
        self.assertEqual(unclear, {})
        self.assertLessEqual(fds_after - fds_before, 4)
        self.assertLess(rss_after - rss_before, 40 * 1024 * 1024)

        children = [p.pid for p in me.children(recursive=True)]
        await self.service.stopService()
        leftover = [
            pid
            for pid in children
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
        self.assertEqual(leftover, [])

        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "reliability.json").write_text(
            json.dumps(
                {
                    "requests": REQUESTS,
                    "concurrency": CONCURRENCY,
                    "outcomes": dict(outcomes),
                    "faults": dict(faults),
                    "fds_before": fds_before,
                    "fds_after": fds_after,
                    "rss_before_mib": round(rss_before / 2**20, 1),
                    "rss_after_mib": round(rss_after / 2**20, 1),
                    "children_left": len(leftover),
                },
                indent=2,
            )
        )

    async def settle(self) -> None:
        """Let idle upstream connections close, so descriptors can be compared."""
        supervisor = next(s for s in self.service if isinstance(s, Supervisor))
        await supervisor.pool.closeCachedConnections()
        supervisor.endpoints.close_spares()  # the next stream's, ready for 3 s
        await deferLater(reactor, 0.2)

    async def kill_one(self, faults: collections.Counter[str]) -> None:
        running = [p for p in self.api.scheduler.processes.values() if p.pid is not None]
        if running:
            victim = random.Random(len(faults)).choice(running)
            try:
                os.kill(victim.pid or 0, signal.SIGKILL)
                faults["child SIGKILLs"] += 1
            except ProcessLookupError:
                pass

    async def exchange(self, model: str, stream: bool, hang_up: bool) -> str:
        body: dict[str, Any] = {"model": model, "messages": [], "stream": stream}
        body["fake"] = {"tokens": 6}
        try:
            response: IResponse = await self.agent.request(
                b"POST",
                (self.base + "/v1/chat/completions").encode(),
                Headers({"content-type": ["application/json"]}),
                BytesProducer(json.dumps(body).encode()),
            ).addTimeout(60, reactor)
        except Exception as e:
            return f"unclear: {type(e).__name__}"
        reader = StreamReader()
        response.deliverBody(reader)
        if hang_up:
            reader.hang_up()
            await reader.done
            return "client hung up"
        await reader.done.addTimeout(60, reactor)
        text = reader.text
        if response.code == 200:
            if stream and '"error"' in text and text.rstrip().endswith("[DONE]"):
                return "200 stream ended by an error event (child killed)"
            if stream and not text.rstrip().endswith("[DONE]"):
                return "unclear: stream without an end"
            return "200 ok"
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"unclear: {response.code} without an OpenAI error"
        return f"{response.code} {error['code']}"
