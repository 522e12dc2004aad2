"""Memory-aware co-residency, learned swap costs, deadlines and abandoned loads."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import psutil
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llamaswap import resources
from llamaswap.config import ConfigError, parse_config
from llamaswap.errors import ModelStopped
from llamaswap.relay import BytesProducer
from llamaswap.resources import Footprint, MemoryMonitor, descendants, fits, parse_size

from .helpers import World, world
from .integration import FAKE, LiveTestCase, StreamReader

BUDGET = """
scheduler:
  policy: fifo
resources:
  vram: 10GiB
models:
  a:
    cmd: sleep --port ${PORT} --model a
    memory: 4GiB
  b:
    cmd: sleep --port ${PORT} --model b
    memory: 4GiB
  c:
    cmd: sleep --port ${PORT} --model c
    memory: 4GiB
  big:
    cmd: sleep --port ${PORT} --model big
    memory: {vram: 9GiB, ram: 1GiB}
  keep:
    cmd: sleep --port ${PORT} --model keep
    memory: 1GiB
groups:
  pinned:
    members: [keep]
    persistent: true
    exclusive: false
"""


def use(test: SynchronousTestCase, w: World, model: str, release: bool = True) -> Any:
    d = w.scheduler.acquire(model)
    if not d.called:
        w.make_ready(model)
    lease = test.successResultOf(d)
    if release:
        lease.release()
    return lease


class SizeTests(SynchronousTestCase):
    def test_sizes(self) -> None:
        self.assertEqual(parse_size("5GiB"), 5 * 2**30)
        self.assertEqual(parse_size("512 MB"), 512 * 10**6)
        self.assertEqual(parse_size(1024), 1024)
        self.assertEqual(parse_size("1.5g"), 1_500_000_000)
        self.assertRaises(ValueError, parse_size, "lots")
        error = self.assertRaises(
            ConfigError,
            parse_config,
            "models:\n  a:\n    cmd: s --port ${PORT}\n    memory: huge\n",
        )
        self.assertIn("models.a.memory: expected a size, like 5GiB", str(error))

    def test_a_declaration_is_corrected_by_what_is_measured(self) -> None:
        footprint = Footprint(declared={"ram": 100})
        self.assertTrue(fits({"ram": 150}, [footprint]))
        footprint.observe("ram", 200)
        self.assertEqual(footprint.need("ram"), 200)
        self.assertFalse(fits({"ram": 150}, [footprint]))
        self.assertIn("more than the", footprint.mismatch() or "")


class BudgetTests(SynchronousTestCase):
    def test_models_share_the_machine_while_they_fit(self) -> None:
        w = world(BUDGET)
        use(self, w, "keep")
        use(self, w, "a")
        use(self, w, "b")
        self.assertEqual(sorted(p.args[-1] for p in w.reactor.running()), ["a", "b", "keep"])

    def test_the_least_recently_used_idle_model_makes_room(self) -> None:
        w = world(BUDGET)
        use(self, w, "a")
        w.reactor.advance(1)
        use(self, w, "b")
        w.reactor.advance(1)
        use(self, w, "a")  # a is now the most recent
        w.reactor.advance(1)
        use(self, w, "c")
        self.assertEqual(w.child("b").signals, ["TERM"])
        self.assertEqual(w.child("a").signals, [])

    def test_a_busy_model_is_kept_while_an_idle_one_can_go(self) -> None:
        w = world(BUDGET)
        busy = use(self, w, "a", release=False)  # older, but serving
        w.reactor.advance(1)
        use(self, w, "b")
        use(self, w, "c")
        self.assertEqual(w.child("a").signals, [])
        self.assertEqual(w.child("b").signals, ["TERM"])
        busy.release()

    def test_persistent_models_are_never_evicted_and_busy_ones_drain_first(self) -> None:
        w = world(BUDGET)
        use(self, w, "keep")
        lease = use(self, w, "a", release=False)
        d = w.scheduler.acquire("big")  # 9 GiB: a must go, keep may not
        self.assertEqual(w.child("a").signals, [])  # a is busy: the swap waits
        lease.release()
        self.assertEqual(w.child("a").signals, ["TERM"])
        w.make_ready("big")
        self.successResultOf(d)
        self.assertEqual(w.child("keep").signals, [])

    def test_models_started_alongside_a_swap_fit_beside_it(self) -> None:
        # found by tests/test_scheduler_states.py: after a failed start, "a" was
        # started alongside the swap to "b" just decided, then "c" too, as what
        # it would have evicted was "a", not the swap's model: 12 GiB of models in a
        # 10 GiB budget once "b" started
        w = world(BUDGET)
        w.scheduler.acquire("big").addErrback(lambda f: None)
        waiting = {m: w.scheduler.acquire(m) for m in "bac"}
        w.child("big").exit(1)
        running = sorted(p.args[-1] for p in w.reactor.running())
        self.assertEqual(running, ["a", "b"])
        w.make_ready("a")
        w.make_ready("b")
        self.successResultOf(waiting["a"]).release()
        self.successResultOf(waiting["b"]).release()
        # c makes room: the least recently used of the two goes
        w.make_ready("c")
        self.successResultOf(waiting["c"]).release()
        self.assertEqual(len(w.reactor.running()), 2)

    def test_a_request_for_a_stopping_model_waits_its_turn(self) -> None:
        # found by tests/test_scheduler_states.py: a request for "big" while it was
        # stopping started it alongside (deferred until its exit); when it exited,
        # the swap to "a" was decided as if "big" would stay stopped, and both
        # started: 13 GiB in a 10 GiB budget
        w = world(BUDGET.replace("policy: fifo", "policy: collate"))
        starting = w.scheduler.acquire("big")
        pending_a = w.scheduler.acquire("a")
        w.reactor.advance(2)
        w.make_ready("big")
        lease = self.successResultOf(starting)  # a waits: big is busy, and loads fast
        w.child("big").ignore_term = True
        w.scheduler.unload(["big"])
        pending_big = w.scheduler.acquire("big")
        w.reactor.advance(10)  # SIGKILL: big exits; a is next
        running = sorted(p.args[-1] for p in w.reactor.running())
        self.assertEqual(running, ["a"])
        lease.release()
        w.make_ready("a")
        self.successResultOf(pending_a).release()
        w.reactor.advance(30)  # collate's maxWait: then big, alone
        self.assertEqual(w.child("a").signals, ["TERM"])
        w.make_ready("big")
        self.successResultOf(pending_big).release()
        running = sorted(p.args[-1] for p in w.reactor.running())
        self.assertEqual(running, ["big"])

    def test_learned_start_and_stop_times(self) -> None:
        w = world(BUDGET)
        d = w.scheduler.acquire("a")
        w.reactor.advance(2.0)
        w.make_ready("a")
        self.successResultOf(d).release()
        self.assertEqual(w.process("a").load_seconds, 2.0)
        w.child("a").ignore_term = True
        stopping = w.scheduler.unload(["a"])
        w.reactor.advance(0.5)
        w.child("a").exit(0)
        self.successResultOf(stopping)
        self.assertEqual(w.process("a").stop_seconds, 0.5)

    def test_a_load_nobody_waits_for_is_abandoned_when_another_model_waits(self) -> None:
        w = world()
        d_b = w.scheduler.acquire("b")
        d_c = w.scheduler.acquire("c")
        self.assertEqual(w.process("b").state.value, "starting")
        d_b.cancel()
        self.failureResultOf(d_b, CancelledError)
        self.assertEqual(w.child("b").signals, ["TERM"])
        w.make_ready("c")
        self.successResultOf(d_c)
        self.assertIsInstance(ModelStopped("x"), Exception)


class MeasuredMemoryTests(LiveTestCase):
    async def test_running_children_are_measured_and_a_wrong_declaration_is_reported(
        self,
    ) -> None:
        await self.serve(f"models:\n  alpha:\n    cmd: {FAKE}\n    memory: {{ram: 1MiB}}\n")
        await self.chat("alpha")
        scheduler = self.api.scheduler
        monitor = MemoryMonitor(
            self.clock(),
            lambda: {"alpha": scheduler.processes["alpha"].pid or 0},
            scheduler.footprint,
        )
        with capturedLogs() as events:
            monitor.sample()
        entry = (await self.running())["alpha"]
        self.assertGreater(entry["memory"]["measured"]["ram"], 5 * 2**20)  # a Python child
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("more than the", warnings[0]["problem"])
        metrics = (await self.request("GET", "/metrics")).body.decode()
        self.assertIn('llamaswap_model_memory_bytes{model="alpha",resource="ram"}', metrics)
        self.assertIn('llamaswap_model_load_seconds_estimate{model="alpha"}', metrics)

    def clock(self) -> Any:
        from twisted.internet import reactor

        return reactor


class FamilyTests(SynchronousTestCase):
    def test_the_family_of_a_child_is_read_from_its_own_proc_entries(self) -> None:
        """Each thread's children file, not a scan of every process on the machine:
        the same family as psutil's walk, grandchildren included."""
        if not resources.CHILDREN_FILES:
            self.skipTest("this kernel does not list children in /proc (CONFIG_PROC_CHILDREN)")
        script = "sleep 60 & (sleep 60 & echo started; wait) & wait"
        shell = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE)
        family = psutil.Process(shell.pid)

        def end() -> None:
            for process in [family, *family.children(recursive=True)]:
                process.kill()
            shell.wait()
            assert shell.stdout is not None
            shell.stdout.close()

        self.addCleanup(end)
        assert shell.stdout is not None
        shell.stdout.readline()  # every process of the family is there
        expected = {shell.pid} | {p.pid for p in psutil.Process(shell.pid).children(True)}
        self.assertEqual(len(expected), 4)  # the shell, a sleep, a subshell and its sleep
        self.assertEqual(set(descendants(shell.pid)), expected)
        self.assertEqual(descendants(2**22 + 1), [2**22 + 1])  # no such process: itself

    def test_sampling_does_not_walk_every_process(self) -> None:
        if not resources.CHILDREN_FILES:
            self.skipTest("this kernel does not list children in /proc (CONFIG_PROC_CHILDREN)")
        shell = subprocess.Popen(["sleep", "60"])
        self.addCleanup(shell.wait)
        self.addCleanup(shell.kill)
        footprint = Footprint()
        walked: list[int] = []

        def children(process: psutil.Process, recursive: bool = False) -> list[psutil.Process]:
            walked.append(process.pid)
            return []

        self.patch(psutil.Process, "children", children)
        MemoryMonitor(Clock(), lambda: {"a": shell.pid}, lambda _: footprint).sample()
        self.assertEqual(walked, [])
        self.assertGreater(footprint.measured["ram"], 0)


