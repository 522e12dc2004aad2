"""Every configuration key, declared once: YAML name, type, default, bounds, doc.

The loader (:mod:`.loader`) reads keys by these declarations, the JSON schema and
the key tables of docs/configuration.md are generated from them (:mod:`.schema`),
and the components that use a setting take its default from here.  A new key is
one ``setting(...)`` line in the right section.

This module imports nothing else of llamaswap, so any module may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

REQUIRED: Any = attrs.NOTHING


@attrs.frozen
class Key:
    """What one field of a section says about its YAML key."""

    yaml: str
    doc: str
    #: number, integer, boolean, text, texts (a list of text), size, enum, or
    #: custom (read by the loader; ``schema`` says all the shape)
    kind: str
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    #: JSON-schema facets beyond what ``kind`` and the bounds give
    schema: Mapping[str, Any] = attrs.field(factory=dict)
    #: the default as the docs table shows it, when the value alone would mislead
    shown: str | None = None
    #: the default as the JSON schema gives it, when it is not the Python value
    json_default: Any = None
    #: the error for a value out of bounds; ``{value!r}`` is the value
    message: str | None = None
    #: the section class this key holds (a map, or a map of them with ``each``)
    section: type | None = None
    each: bool = False


def setting(
    yaml: str,
    default: Any = REQUIRED,
    doc: str = "",
    *,
    kind: str | None = None,
    factory: Any = None,
    **facts: Any,
) -> Any:
    """An attrs field declaring the YAML key ``yaml``."""
    if kind is None:
        kind = {bool: "boolean", int: "integer", float: "number", str: "text"}.get(
            type(default), "custom"
        )
    key = Key(yaml=yaml, doc=doc, kind=kind, **facts)
    if factory is not None:
        return attrs.field(factory=factory, metadata={"key": key})
    return attrs.field(default=default, metadata={"key": key})


def keys_of(section: type) -> tuple[tuple[str, Key], ...]:
    """(field name, declaration) of every key of ``section``, in declaration order."""
    return tuple((f.name, f.metadata["key"]) for f in attrs.fields(section) if "key" in f.metadata)


def yaml_names(section: type) -> tuple[str, ...]:
    return tuple(key.yaml for _, key in keys_of(section))


def default(section: type, name: str) -> Any:
    """The declared default of field ``name`` of ``section``."""
    field = attrs.fields_dict(section)[name]
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        return field.default.factory()  # type: ignore[union-attr]
    return field.default


POSITIVE: dict[str, Any] = {"exclusive_minimum": 0}
AT_LEAST_1: dict[str, Any] = {"minimum": 1}
LOG_LEVELS = ("debug", "info", "warn", "error")
CHILD_PROTOCOL = ("auto", "on", "off")
CAPABILITIES = ("chat", "embeddings", "rerank")
ROLE_NAMES = ("inference", "admin")
DEFAULT_PROXY = "http://127.0.0.1:${PORT}"
STATE_DIR_DOC = "`$XDG_STATE_HOME/llamaswap/{}` (`~/.local/state/...`)"
TEXT = {"$ref": "#/$defs/text"}
TEXTS = {"type": "array", "items": TEXT}
SIZE = {"$ref": "#/$defs/size"}
SIZE_OR_NULL = {"oneOf": [SIZE, {"type": "null"}]}
ENV = {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*="}}
HTTP_TOKEN = "[!#$%&'+.^_`|~0-9A-Za-z-]+"


# --- small sections ---------------------------------------------------------------


@attrs.frozen
class ConnectionLimits:
    """``connections``: how long and how many client connections may take."""

    header_timeout: float = setting(
        "headerTimeout",
        20.0,
        "seconds a request's headers may take, from their first byte; later: 408 and the "
        "connection is closed",
        **POSITIVE,
    )
    body_timeout: float = setting(
        "bodyTimeout",
        20.0,
        "seconds a request body may take, plus one second per `bodyMinRate` bytes received, "
        "banked at most `bodyTimeout` seconds ahead",
        **POSITIVE,
    )
    body_min_rate: int = setting(
        "bodyMinRate",
        500,
        "slowest request body accepted, in bytes/s (once `bodyTimeout` is used up)",
        **AT_LEAST_1,
    )
    stall_timeout: float = setting(
        "stallTimeout",
        120.0,
        "seconds a client may leave an answer unread (its connection's send buffer full, "
        "nothing taken from it) before the connection is cut: its request ends and the model "
        "is free again; a client that reads, however slowly, is not cut (the kernel tells; "
        "where it cannot, on other systems than Linux, a pause this long cuts it) as long as "
        "nothing waits for its model: once a swap, a stop or a reload does, a client that "
        "has not kept up for this long is cut too; a reload applies to waits already running",
        **POSITIVE,
    )
    max_connections: int | None = setting(
        "maxConnections",
        None,
        "most open client connections; by default a third of the open-file limit less 128 "
        "(kept for llamaswap and its model servers; each connection may also hold a request "
        "body's spool file and an upstream connection); a larger value is lowered to that",
        kind="integer",
        nullable=True,
        shown="derived",
        **AT_LEAST_1,
    )
    max_per_client: int = setting(
        "maxPerClient",
        64,
        "most open connections from one client address (an IPv6 client: its /64)",
        **AT_LEAST_1,
    )


@attrs.frozen
class CrashLoopPolicy:
    """``crashLoop``: when a model that keeps failing is left alone for a while."""

    max_failures: int = setting(
        "maxFailures",
        3,
        "failed starts or crashes within `crashLoop.window` that make a model wait (below)",
        **AT_LEAST_1,
    )
    window: float = setting(
        "window", 60.0, "seconds in which those failures are counted", **POSITIVE
    )
    cooldown: float = setting(
        "cooldown",
        10.0,
        "seconds the model then waits; doubles each time it trips again",
        **POSITIVE,
    )
    max_cooldown: float = setting("maxCooldown", 300.0, "the longest wait", **POSITIVE)


@attrs.frozen
class SchedulerSettings:
    """``scheduler``: when to swap."""

    policy: str = setting(
        "policy",
        "collate",
        "when to swap: `collate` (swap-aware, bounded) or `fifo` (arrival order) (below)",
        kind="enum",
        choices=("fifo", "collate"),
        message="must be 'fifo' or 'collate', got {value!r}",
    )
    max_wait: float = setting(
        "maxWait",
        30.0,
        "collate: the longest a request for another model waits before the swap starts",
        **POSITIVE,
    )
    max_residency: float = setting(
        "maxResidency",
        120.0,
        "collate: the longest a busy model keeps the machine while others wait",
        **POSITIVE,
    )
    hold: float = setting(
        "hold",
        1.0,
        "collate: seconds a model stays reserved after a request ends, while a request for "
        "another model from another client waits (never past `maxWait`; the client that made "
        "the last request is not held back when it moves on); `0` = none",
        minimum=0,
    )
    #: chosen with bench/trace.py's closed-loop mix
    patience: float = setting(
        "patience",
        6.0,
        "collate: a request for another model waits at most this many times its model's "
        "expected load time before the swap starts (`maxWait` still caps it); `0` = `maxWait` "
        "only",
        minimum=0,
    )


@attrs.frozen
class StoreSettings:
    """``store``: the activity log."""

    path: str | None = setting(
        "path",
        None,
        "SQLite file of the activity log; `:memory:` keeps it in memory only. If it cannot be "
        "opened, llamaswap starts anyway with the log in memory (one warning naming the path). "
        "Its directory is locked while llamaswap runs (`llamaswap.lock`): a second llamaswap "
        "with the same directory refuses to start, naming it and the holder's pid",
        kind="custom",
        shown=STATE_DIR_DOC.format("activity.sqlite3"),
        json_default="~/.local/state/llamaswap/activity.sqlite3",
        schema={"type": "string"},
    )
    max_rows: int = setting("maxRows", 100_000, "rows kept in the activity log", **AT_LEAST_1)
    max_age_days: float = setting("maxAgeDays", 30.0, "days rows are kept", **POSITIVE)


@attrs.frozen
class KvCacheConfig:
    """``kvCache``: saving llama-server slots before a stop, restoring them after a start."""

    enabled: bool = setting(
        "enabled",
        True,
        "keep conversations across swaps: save llama-server children's slots before a stop, "
        "restore them after a start (below); a model's `kvCache` overrides it",
    )
    #: the directory under which each model's states live
    path: str = setting(
        "path",
        "",
        "directory of the saved slots, one subdirectory per model (passed as "
        "`--slot-save-path`). Locked while llamaswap uses it (`llamaswap.lock`): a second "
        "llamaswap with the same directory refuses to start, or to reload into it",
        kind="custom",
        shown=STATE_DIR_DOC.format("kv"),
        json_default="~/.local/state/llamaswap/kv",
        schema={"type": "string"},
    )
    max_bytes: int = setting(
        "maxBytes",
        10 * 2**30,
        "disk budget for all saved slots; the least recently used go first",
        kind="size",
        json_default="10GiB",
    )
    max_bytes_per_model: int = setting(
        "maxBytesPerModel",
        4 * 2**30,
        "disk budget for one model's saved slots",
        kind="size",
        json_default="4GiB",
    )
    min_tokens: int = setting(
        "minTokens",
        256,
        "slots holding fewer tokens are not saved (their prefill is cheap)",
        **AT_LEAST_1,
    )
    save_on_shutdown: bool = setting(
        "saveOnShutdown", True, "also save when llamaswap stops, so a restart keeps conversations"
    )
    timeout: float = setting(
        "timeout",
        5.0,
        "seconds one model's saves (or restores) may take; then they are given up, the swap "
        "goes on and the log says so",
        **POSITIVE,
    )


@attrs.frozen
class CorsSettings:
    """``cors``: browser apps on other origins that may use llamaswap."""

    allow_origins: tuple[str, ...] = setting(
        "allowOrigins",
        (),
        "origins (`https://app.example.com`, `http://192.168.1.5:3000`) of browser apps that "
        "may call llamaswap; `*` = every site (below)",
        kind="custom",
        schema={
            "type": ["array", "null"],
            "items": {"type": "string", "pattern": r"^(\*|https?://[^/?#\s]+)$"},
        },
    )
    allow_methods: tuple[str, ...] = setting(
        "allowMethods",
        ("GET", "HEAD", "POST"),
        "methods a CORS preflight allows",
        kind="custom",
        shown="`[GET, HEAD, POST]`",
        schema={"type": "array", "items": {"type": "string", "pattern": f"^{HTTP_TOKEN}$"}},
    )
    allow_headers: tuple[str, ...] = setting(
        "allowHeaders",
        ("*",),
        "request headers a preflight allows; `*` = whatever the app asks for",
        kind="custom",
        schema={
            "type": "array",
            "items": {"type": "string", "pattern": rf"^(\*|{HTTP_TOKEN})$"},
        },
    )
    max_age: int = setting(
        "maxAge",
        600,
        "seconds a browser may cache a preflight answer",
        minimum=0,
        message="must be 0 or more, got {value!r}",
    )


@attrs.frozen
class Resources:
    """``resources``: memory budgets."""

    vram: int | None = setting(
        "vram",
        None,
        "GPU memory budget; with a budget set, models share the machine while they fit",
        kind="size",
        nullable=True,
    )
    ram: int | None = setting("ram", None, "RAM budget", kind="size", nullable=True)


@attrs.frozen
class MemoryNeed:
    """A model's ``memory`` as a map."""

    vram: int | None = setting("vram", None, "VRAM the model needs", kind="size", nullable=True)
    ram: int | None = setting("ram", None, "RAM the model needs", kind="size", nullable=True)


