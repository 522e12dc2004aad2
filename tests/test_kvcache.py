"""The KV store: slots saved before a stop and restored after a start, in memory.

The scheduler runs over fake children and a ``Clock``; each child's HTTP API is a
fake llama-server (in memory) that keeps slots and writes real slot files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from llamaswap.config import Config, parse_config
from llamaswap.errors import ApiError
from llamaswap.events import Activity
from llamaswap.kvcache import Conversation, KvStore, run_here
from llamaswap.process import ModelProcess
from llamaswap.relay import BytesProducer
from llamaswap.scheduler import Lease
from llamaswap.testing.fake_server import FakeLlamaServer

from .helpers import World, notices_of, world
from .integration import FAKE, LiveTestCase

LONG = " ".join(f"word{i}" for i in range(40))
REPLY = "fake-reply model=a requested=a tokens: t0 t1"


def config_text(path: str, extra: str = "") -> str:
    return f"""
kvCache:
  path: {path}
  minTokens: 10
{extra}
models:
  a:
    cmd: sleep --port ${{PORT}} --model a
    kvCache: true
  b:
    cmd: sleep --port ${{PORT}} --model b
    kvCache: true
  plain:
    cmd: sleep --port ${{PORT}} --model plain
"""


@implementer(IAgent)
class Children:
    """Routes each request to the fake llama-server of the child at that URL."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.servers: dict[str, FakeLlamaServer] = {}
        self.agents: list[RequestTraversalAgent] = []
        self.hang = False  # a child that never answers
        self.dies_restoring = False  # a child that aborts reading a slot file
        self.died: Callable[[], None] = lambda: None  # its process ends (the test's part)
        self.gate: list[Any] | None = None  # requests held until let_through()
        self.requests: list[tuple[bytes, str]] = []

    def start(self, process: ModelProcess, parallel: int = 1) -> FakeLlamaServer:
        server = FakeLlamaServer(
            self.clock,
            process.id,
            tokens=2,
            token_delay=0.0,
            slot_save_path=process.config.slot_save_path,
            parallel=parallel,
        )
        server.start()
        self.servers[process.base_url] = server
        return server

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        base = "/".join(uri.decode().split("/")[:3])
        self.requests.append((method, uri.decode()[len(base) :]))
        if self.hang:
            return Deferred()
        if self.dies_restoring and b"action=restore" in uri:
            self.died()
            return fail(ResponseNeverReceived([Failure(ConnectionDone())]))
        if self.gate is not None:
            held: Deferred[IResponse] = Deferred()
            self.gate.append((held, method, uri, headers, bodyProducer))
            return held
        agent = RequestTraversalAgent(self.servers[base].resource())
        self.agents.append(agent)
        answer: Deferred[IResponse] = agent.request(method, uri, headers, bodyProducer)
        return answer

    def let_through(self) -> None:
        """Answer the held requests (and those they lead to) from now on."""
        held, self.gate = self.gate or [], None
        for waiting, *call in held:
            self.request(*call).chainDeferred(waiting)
        self.flush()

    def flush(self) -> None:
        for _ in range(30):
            for agent in list(self.agents):
                agent.flush()


