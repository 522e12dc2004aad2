"""A small in-process event bus: what happened, for whoever watches.

Processes publish their state changes, the scheduler its queue and swaps, the API
each finished request.  Metrics, the activity store and the ``/api/events`` stream
subscribe; none of them owns state another module needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .logs import logger


@attrs.frozen
class Event:
    kind: str  # "model", "queue", "swap", "activity", "log"
    data: dict[str, Any]


Subscriber = Callable[[Event], None]


class EventBus:
    """Delivers each event to every subscriber; a failing subscriber is logged, not fatal."""

    log = logger()

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def publish(self, kind: str, **data: Any) -> None:
        event = Event(kind, data)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                self.log.failure("event subscriber {subscriber!r} failed", subscriber=subscriber)
