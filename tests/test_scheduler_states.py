"""Whatever order things happen in, nothing leaks: a Hypothesis state machine.

The scheduler and its model processes run for real over fake children, a fake
clock and scripted health answers (``tests.helpers.world``).  Hypothesis drives
them with clients that ask, leave and finish, children that get ready, speak the
child protocol, crash, ignore SIGTERM, survive SIGKILL or leave their pipes held,
unloads, reloads and the passing of time; after every step the invariants below
must hold, and at the end every client must have had its answer and every child
must be gone (or reported stuck).

The normal suite runs a few examples; for a long hunt::

    LLAMASWAP_STATE_EXAMPLES=5000 python -m pytest -q tests/test_scheduler_states.py

and ``LLAMASWAP_STATE_STEPS`` (40 by default) makes each sequence longer.  What a
hunt finds is kept, shrunk, in ``FOUND`` and replayed in every run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from hypothesis import Phase, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from llamaswap.errors import ApiError, ModelStopped, StartFailed
from llamaswap.events import ModelChanged
from llamaswap.lifecycle import ModelState
from llamaswap.process import ModelProcess, Timing
from llamaswap.resources import fits
from llamaswap.scheduler import Lease
from llamaswap.testing.fakes import FakeProcess

from .helpers import World, world
from .test_child_protocol import loading, state

HUNT = os.environ.get("LLAMASWAP_STATE_EXAMPLES")
EXAMPLES = int(HUNT or "150")
STEPS = int(os.environ.get("LLAMASWAP_STATE_STEPS") or "40")

TIMING = Timing(
    health_timeout=30, poll_interval=0.25, stop_timeout=10, exit_grace=1, pipe_grace=1, kill_grace=5
)
#: every timer the world knows, and a little less and more than the big ones
DELAYS = (0.0, 0.25, 1.0, 2.0, 5.0, 9.0, 10.0, 29.0, 30.0, 31.0, 60.0)
#: longer than any chain of timers one stop can run (exit, TERM, KILL, pipes)
QUIET = 2 * (TIMING.exit_grace + TIMING.stop_timeout + TIMING.kill_grace + TIMING.pipe_grace)

_CMD = "sleep --port ${PORT} --model "

GROUPS = f"""
scheduler:
  policy: POLICY
models:
  a: {{cmd: "{_CMD}a"}}
  b: {{cmd: "{_CMD}b B_ARGS"}}
  x: {{cmd: "{_CMD}x"}}
  c: {{cmd: "{_CMD}c", ttl: 30}}
  d: {{cmd: "{_CMD}d", childProtocol: "on"}}
  e: {{cmd: "{_CMD}e"}}
  f: {{cmd: "{_CMD}f"}}
groups:
  chat: {{members: [a, b, x]}}
  pair: {{members: [c, d], swap: false}}
  keep: {{members: [e], persistent: true, exclusive: false}}
  side: {{members: [f], exclusive: false}}
profiles:
  duo: [c, e]
"""

BUDGET = f"""
scheduler:
  policy: POLICY
resources:
  vram: 10GiB
models:
  a: {{cmd: "{_CMD}a", memory: 4GiB}}
  b: {{cmd: "{_CMD}b B_ARGS", memory: 4GiB, ttl: 30}}
  c: {{cmd: "{_CMD}c", memory: 4GiB, childProtocol: "on"}}
  big: {{cmd: "{_CMD}big", memory: {{vram: 9GiB, ram: 1GiB}}}}
  keep: {{cmd: "{_CMD}keep", memory: 1GiB}}
groups:
  pinned: {{members: [keep], persistent: true, exclusive: false}}
profiles:
  duo: [c, keep]
