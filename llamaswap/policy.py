"""When to swap: the policies the scheduler asks, as small pure objects.

``ArrivalOrder`` swaps as soon as a request for another model reaches the head of
the queue (after the running model's requests in flight finish): fair, but under
interleaved traffic (A B A C A B ...) it spends most of its time loading weights.

``Collate`` keeps serving the loaded model while it has work, so requests for it
that arrive meanwhile ride along instead of paying a reload, but never beyond a
bound: a request for another model waits at most ``max_wait`` seconds, and a busy
model holds the machine at most ``max_residency`` seconds while others wait.

Both order the queue by per-model ``priority`` (higher first), then arrival.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs


@attrs.frozen
class Waiting:
    """A queued request whose model is not ready."""

    model: str
    arrived: float


@attrs.frozen
class Victim:
    """A running model that a swap would stop."""

    model: str
    busy: bool  # requests in flight, or queued for it
    resident_since: float


@attrs.frozen
class ArrivalOrder:
    name: str = "fifo"

    def swap_now(self, waiting: Waiting, victims: Sequence[Victim], now: float) -> bool:
        return True

    def recheck_at(self, waiting: Waiting, victims: Sequence[Victim]) -> float | None:
        return None


@attrs.frozen
class Collate:
    """The ``collate`` policy; its bounds (and their defaults) are ``scheduler.*`` keys."""

    max_wait: float
    max_residency: float
    name: str = "collate"

    def swap_now(self, waiting: Waiting, victims: Sequence[Victim], now: float) -> bool:
        if not any(v.busy for v in victims):
            return True
        if now - waiting.arrived >= self.max_wait:
            return True
        return any(v.busy and now - v.resident_since >= self.max_residency for v in victims)

    def recheck_at(self, waiting: Waiting, victims: Sequence[Victim]) -> float | None:
        """When :meth:`swap_now` would turn true even if nothing else happens."""
        moments = [waiting.arrived + self.max_wait]
        moments += [v.resident_since + self.max_residency for v in victims if v.busy]
        return min(moments)


Policy = ArrivalOrder | Collate