@attrs.frozen
class OnStartup:
    """``hooks.on_startup``."""

    preload: tuple[str, ...] = setting(
        "preload", (), "ids or aliases started at boot, in order, in the background", kind="texts"
    )


@attrs.frozen
class Hooks:
    """``hooks``: actions llamaswap takes by itself."""

    on_startup: Any = setting(
        "on_startup",
        None,
        "what to do once llamaswap has started",
        kind="custom",
        section=OnStartup,
        schema={"type": "object"},
    )


@attrs.frozen
class ModelDefaults:
    """``modelDefaults``: how models found in a models folder run."""

    cmd: str | None = setting(
        "cmd",
        None,
        "the command template of found models; `${MODEL_PATH}` is the model file, "
        "`${MMPROJ}` is `--mmproj <projector>` or nothing; `<llama-server>` is "
        "`$LLAMA_SERVER` or the one on `PATH`",
        kind="custom",
        shown="`<llama-server> --host 127.0.0.1 --port ${PORT} --alias ${MODEL_ID} "
        "-m ${MODEL_PATH} ${MMPROJ}`",
        schema={"type": ["string", "null"], "pattern": r"\$\{MODEL_PATH\}"},
    )
    args: Any = setting(
        "args",
        None,
        "glob on the model id → extra arguments for the found models it matches",
        kind="custom",
        shown="`{}`",
        json_default={},
        schema={"type": ["object", "null"], "additionalProperties": {"type": ["string", "number"]}},
    )
    ttl: float | None = setting(
        "ttl",
        None,
        "`ttl` of found models",
        kind="custom",
        shown="`globalTTL`",
        schema={"type": ["number", "null"], "minimum": 0},
    )
    env: Any = setting(
        "env",
        None,
        "`env` of found models",
        kind="custom",
        shown="`[]`",
        json_default=[],
        schema={"type": ["array", "null"], "items": ENV["items"]},
    )


