"""Unlucky timing: callbacks that fire sooner than the code that caused them expects.

Twisted may run a callback inside the call that makes it due (a Deferred that has
fired already, a lease granted at once, a waiter that starts the model again from
inside the exit it waited for).  Each test here forces one such order with the
in-memory fakes and a ``Clock``, where the fakes deliver synchronously as Twisted may,
or happens with real sockets whenever it happens.
"""

from __future__ import annotations

import gc
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llamaswap.config import parse_config
from llamaswap.events import Activity, Event
from llamaswap.process import ModelState
from llamaswap.relay import MAX_ERROR_BYTES, BytesProducer
from llamaswap.scheduler import Lease

from .helpers import TWO_MODELS, World, world
from .integration import LiveTestCase, StreamReader

A_AND_PROFILE = TWO_MODELS + "profiles:\n  ab: [a, b]\n"

READY_AT_ONCE = """
models:
  c:
    cmd: sleep --port ${PORT} --model c
    ttl: 30
    checkEndpoint: none
"""


class StartedAgainFromItsOwnEndTests(SynchronousTestCase):
    """A model's end wakes waiters that start it again before the end has returned."""

    def test_a_start_made_by_the_failed_starts_waiters_becomes_ready(self) -> None:
        # 'a' fails; its waiter's failure lets the next swap (for the profile) start
        # 'a' again from inside that failure: the new start's readiness watch must live
        w = world(A_AND_PROFILE)
        alone = w.scheduler.acquire("a")
        both = w.scheduler.acquire("b", profile="ab")
        w.child("a").exit(1)
        self.failureResultOf(alone)
        self.assertEqual(w.spawned_models(), ["a", "a", "b"])
        w.make_ready("a")
        w.make_ready("b")
        self.assertIsInstance(self.successResultOf(both), Lease)
        self.assertIs(w.process("a").state, ModelState.READY)

    def test_a_model_started_again_as_its_last_child_exits_keeps_its_idle_timer(
        self,
    ) -> None:
        # a load while 'c' is stopping waits for the exit, starts 'c' (ready at once)
        # and releases its lease, all inside that exit: telling the scheduler of the
        # exit afterwards would cancel the new idle timer, and 'c' would stay loaded
        w = world(READY_AT_ONCE)
        w.scheduler.load("c")
        w.child("c").ignore_term = True
        w.scheduler.unload(["c"])
        loaded = w.scheduler.load("c")
        w.child("c").exit(0)
        self.successResultOf(loaded)
        self.assertEqual(w.spawned_models(), ["c", "c"])
        self.assertEqual(w.scheduler.idle_deadline("c"), 30.0)
        w.reactor.advance(30)
        self.assertIs(w.process("c").state, ModelState.STOPPED)
        self.assertEqual(w.process("c").stop_reason, "ttl")


