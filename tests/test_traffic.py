"""Traffic that doesn't thrash: pools, priorities and slots (fake clock, fake children)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError, parse_config

from .helpers import world

POOLED = """
scheduler:
  policy: fifo
pools:
  tasks:
    models: [a, b]
    priority: -1
models:
  a:
    cmd: sleep --port ${PORT} --model a
  b:
    cmd: sleep --port ${PORT} --model b
  c:
    cmd: sleep --port ${PORT} --model c
"""

SIDE_BY_SIDE = """
groups:
  both:
    members: [a, b]
    swap: false
pools:
  tasks:
    models: [a, b]
models:
  a:
    cmd: sleep --port ${PORT} --model a
  b:
    cmd: sleep --port ${PORT} --model b
"""


def slots(n: int, policy: str = "fifo") -> str:
    return f"""
scheduler:
  policy: {policy}
models:
  a:
    cmd: sleep --port ${{PORT}} --model a --parallel {n}
  b:
    cmd: sleep --port ${{PORT}} --model b
"""


class PoolTests(SynchronousTestCase):
    def test_a_pool_uses_the_loaded_model_and_starts_the_first_only_when_none_is(self) -> None:
        w = world(POOLED)
        self.assertEqual(w.scheduler.pick(("a", "b")), "a")  # nothing loaded
        d = w.scheduler.acquire("b")
        w.make_ready("b")
        self.successResultOf(d).release()
        self.assertEqual(w.scheduler.pick(("a", "b")), "b")
        lease = self.successResultOf(w.scheduler.acquire(w.scheduler.pick(("a", "b"))))
        lease.release()
        self.assertEqual(w.spawned_models(), ["b"])  # no swap for the pool

    def test_a_model_being_started_beats_one_that_is_not(self) -> None:
        w = world(POOLED)
        w.scheduler.acquire("b")  # b is starting
        self.assertEqual(w.scheduler.pick(("a", "b")), "b")

    def test_the_most_recently_used_loaded_model_is_chosen(self) -> None:
        w = world(SIDE_BY_SIDE)
        for model in ("a", "b"):
            d = w.scheduler.acquire(model)
            w.make_ready(model)
            self.successResultOf(d).release()
            w.reactor.advance(1)
        self.assertEqual(w.scheduler.pick(("a", "b")), "b")
        self.successResultOf(w.scheduler.acquire("a")).release()
        self.assertEqual(w.scheduler.pick(("a", "b")), "a")

    def test_a_model_about_to_be_swapped_away_is_not_chosen(self) -> None:
        w = world(POOLED)
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        lease = self.successResultOf(d)
        w.scheduler.acquire("c")  # a is doomed once its request finishes
        self.assertEqual(w.scheduler.pick(("a", "c")), "c")
        lease.release()

    def test_pool_names_are_checked(self) -> None:
        base = "models:\n  a:\n    cmd: x --port ${PORT}\n    aliases: [al]\n"
        for pools, path in (
            ("pools:\n  p:\n    models: [zz]\n", "pools.p.models[0]"),
            ("pools:\n  a:\n    models: [a]\n", "pools.a"),
            ("pools:\n  al:\n    models: [a]\n", "pools.al"),
            ("pools:\n  p:\n    models: []\n", "pools.p.models"),
            ("pools:\n  p: {}\n", "pools.p.models"),
            ("pools:\n  'p:q':\n    models: [a]\n", "pools.p:q"),
            ("pools:\n  p:\n    models: [a]\n    priority: low\n", "pools.p.priority"),
        ):
            with self.assertRaises(ConfigError) as caught:
                parse_config(base + pools, "t.yaml")
            self.assertEqual(caught.exception.path, path)


class PriorityTests(SynchronousTestCase):
    def test_a_background_swap_does_not_make_the_user_wait(self) -> None:
        w = world(POOLED)
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        user = self.successResultOf(d)
        background = w.scheduler.acquire("b", priority=-1)  # swap to b: a is draining
        # the user's next request for a is served at once, not queued behind b's swap
        again = self.successResultOf(w.scheduler.acquire("a"))
        user.release()
        self.assertEqual(w.child("a").signals, [])  # still serving the user
        again.release()
        self.assertEqual(w.child("a").signals, ["TERM"])  # now the background swap runs
        w.make_ready("b")
        self.successResultOf(background)

    def test_a_request_of_equal_priority_still_waits_for_the_swap(self) -> None:
        w = world(POOLED)
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        lease = self.successResultOf(d)
        w.scheduler.acquire("b")
        self.assertNoResult(w.scheduler.acquire("a"))  # fifo: behind b
        lease.release()

    def test_a_background_swap_not_yet_stopping_anything_yields_to_the_user(self) -> None:
        w = world(POOLED)
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        lease = self.successResultOf(d)
        background = w.scheduler.acquire("b", priority=-1)
        user = w.scheduler.acquire("c")  # more urgent, for another model
        lease.release()  # a drained: c goes first, b's swap is postponed
        self.assertEqual(w.spawned_models(), ["a", "c"])
        w.make_ready("c")
        self.successResultOf(user).release()
        self.assertNoResult(background)
        self.assertEqual(w.spawned_models(), ["a", "c", "b"])

    def test_slots_go_to_the_user_before_a_queued_background_request(self) -> None:
        w = world(slots(1))
        title = w.scheduler.acquire("a", priority=-1)  # arrives first
        chat = w.scheduler.acquire("a")
        w.make_ready("a")
        lease = self.successResultOf(chat)
        self.assertNoResult(title)  # the only slot is the user's
        lease.release()
        self.successResultOf(title)

    def test_background_work_leaves_one_slot_for_the_user(self) -> None:
        w = world(slots(2))
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(d).release()
        tags = self.successResultOf(w.scheduler.acquire("a", priority=-1))
        follow_ups = w.scheduler.acquire("a", priority=-1)
        self.assertNoResult(follow_ups)  # the second slot stays free
        chat = self.successResultOf(w.scheduler.acquire("a"))
        tags.release()
        self.assertNoResult(follow_ups)  # the user still holds one of the two
        chat.release()
        self.successResultOf(follow_ups)

    def test_without_a_known_slot_count_nothing_is_held_back(self) -> None:
        w = world(POOLED)
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(d)
        self.successResultOf(w.scheduler.acquire("a", priority=-1))

    def test_slots_come_from_the_command(self) -> None:
        for args, expected in (
            ("--parallel 4", 4),
            ("-np 2", 2),
            ("--parallel=3", 3),
            ("", None),
            ("--parallel -1", None),
        ):
            config = parse_config(f"models:\n  m:\n    cmd: x --port ${{PORT}} {args}\n", "t")
            self.assertEqual(config.models["m"].slots, expected, args)


DEFAULTS = """
models:
  a:
    cmd: sleep --port ${PORT} --model a
  b:
    cmd: sleep --port ${PORT} --model b
