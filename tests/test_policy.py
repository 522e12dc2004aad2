"""Swap policies: pure decisions, and the scheduler following them (fake clock)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.policy import ArrivalOrder, Collate, Victim, Waiting

from .helpers import world

COLLATE = """
scheduler:
  policy: collate
  maxWait: 10
  maxResidency: 25
  hold: 0
  patience: 0
models:
  a:
    cmd: sleep --port ${PORT} --model a
  b:
    cmd: sleep --port ${PORT} --model b
  c:
    cmd: sleep --port ${PORT} --model c
    priority: 5
"""


class PolicyTests(SynchronousTestCase):
    def test_arrival_order_always_swaps(self) -> None:
        policy = ArrivalOrder()
        self.assertTrue(policy.swap_now(Waiting("b", 0), [Victim("a", True, 0)], 0))
        self.assertIsNone(policy.recheck_at(Waiting("b", 0), [Victim("a", True, 0)], 0))

    def test_collate_waits_while_the_victim_is_busy_within_the_bounds(self) -> None:
        policy = Collate(max_wait=10, max_residency=25)
        waiting = Waiting("b", arrived=100)
        busy = [Victim("a", busy=True, resident_since=90)]
        self.assertFalse(policy.swap_now(waiting, busy, 105))
        self.assertTrue(policy.swap_now(waiting, busy, 110))  # waited max_wait
        self.assertEqual(policy.recheck_at(waiting, busy, 105), 110)
        old = [Victim("a", busy=True, resident_since=80)]
        self.assertTrue(policy.swap_now(waiting, old, 105))  # resident max_residency
        self.assertEqual(policy.recheck_at(waiting, old, 100), 105)
        held = [Victim("a", busy=False, resident_since=90, idle_since=99.5)]
        self.assertFalse(Collate(hold=1).swap_now(waiting, held, 100))
        self.assertEqual(Collate(hold=1).recheck_at(waiting, held, 100), 100.5)
        self.assertTrue(Collate(hold=1).swap_now(waiting, held, 100.5))
        # the client of a's last request now asks for b: it moved on, a is not held
        mine = [Victim("a", busy=False, resident_since=90, idle_since=99.5, last_client=7)]
        self.assertTrue(Collate(hold=1).swap_now(Waiting("b", 100, client=7), mine, 100))
        self.assertFalse(Collate(hold=1).swap_now(Waiting("b", 100, client=8), mine, 100))
        cheap = Waiting("b", arrived=100, load_seconds=1.5)
        patient = Collate(max_wait=10, max_residency=25, patience=4)
        self.assertFalse(patient.swap_now(cheap, busy, 105.9))
        self.assertTrue(patient.swap_now(cheap, busy, 106))  # 4 x its 1.5 s load
        self.assertEqual(patient.recheck_at(cheap, busy, 101), 106)
        dear = Waiting("b", arrived=100, load_seconds=20)
        self.assertEqual(patient.recheck_at(dear, busy, 101), 110)  # maxWait still caps
        idle = [Victim("a", busy=False, resident_since=90)]
        self.assertTrue(policy.swap_now(waiting, idle, 100))


class CollatingSchedulerTests(SynchronousTestCase):
    def test_the_loaded_model_keeps_serving_then_swaps_when_idle(self) -> None:
        w = world(COLLATE)
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        first = self.successResultOf(d)
        pending_b = w.scheduler.acquire("b")
        # a is busy: b waits, and a new request for a rides along at once
        second = self.successResultOf(w.scheduler.acquire("a"))
        self.assertEqual(w.spawned_models(), ["a"])
        first.release()
        self.assertEqual(w.child("a").signals, [])
        second.release()  # a is idle now: the swap happens
        self.assertEqual(w.child("a").signals, ["TERM"])
        w.make_ready("b")
        self.successResultOf(pending_b)

    def test_nobody_waits_longer_than_max_wait_before_the_swap_starts(self) -> None:
        w = world(COLLATE)
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        lease = self.successResultOf(d)
        pending_b = w.scheduler.acquire("b")
        for _ in range(9):  # a stays busy with a steady trickle of requests
            w.reactor.advance(1)
            newer = self.successResultOf(w.scheduler.acquire("a"))
            lease.release()
            lease = newer
        w.reactor.advance(1)  # b has waited 10 s: a is now doomed
        late_a = w.scheduler.acquire("a")
        self.assertNoResult(late_a)  # queued behind b
        lease.release()
        self.assertEqual(w.child("a").signals, ["TERM"])
        w.make_ready("b")
        self.successResultOf(pending_b)

    def test_priority_goes_first(self) -> None:
        w = world(COLLATE)
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        lease = self.successResultOf(d)
        pending_b = w.scheduler.acquire("b")
        pending_c = w.scheduler.acquire("c")  # later, but priority 5
        lease.release()
        self.assertEqual(w.spawned_models(), ["a", "c"])
        w.make_ready("c")
        self.successResultOf(pending_c).release()
        w.make_ready("b")
        self.successResultOf(pending_b)
