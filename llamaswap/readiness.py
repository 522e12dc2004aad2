"""How llamaswap learns that a starting child is ready, and how far its load got.

:class:`~llamaswap.process.ModelProcess` owns the state machine; while a child
starts it hands each output line to a *watch* and waits to be told "ready".  A
llama-server says so itself (:class:`llamaswap.childproto.ProtocolWatch`); any other
server is asked over HTTP (:class:`HealthWatch`); with ``checkEndpoint: none`` it is
ready at once (:class:`ReadyAtOnce`).  A watch lives for one start of one child and
is cancelled as soon as that child is no longer starting.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

HealthProbe = Callable[[str], "Deferred[int]"]
"""GET a URL and fire with the HTTP status (or fail when nothing answers)."""

Ready = Callable[[], None]
Failed = Callable[[str], None]
"""The start cannot succeed: the cause, for the start error."""
Progress = Callable[[float, str | None], None]
"""Loading progress: a fraction (0..1) and the stage, if the child names one."""

LOOP_DETECTED = 508
"""What llamaswap's own door answers a request carrying its own ``Via`` mark: a
health check answered so reached llamaswap itself, never the child."""

PERCENT = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*%")


class Watch(Protocol):
    """What a starting child's state machine asks; one instance per start."""

    #: the child keeps stdin open, for the stop command
    talks: bool
    #: the child has spoken the protocol, so it reads that command
    heard: bool

    def begin(self) -> None:
        """The child has been spawned."""

    def line(self, stream: str, text: str) -> bool:
        """An output line; True when it is a message to llamaswap, not a log line."""

    def cancel(self) -> None:
        """The child is no longer starting: nothing may fire any more."""


class ReadyAtOnce:
    """``checkEndpoint: none``: ready as soon as it is spawned."""

    talks = heard = False

    def __init__(self, ready: Ready) -> None:
        self._ready = ready

    def begin(self) -> None:
        self._ready()

    def line(self, stream: str, text: str) -> bool:
        return False

    def cancel(self) -> None:
        pass


class HealthWatch:
    """Ask the health URL every ``interval``, and at once when the child prints a line.

    Servers log as they load, so a new line is the likely moment readiness arrives;
    one probe is in flight at a time, and a line during a probe asks for one more.
    A percentage in a line that speaks of loading is reported as progress.  A 508
    means the URL leads back to llamaswap (its own loop check answered): waiting
    longer cannot help, so the start fails at once.
    """

    talks = heard = False

    def __init__(
        self,
        *,
        clock: IReactorTime,
        probe: HealthProbe,
        url: Callable[[], str],
        interval: float,
        ready: Ready,
        progress: Progress,
        failed: Failed,
    ) -> None:
        self._clock = clock
        self._probe_url = probe
        self._url = url
        self._interval = interval
        self._ready = ready
        self._progress = progress
        self._failed = failed
        self._timer: IDelayedCall | None = None
        self._probing: Deferred[int] | None = None
        self._again = False
        self._done = False
        self._percent = -1.0

    def begin(self) -> None:
        self._schedule()

    def line(self, stream: str, text: str) -> bool:
        if self._done:
            return False
        match = PERCENT.search(text)
        if match is not None and "load" in text.lower():
            percent = min(float(match.group(1)), 100.0)
            if percent > self._percent:
                self._percent = percent
                self._progress(percent / 100, None)
        self.probe()
        return False

    def probe(self) -> None:
        if self._done:
            return
        if self._probing is not None:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._probing = self._probe_url(self._url())
        self._probing.addBoth(self._probed)

    def _probed(self, result: int | Failure) -> None:
        self._probing = None
        if self._done:
            return  # cancelled (a CancelledError lands here): swallowed
        if result == 200:
            self._done = True
            self._ready()
        elif result == LOOP_DETECTED:
            self._done = True
            self._failed(
                f"its health check {self._url()} answered 508 Loop Detected: the model's "
                "proxy URL leads back to llamaswap itself, not to the model's server"
            )
        elif self._again:
            self._again = False
            self.probe()
        else:
            self._schedule()

    def _schedule(self) -> None:
        if not self._done:
            self._timer = self._clock.callLater(self._interval, self.probe)

    def cancel(self) -> None:
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._probing is not None:
            self._probing.cancel()