class KvWorld:
    def __init__(self, case: SynchronousTestCase, extra: str = "", parallel: int = 1) -> None:
        self.case = case
        self.path = os.path.abspath(case.mktemp())
        self.parallel = parallel
        found: list[tuple[Children, KvStore]] = []
        self.disk_work = 0  # file operations the store ran

        def disk(work: Callable[[], Any]) -> Deferred[Any]:
            self.disk_work += 1
            return run_here(work)

        def hooks(config: Config, clock: Clock) -> KvStore:
            children = Children(clock)
            found.append((children, KvStore(config, children, clock, disk=disk)))
            return found[0][1]

        self.w: World = world(config_text(self.path, extra), hooks=hooks)
        [(self.children, self.kv)] = found

    @property
    def net(self) -> Children:
        return self.children

    def flush(self) -> None:
        self.net.flush()

    def bring_up(self, model: str) -> FakeLlamaServer:
        """The model's child finishes loading (its fake server answers from now)."""
        server = self.net.start(self.w.process(model), self.parallel)
        self.w.make_ready(model)
        self.flush()
        return server

    def lease(self, model: str) -> Lease:
        waiting = self.w.scheduler.acquire(model)
        self.flush()
        if not waiting.called:
            self.bring_up(model)
        return self.case.successResultOf(waiting)

    def chat(self, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
        """One request relayed to the model (and noted, as the API does)."""
        body = {"model": model, "messages": messages}
        self.kv.note(model, Conversation.of(body))
        process = self.w.process(model)
        agent = RequestTraversalAgent(self.net.servers[process.base_url].resource())
        url = (process.base_url + "/v1/chat/completions").encode()
        answer: list[Any] = []

        async def call() -> None:
            response = await agent.request(
                b"POST", url, Headers(), BytesProducer(json.dumps(body).encode())
            )
            answer.append(json.loads(await readBody(response)))

        done = Deferred.fromCoroutine(call())
        for _ in range(10):
            agent.flush()
        self.case.successResultOf(done)
        result: dict[str, Any] = answer[0]
        return result

    def files(self, model: str) -> list[str]:
        directory = self.w.config.models[model].slot_save_path
        assert directory is not None
        return sorted(os.listdir(directory))

    def swap_to(self, model: str) -> Lease:
        """A request for ``model``: the running one is saved and stopped."""
        return self.lease(model)

    def converse_then_swap(self, text: str = LONG) -> list[dict[str, str]]:
        """A conversation on ``a``, then a swap to ``b``; returns the follow-up messages."""
        lease = self.lease("a")
        first = [{"role": "user", "content": text}]
        reply = self.chat("a", first)["choices"][0]["message"]["content"]
        lease.release()
        self.swap_to("b").release()
        return [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "on"}]


def cached_prefix(text: str = LONG) -> int:
    """Prompt tokens of the fake a follow-up finds in cache: the first prompt and reply."""
    return 1 + len(text.split()) + 1 + len(REPLY.split())


class SaveAndRestoreTests(SynchronousTestCase):
    def test_a_swap_saves_the_slot_and_the_next_start_restores_it_before_any_lease(
        self,
    ) -> None:
        k = KvWorld(self)
        follow_up = k.converse_then_swap()
        self.assertEqual(len(k.files("a")), 1)
        [state] = k.kv.states
        self.assertEqual((state.model, state.tokens), ("a", cached_prefix()))
        self.assertIsNotNone(state.key)

        again = k.w.scheduler.acquire("a")
        k.flush()
        k.net.start(k.w.process("a"))
        k.net.gate = []
        k.w.make_ready("a")
        self.assertNoResult(again)  # ready, but restoring: no lease yet
        fast = k.w.scheduler.acquire("a")
        self.assertNoResult(fast)  # nor on the fast path
        k.net.let_through()
        lease = self.successResultOf(again)
        self.successResultOf(fast).release()
        answer = k.chat("a", follow_up)
        self.assertEqual(answer["timings"]["cache_n"], cached_prefix())
        lease.release()
        self.assertEqual(k.kv.counts["a"].saves, 1)
        self.assertEqual(k.kv.counts["a"].restores, 1)

    def test_without_the_store_the_follow_up_evaluates_everything_again(self) -> None:
        k = KvWorld(self)
        k.kv.config = parse_config(
            config_text(k.path).replace("kvCache: true", "kvCache: false"), "t.yaml"
        )
        follow_up = k.converse_then_swap()
        self.assertEqual(k.kv.states, [])
        k.lease("a")
        self.assertEqual(k.chat("a", follow_up)["timings"]["cache_n"], 0)

    def test_short_slots_are_not_saved(self) -> None:
        k = KvWorld(self)
        k.converse_then_swap(text="hi")
        self.assertEqual(k.kv.states, [])
        self.assertEqual(k.files("a"), [])

    def test_an_idle_timeout_saves_too(self) -> None:
        k = KvWorld(self, extra="globalTTL: 30")
        lease = k.lease("a")
        k.chat("a", [{"role": "user", "content": LONG}])
        lease.release()
        k.w.reactor.advance(30)
        k.flush()
        self.assertEqual(k.w.child("a").signals, ["TERM"])
        self.assertEqual(len(k.kv.states), 1)

    def test_shutdown_saves_unless_told_not_to(self) -> None:
        for save, expected in (("true", 1), ("false", 0)):
            k = KvWorld(self, extra=f"  saveOnShutdown: {save}")
            lease = k.lease("a")
            k.chat("a", [{"role": "user", "content": LONG}])
            lease.release()
            closed = k.w.scheduler.close()
            k.flush()
            self.successResultOf(closed)
            self.assertEqual(len(k.kv.states), expected, save)

    def test_an_explicit_unload_saves_an_idle_model_and_cuts_a_busy_one_at_once(self) -> None:
        k = KvWorld(self)
        lease = k.lease("a")
        k.chat("a", [{"role": "user", "content": LONG}])
        lease.release()
        unloaded = k.w.scheduler.unload(["a"])
        k.flush()
        self.successResultOf(unloaded)
        self.assertEqual(k.w.child("a").signals, ["TERM"])
        self.assertEqual(len(k.kv.states), 1)
        self.assertEqual(k.files("a"), [k.kv.states[0].filename])

        busy = k.lease("b")  # a request in flight: nothing is asked of the child
        k.net.requests.clear()
        k.w.scheduler.unload(["b"])
        self.assertEqual(k.w.child("b").signals, ["TERM"])
        self.assertEqual(k.net.requests, [])
        busy.release()

    def test_an_unload_during_the_restore_does_not_save_what_is_being_restored(self) -> None:
        k = KvWorld(self)
        k.converse_then_swap()
        [saved] = k.kv.states
        k.net.requests.clear()
        again = k.w.scheduler.acquire("a")
        k.flush()
        k.net.start(k.w.process("a"))
        k.net.gate = []
        k.w.make_ready("a")  # restoring, held
        k.w.scheduler.unload(["a"])
        self.assertEqual(k.w.child("a").signals, ["TERM"])
        k.net.let_through()
        self.assertFalse(any("save" in path for _, path in k.net.requests))
        self.assertEqual(k.kv.states, [saved])
        again.cancel()  # the scheduler starts it again for this waiter: not the point here
        self.failureResultOf(again, CancelledError)

    def test_models_without_kv_keeping_are_left_alone(self) -> None:
        k = KvWorld(self)
        self.assertIsNone(k.w.config.models["plain"].slot_save_path)
        k.lease("plain").release()
        k.swap_to("a").release()
        self.assertEqual(k.net.requests, [])


