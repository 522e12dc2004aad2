"""The configuration: declared keys (:mod:`.settings`), read and checked into
immutable objects (:mod:`.loader`, :mod:`.objects`), with a generated schema."""

from .loader import load_config, parse_config
from .objects import (
    CommandTemplate,
    Config,
    CorsConfig,
    Filters,
    GroupConfig,
    ModelConfig,
    PeerConfig,
    PoolConfig,
    fill_runtime,
    resolve_name,
    safe_name,
)
from .reader import ConfigError
from .selfproxy import listen_address, refuse_self_proxy
from .settings import ConnectionLimits, CrashLoopPolicy, KvCacheConfig

__all__ = [
    "CommandTemplate",
    "Config",
    "ConfigError",
    "ConnectionLimits",
    "CorsConfig",
    "CrashLoopPolicy",
    "Filters",
    "GroupConfig",
    "KvCacheConfig",
    "ModelConfig",
    "PeerConfig",
    "PoolConfig",
    "fill_runtime",
    "listen_address",
    "load_config",
    "parse_config",
    "refuse_self_proxy",
    "resolve_name",
    "safe_name",
]
