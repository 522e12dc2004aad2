"""YAML configuration → immutable, validated objects.

Everything a running llamaswap needs to know about its models is decided here,
before any child starts: a bad file is reported with the file name, the key path
and the offending value, and nothing runs.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
import shlex
import socket
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml

from . import modelsdir
from .access import DEFAULT_SESSION_TTL, INFERENCE, ROLES, ApiKey
from .connections import ConnectionLimits
from .crashloop import CrashLoopPolicy
from .gguf_models import GgufError
from .origin import normal_origin, split_host
from .policy import ArrivalOrder, Collate, Policy
from .resources import RESOURCES, parse_size

LOG_LEVELS = ("debug", "info", "warn", "error")
RESERVED_MACROS = frozenset({"PORT", "MODEL_ID", "PID"})
MACRO_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
MACRO_REF = re.compile(r"\$\{([^}]*)\}")

TOP_LEVEL_KEYS = (
    "models",
    "healthCheckTimeout",
    "logLevel",
    "startPort",
    "macros",
    "globalTTL",
    "unloadTimeout",
    "queueLimit",
    "includeAliasesInList",
    "groups",
    "profiles",
    "hooks",
    "sendLoadingState",
    "peers",
    "logRequests",
    "store",
    "apiKeys",
    "sessionTtl",
    "maxRequestBytes",
    "crashLoop",
    "shutdownTimeout",
    "scheduler",
    "resources",
    "defaultModel",
    "pools",
    "modelsDir",
    "modelDefaults",
    "allowedHosts",
    "cors",
    "connections",
    "kvCache",
)
CONNECTION_KEYS = ("headerTimeout", "bodyTimeout", "bodyMinRate", "maxConnections", "maxPerClient")
MODEL_DEFAULTS_KEYS = ("cmd", "args", "ttl", "env")
KV_CACHE_KEYS = (
    "enabled",
    "path",
    "maxBytes",
    "maxBytesPerModel",
    "minTokens",
    "saveOnShutdown",
    "timeout",
)
SLOT_SAVE_FLAG = "--slot-save-path"
SCHEDULER_KEYS = ("policy", "maxWait", "maxResidency", "hold", "patience")
POOL_KEYS = ("models", "priority", "name", "description")
CRASH_LOOP_KEYS = ("maxFailures", "window", "cooldown", "maxCooldown")
STORE_KEYS = ("path", "maxRows", "maxAgeDays")
CORS_KEYS = ("allowOrigins", "allowMethods", "allowHeaders", "maxAge")
API_KEY_KEYS = ("name", "key", "role", "models", "maxConcurrent", "requestsPerMinute")
PEER_KEYS = ("proxy", "models", "apiKey", "filters")
GROUP_KEYS = ("members", "swap", "exclusive", "persistent")
FILTER_KEYS = ("stripParams", "setParams", "setParamsByID")
DEFAULT_GROUP = "(default)"
MODEL_KEYS = (
    "cmd",
    "proxy",
    "checkEndpoint",
    "ttl",
    "aliases",
    "env",
    "useModelName",
    "unlisted",
    "name",
    "description",
    "cmdStop",
    "unloadTimeout",
    "concurrencyLimit",
    "macros",
    "metadata",
    "filters",
    "sendLoadingState",
    "forwardAuthorization",
    "priority",
    "memory",
    "deadline",
    "upstreamApiKey",
    "capabilities",
    "kvCache",
    "childProtocol",
)
CHILD_PROTOCOL = ("auto", "on", "off")
CAPABILITIES = ("chat", "embeddings", "rerank")
DEFAULT_PROXY = "http://127.0.0.1:${PORT}"
# in flight or waiting, per model: a guard against a runaway client, not a throttle
# (agents with parallel tool calls and several chat users stay far below it)
DEFAULT_CONCURRENCY_LIMIT = 100


class ConfigError(Exception):
    """A configuration problem, located by file and key path."""

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source = source
        self.path = path
        self.message = message
        where = f"{source}: {path}: " if path else f"{source}: "
        super().__init__(where + message)


@attrs.frozen
class CommandTemplate:
    """An argv whose ``${PORT}`` / ``${PID}`` are filled in only when it runs."""

    argv: tuple[str, ...]

    def render(self, port: int | None = None, pid: int | None = None) -> list[str]:
        values = {}
        if port is not None:
            values["PORT"] = str(port)
        if pid is not None:
            values["PID"] = str(pid)
        return [fill_runtime(arg, values) for arg in self.argv]

    @property
    def uses_port(self) -> bool:
        return any("${PORT}" in arg for arg in self.argv)


def fill_runtime(text: str, values: Mapping[str, str]) -> str:
    """Replace the run-time macros (``${PORT}``, ``${PID}``) that are known."""
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return text


@attrs.frozen
class Filters:
    """Request-body rewrites for one model; ``model`` itself is never touched."""

    strip: tuple[str, ...] = ()
    set: Mapping[str, Any] = attrs.field(factory=dict)
    set_by_id: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)

    def __bool__(self) -> bool:
        return bool(self.strip or self.set or self.set_by_id)

    def apply(self, document: dict[str, Any], requested: str) -> bool:
        """Rewrite ``document`` in place; True if anything changed."""
        changed = False
        for path in self.strip:
            changed |= _remove_path(document, path.split("."))
        for params in (self.set, self.set_by_id.get(requested, {})):
            for key, value in params.items():
                if key not in document or document[key] != value:
                    document[key] = value
                    changed = True
        return changed


def _remove_path(document: dict[str, Any], keys: list[str]) -> bool:
    *parents, last = keys
    for key in parents:
        child = document.get(key)
        if not isinstance(child, dict):
            return False
        document = child
    return document.pop(last, _MISSING) is not _MISSING


_MISSING = object()


@attrs.frozen
class GroupConfig:
    """Which models may run together (see docs/configuration.md, Groups)."""

    id: str
    members: tuple[str, ...]
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False


@attrs.frozen
class PoolConfig:
    """A name served by whichever of its models is loaded: it never causes a swap
    while one of them runs (see docs/configuration.md, Pools)."""

    id: str
    models: tuple[str, ...]
    priority: int | None = None  # None: the chosen model's own
    name: str = ""
    description: str = ""


@attrs.frozen
class PeerConfig:
    """Another OpenAI-compatible server (often another llamaswap) that serves some ids."""

    id: str
    proxy: str
    models: tuple[str, ...]
    api_key: str | None = None
    filters: Filters = attrs.field(factory=Filters)


@attrs.frozen
class KvCacheConfig:
    """``kvCache``: saving llama-server slots before a stop, restoring them after a start."""

    enabled: bool = True
    path: str = ""  # the directory under which each model's states live
    max_bytes: int = 10 * 2**30
    max_bytes_per_model: int = 4 * 2**30
    min_tokens: int = 256
    save_on_shutdown: bool = True
    timeout: float = 5.0


@attrs.frozen
class ModelConfig:
    """One entry of ``models``: how to run it and how clients see it."""

    id: str
    cmd: CommandTemplate
    proxy: str
    check_endpoint: str | None
    ttl: float
    aliases: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    use_model_name: str | None = None
    unlisted: bool = False
    name: str = ""
    description: str = ""
    cmd_stop: CommandTemplate | None = None
    unload_timeout: float = 10.0
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    filters: Filters = attrs.field(factory=Filters)
    send_loading_state: bool = False
    forward_authorization: bool = False
    priority: int = 0
    memory: Mapping[str, int] = attrs.field(factory=dict)
    deadline: float | None = None
    #: speak llama-server's router/child protocol: auto (by the executable's name), on, off
    child_protocol: str = "auto"
    #: the key the child expects; never printed (not even in this object's repr)
    upstream_api_key: str | None = attrs.field(default=None, repr=False)
    #: where its llama-server saves slots (``--slot-save-path``); None: KV keeping is off
    slot_save_path: str | None = None
    #: llamaswap added ``--slot-save-path`` (the slot files are its own, not the clients')
    slot_save_added: bool = False
    #: what its GGUF file says (facts, capabilities, memory estimate); see modelsdir
    gguf: Mapping[str, Any] = attrs.field(factory=dict)
    configured_capabilities: tuple[str, ...] = ()

    @property
    def capabilities(self) -> tuple[str, ...]:
        """What the model is for (a hint for front ends): as configured, else what
        its GGUF file and flags say (models dir), else read from llama-server's flags
        (``--embedding``, ``--reranking``), else chat."""
        if self.configured_capabilities:
            return self.configured_capabilities
        if self.gguf.get("capabilities"):
            return tuple(self.gguf["capabilities"])
        argv = set(self.cmd.argv)
        detected = tuple(
            kind
            for kind, flags in (
                ("embeddings", {"--embedding", "--embeddings"}),
                ("rerank", {"--reranking", "--rerank"}),
            )
            if argv & flags
        )
        return detected or ("chat",)

    @property
    def uses_port(self) -> bool:
        return self.cmd.uses_port

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a request may use for this model besides its id."""
        variants = tuple(k for k in self.filters.set_by_id if k != self.id)
        return self.aliases + variants

    @property
    def slots(self) -> int | None:
        """Requests the server answers at once (llama-server's ``--parallel``/``-np``),
        if the command says so."""
        value = _flag_value(self.cmd.argv, "--parallel") or _flag_value(self.cmd.argv, "-np")
        return int(value) if value is not None and value.isdigit() and int(value) > 0 else None

    def proxy_url(self, port: int | None) -> str:
        return fill_runtime(self.proxy, {"PORT": str(port)} if port is not None else {})


