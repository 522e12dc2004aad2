"""Recent log history per source, and live subscribers.

Sources: ``proxy`` (llamaswap's own log events), ``upstream`` (every child's output)
and one per model.  Each keeps a bounded ring of lines so ``/logs`` can show what
happened before the reader arrived; subscribers get each new line as it is added
and are never waited for.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)
from zope.interface import implementer

PROXY = "proxy"
UPSTREAM = "upstream"
UPSTREAM_NAMESPACE = "llamaswap.upstream"

Subscriber = Callable[[str, str], None]
"""Called with (source, line) for each new line."""

# llamaswap's own loggers emit through this filter, so ``logLevel`` decides what
# reaches twistd's log and /logs without touching other libraries' events.
level_filter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
filtered_observer = FilteringLogObserver(globalLogPublisher, [level_filter])

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


def logger(namespace: str | None = None) -> Logger:
    """A ``Logger`` for a class attribute, subject to the configured ``logLevel``."""
    return Logger(namespace=namespace, observer=filtered_observer)


def set_log_level(name: str) -> None:
    """Apply the configured ``logLevel`` to llamaswap's own log events."""
    level_filter.defaultLogLevel = _LEVELS[name]


class LogRing:
    """The last lines of one source, bounded by total size."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lines: deque[str] = deque()
        self._size = 0

    def append(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line) + 1
        while self._size > self.max_bytes and self._lines:
            self._size -= len(self._lines.popleft()) + 1

    def lines(self) -> list[str]:
        return list(self._lines)


class LogHub:
    """Owner of every log ring and of the live subscribers."""

    def __init__(self, max_bytes: int = 100_000, clock: Callable[[], float] | None = None) -> None:
        self.max_bytes = max_bytes
        self._rings: dict[str, LogRing] = {}
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._clock = clock

    def ring(self, source: str) -> LogRing:
        ring = self._rings.get(source)
        if ring is None:
            ring = self._rings[source] = LogRing(self.max_bytes)
        return ring

    def history(self, source: str) -> list[str]:
        ring = self._rings.get(source)
        return ring.lines() if ring is not None else []

    def combined_history(self) -> list[str]:
        """Proxy and upstream lines, each in order (proxy first)."""
        return self.history(PROXY) + self.history(UPSTREAM)

    def add(self, source: str, line: str) -> None:
        self.ring(source).append(line)
        for subscriber in list(self._subscribers.get(source, ())):
            subscriber(source, line)

    def child_line(self, model_id: str, stream: str, line: str) -> None:
        """One line a child printed: kept under its model and under ``upstream``."""
        self.add(model_id, line)
        self.add(UPSTREAM, f"[{model_id}] {line}")

    def subscribe(self, sources: list[str], subscriber: Subscriber) -> Callable[[], None]:
        """Deliver new lines of ``sources``; returns the function that unsubscribes."""
        for source in sources:
            self._subscribers.setdefault(source, []).append(subscriber)

        def unsubscribe() -> None:
            for source in sources:
                subs = self._subscribers.get(source, [])
                if subscriber in subs:
                    subs.remove(subscriber)

        return unsubscribe

    def observer(self) -> ILogObserver:
        """A ``twisted.logger`` observer that records llamaswap's own events as ``proxy``."""
        return _ProxyLogObserver(self)


@implementer(ILogObserver)
class _ProxyLogObserver:
    def __init__(self, hub: LogHub) -> None:
        self.hub = hub

    def __call__(self, event: LogEvent) -> None:
        namespace = event.get("log_namespace", "")
        if not namespace.startswith("llamaswap") or namespace.startswith(UPSTREAM_NAMESPACE):
            return
        level = event.get("log_level", LogLevel.info)
        ours = getattr(event.get("log_logger"), "observer", None) is filtered_observer
        if not ours and level < LogLevel.warn and "log_failure" not in event:
            # Twisted's own chatter in llamaswap's subclasses ("Timing out client",
            # "HEAD request ... returning a message body"): a line per connection
            # or request, so strangers could flush the ring with it
            return
        when = datetime.fromtimestamp(event.get("log_time", 0), UTC).strftime("%H:%M:%S")
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        for line in text.splitlines() or [""]:
            self.hub.add(PROXY, f"{when} [{level.name.upper()}] {line}")