class NeverWrongTests(SynchronousTestCase):
    def test_a_state_from_another_server_build_is_discarded_not_restored(self) -> None:
        k = KvWorld(self)
        follow_up = k.converse_then_swap()
        again = k.w.scheduler.acquire("a")
        k.flush()
        server = k.net.start(k.w.process("a"))
        server.build_info = "b9999-other"
        k.w.make_ready("a")
        k.flush()
        lease = self.successResultOf(again)
        self.assertEqual(k.chat("a", follow_up)["timings"]["cache_n"], 0)
        lease.release()
        self.assertEqual(k.kv.states, [])
        self.assertEqual(k.files("a"), [])
        self.assertFalse(any("restore" in path for _, path in k.net.requests))

    def test_a_refused_restore_costs_only_the_attempt(self) -> None:
        k = KvWorld(self)
        follow_up = k.converse_then_swap()
        [name] = k.files("a")
        directory = k.w.config.models["a"].slot_save_path
        assert directory is not None
        with open(os.path.join(directory, name), "w") as damaged:
            damaged.write("not a slot")
        lease = k.lease("a")
        self.assertEqual(k.chat("a", follow_up)["timings"]["cache_n"], 0)
        lease.release()
        self.assertEqual(k.kv.counts["a"].failures, 1)
        self.assertEqual(k.kv.states, [])

    def dies_restoring(self, k: KvWorld) -> Deferred[Lease]:
        """A request for ``a`` whose child dies restoring its saved slot: the
        connection fails first, the exit is seen a moment later (as it happens)."""
        k.converse_then_swap()
        k.net.dies_restoring = True
        first = len(k.w.reactor.spawned)

        def die() -> None:
            child = k.w.child("a")
            k.w.reactor.callLater(0.01, child.exit, None, 6)  # SIGABRT

        k.net.died = die
        waiting = k.w.scheduler.acquire("a")
        k.flush()
        k.bring_up("a")  # ready; its restore kills it
        self.assertNoResult(waiting)  # no lease on a child that went away
        k.net.dies_restoring = False
        k.w.reactor.advance(0.01)  # its exit is seen: started again
        self.assertEqual(k.w.spawned_models()[first:], ["a", "a"])
        return waiting

    def test_a_restore_the_child_dies_of_discards_the_state(self) -> None:
        # found with llama-server 0.3.36: a truncated slot file made it abort (SIGABRT)
        # in the restore; the state stayed, so each start restored it again and the
        # model crash-looped until the file was removed by hand
        k = KvWorld(self)
        with capturedLogs() as events:
            waiting = self.dies_restoring(k)
            k.bring_up("a")
        self.successResultOf(waiting).release()
        self.assertEqual(k.kv.counts["a"].failures, 1)
        self.assertEqual(k.kv.states, [])
        self.assertEqual(k.files("a"), [])
        said = [formatEvent(e) for e in events]
        self.assertEqual(sum("while serving" in line for line in said), 1, said)  # a crash
        self.assertEqual(sum("went away while its saved slots" in line for line in said), 1)

    def test_the_request_a_child_died_restoring_for_is_served_by_a_plain_start(self) -> None:
        # before: the lease went to the dead child (its exit not seen yet): one 502
        k = KvWorld(self, parallel=2)
        k.converse_then_swap()
        lease = k.lease("b")
        k.chat("b", [{"role": "user", "content": LONG + " more"}])
        lease.release()
        k.swap_to("a").release()  # a restores its state; a second one is saved for it
        lease = k.lease("a")
        k.chat("a", [{"role": "user", "content": LONG + " again"}])
        lease.release()
        k.swap_to("b").release()
        self.assertEqual(len([s for s in k.kv.states if s.model == "a"]), 2)
        waiting = self.dies_restoring(k)
        k.net.requests.clear()
        k.bring_up("a")
        lease = self.successResultOf(waiting)
        self.assertEqual(
            k.chat("a", [{"role": "user", "content": "hi"}])["object"], "chat.completion"
        )
        lease.release()
        # the new child restored nothing; the state that did not kill one is kept
        self.assertFalse(any("restore" in path for _, path in k.net.requests))
        self.assertEqual(len([s for s in k.kv.states if s.model == "a"]), 1)
        self.assertEqual(k.w.scheduler.in_flight("a"), 0)

    def test_a_plain_start_that_dies_too_fails_its_request(self) -> None:
        k = KvWorld(self)
        waiting = self.dies_restoring(k)
        k.w.child("a").exit(1)  # the plain start fails as well: a real failure
        error = self.failureResultOf(waiting)
        self.assertIn("exited with code 1 while starting", str(error.value))
        self.assertEqual(k.w.spawned_models().count("a"), 3)  # no third start of a

    def test_a_restore_crash_that_trips_the_crash_loop_guard_starts_nothing_more(
        self,
    ) -> None:
        # the crash was the last one the guard allows: "not started again for
        # cooldown seconds; requests get 503 + Retry-After meanwhile".  Before: it
        # was started again at once for whoever waited, and then stood ready while
        # every new request got that 503
        k = KvWorld(self, extra="crashLoop:\n  maxFailures: 1\n  cooldown: 30")
        k.converse_then_swap()
        k.net.dies_restoring = True
        first = len(k.w.reactor.spawned)

        def die() -> None:
            k.w.reactor.callLater(0.01, k.w.child("a").exit, None, 6)

        k.net.died = die
        waiting = [k.w.scheduler.acquire("a"), k.w.scheduler.acquire("a")]
        k.flush()
        k.bring_up("a")
        k.w.reactor.advance(0.01)
        self.assertEqual(k.w.spawned_models()[first:], ["a"])  # no start in the cooldown
        for each in waiting:  # told why, and when to come back
            error = self.failureResultOf(each, ApiError).value
            self.assertEqual((error.status, error.code), (503, "model_crash_loop"))
        self.assertEqual(k.w.scheduler.in_flight("a"), 0)
        self.assertEqual(k.w.scheduler.queued("a"), 0)

    def test_a_child_that_does_not_answer_delays_the_swap_only_up_to_the_timeout(self) -> None:
        k = KvWorld(self, extra="  timeout: 3")
        lease = k.lease("a")
        k.chat("a", [{"role": "user", "content": LONG}])
        lease.release()
        k.net.hang = True
        waiting = k.w.scheduler.acquire("b")
        k.w.reactor.advance(2.9)
        self.assertEqual(k.w.child("a").signals, [])
        k.w.reactor.advance(0.1)
        self.assertEqual(k.w.child("a").signals, ["TERM"])
        k.net.hang = False
        k.bring_up("b")
        self.successResultOf(waiting).release()
        self.assertEqual(k.kv.counts["a"].skipped, 1)
        self.assertEqual(k.kv.states, [])

    def test_a_slot_file_no_state_names_is_removed_at_the_next_save(self) -> None:
        k = KvWorld(self)
        directory = k.w.config.models["a"].slot_save_path
        assert directory is not None
        for name in ("slot-late.bin", "notes.txt"):  # a save given up; someone else's
            with open(os.path.join(directory, name), "w") as file:
                file.write("x")
        k.converse_then_swap()
        self.assertEqual(
            sorted(k.files("a")), sorted(["notes.txt", *(s.filename for s in k.kv.states)])
        )

    def test_a_stop_with_nothing_worth_saving_asks_only_for_the_slots(self) -> None:
        """The common swap (short prompts) costs one call to the child and no disk
        work: no /props, no index rewritten unchanged, no directory listed again."""
        k = KvWorld(self)
        k.converse_then_swap(text="hi")  # the first stop of each model sweeps once
        k.swap_to("a").release()
        k.net.requests.clear()
        work = k.disk_work
        k.swap_to("b").release()
        stop_calls = [call for call in k.net.requests if call[1] != "/health"]
        self.assertEqual(stop_calls, [(b"GET", "/slots")])
        self.assertEqual(k.disk_work, work)
        self.assertEqual(k.kv.states, [])

    def test_a_save_given_up_is_swept_at_the_next_stop_even_with_nothing_to_save(
        self,
    ) -> None:
        k = KvWorld(self, extra="  timeout: 3")
        k.converse_then_swap(text="hi")  # swept once: the directory is known clean
        lease = k.lease("a")
        k.chat("a", [{"role": "user", "content": LONG}])
        lease.release()
        k.net.gate = []
        waiting = k.w.scheduler.acquire("b")
        k.flush()
        while not k.net.gate[0][2].endswith(b"?action=save"):  # /slots, /props go through
            [(held, *call)] = k.net.gate
            k.net.gate = None
            answer = k.net.request(*call)
            k.net.gate = []
            answer.chainDeferred(held)
            k.flush()
        k.w.reactor.advance(3)  # ... the save is held, and given up at the time bound
        self.assertEqual(k.kv.counts["a"].skipped, 1)
        k.net.gate = None
        k.bring_up("b")
        self.successResultOf(waiting).release()
        directory = k.w.config.models["a"].slot_save_path
        assert directory is not None
        with open(os.path.join(directory, "slot-late.bin"), "w") as late:
            late.write("x")  # the server finished that save after all
        k.swap_to("a").release()
        k.chat("a", [{"role": "user", "content": "hi"}])
        k.swap_to("b").release()  # nothing worth saving, but a save was asked since
        self.assertEqual(k.files("a"), [])

    def test_a_restart_of_llamaswap_finds_the_saved_states(self) -> None:
        k = KvWorld(self)
        k.converse_then_swap()
        again = KvStore(k.w.config, k.net, k.w.reactor)
        self.assertEqual([s.filename for s in again.states], [s.filename for s in k.kv.states])

    def test_damaged_entries_of_the_index_are_left_out(self) -> None:
        # a row with a wrong type broke the disk budget at every later save (and
        # /running); a file name with a path in it would have been unlinked
        k = KvWorld(self)
        k.converse_then_swap()
        [good] = json.loads((Path(k.kv.settings.path) / "index.json").read_text())
        outside = Path(self.mktemp())
        outside.write_text("not llamaswap's")
        damaged = [
            {**good, "bytes": None},
            {**good, "used_at": "yesterday"},
            {**good, "filename": os.path.relpath(outside, good["directory"])},
            {**good, "extra": 1},
            [good],
        ]
        index = Path(k.kv.settings.path) / "index.json"
        index.write_text(json.dumps([good, *damaged]))
        with capturedLogs() as events:
            again = KvStore(k.w.config, k.net, k.w.reactor)
        self.assertEqual([s.filename for s in again.states], [good["filename"]])
        self.assertIn("ignoring 5 damaged entries", "".join(map(formatEvent, events)))
        self.assertTrue(outside.exists())