@attrs.frozen
class FilterSettings:
    """``filters``: rewrites of JSON request bodies; ``model`` itself is never touched."""

    strip_params: str = setting(
        "stripParams",
        "",
        "comma-separated JSON keys removed from request bodies (`a.b` reaches into objects); "
        "`model` is never removed",
    )
    set_params: Any = setting(
        "setParams",
        None,
        "keys set in every JSON request body (any JSON value); `model` may not be set",
        kind="custom",
        shown="`{}`",
        json_default={},
        schema={"$ref": "#/$defs/params"},
    )
    set_params_by_id: Any = setting(
        "setParamsByID",
        None,
        "requested id → keys to set. Every key other than the model's own id becomes another "
        "name for the model: *variants* of one loaded model (other sampling, reasoning on/off) "
        "without a reload",
        kind="custom",
        shown="`{}`",
        json_default={},
        schema={"type": "object", "additionalProperties": {"$ref": "#/$defs/params"}},
    )


@attrs.frozen
class ModelSettings:
    """One entry of ``models``: how to run it and how clients see it."""

    cmd: str = setting(
        "cmd",
        REQUIRED,
        "the command that serves the model. Split like a POSIX shell splits words (quotes, "
        "backslashes), but never run through a shell: no pipes, redirections or `$VARS`. "
        "Multi-line is fine; lines whose first non-blank character is `#` are dropped and a "
        "trailing `\\` joins lines.",
        kind="custom",
        schema={"type": ["string", "number"], "pattern": r"\S"},
    )
    proxy: str = setting(
        "proxy",
        DEFAULT_PROXY,
        "base URL of the model's server. Set it when `cmd` uses a fixed port; then `cmd` need "
        "not contain `${PORT}`. If `proxy` uses `${PORT}`, `cmd` must too. A `proxy` that leads "
        "to llamaswap's own `--listen` address is refused, and so is one with user info "
        "(`user:password@`: give the key as `upstreamApiKey`).",
        kind="custom",
        schema={"$ref": "#/$defs/url"},
    )
    check_endpoint: str = setting(
        "checkEndpoint",
        "/health",
        "path that answers 200 once the model is loaded; `none` = ready as soon as the "
        "process runs (a child speaking `childProtocol` is ready when it says so)",
    )
    ttl: float = setting(
        "ttl",
        0.0,
        "stop the model after this many idle seconds, counted from the end of its last "
        "request; `0` = never",
        minimum=0,
        shown="`globalTTL`",
        message="must be 0 (never) or a positive number, got {value!r}",
    )
    aliases: tuple[str, ...] = setting(
        "aliases",
        (),
        "other names for this model; unique across the file and not equal to a model id",
        kind="texts",
        schema={"uniqueItems": True},
    )
    env: tuple[str, ...] = setting(
        "env",
        (),
        "`NAME=value` strings added to (or replacing) llamaswap's own environment for this "
        "child; `${PORT}` allowed",
        kind="custom",
        schema=ENV,
    )
    use_model_name: str | None = setting(
        "useModelName",
        None,
        "replaces the `model` field of JSON bodies sent to this server",
        kind="custom",
        schema={"type": ["string", "number", "null"]},
    )
    unlisted: bool = setting("unlisted", False, "hide from `/v1/models` (still usable by id)")
    name: str = setting("name", "", "shown in `/v1/models`")
    description: str = setting("description", "", "shown in `/v1/models`")
    cmd_stop: str | None = setting(
        "cmdStop",
        None,
        "command run to stop the server instead of sending SIGTERM (e.g. `docker stop "
        "my-llm`); `${PID}` is the server's pid. SIGKILL still follows after `unloadTimeout`.",
        kind="custom",
        schema={"type": ["string", "number", "null"]},
    )
    unload_timeout: float = setting(
        "unloadTimeout",
        10.0,
        "grace after SIGTERM (or `cmdStop`, or the exit command of `childProtocol`) before SIGKILL",
        shown="`unloadTimeout`",
        **POSITIVE,
    )
    #: a guard against a runaway client, not a throttle (agents with parallel tool
    #: calls and several chat users stay far below it)
    concurrency_limit: int = setting(
        "concurrencyLimit",
        100,
        "most requests for this model in flight or waiting at once; more get 429 with "
        "`Retry-After: 1` (a guard against a runaway client; `queueLimit` caps the waiting "
        "ones overall)",
        **AT_LEAST_1,
    )
    macros: Any = setting(
        "macros",
        None,
        "macros for this model only, over the global ones",
        kind="custom",
        shown="`{}`",
        json_default={},
        schema={"$ref": "#/$defs/macros"},
    )
    metadata: Any = setting(
        "metadata",
        None,
        "free-form values shown under `meta.llamaswap` in `/v1/models`; a value that is "
        "exactly one macro keeps the macro's type (`${ctx}` → `8192`, a number)",
        kind="custom",
        shown="`{}`",
        json_default={},
        schema={"type": "object"},
    )
    filters: Any = setting(
        "filters",
        None,
        "rewrites of JSON request bodies (below)",
        kind="custom",
        section=FilterSettings,
        schema={"type": ["object", "null"]},
    )
    send_loading_state: bool = setting(
        "sendLoadingState",
        False,
        "per-model switch for loading progress",
        shown="`sendLoadingState`",
    )
    child_protocol: str = setting(
        "childProtocol",
        "auto",
        "speak llama-server's router/child protocol (below): `auto` when the command's "
        "executable is "
        "named `llama-server` (`llama-server-cuda`, `llama-server.exe` too), `on` or `off` to "
        "force it",
        kind="custom",
        choices=CHILD_PROTOCOL,
        schema={"enum": [*CHILD_PROTOCOL, True, False]},
    )
    quick_stop: bool = setting(
        "quickStop",
        True,
        "stop an idle llama-server that speaks `childProtocol` with SIGKILL at once: it keeps "
        "nothing a clean exit would save (`kvCache` saves its slots first) and is gone in about "
        "half the time of its own exit; `false`: the exit command, SIGTERM 1 s later, SIGKILL "
        "after `unloadTimeout`. A child with requests in flight always gets the clean exit.",
    )
    forward_authorization: bool = setting(
        "forwardAuthorization",
        False,
        "pass the client's `Authorization` and `x-api-key` headers and its cookies "
        "(llamaswap's session cookie aside) on to this server (by default they stay with "
        "llamaswap)",
    )
    trusted_pages: bool = setting(
        "trustedPages",
        False,
        "let this server's own web pages (llama-server's web UI at `/upstream/<id>/`) run "
        "their scripts as pages of llamaswap, with the signed-in user's session; by default "
        "every answer of a model server is sandboxed ([security](#security)); "
        "what `/cors-proxy` fetches stays sandboxed",
    )
    upstream_api_key: str | None = setting(
        "upstreamApiKey",
        None,
        "the key this server expects (llama-server's `--api-key`): sent as `Authorization: "
        "Bearer <key>` (and `x-api-key`) on every request to it, never the client's; "
        "`${env.NAME}` keeps it out of the file. Not together with `forwardAuthorization`.",
        kind="custom",
        schema={"type": ["string", "null"], "pattern": r"^\S+$"},
    )
    priority: int = setting(
        "priority",
        0,
        "waiting requests for higher-priority models are served first; a request below its "
        "model's priority is background work ([scheduling](#scheduling-mixed-traffic))",
    )
    memory: Any = setting(
        "memory",
        None,
        "what the model needs: one size (`5GiB`; GPU memory when a `vram` budget is set, else "
        "RAM) or `{vram: 5GiB, ram: 1GiB}`",
        kind="custom",
        json_default={},
        schema={"oneOf": [SIZE, {"section": MemoryNeed, "type": "object"}, {"type": "null"}]},
    )
    deadline: float | None = setting(
        "deadline",
        None,
        "seconds a request may wait for this model before it gets 504 (the "
        "`X-Request-Deadline` header may ask for less)",
        kind="number",
        nullable=True,
        **POSITIVE,
    )
    capabilities: tuple[str, ...] = setting(
        "capabilities",
        (),
        "what the model is for, as `capabilities` in `/v1/models`: any of `chat`, "
        "`embeddings`, `rerank`; without it, what the GGUF file says (models dir), else read "
        "from the command (`--embedding`/`--embeddings` → `embeddings`, `--reranking`/"
        "`--rerank` → `rerank`), else `chat`",
        kind="custom",
        shown="detected",
        json_default=None,
        schema={
            "type": ["array", "null"],
            "items": {"type": "string", "enum": list(CAPABILITIES)},
            "default": None,
        },
    )
    kv_cache: bool | None = setting(
        "kvCache",
        None,
        "`false`: never save this model's slots; `true`: also for a command that is not "
        "`llama-server` itself (a wrapper script, a server that takes `--slot-save-path`)",
        kind="boolean",
        nullable=True,
        shown="on for `llama-server` commands",
    )


