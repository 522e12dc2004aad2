"""``twistd llamaswap``: command-line options and the service tree.

This is the one module that touches the global reactor; everything below it gets
the reactor (or just the clock) passed in.
"""

from __future__ import annotations

import gc
import ipaddress
import re
from collections.abc import Callable
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from .access import Access
from .activity import ActivityStore, Retention, StoreMetrics
from .api import Api
from .childhttp import ChildAgent, Pool, StandardAgent
from .config import Config, ConfigError, ModelConfig, listen_address, load_config
from .config.live import Changes, LiveConfig
from .connections import ConnectionGate, raise_file_limit
from .events import Activity, EventBus
from .guard import ApiSite, Guard, is_open_page
from .kvcache import DiskRunner, KvStore
from .lifecycle import ModelState
from .livefolder import FolderReloader
from .logs import LogHub, logger, set_log_level
from .metrics import ChildMetrics, Metrics
from .origin import BrowserDoor, BrowserPolicy, machine_names
from .ports import PortAllocator
from .process import HealthProbe, ModelProcess, Timing
from .recorder import Recorder
from .relay import Hop, Relay
from .resources import MemoryMonitor
from .scheduler import Scheduler
from .statelock import StateLocks, StateRefused
from .twisted_compat import forget_exit_signal
from .upstream import UpstreamEndpoints, server_of

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
_log = logger("llamaswap.tap")


class Options(usage.Options):
    """``twistd llamaswap [--config FILE] [--models-dir DIR ...] [--listen ENDPOINT ...]``"""

    synopsis = "[--config FILE] [--models-dir DIR ...] [--listen ENDPOINT ...]"
    longdesc = (
        "Serve one OpenAI-compatible endpoint for many models, starting each model's "
        "server on demand and stopping whatever stands in its way."
    )
    optParameters = [
        ["config", "c", None, "YAML configuration file (needed unless --models-dir is given)."]
    ]
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
        self["models-dir"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint to serve on (repeatable) [default: tcp:8080:interface=127.0.0.1]"""
        self["listen"].append(endpoint)

    def opt_models_dir(self, folder: str) -> None:
        """Serve every GGUF file in this folder as a model (repeatable)"""
        self["models-dir"].append(folder)

    def postOptions(self) -> None:
        if not self["config"] and not self["models-dir"]:
            raise usage.UsageError("give --config FILE, --models-dir DIR, or both")
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for endpoint in self["listen"]:
            check_listen(endpoint)
        try:
            self["config_obj"] = self.load(self["config"])
        except ConfigError as e:
            raise InvalidConfig(f"llamaswap: invalid configuration: {e}") from e
        log_notices(self["config_obj"])

    def load(self, path: str | None) -> Config:
        """The configuration file (if any) and the models folders, as one Config."""
        return load_config(path, self["listen"], self["models-dir"])


def check_listen(endpoint: str) -> None:
    """A ``--listen`` value that is no endpoint string gets a usage error that shows
    one, not the traceback of twistd's parser (nothing is bound here)."""
    from twisted.internet import reactor

    try:
        serverFromString(reactor, endpoint)
    except (ValueError, TypeError, KeyError) as e:
        meant = _meant_endpoint(endpoint)
        if meant is not None:
            hint = f"did you mean --listen {meant}?"
        else:
            hint = (
                "write e.g. --listen tcp:8080:interface=127.0.0.1 (tcp:8080: every "
                "interface; unix:/path: a socket)"
            )
        raise usage.UsageError(
            f"--listen {endpoint!r} is not a Twisted endpoint string ({e}); {hint}"
        ) from e
    except Exception as e:  # the parser reads files (ssl: keys) and lists (systemd:)
        raise usage.UsageError(
            f"--listen {endpoint!r} cannot be used: {type(e).__name__}: {e}"
        ) from e


def tcp_endpoint(port: int | str, interface: str) -> str:
    """The TCP endpoint string for ``port`` on ``interface`` (every one when empty);
    an IPv6 address's colons escaped, as Twisted's parser needs."""
    escaped = interface.replace(":", "\\:")
    return f"tcp:{port}:interface={escaped}" if interface else f"tcp:{port}"


def _meant_endpoint(endpoint: str) -> str | None:
    """The endpoint string of ``[host:]port`` (an address or name), else None."""
    host, _, port = endpoint.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not port.isdecimal() or not port.isascii():
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host and not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            return None
    return tcp_endpoint(port, host or "127.0.0.1")


class InvalidConfig(SystemExit):
    """The configuration cannot be used: twistd exits with this message (status 1).

    Not a ``UsageError``: twistd prints the whole option help before one of those,
    and what is wrong is in the file, not on the command line."""


def log_notices(config: Config) -> None:
    """Say what a models folder scan skipped, and which models it found."""
    for notice in config.notices:
        _log.warn("{notice}", notice=notice)
    if config.models_dirs:
        found = sorted(m.id for m in config.models.values() if "files" in m.gguf)
        _log.info(
            "models folders {folders}: {count} model(s): {ids}",
            folders=", ".join(config.models_dirs),
            count=len(found),
            ids=", ".join(found) or "none yet",
        )


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
        pool: Pool,
        logs: LogHub,
        store: ActivityStore,
        endpoints: UpstreamEndpoints,
        reactor: Any = None,
    ) -> None:
        self.reactor = reactor
        self.scheduler = scheduler
        self.pool = pool
        self.endpoints = endpoints
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
            [closing.addCallback(lambda _: self.store.stop())], consumeErrors=True
        )
        # after the models stopped: the KV store talks to them until then
        stopped.addCallback(lambda _: self.pool.closeCachedConnections())
        stopped.addCallback(lambda _: self.endpoints.close_spares())

        def done(_: object) -> None:
            self.log.info("all model servers stopped")
            globalLogPublisher.removeObserver(self.observer)
            # Everything was shut down as asked: exit 0 (twistd would otherwise
            # re-raise the SIGTERM/SIGINT that started this, for an exit by signal)
            forget_exit_signal(self.reactor)

        return stopped.addCallback(done)


