"""Configuration reload without downtime: on SIGHUP, and when the file changes.

The new file is read (off the reactor thread) and validated first; if it is bad,
the error is logged and the old configuration keeps serving.  A file that parses
but no longer writes out a security setting the running one has (``apiKeys``
missing: a file caught mid-write, or a slip) is refused too: security is only
weakened when the file says so.  Otherwise every part that reads the configuration
adopts the new one (see :meth:`Scheduler.reconfigure`), and each changed security
setting is logged at warning level.

``--watch-config`` applies a change only once the file has stopped changing (the
same size, mtime and inode at two polls in a row), so a half-written file is
never read; a file that changes while it is being read is read again later.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Collection
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from .access import ApiKey
from .config import Config, ConfigError, load_config
from .logs import logger
from .periodic import Periodic

Apply = Callable[[Config], dict[str, list[str]]]
Stamp = tuple[int, int, int]


@attrs.frozen
class SecuritySetting:
    """A top-level setting whose change matters to who can reach what."""

    key: str  # as written in the file
    read: Callable[[Config], object]
    secret: bool = False  # a collection of secrets: changes are counted, never shown


# Every setting here is logged at warning level when a reload changes it, and a
# reload that would change it only by leaving it out of the file is refused.
SECURITY_SETTINGS: tuple[SecuritySetting, ...] = (
    SecuritySetting("apiKeys", lambda c: c.api_keys, secret=True),
    SecuritySetting("maxRequestBytes", lambda c: c.max_request_bytes),
    SecuritySetting("connections", lambda c: c.connections),
    SecuritySetting("peers", lambda c: {p.id: p.proxy for p in c.peers.values()}),
    SecuritySetting("allowedHosts", lambda c: c.allowed_hosts),
    SecuritySetting("cors", lambda c: c.cors),
    # per model (never "left out" of a file: off is their default and the safe side)
    SecuritySetting(
        "models.*.trustedPages",
        lambda c: sorted(m.id for m in c.models.values() if m.trusted_pages),
    ),
    SecuritySetting(
        "models.*.forwardAuthorization",
        lambda c: sorted(m.id for m in c.models.values() if m.forward_authorization),
    ),
)


# A scoped key's limits: one left out falls back to its widest default (every
# model, no limit), so a file cut inside a key's entry would lift it.
KEY_LIMITS: tuple[tuple[str, Callable[[ApiKey], object]], ...] = (
    ("models", lambda k: k.models),
    ("maxConcurrent", lambda k: k.max_concurrent),
    ("requestsPerMinute", lambda k: k.requests_per_minute),
)


def dropped_silently(old: Config, new: Config) -> list[str]:
    """Security settings ``old`` writes out that ``new`` changes by leaving them out,
    a scoped key's limits included, and keys cut short (a file cut inside a key).

    Only the end of a file can be cut: a key ``new`` writes whole (not its last
    entry, see the loader's ``Config.written``) is taken as written."""
    dropped = [
        s.key
        for s in SECURITY_SETTINGS
        if s.key in old.written and s.key not in new.written and s.read(old) != s.read(new)
    ]
    kept = {key.name: key for key in new.api_keys}
    old_keys = {key.key for key in old.api_keys}
    new_keys = {key.key for key in new.api_keys}
    for key in old.api_keys:
        after = kept.get(key.name)
        if after is not None and f"apiKeys[{after.name}]" not in new.written:
            for field, read in KEY_LIMITS:
                # left out of ``new`` (a default) yet changed: ``old`` wrote it
                mark = f"apiKeys[{key.name}].{field}"
                if read(key) != read(after) and mark not in new.written:
                    dropped.append(mark)
        if key.key not in new_keys and any(
            new_key.key not in old_keys
            and f"apiKeys[{new_key.name}]" not in new.written
            and key.key.startswith(new_key.key)
            for new_key in new.api_keys
        ):
            dropped.append(f"the whole key of {key.name}")  # never the key itself
    return dropped


def security_changes(old: Config, new: Config) -> list[str]:
    """One line per changed security setting, secrets counted, never shown."""
    lines = []
    for setting in SECURITY_SETTINGS:
        before, after = setting.read(old), setting.read(new)
        if before == after:
            continue
        if setting.secret:
            assert isinstance(before, Collection) and isinstance(after, Collection)
            lines.append(_count_change(setting.key, set(before), set(after)))
        else:
            lines.append(f"{setting.key}: {before!r} -> {after!r}")
    return lines


def _count_change(key: str, before: set[Any], after: set[Any]) -> str:
    added, removed = after - before, before - after
    line = f"{key}: {len(added)} added, {len(removed)} removed ({len(before)} -> {len(after)})"
    # keys have names (never the key itself in a log): say whose access changed
    for what, entries in (("removed", removed), ("added", added)):
        names = sorted(str(e.name) for e in entries if hasattr(e, "name"))
        if names:
            line += f"; {what}: {', '.join(names)}"
    if before and not after:
        line += "; authentication is now OFF: anyone who can connect can use every route"
    return line


class ConfigReloader(Service):
    """Owns the watch loop and the SIGHUP handler; ``apply`` does the switching, and
    ``current`` reads the configuration in use from its owner (no copy kept here)."""

    log = logger()

    def __init__(
        self,
        path: str,
        apply: Apply,
        reactor: Any,
        current: Callable[[], Config],
        watch: bool = False,
        watch_interval: float = 2.0,
        on_signal: bool = True,
        loader: Callable[[str], Config] = load_config,
    ) -> None:
        self.path = path
        self.apply = apply
        self.reactor = reactor
        self.current = current
        self.watch = watch
        self.on_signal = on_signal
        self.loader = loader
        self._seen = self._stamp()  # the file as last read
        self._settling: Stamp | None = None  # a change seen once, not yet stable
        self._loop = Periodic("config watch", self._check, reactor, watch_interval)
        self._interval = watch_interval
        self._running: Deferred[bool] | None = None
        self._again = False
        self._stopped = False  # a file read when the service stopped is not applied
        self._previous_handler: Any = None

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        if self.watch:
            self._loop.start()
        if self.on_signal:
            self._previous_handler = signal.signal(signal.SIGHUP, self._sighup)

    def stopService(self) -> None:
        super().stopService()
        self._stopped = True
        self._loop.stop()
        if self.on_signal and self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)

    def described(self) -> str:
        """What is read, for a log line."""
        return self.path

    def _sighup(self, signum: int, frame: Any) -> None:
        self.log.info("SIGHUP: reloading {path}", path=self.described())
        self.reactor.callFromThread(self.reload)

    def _stamp(self) -> Stamp | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size, info.st_ino

    def _check(self) -> object:
        """One poll of the watch (may return a Deferred: the loop waits for it)."""
        self._compare(self._stamp())
        return None

    def _compare(self, stamp: Any) -> None:
        if stamp is None or stamp == self._seen:
            self._settling = None
            return
        if stamp != self._settling:
            self._settling = stamp  # still being written, perhaps: look again next time
            return
        self._settling = None
        self._seen = stamp
        self.log.info("{path} changed: reloading", path=self.described())
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

    def _refused(self, error: ConfigError) -> None:
        """Say why a reload is refused: each problem of the file as an event of its own,
        so each is one line (in /logs and in twistd's log alike) that says it refused
        the reload, found by grepping for that, and counted to tell one reload's."""
        problems = error.problems
        if len(problems) == 1:
            self.log.error("reload refused, the running configuration stays: {error}", error=error)
            return
        for index, problem in enumerate(problems, 1):
            self.log.error(
                "reload refused (problem {index} of {count}), the running configuration "
                "stays: {error}",
                index=index,
                count=len(problems),
                error=problem,
            )

    def _read(self) -> tuple[Config, bool]:
        """In a thread: the parsed file, and whether it stayed the same while read."""
        before = self._stamp()
        config = self.loader(self.path)
        return config, before == self._stamp()

    async def _reload(self) -> bool:
        try:
            config, steady = await deferToThread(self._read)
        except ConfigError as e:
            self._refused(e)
            return False
        except Exception:
            self.log.failure("reload failed, the running configuration stays")
            return False
        if self._stopped:  # the service it would change is gone, its locks released
            self.log.info("reload dropped: llamaswap stopped while {path} was read", path=self.path)
            return False
        if not steady:
            self.log.info(
                "{path} changed while being read: reading it again", path=self.described()
            )
            if not self.watch:  # the watcher sees the change and reads it once settled
                self.reactor.callLater(self._interval, self.reload)
            return False
        running = self.current()
        dropped = dropped_silently(running, config)
        if dropped:
            self.log.error(
                "reload refused, the running configuration stays: {path} no longer sets "
                "{keys} (caught mid-write?). To change them, write them out, e.g. "
                "'apiKeys: []' to turn authentication off; a key's \"models: ['*']\" "
                "or 'maxConcurrent: null' above the last line of its entry.",
                path=self.path,
                keys=", ".join(dropped),
            )
            return False
        warnings = security_changes(running, config)
        try:
            changes = self.apply(config)
        except ConfigError as e:  # what only applying can find (a state directory in use)
            self._refused(e)
            return False
        except Exception:
            self.log.failure("reload failed while applying it")
            return False
        for line in warnings:
            self.log.warn("SECURITY: reload changed {change}", change=line)
        self.log.info(
            "configuration reloaded: {summary}",
            summary="; ".join(f"{kind} {', '.join(ids)}" for kind, ids in changes.items() if ids)
            or "nothing changed",
        )
        return True
