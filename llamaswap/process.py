"""One model's server process: spawn, readiness, stop, exit.

``ModelProcess`` owns a single child and its state machine
``stopped → starting → ready → stopping → stopped`` (``failed`` after a start that
did not work).  It never decides *which* model should run; the scheduler does.

It trusts exits, not pipes: the model has stopped once its process has exited
(``processExited``), even while something the process started still holds its
output.  What cannot be stopped (a process that survives SIGKILL, or one that left
the process group and keeps the pipes) is reported in :attr:`ModelProcess.stuck`
and fenced off (its port stays reserved) until it is gone, but never holds up the
next model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from . import childproto
from .childproto import EXIT_COMMAND, ROUTER_PORT, ROUTER_PORT_ENV, ProtocolWatch
from .config import ModelConfig, fill_runtime
from .config.settings import ModelSettings, Top, default
from .errors import ModelStopped, StartFailed
from .events import EventBus, ModelChanged, Progress, Stuck
from .lifecycle import IModelWatcher, ModelState
from .lifeline import LIFELINE_FD, guarded
from .logs import LogHub, logger
from .ports import PortAllocator
from .readiness import HealthProbe, HealthWatch, ReadyAtOnce, Watch

__all__ = ["HealthProbe", "ModelProcess", "ModelState", "Timing"]  # ModelState: lifecycle

TAIL_LINES = 20
MAX_LINE = 16_384


@attrs.frozen
class Timing:
    """Knobs for starting and stopping, all in seconds."""

    health_timeout: float = default(Top, "health_check_timeout")
    poll_interval: float = 0.25
    stop_timeout: float = default(ModelSettings, "unload_timeout")
    # a ready child that speaks llama-server's protocol is asked to exit on stdin
    # first; SIGTERM follows this long after, should the command be lost
    exit_grace: float = 1.0
    # after its process exited, how long a child's output may take to drain before
    # the pipes are closed and whatever still holds them is reported
    pipe_grace: float = 1.0
    # how long a SIGKILLed child may take to exit (a big model's memory takes a
    # moment to free) before it is reported stuck and the next model goes ahead;
    # also how often what is stuck is checked again
    kill_grace: float = 5.0


class ChildProtocol(ProcessProtocol):
    """Splits the child's output into lines and reports its end; no policy here."""

    log = logger()

    def __init__(
        self,
        on_line: Callable[[str, str], None],
        on_ended: Callable[[Failure], None],
        on_exited: Callable[[Failure], None] = lambda reason: None,
        keep_stdin: bool = False,
    ) -> None:
        self._on_line = on_line
        self._on_ended = on_ended
        self._on_exited = on_exited
        self._keep_stdin = keep_stdin
        self._partial: dict[int, bytes] = {}
        # the fds inside a line that was too long: the rest of it is dropped
        self._cut: set[int] = set()
        #: the child's pid, known from the moment it runs (the transport forgets it
        #: once the process has exited, which may be before spawnProcess returns)
        self.pid: int | None = None
        # what happened before attach(): a child that exits at once is reaped inside
        # spawnProcess, and its exit reported before the caller knows the child
        self._held: list[Callable[[], None]] | None = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        if not self._keep_stdin:  # a llama-server child reads its stop command there
            self.transport.closeStdin()

    def attach(self) -> None:
        """The caller knows the child now: report what it did so far, then as it comes."""
        held, self._held = self._held, None
        for call in held or ():
            call()

    def _deliver(self, call: Callable[[], None]) -> None:
        if self._held is None:
            call()
        else:
            self._held.append(call)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if childFD in self._cut:
            if not lines:
                self._partial[childFD] = b""
                return
            self._cut.discard(childFD)
            lines = lines[1:]  # the end of the cut line
        if len(rest) > MAX_LINE:
            # a child printing without newlines must not grow us, and what follows the
            # cut must not pass for a line of its own (text a client chose could then
            # start with the child protocol's prefix): the line is shown cut, once
            lines.append(rest[:MAX_LINE])
            rest = b""
            self._cut.add(childFD)
        self._partial[childFD] = rest
        stream = "stdout" if childFD == 1 else "stderr"
        for raw in lines:
            self._line(stream, _decode(raw))

    def _line(self, stream: str, text: str) -> None:
        self._deliver(lambda: self._read_line(stream, text))

    def _read_line(self, stream: str, text: str) -> None:
        try:
            self._on_line(stream, text)
        except Exception:
            # whatever a line does to its reader, the next line is still read:
            # an error here would close the pipe and the child would never be heard
            self.log.failure("a line from a model's {stream} could not be handled", stream=stream)

    def processExited(self, reason: Failure) -> None:
        """The process itself is gone (its pipes may live on in descendants)."""
        self._deliver(lambda: self._on_exited(reason))

    def processEnded(self, reason: Failure) -> None:
        """The process is gone and its pipes are closed."""
        for fd, rest in sorted(self._partial.items()):
            if rest:
                self._line("stdout" if fd == 1 else "stderr", _decode(rest))
        self._partial.clear()
        self._deliver(lambda: self._on_ended(reason))