@attrs.frozen
class GroupSettings:
    """Which models may run together."""

    members: tuple[str, ...] = setting(
        "members",
        REQUIRED,
        "model ids; a model belongs to at most one group",
        kind="texts",
        schema={"uniqueItems": True},
    )
    swap: bool = setting("swap", True, "only one member runs at a time")
    exclusive: bool = setting(
        "exclusive",
        True,
        "starting a member stops the models of other groups (except persistent ones)",
    )
    persistent: bool = setting("persistent", False, "other groups never stop this group's members")


@attrs.frozen
class PeerSettings:
    """Another OpenAI-compatible server and the models it serves."""

    proxy: str = setting(
        "proxy",
        REQUIRED,
        "base URL of the peer (`http://` or `https://`; no `user:password@`: give the key "
        "as `apiKey`)",
        kind="custom",
        schema={"$ref": "#/$defs/url"},
    )
    models: tuple[str, ...] = setting(
        "models", REQUIRED, "the model ids it serves", kind="texts", schema={"minItems": 1}
    )
    api_key: str | None = setting(
        "apiKey",
        None,
        "the key sent to the peer as `Authorization: Bearer <key>`",
        kind="custom",
        schema={"type": ["string", "number", "null"]},
    )
    filters: Any = setting(
        "filters",
        None,
        "rewrites of JSON request bodies sent to the peer",
        kind="custom",
        section=FilterSettings,
        schema={"type": ["object", "null"]},
    )


