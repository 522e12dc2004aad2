"""Configuration reload without downtime: on SIGHUP, and when the file changes.

The new file is read (off the reactor thread) and validated first; if it is bad,
the error is logged and the old configuration keeps serving.  Otherwise every part
that reads the configuration adopts the new one, and the scheduler keeps running
whatever did not change (see :meth:`Scheduler.reconfigure`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from .config import Config, ConfigError, load_config
from .logs import logger
from .periodic import Periodic

Apply = Callable[[Config], dict[str, list[str]]]


class ConfigReloader(Service):
    """Owns the watch loop and the SIGHUP handler; ``apply`` does the switching."""

    log = logger()

    def __init__(
        self,
        path: str,
        apply: Apply,
        reactor: Any,
        watch: bool = False,
        watch_interval: float = 2.0,
        on_signal: bool = True,
        loader: Callable[[str], Config] = load_config,
    ) -> None:
        self.path = path
        self.apply = apply
        self.reactor = reactor
        self.watch = watch
        self.on_signal = on_signal
        self.loader = loader
        self._seen = self._stamp()
        self._loop = Periodic("config watch", self._check, reactor, watch_interval)
        self._running: Deferred[bool] | None = None
        self._again = False
        self._previous_handler: Any = None

    def startService(self) -> None:
        super().startService()
        if self.watch:
            self._loop.start()
        if self.on_signal:
            self._previous_handler = signal.signal(signal.SIGHUP, self._sighup)

    def stopService(self) -> None:
        super().stopService()
        self._loop.stop()
        if self.on_signal and self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)

    def _sighup(self, signum: int, frame: Any) -> None:
        self.log.info("SIGHUP: reloading {path}", path=self.path)
        self.reactor.callFromThread(self.reload)

    def _stamp(self) -> tuple[float, int] | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_mtime, info.st_size

    def _check(self) -> None:
        stamp = self._stamp()
        if stamp is not None and stamp != self._seen:
            self._seen = stamp
            self.log.info("{path} changed: reloading", path=self.path)
            self.reload()

    def reload(self) -> Deferred[bool]:
        """Load, validate and apply; fires True if the new configuration is in use.

        Overlapping requests are coalesced: one more reload runs after the current.
        """
        if self._running is not None:
            self._again = True
            return self._running
        self._running = Deferred.fromCoroutine(self._reload())

        def finished(result: bool) -> bool:
            self._running = None
            if self._again:
                self._again = False
                self.reload()
            return result

        return self._running.addCallback(finished)

    async def _reload(self) -> bool:
        try:
            config: Config = await deferToThread(self.loader, self.path)
        except ConfigError as e:
            self.log.error("reload refused, the running configuration stays: {error}", error=e)
            return False
        except Exception:
            self.log.failure("reload failed, the running configuration stays")
            return False
        changes = self.apply(config)
        self.log.info(
            "configuration reloaded: {summary}",
            summary="; ".join(f"{kind} {', '.join(ids)}" for kind, ids in changes.items() if ids)
            or "nothing changed",
        )
        return True
