"""Swaps, queueing, draining and idle stops, in memory with a fake clock."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.errors import ApiError, StartFailed
from llamaswap.events import ModelChanged, Swapped
from llamaswap.process import ModelState, Timing
from llamaswap.scheduler import Lease

from .helpers import TWO_MODELS, World, world


def behind_a_failed_start(w: World, failing: str, *models: str) -> list[Deferred[Lease]]:
    """Requests for ``models`` queue behind the start of ``failing``, which then fails."""
    w.scheduler.acquire(failing).addErrback(lambda f: None)
    waiting = [w.scheduler.acquire(model) for model in models]
    w.child(failing).exit(1)
    return waiting


class SwapTests(SynchronousTestCase):
    def test_each_model_is_looked_at_through_its_live_process(self) -> None:
        w = world()
        for model_id in ("a", "b"):
            self.assertIs(w.scheduler.view(model_id), w.scheduler.processes[model_id])
            self.assertIs(w.scheduler.view(model_id), w.process(model_id))

    def test_cold_start_then_fast_path(self) -> None:
        w = world()
        d = w.scheduler.acquire("a")
        self.assertNoResult(d)
        self.assertEqual(w.spawned_models(), ["a"])
        self.assertTrue(w.child("a").stdin_closed)
        w.make_ready("a")
        lease = self.successResultOf(d)
        self.assertEqual(lease.base_url, w.process("a").base_url)
        lease.release()
        # ready and nothing queued: granted at once, no new child
        self.successResultOf(w.scheduler.acquire("a")).release()
        self.assertEqual(w.spawned_models(), ["a"])

    def test_swap_stops_the_running_model_before_starting_the_next(self) -> None:
        w = world()
        first = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(first).release()
        second = w.scheduler.acquire("b")
        self.assertEqual(w.child("a").signals, ["TERM"])
        self.assertTrue(w.child("a").ended)
        self.assertEqual(w.spawned_models(), ["a", "b"])
        w.make_ready("b")
        self.successResultOf(second).release()
        self.assertEqual([p.args[-1] for p in w.reactor.running()], ["b"])

    def test_the_waiting_request_is_granted_before_the_bookkeeping_of_its_swap(
        self,
    ) -> None:
        """The lines and events that say a model is ready and a swap done come after
        the waiting request has its lease: it goes out to the child in that very turn,
        and they would hold it back."""
        w = world()
        first = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(first).release()
        w.reactor.advance(0)  # the first swap's last line
        waiting = w.scheduler.acquire("b")
        granted_when: list[tuple[str, bool]] = []
        w.events.subscribe(
            lambda event: granted_when.append((type(event).__name__, waiting.called)),
            [Swapped, ModelChanged],
        )

        def line(event: dict[str, Any]) -> None:
            text = event.get("log_format") or ""
            if "ready in" in text or "done in" in text:
                granted_when.append((text.split(" {")[0], waiting.called))

        observer = cast(ILogObserver, line)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        w.make_ready("b")
        self.successResultOf(waiting).release()
        w.reactor.advance(0)  # "swap done" follows "model ready", a turn later
        self.assertIn(("Swapped", True), granted_when)
        lines = [what for what, _ in granted_when if what in ("model", "swap to")]
        self.assertEqual(lines, ["model", "swap to"])  # "model … ready", "swap to … done"
        self.assertIn(("model", True), granted_when)
        self.assertIn(("swap to", True), granted_when)
        # the model's own change of state is told before: the scheduler acts on it
        self.assertIn(("ModelChanged", False), granted_when)

    def test_concurrent_requests_for_a_cold_model_share_one_start(self) -> None:
        w = world()
        waiting = [w.scheduler.acquire("a") for _ in range(3)]
        w.make_ready("a")
        leases = [self.successResultOf(d) for d in waiting]
        self.assertEqual(w.spawned_models(), ["a"])
        self.assertEqual(w.scheduler.in_flight("a"), 3)
        for lease in leases:
            lease.release()
        self.assertEqual(w.scheduler.in_flight("a"), 0)

    def test_different_models_are_served_in_arrival_order(self) -> None:
        w = world()
        d_a = w.scheduler.acquire("a")
        w.make_ready("a")
        lease_a = self.successResultOf(d_a)
        order: list[str] = []

        def record(lease: Lease) -> Lease:
            order.append(lease.model_id)
            lease.release()
            return lease

        # b arrives before the second a: the second a must not jump the queue
        d_b = w.scheduler.acquire("b").addCallback(record)
        d_a2 = w.scheduler.acquire("a").addCallback(record)
        d_c = w.scheduler.acquire("c").addCallback(record)
        lease_a.release()
        w.make_ready("b")
        w.make_ready("a")
        w.make_ready("c")
        for d in (d_b, d_a2, d_c):
            self.successResultOf(d)
        self.assertEqual(order, ["b", "a", "c"])
        self.assertEqual(w.spawned_models(), ["a", "b", "a", "c"])

    def test_swap_waits_for_in_flight_requests_of_the_model_it_stops(self) -> None:
        w = world()
        d_a = w.scheduler.acquire("a")
        w.make_ready("a")
        lease_a = self.successResultOf(d_a)
        d_b = w.scheduler.acquire("b")
        # a is still serving: it must not be signalled, b must not be spawned
        self.assertEqual(w.child("a").signals, [])
        self.assertEqual(w.spawned_models(), ["a"])
        lease_a.release()
        self.assertEqual(w.child("a").signals, ["TERM"])
        w.make_ready("b")
        self.successResultOf(d_b)

    def test_requests_for_the_running_model_queue_behind_a_pending_swap(self) -> None:
        w = world()
        d_a = w.scheduler.acquire("a")
        w.make_ready("a")
        lease_a = self.successResultOf(d_a)
        w.scheduler.acquire("b")
        late_a = w.scheduler.acquire("a")
        # no new lease for a while the swap waits for a to drain
        self.assertNoResult(late_a)
        self.assertEqual(w.scheduler.in_flight("a"), 1)
        lease_a.release()

    def test_a_queued_client_that_leaves_is_removed_from_the_queue(self) -> None:
        w = world()
        d_a = w.scheduler.acquire("a")
        w.make_ready("a")
        lease_a = self.successResultOf(d_a)
        d_b = w.scheduler.acquire("b")
        d_c = w.scheduler.acquire("c")
        self.assertEqual(w.scheduler.queued(), 2)
        d_c.cancel()
        self.failureResultOf(d_c, CancelledError)
        self.assertEqual(w.scheduler.queued(), 1)
        lease_a.release()
        w.make_ready("b")
        self.successResultOf(d_b).release()
        # c was never started
        self.assertEqual(w.spawned_models(), ["a", "b"])

    def test_a_swap_nobody_waits_for_any_more_is_abandoned(self) -> None:
        w = world()
        d_a = w.scheduler.acquire("a")
        w.make_ready("a")
        lease_a = self.successResultOf(d_a)
        d_b = w.scheduler.acquire("b")
        d_b.cancel()
        self.failureResultOf(d_b, CancelledError)
        lease_a.release()
        # a keeps running, b is never started, and a is served at once again
        self.assertEqual(w.child("a").signals, [])
        self.assertEqual(w.spawned_models(), ["a"])
        self.successResultOf(w.scheduler.acquire("a")).release()

    def test_a_start_waiting_for_the_models_own_stop_is_dropped_when_its_client_leaves(
        self,
    ) -> None:
        # 'a' is being unloaded and its child takes its time; a request for 'a' waits
        # for that exit to start it again, then leaves: 'a' is not started for nobody
        # (it stayed loaded, or starting, after the unload had finished)
        w = world()
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(d).release()
        w.child("a").ignore_term = True
        unloaded = w.scheduler.unload(["a"])
        again = w.scheduler.acquire("a")
        again.cancel()
        self.failureResultOf(again, CancelledError)
        w.child("a").exit(0)
        self.successResultOf(unloaded)
        self.assertEqual(w.spawned_models(), ["a"])
        self.assertIs(w.process("a").state, ModelState.STOPPED)
        # and the next request starts it as usual
        later = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(later).release()

    def test_nothing_starts_after_close(self) -> None:
        w = world()
        d_a = w.scheduler.acquire("a")
        w.make_ready("a")
        lease_a = self.successResultOf(d_a)
        queued = w.scheduler.acquire("b")
        self.successResultOf(w.scheduler.close())
        self.failureResultOf(queued, ApiError)
        lease_a.release()
        self.assertEqual(w.spawned_models(), ["a"])
        self.assertEqual(w.reactor.running(), [])


class StartFailureTests(SynchronousTestCase):
    def test_exit_during_start_fails_every_waiter_with_the_cause_and_output(self) -> None:
        w = world()
        waiting = [w.scheduler.acquire("a"), w.scheduler.acquire("a")]
        child = w.child("a")
        child.say("error: failed to load model 'x.gguf'")
        child.exit(1)
        for d in waiting:
            error = self.failureResultOf(d, StartFailed).value
            self.assertIn("'a'", str(error))
            self.assertIn("exited with code 1", str(error))
            self.assertIn("failed to load model 'x.gguf'", str(error))
        self.assertEqual(w.process("a").state, ModelState.FAILED)
        # a later request tries again
        again = w.scheduler.acquire("a")
        self.assertEqual(w.spawned_models(), ["a", "a"])
        w.make_ready("a")
        self.successResultOf(again)

    def test_health_timeout_stops_the_child_and_reports_it(self) -> None:
        w = world(timing=Timing(health_timeout=5, poll_interval=0.25, stop_timeout=2))
        d = w.scheduler.acquire("a")
        w.health.status[w.process("a").base_url] = 503
        w.reactor.pump([0.25] * 19)
        self.assertNoResult(d)
        self.assertEqual(len(w.health.probes), 19)
        w.reactor.advance(0.25)
        self.assertEqual(w.child("a").signals, ["TERM"])
        error = self.failureResultOf(d, StartFailed).value
        self.assertIn("not ready after 5s", str(error))
        self.assertEqual(w.reactor.running(), [])

    def test_missing_command_is_a_clear_start_failure(self) -> None:
        w = world("models:\n  a:\n    cmd: no-such-binary-here --port ${PORT}\n")
        error = self.failureResultOf(w.scheduler.acquire("a"), StartFailed).value
        self.assertIn("command not found: 'no-such-binary-here'", str(error))
        self.assertEqual(w.reactor.spawned, [])

    def test_spawn_error_is_a_start_failure(self) -> None:
        w = world()
        w.reactor.spawn_error = OSError(13, "Permission denied")
        error = self.failureResultOf(w.scheduler.acquire("a"), StartFailed).value
        self.assertIn("Permission denied", str(error))

    def test_failure_of_one_model_does_not_block_the_next(self) -> None:
        w = world()
        d_a = w.scheduler.acquire("a")
        d_b = w.scheduler.acquire("b")
        w.child("a").exit(2)
        self.failureResultOf(d_a, StartFailed)
        w.make_ready("b")
        self.successResultOf(d_b)

    def test_after_a_failed_start_the_next_two_swaps_do_not_run_together(self) -> None:
        # found by tests/test_scheduler_states.py: the head of the queue was given a
        # swap, and the waiter behind it was started "alongside" because nothing ran
        # yet, so two models of one swap group loaded at once
        w = world()
        d_b, d_c = behind_a_failed_start(w, "a", "b", "c")
        self.assertEqual(w.spawned_models(), ["a", "b"])
        w.make_ready("b")
        self.successResultOf(d_b).release()
        self.assertEqual(w.spawned_models(), ["a", "b", "c"])
        self.assertEqual(w.child("b").signals, ["TERM"])
        w.make_ready("c")
        self.successResultOf(d_c).release()

    def test_line_output_triggers_a_prompt_health_check(self) -> None:
        w = world(timing=Timing(poll_interval=5.0))
        d = w.scheduler.acquire("a")
        w.health.status[w.process("a").base_url] = 200
        w.reactor.advance(0.02)
        self.assertEqual(w.health.probes, [])  # the slow poll has not come yet
        w.child("a").say("srv  update_slots: all slots are idle")
        self.successResultOf(d)
        self.assertEqual(len(w.health.probes), 1)


class StopTests(SynchronousTestCase):
    def test_ttl_stops_an_idle_model_counted_from_the_last_request(self) -> None:
        w = world()
        d = w.scheduler.acquire("c")  # ttl: 30
        w.make_ready("c")
        lease = self.successResultOf(d)
        w.reactor.advance(100)  # in flight: no idle timer runs
        self.assertEqual(w.process("c").state, ModelState.READY)
        lease.release()
        w.reactor.advance(29)
        self.successResultOf(w.scheduler.acquire("c")).release()  # resets the timer
        w.reactor.advance(29)
        self.assertEqual(w.process("c").state, ModelState.READY)
        w.reactor.advance(1)
        self.assertEqual(w.child("c").signals, ["TERM"])
        self.assertEqual(w.process("c").state, ModelState.STOPPED)

    def test_the_end_of_an_idle_stop_serves_whoever_waits_for_its_room(self) -> None:
        """A request queued while the idle stop ran is served once that stop ends,
        not at the policy's next recheck (here ``hold``, a minute away)."""
        w = world(
            "scheduler:\n  policy: collate\n  hold: 60\n  patience: 0\n  maxWait: 300\n"
            "models:\n"
            "  a:\n    cmd: sleep --port ${PORT} --model a\n    ttl: 5\n"
            "  b:\n    cmd: sleep --port ${PORT} --model b\n"
        )
        d = w.scheduler.acquire("a", client="x")
        w.make_ready("a")
        self.successResultOf(d).release()
        w.child("a").ignore_term = True  # its exit comes when the test says
        w.reactor.advance(5)
        self.assertEqual(w.process("a").state, ModelState.STOPPING)
        waiting = w.scheduler.acquire("b", client="y")  # a is held for x another 55 s
        self.assertEqual(w.spawned_models(), ["a"])
        w.child("a").exit(0)
        self.assertEqual(w.spawned_models(), ["a", "b"])  # at once, not at the recheck
        w.make_ready("b")
        self.successResultOf(waiting).release()

    def test_no_ttl_means_never_stopped(self) -> None:
        w = world()
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(d).release()
        w.reactor.advance(10_000)
        self.assertEqual(w.process("a").state, ModelState.READY)

    def test_a_child_ignoring_term_is_killed_after_the_grace(self) -> None:
        w = world(timing=Timing(stop_timeout=3))
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(d).release()
        w.child("a").ignore_term = True
        stopped = w.scheduler.unload(["a"])
        self.assertNoResult(stopped)
        w.reactor.advance(3)
        self.assertEqual(w.child("a").signals, ["TERM", "KILL"])
        self.successResultOf(stopped)
        self.assertEqual(w.process("a").state, ModelState.STOPPED)

    def test_close_stops_every_child_and_fails_the_queue(self) -> None:
        w = world()
        d_a = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(d_a)
        queued = w.scheduler.acquire("b")
        closing = w.scheduler.close()
        self.successResultOf(closing)
        self.assertEqual(w.reactor.running(), [])
        self.assertEqual(self.failureResultOf(queued, ApiError).value.status, 503)
        self.assertEqual(self.failureResultOf(w.scheduler.acquire("a"), ApiError).value.status, 503)

    def test_close_lets_requests_in_flight_finish_within_the_grace(self) -> None:
        w = world()
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        lease = self.successResultOf(d)
        closing = w.scheduler.close(grace=30)
        w.reactor.advance(10)
        self.assertEqual(w.child("a").signals, [])  # still answering
        lease.release()
        self.assertEqual(w.child("a").signals, ["TERM"])
        self.successResultOf(closing)

    def test_close_stops_anyway_after_the_grace(self) -> None:
        w = world()
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(d)
        closing = w.scheduler.close(grace=30)
        w.reactor.advance(29)
        self.assertNoResult(closing)
        w.reactor.advance(1)
        self.assertEqual(w.child("a").signals, ["TERM"])
        self.successResultOf(closing)

    def test_a_crashed_model_is_started_again_by_the_next_request(self) -> None:
        w = world()
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(d).release()
        w.child("a").exit(None, 9)
        self.assertEqual(w.process("a").state, ModelState.STOPPED)
        self.assertIn("killed by SIGKILL", w.process("a").last_error or "")
        again = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(again)
        self.assertEqual(w.spawned_models(), ["a", "a"])

    def test_unload_during_start_fails_waiters_as_stopped_not_crashed(self) -> None:
        w = world()
        d = w.scheduler.acquire("a")
        self.successResultOf(w.scheduler.unload())
        self.failureResultOf(d)
        self.assertEqual(w.process("a").state, ModelState.STOPPED)


