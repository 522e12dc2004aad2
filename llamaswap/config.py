"""YAML configuration → immutable, validated objects.

Everything a running llamaswap needs to know about its models is decided here,
before any child starts: a bad file is reported with the file name, the key path
and the offending value, and nothing runs.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

LOG_LEVELS = ("debug", "info", "warn", "error")
RESERVED_MACROS = frozenset({"PORT", "MODEL_ID", "PID"})
MACRO_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
MACRO_REF = re.compile(r"\$\{([^}]*)\}")

TOP_LEVEL_KEYS = ("models", "healthCheckTimeout", "logLevel", "startPort", "macros")
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
)
DEFAULT_PROXY = "http://127.0.0.1:${PORT}"


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

    @property
    def uses_port(self) -> bool:
        return self.cmd.uses_port

    def proxy_url(self, port: int | None) -> str:
        return fill_runtime(self.proxy, {"PORT": str(port)} if port is not None else {})


@attrs.frozen
class Config:
    """The whole validated configuration."""

    models: Mapping[str, ModelConfig]
    health_check_timeout: float = 120.0
    log_level: str = "info"
    start_port: int = 5800
    source: str = "<config>"

    def resolve(self, name: str) -> ModelConfig | None:
        """Find a model by id or alias."""
        model = self.models.get(name)
        if model is not None:
            return model
        for candidate in self.models.values():
            if name in candidate.aliases:
                return candidate
        return None

    def listed_ids(self) -> list[str]:
        return sorted(m.id for m in self.models.values() if not m.unlisted)


def load_config(path: str | Path) -> Config:
    """Read and validate a configuration file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(source, "", f"cannot read file: {e.strerror or e}") from e
    return parse_config(text, source)


def parse_config(
    text: str, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> Config:
    """Validate a YAML document and build a :class:`Config`.

    ``environ`` (default: this process's environment) fills ``${env.NAME}``.
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"not valid YAML: {e}") from e
    return _Builder(source, os.environ if environ is None else environ).build(document)


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

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(self.source, path, message)

    def build(self, document: object) -> Config:
        if document is None:
            raise self.fail("", "the file is empty; it needs at least a 'models' map")
        root = self.mapping(document, "")
        self.check_keys(root, "", TOP_LEVEL_KEYS)
        if "models" not in root:
            raise self.fail("models", "required key is missing")
        macros = self.global_macros(root.get("macros"), "macros")
        models_doc = self.mapping(root["models"], "models")
        if not models_doc:
            raise self.fail("models", "at least one model is required")
        models: dict[str, ModelConfig] = {}
        for model_id, entry in models_doc.items():
            if not isinstance(model_id, str) or not model_id.strip():
                raise self.fail("models", f"model id must be a non-empty string, got {model_id!r}")
            models[model_id] = self.model(model_id, entry, macros)
        self.check_names_unique(models)
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
        return Config(
            models=models,
            health_check_timeout=timeout,
            log_level=log_level,
            start_port=start_port,
            source=self.source,
        )

    # --- shapes -----------------------------------------------------------

    def mapping(self, value: object, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path or "(top level)", f"expected a map, got {_describe(value)}")
        return value

    def string(self, value: object, path: str) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(path, f"expected a string, got {_describe(value)}")
        return str(value)

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

    def global_macros(self, value: object, path: str) -> dict[str, str]:
        if value is None:
            return {}
        doc = self.mapping(value, path)
        macros: dict[str, str] = {}
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

    def model(self, model_id: str, entry: object, macros: Mapping[str, str]) -> ModelConfig:
        base = f"models.{model_id}"
        doc = self.mapping(entry, base)
        self.check_keys(doc, base, MODEL_KEYS)
        if "cmd" not in doc:
            raise self.fail(f"{base}.cmd", "required key is missing")
        scope = {name: value.replace("${MODEL_ID}", model_id) for name, value in macros.items()}
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

        ttl = self.number(doc.get("ttl", 0), f"{base}.ttl")
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
        return ModelConfig(
            id=model_id,
            cmd=cmd,
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
        )

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
            for i, alias in enumerate(model.aliases):
                where = f"models.{model.id}.aliases[{i}]"
                if alias in models:
                    raise self.fail(where, f"alias {alias!r} is already a model id")
                if alias in owner:
                    raise self.fail(where, f"alias {alias!r} is also used by {owner[alias]!r}")
                owner[alias] = model.id


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
