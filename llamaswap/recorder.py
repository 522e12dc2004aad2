"""One record per proxied request: timings, status, tokens; to the store, the bus, the log."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime

from .activity import ActivityStore
from .events import Activity, EventBus
from .lifecycle import ModelView
from .logs import logger
from .usage import ResponseMeter

if TYPE_CHECKING:
    from .config import Config


class Recorder:
    """Makes :class:`RequestRecord` objects and delivers the finished rows."""

    log = logger()

    def __init__(
        self,
        clock: IReactorTime,
        events: EventBus,
        store: ActivityStore | None = None,
        log_requests: bool = False,
    ) -> None:
        self.clock = clock
        self.events = events
        self.store = store
        self.log_requests = log_requests

    def follow(self, config: Config) -> None:
        """A reload: whether requests are logged (``logRequests``)."""
        self.log_requests = config.log_requests

    def begin(
        self,
        model: str,
        route: str,
        path: str,
        process: ModelView | None = None,
        key: str | None = None,
    ) -> RequestRecord:
        """``key``: the name of the API key the request came with (never the key)."""
        return RequestRecord(self, model, route, path, process, key)

    def deliver(self, row: dict[str, Any]) -> None:
        if self.store is not None:
            row = self.store.add(row)
        if self.log_requests:
            self.log.info(
                "{model} {path} {status} {duration_ms:.0f}ms (waited {queue_ms:.0f}ms) "
                "tokens {tokens_in}/{tokens_out}",
                **row,
            )
        self.events.publish(Activity(row))


class RequestRecord:
    """What happened to one request, from arrival to its last byte."""

    def __init__(
        self,
        recorder: Recorder,
        model: str,
        route: str,
        path: str,
        process: ModelView | None,
        key: str | None = None,
    ) -> None:
        self.recorder = recorder
        self.key = key
        self.model = model
        self.route = route
        self.path = path
        self.process = process
        self.meter = ResponseMeter()
        self.arrived = recorder.clock.seconds()
        self.leased_at: float | None = None
        self.status: int | None = None
        self.error: str | None = None

    def leased(self) -> None:
        self.leased_at = self.recorder.clock.seconds()

    def fail(self, status: int, message: str) -> None:
        if self.status is None:
            self.status, self.error = status, message

    def finish(self) -> None:
        now = self.recorder.clock.seconds()
        waited_until = self.leased_at if self.leased_at is not None else now
        usage = self.meter.result()
        status = self.status or self.meter.status or 0
        load_ms = 0.0
        if self.process is not None and self.process.ready_at is not None:
            started = self.process.started_at or self.arrived
            if self.arrived <= self.process.ready_at <= waited_until:
                load_ms = (self.process.ready_at - max(self.arrived, started)) * 1000
        self.recorder.deliver(
            {
                "time": self.arrived,
                "model": self.model,
                "key": self.key,
                "route": self.route,
                "path": self.path,
                "status": status,
                "duration_ms": round((now - self.arrived) * 1000, 3),
                "queue_ms": round((waited_until - self.arrived) * 1000, 3),
                "load_ms": round(load_ms, 3),
                "tokens_in": usage.tokens_in,
                "tokens_out": usage.tokens_out,
                "prompt_tps": usage.prompt_tps,
                "gen_tps": usage.gen_tps,
                "cache_n": usage.cache_n,
                "error": self.error or usage.error,
            }
        )