class EnvironmentTests(SynchronousTestCase):
    def test_env_is_merged_over_llamaswaps_own_and_port_is_filled(self) -> None:
        w = world(
            "startPort: 7000\nmodels:\n  a:\n    cmd: sleep --port ${PORT} --model a\n"
            "    env: ['CUDA_VISIBLE_DEVICES=1', 'HOME=/models', 'MY_PORT=${PORT}']\n"
        )
        w.scheduler.acquire("a")
        child = w.child("a")
        self.assertEqual(child.env["CUDA_VISIBLE_DEVICES"], "1")
        self.assertEqual(child.env["HOME"], "/models")
        self.assertEqual(child.env["PATH"], "/usr/bin:/bin")
        self.assertEqual(child.env["MY_PORT"], "7000")
        self.assertEqual(child.args[-3:], ["7000", "--model", "a"])


GROUPS = """
scheduler:
  policy: fifo
models:
  chat-a:
    cmd: sleep --port ${PORT} --model chat-a
  chat-b:
    cmd: sleep --port ${PORT} --model chat-b
  embed:
    cmd: sleep --port ${PORT} --model embed
  coder:
    cmd: sleep --port ${PORT} --model coder
  helper:
    cmd: sleep --port ${PORT} --model helper
groups:
  resident:
    members: [embed]
    persistent: true
    exclusive: false
  pair:
    members: [coder, helper]
    swap: false
profiles:
  duo: [chat-a, embed]
"""


