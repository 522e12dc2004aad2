"""The event bus: who gets which events, and no event made for nobody."""

from __future__ import annotations

from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.events import Activity, Event, EventBus, Progress, QueueChanged

from .helpers import world


class EventBusTests(SynchronousTestCase):
    def test_subscribers_get_their_kinds_in_the_order_they_subscribed(self) -> None:
        bus = EventBus()
        seen: list[tuple[str, Event]] = []
        bus.subscribe(lambda e: seen.append(("all", e)))
        bus.subscribe(lambda e: seen.append(("progress", e)), (Progress,))
        bus.subscribe(lambda e: seen.append(("last", e)), (Progress, Activity))
        progress, activity = Progress("m", 0.5, None), Activity({"model": "m"})
        bus.publish(progress)
        bus.publish(activity)
        self.assertEqual(
            seen,
            [
                ("all", progress),
                ("progress", progress),
                ("last", progress),
                ("all", activity),
                ("last", activity),
            ],
        )

    def test_wants_follows_subscriptions(self) -> None:
        bus = EventBus()
        self.assertFalse(bus.wants(QueueChanged))
        stop_progress = bus.subscribe(lambda e: None, (Progress,))
        self.assertFalse(bus.wants(QueueChanged))
        self.assertTrue(bus.wants(Progress))
        stop_all = bus.subscribe(lambda e: None)
        self.assertTrue(bus.wants(QueueChanged))
        stop_all()
        stop_progress()
        self.assertFalse(bus.wants(QueueChanged))
        self.assertFalse(bus.wants(Progress))

    def test_unsubscribing_during_a_delivery_takes_effect_with_the_next_event(self) -> None:
        bus = EventBus()
        seen: list[str] = []
        stops: list[Callable[[], None]] = []

        def first(event: Event) -> None:
            seen.append("first")
            stops[0]()  # the second one still gets this event, not the next

        bus.subscribe(first)
        stops.append(bus.subscribe(lambda e: seen.append("second")))
        bus.publish(Progress("m", 0.1, None))
        bus.publish(Progress("m", 0.2, None))
        self.assertEqual(seen, ["first", "second", "first"])


class QueueEventsTests(SynchronousTestCase):
    def test_queue_changes_are_published_only_while_someone_watches(self) -> None:
        w = world()
        w.scheduler.load("a")
        w.make_ready("a")
        seen: list[Event] = []
        w.events.subscribe(seen.append, (Activity,))
        lease = self.successResultOf(w.scheduler.acquire("a"))
        lease.release()
        self.assertEqual(seen, [])
        w.events.subscribe(seen.append, (QueueChanged,))  # e.g. /api/events
        lease = self.successResultOf(w.scheduler.acquire("a"))
        lease.release()
        self.assertEqual(
            [(e.model, e.in_flight) for e in seen if isinstance(e, QueueChanged)],
            [("a", 1), ("a", 0)],
        )
