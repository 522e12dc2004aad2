"""Exits, not pipes: a model stops when its process exits, and what will not go is
fenced off without holding up other models (fake process reactor, fake clock; real
processes for an exit Twisted reports inside ``spawnProcess``)."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any, AnyStr

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessProtocol, IProcessTransport, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from zope.interface import implementer

from llamaswap.config import parse_config
from llamaswap.errors import ModelStopped, StartFailed
from llamaswap.events import EventBus
from llamaswap.logs import LogHub
from llamaswap.ports import PortAllocator
from llamaswap.process import ModelProcess, ModelState, Timing
from llamaswap.relay import Relay

from .daemon import pid_alive
from .helpers import TWO_MODELS, World, world
from .test_child_protocol import Exits

TIMING = Timing(health_timeout=30, stop_timeout=10, pipe_grace=1, kill_grace=5)


class Worlds(SynchronousTestCase):
    def serving(self, model_id: str = "a") -> World:
        """A world where ``model_id`` is ready and idle."""
        w = world(timing=TIMING)
        d = w.scheduler.acquire(model_id)
        w.make_ready(model_id)
        self.successResultOf(d).release()
        return w


class ExitBeforePipesTests(Worlds):
    def test_a_stop_finishes_when_the_process_exits_though_a_descendant_holds_its_output(
        self,
    ) -> None:
        w = self.serving("a")
        a = w.child("a")
        a.ignore_term = True
        port = w.process("a").port
        assert port is not None
        w.busy_ports.add(port)  # the helper is the server, daemonized: it has the port
        swap = w.scheduler.acquire("b")
        self.assertEqual(a.signals, ["TERM"])
        # the server exits; a helper that left its group keeps stdout open
        a.exit(0, holding_pipes=True)
        self.assertIsNone(w.process("a").pid)  # no pid of a dead process
        self.assertIs(w.process("a").state, ModelState.STOPPING)  # its last words drain
        self.assertEqual(w.spawned_models(), ["a"])
        w.reactor.advance(TIMING.pipe_grace)
        # stopped, its pipes closed, reported; b goes ahead
        self.assertIs(w.process("a").state, ModelState.STOPPED)
        self.assertTrue({0, 1, 2, 3} <= a.closed_fds)
        self.assertEqual(w.spawned_models(), ["a", "b"])
        w.make_ready("b")
        self.successResultOf(swap).release()
        stuck = w.process("a").stuck
        self.assertEqual(len(stuck), 1)
        self.assertIn("outside its group holds its output", stuck[0].why)
        self.assertIsNone(stuck[0].live_pid)
        self.assertEqual(stuck[0].port, port)
        self.assertNotEqual(w.process("b").port, port)
        # the helper ends at last: the record goes at the next look, the port is free
        w.busy_ports.clear()
        w.reactor.advance(TIMING.kill_grace)
        self.assertEqual(w.process("a").stuck, [])

    def test_the_last_output_written_before_the_exit_is_in_the_error(self) -> None:
        w = world(timing=TIMING)
        d = w.scheduler.acquire("a")
        a = w.child("a")
        a.exit(1, holding_pipes=True)  # SIGCHLD came before the pipe's last bytes
        a.say("bind: Address already in use")
        a.release_pipes()
        error = self.failureResultOf(d, StartFailed).value
        self.assertIn("exited with code 1 while starting", str(error))
        self.assertIn("Address already in use", str(error))
        self.assertEqual(w.process("a").stuck, [])

    def test_a_child_that_forks_a_server_and_exits_is_never_ready(self) -> None:
        w = world(timing=TIMING)
        d = w.scheduler.acquire("a")
        a = w.child("a")
        a.exit(0, holding_pipes=True)  # the forked server keeps the pipes ...
        self.assertIsNone(w.process("a").pid)
        w.health.status[w.process("a").base_url] = 200  # ... and answers on the port
        a.say("main: server is listening")
        w.reactor.advance(TIMING.poll_interval)
        self.assertIsNot(w.process("a").state, ModelState.READY)
        self.assertNoResult(d)
        w.reactor.advance(TIMING.pipe_grace)
        self.assertIn("exited with code 0 while starting", str(self.failureResultOf(d).value))
        self.assertIs(w.process("a").state, ModelState.FAILED)

    def test_an_exit_while_ready_is_a_crash_even_if_the_pipes_stay_open(self) -> None:
        w = self.serving("a")
        w.child("a").say("ggml: out of memory")
        w.child("a").exit(None, 9, holding_pipes=True)
        self.assertIsNone(w.process("a").pid)
        w.reactor.advance(TIMING.pipe_grace)
        process = w.process("a")
        self.assertIs(process.state, ModelState.STOPPED)
        self.assertTrue(process.exit_was_failure)
        assert process.last_error is not None
        self.assertIn("killed by SIGKILL unexpectedly", process.last_error)
        self.assertIn("out of memory", process.last_error)


class StopTimerTests(Worlds):
    def test_a_child_that_exits_on_the_signal_at_once_leaves_no_kill_for_the_next(
        self,
    ) -> None:
        # found by tests/test_scheduler_states.py: the SIGKILL timer was armed after
        # SIGTERM was sent, so an exit reported inside the signal call (the fakes do)
        # left it running: 10 s later it killed the model's next child
        w = world(timing=TIMING)
        first = w.scheduler.acquire("a")
        w.scheduler.unload(["a"])  # while starting: SIGTERM, and it is gone at once
        self.failureResultOf(first)
        again = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(again).release()
        w.reactor.advance(TIMING.stop_timeout + TIMING.kill_grace)
        self.assertEqual(w.child("a").signals, [])
        self.assertIs(w.process("a").state, ModelState.READY)
        self.assertEqual(w.process("a").stuck, [])

    def test_the_health_deadline_does_not_stop_a_stopping_start_again(self) -> None:
        # found by tests/test_scheduler_states.py: a start unloaded just before its
        # health deadline, by a child slow to die, was stopped a second time when
        # the deadline came: two kill timers, and a child that survived SIGKILL was
        # fenced twice (so one record freed its port while the other still held it)
        w = world(timing=TIMING)
        d = w.scheduler.acquire("a")
        w.reactor.advance(TIMING.health_timeout - 1)
        a = w.child("a")
        a.ignore_term = a.unkillable = True
        w.scheduler.unload(["a"])
        w.reactor.advance(1)  # the health deadline
        self.assertEqual(a.signals, ["TERM"])
        w.reactor.advance(TIMING.stop_timeout)
        w.reactor.advance(TIMING.kill_grace)
        self.assertEqual(a.signals, ["TERM", "KILL"])
        self.assertEqual([c.live_pid for c in w.process("a").stuck], [a.pid])
        self.failureResultOf(d, ModelStopped)  # stopped, not a failed start


class StuckTests(Worlds):
    def test_a_child_that_survives_sigkill_does_not_block_the_next_model(self) -> None:
        w = self.serving("a")
        a = w.child("a")
        a.unkillable = True
        old_port = w.process("a").port
        swap = w.scheduler.acquire("b")
        w.reactor.advance(TIMING.stop_timeout)
        self.assertEqual(a.signals, ["TERM", "KILL"])
        self.assertEqual(w.spawned_models(), ["a"])  # a moment to free its memory
        w.reactor.advance(TIMING.kill_grace)
        process = w.process("a")
        self.assertIs(process.state, ModelState.STOPPED)
        self.assertIsNone(process.pid)  # not the running child any more ...
        [stuck] = process.stuck  # ... but reported, with its live pid
        self.assertEqual(stuck.live_pid, a.pid)
        self.assertEqual(stuck.why, "did not exit after SIGKILL")
        self.assertEqual(w.spawned_models(), ["a", "b"])
        w.make_ready("b")
        self.successResultOf(swap).release()
        # its port is fenced off: a new start of a gets another one
        self.assertNotEqual(w.process("b").port, old_port)
        restart = w.scheduler.acquire("a")
        self.assertNotEqual(w.process("a").port, old_port)
        w.make_ready("a")
        self.successResultOf(restart).release()
        # the old one finally dies: the record goes, the new child is untouched
        a.unkillable = False
        a.exit(None, 9)
        self.assertEqual(process.stuck, [])
        self.assertIs(process.state, ModelState.READY)
        self.assertIsNotNone(process.pid)

    def test_a_stuck_child_of_a_model_a_reload_replaced_stays_reported(self) -> None:
        # found by tests/test_scheduler_states.py: the replaced process left the
        # scheduler's list once its stop gave up, so its stuck child was no longer
        # shown (/running) nor given the last SIGKILL at exit
        w = world(timing=TIMING)
        w.scheduler.acquire("b").addErrback(lambda f: None)
        b = w.child("b")
        b.ignore_term = b.unkillable = True
        w.reload(TWO_MODELS.replace("--model b", "--model b --ctx 2"))
        w.reactor.advance(TIMING.stop_timeout)
        w.reactor.advance(TIMING.kill_grace)
        [old] = w.scheduler.retiring()
        self.assertIs(old.state, ModelState.STOPPED)
        self.assertEqual([c.live_pid for c in old.stuck], [b.pid])
        # /running: the stuck child, not a stopped process as if still finishing
        client: Any = StubTreq(w.api(Relay(RequestTraversalAgent(Resource()))).resource())
        answer = self.successResultOf(client.get("http://llamaswap/running"))
        rows = self.successResultOf(answer.json())["running"]
        shown = [(r["model"], r["state"], r["pid"]) for r in rows]
        self.assertEqual(shown, [("b", "starting", w.child("b").pid), ("b", "stuck", b.pid)])
        b.unkillable = False
        b.exit(None, 9)
        self.assertEqual(w.scheduler.retiring(), [])

    def test_a_reload_lets_go_of_the_process_it_replaced_once_it_is_gone(self) -> None:
        # kept for a stuck child only: otherwise every reload's old processes (their
        # output tails, their crash records) piled up until /running was next asked
        w = world(timing=TIMING)
        w.scheduler.acquire("b").addErrback(lambda f: None)
        for ctx in range(3):
            w.reload(TWO_MODELS.replace("--model b", f"--model b --ctx {ctx}"))
        self.assertEqual(w.scheduler._retiring, [])

    def test_output_of_a_stuck_child_is_logged_but_not_taken_as_the_new_childs(self) -> None:
        w = self.serving("a")
        a = w.child("a")
        a.unkillable = True
        w.scheduler.unload(["a"])
        w.reactor.advance(TIMING.stop_timeout)
        w.reactor.advance(TIMING.kill_grace)
        self.assertEqual(len(w.process("a").stuck), 1)
        d = w.scheduler.acquire("a")
        a.say("old child talking")
        self.assertNotIn("old child talking", w.process("a").tail)
        self.assertIn("old child talking", " ".join(w.logs.history("a")))
        self.assertNoResult(d)


class _ExitsFirst(ProcessProtocol):
    """Hands the transport to ``inner`` only once the child has exited (not reaped):
    the moment a busy machine may give Twisted, between spawning and watching."""

    def __init__(self, inner: IProcessProtocol) -> None:
        self.inner = inner

    def makeConnection(self, transport: Any) -> None:
        os.waitid(os.P_PID, transport.pid, os.WEXITED | os.WNOWAIT)
        self.transport = transport
        self.inner.makeConnection(transport)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.inner.childDataReceived(childFD, data)

    def childConnectionLost(self, childFD: int) -> None:
        self.inner.childConnectionLost(childFD)

    def processExited(self, reason: Failure) -> None:
        self.inner.processExited(reason)

    def processEnded(self, reason: Failure) -> None:
        self.inner.processEnded(reason)


@implementer(IReactorProcess)
class _RealSpawner:
    """The real reactor's ``spawnProcess``, with a hook on either side of it."""

    def around(self, protocol: IProcessProtocol) -> IProcessProtocol:
        return protocol

    def spawned(self, transport: IProcessTransport) -> IProcessTransport:
        return transport

    def command(self, args: list[str]) -> list[str]:
        """What actually runs (``args[0]`` is the executable)."""
        return args

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[AnyStr, AnyStr] | None = None,
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> IProcessTransport:
        protocol = self.around(processProtocol)
        argv = self.command([os.fsdecode(executable), *map(os.fsdecode, args[1:])])
        return self.spawned(
            reactor.spawnProcess(protocol, argv[0], argv, env, path, uid, gid, usePTY, childFDs)
        )