"""


class HoldTests(SynchronousTestCase):
    """The default schedule: collate, holding a model ``hold`` seconds after a request."""

    def test_the_default_policy_collates_and_holds_for_a_second(self) -> None:
        policy = parse_config(DEFAULTS, "t.yaml").policy
        self.assertEqual((policy.name, getattr(policy, "hold", None)), ("collate", 1.0))

    def test_an_agents_next_step_keeps_the_model_it_just_used(self) -> None:
        w = world(DEFAULTS)
        d = w.scheduler.acquire("a")
        w.reactor.advance(2)  # loading takes 2 s: b would wait up to 12 s for its swap
        w.make_ready("a")
        self.successResultOf(d).release()  # the agent runs a tool now
        w.reactor.advance(0.1)
        other = w.scheduler.acquire("b")  # someone else arrives in between
        w.reactor.advance(0.5)
        step = self.successResultOf(w.scheduler.acquire("a"))  # the next step: no swap
        self.assertEqual(w.spawned_models(), ["a"])
        step.release()
        w.reactor.advance(0.9)
        self.assertEqual(w.child("a").signals, [])  # held 1 s after the last request
        w.reactor.advance(0.1)
        self.assertEqual(w.child("a").signals, ["TERM"])
        w.make_ready("b")
        self.successResultOf(other)

    def test_a_client_that_moves_to_another_model_is_not_held_back(self) -> None:
        # one client alternating between models (a user switching the model picker,
        # an agent's plan moving on): the hold is for its next step, not against it
        w = world(DEFAULTS)
        d = w.scheduler.acquire("a", client="alice")
        w.reactor.advance(2)
        w.make_ready("a")
        self.successResultOf(d).release()
        w.reactor.advance(0.1)
        moved_on = w.scheduler.acquire("b", client="alice")
        self.assertEqual(w.child("a").signals, ["TERM"])  # at once, not after the hold
        w.make_ready("b")
        self.successResultOf(moved_on).release()
        w.reactor.advance(0.1)
        someone_else = w.scheduler.acquire("a", client="bob")
        self.assertEqual(w.child("b").signals, [])  # held for alice's next step
        w.reactor.advance(0.9)
        self.assertEqual(w.child("b").signals, ["TERM"])
        self.assertNoResult(someone_else)

    def test_holding_never_goes_past_max_wait(self) -> None:
        w = world("scheduler:\n  maxWait: 5\n  hold: 3\n" + DEFAULTS.lstrip())
        d = w.scheduler.acquire("a")
        w.reactor.advance(2)  # patience: 6 x 2 s, so maxWait is the bound here
        w.make_ready("a")
        self.successResultOf(d).release()
        other = w.scheduler.acquire("b")
        for _ in range(4):  # a closed-loop client on a: every 1 s, inside the hold
            w.reactor.advance(1)
            self.successResultOf(w.scheduler.acquire("a")).release()
        w.reactor.advance(1)  # b has waited maxWait: the swap starts
        self.assertEqual(w.child("a").signals, ["TERM"])
        self.assertNoResult(w.scheduler.acquire("a"))  # now a waits behind b
        w.make_ready("b")
        self.successResultOf(other)

    def test_a_cheap_swap_is_not_kept_waiting_long(self) -> None:
        w = world(DEFAULTS)
        d = w.scheduler.acquire("a")
        w.reactor.advance(1)  # a loads in 1 s; b, never loaded, is expected to as well
        w.make_ready("a")
        lease = self.successResultOf(d)
        other = w.scheduler.acquire("b")
        for _ in range(5):  # a stays busy: its clients keep sending requests
            w.reactor.advance(1)
            newer = self.successResultOf(w.scheduler.acquire("a"))
            lease.release()
            lease = newer
        w.reactor.advance(1)  # b has waited 6 x 1 s (not maxWait, 30 s): a is doomed
        self.assertNoResult(w.scheduler.acquire("a"))
        lease.release()
        self.assertEqual(w.child("a").signals, ["TERM"])
        w.make_ready("b")
        self.successResultOf(other)

    def test_hold_zero_swaps_as_soon_as_the_model_is_idle(self) -> None:
        w = world("scheduler:\n  hold: 0\n" + DEFAULTS.lstrip())
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        lease = self.successResultOf(d)
        w.scheduler.acquire("b")
        lease.release()
        self.assertEqual(w.child("a").signals, ["TERM"])


class CapabilityTests(SynchronousTestCase):
    def test_capabilities_come_from_the_config_else_from_the_flags(self) -> None:
        for extra, expected in (
            (" --embedding", ("embeddings",)),
            (" --embeddings --pooling cls", ("embeddings",)),
            (" --reranking", ("rerank",)),
            ("", ("chat",)),
            ("\n    capabilities: [chat, embeddings]", ("chat", "embeddings")),
        ):
            text = f"models:\n  m:\n    cmd: x --port ${{PORT}}{extra}\n"
            self.assertEqual(parse_config(text, "t").models["m"].capabilities, expected, extra)

    def test_an_unknown_capability_is_refused_with_its_key_path(self) -> None:
        text = "models:\n  m:\n    cmd: x --port ${PORT}\n    capabilities: [vision]\n"
        with self.assertRaises(ConfigError) as caught:
            parse_config(text, "t.yaml")
        self.assertEqual(caught.exception.path, "models.m.capabilities[0]")
