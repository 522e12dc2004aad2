"""When to swap: the policies the scheduler asks, as small pure objects.

``ArrivalOrder`` swaps as soon as a request for another model reaches the head of
the queue (after the running model's requests in flight finish): fair, but under
interleaved traffic (A B A C A B ...) it spends most of its time loading weights.

``Collate`` (the default) keeps serving the loaded model while it has work, so
requests for it that arrive meanwhile ride along instead of paying a reload, and
holds it ``hold`` seconds after its last request (an agent's next step, a chat's
next turn, a closed-loop client's next request) against other clients' requests
(the client that made that last request and now asks for another model has moved
on: nothing is held against it), but never beyond a bound: a
request for another model waits at most ``patience`` times what its load is
expected to take (a swap is worth waiting for only in proportion to its cost, so
cheap swaps keep everyone's waits short), never more than ``max_wait`` seconds,
and a busy model holds the machine at most ``max_residency`` seconds while
others wait.

Both order the queue by per-model ``priority`` (higher first), then arrival.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from .config.settings import SchedulerSettings, default


@attrs.frozen
class Waiting:
    """A queued request whose model is not ready."""

    model: str
    arrived: float
    load_seconds: float | None = None  # what loading its model is expected to take
    client: object = None  # who asks (a connection), if known


@attrs.frozen
class Victim:
    """A running model that a swap would stop."""

    model: str
    busy: bool  # requests in flight, or queued for it
    resident_since: float
    idle_since: float | None = None  # end of its last request, if any
    last_client: object = None  # who made that last request, if known


@attrs.frozen
class ArrivalOrder:
    name: str = "fifo"

    def reserves_victims(self) -> bool:
        """Strict arrival order: what a later waiter's swap will stop serves nobody new."""
        return True

    def swap_now(self, waiting: Waiting, victims: Sequence[Victim], now: float) -> bool:
        return True

    def recheck_at(self, waiting: Waiting, victims: Sequence[Victim], now: float) -> float | None:
        return None


@attrs.frozen
class Collate:
    """The ``collate`` policy; its bounds and their defaults are the ``scheduler`` keys."""

    max_wait: float = default(SchedulerSettings, "max_wait")
    max_residency: float = default(SchedulerSettings, "max_residency")
    hold: float = default(SchedulerSettings, "hold")
    patience: float = default(SchedulerSettings, "patience")
    name: str = "collate"

    def reserves_victims(self) -> bool:
        """Only the head of the queue commits to a swap; behind it, what runs serves on."""
        return False

    def deadline(self, waiting: Waiting) -> float:
        """When ``waiting`` has waited long enough for the swap to start regardless."""
        limit = self.max_wait
        if self.patience > 0 and waiting.load_seconds is not None:
            limit = min(limit, self.patience * waiting.load_seconds)
        return waiting.arrived + limit

    def _held(self, victim: Victim, waiting: Waiting, now: float) -> bool:
        """Busy, or idle for less than ``hold`` seconds, unless the one who asks is
        the client of its last request (it has moved on to another model)."""
        if victim.busy:
            return True
        moved_on = waiting.client is not None and waiting.client == victim.last_client
        return (
            victim.idle_since is not None and now < victim.idle_since + self.hold and not moved_on
        )

    def swap_now(self, waiting: Waiting, victims: Sequence[Victim], now: float) -> bool:
        held = [v for v in victims if self._held(v, waiting, now)]
        if not held:
            return True
        if now >= self.deadline(waiting):
            return True
        return any(now - v.resident_since >= self.max_residency for v in held)

    def recheck_at(self, waiting: Waiting, victims: Sequence[Victim], now: float) -> float | None:
        """When :meth:`swap_now` would turn true even if nothing else happens."""
        held = [v for v in victims if self._held(v, waiting, now)]
        moments = [self.deadline(waiting)]
        moments += [v.resident_since + self.max_residency for v in held]
        if not any(v.busy for v in held):  # only holds left: when the last one ends
            moments.append(max(v.idle_since or now for v in held) + self.hold)
        later = [m for m in moments if m > now]
        return min(later) if later else None


Policy = ArrivalOrder | Collate