class GroupTests(SynchronousTestCase):
    def ready(self, w: Any, model: str) -> Lease:
        d = w.scheduler.acquire(model)
        if not d.called:
            w.make_ready(model)
        lease: Lease = self.successResultOf(d)
        return lease

    def test_a_persistent_model_stays_while_chat_models_swap(self) -> None:
        w = world(GROUPS)
        self.ready(w, "embed").release()
        self.ready(w, "chat-a").release()
        self.ready(w, "chat-b").release()
        self.assertEqual(w.child("embed").signals, [])
        self.assertEqual(w.child("chat-a").signals, ["TERM"])
        running = sorted(p.args[-1] for p in w.reactor.running())
        self.assertEqual(running, ["chat-b", "embed"])

    def test_a_ready_model_nobody_will_evict_is_served_past_a_pending_swap(self) -> None:
        w = world(GROUPS)
        self.ready(w, "embed").release()
        lease_a = self.ready(w, "chat-a")
        pending_b = w.scheduler.acquire("chat-b")  # waits for chat-a to drain
        self.assertNoResult(pending_b)
        # embed is not in the way of that swap: served at once
        self.successResultOf(w.scheduler.acquire("embed")).release()
        # chat-a is about to be stopped: a new request for it waits its turn
        self.assertNoResult(w.scheduler.acquire("chat-a"))
        lease_a.release()

    def test_a_model_that_stops_nothing_starts_without_waiting_its_turn(self) -> None:
        w = world(GROUPS)
        lease_a = self.ready(w, "chat-a")
        pending_b = w.scheduler.acquire("chat-b")  # waits for chat-a to drain
        pending_embed = w.scheduler.acquire("embed")  # resident: displaces nothing
        self.assertEqual(w.spawned_models(), ["chat-a", "embed"])
        w.make_ready("embed")
        self.successResultOf(pending_embed).release()
        self.assertNoResult(pending_b)
        lease_a.release()
        w.make_ready("chat-b")
        self.successResultOf(pending_b)

    def test_a_model_the_next_swap_would_stop_does_not_start_alongside_it(self) -> None:
        # found by tests/test_scheduler_states.py: "notes" stops nothing, so it was
        # started alongside while the swap to chat-a (exclusive: it stops notes)
        # was being decided, and chat-a then started beside it
        w = world(
            GROUPS.replace(
                "groups:\n",
                "  notes:\n    cmd: sleep --port ${PORT} --model notes\n"
                "groups:\n  side:\n    members: [notes]\n    exclusive: false\n",
            )
        )
        d_a, d_notes = behind_a_failed_start(w, "chat-b", "chat-a", "notes")
        self.assertEqual(w.spawned_models(), ["chat-b", "chat-a"])
        w.make_ready("chat-a")
        self.successResultOf(d_a).release()
        # notes is not exclusive: it may start beside chat-a, once chat-a is there
        self.assertEqual(w.spawned_models(), ["chat-b", "chat-a", "notes"])
        w.make_ready("notes")
        self.successResultOf(d_notes).release()
        self.assertEqual(w.child("chat-a").signals, [])

    def test_non_swapping_group_members_run_together_and_exclusive_evicts_others(self) -> None:
        w = world(GROUPS)
        self.ready(w, "chat-a").release()
        self.ready(w, "coder").release()
        self.ready(w, "helper").release()
        self.assertEqual(w.child("chat-a").signals, ["TERM"])  # pair is exclusive
        self.assertEqual(w.child("coder").signals, [])  # swap: false
        running = sorted(p.args[-1] for p in w.reactor.running())
        self.assertEqual(running, ["coder", "helper"])

    def test_profile_starts_its_models_together_and_is_swapped_out_whole(self) -> None:
        w = world(GROUPS)
        self.ready(w, "coder").release()
        d = w.scheduler.acquire("chat-a", profile="duo")
        # coder stopped, both members spawned at once
        self.assertEqual(w.child("coder").signals, ["TERM"])
        self.assertEqual(w.spawned_models()[-2:], ["chat-a", "embed"])
        w.make_ready("chat-a")
        self.assertNoResult(d)  # embed is not ready yet
        w.make_ready("embed")
        self.successResultOf(d).release()
        self.ready(w, "chat-b").release()
        self.assertEqual(w.child("chat-a").signals, ["TERM"])
        self.assertEqual(w.child("embed").signals, [])  # persistent even after a profile


