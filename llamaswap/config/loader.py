"""YAML configuration → immutable, validated objects.

Everything a running llamaswap needs to know about its models is decided here,
before any child starts: a bad file is reported with the file name, the key path
and the offending value, and nothing runs.  Which keys exist, their types, bounds
and defaults are declared in :mod:`.settings`; this module reads them and checks
what a declaration cannot say (commands, macros, cross references).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Collection, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import attrs

from .. import modelsdir
from .. import policy as policies
from ..access import ApiKey
from ..gguf_models import GgufError
from ..origin import normal_origin, split_host
from ..resources import RESOURCES
from . import references
from .macros import MacroReader
from .objects import (
    CommandTemplate,
    Config,
    CorsConfig,
    Filters,
    ModelConfig,
    PeerConfig,
    flag_value,
    resolve_name,
    safe_name,
)
from .reader import ConfigError, _describe
from .selfproxy import refuse_self_proxy
from .settings import (
    CAPABILITIES,
    CHILD_PROTOCOL,
    LOG_LEVELS,
    ApiKeySettings,
    ConnectionLimits,
    CorsSettings,
    CrashLoopPolicy,
    FilterSettings,
    KvCacheConfig,
    ModelDefaults,
    ModelSettings,
    PeerSettings,
    SchedulerSettings,
    StoreSettings,
    Top,
    default,
    keys_of,
    yaml_names,
)
from .yamltext import load_yaml

SLOT_SAVE_FLAG = "--slot-save-path"
# an environment variable's name, as ``env: [NAME=value]`` entries give it
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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
    document = load_yaml(text, source)
    builder = _Builder(source, os.environ if environ is None else environ)
    builder.cli_models_dirs = tuple(os.path.abspath(os.path.expanduser(d)) for d in models_dirs)
    return builder.build(document)


class _Builder(MacroReader):
    """Walks the YAML document once, with the key path at hand for every error."""

    kv_writable = True  # whether the KV directory can be made (decided in ``build``)
    kv_withheld = False  # a model started without the --slot-save-path it would get

    def build(self, document: object) -> Config:
        """The Config, or every independent problem at once (see :meth:`Reader.attempt`):
        each top-level section, each model entry, each reference on its own; within
        one of them the first problem is enough, but in a model entry (each of its
        keys on its own: see :meth:`model`)."""
        if document is None:
            raise self.fail("", "the file is empty; it needs at least a 'models' map")
        root = self.mapping(document, "")
        self.sections = tuple(str(key) for key in root)
        known = yaml_names(Top)
        for key in root:  # each a section of its own: a typo of one hides no other
            self.attempt(partial(self.check_keys, {key: None}, "", known), None)
        macros = self.global_macros(root.get("macros"))
        folders = self.attempt(partial(self.models_dirs, root.get("modelsDir"), macros), None)
        models_doc = self.attempt(partial(self.models_map, root, folders), None)
        if folders is None or models_doc is None:
            self.failed_names = None  # which models exist is not known: no reference is checked
        top = self.top_settings(root)
        budget: dict[str, int] = self.attempt(partial(self.budget, root.get("resources")), {})
        kv_cache = self.attempt(
            partial(self.kv_cache, root.get("kvCache"), macros), self.kv_cache(None, macros)
        )
        # a state directory that cannot be written (read-only, a service user's
        # missing home) must not keep every llama-server from starting
        self.kv_writable = _can_make_directory(kv_cache.path)
        defaults = {
            "kv_cache": kv_cache,
            "budget": budget,
            "ttl": top["global_ttl"],
            "unload_timeout": top["unload_timeout"],
            "send_loading_state": top["send_loading_state"],
        }
        read = partial(self.entry, macros=macros, defaults=defaults)
        models: dict[str, ModelConfig] = self.each_entry(models_doc or {}, read, referenced=True)
        for model_id, entry in (models_doc or {}).items():
            if model_id not in models:  # its aliases name it too
                aliases = entry.get("aliases") if isinstance(entry, dict) else None
                listed = aliases if isinstance(aliases, list) else []
                self.entry_failed(*(str(alias) for alias in listed))
                self.failed_models.append(str(model_id))
        found = modelsdir.scan(folders or ())
        notices = list(found.notices)
        unfound: dict[str, str] = {}  # a program not found, and the setting naming it first
        model_defaults = self.attempt(
            partial(self.model_defaults, root.get("modelDefaults")), modelsdir.ModelDefaults()
        )
        headers = modelsdir.HeaderReads(
            weights
            for model in models.values()
            if (weights := modelsdir.weights_in(model.cmd.argv)) is not None
        )
        for model_id, model in models.items():
            models[model_id] = self.sized(model, None, budget, notices, headers)
            self.find_command(model, f"models.{model_id}.cmd", unfound)
        taken = set(models) | {name for m in models.values() for name in m.names}
        for item in found.models:
            if item.id not in taken:  # an entry in the file wins over a found file
                written = modelsdir.entry(item, model_defaults, self.environ)
                try:
                    model = self.whole(partial(self.model, item.id, written, macros, defaults))
                except ConfigError as e:
                    notices.append(f"{item.path}: skipped: {'; '.join(map(str, e.problems))}")
                    continue
                models[item.id] = self.sized(model, item, budget, notices, headers)
                self.find_command(model, "modelDefaults.cmd", unfound)
        notices.extend(
            f"{where}: {program}: command not found (check cmd and PATH); the models "
            "that use it cannot start until it is there"
            for program, where in unfound.items()
        )
        if self.kv_withheld:  # said only when a model would have had the flag
            notices.append(
                f"kvCache.path {kv_cache.path} cannot be written: models start without the "
                "--slot-save-path llamaswap adds (conversations are not kept across swaps)"
            )
        references.check_names_unique(self, models)
        # a section with a problem takes its defaults here, only so that the
        # sections after it are checked too: such a Config is never returned
        config = Config(
            models=models,
            log_level=self.attempt(
                partial(self.log_level, root.get("logLevel", default(Top, "log_level"))),
                default(Top, "log_level"),
            ),
            source=self.source,
            groups=self.attempt(partial(references.groups, self, root.get("groups"), models), {}),
            profiles=self.attempt(
                partial(references.profiles, self, root.get("profiles"), models), {}
            ),
            pools=self.attempt(partial(references.pools, self, root.get("pools"), models), {}),
            preload=self.attempt(partial(references.preload, self, root.get("hooks"), models), ()),
            peers=self.attempt(partial(self.peers, root.get("peers"), models, macros), {}),
            api_keys=self.attempt(partial(self.api_keys, root.get("apiKeys"), macros), ()),
            crash_loop=self.attempt(
                partial(self.crash_loop, root.get("crashLoop")), CrashLoopPolicy()
            ),
            connections=self.attempt(
                partial(self.connections, root.get("connections")), ConnectionLimits()
            ),
            policy=self.attempt(partial(self.policy, root.get("scheduler")), self.policy(None)),
            budget=budget,
            default_model=self.attempt(partial(self.default_model, root.get("defaultModel")), None),
            kv_cache=kv_cache,
            models_dirs=folders or (),
            notices=tuple(notices),
            allowed_hosts=self.attempt(partial(self.allowed_hosts, root.get("allowedHosts")), ()),
            cors=self.attempt(partial(self.cors, root.get("cors")), self.cors(None)),
            **self.attempt(
                partial(self.store, root.get("store"), macros), self.store(None, macros)
            ),
            **{k: v for k, v in top.items() if k != "send_loading_state"},
        )
        self.attempt(partial(references.check_default_model, self, config), None)
        self.finish()
        # what a reload may take as written, read from a file known to be well-formed
        keys = frozenset(key for key, value in root.items() if value is not None)
        return attrs.evolve(config, written=keys | _written_key_fields(root))

    def top_settings(self, root: Mapping[str, Any]) -> dict[str, Any]:
        """The simple top-level settings, each its own section: a wrong one takes its
        default (so the models are still checked) and is noted."""
        values = self.section(Top, {}, "")
        for name, key in keys_of(Top):
            if key.kind != "custom" and key.yaml in root:
                one = partial(self.section, Top, {key.yaml: root[key.yaml]}, "")
                values[name] = self.attempt(one, values)[name]
        return values

    def models_map(
        self, root: Mapping[str, Any], folders: tuple[str, ...] | None
    ) -> dict[str, Any]:
        """The ``models`` map as written (``folders`` None: ``modelsDir`` was wrong,
        so whether models come from a folder is not known)."""
        if "models" not in root and folders == ():
            raise self.fail("models", "required key is missing (or give a modelsDir)")
        models_doc = self.mapping(root.get("models", {}), "models")
        if not models_doc and folders == ():
            raise self.fail("models", "at least one model is required (or give a modelsDir)")
        return models_doc

    def entry(
        self,
        model_id: object,
        entry: object,
        macros: Mapping[str, str],
        defaults: Mapping[str, Any],
    ) -> ModelConfig:
        """One entry of ``models``: its id, then the model."""
        if not isinstance(model_id, str) or not model_id.strip():
            raise self.fail("models", f"model id must be a non-empty string, got {model_id!r}")
        if ":" in model_id:
            raise self.fail(f"models.{model_id}", "model ids may not contain ':' (profiles use it)")
        return self.whole(partial(self.model, model_id, entry, macros, defaults))

    def connections(self, value: object) -> ConnectionLimits:
        return ConnectionLimits(**self.section(ConnectionLimits, value, "connections"))

    def log_level(self, value: object) -> str:
        level = self.string(value, "logLevel").lower()
        level = "warn" if level == "warning" else level
        if level not in LOG_LEVELS:
            raise self.fail("logLevel", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
        return level

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
        folders += [("", d) for d in self.cli_models_dirs]  # from the command line
        for where, folder in folders:
            if not os.path.isdir(folder):
                if not where:
                    raise ConfigError("--models-dir", "", f"{folder} is not a folder")
                raise self.fail(where, f"{folder} is not a folder")
        return tuple(dict.fromkeys(os.path.normpath(f) for _, f in folders))

    def model_defaults(self, value: object) -> modelsdir.ModelDefaults:
        doc = self.mapping(value if value is not None else {}, "modelDefaults")
        self.check_keys(doc, "modelDefaults", yaml_names(ModelDefaults))
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
        headers: modelsdir.HeaderReads,
    ) -> ModelConfig:
        """``model`` with its file's facts, and its memory estimated unless declared."""
        argv = model.cmd.argv
        if found is not None:
            facts = found.facts
        else:
            weights = modelsdir.weights_in(argv)
            if weights is None:
                return model
            try:
                read = headers.facts_of(weights)
            except GgufError as e:
                notices.append(f"models.{model.id}: {weights}: not sized from its header: {e}")
                return model
            if read is None:  # not there (yet): a typo, or a disk not mounted yet
                notices.append(
                    f"models.{model.id}.cmd: {weights}: no such file (yet); the model "
                    "cannot start until it is there"
                )
                return model
            facts = read
        info = modelsdir.described(facts, argv, found)
        if facts is None:  # a found file whose header did not arrive: its files alone
            return attrs.evolve(model, gguf=info)
        memory = model.memory or self.memory(info["estimate"]["total"], "", budget)
        name = model.name or (facts.name if found is not None else "")
        return attrs.evolve(model, name=name, memory=memory, gguf=info)

    def find_command(self, model: ModelConfig, where: str, unfound: dict[str, str]) -> None:
        """Note in ``unfound`` a program that is not there now: said at load time, not
        first at a request's 503 (a warning: it may be installed before it is used)."""
        argv = model.cmd.argv
        if not argv or "${" in argv[0] or argv[0] in unfound:
            return
        path = dict(model.env).get("PATH", self.environ.get("PATH"))
        if shutil.which(argv[0], path=path) is None:
            unfound[argv[0]] = where

    def default_model(self, value: object) -> str | None:
        if value is None:
            return None
        name = self.string(value, "defaultModel")
        if not name.strip():
            raise self.fail("defaultModel", "must name a model (id, alias or profile:model)")
        return name

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

    def policy(self, value: object) -> policies.Policy:
        declared = self.section(SchedulerSettings, value, "scheduler")
        if declared["policy"] == "fifo":
            for key in yaml_names(SchedulerSettings)[1:]:
                if key in _given(value):
                    raise self.fail(f"scheduler.{key}", "only the 'collate' policy uses it")
            return policies.ArrivalOrder()
        del declared["policy"]
        return policies.Collate(**declared)

    def crash_loop(self, value: object) -> CrashLoopPolicy:
        policy = CrashLoopPolicy(**self.section(CrashLoopPolicy, value, "crashLoop"))
        if policy.max_cooldown < policy.cooldown:
            raise self.fail("crashLoop.maxCooldown", "must not be smaller than cooldown")
        return policy

    def secret(self, value: object, path: str, macros: Mapping[str, str]) -> str:
        """A key: macros and ``${env.NAME}`` filled in, checked without being echoed."""
        if not isinstance(value, str):
            # YAML reads some unquoted keys as numbers, and not as written (0123 is 83,
            # 1_000 is 1000): a key clients send would never match
            raise self.fail(
                path,
                f"a key must be a string, got {type(value).__name__}: quote it "
                "(YAML reads an unquoted 0123 as the number 83)",
            )
        key = self.expand(value, path, macros, ())
        if not key or any(c.isspace() for c in key):
            # never echo a key: say what is wrong with it, not what it is
            raise self.fail(path, "a key must be non-empty and contain no spaces")
        return key

    def api_keys(self, value: object, macros: Mapping[str, str]) -> tuple[ApiKey, ...]:
        """Plain keys (admin, every model, named ``apiKeys[i]``) and scoped ones."""
        if value is None:
            return ()
        if not isinstance(value, list):
            # never echo what may be a key: its type only
            got = _describe(value) if isinstance(value, dict) else type(value).__name__
            raise self.fail("apiKeys", f"expected a list of keys (apiKeys: [<key>]), got {got}")
        keys: list[ApiKey] = []
        for i, raw in enumerate(value):
            key = self.attempt(partial(self.api_key, raw, f"apiKeys[{i}]", keys, macros), None)
            if key is not None:
                keys.append(key)
        return tuple(keys)

    def api_key(
        self, raw: object, path: str, earlier_keys: list[ApiKey], macros: Mapping[str, str]
    ) -> ApiKey:
        """One entry of ``apiKeys``, different from the ones before it."""
        key = (
            self.scoped_key(raw, path, macros)
            if isinstance(raw, dict)
            else ApiKey(path, self.secret(raw, path, macros))
        )
        for earlier in earlier_keys:
            if key.name == earlier.name:
                raise self.fail(f"{path}.name", f"{key.name!r} names another key too")
            if key.key == earlier.key:
                raise self.fail(path, f"the same key as {earlier.name!r}")
        return key

    def scoped_key(self, doc: dict[str, Any], path: str, macros: Mapping[str, str]) -> ApiKey:
        declared = self.section(ApiKeySettings, doc, path)
        for required in ("name", "key"):
            if doc.get(required) is None:
                raise self.fail(f"{path}.{required}", "missing")
        name = self.string(doc["name"], f"{path}.name").strip()
        if not name or len(name) > 64 or any(not c.isprintable() for c in name):
            raise self.fail(f"{path}.name", "must be 1-64 printable characters")
        models = declared.pop("models")
        if not models or any(not m.strip() for m in models):
            raise self.fail(f"{path}.models", "list at least one model pattern ('*' for all)")
        return ApiKey(
            name=name,
            key=self.secret(doc["key"], f"{path}.key", macros),
            models=tuple(m.strip() for m in models),
            **declared,
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
        declared = self.section(CorsSettings, value, "cors")
        doc = _given(value)
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
        for key in ("allowMethods", "allowHeaders"):
            fallback = default(
                CorsSettings, "allow_methods" if key == "allowMethods" else "allow_headers"
            )
            items = self.string_list(doc.get(key, list(fallback)), f"cors.{key}")
            for i, item in enumerate(items):
                if not re.fullmatch(r"\*|[!#$%&'+.^_`|~0-9A-Za-z-]+", item):
                    raise self.fail(
                        f"cors.{key}[{i}]", f"expected an HTTP token or '*', got {item!r}"
                    )
            lists[key] = items
        return CorsConfig(
            allow_origins=tuple(origins),
            allow_methods=tuple(m.upper() for m in lists["allowMethods"]),
            allow_headers=tuple(h.lower() for h in lists["allowHeaders"]),
            max_age=declared["max_age"],
        )

    def state_dir(self) -> str:
        """llamaswap's own state directory: ``$XDG_STATE_HOME/llamaswap``."""
        state = self.environ.get("XDG_STATE_HOME") or os.path.join(
            self.environ.get("HOME", "."), ".local", "state"
        )
        return os.path.join(state, "llamaswap")

    def kv_cache(self, value: object, macros: Mapping[str, str]) -> KvCacheConfig:
        declared = self.section(KvCacheConfig, value, "kvCache")
        path = _given(value).get("path", os.path.join(self.state_dir(), "kv"))
        path = self.expand(self.string(path, "kvCache.path"), "kvCache.path", macros, ())
        return KvCacheConfig(**{**declared, "path": path})

    def slot_save_path(
        self, cmd: CommandTemplate, wanted: bool | None, kv_cache: KvCacheConfig, model_id: str
    ) -> tuple[CommandTemplate, str | None, bool]:
        """The command (with ``--slot-save-path`` added) and the directory, when KV
        keeping is on for this model: by default for ``llama-server`` commands."""
        argv = cmd.argv
        given = flag_value(argv, SLOT_SAVE_FLAG)
        is_llama_server = os.path.basename(argv[0]).startswith("llama-server")
        if wanted is False or (wanted is None and not (kv_cache.enabled and is_llama_server)):
            return cmd, None, False
        if given is not None:
            return cmd, given, False
        if not self.kv_writable:
            self.kv_withheld = True
            return cmd, None, False  # llama-server would refuse to start (see ``build``)
        directory = os.path.join(kv_cache.path, safe_name(model_id))
        return CommandTemplate((*argv, SLOT_SAVE_FLAG, directory)), directory, True

    def store(self, value: object, macros: Mapping[str, str]) -> dict[str, Any]:
        declared = self.section(StoreSettings, value, "store")
        path = _given(value).get("path", os.path.join(self.state_dir(), "activity.sqlite3"))
        path = self.expand(self.string(path, "store.path"), "store.path", macros, ())
        return {
            "store_path": path,
            "store_max_rows": declared["max_rows"],
            "store_max_age_days": declared["max_age_days"],
        }

    def peers(
        self, value: object, models: Mapping[str, ModelConfig], macros: Mapping[str, str]
    ) -> dict[str, PeerConfig]:
        if value is None:
            return {}
        read = partial(self.peer, models=models, macros=macros)
        return self.each_entry(self.mapping(value, "peers"), read)

    def peer(
        self,
        peer_id: object,
        entry: object,
        models: Mapping[str, ModelConfig],
        macros: Mapping[str, str],
    ) -> PeerConfig:
        base = f"peers.{peer_id}"
        if not isinstance(peer_id, str) or not re.match(r"^[A-Za-z0-9_.-]+$", peer_id):
            raise self.fail(base, "peer ids use letters, digits, '_', '-' and '.' only")
        doc = self.mapping(entry, base)
        self.check_keys(doc, base, yaml_names(PeerSettings))
        for key in ("proxy", "models"):
            if key not in doc:
                raise self.fail(f"{base}.{key}", "required key is missing")
        proxy = self.expand(self.string(doc["proxy"], f"{base}.proxy"), f"{base}.proxy", macros, ())
        self.check_server_url(proxy, f"{base}.proxy", "apiKey")
        served = self.string_list(doc["models"], f"{base}.models")
        if not served:
            raise self.fail(f"{base}.models", "a peer needs at least one model")
        for i, model in enumerate(served):
            if f"{peer_id}/{model}" in models or resolve_name(f"{peer_id}/{model}", models):
                raise self.fail(
                    f"{base}.models[{i}]",
                    f"{peer_id}/{model} is also a local model id or alias",
                )
        api_key = None
        if doc.get("apiKey"):
            api_key = self.expand(
                self.string(doc["apiKey"], f"{base}.apiKey"), f"{base}.apiKey", macros, ()
            )
        return PeerConfig(
            id=peer_id,
            proxy=proxy.rstrip("/"),
            models=tuple(served),
            api_key=api_key,
            filters=self.filters(doc.get("filters"), f"{base}.filters", macros, peer_id),
        )

    # --- one model ---------------------------------------------------------

    def model(
        self,
        model_id: str,
        entry: object,
        macros: Mapping[str, str],
        defaults: Mapping[str, Any],
    ) -> ModelConfig | None:
        """The model, or None when a key had a problem (noted): read it in
        :meth:`whole`, which says every problem of the entry at once; each key is read
        on its own but its own macros, which the others use (a mistake there ends it)."""
        base = f"models.{model_id}"
        doc = self.mapping(entry, base)
        inherited = ("ttl", "unload_timeout", "send_loading_state")
        declared = self.section(
            ModelSettings, doc, base, {k: defaults[k] for k in inherited}, every_key=True
        )
        own = self.own_macros(doc.get("macros"), f"{base}.macros", macros)
        scope = {name: value.replace("${MODEL_ID}", model_id) for name, value in own.items()}
        scope["MODEL_ID"] = model_id

        cmd: CommandTemplate | None = None
        if "cmd" in doc:
            command = partial(self.command, doc["cmd"], f"{base}.cmd", own, {"PORT"}, model_id)
            cmd = self.attempt(command, None)
        else:
            self.note(self.fail(f"{base}.cmd", "required key is missing"))
        proxy = self.attempt(partial(self.proxy, doc, base, scope, cmd), "")
        check_endpoint = self.attempt(
            partial(self.check_endpoint, declared["check_endpoint"], base, scope), None
        )
        env: list[tuple[str, str]] = self.attempt(
            partial(self.env, doc.get("env", []), f"{base}.env", scope), []
        )
        use_model_name = self.attempt(
            partial(self.optional_text, doc.get("useModelName"), f"{base}.useModelName", scope),
            None,
        )
        cmd_stop = None
        if doc.get("cmdStop"):
            stop = partial(
                self.command, doc["cmdStop"], f"{base}.cmdStop", own, {"PID", "PORT"}, model_id
            )
            cmd_stop = self.attempt(stop, None)
        forward_authorization = declared["forward_authorization"]
        upstream_api_key = self.attempt(
            partial(self.upstream_api_key, doc, base, scope, forward_authorization), None
        )
        name = self.attempt(partial(self.expand, declared["name"], f"{base}.name", scope, ()), "")
        description = self.attempt(
            partial(self.expand, declared["description"], f"{base}.description", scope, ()), ""
        )
        metadata: dict[str, Any] = self.attempt(
            partial(self.metadata, doc.get("metadata", {}), base, scope), {}
        )
        filters = self.attempt(
            partial(self.filters, doc.get("filters"), f"{base}.filters", scope, model_id), None
        )
        capabilities: tuple[str, ...] = self.attempt(
            partial(self.capabilities, doc.get("capabilities"), base), ()
        )
        memory: dict[str, int] = self.attempt(
            partial(self.memory, doc.get("memory"), f"{base}.memory", defaults["budget"]), {}
        )
        child_protocol = self.attempt(
            partial(
                self.child_protocol,
                doc.get("childProtocol", default(ModelSettings, "child_protocol")),
                base,
            ),
            "auto",
        )
        if self.failing() or cmd is None or filters is None:
            return None
        cmd, slot_save_path, slot_save_added = self.slot_save_path(
            cmd, declared["kv_cache"], defaults["kv_cache"], model_id
        )
        return ModelConfig(
            id=model_id,
            cmd=cmd,
            slot_save_path=slot_save_path,
            slot_save_added=slot_save_added,
            proxy=proxy.rstrip("/"),
            check_endpoint=check_endpoint,
            ttl=declared["ttl"],
            aliases=declared["aliases"],
            env=tuple(env),
            use_model_name=use_model_name,
            unlisted=declared["unlisted"],
            name=name,
            description=description,
            cmd_stop=cmd_stop,
            unload_timeout=declared["unload_timeout"],
            concurrency_limit=declared["concurrency_limit"],
            metadata=metadata,
            filters=filters,
            send_loading_state=declared["send_loading_state"],
            forward_authorization=forward_authorization,
            trusted_pages=declared["trusted_pages"],
            quick_stop=declared["quick_stop"],
            upstream_api_key=upstream_api_key,
            priority=declared["priority"],
            configured_capabilities=capabilities,
            memory=memory,
            deadline=declared["deadline"],
            child_protocol=child_protocol,
        )

    def proxy(
        self,
        doc: Mapping[str, Any],
        base: str,
        scope: Mapping[str, str],
        cmd: CommandTemplate | None,
    ) -> str:
        """A model's ``proxy`` URL (``cmd``: None when it has a problem of its own)."""
        proxy = self.expand(
            self.string(doc.get("proxy", default(ModelSettings, "proxy")), f"{base}.proxy"),
            f"{base}.proxy",
            scope,
            {"PORT"},
        )
        if "${PORT}" in proxy and cmd is not None and not cmd.uses_port:
            where = f"{base}.proxy" if "proxy" in doc else f"{base}.cmd"
            unbraced = re.search(r"\$PORT\b", str(doc["cmd"]))
            raise self.fail(
                where,
                "the command does not use ${PORT}, so llamaswap cannot know where the "
                "server listens; put ${PORT} in cmd or give a fixed 'proxy' URL"
                + (" ($PORT without braces is passed on as it is)" if unbraced else ""),
            )
        self.check_server_url(proxy, f"{base}.proxy", "upstreamApiKey")
        return proxy

    def check_server_url(self, url: str, where: str, key_setting: str) -> None:
        """A server llamaswap relays to is named by an ``http(s)://`` URL; one with user
        info (``user:password@``) is refused: no such credentials are ever sent (the
        name before ``@`` would be looked up as a host)."""
        if not re.match(r"^https?://[^/]+", url):
            raise self.fail(where, f"expected an http:// URL, got {url!r}")
        if "@" in url.split("://", 1)[1].split("/", 1)[0]:
            raise self.fail(
                where,
                "user info (user:password@) in the URL is not sent to the server; "
                f"give its key as {key_setting}",
            )

    def check_endpoint(self, value: str, base: str, scope: Mapping[str, str]) -> str | None:
        check = self.expand(value, f"{base}.checkEndpoint", scope, ())
        if check.strip().lower() in ("none", ""):
            return None
        return check if check.startswith("/") else "/" + check

    def optional_text(self, value: object, path: str, scope: Mapping[str, str]) -> str | None:
        if value is None:
            return None
        return self.expand(self.string(value, path), path, scope, ())

    def upstream_api_key(
        self, doc: Mapping[str, Any], base: str, scope: Mapping[str, str], forwarded: bool
    ) -> str | None:
        if doc.get("upstreamApiKey") is None:
            return None
        key = self.secret(doc["upstreamApiKey"], f"{base}.upstreamApiKey", scope)
        if forwarded:
            raise self.fail(
                f"{base}.upstreamApiKey",
                "a model gets either the client's key (forwardAuthorization) or its "
                "own (upstreamApiKey), not both",
            )
        return key

    def metadata(self, value: object, base: str, scope: Mapping[str, str]) -> Any:
        path = f"{base}.metadata"
        return self.expand_tree(self.mapping(value, path), path, scope)

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

    def filters(self, value: object, path: str, scope: Mapping[str, str], model_id: str) -> Filters:
        if value is None:
            return Filters()
        doc = self.mapping(value, path)
        self.check_keys(doc, path, yaml_names(FilterSettings))
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
        self,
        value: object,
        path: str,
        scope: Mapping[str, str],
        keep: Collection[str],
        model_id: str,
    ) -> CommandTemplate:
        """The argv of ``value``: macros are text, substituted before the split; the
        model id (which may hold spaces or quotes: a file's name in a models folder)
        is one argument's text, filled in after the split, so it never adds one."""
        text = self.string(value, path)
        lines = []
        for line in text.splitlines():
            if line.strip().startswith("#"):
                continue
            lines.append(line)
        joined = " ".join(line.rstrip().removesuffix("\\") for line in lines)
        # macros are text: one may hold several arguments, so substitute, then split
        joined = self.expand(joined, path, scope, {*keep, "MODEL_ID"})
        try:
            argv = shlex.split(joined, comments=False, posix=True)
        except ValueError as e:
            raise self.fail(path, f"cannot split the command like a shell would: {e}") from e
        if not argv:
            raise self.fail(path, "the command is empty")
        return CommandTemplate(tuple(arg.replace("${MODEL_ID}", model_id) for arg in argv))

    def env(self, value: object, path: str, scope: Mapping[str, str]) -> list[tuple[str, str]]:
        pairs = []
        for i, item in enumerate(self.string_list(value, path)):
            where = f"{path}[{i}]"
            name, sep, val = item.partition("=")
            if not sep or not _ENV_NAME.match(name):
                # never the value, which may be a secret (HF_TOKEN=...): a name alone
                got = f", got the name {name!r}" if sep else ""
                got = f", got {item!r}" if _ENV_NAME.match(item) else got
                raise self.fail(where, f"expected NAME=value (NAME: letters, digits, _){got}")
            pairs.append((name, self.expand(val, where, scope, {"PORT"})))
        return pairs