class ConversationTests(SynchronousTestCase):
    def test_a_continuation_holds_the_key_of_the_conversation_it_continues(self) -> None:
        first = [{"role": "user", "content": "hello"}]
        later = [*first, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]
        a = Conversation.of({"messages": first})
        b = Conversation.of({"messages": later})
        other = Conversation.of({"messages": [{"role": "user", "content": "bye"}]})
        assert a is not None and b is not None and other is not None
        self.assertIn(a.key, b.prefixes)
        self.assertNotIn(other.key, b.prefixes)
        self.assertEqual(b.tail, "x")
        self.assertIsNone(Conversation.of({"messages": "nope"}))
        self.assertIsNone(Conversation.of({"input": "embed me"}))

    def test_the_state_a_request_continues_is_restored_not_the_most_recent(self) -> None:
        k = KvWorld(self)
        follow_x = k.converse_then_swap(text=LONG)
        other = " ".join(f"other{i}" for i in range(40))
        k.w.reactor.advance(1)
        lease = k.lease("a")  # restores X (the only state), then a new chat Y
        k.chat("a", [{"role": "user", "content": other}])
        lease.release()
        k.w.reactor.advance(1)
        k.swap_to("b").release()
        x, y = sorted(k.kv.states, key=lambda s: s.used_at)
        self.assertEqual((x.tokens, y.tokens), (cached_prefix(), cached_prefix(other)))
        again = k.w.scheduler.acquire("a")
        k.kv.note("a", Conversation.of({"messages": follow_x}))
        k.flush()
        k.bring_up("a")
        lease = self.successResultOf(again)
        self.assertEqual(k.chat("a", follow_x)["timings"]["cache_n"], cached_prefix())
        lease.release()

    def test_a_grown_conversation_replaces_its_shorter_state(self) -> None:
        k = KvWorld(self)
        follow_up = k.converse_then_swap()
        lease = k.lease("a")
        k.chat("a", follow_up)
        lease.release()
        k.swap_to("b").release()
        self.assertEqual(len(k.kv.states), 1)
        self.assertEqual(len(k.files("a")), 1)


