"""In-memory stand-ins for the process reactor and for health checks.

``FakeProcessReactor`` records every ``spawnProcess`` call and hands back a
:class:`FakeProcess` that a test ends on purpose (or that ends itself on a signal),
so supervision logic runs against a ``Clock`` without real children.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import (
    ConnectionRefusedError,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IProcessProtocol, IProcessTransport, IReactorProcess
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

SIGNALS = {"TERM": 15, "KILL": 9, "INT": 2, "HUP": 1}


@implementer(IProcessTransport)
class FakeProcess:
    """One pretend child: remembers signals, exits when told (or on a signal)."""

    def __init__(
        self,
        reactor: FakeProcessReactor,
        protocol: IProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None,
        pid: int,
    ) -> None:
        self.reactor = reactor
        self.proto = protocol
        self.executable = executable
        self.args = list(args)
        self.env = dict(env or {})
        self.pid: int | None = pid
        self.signals: list[str] = []
        self.stdin: list[bytes] = []  # what was written to its stdin
        self.stdin_closed = False
        self.ignore_term = False
        self.unkillable = False  # even SIGKILL does not end it (a hung driver)
        self.closed_fds: set[int] = set()
        self.held: Failure | None = None  # exited, but a descendant holds the pipes

    @property
    def ended(self) -> bool:
        return self.pid is None

    def say(self, line: str, fd: int = 2) -> None:
        """The child prints a line."""
        self.proto.childDataReceived(fd, line.encode() + b"\n")

    def exit(
        self, code: int | None = 0, signal: int | None = None, holding_pipes: bool = False
    ) -> None:
        """The child ends: ``code`` 0 is a clean exit, ``signal`` means it was killed.

        With ``holding_pipes``, something it started keeps its output open: only
        ``processExited`` comes, ``processEnded`` waits for :meth:`release_pipes`
        (or for llamaswap to close its ends).
        """
        if self.pid is None:
            raise ProcessExitedAlready()
        self.pid = None
        reason: Failure
        if code == 0 and signal is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(code if signal is None else None, signal))
        self.proto.processExited(reason)
        if holding_pipes:
            self.held = reason
        else:
            self.proto.processEnded(reason)

    def release_pipes(self) -> None:
        """Whatever held the pipes lets go (or our ends were closed): ``processEnded``."""
        reason, self.held = self.held, None
        if reason is not None:
            self.proto.processEnded(reason)

    # IProcessTransport

    def signalProcess(self, signalID: str | int) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        if isinstance(signalID, int):  # as Twisted's transports take them too
            signalID = signal.Signals(signalID).name.removeprefix("SIG")
        name = str(signalID)
        if name == "CONT":  # a fake process is never stopped: nothing to continue
            return
        self.signals.append(name)
        if self.unkillable:
            return
        if name == "KILL" or (name == "TERM" and not self.ignore_term):
            self.exit(None, SIGNALS[name])

    def closeStdin(self) -> None:
        self.stdin_closed = True
        self.closeChildFD(0)

    def closeStdout(self) -> None:
        self.closeChildFD(1)

    def closeStderr(self) -> None:
        self.closeChildFD(2)

    def closeChildFD(self, descriptor: int) -> None:
        self.closed_fds.add(descriptor)
        if {0, 1, 2} <= self.closed_fds and self.held is not None:
            # like Twisted: the readers notice their closed ends on the next turn
            self.reactor.callLater(0, self.release_pipes)

    def writeToChild(self, childFD: int, data: bytes) -> None:
        if childFD == 0:
            self.write(data)

    def loseConnection(self) -> None:
        for fd in (0, 1, 2):
            self.closeChildFD(fd)

    def write(self, data: bytes) -> None:
        if not self.stdin_closed:
            self.stdin.append(data)

    def writeSequence(self, data: Any) -> None:
        pass

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None


@implementer(IReactorProcess)
class FakeProcessReactor(Clock):
    """A ``Clock`` that also "spawns" :class:`FakeProcess` children."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []
        self.spawn_error: OSError | None = None
        self._next_pid = 1000

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[Any, Any] | None = None,
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> FakeProcess:
        if self.spawn_error is not None:
            raise self.spawn_error
        self._next_pid += 1
        process = FakeProcess(
            self,
            processProtocol,
            str(executable),
            [str(a) for a in args],
            {str(k): str(v) for k, v in (env or {}).items()},
            self._next_pid,
        )
        self.spawned.append(process)
        processProtocol.makeConnection(process)
        return process

    def running(self) -> list[FakeProcess]:
        return [p for p in self.spawned if not p.ended]


@attrs.define
class FakeHealth:
    """Health answers by URL prefix: tests flip a model to ready by setting 200."""

    status: dict[str, int] = attrs.field(factory=dict)
    probes: list[str] = attrs.field(factory=list)

    def __call__(self, url: str) -> Deferred[int]:
        self.probes.append(url)
        for prefix, code in self.status.items():
            if url.startswith(prefix):
                return succeed(code)
        return fail(ConnectionRefusedError("nothing listens"))