class DeadlineTests(LiveTestCase):
    async def test_a_request_not_started_in_time_gets_504_and_leaves_the_queue(self) -> None:
        await self.serve(
            f"models:\n  a:\n    cmd: {FAKE}\n  b:\n    cmd: {FAKE}\n    deadline: 60\n"
        )
        response: IResponse = await self.agent.request(
            b"POST",
            (self.base + "/v1/chat/completions").encode(),
            Headers({"content-type": ["application/json"]}),
            BytesProducer(
                json.dumps({"model": "a", "stream": True, "fake": {"hold": True}}).encode()
            ),
        )
        holder = StreamReader()
        response.deliverBody(holder)
        await holder.until(b"t0")
        late = await self.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({"model": "b", "messages": []}).encode(),
            {"content-type": "application/json", "x-request-deadline": "0.3"},
        )
        self.assertEqual(late.code, 504)
        self.assertEqual(late.json()["error"]["code"], "deadline_exceeded")
        self.assertEqual(self.api.scheduler.queued(), 0)
        bad = await self.request(
            "POST",
            "/v1/chat/completions",
            b'{"model": "b"}',
            {"content-type": "application/json", "x-request-deadline": "soon"},
        )
        self.assertEqual(bad.code, 400)
        holder.hang_up()
        await holder.done
        self.assertEqual(list(await self.running()), ["a"])  # b was never started


class LiveBudgetTests(LiveTestCase):
    async def test_models_share_a_budget_and_the_least_recently_used_idle_one_goes(
        self,
    ) -> None:
        await self.serve(
            "resources: {ram: 3GiB}\nmodels:\n"
            f"  a:\n    cmd: {FAKE}\n    memory: 1GiB\n"
            f"  b:\n    cmd: {FAKE}\n    memory: 1GiB\n"
            f"  c:\n    cmd: {FAKE}\n    memory: 2GiB\n"
        )
        await self.chat("a")
        await self.chat("b")
        self.assertEqual(sorted(await self.running()), ["a", "b"])  # 2 GiB of 3: together
        await self.chat("a")  # b is now the least recently used
        await self.chat("c")  # needs 2 GiB: one of them must go
        running = await self.running()
        self.assertEqual(sorted(running), ["a", "c"])
        entry = running["a"]
        self.assertEqual(entry["memory"]["declared"], {"ram": 2**30})
        self.assertGreater(entry["load_seconds"], 0)