class BudgetTests(SynchronousTestCase):
    def test_the_least_recently_used_states_go_when_the_budget_is_full(self) -> None:
        k = KvWorld(self, extra="  maxBytesPerModel: 1000", parallel=1)
        for n in range(3):
            lease = k.lease("a")
            k.chat("a", [{"role": "user", "content": f"{n} {LONG}"}])
            lease.release()
            k.swap_to("b").release()
            k.w.reactor.advance(1)
        sizes = [s.bytes for s in k.kv.states]
        self.assertLessEqual(sum(sizes), 1000)
        self.assertEqual(len(k.files("a")), len(k.kv.states))
        self.assertGreater(len(k.kv.states), 0)


class VisibleTests(SynchronousTestCase):
    def test_cache_n_after_a_restore_is_counted(self) -> None:
        k = KvWorld(self)
        k.converse_then_swap()
        k.lease("a").release()
        k.kv.observe(Activity({"model": "a", "cache_n": 47}))
        k.kv.observe(Activity({"model": "a", "cache_n": 50}))  # not after a restore
        self.assertEqual(k.kv.counts["a"].cached_tokens, 47)
        metrics = {
            sample.name: sample.value
            for family in k.kv.collector().collect()
            for sample in family.samples
        }
        self.assertEqual(metrics["llamaswap_kv_restored_prompt_tokens_total"], 47)
        self.assertEqual(metrics["llamaswap_kv_saves_total"], 1)
        [described] = k.kv.describe()
        self.assertEqual(described["tokens"], cached_prefix())


