"""A small in-process event bus: observations, for whoever watches.

Processes publish their state changes, the scheduler its queue and swaps, the
recorder each finished request.  Metrics, the KV store's counts and the
``/api/events`` stream subscribe; nothing that must happen depends on an event
(the scheduler learns what it acts on through
:class:`~llamaswap.lifecycle.IModelWatcher`).

Each kind of event is a frozen class; :func:`wire` is the one place that turns
one into the ``/api/events`` message the UI reads.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar

import attrs

from .lifecycle import ModelState
from .logs import logger

# a field whose value is left out of the wire message when it is None
_OMIT_IF_NONE = {"omit_if_none": True}


@attrs.frozen
class ModelChanged:
    """A model's process changed state (the details say why, where there is a why)."""

    kind: ClassVar[str] = "model"
    id: str
    state: ModelState
    pid: int | None
    error: str | None
    start_seconds: float | None = attrs.field(default=None, metadata=_OMIT_IF_NONE)  # ready
    cause: str | None = attrs.field(default=None, metadata=_OMIT_IF_NONE)  # failed
    reason: str | None = attrs.field(default=None, metadata=_OMIT_IF_NONE)  # stopped


@attrs.frozen
class Progress:
    """How far a starting model's load got (0..1), as its server says."""

    kind: ClassVar[str] = "progress"
    id: str
    progress: float
    stage: str | None


@attrs.frozen
class Stuck:
    """An earlier child of a model would not go (``gone``: now it has)."""

    kind: ClassVar[str] = "stuck"
    id: str
    pid: int
    port: int | None
    why: str
    gone: bool


@attrs.frozen
class QueueChanged:
    """A model's queued and in-flight counts changed."""

    kind: ClassVar[str] = "queue"
    model: str
    queued: int
    in_flight: int


@attrs.frozen
class Swapped:
    """A swap ended (``ok``: its targets started)."""

    kind: ClassVar[str] = "swap"
    targets: tuple[str, ...]
    victims: tuple[str, ...]
    seconds: float
    ok: bool


@attrs.frozen
class Activity:
    """One proxied request, finished: the activity log's row."""

    kind: ClassVar[str] = "activity"
    row: Mapping[str, Any]


Event = ModelChanged | Progress | Stuck | QueueChanged | Swapped | Activity


def wire(event: Event) -> tuple[str, dict[str, Any]]:
    """The ``/api/events`` message for ``event``: its kind and its JSON object."""
    if isinstance(event, Activity):
        return event.kind, dict(event.row)
    data = attrs.asdict(
        event,
        filter=lambda field, value: not (field.metadata.get("omit_if_none") and value is None),
        value_serializer=_json_value,
    )
    return event.kind, data


def _json_value(_: object, __: object, value: object) -> object:
    if isinstance(value, ModelState):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


Subscriber = Callable[[Event], None]


class EventBus:
    """Delivers each event to every subscriber of its kind, in the order they
    subscribed; a failing subscriber is logged, not fatal.

    A publisher whose event costs something to build (one per request) asks
    :meth:`wants` first: no event is made that nobody would receive."""

    log = logger()

    def __init__(self) -> None:
        self._subscribers: list[tuple[Subscriber, frozenset[type] | None]] = []
        self._by_kind: dict[type, tuple[Subscriber, ...]] = {}  # rebuilt on (un)subscribe

    def subscribe(
        self, subscriber: Subscriber, kinds: Collection[type] | None = None
    ) -> Callable[[], None]:
        """``subscriber`` gets the events of ``kinds`` (the event classes), or all."""
        entry = (subscriber, None if kinds is None else frozenset(kinds))
        self._subscribers.append(entry)
        self._by_kind.clear()

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)
                self._by_kind.clear()

        return unsubscribe

    def _receivers(self, kind: type) -> tuple[Subscriber, ...]:
        receivers = self._by_kind.get(kind)
        if receivers is None:
            receivers = self._by_kind[kind] = tuple(
                subscriber
                for subscriber, kinds in self._subscribers
                if kinds is None or kind in kinds
            )
        return receivers

    def wants(self, kind: type) -> bool:
        """Whether an event of ``kind`` would reach anyone now."""
        return bool(self._receivers(kind))

    def publish(self, event: Event) -> None:
        # a tuple taken now: who (un)subscribes meanwhile changes the next delivery
        for subscriber in self._receivers(type(event)):
            try:
                subscriber(event)
            except Exception:
                self.log.failure("event subscriber {subscriber!r} failed", subscriber=subscriber)