def another_listen(interface: str, port: object) -> str:
    """A ``--listen`` to try instead of a taken ``port`` on ``interface``: the next
    port, the one below for the last one (65535), 8081 when the taken one is not
    known; an IPv6 interface's colons escaped, as the endpoint string needs them."""
    if isinstance(port, int) and 0 < port < 65535:
        other = port + 1
    else:
        other = 65534 if port == 65535 else 8081
    return tcp_endpoint(other, interface)


class Listeners(MultiService):
    """The HTTP listeners; a port that cannot be bound stops startup with one clear line."""

    log = logger()

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            where = f"{e.interface or '*'}:{e.port}"
            other = another_listen(e.interface, e.port)
            self.log.critical(
                "cannot listen on {where}: {error}; is another server using it? "
                "Stop it, or pick another port (--listen {other}; make run: LISTEN={other}).",
                where=where,
                error=e.socketError,
                other=other,
            )
            raise SystemExit(1) from e


class LlamaswapService(MultiService):
    """The service tree of one llamaswap, and the parts a reload or a test reaches."""

    def __init__(
        self,
        api: Api,
        access: Access,
        site: ApiSite,
        gate: ConnectionGate,
        store: ActivityStore,
        live: LiveConfig,
    ) -> None:
        super().__init__()
        self.api = api
        self.access = access
        self.site = site
        self.gate = gate
        self.store = store
        #: the configuration in use; every reader follows it
        self.live = live
        #: the state directories this daemon holds (``makeService``; None in tests)
        self.locks: StateLocks | None = None

    def startService(self) -> None:
        if self.locks is not None:
            self.locks.write_pids()  # twistd may have forked into the background
        super().startService()

    def stopService(self) -> Deferred[Any]:
        stopped: Deferred[Any] = super().stopService()
        locks = self.locks
        if locks is None:
            return stopped

        def release(result: object) -> object:
            locks.release_all()  # once nothing writes the state any more
            return result

        return stopped.addBoth(release)

    def apply(self, new: Config) -> Changes:
        """Switch every reader of the configuration to ``new`` (already validated)."""
        return self.live.replace(new)


