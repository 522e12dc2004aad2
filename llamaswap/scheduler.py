"""Which model runs: the request queue, swaps, leases and idle timeouts.

A request asks for a *lease* on a model.  If that model is ready and nobody is
queued, the lease is granted at once.  Otherwise the request joins one queue,
served by priority, then arrival; the head of the queue decides the next swap,
which runs under the swap lock (stop whatever is in the way after its in-flight
requests finish, then start the wanted model).  The lock is never held while a
response streams: a lease only counts the request as in flight.

Priorities: a request below its model's own priority is *background* work (an
Open WebUI title, tags): it takes one of the model's slots only when one is free
and nobody more urgent waits for it, and a swap made for it does not stop a model
that more urgent requests still use.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    TimeoutError,
    fail,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from .config import Config, ModelConfig
from .crashloop import CrashGuard, CrashLoopPolicy
from .errors import ApiError, ModelStopped
from .events import EventBus, QueueChanged, Swapped
from .lifecycle import IModelWatcher, ModelState, ModelView
from .logs import logger
from .policy import Policy, Victim, Waiting
from .process import ModelProcess
from .resources import Footprint, fits


class IModelHooks(Interface):
    """Work the scheduler waits for around a model's stops and starts (the KV store).

    They return Deferreds that never fail and fire within a bound of their own.
    """

    def before_start(process: ModelView) -> None:
        """``process`` is about to be spawned: make what its command needs (quick)."""

    def before_stop(process: ModelView, reason: str) -> Deferred[bool]:
        """``process`` is ready, idle and about to be stopped for ``reason``: fires
        True when nothing the hook asked of it is still running there."""

    def after_start(process: ModelView) -> Deferred[bool]:
        """``process`` just became ready; no lease is granted on it before this fires.

        False: the child went away meanwhile (it died restoring saved state), before
        any request was sent to it; it is started again for whoever waits."""


@implementer(IModelHooks)
class NoHooks:
    """Nothing to do around stops and starts (no KV store)."""

    def before_start(self, process: ModelView) -> None:
        pass

    def before_stop(self, process: ModelView, reason: str) -> Deferred[bool]:
        return succeed(True)

    def after_start(self, process: ModelView) -> Deferred[bool]:
        return succeed(True)


@attrs.define(eq=False)
class Lease:
    """Permission to send one request to a ready model; release it when done."""

    model_id: str
    base_url: str
    _on_release: Callable[[], None]
    released: bool = False
    priority: int = 0  # of the request it was granted to
    slot: _Slot | None = attrs.field(default=None, repr=False)  # for ``Scheduler.awaited``

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._on_release()


@attrs.frozen
class _Awaiting:
    """What waits for a model's requests in flight to finish (a swap, a stop)."""

    who: str  # in words: "a swap to b", "a reload"
    # a swap waits for the queue's sake: for a request in flight only while one
    # at least as urgent is queued (every queued request waits behind the swap)
    for_queue: bool = False


@attrs.frozen
class _Drain:
    done: Deferred[None]
    awaiting: _Awaiting


@attrs.define(eq=False)
class _Slot:
    """The scheduler's bookkeeping for one model."""

    process: ModelProcess
    in_flight: int = 0
    last_used: float | None = None
    last_client: object = None  # the client of the latest lease (see policy.Collate)
    drained: list[_Drain] = attrs.field(factory=list)
    ttl_timer: IDelayedCall | None = None
    guard: CrashGuard = attrs.field(factory=lambda: CrashGuard(CrashLoopPolicy()))
    footprint: Footprint = attrs.field(factory=Footprint)
    retired: bool = False  # replaced by a reload, and its process stopped since


@attrs.define(eq=False)
class _Waiter:
    model_id: str
    targets: frozenset[str]
    deferred: Deferred[Lease]
    arrived: float = 0.0
    priority: int = 0
    client: object = None


_STOPPED = (ModelState.STOPPED, ModelState.FAILED)


@attrs.define
class _Plan:
    doomed: set[str] = attrs.field(factory=set)
    swap: tuple[frozenset[str], frozenset[str]] | None = None
    swap_priority: int = 0
    recheck_at: float | None = None


