"""The validated configuration: immutable objects the rest of llamaswap reads."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import attrs

# a module, not its names: policy.py takes its defaults from .settings
from .. import policy as policies
from ..access import ApiKey
from .settings import (
    ConnectionLimits,
    CorsSettings,
    CrashLoopPolicy,
    GroupSettings,
    KvCacheConfig,
    ModelSettings,
    StoreSettings,
    Top,
    default,
)


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
DEFAULT_GROUP = "(default)"


@attrs.frozen
class GroupConfig:
    """Which models may run together (see docs/configuration.md, Groups)."""

    id: str
    members: tuple[str, ...]
    swap: bool = default(GroupSettings, "swap")
    exclusive: bool = default(GroupSettings, "exclusive")
    persistent: bool = default(GroupSettings, "persistent")


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
    unload_timeout: float = default(ModelSettings, "unload_timeout")
    concurrency_limit: int = default(ModelSettings, "concurrency_limit")
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    filters: Filters = attrs.field(factory=Filters)
    send_loading_state: bool = False
    forward_authorization: bool = False
    trusted_pages: bool = False
    priority: int = default(ModelSettings, "priority")
    memory: Mapping[str, int] = attrs.field(factory=dict)
    deadline: float | None = None
    #: speak llama-server's router/child protocol: auto (by the executable's name), on, off
    child_protocol: str = default(ModelSettings, "child_protocol")
    #: an idle llama-server child is stopped with SIGKILL at once
    quick_stop: bool = default(ModelSettings, "quick_stop")
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
        value = flag_value(self.cmd.argv, "--parallel") or flag_value(self.cmd.argv, "-np")
        return int(value) if value is not None and value.isdigit() and int(value) > 0 else None

    def proxy_url(self, port: int | None) -> str:
        return fill_runtime(self.proxy, {"PORT": str(port)} if port is not None else {})


@attrs.frozen
class CorsConfig:
    """``cors``: browser apps on other origins that may use llamaswap (none by default)."""

    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = default(CorsSettings, "allow_methods")
    allow_headers: tuple[str, ...] = default(CorsSettings, "allow_headers")
    max_age: int = default(CorsSettings, "max_age")


@attrs.frozen
class Config:
    """The whole validated configuration."""

    models: Mapping[str, ModelConfig]
    health_check_timeout: float = default(Top, "health_check_timeout")
    log_level: str = default(Top, "log_level")
    start_port: int = default(Top, "start_port")
    source: str = "<config>"
    global_ttl: float = default(Top, "global_ttl")
    unload_timeout: float = default(Top, "unload_timeout")
    queue_limit: int = default(Top, "queue_limit")
    include_aliases_in_list: bool = default(Top, "include_aliases_in_list")
    groups: Mapping[str, GroupConfig] = attrs.field(factory=dict)
    profiles: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    pools: Mapping[str, PoolConfig] = attrs.field(factory=dict)
    preload: tuple[str, ...] = ()
    peers: Mapping[str, PeerConfig] = attrs.field(factory=dict)
    log_requests: bool = default(Top, "log_requests")
    store_path: str = ":memory:"
    store_max_rows: int = default(StoreSettings, "max_rows")
    store_max_age_days: float = default(StoreSettings, "max_age_days")
    api_keys: tuple[ApiKey, ...] = ()
    session_ttl: float = default(Top, "session_ttl")
    max_request_bytes: int = default(Top, "max_request_bytes")
    crash_loop: CrashLoopPolicy = attrs.field(factory=CrashLoopPolicy)
    shutdown_timeout: float = default(Top, "shutdown_timeout")
    policy: policies.Policy = attrs.field(factory=lambda: policies.Collate())
    budget: Mapping[str, int] = attrs.field(factory=dict)
    default_model: str | None = None
    kv_cache: KvCacheConfig = attrs.field(factory=KvCacheConfig)
    connections: ConnectionLimits = attrs.field(factory=ConnectionLimits)
    # top-level keys the file sets to a value (``apiKeys: []`` counts, a missing or
    # null ``apiKeys`` does not), and ``apiKeys[<name>].<field>`` of scoped keys: a
    # reload may drop a security setting only if written
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
        return resolve_name(name, self.models)

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


def flag_value(argv: tuple[str, ...], flag: str) -> str | None:
    """The value of ``flag VALUE`` or ``flag=VALUE`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return None


def safe_name(model_id: str) -> str:
    """A directory name for ``model_id`` (ids may hold '/'), distinct per id."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)[:60]
    return f"{readable}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"


def resolve_name(name: str, models: Mapping[str, ModelConfig]) -> ModelConfig | None:
    """The model ``name`` stands for: its id, an alias or a ``setParamsByID`` variant."""
    if name in models:
        return models[name]
    return next((m for m in models.values() if name in m.names), None)