def _can_make_directory(path: str) -> bool:
    """Whether ``path`` is, or could be made, a directory llamaswap can write into:
    its nearest existing ancestor is a writable directory (``access`` also says no
    on a read-only file system, even to root)."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    return os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)


def _written_key_fields(root: dict[str, Any]) -> frozenset[str]:
    """What a reload may take as written of the keys (already checked): ``apiKeys[<name>]``
    for a key written whole, else ``apiKeys[<name>].<field>`` for each field given.

    A file cut short loses only its end: of the keys, only the last entry, when
    ``apiKeys`` is the last setting, may have lost lines (its ``models``, so every
    model) or the end of its key; and ``maxConcurrent:`` cut before its value reads
    as null only as the entry's last line.  Every other entry says what it means,
    fields left out included, so a key may be widened by leaving a limit out.
    """
    value = root.get("apiKeys")
    entries = value if isinstance(value, list) else []
    at_end = bool(entries) and list(root)[-1] == "apiKeys"
    marks = set()
    for i, entry in enumerate(entries):
        name = str(entry["name"]).strip() if isinstance(entry, dict) else f"apiKeys[{i}]"
        if not (at_end and i == len(entries) - 1):
            marks.add(f"apiKeys[{name}]")
        elif isinstance(entry, dict):
            last = list(entry)[-1]
            marks.update(
                f"apiKeys[{name}].{field}"
                for field, given in entry.items()
                if given is not None or field != last
            )
    return frozenset(marks)


def _given(value: object) -> dict[str, Any]:
    """A section as written (already checked to be a map or null)."""
    return value if isinstance(value, dict) else {}
