"""A periodic task that survives its own errors.

A plain ``LoopingCall`` stops for good the first time its function raises, so one
bad moment (``EMFILE`` while the machine is out of file descriptors, a vanished
``/proc`` entry) would silently end memory sampling or the config watch for the
rest of the process's life.  ``Periodic`` keeps calling, and says so once: one log
line when the task starts failing, one when it works again.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from .logs import logger


class Periodic:
    """Calls ``task`` every ``interval`` seconds until stopped, whatever it raises."""

    log = logger()

    def __init__(
        self, what: str, task: Callable[[], object], clock: IReactorTime, interval: float
    ) -> None:
        self.what = what
        self.task = task
        self.interval = interval
        self.failing = False
        self._loop = LoopingCall(self._run)
        self._loop.clock = clock

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def start(self, now: bool = False) -> None:
        self._loop.start(self.interval, now=now).addErrback(
            lambda f: self.log.failure("{what} stopped", f, what=self.what)
        )

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _run(self) -> Deferred[None]:
        # a Deferred result is waited for (no overlapping runs), its failure absorbed
        return maybeDeferred(self.task).addCallbacks(self._worked, self._failed)

    def _worked(self, _: object) -> None:
        if self.failing:
            self.failing = False
            self.log.info("{what} works again", what=self.what)

    def _failed(self, failure: Failure) -> None:
        if not self.failing:
            self.failing = True
            self.log.failure(
                "{what} failed; retrying every {interval}s (said once until it recovers)",
                failure,
                what=self.what,
                interval=self.interval,
            )