class OverRealSocketsTests(LiveTestCase):
    """llamaswap over HTTP in front of fake llama-server children (real processes)."""

    async def serve_a_and_b(self, flags: str = "") -> None:
        """Models ``a`` and ``b`` (one swap group), keeping conversations."""
        path = os.path.abspath(self.mktemp())
        server = f"{FAKE} --tokens 2 --token-delay 0{flags}"
        await self.serve(
            f"kvCache:\n  path: {path}\n  minTokens: 10\n"
            "models:\n"
            f"  a:\n    cmd: {server}\n    kvCache: true\n"
            f"  b:\n    cmd: {server}\n    kvCache: true\n"
        )

    async def test_a_follow_up_after_a_to_b_to_a_finds_its_history_in_the_cache(self) -> None:
        await self.serve_a_and_b()
        first = [{"role": "user", "content": LONG}]
        answer = (await self.post("/v1/chat/completions", {"model": "a", "messages": first})).json()
        self.assertEqual(answer["timings"]["cache_n"], 0)
        reply = answer["choices"][0]["message"]
        await self.post("/v1/chat/completions", {"model": "b", "messages": first})
        follow_up = [*first, reply, {"role": "user", "content": "and then?"}]
        again = await self.post("/v1/chat/completions", {"model": "a", "messages": follow_up})
        self.assertEqual(again.json()["timings"]["cache_n"], cached_prefix())

        saved = (await self.request("GET", "/running")).json()["saved_states"]
        self.assertEqual({s["model"] for s in saved}, {"a", "b"})
        # the activity log keeps each request's cache_n
        rows = (await self.request("GET", "/api/activity?model=a")).json()["data"]
        self.assertEqual([r["cache_n"] for r in rows], [cached_prefix(), 0])
        metrics = (await self.request("GET", "/metrics")).body.decode()
        self.assertIn('llamaswap_kv_restores_total{model="a"} 1.0', metrics)
        self.assertIn(
            f'llamaswap_kv_restored_prompt_tokens_total{{model="a"}} {cached_prefix()}.0', metrics
        )

    async def test_a_request_whose_child_dies_restoring_a_damaged_slot_is_answered(
        self,
    ) -> None:
        # llama-server 0.3.36 aborts restoring a damaged slot file; the request that
        # started it got a 502 (its lease went to the dead child), now a 200
        await self.serve_a_and_b(" --abort-on-damaged-slot")
        first = [{"role": "user", "content": LONG}]
        await self.post("/v1/chat/completions", {"model": "a", "messages": first})
        await self.post("/v1/chat/completions", {"model": "b", "messages": first})  # saves a
        directory = self.service.live.current.models["a"].slot_save_path
        assert directory is not None
        [name] = [n for n in os.listdir(directory) if n.startswith("slot-")]
        with open(os.path.join(directory, name), "w") as damaged:
            damaged.write("half a slot")
        again = await self.post("/v1/chat/completions", {"model": "a", "messages": first})
        self.assertEqual(again.code, 200, again.body)
        self.assertEqual(again.json()["timings"]["cache_n"], 0)  # a plain start
        metrics = (await self.request("GET", "/metrics")).body.decode()
        self.assertIn('llamaswap_model_starts_total{model="a"} 3.0', metrics)  # one restart
        self.assertEqual(os.listdir(directory), [])  # the damaged state is gone

    async def test_clients_may_not_save_or_restore_slots_in_llamaswaps_directory(self) -> None:
        path = os.path.abspath(self.mktemp())
        await self.serve(
            f"kvCache:\n  path: {path}\n"
            "models:\n"
            f"  a:\n    cmd: {FAKE}\n    kvCache: true\n"
            f"  own:\n    cmd: {FAKE} --slot-save-path {path}/own\n    kvCache: true\n"
            f"  prefixed:\n    cmd: {FAKE} --api-prefix /api\n    kvCache: true\n"
        )
        for route in (
            "/slots/0?model=a&action=save",
            "/upstream/a/slots/0?action=restore",
            # spellings llama-server reads as a save: it acts on the last action given
            # and decodes the path before it routes
            "/slots/0?model=a&action=erase&action=save",
            "/upstream/a/slots/0?action=erase&action=save",
            "/upstream/a/%73lots/0?action=save",
            "/upstream/a/%u0073lots/0?action=save",  # cpp-httplib's %uXXXX
            "/upstream/a/sl%uD800ots/0?action=save",  # a surrogate: decoded to nothing
            "/upstream/a//slots/0?action=save",
            "/upstream/a/x/../slots/0?action=save",
            "/upstream/prefixed/api/slots/0?action=save",  # a server with --api-prefix
        ):
            refused = await self.post(route, {"filename": "x.bin"})
            self.assertEqual(refused.code, 403, route)
            self.assertEqual(refused.json()["error"]["code"], "slot_action_forbidden")
        for model in ("a", "prefixed"):
            self.assertEqual(os.listdir(self.api.config.models[model].slot_save_path or ""), [])
        erased = await self.request("POST", "/slots/0?model=a&action=erase")
        self.assertEqual(erased.code, 200)
        # a server given its own --slot-save-path: the client's business, relayed
        saved = await self.post("/slots/0?model=own&action=save", {"filename": "x.bin"})
        self.assertEqual(saved.code, 200)
        self.assertIn("x.bin", os.listdir(os.path.join(path, "own")))