"""

LIVE = (ModelState.STARTING, ModelState.READY, ModelState.STOPPING)
QUIET_STATES = (ModelState.STOPPED, ModelState.FAILED)
#: what a client may be told instead of a lease (all answered as OpenAI errors)
CLEAN_ERRORS = (ApiError, StartFailed, ModelStopped)


@implementer(ILogObserver)
class Failures:
    """Every ``log.failure`` (and critical event): each one is a bug."""

    def __init__(self) -> None:
        self.seen: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if "log_failure" in event or event.get("log_level") is LogLevel.critical:
            self.seen.append(event)


class SchedulerStates(RuleBasedStateMachine):
    """Clients, children and time against one scheduler; nothing may leak."""

    template = GROUPS

    def __init__(self) -> None:
        super().__init__()
        self.failures = Failures()
        globalLogPublisher.addObserver(self.failures)
        self.policy = "fifo"
        self.w: World = world(self.config_text(), timing=TIMING)
        self.pending: list[Deferred[Lease]] = []
        self.cancelled: set[int] = set()  # ids of the Deferreds a client cancelled
        self.leases: list[Lease] = []  # granted, not yet released
        self.released: list[Lease] = []
        self.problems: list[str] = []  # seen inside callbacks, raised by an invariant
        self.unloads: list[Deferred[None]] = []
        self.settling = False  # teardown: every lease is released as soon as granted

    def config_text(self, policy: str = "fifo", b_args: str = "") -> str:
        self.policy = policy
        return self.template.replace("POLICY", policy).replace("B_ARGS", b_args)

    @initialize(policy=st.sampled_from(["fifo", "collate"]))
    def configure(self, policy: str) -> None:
        self.w = world(self.config_text(policy), timing=TIMING)
        self.w.events.subscribe(self.model_changed)

    # --- what the test can see ------------------------------------------------------

    def all_processes(self) -> Iterator[ModelProcess]:
        """Current processes and those a reload retired that still finish."""
        yield from (self.w.process(m) for m in self.w.scheduler.processes)
        for slot in self.w.scheduler._retiring:
            yield slot.process

    def live_children(self) -> list[FakeProcess]:
        return self.w.reactor.running()

    def pick(self, items: list[Any], index: int) -> Any:
        return items[index % len(items)] if items else None

    def models(self) -> list[str]:
        return sorted(self.w.config.models)

    # --- clients -------------------------------------------------------------------

    @rule(
        index=st.integers(0, 7),
        priority=st.sampled_from([None, None, -1, 1]),
        client=st.sampled_from([None, "alice", "bob"]),
    )
    def acquire(self, index: int, priority: int | None, client: str | None) -> None:
        self.ask(self.pick(self.models(), index), None, priority, client)

    @rule(index=st.integers(0, 7))
    def another_client_asks(self, index: int) -> None:
        """The commonest event, so twice as likely as the others."""
        self.ask(self.pick(self.models(), index), None, None, None)

    @rule()
    def acquire_profile(self) -> None:
        self.ask("c", "duo", None, None)

    def ask(self, model: str, profile: str | None, priority: int | None, client: object) -> None:
        d = self.w.scheduler.acquire(model, profile=profile, priority=priority, client=client)
        self.pending.append(d)
        d.addBoth(self.answered, d, model)

    def answered(self, result: Lease | Failure, d: Deferred[Lease], model: str) -> None:
        self.pending.remove(d)
        what = type(result.value if isinstance(result, Failure) else result).__name__
        event(f"a client is answered: {what}" + (" (settling)" if self.settling else ""))
        if isinstance(result, Lease):
            process = self.w.process(result.model_id)
            if process.state is not ModelState.READY:
                self.problems.append(f"lease on {model} granted while {process.state.name}")
            if result.base_url != process.base_url:
                self.problems.append(f"lease on {model} names {result.base_url}")
            if self.settling:
                result.release()
                self.released.append(result)
            else:
                self.leases.append(result)
        elif result.check(CancelledError):
            if id(d) not in self.cancelled:
                self.problems.append(f"acquire {model} cancelled by nobody: {result!r}")
        elif not result.check(*CLEAN_ERRORS):
            self.problems.append(f"acquire {model} failed unexpectedly: {result.getTraceback()}")

    @rule(index=st.integers(0, 7), twice=st.booleans())
    def release(self, index: int, twice: bool) -> None:
        lease = self.pick(self.leases, index)
        if lease is None:
            return
        self.leases.remove(lease)
        self.released.append(lease)
        lease.release()
        if twice:
            lease.release()

    @rule(index=st.integers(0, 7))
    def release_again(self, index: int) -> None:
        """A lease released twice (a relay's error path after its finish) counts once."""
        lease = self.pick(self.released, index)
        if lease is not None:
            lease.release()

    @rule(index=st.integers(0, 7))
    def client_leaves(self, index: int) -> None:
        d = self.pick(self.pending, index)
        if d is not None:
            self.cancelled.add(id(d))
            d.cancel()

    # --- children ------------------------------------------------------------------

    @rule(index=st.integers(0, 7))
    def child_is_listening(self, index: int) -> None:
        """The child finishes loading: its health URL answers 200 and it prints a line
        (which asks for a health check at once)."""
        child = self.pick(self.live_children(), index)
        if child is not None:
            self.w.health.status[self.url_of(child)] = 200
            child.say("main: server is listening")

    def url_of(self, child: FakeProcess) -> str:
        return f"http://127.0.0.1:{child.args[child.args.index('--port') + 1]}"

    @rule(index=st.integers(0, 7), status=st.sampled_from([200, 503, 508]))
    def health_answers(self, index: int, status: int) -> None:
        """The live child's health URL answers ``status`` from now on."""
        child = self.pick(self.live_children(), index)
        if child is not None:
            self.w.health.status[self.url_of(child)] = status

    @rule(
        index=st.integers(0, 7),
        line=st.sampled_from(["ready", "loading", "log", "garbled", "sleeping"]),
    )
    def child_says(self, index: int, line: str) -> None:
        child = self.pick(self.live_children(), index)
        if child is None:
            return
        if line == "log":
            child.say("main: loading model")
            return
        child.say("", fd=1)
        if line == "loading":
            child.say(loading(0.5), fd=1)
        elif line == "garbled":
            child.say(state("ready")[:-3], fd=1)
        else:
            child.say(state(line), fd=1)

    @rule(
        index=st.integers(0, 7),
        how=st.sampled_from([(0, None), (1, None), (None, 9), (None, 11)]),
        holding_pipes=st.booleans(),
    )
    def child_exits(
        self, index: int, how: tuple[int | None, int | None], holding_pipes: bool
    ) -> None:
        child = self.pick(self.live_children(), index)
        if child is not None:
            code, signal = how
            child.exit(code, signal, holding_pipes=holding_pipes)

    @rule(index=st.integers(0, 7))
    def pipes_let_go(self, index: int) -> None:
        held = [p for p in self.w.reactor.spawned if p.held is not None]
        child = self.pick(held, index)
        if child is not None:
            child.release_pipes()

    @rule(index=st.integers(0, 7), unkillable=st.booleans())
    def child_is_stubborn(self, index: int, unkillable: bool) -> None:
        """It ignores SIGTERM, or survives even SIGKILL (a hung driver)."""
        child = self.pick(self.live_children(), index)
        if child is not None:
            child.ignore_term = True
            child.unkillable = unkillable

    @rule(index=st.integers(0, 7))
    def request_cannot_spawn(self, index: int) -> None:
        """A request whose start (if it starts one now) cannot run its command."""
        self.w.reactor.spawn_error = OSError(8, "Exec format error")
        try:
            self.ask(self.pick(self.models(), index), None, None, None)
        finally:
            self.w.reactor.spawn_error = None

    # --- the operator and time ---------------------------------------------------------

    @rule(index=st.integers(0, 8))
    def unload(self, index: int) -> None:
        models = self.models()
        which = None if index >= len(models) else [models[index]]
        self.watch_unload(self.w.scheduler.unload(which))

    def watch_unload(self, d: Deferred[None]) -> None:
        self.unloads.append(d)

        def done(result: object) -> None:
            self.unloads.remove(d)
            if isinstance(result, Failure):
                self.problems.append(f"unload failed: {result.getTraceback()}")

        d.addBoth(done)

    @rule(b_args=st.sampled_from(["", "--ctx 2", "--ctx 4"]))
    def reload(self, b_args: str) -> None:
        """A live reload that changes one model's command (or nothing)."""
        self.w.reload(self.config_text(self.policy, b_args))

    @rule(delay=st.sampled_from(DELAYS))
    def time_passes(self, delay: float) -> None:
        self.w.reactor.advance(delay)

    # --- invariants ----------------------------------------------------------------

    @invariant()
    def nothing_went_wrong(self) -> None:
        assert not self.problems, self.problems
        assert not self.failures.seen, [e.get("log_format") for e in self.failures.seen]

    @invariant()
    def every_waiting_client_is_queued(self) -> None:
        """A pending acquire is in the queue: nobody waits for something that forgot it."""
        for d in self.pending:
            assert self.w.scheduler.position(d) is not None, "a client waits outside the queue"
        assert self.w.scheduler.queued() == len(self.pending)

    @invariant()
    def leases_are_counted_once(self) -> None:
        counted = sum(self.w.scheduler.in_flight(m) for m in self.w.scheduler.processes)
        counted += sum(slot.in_flight for slot in self.w.scheduler._retiring)
        assert counted == len(self.leases), (counted, len(self.leases))

    @invariant()
    def no_orphan_child(self) -> None:
        """Each running child is some model's live child, or reported stuck."""
        owned: dict[int, str] = {}
        for process in self.all_processes():
            if process.pid is not None:
                assert process.state in LIVE, (process.id, process.state)
                owned[process.pid] = process.id
            for stuck in process.stuck:
                if stuck.live_pid is not None:
                    owned[stuck.live_pid] = process.id + " (stuck)"
        for child in self.live_children():
            assert child.pid in owned, f"orphan child {child.args}"

    @invariant()
    def ports_follow_children(self) -> None:
        """Leased ports: those of the live processes and of what is stuck, no other."""
        ports: list[int] = []
        for process in self.all_processes():
            if process.port is not None:
                assert process.state in LIVE, (process.id, process.state, process.port)
                ports.append(process.port)
            ports.extend(stuck.port for stuck in process.stuck if stuck.port is not None)
        assert len(ports) == len(set(ports)), f"a port leased twice: {ports}"
        assert set(ports) == self.w.ports._leased, (ports, self.w.ports._leased)

    def model_changed(self, event: object) -> None:
        """A model starts: nothing that its start must stop may still run (or stop)."""
        if isinstance(event, ModelChanged) and event.state is ModelState.STARTING:
            config = self.w.config
            group = config.group_of(event.id)
            for other in config.models:
                if other == event.id or self.w.process(other).state in QUIET_STATES:
                    continue
                other_group = config.group_of(other)
                if other_group.id == group.id:
                    in_the_way = group.swap
                else:
                    in_the_way = group.exclusive and not other_group.persistent
                if in_the_way:
                    state = self.w.process(other).state.name
                    self.problems.append(f"{event.id} starts while {other} is {state}")

    @invariant()
    def swap_groups_run_one_model(self) -> None:
        """At most one model of a swap group runs (or stops) at a time."""
        config = self.w.config
        running = [m for m in config.models if self.w.process(m).state not in QUIET_STATES]
        for group in {config.group_of(m).id: config.group_of(m) for m in running}.values():
            if group.swap:
                together = [m for m in running if m in group.members]
                assert len(together) <= 1, f"{together} of swap group {group.id} run together"

    @invariant()
    def the_budget_holds(self) -> None:
        config = self.w.config
        if config.budget:
            running = [m for m in config.models if self.w.process(m).state not in QUIET_STATES]
            footprints = [self.w.scheduler.footprint(m) for m in running]
            assert fits(config.budget, [f for f in footprints if f is not None]), running

    # --- the end: everyone answered, every child gone ------------------------------

    def teardown(self) -> None:
        try:
            if not self.problems and not self.failures.seen:
                self.settle()
        finally:
            globalLogPublisher.removeObserver(self.failures)

    def settle(self) -> None:
        w = self.w
        self.settling = True
        for lease in list(self.leases):
            self.leases.remove(lease)
            lease.release()
        for _ in range(int(5 * QUIET)):
            for process in self.all_processes():
                if process.state is ModelState.STARTING and process.port is not None:
                    w.health.status[process.base_url] = 200
                    if process.pid is not None:
                        self.child_of(process).say("main: server is listening")
            if not self.pending:
                break
            w.reactor.advance(1)
        assert not self.pending, self.stalled()
        self.nothing_went_wrong()

        self.watch_unload(w.scheduler.unload())
        for _ in range(int(QUIET)):
            w.reactor.advance(1)
        assert not self.unloads, "unload() never finished"
        for process in self.all_processes():
            assert process.state in QUIET_STATES, (process.id, process.state)
        stuck = {s.live_pid for p in self.all_processes() for s in p.stuck}
        for child in self.live_children():
            assert child.pid in stuck, f"{child.args} runs after unload and is not reported"
        self.check_all()

        # what was stuck finally goes: nothing stays fenced
        for child in w.reactor.spawned:
            if not child.ended:
                child.unkillable = False
                child.exit(None, 9)
            child.release_pipes()
        for _ in range(int(QUIET)):
            w.reactor.advance(1)
        event(f"children reported stuck: {len(stuck)}")
        assert not [s for p in self.all_processes() for s in p.stuck]
        assert not w.ports._leased, w.ports._leased
        assert not self.live_children()
        assert not w.scheduler.retiring()
        self.check_all()

    def check_all(self) -> None:
        self.nothing_went_wrong()
        self.every_waiting_client_is_queued()
        self.leases_are_counted_once()
        self.no_orphan_child()
        self.ports_follow_children()
        self.swap_groups_run_one_model()
        self.the_budget_holds()

    def child_of(self, process: ModelProcess) -> FakeProcess:
        return next(c for c in self.w.reactor.spawned if c.pid == process.pid)

    def stalled(self) -> str:
        states = {p.id: p.state.name for p in self.all_processes()}
        return f"{len(self.pending)} clients never answered; models: {states}"


class BudgetStates(SchedulerStates):
    """The same, with a memory budget: ungrouped models share the machine while they fit."""

    template = BUDGET


# the suite's run is the same sequences every time (a red CI must mean a change broke
# something); a hunt (LLAMASWAP_STATE_EXAMPLES) explores anew each run
STATE_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=HUNT is None,
)
SchedulerStates.TestCase.settings = STATE_SETTINGS
BudgetStates.TestCase.settings = STATE_SETTINGS
TestSchedulerStates = SchedulerStates.TestCase
TestBudgetStates = BudgetStates.TestCase