@attrs.frozen
class CorsConfig:
    """``cors``: browser apps on other origins that may use llamaswap (none by default)."""

    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST")
    allow_headers: tuple[str, ...] = ("*",)
    max_age: int = 600


@attrs.frozen
class Config:
    """The whole validated configuration."""

    models: Mapping[str, ModelConfig]
    health_check_timeout: float = 120.0
    log_level: str = "info"
    start_port: int = 5800
    source: str = "<config>"
    global_ttl: float = 0.0
    unload_timeout: float = 10.0
    queue_limit: int = 100
    include_aliases_in_list: bool = False
    groups: Mapping[str, GroupConfig] = attrs.field(factory=dict)
    profiles: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    pools: Mapping[str, PoolConfig] = attrs.field(factory=dict)
    preload: tuple[str, ...] = ()
    peers: Mapping[str, PeerConfig] = attrs.field(factory=dict)
    log_requests: bool = False
    store_path: str = ":memory:"
    store_max_rows: int = 100_000
    store_max_age_days: float = 30.0
    api_keys: tuple[ApiKey, ...] = ()
    session_ttl: float = DEFAULT_SESSION_TTL
    max_request_bytes: int = 32 * 1024 * 1024
    crash_loop: CrashLoopPolicy = attrs.field(factory=CrashLoopPolicy)
    shutdown_timeout: float = 30.0
    policy: Policy = attrs.field(factory=Collate)
    budget: Mapping[str, int] = attrs.field(factory=dict)
    default_model: str | None = None
    kv_cache: KvCacheConfig = attrs.field(factory=KvCacheConfig)
    connections: ConnectionLimits = attrs.field(factory=ConnectionLimits)
    # top-level keys the file sets to a value (``apiKeys: []`` counts, a missing or
    # null ``apiKeys`` does not): a reload may drop a security setting only if written
    written: frozenset[str] = frozenset()
    #: the models folders scanned (``modelsDir`` and ``--models-dir``), absolute
    models_dirs: tuple[str, ...] = ()
    #: problems that skipped a found model or file, for the log
    notices: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    cors: CorsConfig = attrs.field(factory=CorsConfig)

    def peer_route(self, name: str) -> tuple[PeerConfig, str] | None:
        """``<peer>/<model>``, or a bare model id that exactly one peer offers."""
        peer_id, sep, model = name.partition("/")
        if sep and peer_id in self.peers and model in self.peers[peer_id].models:
            return self.peers[peer_id], model
        offering = [p for p in self.peers.values() if name in p.models]
        if len(offering) == 1:
            return offering[0], name
        return None

    def resolve(self, name: str) -> ModelConfig | None:
        """Find a model by id, alias or ``setParamsByID`` variant."""
        model = self.models.get(name)
        if model is not None:
            return model
        for candidate in self.models.values():
            if name in candidate.names:
                return candidate
        return None

    def resolve_profile(self, name: str) -> tuple[str, ModelConfig] | None:
        """``<profile>:<model>`` → (profile, model), if that is what ``name`` is."""
        profile, sep, rest = name.partition(":")
        if not sep or profile not in self.profiles:
            return None
        model = self.resolve(rest)
        if model is None or model.id not in self.profiles[profile]:
            return None
        return profile, model

    def lookup(self, name: str) -> tuple[ModelConfig, str | None] | None:
        """Any name a request may use → (model, profile or None)."""
        found = self.resolve_profile(name)
        if found is not None:
            return found[1], found[0]
        model = self.resolve(name)
        return (model, None) if model is not None else None

    def group_of(self, model_id: str) -> GroupConfig:
        for group in self.groups.values():
            if model_id in group.members:
                return group
        members = tuple(
            m for m in self.models if not any(m in g.members for g in self.groups.values())
        )
        # with a memory budget, ungrouped models share the machine while they fit
        return GroupConfig(DEFAULT_GROUP, members, swap=not self.budget)

    def listed_ids(self) -> list[str]:
        return sorted(m.id for m in self.models.values() if not m.unlisted)


def load_config(
    path: str | Path | None, listen: Collection[str] = (), models_dirs: Collection[str] = ()
) -> Config:
    """Read and validate a configuration file (for a llamaswap serving on ``listen``).

    ``models_dirs`` (``--models-dir``) are scanned beside the file's ``modelsDir``;
    with them, ``path`` may be None: no file at all.
    """
    if path is None or path == "":
        config = parse_config("{}", "--models-dir", models_dirs=models_dirs)
        return refuse_self_proxy(config, listen)
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(source, "", f"cannot read file: {e.strerror or e}") from e
    return refuse_self_proxy(parse_config(text, source, models_dirs=models_dirs), listen)


