"""config-schema.json: a valid schema that agrees with the loader in llamaswap.config.

The schema is for editors (completion, hover text, red squiggles); it is generated from
the declarations in llamaswap.config.settings, so keys and defaults cannot drift.  These
tests check it is current and that it and the loader give the same verdict on the
shipped files and on a table of broken ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError, parse_config
from llamaswap.config import schema as generator

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "config-schema.json"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
VALIDATOR = Draft202012Validator(SCHEMA)

DEMO_ENVIRON = {"LLAMA_SERVER": "/x", "LLAMASWAP_MODEL": "/m.gguf"}
BASE = "models:\n  m:\n    cmd: llama-server --port ${PORT}\n"

# (what is wrong, the YAML, the key path the loader names)
BAD_CONFIGS: tuple[tuple[str, str, str], ...] = (
    ("unknown top-level key", BASE + "modles: {}\n", "modles"),
    ("unknown model key", BASE + "    ttls: 5\n", "models.m.ttls"),
    ("missing cmd", "models:\n  m:\n    ttl: 5\n", "models.m.cmd"),
    ("negative ttl", BASE + "    ttl: -1\n", "models.m.ttl"),
    ("ttl as a string", BASE + "    ttl: forever\n", "models.m.ttl"),
    ("startPort 0", BASE + "startPort: 0\n", "startPort"),
    ("concurrencyLimit 0", BASE + "    concurrencyLimit: 0\n", "models.m.concurrencyLimit"),
    ("group without members", BASE + "groups:\n  g:\n    swap: false\n", "groups.g.members"),
    (
        "unknown group key",
        BASE + "groups:\n  g:\n    members: [m]\n    persist: true\n",
        "groups.g.persist",
    ),
    ("profile as a map", BASE + "profiles:\n  p:\n    m: true\n", "profiles.p"),
    ("peer without proxy", BASE + "peers:\n  box:\n    models: [a]\n", "peers.box.proxy"),
    ("unknown hooks key", BASE + "hooks:\n  on_start:\n    preload: [m]\n", "hooks.on_start"),
    ("macro named PORT", "macros:\n  PORT: 9000\n" + BASE, "macros.PORT"),
    ("model id with ':'", "models:\n  'a:b':\n    cmd: x --port ${PORT}\n", "models.a:b"),
    ("logLevel loud", BASE + "logLevel: loud\n", "logLevel"),
    ("childProtocol maybe", BASE + "    childProtocol: maybe\n", "models.m.childProtocol"),
    (
        "upstreamApiKey with a space",
        BASE + "    upstreamApiKey: 'a b'\n",
        "models.m.upstreamApiKey",
    ),
    ("defaultModel empty", BASE + "defaultModel: ''\n", "defaultModel"),
    ("kvCache minTokens 0", BASE + "kvCache:\n  minTokens: 0\n", "kvCache.minTokens"),
    ("kvCache maxBytes a word", BASE + "kvCache:\n  maxBytes: lots\n", "kvCache.maxBytes"),
    ("unknown kvCache key", BASE + "kvCache:\n  budget: 1GB\n", "kvCache.budget"),
    ("model kvCache a string", BASE + "    kvCache: 'on'\n", "models.m.kvCache"),
    ("unknown modelDefaults key", BASE + "modelDefaults:\n  ctx: 4\n", "modelDefaults.ctx"),
    (
        "modelDefaults.cmd without the model",
        BASE + "modelDefaults:\n  cmd: llama-server --port ${PORT}\n",
        "modelDefaults.cmd",
    ),
    ("modelsDir as a map", BASE + "modelsDir: {a: b}\n", "modelsDir"),
    # beyond the list in the brief: every other rule the schema can express
    ("no models", "models: {}\n", "models"),
    ("healthCheckTimeout 0", BASE + "healthCheckTimeout: 0\n", "healthCheckTimeout"),
    ("globalTTL negative", BASE + "globalTTL: -5\n", "globalTTL"),
    ("unloadTimeout 0", BASE + "unloadTimeout: 0\n", "unloadTimeout"),
    ("queueLimit 0", BASE + "queueLimit: 0\n", "queueLimit"),
    ("startPort too high", BASE + "startPort: 70000\n", "startPort"),
    ("startPort not an integer", BASE + "startPort: '5800'\n", "startPort"),
    ("includeAliasesInList yes", BASE + "includeAliasesInList: 'yes'\n", "includeAliasesInList"),
    ("unlisted as a string", BASE + "    unlisted: 'no'\n", "models.m.unlisted"),
    ("empty cmd", "models:\n  m:\n    cmd: ''\n", "models.m.cmd"),
    ("cmd as a boolean", "models:\n  m:\n    cmd: true\n", "models.m.cmd"),
    ("env without '='", BASE + "    env: [CUDA]\n", "models.m.env[0]"),
    ("aliases as a string", BASE + "    aliases: small\n", "models.m.aliases"),
    ("alias listed twice", BASE + "    aliases: [a, a]\n", "models.m.aliases[1]"),
    ("model unloadTimeout 0", BASE + "    unloadTimeout: 0\n", "models.m.unloadTimeout"),
    ("metadata as a list", BASE + "    metadata: [a]\n", "models.m.metadata"),
    ("proxy not a URL", BASE + "    proxy: localhost:8080\n", "models.m.proxy"),
    ("model macro MODEL_ID", BASE + "    macros:\n      MODEL_ID: x\n", "models.m.macros.MODEL_ID"),
    ("macro name with a dot", "macros:\n  a.b: x\n" + BASE, "macros.a.b"),
    ("macro value a list", "macros:\n  a: [x]\n" + BASE, "macros.a"),
    ("unknown filters key", BASE + "    filters:\n      strip: a\n", "models.m.filters.strip"),
    (
        "setParams changes model",
        BASE + "    filters:\n      setParams: {model: x}\n",
        "models.m.filters.setParams.model",
    ),
    ("group member twice", BASE + "groups:\n  g:\n    members: [m, m]\n", "groups.g.members[1]"),
    ("empty profile", BASE + "profiles:\n  p: []\n", "profiles.p"),
    ("profile name with ':'", BASE + "profiles:\n  'a:b': [m]\n", "profiles.a:b"),
    ("on_startup null", BASE + "hooks:\n  on_startup:\n", "hooks.on_startup"),
    (
        "unknown on_startup key",
        BASE + "hooks:\n  on_startup:\n    load: [m]\n",
        "hooks.on_startup.load",
    ),
    ("peer without models", BASE + "peers:\n  box:\n    proxy: http://h\n", "peers.box.models"),
    (
        "peer with no model",
        BASE + "peers:\n  box:\n    proxy: http://h\n    models: []\n",
        "peers.box.models",
    ),
    (
        "unknown peer key",
        BASE + "peers:\n  box:\n    proxy: http://h\n    models: [a]\n    key: k\n",
        "peers.box.key",
    ),
    (
        "peer id with a space",
        BASE + "peers:\n  a b:\n    proxy: http://h\n    models: [a]\n",
        "peers.a b",
    ),
    ("allowedHosts with a port", BASE + "allowedHosts: ['box:8080']\n", "allowedHosts[0]"),
    ("allowedHosts as a string", BASE + "allowedHosts: box\n", "allowedHosts"),
    ("unknown cors key", BASE + "cors: {origins: []}\n", "cors.origins"),
    ("origin with a path", BASE + "cors: {allowOrigins: ['http://a/b']}\n", "cors.allowOrigins[0]"),
    ("origin without scheme", BASE + "cors: {allowOrigins: [app.lan]}\n", "cors.allowOrigins[0]"),
    ("cors maxAge negative", BASE + "cors: {maxAge: -1}\n", "cors.maxAge"),
    (
        "cors method with a space",
        BASE + "cors: {allowMethods: ['GET POST']}\n",
        "cors.allowMethods[0]",
    ),
    ("scoped key without key", BASE + "apiKeys: [{name: a}]\n", "apiKeys[0].key"),
    (
        "scoped key role root",
        BASE + "apiKeys: [{name: a, key: k, role: root}]\n",
        "apiKeys[0].role",
    ),
    (
        "scoped key no models",
        BASE + "apiKeys: [{name: a, key: k, models: []}]\n",
        "apiKeys[0].models",
    ),
    (
        "scoped key maxConcurrent 0",
        BASE + "apiKeys: [{name: a, key: k, maxConcurrent: 0}]\n",
        "apiKeys[0].maxConcurrent",
    ),
    (
        "unknown scoped key key",
        BASE + "apiKeys: [{name: a, key: k, scope: x}]\n",
        "apiKeys[0].scope",
    ),
    ("sessionTtl 0", BASE + "sessionTtl: 0\n", "sessionTtl"),
    (
        "peer proxy not http",
        BASE + "peers:\n  box:\n    proxy: ftp://h\n    models: [a]\n",
        "peers.box.proxy",
    ),
)

# Files both must accept: the odd but legal corners (nulls, numbers as text, any case).
GOOD_CONFIGS: tuple[tuple[str, str], ...] = (
    ("minimal", BASE),
    (
        "every key",
        "healthCheckTimeout: 0.5\n"
        "logLevel: WARNING\n"
        "startPort: 65535\n"
        "globalTTL: 0\n"
        "unloadTimeout: 2.5\n"
        "queueLimit: 1\n"
        "includeAliasesInList: true\n"
        "sendLoadingState: true\n"
        "macros:\n"
        "  srv: llama-server --port ${PORT} --alias ${MODEL_ID}\n"
        "  ctx: 4096\n"
        "  temp: 0.2\n"
        "models:\n"
        "  a:\n"
        "    cmd: ${srv} -c ${ctx}\n"
        "    proxy: http://127.0.0.1:${PORT}\n"
        "    checkEndpoint: none\n"
        "    ttl: 30\n"
        "    aliases: [small, 7]\n"
        "    env: [A=1, 'B_2=${PORT}']\n"
        "    useModelName: ${MODEL_ID}\n"
        "    unlisted: false\n"
        "    name: 42\n"
        "    description: model ${MODEL_ID}\n"
        "    cmdStop: kill -TERM ${PID}\n"
        "    unloadTimeout: 1\n"
        "    concurrencyLimit: 1\n"
        "    macros:\n"
        "      ctx: 8192\n"
        "    metadata: {family: qwen, size: [1, 2]}\n"
        "    filters:\n"
        "      stripParams: top_p, a.b\n"
        "      setParams: {temperature: '${temp}'}\n"
        "      setParamsByID:\n"
        "        a-hot: {temperature: 1.5}\n"
        "    sendLoadingState: false\n"
        "  b:\n"
        "    cmd: 12345\n"
        "    proxy: http://127.0.0.1:9000\n"
        "    macros:\n"
        "    filters:\n"
        "    useModelName:\n"
        "    cmdStop:\n"
        "groups:\n"
        "  g:\n"
        "    members: [a]\n"
        "    swap: false\n"
        "    exclusive: false\n"
        "    persistent: true\n"
        "  empty:\n"
        "    members: []\n"
        "profiles:\n"
        "  both: [a, b, a]\n"
        "hooks:\n"
        "  on_startup:\n"
        "    preload: [small]\n"
        "peers:\n"
        "  gpu-box.lan:\n"
        "    proxy: http://gpu-box:8080/\n"
        "    models: [big]\n"
        "    apiKey: ${env.KEY}\n"
        "    filters: {stripParams: seed}\n"
        "allowedHosts: [llm.example.com, '*.lan']\n"
        "cors:\n"
        "  allowOrigins: ['http://app.lan:3000', 'https://chat.example.com']\n"
        "  allowMethods: [GET, POST, DELETE]\n"
        "  allowHeaders: [authorization, content-type]\n"
        "  maxAge: 0\n",
    ),
    ("empty sections", BASE + "macros:\ngroups:\nprofiles:\nhooks:\npeers:\n"),
    ("empty hooks", BASE + "hooks:\n  on_startup: {}\n"),
)


def key_path(path: str) -> list[str]:
    """``models.m.env[0]`` → ``["models", "m", "env", "0"]``."""
    return re.findall(r"[^.\[\]]+", path)


def schema_errors(document: object) -> list[list[str]]:
    """The location of every schema violation, as key path components."""
    return [[str(p) for p in error.absolute_path] for error in VALIDATOR.iter_errors(document)]


def object_schemas(node: object, where: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every (sub)schema with ``properties``, with a JSON-pointer-ish location."""
    if isinstance(node, Mapping):
        if isinstance(node.get("properties"), Mapping):
            yield where, node
        for key, child in node.items():
            yield from object_schemas(child, f"{where}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from object_schemas(child, f"{where}/{i}")


def plain(value: object) -> object:
    """Loader values in the shape JSON gives them (tuples → lists, mappings → dicts)."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


class SchemaTests(SynchronousTestCase):
    def test_schema_is_a_valid_draft_2020_12_schema(self) -> None:
        self.assertEqual(SCHEMA["$schema"], "https://json-schema.org/draft/2020-12/schema")
        Draft202012Validator.check_schema(SCHEMA)

    def test_top_level_description_tells_editors_how_to_use_it(self) -> None:
        self.assertIn("# yaml-language-server: $schema=", SCHEMA["description"])

    def test_every_key_has_a_description_and_every_optional_key_a_default(self) -> None:
        missing = []
        for where, schema in object_schemas(SCHEMA):
            required = set(schema.get("required", ()))
            for key, prop in schema["properties"].items():
                if not prop.get("description"):
                    missing.append(f"{where}/properties/{key}: description")
                if key not in required and "default" not in prop:
                    missing.append(f"{where}/properties/{key}: default")
                if key in required and "default" in prop:
                    missing.append(f"{where}/properties/{key}: a required key has a default")
        self.assertEqual(missing, [])


class GeneratedTests(SynchronousTestCase):
    """The committed schema and docs tables are what the declarations generate."""

    def test_schema_file_is_generated(self) -> None:
        self.assertEqual(SCHEMA_PATH.read_text(encoding="utf-8"), generator.schema_text())

    def test_docs_tables_are_generated(self) -> None:
        docs = generator.DOCS_FILE.read_text(encoding="utf-8")
        self.assertEqual(docs, generator.docs_text(docs))
        for name in generator.TABLES:
            self.assertIn(f"<!-- keys: {name} -->", docs)

    def test_check_mode_reports_no_stale_file(self) -> None:
        self.assertEqual(generator.main(["--check"]), 0)


class ShippedFilesTests(SynchronousTestCase):
    """The example and the demo pass the schema and the loader."""

    def check(self, path: Path, environ: Mapping[str, str] | None = None) -> None:
        text = path.read_text(encoding="utf-8")
        self.assertEqual(schema_errors(yaml.safe_load(text)), [])
        self.assertTrue(parse_config(text, str(path), environ=environ).models)

    def test_config_example(self) -> None:
        self.check(ROOT / "config.example.yaml", environ={})

    def test_demo(self) -> None:
        self.check(ROOT / "llamaswap" / "demo.yaml", environ=DEMO_ENVIRON)


class AgreementTests(SynchronousTestCase):
    """The schema and the loader give the same verdict, and blame the same key."""

    def test_good_configs_pass_both(self) -> None:
        for name, text in GOOD_CONFIGS:
            self.assertEqual(schema_errors(yaml.safe_load(text)), [], name)
            parse_config(text, name, environ={"KEY": "secret"})

    def test_bad_configs_fail_both_at_the_same_key(self) -> None:
        problems = []
        for name, text, path in BAD_CONFIGS:
            try:
                parse_config(text, "bad.yaml", environ={})
            except ConfigError as e:
                if e.path != path or f"bad.yaml: {path}: " not in str(e):
                    problems.append(f"{name}: the loader blamed {e.path!r}: {e}")
            else:
                problems.append(f"{name}: the loader accepted it")
            errors = schema_errors(yaml.safe_load(text))
            if not errors:
                problems.append(f"{name}: the schema accepted it")
            for where in errors:
                # the schema reports the key itself, or the map that holds it
                if where != key_path(path)[: len(where)]:
                    problems.append(f"{name}: the schema blamed {'.'.join(where)!r}, not {path!r}")
        self.assertEqual(problems, [])