@implementer(IModelWatcher)
class Scheduler:
    """Owner of the queue, the in-flight counts and the swap lock.

    It watches every process it is given (:meth:`ModelProcess.watch`), so each
    model's readiness and exits reach it directly, however the processes were built.
    """

    log = logger()

    def __init__(
        self,
        processes: Iterable[ModelProcess],
        clock: IReactorTime,
        config: Config,
        events: EventBus,
        hooks: IModelHooks,
    ) -> None:
        self._clock = clock
        self.hooks = hooks
        self._warming: set[str] = set()  # started, not yet through after_start
        self.config = config
        self.events = events
        self._swap_started = 0.0
        self._slots: dict[str, _Slot] = {p.id: self._new_slot(p) for p in processes}
        self._queue: deque[_Waiter] = deque()
        self._swap_lock = DeferredLock()
        self.policy: Policy = config.policy
        self._recheck: IDelayedCall | None = None
        self._retiring: list[_Slot] = []
        self._side_starts: set[frozenset[str]] = set()
        self._swap: tuple[frozenset[str], frozenset[str]] | None = None  # (targets, victims)
        self._swap_priority = 0  # of the request the running swap is for
        self._pumping = False
        self._pump_again = False
        self._closed = False

    def _new_slot(self, process: ModelProcess) -> _Slot:
        process.watch(self)
        return _Slot(
            process,
            guard=CrashGuard(self.config.crash_loop),
            footprint=Footprint(declared=dict(process.config.memory)),
        )

    # --- what others may look at ----------------------------------------------

    @property
    def processes(self) -> Mapping[str, ModelView]:
        """Each model's process, to look at (the scheduler alone starts and stops)."""
        return {model_id: slot.process for model_id, slot in self._slots.items()}

    def view(self, model_id: str) -> ModelView:
        """One model's process, to look at (as in ``processes``, without building the
        whole map: a request asks for its model's)."""
        return self.process(model_id)

    def process(self, model_id: str) -> ModelProcess:
        """The live process of ``model_id``, for whoever owns the service (and tests)."""
        return self._slots[model_id].process

    def in_flight(self, model_id: str) -> int:
        return self._slots[model_id].in_flight

    def last_used(self, model_id: str) -> float | None:
        return self._slots[model_id].last_used

    def idle_deadline(self, model_id: str) -> float | None:
        """When the idle timer will stop this model, if one runs."""
        timer = self._slots[model_id].ttl_timer
        return timer.getTime() if timer is not None and timer.active() else None

    def queued(self, model_id: str | None = None) -> int:
        return sum(1 for w in self._queue if model_id is None or w.model_id == model_id)

    def position(self, deferred: Deferred[Lease]) -> int | None:
        """1-based place in the queue of a pending :meth:`acquire`."""
        for index, waiter in enumerate(self._queue, 1):
            if waiter.deferred is deferred:
                return index
        return None

    # --- leases -----------------------------------------------------------------

    def pick(self, candidates: Sequence[str]) -> str:
        """Of a pool's models, the one a request can use without a swap.

        A ready model that no pending swap stops, the most recently used first; else
        one being started; else the first candidate (which then starts as usual).
        """
        doomed = self._plan().doomed | self._victims_of_swap()
        starting = self._swap[0] if self._swap else frozenset()

        def rank(model_id: str) -> tuple[int, float]:
            slot = self._slots[model_id]
            state = slot.process.state
            used = slot.last_used or slot.process.ready_at or 0.0
            if state is ModelState.READY and model_id not in doomed:
                return (0, -used)
            if state is ModelState.STARTING or model_id in starting:
                return (1, 0.0)
            return (2, 0.0)

        return min(candidates, key=lambda m: (*rank(m), candidates.index(m)))

    def acquire(
        self,
        model_id: str,
        profile: str | None = None,
        priority: int | None = None,
        client: object = None,
    ) -> Deferred[Lease]:
        """A lease on ``model_id`` once it (and its profile's models) are ready.

        ``priority`` defaults to the model's; lower is background work.  ``client``
        says who asks (any token that is equal for the same client), so a model held
        after its last request is not held against the client that made it.  Cancel the
        Deferred to leave the queue.  Fails at once with 429 when the model has
        ``concurrencyLimit`` requests already, 503 when the queue is full.
        """
        if self._closed:
            return fail(ApiError(503, "llamaswap is shutting down", "shutting_down"))
        slot = self._slots[model_id]
        blocked = self._crash_looping(slot)
        if blocked is not None:
            return fail(blocked)
        reserved = slot.in_flight + self.queued(model_id)
        limit = slot.process.config.concurrency_limit
        if reserved >= limit:
            return fail(
                ApiError(
                    429,
                    f"model {model_id!r} already has {reserved} requests in flight or waiting "
                    f"(concurrencyLimit {limit}); retry shortly",
                    "concurrency_limit",
                    {"Retry-After": "1"},
                )
            )
        targets = frozenset(self.config.profiles[profile]) if profile else frozenset({model_id})
        if priority is None:
            priority = slot.process.config.priority
        if (
            self._ready(targets)
            and not self._doomed(model_id, priority, self._plan(at_least=priority))
            and self._slot_free(slot, priority)
        ):
            return succeed(self._grant(slot, client, priority))
        if len(self._queue) >= self.config.queue_limit:
            return fail(
                ApiError(
                    503,
                    f"{len(self._queue)} requests are already waiting for a model "
                    f"(queueLimit {self.config.queue_limit}); retry shortly",
                    "queue_full",
                    {"Retry-After": "5"},
                )
            )

        def leave_queue(d: Deferred[Lease]) -> None:
            if waiter in self._queue:
                self._queue.remove(waiter)
                self._counts_changed(slot)
                self._abandon_unwanted_load()
                self._pump()

        waiter = _Waiter(
            model_id,
            targets,
            Deferred(leave_queue),
            self._clock.seconds(),
            priority,
            client,
        )
        self._queue.append(waiter)
        self._counts_changed(slot)
        self._pump()
        return waiter.deferred

    def _abandon_unwanted_load(self) -> None:
        """A model being started for nobody, while others wait: stop loading it."""
        if self._swap is None or not self._queue or self._wanted(self._swap[0]):
            return
        for target in self._swap[0]:
            process = self._slots[target].process
            if process.state is ModelState.STARTING:
                self.log.info("abandoning the start of {model}: nobody waits for it", model=target)
                process.stop("abandoned")

    def _counts_changed(self, slot: _Slot) -> None:
        if not self.events.wants(QueueChanged):  # twice per request: only for a watcher
            return
        self.events.publish(
            QueueChanged(slot.process.id, self.queued(slot.process.id), slot.in_flight)
        )

    def load(self, model_id: str) -> Deferred[None]:
        """Make ``model_id`` ready (queued like a request) without sending it anything."""
        return self.acquire(model_id).addCallback(lambda lease: lease.release())

    def _ready(self, targets: frozenset[str]) -> bool:
        return all(
            self._slots[t].process.state is ModelState.READY and t not in self._warming
            for t in targets
        )

    def _victims(
        self, targets: frozenset[str], starting: frozenset[str] = frozenset()
    ) -> frozenset[str]:
        """Running models (and ``starting``, a swap's models that will run, and those
        being started alongside, maybe once they have stopped) that must stop before
        ``targets`` may run (group rules)."""
        starting = starting.union(*self._side_starts)
        running = [
            m
            for m, slot in self._slots.items()
            if m not in targets and (slot.process.state not in _STOPPED or m in starting)
        ]
        victims = set()
        for target in targets:
            group = self.config.group_of(target)
            for other in running:
                other_group = self.config.group_of(other)
                if other_group.id == group.id:
                    if group.swap or len(targets) > 1:
                        victims.add(other)
                elif (group.exclusive or len(targets) > 1) and not other_group.persistent:
                    victims.add(other)
        if self.config.budget:
            victims |= self._make_room(targets, [m for m in running if m not in victims])
        return frozenset(victims)

    def _stopping(self, targets: frozenset[str]) -> bool:
        """A start would wait for the exit, and be decided on what runs now: not
        alongside, then (the next pass decides, once the model has stopped)."""
        return any(self._slots[t].process.state is ModelState.STOPPING for t in targets)

    def _clash(self, targets: frozenset[str], swapping: frozenset[str]) -> bool:
        """Would starting ``targets`` stop anything, counting the swap's models (not
        running yet) as running, or would the swap's models stop ``targets``?"""
        return bool(self._victims(targets, swapping) or self._victims(swapping, targets) & targets)

    def _make_room(self, targets: frozenset[str], staying: list[str]) -> set[str]:
        """More victims until everything fits the memory budget.

        Idle models go first, least recently used first, then the cheapest to
        reload; persistent ones never.  If only busy ones are left, they are chosen
        and the swap waits for them to finish their requests.
        """
        wanted = [self._slots[t].footprint for t in targets]
        candidates = sorted(
            (m for m in staying if not self.config.group_of(m).persistent),
            key=lambda m: (
                self._slots[m].in_flight > 0 or self.queued(m) > 0,
                self._slots[m].last_used or 0.0,
                self._slots[m].process.load_seconds or 0.0,
            ),
        )
        evicted: set[str] = set()
        while not fits(
            self.config.budget,
            wanted + [self._slots[m].footprint for m in staying if m not in evicted],
        ):
            if not candidates:
                self.log.warn(
                    "{models} may not fit in the memory budget even alone; starting anyway",
                    models=", ".join(sorted(targets)),
                )
                break
            evicted.add(candidates.pop(0))
        return evicted

    def footprint(self, model_id: str) -> Footprint | None:
        slot = self._slots.get(model_id)
        return slot.footprint if slot is not None else None

    def _ordered(self) -> list[_Waiter]:
        """The queue as served: higher priority first, then arrival."""
        return sorted(self._queue, key=lambda w: -w.priority)

    def _doomed(self, model_id: str, priority: int, plan: _Plan) -> bool:
        """Will ``model_id`` be stopped before a request of ``priority`` may use it?

        The running swap's victims still serve requests more urgent than the one
        the swap is for, as long as they are ready.
        """
        if model_id in plan.doomed:
            return True
        return (
            self._swap is not None and model_id in self._swap[1] and priority <= self._swap_priority
        )

    def _slot_free(self, slot: _Slot, priority: int) -> bool:
        """May a request of ``priority`` take one of the model's slots now?

        Requests at the model's own priority or above always may (the server queues
        them).  Background ones need a free slot, leave one free for the user when
        the server has several, and yield to anyone more urgent waiting for it.
        """
        model = slot.process.config
        if priority >= model.priority or model.slots is None:
            return True
        keep = 1 if model.slots > 1 else 0
        if model.slots - slot.in_flight <= keep:
            return False
        return not any(w.model_id == model.id and w.priority > priority for w in self._queue)

    def _plan(self, grant: bool = False, at_least: int | None = None) -> _Plan:
        """Walk the queue in order: what it commits to stopping, and the next swap.

        With ``grant``, waiters whose models are ready, and not about to be stopped
        for a waiter ahead of them, get their lease on the way.  With ``at_least``,
        only waiters of that priority or more count (what a new request of that
        priority must respect).
        """
        plan = _Plan()
        now = self._clock.seconds()
        first = True
        for waiter in self._ordered():
            if at_least is not None and waiter.priority < at_least:
                break
            if waiter not in self._queue:
                continue  # left while an earlier lease's callbacks ran
            if self._ready(waiter.targets):
                slot = self._slots[waiter.model_id]
                if (
                    grant
                    and not self._doomed(waiter.model_id, waiter.priority, plan)
                    and self._slot_free(slot, waiter.priority)
                ):
                    self._queue.remove(waiter)
                    waiter.deferred.callback(self._grant(slot, waiter.client, waiter.priority))
                continue
            victims = self._victims(waiter.targets)
            swapping = self._swap[0] if self._swap is not None else frozenset()
            if plan.swap is not None:
                swapping |= plan.swap[0]  # not started yet, but it will be
            if (
                grant
                and not first
                and not self._clash(waiter.targets, swapping)
                and not self._stopping(waiter.targets)
                and not waiter.targets & (swapping | plan.doomed | self._victims_of_swap())
            ):
                # behind another start, but it stops nothing: no need to wait its turn
                self._start_alongside(waiter.targets)
                continue
            if not first:
                if self.policy.reserves_victims():
                    plan.doomed |= victims
                continue
            first = False
            views = [self._victim_view(v) for v in sorted(victims)]
            waiting = Waiting(
                waiter.model_id,
                waiter.arrived,
                self._expected_load(waiter.targets),
                waiter.client,
            )
            if self.policy.swap_now(waiting, views, now):
                plan.doomed |= victims
                if self._swap is None:
                    plan.swap = (waiter.targets, victims)
                    plan.swap_priority = waiter.priority
            else:
                plan.recheck_at = self.policy.recheck_at(waiting, views, now)
        return plan

    def _expected_load(self, targets: frozenset[str]) -> float | None:
        """Seconds loading ``targets`` should take: as measured, else the average of
        the loads measured so far (None: nothing measured yet)."""
        known = [s.process.load_seconds for s in self._slots.values()]
        measured = [x for x in known if x is not None]
        if not measured:
            return None
        typical = sum(measured) / len(measured)
        return max(self._slots[t].process.load_seconds or typical for t in targets)

    def _victims_of_swap(self) -> frozenset[str]:
        return self._swap[1] if self._swap is not None else frozenset()

    def _start_alongside(self, targets: frozenset[str]) -> None:
        """Start models that displace nothing, outside the swap lock."""
        if targets in self._side_starts:
            return
        self._side_starts.add(targets)
        self.log.info("starting {model} alongside", model=", ".join(sorted(targets)))
        starting = _all_now(self._start(t) for t in sorted(targets))

        def done(result: Failure | None) -> None:
            self._side_starts.discard(targets)
            if isinstance(result, Failure):
                error = result.value
                assert isinstance(error, Exception)
                self._fail_waiters(targets, error)
            self._pump()

        starting.addBoth(done)

    def _victim_view(self, model_id: str) -> Victim:
        slot = self._slots[model_id]
        busy = slot.in_flight > 0 or self.queued(model_id) > 0
        since = slot.process.ready_at or slot.process.started_at or self._clock.seconds()
        return Victim(model_id, busy, since, slot.last_used, slot.last_client)

    def _grant(self, slot: _Slot, client: object, priority: int) -> Lease:
        slot.in_flight += 1
        slot.last_client = client
        if slot.ttl_timer is not None and slot.ttl_timer.active():
            slot.ttl_timer.cancel()
        slot.ttl_timer = None
        self._counts_changed(slot)
        return Lease(
            slot.process.id,
            slot.process.base_url,
            lambda: self._release(slot),
            priority=priority,
            slot=slot,
        )

    def _release(self, slot: _Slot) -> None:
        slot.in_flight -= 1
        slot.last_used = self._clock.seconds()
        self._counts_changed(slot)
        if slot.in_flight:
            return
        drained, slot.drained = slot.drained, []
        for drain in drained:
            drain.done.callback(None)
        ttl = slot.process.config.ttl
        if ttl > 0 and slot.process.state is ModelState.READY:
            slot.ttl_timer = self._clock.callLater(ttl, self._ttl_expired, slot)
        if self._queue:
            self._pump()  # a slot for background work; under collate, a swap may start

    def _drained(self, slot: _Slot, awaiting: _Awaiting) -> Deferred[None]:
        """Fires once ``slot`` has no request in flight; until then :meth:`awaited`
        names ``awaiting``."""
        if slot.in_flight == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        slot.drained.append(_Drain(d, awaiting))
        return d

    def awaited(self, lease: Lease) -> str | None:
        """What waits for the request holding ``lease`` to finish, in words ("a swap
        to b waits for model a"); None when nothing does.

        A swap, a stop or a reload waits for every request in flight on the model it
        stops, so a client that takes its answer slowly holds up the swap, and every
        queued request behind it: the connection gate cuts such a reader only then.
        A swap counts only while a request at least as urgent as this one is queued
        (not one started alongside): background work does not cut a user's answer,
        and a swap whose requests all left waits for nobody.
        """
        slot = lease.slot
        if lease.released or slot is None:
            return None
        for drain in slot.drained:
            if drain.awaiting.for_queue and not any(
                w.priority >= lease.priority and w.targets not in self._side_starts
                for w in self._queue
            ):
                continue
            return f"{drain.awaiting.who} waits for model {lease.model_id}"
        return None

    # --- the queue --------------------------------------------------------------

    def _pump(self) -> None:
        """Grant every waiter whose models are ready and safe; start the next swap.

        Not re-entrant: a lease's callback may release it at once, which asks for
        another pump; that one runs after this one, on the queue it left.
        """
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        plan = self._plan(grant=True)
        if plan.swap is not None and self._swap is None:
            targets, victims = plan.swap
            self._swap = plan.swap
            self._swap_priority = plan.swap_priority
            self._swap_started = self._clock.seconds()
            swap = self._swap_lock.run(self._swap_to, targets, victims)
            swap.addBoth(self._swap_done, targets)
        self._arm_recheck(plan.recheck_at)

    def _arm_recheck(self, when: float | None) -> None:
        """Pump again when the policy's bound runs out, if nothing else does first."""
        if self._recheck is not None and self._recheck.active():
            self._recheck.cancel()
        self._recheck = None
        if when is not None:
            delay = max(0.0, when - self._clock.seconds())
            self._recheck = self._clock.callLater(delay, self._pump)

    async def _swap_to(self, targets: frozenset[str], victims: frozenset[str]) -> float | None:
        """Stop ``victims``, start ``targets``: the seconds that took (None if it did not
        get that far)."""
        names = ", ".join(sorted(targets))
        if victims:
            self.log.info(
                "swap to {model}: stopping {others}", model=names, others=", ".join(sorted(victims))
            )
        started = self._clock.seconds()
        in_the_way = [self._slots[v] for v in victims]
        swap = _Awaiting(f"a swap to {names}", for_queue=True)
        await _all(self._drained(other, swap) for other in in_the_way)
        if not self._wanted(targets):
            # everyone who wanted it left while the others drained: keep what runs
            self.log.info("swap to {model} abandoned: nobody waits for it", model=names)
            return None
        if self._outranked(targets):
            # more urgent requests for other models came while the others drained
            self.log.info("swap to {model} postponed: more urgent requests wait", model=names)
            return None
        await _all(self._stop(other, "swap", drain=swap) for other in in_the_way)
        if not self._wanted(targets):
            return None
        await _all(self._start(t) for t in sorted(targets))
        return self._clock.seconds() - started

    def _start(self, model_id: str) -> Deferred[None]:
        """Start a model; it counts as ready once the ``after_start`` hook is done.

        A model still ending (an unload, an idle stop, an exit whose output drains) is
        not started: this waits for the end, and the pump that follows decides again
        (whoever wanted it may have left, a reload may have replaced it, what runs
        beside it may have changed).
        """
        process = self._slots[model_id].process
        if process.state is ModelState.READY:
            return succeed(None)
        if process.ending:
            return process.ended()

        async def start() -> None:
            self._warming.add(model_id)
            try:
                self.hooks.before_start(process)
                try:
                    await process.start()
                except ModelStopped:
                    if self._slot_of(process) is not None:
                        raise
                    # a reload replaced it while it started: whoever waits for it
                    # stays queued, for the new process the next swap starts
                    self.log.info("start of {model} superseded by a reload", model=model_id)
                    return
                if not await self.hooks.after_start(process):
                    await self._lost_while_warming(process)
            finally:
                self._warming.discard(model_id)

        return Deferred.fromCoroutine(start())

    async def _lost_while_warming(self, process: ModelProcess) -> None:
        """The child went away in ``after_start``, before any request was sent to it:
        no lease on it.  Its exit is awaited (so it counts as the crash it was; a
        child that lingers is stopped), and whoever waits for the model stays queued:
        the next pump starts it again (the KV store restores nothing into that one),
        unless that crash was one too many for the crash-loop guard: then they get its
        503, as a request arriving in the cooldown does."""
        self.log.warn(
            "model {model} went away while its saved slots were restored; starting it "
            "again without them for the requests waiting for it",
            model=process.id,
        )
        exited = process.exited().addTimeout(process.timing.stop_timeout, self._clock)
        try:
            await exited
        except TimeoutError:
            await process.stop("lost while restoring")
        slot = self._slot_of(process)
        blocked = self._crash_looping(slot) if slot is not None else None
        if blocked is not None:
            raise blocked  # the swap fails: its waiters get it

    def _stop(self, slot: _Slot, reason: str, *, drain: _Awaiting | None = None) -> Deferred[None]:
        """Stop a model, after the ``before_stop`` hook if it is ready and idle (and
        not still in ``after_start``: what it holds then is what was saved).

        ``drain`` (a swap's victim, the swap): a request granted while the hook ran (a victim
        still serves more urgent ones while it is ready) finishes first, as the stop
        would cut it, and the hook runs again for what it left.
        """
        process = slot.process
        if drain is not None and slot.in_flight:
            return self._drained(slot, drain).addCallback(
                lambda _: self._stop(slot, reason, drain=drain)
            )
        if process.state is not ModelState.READY or slot.in_flight or process.id in self._warming:
            return process.stop(reason)

        async def stop() -> None:
            while True:
                idle = False
                try:
                    idle = await self.hooks.before_stop(process, reason)
                except Exception as e:  # the hook's own bound failed: stop regardless
                    self.log.error("before stopping {model}: {error}", model=process.id, error=e)
                if drain is None or not slot.in_flight:
                    break
                await self._drained(slot, drain)
            # a request granted while the hook ran (an unload keeps none away, a swap
            # not the more urgent ones) is in flight there now: no SIGKILL under it
            await process.stop(reason, idle=idle and not slot.in_flight)

        return Deferred.fromCoroutine(stop())

    def _fail_waiters(self, targets: frozenset[str], error: Exception) -> None:
        """Everyone queued for these models was waiting on the start that failed."""
        for waiter in [w for w in self._queue if w.targets == targets]:
            self._queue.remove(waiter)
            waiter.deferred.errback(error)

    def _outranked(self, targets: frozenset[str]) -> bool:
        return any(
            w.priority > self._swap_priority and w.targets != targets and not self._ready(w.targets)
            for w in self._queue
        )

    def _wanted(self, targets: frozenset[str]) -> bool:
        return not self._closed and any(w.targets == targets for w in self._queue)

    def _swap_done(self, result: float | Failure | None, targets: frozenset[str]) -> None:
        assert self._swap is not None
        swapped = Swapped(
            tuple(sorted(targets)),
            tuple(sorted(self._swap[1])),
            self._clock.seconds() - self._swap_started,
            ok=not isinstance(result, Failure),
        )
        self._swap = None
        if isinstance(result, Failure):
            # everyone queued for these models was waiting on this very start
            error = result.value
            assert isinstance(error, Exception)
            self._fail_waiters(targets, error)
        # the waiting requests first: they go out to the model in this very turn, and
        # the event and the log line would hold them back
        self._pump()
        self.events.publish(swapped)
        if result is not None and not isinstance(result, Failure):
            # a turn later: after the started model's own "ready" line, which it
            # writes once its waiting requests are on their way
            self._clock.callLater(
                0,
                self.log.info,
                "swap to {model} done in {seconds:.2f}s",
                model=", ".join(sorted(targets)),
                seconds=result,
            )

    # --- stopping on purpose -------------------------------------------------------

    def _ttl_expired(self, slot: _Slot) -> None:
        slot.ttl_timer = None
        d = self._swap_lock.run(self._stop_if_idle, slot)
        d.addErrback(
            lambda f: self.log.failure("idle stop of {model} failed", f, model=slot.process.id)
        )
        # what it freed may be what a queued request waits for (the room, the group),
        # whose swap the policy put off while the model looked wanted
        d.addCallback(lambda _: self._pump())

    async def _stop_if_idle(self, slot: _Slot) -> None:
        if slot.in_flight or slot.ttl_timer is not None or self.queued(slot.process.id):
            return
        if slot.process.state is ModelState.READY:
            self.log.info(
                "model {model} idle for {ttl:g}s",
                model=slot.process.id,
                ttl=slot.process.config.ttl,
            )
            idle = await self.hooks.before_stop(slot.process, "ttl")
            if slot.in_flight or slot.ttl_timer is not None or self.queued(slot.process.id):
                return  # a request came while it was saving: it stays
            await slot.process.stop("ttl", idle=idle)

    def unload(self, model_ids: Iterable[str] | None = None) -> Deferred[None]:
        """Stop the given models (all if None) now, without waiting for their requests.

        Not serialised behind the swap lock: an unload must be able to interrupt a
        start that is still waiting for its health check.  An idle ready model goes
        through ``before_stop`` first (its conversations are saved, within the hook's
        own bound); a busy one is stopped at once, its requests cut.
        """
        targets = (
            [self._slots[m] for m in model_ids]
            if model_ids is not None
            else list(self._slots.values())
        )
        stopped = _all_now(self._stop(slot, "manual") for slot in targets)
        return stopped.addCallback(lambda _: self._pump())

    def close(self, grace: float = 0.0) -> Deferred[None]:
        """Refuse new leases, fail queued ones, let requests in flight finish (for at
        most ``grace`` seconds), then stop every child."""
        self._closed = True
        self._arm_recheck(None)
        queued, self._queue = self._queue, deque()
        for waiter in queued:
            waiter.deferred.errback(ApiError(503, "llamaswap is shutting down", "shutting_down"))
        for slot in self._slots.values():
            if slot.ttl_timer is not None and slot.ttl_timer.active():
                slot.ttl_timer.cancel()
        busy = sum(slot.in_flight for slot in self._slots.values())
        shutdown = _Awaiting("the shutdown")
        draining: Deferred[None] = _all_now(
            self._drained(slot, shutdown) for slot in self._slots.values()
        )
        if busy and grace > 0:
            self.log.info(
                "waiting up to {grace:g}s for {busy} requests in flight", grace=grace, busy=busy
            )
            draining.addTimeout(grace, self._clock)
            draining.addErrback(
                lambda f: self.log.warn("requests still in flight after {grace:g}s", grace=grace)
            )
        elif busy:
            draining.cancel()
        stopped = draining.addBoth(
            lambda _: _all_now(self._stop(slot, "shutdown") for slot in self._slots.values())
        )

        def let_go(result: object) -> object:
            for slot in [*self._slots.values(), *self._retiring]:
                slot.process.let_go()
            return result

        return stopped.addBoth(let_go)

    def reconfigure(
        self, config: Config, make_process: Callable[[ModelConfig], ModelProcess]
    ) -> dict[str, list[str]]:
        """Adopt a new configuration without disturbing what did not change.

        Unchanged models keep their process and their requests.  A changed model
        gets a new (stopped) process at once; the old one finishes its requests and
        is then stopped, as is a removed one.  Returns what changed, by kind.
        """
        old_config, self.config = self.config, config
        self.policy = config.policy
        changes: dict[str, list[str]] = {"unchanged": [], "changed": [], "added": [], "removed": []}
        slots: dict[str, _Slot] = {}
        for model_id, model in config.models.items():
            slot = self._slots.get(model_id)
            if slot is not None and _same(old_config, config, model_id):
                slot.process.config = model  # equal, but the new object
                slot.guard.policy = config.crash_loop
                slots[model_id] = slot
                changes["unchanged"].append(model_id)
                continue
            changes["changed" if slot is not None else "added"].append(model_id)
            slots[model_id] = self._new_slot(make_process(model))
        retired = []
        for model_id, slot in self._slots.items():
            if model_id not in config.models:
                changes["removed"].append(model_id)
            if slots.get(model_id) is not slot:
                retired.append(slot)
        # the new slots first: a retired process may end inside its stop
        self._slots = slots
        for slot in retired:
            self._retire(slot)
        for waiter in [w for w in self._queue if not w.targets <= set(slots)]:
            self._queue.remove(waiter)
            waiter.deferred.errback(
                ApiError(404, f"model {waiter.model_id!r} was removed from the configuration")
            )
        self._pump()
        return changes

    def _retire(self, slot: _Slot) -> None:
        """Let an old process finish its requests, then stop it."""
        if slot.ttl_timer is not None and slot.ttl_timer.active():
            slot.ttl_timer.cancel()

        self._retiring.append(slot)

        def stop(_: object) -> Deferred[None]:
            # drained, and no hook ran; a restore may still be reading a slot file
            return slot.process.stop("reload", idle=slot.process.id not in self._warming)

        def gone(result: object) -> object:
            slot.retired = True
            if not slot.process.stuck:  # a stuck child stays reported until it is gone
                self._retiring.remove(slot)
            return result

        reload = _Awaiting("a reload")
        retired = self._drained(slot, reload).addCallback(stop).addBoth(gone)
        retired.addErrback(
            lambda f: self.log.failure("stopping the old {model} failed", f, model=slot.process.id)
        )

    def retiring(self) -> list[ModelView]:
        """Processes of an earlier configuration, finishing their requests, or
        stopped with a child that would not go (reported until it is gone)."""
        self._retiring = [s for s in self._retiring if not s.retired or s.process.stuck]
        return [slot.process for slot in self._retiring]

    def _crash_looping(self, slot: _Slot) -> ApiError | None:
        """The answer for a model the crash-loop guard keeps from starting (None: it may)."""
        retry_in = slot.guard.retry_in(self._clock.seconds())
        if retry_in <= 0:
            return None
        return ApiError(
            503,
            f"model {slot.process.id!r} keeps failing, so it is not being started for "
            f"another {retry_in:.0f}s; last error: {slot.process.last_error}",
            "model_crash_loop",
            {"Retry-After": str(max(1, round(retry_in)))},
        )

    def retry_in(self, model_id: str) -> float:
        """Seconds until a crash-looping model may be started again (0: it may)."""
        return self._slots[model_id].guard.retry_in(self._clock.seconds())

    # --- what the processes tell (IModelWatcher) -------------------------------------

    def _slot_of(self, process: ModelView) -> _Slot | None:
        """The slot of ``process``; None for a process retired by a reload."""
        return next((s for s in self._slots.values() if s.process is process), None)

    def model_ready(self, process: ModelView) -> None:
        slot = self._slot_of(process)
        if slot is not None:
            slot.guard.started()

    def model_exited(self, process: ModelView, how: str, failed: bool) -> None:
        slot = self._slot_of(process)
        if slot is None:
            return
        if slot.ttl_timer is not None and slot.ttl_timer.active():
            slot.ttl_timer.cancel()
        slot.ttl_timer = None
        if failed:
            slot.guard.failed(self._clock.seconds())


def _same(old: Config, new: Config, model_id: str) -> bool:
    """Would ``model_id`` run exactly the same way under both configurations?"""
    return (
        model_id in old.models
        and old.models[model_id] == new.models[model_id]
        and old.health_check_timeout == new.health_check_timeout
    )


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