class AdmissionTests(SynchronousTestCase):
    def test_concurrency_limit_is_a_429_with_retry_after(self) -> None:
        w = world(
            "models:\n  a:\n    cmd: sleep --port ${PORT} --model a\n    concurrencyLimit: 2\n"
        )
        first, second = w.scheduler.acquire("a"), w.scheduler.acquire("a")
        error = self.failureResultOf(w.scheduler.acquire("a"), ApiError).value
        self.assertEqual((error.status, error.code), (429, "concurrency_limit"))
        self.assertEqual(error.headers, {"Retry-After": "1"})
        w.make_ready("a")
        self.successResultOf(first).release()
        # a slot is free again
        self.successResultOf(w.scheduler.acquire("a"))
        self.successResultOf(second)

    def test_a_full_queue_is_a_503_with_retry_after(self) -> None:
        w = world("queueLimit: 2\n" + TWO_MODELS.lstrip())
        w.scheduler.acquire("a")
        w.scheduler.acquire("b")
        error = self.failureResultOf(w.scheduler.acquire("c"), ApiError).value
        self.assertEqual((error.status, error.code), (503, "queue_full"))
        self.assertIn("Retry-After", error.headers)

    def test_load_makes_a_model_ready_without_holding_a_lease(self) -> None:
        w = world()
        d = w.scheduler.load("a")
        w.make_ready("a")
        self.successResultOf(d)
        self.assertEqual(w.scheduler.in_flight("a"), 0)
        self.assertEqual(w.process("a").state, ModelState.READY)

    def test_global_ttl_and_unload_timeout_defaults(self) -> None:
        w = world(
            "globalTTL: 50\nunloadTimeout: 4\nmodels:\n"
            "  a:\n    cmd: sleep --port ${PORT} --model a\n"
            "  b:\n    cmd: sleep --port ${PORT} --model b\n    ttl: 0\n    unloadTimeout: 1\n"
        )
        self.assertEqual(w.process("a").config.ttl, 50)
        self.assertEqual(w.process("b").config.ttl, 0)
        d = w.scheduler.acquire("a")
        w.make_ready("a")
        self.successResultOf(d).release()
        w.child("a").ignore_term = True
        w.reactor.advance(50)
        self.assertEqual(w.child("a").signals, ["TERM"])
        w.reactor.advance(4)
        self.assertEqual(w.child("a").signals, ["TERM", "KILL"])


