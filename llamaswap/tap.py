"""``twistd llamaswap``: command-line options and the service tree.

This is the one module that touches the global reactor; everything below it gets
the reactor (or just the clock) passed in.
"""

from __future__ import annotations

import ipaddress
from functools import partial
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from .activity import ActivityStore, Retention
from .api import Api
from .config import Config, ConfigError, ModelConfig, listen_address, load_config
from .events import EventBus
from .guard import ApiSite, Guard
from .logs import LogHub, logger, set_log_level
from .metrics import ChildMetrics, Metrics
from .ports import PortAllocator
from .process import HealthProbe, ModelProcess, Timing
from .recorder import Recorder
from .relay import Hop, LoopGuard, Relay
from .reload import ConfigReloader
from .resources import MemoryMonitor
from .scheduler import Scheduler
from .upstream import UpstreamEndpoints

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
_log = logger("llamaswap.tap")


class Options(usage.Options):
    """``twistd llamaswap --config FILE [--listen ENDPOINT ...]``"""

    synopsis = "--config FILE [--listen ENDPOINT ...]"
    longdesc = (
        "Serve one OpenAI-compatible endpoint for many models, starting each model's "
        "server on demand and stopping whatever stands in its way."
    )
    optParameters = [["config", "c", None, "YAML configuration file (required)."]]
    optFlags = [
        [
            "watch-config",
            None,
            "Reload the configuration when the file changes (SIGHUP always does).",
        ]
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint to serve on (repeatable) [default: tcp:8080:interface=127.0.0.1]"""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        try:
            self["config_obj"] = load_config(self["config"], self["listen"])
        except ConfigError as e:
            raise usage.UsageError(f"invalid configuration: {e}") from e


def http_probe(agent: IAgent, clock: IReactorTime, hop: Hop, timeout: float = 2.0) -> HealthProbe:
    """A health probe: GET the URL, fire with the status code.

    It carries ``hop``'s mark, so llamaswap's own ``/health`` (a proxy URL leading
    back to llamaswap) answers 508, never the 200 that would pass for the child's.
    """

    def probe(url: str) -> Deferred[int]:
        async def get() -> int:
            headers = Headers()
            hop.mark(headers)
            response: IResponse = await agent.request(b"GET", url.encode("ascii"), headers)
            finished: Deferred[None] = Deferred()
            response.deliverBody(_Discard(finished))
            await finished
            return int(response.code)

        return Deferred.fromCoroutine(get()).addTimeout(timeout, clock)

    return probe


class _Discard(Protocol):
    """Reads a health answer's body to its end so the connection can be reused."""

    def __init__(self, finished: Deferred[None]) -> None:
        self.finished = finished

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.finished.callback(None)


class Supervisor(Service):
    """Owns the children's lifetime: ``stopService`` fires once every child has exited."""

    log = logger()

    def __init__(
        self,
        scheduler: Scheduler,
        pool: HTTPConnectionPool,
        logs: LogHub,
        store: ActivityStore,
        reactor: Any = None,
    ) -> None:
        self.reactor = reactor
        self.scheduler = scheduler
        self.pool = pool
        self.observer = logs.observer()
        self.store = store
        self.memory = MemoryMonitor(
            reactor,
            lambda: {
                model_id: process.pid
                for model_id, process in scheduler.processes.items()
                if process.pid is not None
            },
            scheduler.footprint,
        )

    def startService(self) -> None:
        globalLogPublisher.addObserver(self.observer)
        super().startService()
        self.store.start()
        self.memory.start()
        if self.scheduler.config.preload:
            preloading = Deferred.fromCoroutine(self.preload(self.scheduler.config.preload))
            preloading.addErrback(lambda f: self.log.failure("preload failed", f))

    async def preload(self, model_ids: tuple[str, ...]) -> None:
        """``hooks.on_startup.preload``: start these in order, in the background."""
        for model_id in model_ids:
            if not self.running:
                return
            self.log.info("preloading {model}", model=model_id)
            try:
                await self.scheduler.load(model_id)
            except Exception as e:  # one failed preload must not stop the others
                self.log.error("preloading {model} failed: {error}", model=model_id, error=e)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.memory.stop()
        closing = self.scheduler.close(self.scheduler.config.shutdown_timeout)
        stopped = DeferredList(
            [closing.addCallback(lambda _: self.store.stop()), self.pool.closeCachedConnections()],
            consumeErrors=True,
        )

        def done(_: object) -> None:
            self.log.info("all model servers stopped")
            globalLogPublisher.removeObserver(self.observer)
            # Everything was shut down as asked: exit 0 (twistd would otherwise
            # re-raise the SIGTERM/SIGINT that started this, for an exit by signal)
            if getattr(self.reactor, "_exitSignal", None) is not None:
                self.reactor._exitSignal = None

        return stopped.addCallback(done)


class Listeners(MultiService):
    """The HTTP listeners; a port that cannot be bound stops startup with one clear line."""

    log = logger()

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            where = f"{e.interface or '*'}:{e.port}"
            self.log.critical(
                "cannot listen on {where}: {error}; is another server using it? "
                "Pick another with --listen.",
                where=where,
                error=e.socketError,
            )
            raise SystemExit(1) from e


def build(config: Config, reactor: Any, listen: list[str] | None = None) -> MultiService:
    """The service tree for ``config``; ``listen`` endpoints get an HTTP site each."""
    set_log_level(config.log_level)
    logs = LogHub()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 16
    # below llama-server's 5 s keep-alive, so an idle connection is dropped by us first
    pool.cachedConnectionTimeout = 3
    endpoints = UpstreamEndpoints(reactor, connect_timeout=10)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    ports = PortAllocator(config.start_port)
    fresh = HTTPConnectionPool(reactor, persistent=False)
    relay = Relay(agent, streams=Agent.usingEndpointFactory(reactor, endpoints, pool=fresh))
    probe = http_probe(agent, reactor, relay.hop)
    events = EventBus()

    def make_process(model: ModelConfig, health_timeout: float) -> ModelProcess:
        return ModelProcess(
            model,
            reactor=reactor,
            clock=reactor,
            logs=logs,
            ports=ports,
            probe=probe,
            timing=Timing(health_timeout=health_timeout, stop_timeout=model.unload_timeout),
            events=events,
        )

    processes = [make_process(m, config.health_check_timeout) for m in config.models.values()]
    scheduler = Scheduler(processes, reactor, config, events)
    store = ActivityStore(
        config.store_path,
        reactor,
        Retention(config.store_max_rows, config.store_max_age_days),
    )
    metrics = Metrics(scheduler, events, ChildMetrics(scheduler, agent, reactor, relay.hop))
    recorder = Recorder(reactor, events, store, config.log_requests)
    api = Api(config, scheduler, relay, logs, reactor, recorder, metrics, events, store)

    top = MultiService()
    Supervisor(scheduler, pool, logs, store, reactor).setServiceParent(top)
    guard = Guard(api.resource(), config.api_keys)
    site = ApiSite(LoopGuard(guard, relay.hop), config.max_request_bytes, reactor=reactor)
    site.displayTracebacks = False
    if not config.api_keys:
        for endpoint in listen or []:
            if not _loopback_only(endpoint):
                _log.warn(
                    "SECURITY: listening on {endpoint} without apiKeys: anyone who can reach "
                    "this address can run models on this machine. Set apiKeys in the config.",
                    endpoint=endpoint,
                )
    listeners = Listeners()
    listeners.setServiceParent(top)
    for endpoint in listen or []:
        strports.service(endpoint, site, reactor=reactor).setServiceParent(listeners)

    def apply(new: Config) -> dict[str, list[str]]:
        """Switch every reader of the configuration to ``new``."""
        set_log_level(new.log_level)
        ports.start = new.start_port
        changes = scheduler.reconfigure(
            new, lambda model: make_process(model, new.health_check_timeout)
        )
        api.config = new
        recorder.log_requests = new.log_requests
        guard.keys = new.api_keys
        site.max_request_bytes = new.max_request_bytes
        if new.store_path != config.store_path:
            _log.warn("store.path changed: takes effect at the next restart")
        return changes

    top.api = api  # type: ignore[attr-defined]
    top.site = site  # type: ignore[attr-defined]
    top.apply = apply  # type: ignore[attr-defined]
    return top


def _loopback_only(endpoint: str) -> bool:
    """True for unix sockets and TCP endpoints bound to a loopback interface."""
    bound = listen_address(endpoint)
    if bound is None:
        return True
    interface = bound[0].strip("[]")
    if not interface:
        return False  # every address
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return interface == "localhost"


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    service = build(options["config_obj"], reactor, options["listen"])
    ConfigReloader(
        options["config"],
        service.apply,  # type: ignore[attr-defined]
        reactor,
        watch=bool(options["watch-config"]),
        loader=partial(load_config, listen=options["listen"]),
    ).setServiceParent(service)
    return service
