"""Generate ``config-schema.json`` and the key tables of docs/configuration.md.

Both come from the declarations in :mod:`.settings`; ``python -m
llamaswap.config.schema`` rewrites them (``--check`` only compares), and a test
keeps the committed files equal to what this module generates.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import attrs

from . import settings
from .settings import REQUIRED, Key, keys_of

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "config-schema.json"
DOCS_FILE = ROOT / "docs" / "configuration.md"

DESCRIPTION = (
    "The llamaswap YAML configuration (see docs/configuration.md). For completion and "
    "checking in an editor (VS Code with the YAML extension), put `# yaml-language-server: "
    "$schema=<path or URL of this file>` as the first line of the config file, e.g. "
    "`# yaml-language-server: $schema=./config-schema.json`. llamaswap itself checks more "
    "than a schema can (macro references, cross references between models, groups, profiles "
    "and aliases), so it may still refuse a file that passes this schema."
)
#: sections used in more than one place, or by a map of them: one ``$defs`` entry each
DEFINED: dict[type, str] = {
    settings.ModelSettings: "model",
    settings.GroupSettings: "group",
    settings.PeerSettings: "peer",
    settings.ApiKeySettings: "apiKey",
    settings.FilterSettings: "filters",
    settings.PoolSettings: "pool",
}
#: defined sections a key may also leave empty (null)
NULLABLE = frozenset({settings.FilterSettings})
SHAPES: dict[str, Any] = {
    "text": {
        "description": "Text; a number is taken as its text. `${...}` macros are substituted.",
        "type": ["string", "number"],
    },
    "url": {
        "description": "An http:// or https:// URL (or one built from `${...}` macros).",
        "type": "string",
        "pattern": r"^https?://[^/]|\$\{",
    },
    "macros": {
        "type": ["object", "null"],
        "propertyNames": {
            "description": "A macro name: 1-63 letters, digits, '_' and '-'; PORT, MODEL_ID "
            "and PID are reserved.",
            "pattern": "^[A-Za-z0-9_-]{1,63}$",
            "not": {"enum": ["PORT", "MODEL_ID", "PID"]},
        },
        "additionalProperties": {"$ref": "#/$defs/text"},
    },
    "params": {
        "description": "Request body fields to set (or replace); never `model`.",
        "type": "object",
        "propertyNames": {"not": {"const": "model"}},
    },
    "size": {
        "description": "A size: bytes, or a number with a unit (512MiB, 5GiB, 8GB).",
        "type": ["string", "integer"],
        "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT]([iI]?[bB])?|[bB])?\s*$",
    },
}
KINDS: dict[str, dict[str, Any]] = {
    "number": {"type": "number"},
    "integer": {"type": "integer"},
    "boolean": {"type": "boolean"},
    "text": {"$ref": "#/$defs/text"},
    "texts": {"type": "array", "items": {"$ref": "#/$defs/text"}},
    "size": {"$ref": "#/$defs/size"},
    "enum": {},
    "custom": {},
}


def sentence(doc: str) -> str:
    """A docs-table line as a schema description: capitalised, one full stop."""
    text = doc[:1].upper() + doc[1:]
    return text if text.endswith((".", ")")) and not text.endswith("`)") else text + "."


def plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def json_default(key: Key, value: Any) -> Any:
    if key.json_default is not None:
        return key.json_default
    if key.section is not None:
        return {}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return plain(value)


def resolve(fragment: Any) -> Any:
    """A schema fragment with ``{"section": cls}`` replaced by the section's schema."""
    if isinstance(fragment, dict):
        if "section" in fragment:
            rest = {k: resolve(v) for k, v in fragment.items() if k != "section"}
            return {**section_ref(fragment["section"]), **rest}
        return {k: resolve(v) for k, v in fragment.items()}
    if isinstance(fragment, list | tuple):
        return [resolve(v) for v in fragment]
    return fragment


def section_ref(cls: type) -> dict[str, Any]:
    if cls in DEFINED:
        return {"$ref": f"#/$defs/{DEFINED[cls]}"}
    return object_schema(cls, described=False)