class DirectoryTests(SynchronousTestCase):
    def test_llamaswap_adds_slot_save_path_to_llama_server_commands_in_a_private_directory(
        self,
    ) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "kv")
        config = parse_config(
            f"kvCache:\n  path: {path}\n"
            "models:\n"
            "  llama:\n    cmd: /opt/llama-server --port ${PORT}\n"
            "  own:\n    cmd: llama-server --port ${PORT} --slot-save-path /srv/slots\n"
            "  quiet:\n    cmd: llama-server --port ${PORT}\n    kvCache: false\n"
            "  other:\n    cmd: vllm --port ${PORT}\n",
            "t.yaml",
        )
        llama = config.models["llama"]
        assert llama.slot_save_path is not None
        self.assertEqual(llama.cmd.argv[-2:], ("--slot-save-path", llama.slot_save_path))
        self.assertTrue(llama.slot_save_added)
        self.assertEqual(
            (config.models["own"].slot_save_path, config.models["own"].slot_save_added),
            ("/srv/slots", False),
        )
        self.assertIsNone(config.models["quiet"].slot_save_path)
        self.assertIsNone(config.models["other"].slot_save_path)
        KvStore(attrs.evolve(config, models={"llama": llama}), Children(Clock()), Clock())
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o700)
        self.assertTrue(os.path.isdir(llama.slot_save_path))

    def test_a_removed_slot_directory_is_made_again_before_the_next_start(self) -> None:
        # llama-server refuses to start with a --slot-save-path that is not a directory
        k = KvWorld(self)
        directory = k.w.config.models["a"].slot_save_path
        assert directory is not None
        shutil.rmtree(k.kv.settings.path)
        k.w.scheduler.acquire("a")
        k.flush()
        self.assertTrue(os.path.isdir(directory))
        self.assertEqual(os.stat(k.kv.settings.path).st_mode & 0o777, 0o700)

    def test_a_slot_directory_removed_while_the_model_runs_is_made_again_before_a_save(
        self,
    ) -> None:
        # found with llama-server 0.3.36: the state directory removed (a cleaner, a
        # user) while a model ran lost its slots at the next swap ("Unable to save slot")
        k = KvWorld(self)
        lease = k.lease("a")
        k.chat("a", [{"role": "user", "content": LONG}])
        lease.release()
        shutil.rmtree(k.kv.settings.path)
        k.swap_to("b").release()
        self.assertEqual([s.model for s in k.kv.states], ["a"])
        self.assertEqual(k.files("a"), [k.kv.states[0].filename])
        self.assertEqual(os.stat(k.kv.settings.path).st_mode & 0o777, 0o700)