class _Silent(Protocol):
    """Reads a request and never answers it."""

    def __init__(self, server: _SilentServer) -> None:
        self.server = server

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and not self.server.read.called:
            self.server.read.callback(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.server.closed.callback(None)


class _SilentServer(ServerFactory):
    def __init__(self) -> None:
        self.read: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def buildProtocol(self, addr: IAddress | None) -> _Silent:
        return _Silent(self)


class ClientGoneTests(LiveTestCase):
    """Real sockets: the client leaves while the model server has not answered."""

    async def test_a_client_gone_before_the_answer_is_not_the_servers_failure(self) -> None:
        # cancelling the upstream request fails it inside the cancel, before the
        # relay's own Deferred counts as cancelled: that failure once passed for the
        # server's (a 502 in the activity log, an error page written to nobody)
        server = _SilentServer()
        api = await self.serve_in_front_of(server)
        finished: Deferred[Any] = Deferred()

        def seen(event: Event) -> None:
            if isinstance(event, Activity):
                finished.callback(event.row)

        api.events.subscribe(seen)
        asking = self.agent.request(
            b"POST",
            (self.base + "/v1/chat/completions").encode(),
            Headers({"content-type": ["application/json"]}),
            BytesProducer(json.dumps({"model": "m", "messages": []}).encode()),
        )
        asking.addErrback(lambda failure: None)
        await server.read
        asking.cancel()  # the client hangs up
        await server.closed  # so llamaswap hangs up on the server (generation stops)
        row = await finished
        self.assertEqual((row["status"], row["error"]), (499, "the client disconnected"))
        self.assertEqual(api.scheduler.in_flight("m"), 0)


class ReloadWhileStartingTests(SynchronousTestCase):
    """A reload changes a model while a swap starts it: its requests wait for the new one."""

    def reload_changing_a(self, w: World) -> None:
        changed = parse_config(TWO_MODELS.replace("--model a", "--model a --ctx 2"), "test.yaml")
        w.scheduler.reconfigure(changed, w.make_process)

    def test_the_old_process_exits_later(self) -> None:
        w = world()
        waiting = w.scheduler.acquire("a")
        w.child("a").ignore_term = True
        self.reload_changing_a(w)
        w.child("a").exit(None, signal=15)  # the old child goes
        self.assertNoResult(waiting)
        self.assertIn("--ctx", w.child("a").args)  # the new one starts
        w.make_ready("a")
        self.assertIsInstance(self.successResultOf(waiting), Lease)

    def test_the_old_process_exits_inside_the_reload(self) -> None:
        # its stop ends it at once (the fake's SIGTERM): the reload is still adopting
        # the new configuration when the old start fails
        w = world()
        waiting = w.scheduler.acquire("a")
        self.reload_changing_a(w)
        self.assertNoResult(waiting)
        self.assertIn("--ctx", w.child("a").args)
        w.make_ready("a")
        self.assertIsInstance(self.successResultOf(waiting), Lease)

    def test_a_start_waiting_for_the_old_process_to_stop_starts_the_new_one(self) -> None:
        # found by tests/test_scheduler_states.py: a request for 'a' while its unload
        # waited for a slow child; a reload then replaced 'a'.  As the old child went,
        # the old process started again, for a slot that was gone: its child ran on,
        # owned by nobody and shown nowhere, beside the new one
        w = world()
        first = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(first).release()
        old = w.child("a")
        old.ignore_term = True
        w.scheduler.unload(["a"])
        waiting = w.scheduler.acquire("a")
        self.reload_changing_a(w)
        old.exit(None, signal=9)
        self.assertEqual(w.spawned_models(), ["a", "a"])
        self.assertIn("--ctx", w.child("a").args)  # the one new child is the new one
        w.make_ready("a")
        self.assertIsInstance(self.successResultOf(waiting), Lease)
        self.assertEqual(w.scheduler.retiring(), [])


class _ErrorAnswer(Protocol):
    """Answers a health check 200; a chat with the head of a 500 whose body it holds."""

    def __init__(self, server: _ErrorServer) -> None:
        self.server = server

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if data.startswith(b"GET"):
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            return
        self.server.answered = self
        self.answer_chat()

    def answer_chat(self) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 500 Oops\r\ncontent-length: 40\r\n\r\n{")
        self.server.answering.callback(self)

    def finish(self) -> None:
        assert self.transport is not None
        self.transport.write(b" " * 39)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.server.answered is self:
            self.server.closed.callback(None)


class _ErrorServer(ServerFactory):
    def __init__(self, answer: type[_ErrorAnswer] = _ErrorAnswer) -> None:
        self.answer = answer
        self.answering: Deferred[_ErrorAnswer] = Deferred()
        self.answered: _ErrorAnswer | None = None
        self.closed: Deferred[None] = Deferred()

    def buildProtocol(self, addr: IAddress | None) -> _ErrorAnswer:
        return self.answer(self)


class _ErrorAnswerCase(LiveTestCase):
    timeout = 20

    async def loading_stream(self, server: _ErrorServer) -> StreamReader:
        """A streamed chat, with loading progress, for a model that ``server`` is."""
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        await self.serve(
            "models:\n  m:\n    cmd: sleep 60\n    checkEndpoint: /health\n"
            f"    proxy: http://127.0.0.1:{port.getHost().port}\n"  # type: ignore[attr-defined]
            "    sendLoadingState: true\n"
        )
        response, reader = await self.stream({"model": "m", "stream": True, "messages": []})
        self.assertEqual(response.code, 200)
        return reader


class ClientGoneDuringAnErrorAnswerTests(_ErrorAnswerCase):
    async def test_a_client_gone_while_the_error_is_read_stops_the_reading(self) -> None:
        # a client of the loading stream (already 200) hears a server's error as an
        # error event; gone while that error is read, it must not be written to (a
        # RuntimeError once), and the server's connection is closed
        server = _ErrorServer()
        reader = await self.loading_stream(server)
        answering = await server.answering
        await reader.until(b"is ready")
        reader.hang_up()
        await reader.done
        await server.closed  # (before: held until the server ended its error)
        answering.finish()  # too late: nobody reads it any more
        gc.collect()  # an error left in a Deferred is logged as it is collected
        self.assertEqual(self.flushLoggedErrors(RuntimeError), [])


class _EndlessErrorAnswer(_ErrorAnswer):
    """A chat gets a 500 that says more than an error event may carry, and never ends."""

    def answer_chat(self) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 500 Oops\r\ncontent-length: 1000000\r\n\r\n")
        self.transport.write(b"x" * (MAX_ERROR_BYTES + 1))


class AnErrorAnswerTooLongTests(_ErrorAnswerCase):
    async def test_the_stream_ends_once_the_error_is_too_long_to_keep(self) -> None:
        # the error of a loading stream is kept whole for its event: past the cap
        # (64 KiB) the reading stops, the server's connection is closed and the client
        # is told so, without the server's text (before: read to its end, all kept)
        server = _ErrorServer(_EndlessErrorAnswer)
        reader = await self.loading_stream(server)
        await reader.done
        self.assertIn("an error answer too long", reader.text)
        self.assertNotIn("xxx", reader.text)
        await server.closed
