"""``${name}`` macros: global and per-model ones, ``${env.NAME}``, and run-time ones."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from functools import partial
from typing import Any

import yaml

from .reader import AlreadySaid, Reader

RESERVED_MACROS = frozenset({"PORT", "MODEL_ID", "PID"})
MACRO_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
MACRO_REF = re.compile(r"\$\{([^}]*)\}")


class MacroReader(Reader):
    """A :class:`Reader` that also fills in macros."""

    # the global macros that failed (each said once): a use of one is no second problem
    broken_macros: frozenset[str] = frozenset()
    macros_unread = False  # the global ``macros`` is no map: no use of a macro is checked

    def global_macros(self, value: object) -> dict[str, str]:
        """The top-level ``macros``, each on its own: one that fails leaves out itself
        and the places that use it (see :class:`AlreadySaid`), not the rest of the file."""
        macros: dict[str, str] = {}
        if value is None:
            return macros
        doc = self.attempt(lambda: self.mapping(value, "macros"), None)
        if doc is None:
            self.macros_unread = True
            return macros
        for name, raw in doc.items():
            read = self.attempt(partial(self.macro, name, raw, "macros", macros), None)
            if read is None:  # a later macro may use it
                self.broken_macros |= {str(name)}
            else:
                macros[name] = read
        return macros

    def own_macros(self, value: object, path: str, inherited: Mapping[str, str]) -> dict[str, str]:
        """A model's ``macros`` over the global ones."""
        macros: dict[str, str] = dict(inherited)
        if value is None:
            return macros
        for name, raw in self.mapping(value, path).items():
            macros[name] = self.macro(name, raw, path, macros)
        return macros

    def macro(self, name: object, raw: object, path: str, macros: Mapping[str, str]) -> str:
        """The value of the macro ``name`` of the map at ``path``."""
        where = f"{path}.{name}"
        if not isinstance(name, str) or not MACRO_NAME.match(name):
            raise self.fail(where, "macro names use letters, digits, '_' and '-' only")
        if name in RESERVED_MACROS:
            raise self.fail(where, f"{name} is reserved and filled in by llamaswap")
        # a macro may use the macros defined before it; ${PORT}, ${MODEL_ID}
        # and ${PID} stay for the place the macro is used in
        return self.expand(self.string(raw, where), where, macros, RESERVED_MACROS)

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
            if name in self.broken_macros or self.macros_unread:
                raise AlreadySaid(
                    self.source, path, f"${{{name}}}: the macro has a problem (said apart)"
                )
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