class UnwritableStateTests(SynchronousTestCase):
    """A state directory that cannot be written (read-only, a service user without a
    home) costs the KV keeping, not the models: llama-server refuses to start with a
    ``--slot-save-path`` that is not a directory."""

    TEXT = (
        "models:\n  a:\n    cmd: llama-server --port ${PORT}\n"
        "  b:\n    cmd: x --port ${PORT}\n    kvCache: true\n"
    )

    def test_models_start_without_the_slot_directory_llamaswap_cannot_make(self) -> None:
        blocked = Path(self.mktemp())
        blocked.write_text("a file where the state directory's parent should be")
        config = parse_config(self.TEXT, environ={"XDG_STATE_HOME": str(blocked / "state")})
        for model in config.models.values():
            self.assertNotIn("--slot-save-path", model.cmd.argv)
            self.assertIsNone(model.slot_save_path)
        [notice] = notices_of(config)
        self.assertIn("cannot be written", notice)
        writable = Path(self.mktemp())
        config = parse_config(self.TEXT, environ={"XDG_STATE_HOME": str(writable)})
        for model in config.models.values():
            self.assertIn("--slot-save-path", model.cmd.argv)  # made when it starts

    def test_no_warning_when_no_model_would_keep_its_kv(self) -> None:
        blocked = Path(self.mktemp())
        blocked.write_text("a file where the state directory's parent should be")
        environ = {"XDG_STATE_HOME": str(blocked / "state")}
        plain = "models:\n  a:\n    cmd: x --port ${PORT}\n"
        self.assertEqual(notices_of(parse_config(plain, environ=environ)), ())
        off = "models:\n  a:\n    cmd: llama-server --port ${PORT}\nkvCache: {enabled: false}\n"
        self.assertEqual(notices_of(parse_config(off, environ=environ)), ())