class AwaitedTests(SynchronousTestCase):
    """``awaited``: what waits for a request in flight to end (the connection gate
    cuts a slow reader only then)."""

    def ready(self, w: World, model: str, **kwargs: Any) -> Lease:
        d = w.scheduler.acquire(model, **kwargs)
        if not d.called:
            w.make_ready(model)
        lease: Lease = self.successResultOf(d)
        return lease

    def test_a_swap_waits_for_each_request_on_its_victim_until_the_swap(self) -> None:
        w = world()
        first, second = self.ready(w, "a"), self.ready(w, "a")
        self.assertIsNone(w.scheduler.awaited(first))  # nobody else asks for anything
        pending = w.scheduler.acquire("b")
        for lease in (first, second):
            self.assertEqual(w.scheduler.awaited(lease), "a swap to b waits for model a")
        first.release()
        self.assertIsNone(w.scheduler.awaited(first))  # released: holds nothing
        self.assertEqual(w.scheduler.awaited(second), "a swap to b waits for model a")
        second.release()
        self.assertEqual(w.child("a").signals, ["TERM"])  # the swap went on
        w.make_ready("b")
        lease_b = self.successResultOf(pending)
        self.assertIsNone(w.scheduler.awaited(lease_b))
        self.assertIsNone(w.scheduler.awaited(second))

    def test_a_swap_whose_requests_left_waits_for_nobody(self) -> None:
        w = world()
        lease = self.ready(w, "a")
        pending = w.scheduler.acquire("b")
        self.assertIsNotNone(w.scheduler.awaited(lease))
        pending.cancel()
        self.failureResultOf(pending)
        self.assertIsNone(w.scheduler.awaited(lease))
        lease.release()
        self.assertEqual(w.child("a").signals, [])  # abandoned: a stays

    def test_a_model_started_alongside_does_not_wait_for_the_swap(self) -> None:
        w = world(GROUPS)
        lease = self.ready(w, "chat-a")
        pending_b = w.scheduler.acquire("chat-b")  # waits for chat-a to drain
        w.scheduler.acquire("embed")  # resident: started alongside, waits for nothing
        self.assertIsNotNone(w.scheduler.awaited(lease))
        pending_b.cancel()
        self.failureResultOf(pending_b)
        self.assertEqual(w.scheduler.queued("embed"), 1)
        self.assertIsNone(w.scheduler.awaited(lease))
        lease.release()

    def test_a_profiles_model_is_awaited_by_a_swap_that_stops_it(self) -> None:
        w = world(GROUPS)
        d = w.scheduler.acquire("chat-a", profile="duo")
        w.make_ready("chat-a")
        w.make_ready("embed")
        lease = self.successResultOf(d)
        w.scheduler.acquire("chat-b")
        self.assertEqual(w.scheduler.awaited(lease), "a swap to chat-b waits for model chat-a")
        lease.release()

    def test_a_background_swap_waits_for_a_users_request_only_if_a_user_waits(self) -> None:
        w = world()
        user = self.ready(w, "a")
        w.scheduler.acquire("b", priority=-1)  # a title: a swap to b drains a
        self.assertIsNone(w.scheduler.awaited(user))  # background work may wait
        w.scheduler.acquire("c")  # a user's request, behind that swap
        self.assertEqual(w.scheduler.awaited(user), "a swap to b waits for model a")
        user.release()

    def test_a_background_request_is_awaited_by_a_background_swap(self) -> None:
        w = world()
        title = self.ready(w, "a", priority=-1)
        w.scheduler.acquire("b", priority=-1)
        self.assertEqual(w.scheduler.awaited(title), "a swap to b waits for model a")
        title.release()

    def test_a_reload_waits_for_the_old_processs_requests(self) -> None:
        w = world()
        old = self.ready(w, "a")
        w.reload(TWO_MODELS.replace("--model a", "--model a --ctx-size 8"))
        self.assertEqual(w.scheduler.awaited(old), "a reload waits for model a")
        new = self.ready(w, "a")
        self.assertIsNone(w.scheduler.awaited(new))
        old.release()
        new.release()

    def test_a_shutdown_waits_for_the_requests_in_flight(self) -> None:
        w = world()
        lease = self.ready(w, "a")
        closing = w.scheduler.close(grace=30)
        self.assertEqual(w.scheduler.awaited(lease), "the shutdown waits for model a")
        lease.release()
        self.successResultOf(closing)