class _ExitBeforeWatched(_RealSpawner):
    """Each child exits before Twisted first asks: Twisted then reports the exit
    inside ``spawnProcess``, before it returns the transport."""

    def around(self, protocol: IProcessProtocol) -> IProcessProtocol:
        return _ExitsFirst(protocol)


class _FailsAfterStarting(_RealSpawner):
    """``spawnProcess`` raises once the child runs (as Twisted would, should its
    bookkeeping fail after the fork)."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def spawned(self, transport: IProcessTransport) -> IProcessTransport:
        assert transport.pid is not None
        self.pids.append(transport.pid)
        raise RuntimeError("Try to register an already registered process.")


class ExitInsideSpawnTests(TestCase):
    timeout = 30

    def model(self, groups: bool) -> tuple[ModelProcess, PortAllocator]:
        say = "import sys; print('bind: no such device', file=sys.stderr); sys.exit(3)"
        command = f"{shlex.quote(sys.executable)} -c {shlex.quote(say)} ${{PORT}}"
        config = parse_config(f"models:\n  quick:\n    cmd: {json.dumps(command)}\n")
        ports = PortAllocator(random.randrange(20000, 40000))
        process = ModelProcess(
            config.models["quick"],
            reactor=_ExitBeforeWatched(),
            clock=reactor,
            logs=LogHub(),
            ports=ports,
            probe=lambda url: Deferred(),  # it never gets to answer
            timing=TIMING,
            process_groups=groups,
            events=EventBus(),
        )
        return process, ports

    async def check_fails_cleanly(self, groups: bool) -> None:
        process, ports = self.model(groups)
        for _ in range(2):  # and again: nothing of the first start is left over
            with self.assertRaises(StartFailed) as raised:
                await process.start()
            self.assertIn("exited with code 3 while starting", str(raised.exception))
            self.assertIn("bind: no such device", str(raised.exception))
            self.assertIs(process.state, ModelState.FAILED)
            self.assertIsNone(process.pid)
            self.assertEqual(ports._leased, set())
            self.assertEqual(process.stuck, [])

    async def test_a_start_that_exits_before_it_is_watched_fails_cleanly(self) -> None:
        await self.check_fails_cleanly(groups=False)

    async def test_the_same_in_a_process_group_with_its_lifeline(self) -> None:
        await self.check_fails_cleanly(groups=True)


def sleeping_model(
    spawner: IReactorProcess, groups: bool, ready_at_once: bool = False
) -> ModelProcess:
    """A model whose real child sleeps for a minute, spawned through ``spawner``."""
    text = "models:\n  m:\n    cmd: sleep 60 ${PORT}\n"
    if ready_at_once:
        text += "    checkEndpoint: none\n"
    return ModelProcess(
        parse_config(text).models["m"],
        reactor=spawner,
        clock=reactor,
        logs=LogHub(),
        ports=PortAllocator(random.randrange(20000, 40000)),
        probe=lambda url: Deferred(),
        timing=TIMING,
        process_groups=groups,
        events=EventBus(),
    )


class FailureAfterStartingTests(TestCase):
    timeout = 30

    async def test_a_child_twisted_started_but_cannot_watch_is_killed(self) -> None:
        for groups in (False, True):
            spawner = _FailsAfterStarting()
            process = sleeping_model(spawner, groups)
            with self.assertRaises(StartFailed) as raised:
                await process.start()
            self.assertIn("already registered", str(raised.exception))
            self.assertIs(process.state, ModelState.FAILED)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
            [pid] = spawner.pids
            for _ in range(500):  # the real child's end, reaped by the reactor
                if not pid_alive(pid):
                    break
                await deferLater(reactor, 0.01)
            self.assertFalse(pid_alive(pid), "the child it could not watch still runs")


class _SlowToItsGroup(_RealSpawner):
    """Each child waits a moment before it runs ``setsid``: its process group does not
    exist yet (as on a busy machine, where a stop may come before the child has run)."""

    WAIT = "import os, sys, time; time.sleep(2); os.execv(sys.argv[1], sys.argv[1:])"

    def command(self, args: list[str]) -> list[str]:
        return [sys.executable, "-c", self.WAIT, *args]


class StopBeforeTheGroupExistsTests(TestCase):
    timeout = 30

    async def test_a_stop_right_after_the_spawn_terminates_the_child(self) -> None:
        # found under CPU load: a stop in the moment after the spawn found no process
        # group to signal (the child had not run setsid yet), so SIGTERM was lost and
        # the stop took unloadTimeout (10 s by default), ending in SIGKILL
        process = sleeping_model(_SlowToItsGroup(), groups=True, ready_at_once=True)
        exits = Exits()
        process.watch(exits)
        await process.start()  # ready at once: no health check
        await process.stop()
        self.assertEqual(exits.how, ["killed by SIGTERM"])


class StoppedChildTests(TestCase):
    timeout = 30

    async def test_a_child_stopped_with_sigstop_ends_on_sigterm(self) -> None:
        # found by kill -STOP on a llama-server child: SIGTERM stayed pending in the
        # stopped process, and each unload or swap waited for SIGKILL at unloadTimeout
        for groups in (False, True):
            process = sleeping_model(_RealSpawner(), groups=groups, ready_at_once=True)
            exits = Exits()
            process.watch(exits)
            await process.start()
            assert process.pid is not None
            os.kill(process.pid, signal.SIGSTOP)
            for _ in range(500):
                with open(f"/proc/{process.pid}/stat") as stat:
                    if stat.read().rpartition(")")[2].split()[0] == "T":
                        break
                await deferLater(reactor, 0.01)
            await process.stop()
            self.assertEqual(exits.how, ["killed by SIGTERM"], f"groups={groups}")