def refuse_self_proxy(config: Config, listen: Collection[str]) -> Config:
    """``config``, unless a model's or peer's ``proxy`` leads to a ``listen`` endpoint.

    Such a proxy has llamaswap relay requests to itself (and take its own ``/health``
    for a child's).  Host names other than ``localhost`` are not resolved here: the
    ``Via`` mark of :mod:`llamaswap.relay` stops a loop this check cannot see.
    """
    proxies = [(f"models.{m.id}.proxy", m.proxy) for m in config.models.values()]
    proxies += [(f"peers.{p.id}.proxy", p.proxy) for p in config.peers.values()]
    for endpoint in listen:
        bound = listen_address(endpoint)
        if bound is None:
            continue
        for key, url in proxies:
            if _leads_to(url, *bound):
                raise ConfigError(
                    config.source,
                    key,
                    f"{url} is llamaswap's own listen address (--listen {endpoint}), so "
                    "requests would be relayed back into llamaswap; point it at the model "
                    "server",
                )
    return config


def listen_address(endpoint: str) -> tuple[str, int] | None:
    """Interface ('' for every one) and port of a tcp/tcp6/ssl endpoint string, else None."""
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in re.split(r"(?<!\\):", rest):
        name, equals, value = part.partition("=")
        if equals:
            named[name] = value.replace("\\", "")
        else:
            positional.append(part.replace("\\", ""))
    interface = positional[1] if kind == "tcp" and len(positional) > 1 else ""
    interface = named.get("interface", interface)
    try:
        return interface, int(named.get("port", positional[0] if positional else ""))
    except ValueError:
        return None


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _addresses(host: str) -> set[IPAddress]:
    """The addresses a literal host stands for; empty for a name (not resolved)."""
    if host.lower() == "localhost":
        return {ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")}
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return set()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return {address.ipv4_mapped}
    return {address}


def _leads_to(url: str, interface: str, port: int) -> bool:
    """Would a connection to ``url`` reach a listener on ``interface:port`` here?"""
    if "${" in url:
        return False  # ${PORT} is chosen when the model starts, among ports not in use
    parts = urlsplit(url)
    try:
        target_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if target_port != port:
        return False
    targets = _addresses(parts.hostname or "")
    bound = _addresses(interface)
    if not interface or any(b.is_unspecified for b in bound):  # every local address
        return any(t.is_loopback or t.is_unspecified or _is_own(t) for t in targets)
    # 0.0.0.0 / :: as a destination means this machine
    return any(t.is_unspecified or t in bound for t in targets)


def _is_own(address: IPAddress) -> bool:
    """True if ``address`` belongs to this machine (only a local address can be bound)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def parse_config(
    text: str,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    models_dirs: Collection[str] = (),
) -> Config:
    """Validate a YAML document and build a :class:`Config`.

    ``environ`` (default: this process's environment) fills ``${env.NAME}``;
    ``models_dirs`` are scanned for GGUF files as if listed in ``modelsDir``.
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"not valid YAML: {e}") from e
    builder = _Builder(source, os.environ if environ is None else environ)
    builder.cli_models_dirs = tuple(os.path.abspath(os.path.expanduser(d)) for d in models_dirs)
    return builder.build(document)


def _suggest(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known keys: {', '.join(allowed)})"


class _Builder:
    """Walks the YAML document once, with the key path at hand for every error."""

    def __init__(self, source: str, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ
        self.cli_models_dirs: tuple[str, ...] = ()

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(self.source, path, message)

    def build(self, document: object) -> Config:
        if document is None:
            raise self.fail("", "the file is empty; it needs at least a 'models' map")
        root = self.mapping(document, "")
        self.check_keys(root, "", TOP_LEVEL_KEYS)
        macros = self.global_macros(root.get("macros"), "macros")
        folders = self.models_dirs(root.get("modelsDir"), macros)
        if "models" not in root and not folders:
            raise self.fail("models", "required key is missing (or give a modelsDir)")
        models_doc = self.mapping(root.get("models", {}), "models")
        if not models_doc and not folders:
            raise self.fail("models", "at least one model is required (or give a modelsDir)")
        global_ttl = self.number(root.get("globalTTL", 0), "globalTTL")
        if global_ttl < 0:
            raise self.fail(
                "globalTTL", f"must be 0 (never) or a positive number, got {global_ttl!r}"
            )
        unload_timeout = self.positive(root.get("unloadTimeout", 10), "unloadTimeout")
        budget = self.budget(root.get("resources"))
        kv_cache = self.kv_cache(root.get("kvCache"), macros)
        defaults = {
            "kv_cache": kv_cache,
            "budget": budget,
            "ttl": global_ttl,
            "unloadTimeout": unload_timeout,
            "sendLoadingState": self.boolean(
                root.get("sendLoadingState", False), "sendLoadingState"
            ),
        }
        models: dict[str, ModelConfig] = {}
        for model_id, entry in models_doc.items():
            if not isinstance(model_id, str) or not model_id.strip():
                raise self.fail("models", f"model id must be a non-empty string, got {model_id!r}")
            if ":" in model_id:
                raise self.fail(
                    f"models.{model_id}", "model ids may not contain ':' (profiles use it)"
                )
            models[model_id] = self.model(model_id, entry, macros, defaults)
        found = modelsdir.scan(folders)
        notices = list(found.notices)
        model_defaults = self.model_defaults(root.get("modelDefaults"))
        for model_id, model in models.items():
            models[model_id] = self.sized(model, None, budget, notices)
        taken = set(models) | {name for m in models.values() for name in m.names}
        for item in found.models:
            if item.id not in taken:  # an entry in the file wins over a found file
                written = modelsdir.entry(item, model_defaults, self.environ)
                try:
                    model = self.model(item.id, written, macros, defaults)
                except ConfigError as e:
                    notices.append(f"{item.path}: skipped: {e}")
                    continue
                models[item.id] = self.sized(model, item, budget, notices)
        self.check_names_unique(models)
        groups = self.groups(root.get("groups"), models)
        profiles = self.profiles(root.get("profiles"), models)
        pools = self.pools(root.get("pools"), models)
        preload = self.preload(root.get("hooks"), models)
        queue_limit = self.integer(root.get("queueLimit", 100), "queueLimit")
        if queue_limit < 1:
            raise self.fail("queueLimit", f"must be at least 1, got {queue_limit!r}")
        log_level = self.string(root.get("logLevel", "info"), "logLevel").lower()
        if log_level == "warning":
            log_level = "warn"
        if log_level not in LOG_LEVELS:
            raise self.fail(
                "logLevel", f"must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}"
            )
        start_port = self.integer(root.get("startPort", 5800), "startPort")
        if not 1 <= start_port <= 65535:
            raise self.fail("startPort", f"must be a port number 1-65535, got {start_port!r}")
        timeout = self.number(root.get("healthCheckTimeout", 120), "healthCheckTimeout")
        if timeout <= 0:
            raise self.fail("healthCheckTimeout", f"must be a positive number, got {timeout!r}")
        config = Config(
            models=models,
            health_check_timeout=timeout,
            log_level=log_level,
            start_port=start_port,
            source=self.source,
            global_ttl=global_ttl,
            unload_timeout=unload_timeout,
            queue_limit=queue_limit,
            include_aliases_in_list=self.boolean(
                root.get("includeAliasesInList", False), "includeAliasesInList"
            ),
            groups=groups,
            profiles=profiles,
            pools=pools,
            preload=preload,
            peers=self.peers(root.get("peers"), models, macros),
            log_requests=self.boolean(root.get("logRequests", False), "logRequests"),
            api_keys=self.api_keys(root.get("apiKeys"), macros),
            session_ttl=self.positive(root.get("sessionTtl", DEFAULT_SESSION_TTL), "sessionTtl"),
            crash_loop=self.crash_loop(root.get("crashLoop")),
            connections=self.connections(root.get("connections")),
            policy=self.policy(root.get("scheduler")),
            budget=budget,
            shutdown_timeout=self.not_negative(root.get("shutdownTimeout", 30), "shutdownTimeout"),
            max_request_bytes=self.limit(
                root.get("maxRequestBytes", 32 * 1024 * 1024), "maxRequestBytes"
            ),
            default_model=self.default_model(root.get("defaultModel")),
            kv_cache=kv_cache,
            models_dirs=folders,
            notices=tuple(notices),
            allowed_hosts=self.allowed_hosts(root.get("allowedHosts")),
            cors=self.cors(root.get("cors")),
            **self.store(root.get("store"), macros),
            written=frozenset(key for key, value in root.items() if value is not None),
        )
        if (
            config.default_model is not None
            and config.lookup(config.default_model) is None
            and config.default_model not in config.pools
        ):
            names = tuple(models) + tuple(n for m in models.values() for n in m.names)
            raise self.fail(
                "defaultModel",
                f"unknown model {config.default_model!r}" + _suggest(config.default_model, names),
            )
        return config

    # --- models folders (see llamaswap/modelsdir.py) ---------------------------

    def models_dirs(self, value: object, macros: Mapping[str, str]) -> tuple[str, ...]:
        """``modelsDir`` (relative to the file's folder) and ``--models-dir``, each once."""
        listed = [] if value is None else [value] if isinstance(value, str) else value
        base = os.path.dirname(os.path.abspath(self.source))
        folders = []
        for i, raw in enumerate(self.string_list(listed, "modelsDir")):
            where = "modelsDir" if isinstance(value, str) else f"modelsDir[{i}]"
            expanded = os.path.expanduser(self.expand(raw, where, macros, ()))
            folders.append((where, os.path.join(base, expanded)))
        folders += [("--models-dir", d) for d in self.cli_models_dirs]
        for where, folder in folders:
            if not os.path.isdir(folder):
                raise self.fail(where, f"{folder} is not a folder")
        return tuple(dict.fromkeys(os.path.normpath(f) for _, f in folders))

    def model_defaults(self, value: object) -> modelsdir.ModelDefaults:
        doc = self.mapping(value if value is not None else {}, "modelDefaults")
        self.check_keys(doc, "modelDefaults", MODEL_DEFAULTS_KEYS)
        cmd = None
        if doc.get("cmd") is not None:
            cmd = self.string(doc["cmd"], "modelDefaults.cmd")
            if "${MODEL_PATH}" not in cmd:
                raise self.fail("modelDefaults.cmd", "the template must load ${MODEL_PATH}")
        args = tuple(
            (str(pattern), self.string(extra, f"modelDefaults.args.{pattern}"))
            for pattern, extra in self.mapping(doc.get("args", {}), "modelDefaults.args").items()
        )
        entry = {key: doc[key] for key in ("ttl", "env") if doc.get(key) is not None}
        return modelsdir.ModelDefaults(cmd=cmd, args=args, entry=entry)

    def sized(
        self,
        model: ModelConfig,
        found: modelsdir.FoundModel | None,
        budget: Mapping[str, int],
        notices: list[str],
    ) -> ModelConfig:
        """``model`` with its file's facts, and its memory estimated unless declared."""
        argv = model.cmd.argv
        if found is not None:
            facts = found.facts
        else:
            weights = modelsdir.weights_in(argv)
            if weights is None or not os.path.isfile(weights):
                return model
            try:
                facts = modelsdir.facts_of(weights)
            except GgufError as e:
                notices.append(f"models.{model.id}: {weights}: not sized from its header: {e}")
                return model
        info = modelsdir.described(facts, argv, found)
        memory = model.memory or self.memory(info["estimate"]["total"], "", budget)
        name = model.name or (facts.name if found is not None else "")
        return attrs.evolve(model, name=name, memory=memory, gguf=info)

    def default_model(self, value: object) -> str | None:
        if value is None:
            return None
        name = self.string(value, "defaultModel")
        if not name.strip():
            raise self.fail("defaultModel", "must name a model (id, alias or profile:model)")
        return name

    def size(self, value: object, path: str) -> int:
        try:
            size = parse_size(value)
        except ValueError as e:
            raise self.fail(path, f"expected {e}, got {_describe(value)}") from e
        if size <= 0:
            raise self.fail(path, f"must be more than 0, got {value!r}")
        return size

    def budget(self, value: object) -> dict[str, int]:
        doc = self.mapping(value if value is not None else {}, "resources")
        self.check_keys(doc, "resources", RESOURCES)
        return {
            key: self.size(doc[key], f"resources.{key}")
            for key in RESOURCES
            if doc.get(key) is not None
        }

    def memory(self, value: object, path: str, budget: Mapping[str, int]) -> dict[str, int]:
        if value is None:
            return {}
        if isinstance(value, dict):
            self.check_keys(value, path, RESOURCES)
            return {
                key: self.size(value[key], f"{path}.{key}") for key in RESOURCES if key in value
            }
        # one figure: GPU memory when a VRAM budget is set, else RAM
        return {"vram" if "vram" in budget else "ram": self.size(value, path)}

    def policy(self, value: object) -> Policy:
        doc = self.mapping(value if value is not None else {}, "scheduler")
        self.check_keys(doc, "scheduler", SCHEDULER_KEYS)
        default = Collate()
        name = self.string(doc.get("policy", default.name), "scheduler.policy")
        if name == "fifo":
            for key in ("maxWait", "maxResidency", "hold", "patience"):
                if key in doc:
                    raise self.fail(f"scheduler.{key}", "only the 'collate' policy uses it")
            return ArrivalOrder()
        if name == "collate":
            return Collate(
                max_wait=self.positive(doc.get("maxWait", default.max_wait), "scheduler.maxWait"),
                max_residency=self.positive(
                    doc.get("maxResidency", default.max_residency), "scheduler.maxResidency"
                ),
                hold=self.not_negative(doc.get("hold", default.hold), "scheduler.hold"),
                patience=self.not_negative(
                    doc.get("patience", default.patience), "scheduler.patience"
                ),
            )
        raise self.fail("scheduler.policy", f"must be 'fifo' or 'collate', got {name!r}")

    def crash_loop(self, value: object) -> CrashLoopPolicy:
        doc = self.mapping(value if value is not None else {}, "crashLoop")
        self.check_keys(doc, "crashLoop", CRASH_LOOP_KEYS)
        default = CrashLoopPolicy()
        policy = CrashLoopPolicy(
            max_failures=self.limit(
                doc.get("maxFailures", default.max_failures), "crashLoop.maxFailures"
            ),
            window=self.positive(doc.get("window", default.window), "crashLoop.window"),
            cooldown=self.positive(doc.get("cooldown", default.cooldown), "crashLoop.cooldown"),
            max_cooldown=self.positive(
                doc.get("maxCooldown", default.max_cooldown), "crashLoop.maxCooldown"
            ),
        )
        if policy.max_cooldown < policy.cooldown:
            raise self.fail("crashLoop.maxCooldown", "must not be smaller than cooldown")
        return policy

    def secret(self, value: object, path: str, macros: Mapping[str, str]) -> str:
        """A key: macros and ``${env.NAME}`` filled in, checked without being echoed."""
        key = self.expand(self.string(value, path), path, macros, ())
        if not key or any(c.isspace() for c in key):
            # never echo a key: say what is wrong with it, not what it is
            raise self.fail(path, "a key must be non-empty and contain no spaces")
        return key

    def connections(self, value: object) -> ConnectionLimits:
        doc = self.mapping(value if value is not None else {}, "connections")
        self.check_keys(doc, "connections", CONNECTION_KEYS)
        default = ConnectionLimits()
        maximum = doc.get("maxConnections")
        return ConnectionLimits(
            header_timeout=self.positive(
                doc.get("headerTimeout", default.header_timeout), "connections.headerTimeout"
            ),
            body_timeout=self.positive(
                doc.get("bodyTimeout", default.body_timeout), "connections.bodyTimeout"
            ),
            body_min_rate=self.limit(
                doc.get("bodyMinRate", default.body_min_rate), "connections.bodyMinRate"
            ),
            max_connections=None
            if maximum is None
            else self.limit(maximum, "connections.maxConnections"),
            max_per_client=self.limit(
                doc.get("maxPerClient", default.max_per_client), "connections.maxPerClient"
            ),
        )

    def api_keys(self, value: object, macros: Mapping[str, str]) -> tuple[ApiKey, ...]:
        """Plain keys (admin, every model, named ``apiKeys[i]``) and scoped ones."""
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail("apiKeys", f"expected a list of keys, got {_describe(value)}")
        keys: list[ApiKey] = []
        for i, raw in enumerate(value):
            path = f"apiKeys[{i}]"
            key = (
                self.scoped_key(raw, path, macros)
                if isinstance(raw, dict)
                else ApiKey(path, self.secret(raw, path, macros))
            )
            for earlier in keys:
                if key.name == earlier.name:
                    raise self.fail(f"{path}.name", f"{key.name!r} names another key too")
                if key.key == earlier.key:
                    raise self.fail(path, f"the same key as {earlier.name!r}")
            keys.append(key)
        return tuple(keys)

    def scoped_key(self, doc: dict[str, Any], path: str, macros: Mapping[str, str]) -> ApiKey:
        self.check_keys(doc, path, API_KEY_KEYS)
        for required in ("name", "key"):
            if doc.get(required) is None:
                raise self.fail(f"{path}.{required}", "missing")
        name = self.string(doc["name"], f"{path}.name").strip()
        if not name or len(name) > 64 or any(not c.isprintable() for c in name):
            raise self.fail(f"{path}.name", "must be 1-64 printable characters")
        role = self.string(doc.get("role", INFERENCE), f"{path}.role")
        if role not in ROLES:
            raise self.fail(f"{path}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        models = tuple(self.string_list(doc.get("models", ["*"]), f"{path}.models"))
        if not models or any(not m.strip() for m in models):
            raise self.fail(f"{path}.models", "list at least one model pattern ('*' for all)")
        limits = {
            field: self.limit(doc[key], f"{path}.{key}")
            for field, key in (
                ("max_concurrent", "maxConcurrent"),
                ("requests_per_minute", "requestsPerMinute"),
            )
            if doc.get(key) is not None
        }
        return ApiKey(
            name=name,
            key=self.secret(doc["key"], f"{path}.key", macros),
            role=role,
            models=tuple(m.strip() for m in models),
            **limits,
        )

    def allowed_hosts(self, value: object) -> tuple[str, ...]:
        if value is None:
            return ()
        hosts = []
        for i, raw in enumerate(self.string_list(value, "allowedHosts")):
            host = raw.strip().lower().removesuffix(".")
            name = host[2:] if host.startswith("*.") else host
            well_formed = split_host(name) == (name, None) and "*" not in name
            if host != "*" and not well_formed:
                raise self.fail(
                    f"allowedHosts[{i}]",
                    f"expected a host name without a port ('box.lan', '*.lan' or '*'), got {raw!r}",
                )
            hosts.append(host)
        return tuple(hosts)

    def cors(self, value: object) -> CorsConfig:
        doc = self.mapping(value if value is not None else {}, "cors")
        self.check_keys(doc, "cors", CORS_KEYS)
        default = CorsConfig()
        origins = []
        for i, raw in enumerate(
            self.string_list(doc.get("allowOrigins") or [], "cors.allowOrigins")
        ):
            origin = "*" if raw.strip() == "*" else normal_origin(raw)
            if origin is None:
                raise self.fail(
                    f"cors.allowOrigins[{i}]",
                    "expected an origin like 'https://app.example.com' or "
                    f"'http://192.168.1.5:3000' (scheme, host, port; no path), got {raw!r}",
                )
            origins.append(origin)
        lists = {}
        for key, fallback in (
            ("allowMethods", default.allow_methods),
            ("allowHeaders", default.allow_headers),
        ):
            items = self.string_list(doc.get(key, list(fallback)), f"cors.{key}")
            for i, item in enumerate(items):
                if not re.fullmatch(r"\*|[!#$%&'+.^_`|~0-9A-Za-z-]+", item):
                    raise self.fail(
                        f"cors.{key}[{i}]", f"expected an HTTP token or '*', got {item!r}"
                    )
            lists[key] = items
        max_age = self.integer(doc.get("maxAge", default.max_age), "cors.maxAge")
        if max_age < 0:
            raise self.fail("cors.maxAge", f"must be 0 or more, got {max_age!r}")
        return CorsConfig(
            allow_origins=tuple(origins),
            allow_methods=tuple(m.upper() for m in lists["allowMethods"]),
            allow_headers=tuple(h.lower() for h in lists["allowHeaders"]),
            max_age=max_age,
        )

    def state_dir(self) -> str:
        """llamaswap's own state directory: ``$XDG_STATE_HOME/llamaswap``."""
        state = self.environ.get("XDG_STATE_HOME") or os.path.join(
            self.environ.get("HOME", "."), ".local", "state"
        )
        return os.path.join(state, "llamaswap")

    def kv_cache(self, value: object, macros: Mapping[str, str]) -> KvCacheConfig:
        doc = self.mapping(value if value is not None else {}, "kvCache")
        self.check_keys(doc, "kvCache", KV_CACHE_KEYS)
        default = KvCacheConfig()
        path = self.expand(
            self.string(doc.get("path", os.path.join(self.state_dir(), "kv")), "kvCache.path"),
            "kvCache.path",
            macros,
            (),
        )
        return KvCacheConfig(
            enabled=self.boolean(doc.get("enabled", default.enabled), "kvCache.enabled"),
            path=path,
            max_bytes=self.size(doc.get("maxBytes", default.max_bytes), "kvCache.maxBytes"),
            max_bytes_per_model=self.size(
                doc.get("maxBytesPerModel", default.max_bytes_per_model),
                "kvCache.maxBytesPerModel",
            ),
            min_tokens=self.limit(doc.get("minTokens", default.min_tokens), "kvCache.minTokens"),
            save_on_shutdown=self.boolean(
                doc.get("saveOnShutdown", default.save_on_shutdown), "kvCache.saveOnShutdown"
            ),
            timeout=self.positive(doc.get("timeout", default.timeout), "kvCache.timeout"),
        )

    def slot_save_path(
        self, cmd: CommandTemplate, value: object, path: str, kv_cache: KvCacheConfig, model_id: str
    ) -> tuple[CommandTemplate, str | None, bool]:
        """The command (with ``--slot-save-path`` added) and the directory, when KV
        keeping is on for this model: by default for ``llama-server`` commands."""
        wanted = None if value is None else self.boolean(value, path)
        argv = cmd.argv
        given = _flag_value(argv, SLOT_SAVE_FLAG)
        is_llama_server = os.path.basename(argv[0]).startswith("llama-server")
        if wanted is False or (wanted is None and not (kv_cache.enabled and is_llama_server)):
            return cmd, None, False
        if given is not None:
            return cmd, given, False
        directory = os.path.join(kv_cache.path, safe_name(model_id))
        return CommandTemplate((*argv, SLOT_SAVE_FLAG, directory)), directory, True

    def store(self, value: object, macros: Mapping[str, str]) -> dict[str, Any]:
        doc = self.mapping(value if value is not None else {}, "store")
        self.check_keys(doc, "store", STORE_KEYS)
        default = os.path.join(self.state_dir(), "activity.sqlite3")
        path = self.expand(
            self.string(doc.get("path", default), "store.path"), "store.path", macros, ()
        )
        return {
            "store_path": path,
            "store_max_rows": self.limit(doc.get("maxRows", 100_000), "store.maxRows"),
            "store_max_age_days": self.positive(doc.get("maxAgeDays", 30), "store.maxAgeDays"),
        }

    def peers(
        self, value: object, models: Mapping[str, ModelConfig], macros: Mapping[str, str]
    ) -> dict[str, PeerConfig]:
        if value is None:
            return {}
        peers: dict[str, PeerConfig] = {}
        for peer_id, entry in self.mapping(value, "peers").items():
            base = f"peers.{peer_id}"
            if not isinstance(peer_id, str) or not re.match(r"^[A-Za-z0-9_.-]+$", peer_id):
                raise self.fail(base, "peer ids use letters, digits, '_', '-' and '.' only")
            doc = self.mapping(entry, base)
            self.check_keys(doc, base, PEER_KEYS)
            for key in ("proxy", "models"):
                if key not in doc:
                    raise self.fail(f"{base}.{key}", "required key is missing")
            proxy = self.expand(
                self.string(doc["proxy"], f"{base}.proxy"), f"{base}.proxy", macros, ()
            )
            if not re.match(r"^https?://[^/]+", proxy):
                raise self.fail(f"{base}.proxy", f"expected an http(s):// URL, got {proxy!r}")
            served = self.string_list(doc["models"], f"{base}.models")
            if not served:
                raise self.fail(f"{base}.models", "a peer needs at least one model")
            for i, model in enumerate(served):
                if f"{peer_id}/{model}" in models or self.resolve_name(
                    f"{peer_id}/{model}", models
                ):
                    raise self.fail(
                        f"{base}.models[{i}]",
                        f"{peer_id}/{model} is also a local model id or alias",
                    )
            api_key = None
            if doc.get("apiKey"):
                api_key = self.expand(
                    self.string(doc["apiKey"], f"{base}.apiKey"), f"{base}.apiKey", macros, ()
                )
            peers[peer_id] = PeerConfig(
                id=peer_id,
                proxy=proxy.rstrip("/"),
                models=tuple(served),
                api_key=api_key,
                filters=self.filters(doc.get("filters"), f"{base}.filters", macros, peer_id),
            )
        return peers

    def groups(self, value: object, models: Mapping[str, ModelConfig]) -> dict[str, GroupConfig]:
        if value is None:
            return {}
        groups: dict[str, GroupConfig] = {}
        owner: dict[str, str] = {}
        for group_id, entry in self.mapping(value, "groups").items():
            base = f"groups.{group_id}"
            doc = self.mapping(entry, base)
            self.check_keys(doc, base, GROUP_KEYS)
            if "members" not in doc:
                raise self.fail(f"{base}.members", "required key is missing")
            members = self.string_list(doc["members"], f"{base}.members")
            for i, member in enumerate(members):
                where = f"{base}.members[{i}]"
                if member not in models:
                    raise self.fail(
                        where, f"unknown model {member!r}" + _suggest(member, tuple(models))
                    )
                if member in owner:
                    other = owner[member]
                    raise self.fail(
                        where,
                        f"{member!r} is listed twice"
                        if other == group_id
                        else f"{member!r} is already a member of group {other!r}",
                    )
                owner[member] = group_id
            groups[group_id] = GroupConfig(
                id=group_id,
                members=tuple(members),
                swap=self.boolean(doc.get("swap", True), f"{base}.swap"),
                exclusive=self.boolean(doc.get("exclusive", True), f"{base}.exclusive"),
                persistent=self.boolean(doc.get("persistent", False), f"{base}.persistent"),
            )
        return groups

    def profiles(
        self, value: object, models: Mapping[str, ModelConfig]
    ) -> dict[str, tuple[str, ...]]:
        if value is None:
            return {}
        profiles: dict[str, tuple[str, ...]] = {}
        for name, members in self.mapping(value, "profiles").items():
            base = f"profiles.{name}"
            if not isinstance(name, str) or not name or ":" in name:
                raise self.fail(base, "profile names are non-empty and contain no ':'")
            ids = self.string_list(members, base)
            if not ids:
                raise self.fail(base, "a profile needs at least one model")
            for i, member in enumerate(ids):
                if member not in models:
                    raise self.fail(
                        f"{base}[{i}]",
                        f"unknown model {member!r}" + _suggest(member, tuple(models)),
                    )
            profiles[name] = tuple(dict.fromkeys(ids))
        return profiles

    def pools(self, value: object, models: Mapping[str, ModelConfig]) -> dict[str, PoolConfig]:
        if value is None:
            return {}
        taken = {name for m in models.values() for name in m.names}
        pools: dict[str, PoolConfig] = {}
        for pool_id, entry in self.mapping(value, "pools").items():
            base = f"pools.{pool_id}"
            if not isinstance(pool_id, str) or not pool_id.strip() or ":" in pool_id:
                raise self.fail(base, "pool names are non-empty and contain no ':'")
            if pool_id in models or pool_id in taken:
                raise self.fail(base, f"{pool_id!r} is already a model id or alias")
            doc = self.mapping(entry, base)
            self.check_keys(doc, base, POOL_KEYS)
            if "models" not in doc:
                raise self.fail(f"{base}.models", "required key is missing")
            ids = self.string_list(doc["models"], f"{base}.models")
            if not ids:
                raise self.fail(f"{base}.models", "a pool needs at least one model")
            for i, member in enumerate(ids):
                if member not in models:
                    raise self.fail(
                        f"{base}.models[{i}]",
                        f"unknown model {member!r}" + _suggest(member, tuple(models)),
                    )
            pools[pool_id] = PoolConfig(
                id=pool_id,
                models=tuple(dict.fromkeys(ids)),
                priority=(
                    self.integer(doc["priority"], f"{base}.priority")
                    if doc.get("priority") is not None
                    else None
                ),
                name=self.string(doc.get("name", ""), f"{base}.name"),
                description=self.string(doc.get("description", ""), f"{base}.description"),
            )
        return pools

    def preload(self, value: object, models: Mapping[str, ModelConfig]) -> tuple[str, ...]:
        if value is None:
            return ()
        hooks = self.mapping(value, "hooks")
        self.check_keys(hooks, "hooks", ("on_startup",))
        startup = self.mapping(hooks.get("on_startup", {}), "hooks.on_startup")
        self.check_keys(startup, "hooks.on_startup", ("preload",))
        ids = []
        for i, name in enumerate(
            self.string_list(startup.get("preload", []), "hooks.on_startup.preload")
        ):
            model = self.resolve_name(name, models)
            if model is None:
                raise self.fail(
                    f"hooks.on_startup.preload[{i}]",
                    f"unknown model {name!r}" + _suggest(name, tuple(models)),
                )
            ids.append(model.id)
        return tuple(ids)

    @staticmethod
    def resolve_name(name: str, models: Mapping[str, ModelConfig]) -> ModelConfig | None:
        if name in models:
            return models[name]
        return next((m for m in models.values() if name in m.names), None)

    # --- shapes -----------------------------------------------------------

    def mapping(self, value: object, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path or "(top level)", f"expected a map, got {_describe(value)}")
        return value

    def string(self, value: object, path: str) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(path, f"expected a string, got {_describe(value)}")
        return str(value)

    def not_negative(self, value: object, path: str) -> float:
        number = self.number(value, path)
        if number < 0:
            raise self.fail(path, f"must be 0 or more, got {number!r}")
        return number

    def positive(self, value: object, path: str) -> float:
        number = self.number(value, path)
        if number <= 0:
            raise self.fail(path, f"must be a positive number, got {number!r}")
        return number

    def number(self, value: object, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(path, f"expected a number, got {_describe(value)}")
        return float(value)

    def integer(self, value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"expected an integer, got {_describe(value)}")
        return value

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {_describe(value)}")
        return value

    def string_list(self, value: object, path: str) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list of strings, got {_describe(value)}")
        return [self.string(item, f"{path}[{i}]") for i, item in enumerate(value)]

    def check_keys(self, doc: Mapping[str, object], path: str, allowed: tuple[str, ...]) -> None:
        for key in doc:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                raise self.fail(where, "unknown key" + _suggest(str(key), allowed))

    # --- macros -----------------------------------------------------------

    def global_macros(
        self, value: object, path: str, inherited: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        macros: dict[str, str] = dict(inherited or {})
        if value is None:
            return macros
        doc = self.mapping(value, path)
        for name, raw in doc.items():
            where = f"{path}.{name}"
            if not isinstance(name, str) or not MACRO_NAME.match(name):
                raise self.fail(where, "macro names use letters, digits, '_' and '-' only")
            if name in RESERVED_MACROS:
                raise self.fail(where, f"{name} is reserved and filled in by llamaswap")
            # a macro may use the macros defined before it; ${PORT}, ${MODEL_ID}
            # and ${PID} stay for the place the macro is used in
            macros[name] = self.expand(self.string(raw, where), where, macros, RESERVED_MACROS)
        return macros

    def expand(self, text: str, path: str, macros: Mapping[str, str], keep: Collection[str]) -> str:
        """Substitute ``${name}`` macros; names in ``keep`` stay for run time."""

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in keep:
                return match.group(0)
            if name in macros:
                return macros[name]
            if name.startswith("env."):
                value = self.environ.get(name[4:])
                if value is None:
                    raise self.fail(
                        path, f"${{{name}}}: environment variable {name[4:]} is not set"
                    )
                if "\n" in value or "\0" in value:
                    raise self.fail(path, f"${{{name}}}: the value holds a newline or NUL byte")
                return value
            if name in RESERVED_MACROS:
                raise self.fail(path, f"${{{name}}} cannot be used here")
            raise self.fail(
                path,
                f"unknown macro ${{{name}}}"
                + (f" (defined: {', '.join(sorted(macros))})" if macros else ""),
            )

        result = MACRO_REF.sub(replace, text)
        # a macro's value may bring in a run-time macro that this place cannot fill
        for name in MACRO_REF.findall(result):
            if name not in keep:
                raise self.fail(path, f"${{{name}}} cannot be used here")
        return result

    # --- one model ---------------------------------------------------------

    def model(
        self,
        model_id: str,
        entry: object,
        macros: Mapping[str, str],
        defaults: Mapping[str, Any],
    ) -> ModelConfig:
        base = f"models.{model_id}"
        doc = self.mapping(entry, base)
        self.check_keys(doc, base, MODEL_KEYS)
        if "cmd" not in doc:
            raise self.fail(f"{base}.cmd", "required key is missing")
        own = self.global_macros(doc.get("macros"), f"{base}.macros", inherited=macros)
        scope = {name: value.replace("${MODEL_ID}", model_id) for name, value in own.items()}
        scope["MODEL_ID"] = model_id

        cmd = self.command(doc["cmd"], f"{base}.cmd", scope, {"PORT"})
        proxy = self.expand(
            self.string(doc.get("proxy", DEFAULT_PROXY), f"{base}.proxy"),
            f"{base}.proxy",
            scope,
            {"PORT"},
        )
        if "${PORT}" in proxy and not cmd.uses_port:
            where = f"{base}.proxy" if "proxy" in doc else f"{base}.cmd"
            raise self.fail(
                where,
                "the command does not use ${PORT}, so llamaswap cannot know where the "
                "server listens; put ${PORT} in cmd or give a fixed 'proxy' URL",
            )
        if not re.match(r"^https?://[^/]+", proxy):
            raise self.fail(f"{base}.proxy", f"expected an http:// URL, got {proxy!r}")

        check = self.string(doc.get("checkEndpoint", "/health"), f"{base}.checkEndpoint")
        check = self.expand(check, f"{base}.checkEndpoint", scope, set())
        check_endpoint: str | None
        if check.strip().lower() in ("none", ""):
            check_endpoint = None
        else:
            check_endpoint = check if check.startswith("/") else "/" + check

        ttl = self.number(doc.get("ttl", defaults["ttl"]), f"{base}.ttl")
        if ttl < 0:
            raise self.fail(f"{base}.ttl", f"must be 0 (never) or a positive number, got {ttl!r}")

        aliases = tuple(self.string_list(doc.get("aliases", []), f"{base}.aliases"))
        env = tuple(self.env(doc.get("env", []), f"{base}.env", scope))
        use_model_name = None
        if doc.get("useModelName") is not None:
            use_model_name = self.expand(
                self.string(doc["useModelName"], f"{base}.useModelName"),
                f"{base}.useModelName",
                scope,
                set(),
            )
        cmd_stop = None
        if doc.get("cmdStop"):
            cmd_stop = self.command(doc["cmdStop"], f"{base}.cmdStop", scope, {"PID", "PORT"})
        forward_authorization = self.boolean(
            doc.get("forwardAuthorization", False), f"{base}.forwardAuthorization"
        )
        upstream_api_key = None
        if doc.get("upstreamApiKey") is not None:
            upstream_api_key = self.secret(doc["upstreamApiKey"], f"{base}.upstreamApiKey", scope)
            if forward_authorization:
                raise self.fail(
                    f"{base}.upstreamApiKey",
                    "a model gets either the client's key (forwardAuthorization) or its "
                    "own (upstreamApiKey), not both",
                )
        cmd, slot_save_path, slot_save_added = self.slot_save_path(
            cmd, doc.get("kvCache"), f"{base}.kvCache", defaults["kv_cache"], model_id
        )
        return ModelConfig(
            id=model_id,
            cmd=cmd,
            slot_save_path=slot_save_path,
            slot_save_added=slot_save_added,
            proxy=proxy.rstrip("/"),
            check_endpoint=check_endpoint,
            ttl=ttl,
            aliases=aliases,
            env=env,
            use_model_name=use_model_name,
            unlisted=self.boolean(doc.get("unlisted", False), f"{base}.unlisted"),
            name=self.expand(
                self.string(doc.get("name", ""), f"{base}.name"), f"{base}.name", scope, set()
            ),
            description=self.expand(
                self.string(doc.get("description", ""), f"{base}.description"),
                f"{base}.description",
                scope,
                set(),
            ),
            cmd_stop=cmd_stop,
            unload_timeout=self.positive(
                doc.get("unloadTimeout", defaults["unloadTimeout"]), f"{base}.unloadTimeout"
            ),
            concurrency_limit=self.limit(
                doc.get("concurrencyLimit", DEFAULT_CONCURRENCY_LIMIT), f"{base}.concurrencyLimit"
            ),
            metadata=self.expand_tree(
                self.mapping(doc.get("metadata", {}), f"{base}.metadata"), f"{base}.metadata", scope
            ),
            filters=self.filters(doc.get("filters"), f"{base}.filters", scope, model_id),
            send_loading_state=self.boolean(
                doc.get("sendLoadingState", defaults["sendLoadingState"]),
                f"{base}.sendLoadingState",
            ),
            forward_authorization=forward_authorization,
            upstream_api_key=upstream_api_key,
            priority=self.integer(doc.get("priority", 0), f"{base}.priority"),
            configured_capabilities=self.capabilities(doc.get("capabilities"), base),
            memory=self.memory(doc.get("memory"), f"{base}.memory", defaults["budget"]),
            deadline=(
                self.positive(doc["deadline"], f"{base}.deadline")
                if doc.get("deadline") is not None
                else None
            ),
            child_protocol=self.child_protocol(doc.get("childProtocol", "auto"), base),
        )

    def capabilities(self, value: object, base: str) -> tuple[str, ...]:
        if value is None:
            return ()
        path = f"{base}.capabilities"
        kinds = self.string_list(value, path)
        for i, kind in enumerate(kinds):
            if kind not in CAPABILITIES:
                raise self.fail(
                    f"{path}[{i}]", f"must be one of {', '.join(CAPABILITIES)}, got {kind!r}"
                )
        return tuple(dict.fromkeys(kinds))

    def child_protocol(self, value: object, base: str) -> str:
        path = f"{base}.childProtocol"
        if isinstance(value, bool):  # YAML reads a bare on/off as a boolean
            return "on" if value else "off"
        setting = self.string(value, path)
        if setting not in CHILD_PROTOCOL:
            raise self.fail(path, f"must be one of {', '.join(CHILD_PROTOCOL)}, got {value!r}")
        return setting

    def limit(self, value: object, path: str) -> int:
        number = self.integer(value, path)
        if number < 1:
            raise self.fail(path, f"must be at least 1, got {number!r}")
        return number

    def expand_tree(self, value: Any, path: str, scope: Mapping[str, str]) -> Any:
        """Macros in every string of a free-form value (metadata, setParams)."""
        if isinstance(value, str):
            text = self.expand(value, path, scope, ())
            if MACRO_REF.fullmatch(value.strip()) and text != value:
                # a value that is exactly one macro keeps the macro's type: 0.2 stays a number
                typed = yaml.safe_load(text)
                if isinstance(typed, int | float | bool):
                    return typed
            return text
        if isinstance(value, dict):
            return {k: self.expand_tree(v, f"{path}.{k}", scope) for k, v in value.items()}
        if isinstance(value, list):
            return [self.expand_tree(v, f"{path}[{i}]", scope) for i, v in enumerate(value)]
        return value

    def filters(self, value: object, path: str, scope: Mapping[str, str], model_id: str) -> Filters:
        if value is None:
            return Filters()
        doc = self.mapping(value, path)
        self.check_keys(doc, path, FILTER_KEYS)
        strip = self.expand(
            self.string(doc.get("stripParams", ""), f"{path}.stripParams"),
            f"{path}.stripParams",
            scope,
            (),
        )
        stripped = tuple(p.strip() for p in strip.split(",") if p.strip() and p.strip() != "model")
        set_params = self.params(doc.get("setParams", {}), f"{path}.setParams", scope)
        by_id: dict[str, Mapping[str, Any]] = {}
        for key, params in self.mapping(
            doc.get("setParamsByID", {}), f"{path}.setParamsByID"
        ).items():
            where = f"{path}.setParamsByID.{key}"
            name = self.expand(str(key), where, scope, ())
            by_id[name] = self.params(params, where, scope)
        return Filters(strip=stripped, set=set_params, set_by_id=by_id)

    def params(self, value: object, path: str, scope: Mapping[str, str]) -> dict[str, Any]:
        doc = self.mapping(value, path)
        if "model" in doc:
            raise self.fail(f"{path}.model", "filters never change 'model'")
        result: dict[str, Any] = self.expand_tree(doc, path, scope)
        return result

    def command(
        self, value: object, path: str, scope: Mapping[str, str], keep: Collection[str]
    ) -> CommandTemplate:
        text = self.string(value, path)
        lines = []
        for line in text.splitlines():
            if line.strip().startswith("#"):
                continue
            lines.append(line)
        joined = " ".join(line.rstrip().removesuffix("\\") for line in lines)
        # macros are text: one may hold several arguments, so substitute, then split
        joined = self.expand(joined, path, scope, keep)
        try:
            argv = shlex.split(joined, comments=False, posix=True)
        except ValueError as e:
            raise self.fail(path, f"cannot split the command like a shell would: {e}") from e
        if not argv:
            raise self.fail(path, "the command is empty")
        return CommandTemplate(tuple(argv))

    def env(self, value: object, path: str, scope: Mapping[str, str]) -> list[tuple[str, str]]:
        pairs = []
        for i, item in enumerate(self.string_list(value, path)):
            where = f"{path}[{i}]"
            name, sep, val = item.partition("=")
            if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise self.fail(where, f"expected NAME=value, got {item!r}")
            pairs.append((name, self.expand(val, where, scope, {"PORT"})))
        return pairs

    def check_names_unique(self, models: Mapping[str, ModelConfig]) -> None:
        owner: dict[str, str] = {}
        for model in models.values():
            for i, alias in enumerate(model.names):
                where = (
                    f"models.{model.id}.aliases[{i}]"
                    if i < len(model.aliases)
                    else f"models.{model.id}.filters.setParamsByID.{alias}"
                )
                if alias in models:
                    raise self.fail(where, f"alias {alias!r} is already a model id")
                if alias in owner:
                    raise self.fail(where, f"alias {alias!r} is also used by {owner[alias]!r}")
                owner[alias] = model.id


def safe_name(model_id: str) -> str:
    """A directory name for ``model_id`` (ids may hold '/'), distinct per id."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)[:60]
    return f"{readable}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"


def _flag_value(argv: tuple[str, ...], flag: str) -> str | None:
    """The value of ``flag VALUE`` or ``flag=VALUE`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return None


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