#: options whose value is a secret: a command line in the log shows ``***`` instead
SECRET_OPTIONS = frozenset({"--api-key", "--hf-token", "-hft"})


def shown_command(argv: Sequence[str]) -> str:
    """``argv`` for the log: the values of :data:`SECRET_OPTIONS` hidden (the log is
    read at ``/logs``; a child's key belongs in its ``env``, but not everyone knows)."""
    shown: list[str] = []
    hide = False
    for argument in argv:
        name, equals, _ = argument.partition("=")
        if hide:
            shown.append("***")
        elif equals and name in SECRET_OPTIONS:
            shown.append(name + "=***")
        else:
            shown.append(argument)
        hide = not hide and not equals and argument in SECRET_OPTIONS
    return " ".join(shown)


def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\r").decode("utf-8", errors="replace")


def _average(previous: float | None, sample: float, weight: float = 0.3) -> float:
    """An exponential moving average: recent starts count most."""
    return sample if previous is None else previous + weight * (sample - previous)


def _last_output(tail: deque[str]) -> str:
    lines = list(tail)[-TAIL_LINES:]
    return "; last output:\n" + "\n".join(lines) if lines else ""


def describe_exit(reason: Failure) -> str:
    """Exit status in words, e.g. ``exited with code 1`` or ``killed by SIGKILL``."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited with code 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = f"signal {value.signal}"
            return f"killed by {name}"
        return f"exited with code {value.exitCode}"
    return f"ended: {value}"


@attrs.define(eq=False)
class Child:
    """One spawned process of a model, from its spawn until it and its pipes are gone."""

    pid: int  # also its process group's id when process groups are on
    port: int | None
    transport: IProcessTransport
    exit: Failure | None = None  # set once the process has exited
    ended: bool = False  # its pipes are closed too
    pipes_closed: bool = False  # we closed our ends
    stuck_since: float | None = None
    why: str = ""  # why it is reported stuck
    group: int | None = None  # the process group llamaswap kills for it (None: no groups)
    check: IDelayedCall | None = None

    @property
    def live_pid(self) -> int | None:
        """The pid while that process lives (never a pid that may be reused)."""
        return self.pid if self.exit is None else None


class ModelProcess:
    """The child process serving one configured model."""

    log = logger()

    def __init__(
        self,
        config: ModelConfig,
        *,
        reactor: IReactorProcess,
        clock: IReactorTime,
        logs: LogHub,
        ports: PortAllocator,
        probe: HealthProbe,
        timing: Timing,
        base_env: Mapping[str, str] | None = None,
        process_groups: bool = True,
        events: EventBus,
        close_connections: Callable[[str], None] = lambda url: None,
        open_spare: Callable[[str], None] = lambda url: None,
    ) -> None:
        self.config = config
        self._reactor = reactor
        self._clock = clock
        self._logs = logs
        self._ports = ports
        self._probe_url = probe
        self.timing = timing
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._setsid = shutil.which("setsid") if process_groups else None

        self.events = events
        # closes llamaswap's connections to a server (by URL), cutting those in use
        self._close_connections = close_connections
        # opens a connection to a server (by URL) for its next request to take
        self._open_spare = open_spare
        self.state = ModelState.STOPPED
        self.stop_reason = "manual"
        self.exit_was_failure = False
        # learned costs (moving averages): seconds to become ready, seconds to stop
        self.load_seconds: float | None = None
        self.stop_seconds: float | None = None
        self._stop_began: float | None = None
        self.port: int | None = None
        self.last_error: str | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.started_at: float | None = None
        self.ready_at: float | None = None
        # how far the current start got (0..1) and its stage, when the child says
        self.progress: float | None = None
        self.stage: str | None = None
        # told of readiness and exits (the scheduler), see :meth:`watch`
        self._watchers: list[IModelWatcher] = []
        # earlier children that would not go: reported, their ports kept reserved
        self.stuck: list[Child] = []

        self._child: Child | None = None
        self._start_waiters: list[Deferred[None]] = []
        self._exit_waiters: list[Deferred[None]] = []
        self._start_failure: Exception | None = None
        self._deadline: IDelayedCall | None = None
        self._term: IDelayedCall | None = None
        self._kill: IDelayedCall | None = None
        self._abandon: IDelayedCall | None = None
        self._drain: IDelayedCall | None = None
        self._watch: Watch = ReadyAtOnce(lambda: None)

    def watch(self, watcher: IModelWatcher) -> None:
        """Tell ``watcher`` whenever this model becomes ready or its child is gone."""
        self._watchers.append(watcher)

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def base_url(self) -> str:
        return self.config.proxy_url(self.port)

    @property
    def pid(self) -> int | None:
        """The running child's pid, only while that process lives."""
        return self._child.live_pid if self._child is not None else None

    # --- starting ------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Fire when the model is ready; concurrent callers share one start."""
        if self.ending:
            return self._when_exited().addCallback(lambda _: self.start())
        if self.state is ModelState.READY:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._start_waiters.append(waiter)
        if self.state is not ModelState.STARTING:
            self._spawn()
        return waiter

    def _set_state(
        self,
        state: ModelState,
        *,
        start_seconds: float | None = None,
        cause: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.state = state
        self.events.publish(
            ModelChanged(
                self.id, state, self.pid, self.last_error, start_seconds, cause=cause, reason=reason
            )
        )

    def _spawn(self) -> None:
        self._set_state(ModelState.STARTING)
        self.last_error = None
        self._start_failure = None
        self.tail.clear()
        self.started_at = self._clock.seconds()
        self.ready_at = None
        self.progress = self.stage = None
        try:
            self.port = self._ports.allocate() if self.config.uses_port else None
        except OSError as e:
            self._fail_before_spawn(str(e))
            return
        runtime = {"PORT": str(self.port)} if self.port is not None else {}
        argv = self.config.cmd.render(self.port)
        env = dict(self._base_env)
        env.update((name, fill_runtime(value, runtime)) for name, value in self.config.env)
        executable = shutil.which(argv[0], path=env.get("PATH"))
        if executable is None:
            self._fail_before_spawn(f"command not found: {argv[0]!r} (check cmd and PATH)")
            return
        shown = shown_command(argv)
        watch = self._watch = self._watch_for(executable)
        if watch.talks:
            env[ROUTER_PORT_ENV] = ROUTER_PORT
        argv = [executable, *argv[1:]]
        fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        if self._setsid is not None:
            # own session and process group, so a stop reaches wrapper scripts'
            # children too, and a watcher that kills the group if llamaswap dies
            argv = guarded(self._setsid, argv)
            fds[LIFELINE_FD] = "w"
        executable = argv[0]
        child: Child | None = None

        def line(stream: str, text: str) -> None:
            self._line(child, stream, text)

        protocol = ChildProtocol(
            line,
            lambda r: self._ended(child, r),
            lambda r: self._exited(child, r),
            keep_stdin=watch.talks,
        )
        try:
            transport = self._reactor.spawnProcess(
                protocol, executable, argv, env=env, childFDs=fds
            )
        except Exception as e:  # OSError mostly; whatever it is, the start has failed
            self.log.info("starting {model}: {argv}", model=self.id, argv=shown)
            if not isinstance(e, OSError):
                self.log.failure("spawning {model}", model=self.id)
            if protocol.pid is not None:  # it runs (Twisted failed after it started): unwatched
                # the process first: it may not have made its group yet, nor anything else
                for kill in (os.kill, os.killpg) if self._setsid is not None else (os.kill,):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        kill(protocol.pid, signal.SIGKILL)
            self._fail_before_spawn(f"could not run {argv[0]!r}: {e}")
            return
        assert protocol.pid is not None
        child = self._child = Child(protocol.pid, self.port, transport)
        # said once the child runs: the line costs a fraction of a millisecond
        self.log.info("starting {model}: {argv}", model=self.id, argv=shown)
        self._deadline = self._clock.callLater(self.timing.health_timeout, self._start_timed_out)
        watch.begin()
        protocol.attach()  # it may have exited already: that is reported now

    def _watch_for(self, executable: str) -> Watch:
        """How this start learns readiness: the child's own word, or its health URL."""
        health = None
        if self.config.check_endpoint is not None:
            endpoint = self.config.check_endpoint
            health = HealthWatch(
                clock=self._clock,
                probe=self._probe_url,
                url=lambda: self.base_url + endpoint,
                interval=self.timing.poll_interval,
                ready=self._became_ready,
                progress=self._progressed,
                failed=self._cannot_start,
            )
        if childproto.speaks_protocol(self.config.child_protocol, executable):
            return ProtocolWatch(
                model=self.id, ready=self._became_ready, progress=self._progressed, fallback=health
            )
        return health or ReadyAtOnce(self._became_ready)

    def _progressed(self, fraction: float, stage: str | None) -> None:
        if self.state is not ModelState.STARTING:
            return
        self.progress, self.stage = fraction, stage
        self.events.publish(Progress(self.id, fraction, stage))
        if fraction >= 1.0 and self._watch.talks:
            # its weights are in; it says "ready" after its warm-up (0.1-1 s): the
            # request waiting for it goes out on this connection at once
            self._open_spare(self.base_url)

    def _fail_before_spawn(self, cause: str) -> None:
        self._release_port()
        self.last_error = cause
        self.exit_was_failure = True
        self._set_state(ModelState.FAILED, cause="spawn")
        self.log.error("model {model} failed to start: {cause}", model=self.id, cause=cause)
        self._fire_start(StartFailed(self.id, cause, list(self.tail), kind="spawn"))

    def _line(self, child: Child | None, stream: str, line: str) -> None:
        current = child is not None and child is self._child
        if current and self._watch.line(stream, line):
            return  # a message to llamaswap, not a log line
        self._logs.child_line(self.id, stream, line)
        if current:
            self.tail.append(line)

    @property
    def ending(self) -> bool:
        """A stop is under way, or the child has exited and its output drains."""
        return self.state is ModelState.STOPPING or self._exiting()

    def ended(self) -> Deferred[None]:
        """Fire once the end under way (see :attr:`ending`) is over; at once if none."""
        return self._when_exited() if self.ending else succeed(None)

    def exited(self) -> Deferred[None]:
        """Fire once the running child's end is settled (at once if none runs), however
        it ends: a stop, or an exit of its own (a crash, counted as one)."""
        if self._child is None:
            return succeed(None)
        return self._when_exited()

    def _exiting(self) -> bool:
        """Its process has exited; the state changes once the output has drained."""
        return self._child is not None and self._child.exit is not None

    def _stop_watching(self) -> None:
        """Call once the state is no longer STARTING, so nothing says "ready" any more."""
        self._watch.cancel()

    def _became_ready(self) -> None:
        self._cancel(self._deadline)
        self._deadline = None
        self.ready_at = self._clock.seconds()
        assert self.started_at is not None
        self.load_seconds = _average(self.load_seconds, self.ready_at - self.started_at)
        self.progress = self.stage = None
        self._set_state(ModelState.READY, start_seconds=self.ready_at - self.started_at)
        self._stop_watching()
        for watcher in list(self._watchers):
            watcher.model_ready(self)
        # the waiting requests first: they go out to the child in this very turn, and
        # the log line would hold them back
        self._fire_start(None)
        self.log.info(
            "model {model} ready in {seconds:.2f}s at {url}",
            model=self.id,
            seconds=self.ready_at - self.started_at,
            url=self.base_url,
        )

    def _start_timed_out(self) -> None:
        self._deadline = None
        what = (
            f"health check {self.config.check_endpoint} did not answer 200"
            if self.config.check_endpoint
            else "it did not start"
        )
        cause = f"not ready after {self.timing.health_timeout:g}s ({what})"
        self._start_failure = StartFailed(self.id, cause, list(self.tail), kind="timeout")
        self._begin_stop()

    def _cannot_start(self, cause: str) -> None:
        """The readiness watch knows the start cannot succeed: stop the child now."""
        self._cancel(self._deadline)
        self._deadline = None
        self._start_failure = StartFailed(self.id, cause, list(self.tail), kind="loop")
        self._begin_stop()

    def _fire_start(self, error: Exception | None) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(error)

    # --- stopping ------------------------------------------------------------

    def stop(self, reason: str = "manual", *, idle: bool = False) -> Deferred[None]:
        """Fire once the child has exited (TERM or ``cmdStop``, KILL after the grace).

        ``idle``: nothing llamaswap sent the child is still running there, so a
        llama-server may be stopped at once (``quickStop``)."""
        if self.state in (ModelState.STOPPED, ModelState.FAILED):
            return succeed(None)
        exited = self._when_exited()
        if self._exiting():
            return exited  # it is already gone; it ends with its own cause
        if self.state is ModelState.STARTING and self._start_failure is None:
            self._start_failure = ModelStopped(f"model {self.id!r} was stopped while starting")
        if self.state is not ModelState.STOPPING:
            self.stop_reason = reason
            how = self._begin_stop(idle)  # said after: the child starts its exit meanwhile
            self.log.info(
                "stopping {model} ({reason}, {how})", model=self.id, reason=reason, how=how
            )
        return exited

    def _begin_stop(self, idle: bool = False) -> str:
        """Ask the child to go; says how it was asked."""
        serving = self.state is ModelState.READY
        self._stop_beginning()
        # an HTTP server that stops waits for its idle kept-alive connections
        # (llama-server: up to 10 ms each), and for a thread blocked writing an answer
        # a slow client holds up: nothing more goes over them, what they carry is cut
        self._close_connections(self.base_url)
        # armed first: an exit reported within the signal call itself settles the
        # model (and cancels this) before the call returns
        self._kill = self._clock.callLater(self.timing.stop_timeout, self._force_stop)
        if self.config.cmd_stop is not None and self.pid is not None:
            self._run_cmd_stop()
            return "cmdStop"
        if serving and self._watch.heard and idle and self.config.quick_stop:
            # an idle llama-server holds nothing a clean exit would keep (its slots
            # were saved by the hook before this), and its own exit takes twice as long
            self._signal("KILL")
            return "SIGKILL: quickStop"
        if serving and self._watch.heard and self._child is not None:
            # llama-server's own clean exit.  SIGTERM follows: llama-server loses
            # a stop (command or signal) that comes before its main loop runs,
            # which it starts only just after saying "ready".  While it loads,
            # SIGTERM (its default action) ends it at once.
            self._child.transport.write(EXIT_COMMAND)
            self._term = self._clock.callLater(self.timing.exit_grace, self._signal, "TERM")
            return "exit command"
        self._signal("TERM")
        return "SIGTERM"

    def _stop_beginning(self) -> None:
        # a start being stopped is over: its health deadline must not stop it again
        self._cancel(self._deadline)
        self._deadline = None
        self._stop_began = self._clock.seconds()
        self._set_state(ModelState.STOPPING)
        self._stop_watching()

    def _run_cmd_stop(self) -> None:
        assert self.config.cmd_stop is not None
        argv = self.config.cmd_stop.render(port=self.port, pid=self.pid)
        executable = shutil.which(argv[0], path=self._base_env.get("PATH"))
        if executable is None:
            self.log.warn("cmdStop {cmd!r} not found; sending SIGTERM", cmd=argv[0])
            self._signal("TERM")
            return
        protocol = ChildProtocol(
            lambda stream, line: self._logs.child_line(self.id, stream, "[cmdStop] " + line),
            lambda reason: None,
        )
        try:
            self._reactor.spawnProcess(protocol, executable, argv, env=self._base_env)
        except OSError as e:
            self.log.warn("cmdStop failed ({error}); sending SIGTERM", error=e)
            self._signal("TERM")
            return
        protocol.attach()

    def _force_stop(self) -> None:
        self._kill = None
        self._cancel(self._term)
        self._term = None
        self.log.warn(
            "model {model} still running {grace:g}s after stop; killing it",
            model=self.id,
            grace=self.timing.stop_timeout,
        )
        self._signal("KILL")
        if self._child is not None and not self._exiting():
            self._abandon = self._clock.callLater(
                self.timing.kill_grace, self._give_up, self._child
            )

    def _give_up(self, child: Child) -> None:
        """SIGKILL did not end it (a hung driver, a disk wait): stop waiting for it."""
        self._abandon = None
        self.log.error(
            "model {model}: pid {pid} did not exit {grace:g}s after SIGKILL; reported as "
            "stuck, its port stays reserved until it is gone, and other models go ahead",
            model=self.id,
            pid=child.pid,
            grace=self.timing.kill_grace,
        )
        self._fence(child, "did not exit after SIGKILL")
        self._finish(child, "did not exit after SIGKILL")

    def _signal(self, name: str) -> None:
        """SIG``name`` to the child (its group); SIGTERM is followed by SIGCONT, as
        systemd does: a stopped process (``kill -STOP``, a debugger) acts on it only
        once continued, else its stop would wait for SIGKILL at ``unloadTimeout``."""
        child = self._child
        if child is None or child.exit is not None:
            return
        number = getattr(signal, "SIG" + name)
        for each in (number, signal.SIGCONT) if number == signal.SIGTERM else (number,):
            self._send(child, each)

    def _send(self, child: Child, number: int) -> None:
        if self._setsid is not None:
            try:
                os.killpg(child.pid, number)
            except ProcessLookupError:
                # no such group yet: a stop in the moment after the spawn, before the
                # child ran setsid.  Not reaped, so the pid is still our child's
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child.pid, number)
            except PermissionError:
                pass
            return
        with contextlib.suppress(ProcessExitedAlready):
            child.transport.signalProcess(number)

    def _kill_group(self, child: Child) -> None:
        """SIGKILL whatever is left in the child's process group."""
        if self._setsid is not None:
            # the group id stays taken while any member lives, so it is still ours
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)

    def _close_pipes(self, child: Child) -> None:
        if not child.pipes_closed:
            child.pipes_closed = True
            child.transport.loseConnection()
            child.transport.closeChildFD(LIFELINE_FD)

    def _when_exited(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._exit_waiters.append(waiter)
        return waiter

    # --- the end ---------------------------------------------------------------

    def _exited(self, child: Child | None, reason: Failure) -> None:
        """The process has exited: the model stops now, whoever holds its pipes."""
        assert child is not None
        child.exit = reason
        self._kill_group(child)
        if child is not self._child:
            self._close_pipes(child)
            self._check_stuck(child)
            return
        for timer in (self._deadline, self._term, self._kill, self._abandon):
            self._cancel(timer)
        self._deadline = self._term = self._kill = self._abandon = None
        self._stop_watching()
        # the output it wrote before exiting may still be on its way: wait for the
        # pipes to close (processEnded) a moment, for its last words
        self._drain = self._clock.callLater(self.timing.pipe_grace, self._pipes_held, child)

    def _pipes_held(self, child: Child) -> None:
        """Exited, but its pipes stay open: a process outside its group holds them."""
        self._drain = None
        self.log.warn(
            "model {model} exited, but a process it started still holds its output: it "
            "left the process group (setsid), so llamaswap cannot stop it (a cgroup can: "
            "systemd KillMode=control-group); reported as stuck, its port stays reserved",
            model=self.id,
        )
        self._fence(child, "exited, but a process it started outside its group holds its output")
        self._finish(child, describe_exit(child.exit) if child.exit else "exited")
        self._close_pipes(child)

    def _ended(self, child: Child | None, reason: Failure) -> None:
        assert child is not None
        child.ended = True
        if child.exit is None:
            child.exit = reason
        if child is self._child:
            self._finish(child, describe_exit(reason))
        else:
            self._check_stuck(child)

    def _finish(self, child: Child, how: str) -> None:
        """The model is stopped (or failed): settle the state and tell everyone."""
        was = self.state
        self.exit_was_failure = False
        if self._stop_began is not None and was is ModelState.STOPPING:
            self.stop_seconds = _average(
                self.stop_seconds, self._clock.seconds() - self._stop_began
            )
        self._stop_began = None
        for timer in (self._deadline, self._term, self._kill, self._abandon, self._drain):
            self._cancel(timer)
        self._deadline = self._term = self._kill = self._abandon = self._drain = None
        self._child = None
        self.port = None
        if child not in self.stuck and child.port is not None:
            self._ports.release(child.port)

        failure: Exception | None = None
        if was is ModelState.STARTING or (
            was is ModelState.STOPPING and self._start_failure is not None
        ):
            failure = self._start_failure or StartFailed(
                self.id, f"{how} while starting", list(self.tail), kind="exit"
            )
            if isinstance(failure, ModelStopped):
                self.last_error = None
                self._set_state(ModelState.STOPPED, reason=self.stop_reason)
            else:
                self.last_error = str(failure)
                self.exit_was_failure = True
                kind = failure.kind if isinstance(failure, StartFailed) else "exit"
                self._set_state(ModelState.FAILED, cause=kind)
                self.log.error("{error}", error=failure)
        else:
            if was is ModelState.READY:
                self.last_error = f"{how} unexpectedly" + _last_output(self.tail)
                self.exit_was_failure = True
                self._set_state(ModelState.STOPPED, reason="crash")
                self.log.warn("model {model} {how} while serving", model=self.id, how=how)
            else:
                self._set_state(ModelState.STOPPED, reason=self.stop_reason)
                self.log.info("model {model} stopped ({how})", model=self.id, how=how)
        self._start_failure = None
        self._stop_watching()

        # the watchers first, then the waiters, each once this end is settled: a waiter
        # may start the model again at once (the scheduler's next swap), and nothing
        # said of this child may reach that new start (its watch, its idle timer)
        for watcher in list(self._watchers):
            watcher.model_exited(self, how, self.exit_was_failure)
        if failure is not None:
            self._fire_start(failure)
        waiters, self._exit_waiters = self._exit_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # --- what would not go -----------------------------------------------------

    def _fence(self, child: Child, why: str) -> None:
        """Report ``child`` as stuck and keep its port reserved until it is gone."""
        child.stuck_since = self._clock.seconds()
        child.why = why
        child.group = self.group(child)
        self.stuck.append(child)
        self._stuck_changed(child, gone=False)
        child.check = self._clock.callLater(self.timing.kill_grace, self._check_stuck, child)

    def group(self, child: Child) -> int | None:
        """The process group llamaswap kills for ``child`` (None without groups)."""
        return child.pid if self._setsid is not None else None

    def _check_stuck(self, child: Child) -> None:
        """Gone once it has exited, its pipes are closed and its port is free again."""
        self._cancel(child.check)
        child.check = None
        if child not in self.stuck:
            return
        self._kill_group(child)
        if child.exit is not None:
            self._close_pipes(child)
        port_free = child.port is None or self._ports.is_free(child.port)
        if child.exit is None or not child.ended or not port_free:
            child.check = self._clock.callLater(self.timing.kill_grace, self._check_stuck, child)
            return
        self.stuck.remove(child)
        if child.port is not None:
            self._ports.release(child.port)
        self.log.info(
            "model {model}: what was left of pid {pid} is gone", model=self.id, pid=child.pid
        )
        self._stuck_changed(child, gone=True)

    def let_go(self) -> None:
        """llamaswap is exiting: a last SIGKILL to what is stuck, then stop watching."""
        for child in self.stuck:
            self._kill_group(child)
            self._cancel(child.check)
            child.check = None
            if child.exit is None:
                self.log.warn(
                    "model {model}: pid {pid} is still stuck as llamaswap exits",
                    model=self.id,
                    pid=child.pid,
                )

    def _stuck_changed(self, child: Child, gone: bool) -> None:
        self.events.publish(Stuck(self.id, child.pid, child.port, child.why, gone))

    def _release_port(self) -> None:
        if self.port is not None:
            self._ports.release(self.port)
        self.port = None

    @staticmethod
    def _cancel(timer: IDelayedCall | None) -> None:
        if timer is not None and timer.active():
            timer.cancel()