def object_schema(cls: type, described: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if described and cls.__doc__:
        result["description"] = cls.__doc__.strip().splitlines()[0].replace("``", "`")
    result["type"] = ["object", "null"] if cls in NULLABLE else "object"
    result["additionalProperties"] = False
    fields = attrs.fields_dict(cls)
    required = [key.yaml for name, key in keys_of(cls) if fields[name].default is REQUIRED]
    if required:
        result["required"] = required
    result["properties"] = {
        key.yaml: key_schema(key, fields[name].default) for name, key in keys_of(cls)
    }
    return result


def key_schema(key: Key, value: Any) -> dict[str, Any]:
    shape: dict[str, Any] = {"description": sentence(key.doc), **KINDS[key.kind]}
    if key.kind == "enum":
        shape["enum"] = list(key.choices)
    if key.nullable:
        if "type" in shape:
            shape["type"] = [shape["type"], "null"]
        else:
            ref = shape.pop("$ref")
            shape["oneOf"] = [{"$ref": ref}, {"type": "null"}]
    for facet, bound in (
        ("minimum", key.minimum),
        ("exclusiveMinimum", key.exclusive_minimum),
        ("maximum", key.maximum),
    ):
        if bound is not None:
            shape[facet] = bound
    shape.update(resolve(dict(key.schema)))
    if key.section is not None and "items" not in key.schema:  # a list: its items say it
        if key.each:
            shape["additionalProperties"] = section_ref(key.section)
        elif key.section not in DEFINED:
            inner = object_schema(key.section, described=False)
            del inner["type"]
            shape.update(inner)
        else:
            shape.update(section_ref(key.section))
    if value is not REQUIRED and "default" not in shape:
        shape["default"] = json_default(key, value)
    return shape


def schema() -> dict[str, Any]:
    top = object_schema(settings.Top, described=False)
    properties = top.pop("properties")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "llamaswap configuration",
        "description": DESCRIPTION,
        **top,
        "anyOf": [{"required": ["models"]}, {"required": ["modelsDir"]}],
        "properties": properties,
        "$defs": {
            **SHAPES,
            **{name: object_schema(cls) for cls, name in DEFINED.items()},
        },
    }


def schema_text() -> str:
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"


# --- the docs tables ------------------------------------------------------------------


def shown(key: Key, value: Any) -> str:
    if key.shown is not None:
        return key.shown
    if value is REQUIRED:
        return "required"
    if value is None and key.section is not None:
        return "`{}`"
    if value is None:
        return "none"
    if key.json_default is not None:
        return f"`{key.json_default}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if value == "":
        return '`""`'
    if isinstance(value, tuple):
        return "`[" + ", ".join(value) + "]`"
    return f"`{value}`"


def rows(cls: type, prefix: str = "") -> list[str]:
    """One table row per key of ``cls``; the keys of a nested section with its path."""
    fields = attrs.fields_dict(cls)
    lines = []
    for name, key in keys_of(cls):
        value = fields[name].default
        if key.section is not None and not key.each and key.section not in DEFINED:
            lines += rows(key.section, f"{prefix}{key.yaml}.")
            continue
        lines.append(f"| `{prefix}{key.yaml}` | {shown(key, value)} | {key.doc} |")
        if key.section is settings.ApiKeySettings:
            lines += rows(key.section, f"{prefix}{key.yaml}[].")
        elif key.section is settings.FilterSettings:
            lines += rows(key.section, f"{prefix}{key.yaml}.")
    return lines


TABLES: dict[str, type] = {
    "top": settings.Top,
    "model": settings.ModelSettings,
    "group": settings.GroupSettings,
}


def table(cls: type) -> str:
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows(cls)])


def docs_text(current: str) -> str:
    """``current`` with every generated table replaced by what the declarations say."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"<!-- keys: {name} -->\n{table(TABLES[name])}\n<!-- end keys -->"

    return re.sub(r"<!-- keys: (\w+) -->\n.*?<!-- end keys -->", fill, current, flags=re.S)


def main(argv: list[str]) -> int:
    """Rewrite the generated files; with ``--check``, only say whether they are current."""
    wanted = {
        SCHEMA_FILE: schema_text(),
        DOCS_FILE: docs_text(DOCS_FILE.read_text(encoding="utf-8")),
    }
    stale = [path for path, text in wanted.items() if path.read_text(encoding="utf-8") != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path} is out of date: run python -m llamaswap.config.schema")
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path], encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