#: sequences a hunt found, kept as they were shrunk: (machine, [(rule, arguments)])
FOUND: dict[str, tuple[type[SchedulerStates], list[tuple[str, dict[str, Any]]]]] = {
    # 'c' started alongside; its child exited, its output still draining, when a
    # profile's start asked for 'c' again: that start was chained on the exit and
    # ran when it came, past what the scheduler had started since ('f', which an
    # exclusive 'c' must stop): "c starts while f is READY"
    "start_chained_on_an_exit": (
        SchedulerStates,
        [
            ("configure", {"policy": "collate"}),
            ("acquire", {"client": None, "index": 2, "priority": None}),
            ("time_passes", {"delay": 1.0}),
            ("request_cannot_spawn", {"index": 1}),
            ("acquire_profile", {}),
            ("child_is_listening", {"index": 6}),
            ("child_exits", {"holding_pipes": False, "how": (0, None), "index": 0}),
            ("child_exits", {"holding_pipes": True, "how": (0, None), "index": 4}),
            ("another_client_asks", {"index": 2}),
            ("pipes_let_go", {"index": 7}),
            ("child_exits", {"holding_pipes": True, "how": (0, None), "index": 4}),
            ("acquire_profile", {}),
            ("acquire", {"client": "alice", "index": 5, "priority": 1}),
        ],
    ),
}


def replay(name: str) -> None:
    """One found sequence, step by step, each step followed by every invariant."""
    machine, steps = FOUND[name]
    state = machine()
    try:
        for rule_name, arguments in steps:
            getattr(state, rule_name)(**arguments)
            state.check_all()
    finally:
        state.teardown()


# each found sequence is an explicit example: run as given, every time, nothing drawn
test_sequences_found_by_hunts = given(name=st.sampled_from(sorted(FOUND)))(replay)
for _name in FOUND:
    test_sequences_found_by_hunts = example(name=_name)(test_sequences_found_by_hunts)
test_sequences_found_by_hunts = settings(phases=[Phase.explicit], database=None, deadline=None)(
    test_sequences_found_by_hunts
)
