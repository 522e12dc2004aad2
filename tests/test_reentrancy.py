"""Unlucky timing: callbacks that fire sooner than the code that caused them expects.

Twisted may run a callback inside the call that makes it due (a Deferred that has
fired already, a lease granted at once, a waiter that starts the model again from
inside the exit it waited for).  Each test here forces one such order with the
in-memory fakes and a ``Clock``, where the fakes deliver synchronously as Twisted may.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.process import ModelState
from llamaswap.scheduler import Lease

from .helpers import TWO_MODELS, world

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