@attrs.frozen
class PoolSettings:
    """A name served by whichever of its models is loaded."""

    models: tuple[str, ...] = setting(
        "models",
        REQUIRED,
        "the candidate model ids, in the order tried when none is loaded",
        kind="texts",
        schema={"minItems": 1},
    )
    priority: int | None = setting(
        "priority",
        None,
        "priority of requests sent to the pool (none: the chosen model's). Below the model's "
        "own `priority`, they are background work: they take a slot only when one is free, "
        "and never make a more urgent request wait for a swap",
        kind="integer",
        nullable=True,
    )
    name: str = setting(
        "name",
        "",
        "display name in `/v1/models` (default: the pool name)",
        schema={"type": "string"},
    )
    description: str = setting(
        "description", "", "shown in `/v1/models`", schema={"type": "string"}
    )


@attrs.frozen
class ApiKeySettings:
    """A key with a name, a role and the models it may use."""

    name: str = setting(
        "name",
        REQUIRED,
        "what logs, the activity log, `/api/activity/stats` and metrics show for the key "
        "(never the key); unique",
        kind="custom",
        schema={"type": ["string", "number"]},
    )
    key: str = setting(
        "key",
        REQUIRED,
        "the key itself, a string without spaces (quote one YAML would read as a number: "
        "`'0123'`); `${env.NAME}` keeps it out of the file; unique",
        kind="custom",
        schema={"type": "string"},
    )
    role: str = setting(
        "role",
        "inference",
        "`inference`: the OpenAI and llama-server routes, `/upstream/`, `/v1/models` and "
        "`/v1/models/<id>` (only its models) and `/api/version`, but not what changes a "
        "server for everyone or reaches beyond it (`POST /props`, `/lora-adapters`, "
        "`/slots/{id}`, `/tools`; `/cors-proxy`); "
        "`admin`: every route",
        kind="enum",
        choices=ROLE_NAMES,
        schema={"enum": list(ROLE_NAMES)},
    )
    models: tuple[str, ...] = setting(
        "models",
        ("*",),
        "patterns (`*`, `?`, `[...]`) of the model ids and `peer/model` ids the key may use",
        kind="texts",
        shown='`["*"]`',
        schema={"minItems": 1},
    )
    max_concurrent: int | None = setting(
        "maxConcurrent",
        None,
        "most model requests the key may have in flight; more get 429 with `Retry-After: 1`",
        kind="integer",
        nullable=True,
        **AT_LEAST_1,
    )
    requests_per_minute: int | None = setting(
        "requestsPerMinute",
        None,
        "most model requests the key may start per minute (refilled evenly); more get 429 "
        "with `Retry-After`",
        kind="integer",
        nullable=True,
        **AT_LEAST_1,
    )


