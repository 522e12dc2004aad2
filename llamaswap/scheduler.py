"""Which model runs: the request queue, swaps, leases and idle timeouts.

A request asks for a *lease* on a model.  If that model is ready and nobody is
queued, the lease is granted at once.  Otherwise the request joins one queue in
arrival order; the head of the queue decides the next swap, which runs under the
swap lock (stop whatever is in the way after its in-flight requests finish, then
start the wanted model).  The lock is never held while a response streams: a lease
only counts the request as in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    fail,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from .errors import ApiError
from .logs import logger
from .process import ModelProcess, ModelState


@attrs.define(eq=False)
class Lease:
    """Permission to send one request to a ready model; release it when done."""

    model_id: str
    base_url: str
    _on_release: Callable[[], None]
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._on_release()


@attrs.define(eq=False)
class _Slot:
    """The scheduler's bookkeeping for one model."""

    process: ModelProcess
    in_flight: int = 0
    last_used: float | None = None
    drained: list[Deferred[None]] = attrs.field(factory=list)
    ttl_timer: IDelayedCall | None = None


@attrs.define(eq=False)
class _Waiter:
    model_id: str
    deferred: Deferred[Lease]


class Scheduler:
    """Owner of the queue, the in-flight counts and the swap lock."""

    log = logger()

    def __init__(self, processes: Iterable[ModelProcess], clock: IReactorTime) -> None:
        self._clock = clock
        self._slots: dict[str, _Slot] = {p.id: _Slot(p) for p in processes}
        self._queue: deque[_Waiter] = deque()
        self._swap_lock = DeferredLock()
        self._swapping = False
        self._closed = False
        for slot in self._slots.values():
            slot.process.exit_listeners.append(self._process_exited)

    # --- what others may look at ----------------------------------------------

    @property
    def processes(self) -> Mapping[str, ModelProcess]:
        return {model_id: slot.process for model_id, slot in self._slots.items()}

    def in_flight(self, model_id: str) -> int:
        return self._slots[model_id].in_flight

    def queued(self, model_id: str | None = None) -> int:
        return sum(1 for w in self._queue if model_id is None or w.model_id == model_id)

    # --- leases -----------------------------------------------------------------

    def acquire(self, model_id: str) -> Deferred[Lease]:
        """A lease on ``model_id`` once it is ready; cancel to leave the queue."""
        if self._closed:
            return fail(ApiError(503, "llamaswap is shutting down", "shutting_down"))
        slot = self._slots[model_id]
        if not self._queue and not self._swapping and slot.process.state is ModelState.READY:
            return succeed(self._grant(slot))

        def leave_queue(d: Deferred[Lease]) -> None:
            if waiter in self._queue:
                self._queue.remove(waiter)

        waiter = _Waiter(model_id, Deferred(leave_queue))
        self._queue.append(waiter)
        self._pump()
        return waiter.deferred

    def _grant(self, slot: _Slot) -> Lease:
        slot.in_flight += 1
        if slot.ttl_timer is not None and slot.ttl_timer.active():
            slot.ttl_timer.cancel()
        slot.ttl_timer = None
        return Lease(slot.process.id, slot.process.base_url, lambda: self._release(slot))

    def _release(self, slot: _Slot) -> None:
        slot.in_flight -= 1
        slot.last_used = self._clock.seconds()
        if slot.in_flight:
            return
        drained, slot.drained = slot.drained, []
        for d in drained:
            d.callback(None)
        ttl = slot.process.config.ttl
        if ttl > 0 and slot.process.state is ModelState.READY:
            slot.ttl_timer = self._clock.callLater(ttl, self._ttl_expired, slot)

    def _drained(self, slot: _Slot) -> Deferred[None]:
        if slot.in_flight == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        slot.drained.append(d)
        return d

    # --- the queue --------------------------------------------------------------

    def _pump(self) -> None:
        """Serve the queue head: grant it if its model is ready, else swap to it."""
        while self._queue and not self._swapping:
            head = self._queue[0]
            slot = self._slots[head.model_id]
            if slot.process.state is ModelState.READY:
                self._queue.popleft()
                head.deferred.callback(self._grant(slot))
                continue
            self._swapping = True
            swap = self._swap_lock.run(self._swap_to, slot)
            swap.addBoth(self._swap_done, slot)
            return

    async def _swap_to(self, slot: _Slot) -> None:
        in_the_way = [
            other
            for other in self._slots.values()
            if other is not slot
            and other.process.state is not ModelState.STOPPED
            and other.process.state is not ModelState.FAILED
        ]
        if in_the_way:
            self.log.info(
                "swap to {model}: stopping {others}",
                model=slot.process.id,
                others=", ".join(o.process.id for o in in_the_way),
            )
        started = self._clock.seconds()
        await _all(self._drained(other) for other in in_the_way)
        if not self._wanted(slot):
            # everyone who wanted it left while the others drained: keep what runs
            self.log.info("swap to {model} abandoned: nobody waits for it", model=slot.process.id)
            return
        await _all(other.process.stop("swap") for other in in_the_way)
        if not self._wanted(slot):
            return
        await slot.process.start()
        self.log.info(
            "swap to {model} done in {seconds:.2f}s",
            model=slot.process.id,
            seconds=self._clock.seconds() - started,
        )

    def _wanted(self, slot: _Slot) -> bool:
        return not self._closed and self.queued(slot.process.id) > 0

    def _swap_done(self, result: Failure | None, slot: _Slot) -> None:
        self._swapping = False
        if isinstance(result, Failure):
            # everyone queued for this model was waiting on this very start
            error = result.value
            assert isinstance(error, Exception)
            failed = [w for w in self._queue if w.model_id == slot.process.id]
            for waiter in failed:
                self._queue.remove(waiter)
                waiter.deferred.errback(error)
        self._pump()

    # --- stopping on purpose -------------------------------------------------------

    def _ttl_expired(self, slot: _Slot) -> None:
        slot.ttl_timer = None
        d = self._swap_lock.run(self._stop_if_idle, slot)
        d.addErrback(
            lambda f: self.log.failure("idle stop of {model} failed", f, model=slot.process.id)
        )

    async def _stop_if_idle(self, slot: _Slot) -> None:
        if slot.in_flight or slot.ttl_timer is not None or self.queued(slot.process.id):
            return
        if slot.process.state is ModelState.READY:
            self.log.info(
                "model {model} idle for {ttl:g}s",
                model=slot.process.id,
                ttl=slot.process.config.ttl,
            )
            await slot.process.stop("ttl")

    def unload(self, model_ids: Iterable[str] | None = None) -> Deferred[None]:
        """Stop the given models (all if None) now, without waiting for their requests.

        Not serialised behind the swap lock: an unload must be able to interrupt a
        start that is still waiting for its health check.
        """
        targets = (
            [self._slots[m] for m in model_ids]
            if model_ids is not None
            else list(self._slots.values())
        )
        stopped = _all_now(slot.process.stop("manual") for slot in targets)
        return stopped.addCallback(lambda _: self._pump())

    def close(self) -> Deferred[None]:
        """Refuse new leases, fail queued ones, and stop every child."""
        self._closed = True
        queued, self._queue = self._queue, deque()
        for waiter in queued:
            waiter.deferred.errback(ApiError(503, "llamaswap is shutting down", "shutting_down"))
        for slot in self._slots.values():
            if slot.ttl_timer is not None and slot.ttl_timer.active():
                slot.ttl_timer.cancel()
        return _all_now(slot.process.stop("shutdown") for slot in self._slots.values())

    def _process_exited(self, process: ModelProcess, how: str) -> None:
        slot = self._slots[process.id]
        if slot.ttl_timer is not None and slot.ttl_timer.active():
            slot.ttl_timer.cancel()
        slot.ttl_timer = None


def _all_now(deferreds: Iterable[Deferred[None]]) -> Deferred[None]:
    """Wait for all, fail with the first error (after all have finished)."""
    d = DeferredList(list(deferreds), consumeErrors=True)

    def check(results: list[tuple[bool, Any]]) -> None:
        for ok, value in results:
            if not ok and not value.check(CancelledError):
                value.raiseException()

    d.addCallback(check)
    return d  # type: ignore[return-value]


async def _all(deferreds: Iterable[Deferred[None]]) -> None:
    await _all_now(deferreds)
