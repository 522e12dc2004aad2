"""Exits, not pipes: a model stops when its process exits, and what will not go is
fenced off without holding up other models (fake process reactor, fake clock)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.errors import StartFailed
from llamaswap.process import ModelState, Timing

from .helpers import World, world

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