def _section_key(yaml: str, cls: type, doc: str, **facts: Any) -> Any:
    return setting(
        yaml, None, doc, kind="custom", section=cls, schema={"type": ["object", "null"]}, **facts
    )


def _map_of(yaml: str, cls: type, doc: str, names: tuple[str, str] | None = None) -> Any:
    """A key holding a map of name → section ``cls``; ``names``: (doc, pattern) of a name."""
    schema: dict[str, Any] = {"type": ["object", "null"]}
    if names is not None:
        schema["propertyNames"] = {"description": names[0], "pattern": names[1]}
    return setting(
        yaml,
        None,
        doc,
        kind="custom",
        section=cls,
        each=True,
        shown="none",
        json_default={},
        schema=schema,
    )


@attrs.frozen
class Top:
    """The top level of the file."""

    models: Any = setting(
        "models",
        None,
        "map of model id → model (below). The id is what clients send as `model`; it may "
        "contain `/` but not `:`.",
        kind="custom",
        section=ModelSettings,
        each=True,
        shown="required unless `modelsDir`",
        json_default={},
        schema={
            "type": "object",
            "minProperties": 1,
            "propertyNames": {
                "description": "A model id: non-empty, no ':'.",
                "pattern": r"^[^:]*[^:\s][^:]*$",
            },
        },
    )
    health_check_timeout: float = setting(
        "healthCheckTimeout",
        120.0,
        "seconds a starting model may take until its health check answers 200; then it is "
        "stopped and waiting requests get a 503",
        **POSITIVE,
    )
    log_level: str = setting(
        "logLevel",
        "info",
        "`debug`, `info`, `warn` (or `warning`) or `error`, in any case, for llamaswap's own "
        "messages",
        kind="custom",
        choices=LOG_LEVELS,
        schema={
            "type": "string",
            "pattern": "^(?:[Dd][Ee][Bb][Uu][Gg]|[Ii][Nn][Ff][Oo]|[Ww][Aa][Rr][Nn]"
            "(?:[Ii][Nn][Gg])?|[Ee][Rr][Rr][Oo][Rr])$",
            "examples": list(LOG_LEVELS),
        },
    )
    start_port: int = setting(
        "startPort",
        5800,
        "first port tried for `${PORT}`; each start takes the first port at or above it that "
        "is free at that moment",
        minimum=1,
        maximum=65535,
        message="must be a port number 1-65535, got {value!r}",
    )
    macros: Any = setting(
        "macros",
        None,
        "name → text, usable as `${name}` in every model (below)",
        kind="custom",
        shown="`{}`",
        json_default={},
        schema={"$ref": "#/$defs/macros"},
    )
    global_ttl: float = setting(
        "globalTTL",
        0.0,
        "the `ttl` of models that do not set one; `0` = never stop idle models",
        minimum=0,
        message="must be 0 (never) or a positive number, got {value!r}",
    )
    unload_timeout: float = setting(
        "unloadTimeout",
        10.0,
        "seconds a stopping model gets after SIGTERM (or `cmdStop`) before SIGKILL; per-model "
        "override",
        **POSITIVE,
    )
    queue_limit: int = setting(
        "queueLimit",
        100,
        "most requests that may wait for a model at once; more get 503 with `Retry-After: 5`",
        **AT_LEAST_1,
    )
    include_aliases_in_list: bool = setting(
        "includeAliasesInList",
        False,
        "also list every alias and variant in `/v1/models` (with `alias_of`)",
    )
    groups: Any = _map_of(
        "groups",
        GroupSettings,
        "which models may run together (below)",
    )
    profiles: Any = setting(
        "profiles",
        None,
        "sets of models started together (below)",
        kind="custom",
        shown="none",
        json_default={},
        schema={
            "type": ["object", "null"],
            "propertyNames": {
                "description": "A profile name: non-empty, no ':'.",
                "pattern": "^[^:]+$",
            },
            "additionalProperties": {
                "description": "The models of this profile (at least one).",
                "type": "array",
                "minItems": 1,
                "items": TEXT,
            },
        },
    )
    hooks: Any = _section_key("hooks", Hooks, "actions llamaswap takes by itself", shown="none")
    send_loading_state: bool = setting(
        "sendLoadingState",
        False,
        "streamed chat requests for a model that is not ready get progress as "
        "`reasoning_content` (below); per-model override",
    )
    peers: Any = _map_of(
        "peers",
        PeerSettings,
        "other OpenAI-compatible servers that serve some ids (below)",
        ("A peer id: letters, digits, '_', '-' and '.'.", "^[A-Za-z0-9_.-]+$"),
    )
    log_requests: bool = setting(
        "logRequests",
        False,
        "also write one access-log line per proxied request (model, path, status, duration, "
        "wait, tokens) to the proxy log",
    )
    store: Any = _section_key("store", StoreSettings, "the activity log")
    api_keys: Any = setting(
        "apiKeys",
        None,
        "who may use llamaswap: plain keys (full access) or scoped keys with a name, a role "
        "and the models they may use; needed for every endpoint except `/health` and the web "
        "UI's static files ([access control](#access-control-keys-with-roles-and-scopes))",
        kind="custom",
        section=ApiKeySettings,
        shown="`[]`",
        json_default=[],
        schema={
            "type": ["array", "null"],
            "items": {
                "oneOf": [
                    {"type": "string", "pattern": r"^\S+$"},
                    {"section": ApiKeySettings, "type": "object"},
                ]
            },
        },
    )
    session_ttl: float = setting(
        "sessionTtl",
        12 * 3600.0,
        "seconds a web UI login lasts; a session also ends when its key is removed",
        shown="`43200` (12 h)",
        **POSITIVE,
    )
    max_request_bytes: int = setting(
        "maxRequestBytes",
        32 * 1024 * 1024,
        "largest request body; larger ones get 413 before anything else happens",
        shown="`33554432` (32 MiB)",
        **AT_LEAST_1,
    )
    crash_loop: Any = _section_key(
        "crashLoop", CrashLoopPolicy, "when a model that keeps failing is left alone (below)"
    )
    shutdown_timeout: float = setting(
        "shutdownTimeout",
        30.0,
        "on SIGTERM/SIGINT, seconds requests in flight may take to finish before the models "
        "are stopped",
        minimum=0,
        message="must be 0 or more, got {value!r}",
    )
    scheduler: Any = _section_key("scheduler", SchedulerSettings, "when to swap (below)")
    resources: Any = _section_key("resources", Resources, "memory budgets (below)")
    default_model: str | None = setting(
        "defaultModel",
        None,
        "the model (id, alias, variant or `profile:model`) for requests that name none — no "
        "JSON `model`, no form field, no `?model=`; without it they go to the one loaded model "
        "that is for the route (chat, embeddings, rerank), else to the one configured model that "
        "is (started for them), else to the one model that is loaded, else get 400 listing the "
        "ids ([routes](routes.md))",
        kind="custom",
        shown="none",
        schema={"type": ["string", "null"], "minLength": 1},
    )
    pools: Any = _map_of(
        "pools",
        PoolSettings,
        "names served by whichever of their models is loaded: never a swap (below)",
        ("A pool name: non-empty, no ':', not a model id or alias.", "^[^:]+$"),
    )
    models_dir: Any = setting(
        "modelsDir",
        None,
        "folder(s) of GGUF files, each served as a model without an entry "
        "([below](#models-folders)); relative "
        "to this file's folder; also `--models-dir`, repeatable",
        kind="custom",
        shown="`[]`",
        json_default=[],
        schema={
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}},
                {"type": "null"},
            ]
        },
    )
    model_defaults: Any = _section_key(
        "modelDefaults", ModelDefaults, "how models found in a models folder run"
    )
    allowed_hosts: tuple[str, ...] = setting(
        "allowedHosts",
        (),
        "extra names clients put in the `Host` header to reach llamaswap (e.g. a reverse "
        "proxy's name); `*.example.com` for subdomains, `*` turns the check off (below)",
        kind="custom",
        schema={
            "type": ["array", "null"],
            "items": {"type": "string", "pattern": r"^(\*|(\*\.)?[^*:/@\s]+)$"},
        },
    )
    cors: Any = _section_key("cors", CorsSettings, "browser apps on other origins (below)")
    connections: Any = _section_key(
        "connections", ConnectionLimits, "limits on client connections (below)"
    )
    kv_cache: Any = _section_key("kvCache", KvCacheConfig, "keeping conversations across swaps")