def in_thread(reactor: Any) -> DiskRunner[Any]:
    """Disk work off the reactor: the KV store's (unlinking 100 MB files), a models
    folder's stamp (a ``stat`` per file)."""

    def run(work: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    return run


def build(config: Config, reactor: Any, listen: list[str] | None = None) -> LlamaswapService:
    """The service tree for ``config``; ``listen`` endpoints get an HTTP site each."""
    live = LiveConfig(config)
    set_log_level(config.log_level)
    live.subscribe(lambda new: set_log_level(new.log_level))
    logs = LogHub()
    endpoints = UpstreamEndpoints(reactor, connect_timeout=10)
    # children and peers (http, https) through the lean client; Twisted's agent only
    # for a URL it does not take (user info); both keep connections alike, idle ones
    # closed below llama-server's 5 s keep-alive, so an idle connection is dropped by
    # us first; up to 64 per server, as many as a busy peer's clients use at once (a
    # child's threads are not held by them: see childhttp._Server.overdue)
    standard = StandardAgent(reactor, endpoints, idle_seconds=3, max_idle=64)
    agent = ChildAgent(
        endpoints,
        reactor,
        standard,
        fallback_pool=standard,
        idle_seconds=standard.idle_seconds,
        max_idle=standard.max_idle,
    )
    ports = PortAllocator(config.start_port)
    live.subscribe(ports.follow)
    streams = ChildAgent(
        endpoints,
        reactor,
        StandardAgent(reactor, endpoints, persistent=False),
        persistent=False,
        same_servers_as=agent,
    )
    relay = Relay(agent, streams=streams)
    probe = http_probe(agent, reactor, relay.hop)
    events = EventBus()

    def close_connections(url: str) -> None:
        """A stop cuts what its server carries, unless another live model relays to
        that server too (models sharing one server; a reload's old and new process)."""
        server = server_of(url)
        shared = any(
            p.state in (ModelState.STARTING, ModelState.READY) and server_of(p.base_url) == server
            for p in (*scheduler.processes.values(), *scheduler.retiring())
        )
        endpoints.close_connections(url, cut=not shared)

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
            close_connections=close_connections,
            open_spare=endpoints.open_spare,
        )

    processes = [make_process(m, config.health_check_timeout) for m in config.models.values()]

    kvcache = KvStore(config, agent, reactor, disk=in_thread(reactor), hop=relay.hop)
    events.subscribe(kvcache.observe, (Activity,))
    live.subscribe(kvcache.reconfigure)
    scheduler = Scheduler(processes, reactor, config, events, kvcache)
    live.subscribe(
        lambda new: scheduler.reconfigure(
            new, lambda model: make_process(model, new.health_check_timeout)
        )
    )
    store = ActivityStore(
        config.store_path,
        reactor,
        Retention(config.store_max_rows, config.store_max_age_days),
    )
    live.subscribe(store.follow)
    metrics = Metrics(scheduler, events, ChildMetrics(scheduler, agent, reactor, relay.hop))
    metrics.registry.register(StoreMetrics(store))
    metrics.registry.register(kvcache.collector())
    recorder = Recorder(reactor, events, store, config.log_requests)
    live.subscribe(recorder.follow)
    access = Access(config.api_keys, reactor, config.session_ttl)
    live.subscribe(access.follow)
    api = Api(
        config,
        scheduler,
        relay,
        logs,
        reactor,
        events,
        recorder,
        metrics,
        store,
        kvcache,
        access=access,
    )
    live.subscribe(api.follow)

    children: list[IService] = [Supervisor(scheduler, agent, logs, store, endpoints, reactor)]
    # this machine's names and the --listen interfaces, once: no DNS, no blocking
    local_names = machine_names() | {i for i in map(_interface, listen or []) if i is not None}

    def browsers(config: Config) -> BrowserPolicy:
        for setting, values in (
            ("allowedHosts", config.allowed_hosts),
            ("cors.allowOrigins", config.cors.allow_origins),
        ):
            if "*" in values:
                _log.warn(
                    "SECURITY: {setting} contains '*': web pages on any site can use this "
                    "llamaswap through their visitors' browsers.",
                    setting=setting,
                )
        return BrowserPolicy.build(config.allowed_hosts, config.cors, local_names, is_open_page)

    guard = Guard(api.resource(), access)
    browser_door = BrowserDoor(browsers(config))

    def follow_browsers(new: Config) -> None:
        browser_door.policy = browsers(new)

    live.subscribe(follow_browsers)
    site = ApiSite(
        guard,
        config.max_request_bytes,
        # a looped request first, then what browsers may do, then the key
        checks=[relay.hop.check, browser_door, guard.check],
        reactor=reactor,
    )
    site.displayTracebacks = False
    live.subscribe(site.follow)
    gate = ConnectionGate(site, config.connections, reactor, api.awaited)
    live.subscribe(gate.follow)
    if not config.api_keys:
        for endpoint in listen or []:
            if not _loopback_only(endpoint):
                _log.warn(
                    "SECURITY: listening on {endpoint} without apiKeys: anyone who can reach "
                    "this address can run models on this machine. Set apiKeys in the config.",
                    endpoint=endpoint,
                )
    listeners = Listeners()
    children.append(listeners)
    for endpoint in listen or []:
        strports.service(endpoint, gate, reactor=reactor).setServiceParent(listeners)

    top = LlamaswapService(api, access, site, gate, store, live)
    for child in children:
        child.setServiceParent(top)
    return top


def _interface(endpoint: str) -> str | None:
    """The interface a TCP endpoint string binds; None for every address or not TCP."""
    bound = listen_address(endpoint)
    if bound is None:
        return None
    return bound[0].strip("[]").lower() or None


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


def settle_heap() -> None:
    """Take what start-up built (modules, config, the service tree: ~500k objects) out
    of the garbage collector's way: every full collection would walk it again,
    stopping the reactor for 30-170 ms at a time in a long-running daemon.  Then hand
    the memory start-up used and freed back to the system (glibc keeps it otherwise:
    ~0.7 MiB of an idle daemon's RSS)."""
    gc.collect()
    gc.freeze()
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    locks = StateLocks()
    try:
        locks.take(options["config_obj"], pin_store=True)
    except StateRefused as e:
        raise InvalidConfig(f"llamaswap: {e}") from e
    raise_file_limit()  # before build(): the connection caps are derived from it
    service = build(options["config_obj"], reactor, options["listen"])
    service.locks = locks
    reactor.callWhenRunning(settle_heap)
    apply = service.apply

    def adopt(new: Config) -> dict[str, list[str]]:
        locks.take(new)  # StateRefused, a ConfigError: the reload is refused
        log_notices(new)
        try:
            changes: dict[str, list[str]] = apply(new)
        except Exception:
            locks.keep_only(service.live.current)
            raise
        locks.keep_only(new)  # what the reload moved away from
        return changes

    FolderReloader(
        lambda: service.live.current.models_dirs,
        options["config"],
        adopt,
        reactor,
        lambda: service.live.current,
        watch=bool(options["watch-config"]),
        loader=options.load,
        disk=in_thread(reactor),
    ).setServiceParent(service)
    return service
