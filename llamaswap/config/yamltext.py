"""The YAML text of a configuration: parsed strictly, its errors told by line.

PyYAML keeps the last of two equal keys without a word, so a model pasted twice
(or a setting given twice) would silently lose its first entry; here that is an
error at the second one.  Syntax errors name the file, the line and the column
instead of ``"<unicode string>"`` (without quoting the line, which may hold a
key, nor a name PyYAML read from it: a key that starts with ``*`` or ``!`` is an
alias or a tag to it), and a tab gets the one hint that fixes it.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode

from .reader import ConfigError


class _RepeatedKey(ConstructorError):
    """A key given twice in one map: valid YAML, but surely not what was meant."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key given twice in one map."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        # each map's keys as written: merging ``<<: *b`` writes the keys ``b`` merges
        # into ``b``'s own node, which may be built after that (its overrides are no
        # repeated keys)
        self._written: dict[int, list[Node]] = {}

    def compose_mapping_node(self, anchor: Any) -> MappingNode:  # its name (stubs: dict)
        node = super().compose_mapping_node(anchor)
        self._written[id(node)] = [key for key, _ in node.value]
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Node] = {}
        for key_node in self._written.get(id(node), [key for key, _ in node.value]):
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys are YAML's merge, not a repeated key
            if not isinstance(key_node, ScalarNode):
                continue  # a list or map is no key (unhashable): reported below
            key = self.construct_object(key_node)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: construct_mapping below reports it
            if first is not None:
                raise _RepeatedKey(
                    None,
                    None,
                    f"{key!r} is given twice in the same map (first on line "
                    f"{first.start_mark.line + 1}); YAML would keep only the last one",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> object:
    """The document in ``text``, or a :class:`ConfigError` that says where it is wrong."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(source, "", _describe(e)) from e
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"not valid YAML: {e}") from e
    except RecursionError as e:  # PyYAML reads each level of nesting in a call of its own
        raise ConfigError(source, "", "not valid YAML: nested too deeply") from e


# a name PyYAML quotes from the text (an alias, a tag): more than a character or an
# escape, and not a token's name ('<block end>'); it may be a key
_QUOTED_NAME = re.compile(r"'(?!<)[^']{3,}'")


def _unquoted(text: str) -> str:
    return _QUOTED_NAME.sub("(not shown)", text)


def _describe(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark
    message = "" if isinstance(error, _RepeatedKey) else "not valid YAML: "
    if mark is not None:
        message += f"line {mark.line + 1}, column {mark.column + 1}: "
    problem = error.problem or "cannot be read"
    message += problem if isinstance(error, _RepeatedKey) else _unquoted(problem)
    if error.context:
        start = error.context_mark
        since = f" at line {start.line + 1}, column {start.column + 1}" if start else ""
        message += f" ({_unquoted(error.context)}{since})"
    if "'\\t'" in message:
        message += "; YAML indents with spaces only: replace the tab with spaces"
    return message  # no snippet of the line: it may hold a key (apiKeys, upstreamApiKey)
