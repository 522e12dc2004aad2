"""The YAML text of a configuration: parsed strictly, its errors told by line.

PyYAML keeps the last of two equal keys without a word, so a model pasted twice
(or a setting given twice) would silently lose its first entry; here that is an
error at the second one.  Syntax errors name the file, the line and the column
instead of ``"<unicode string>"`` (without quoting the line, which may hold a
key), and a tab gets the one hint that fixes it.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node

from .reader import ConfigError


class _RepeatedKey(ConstructorError):
    """A key given twice in one map: valid YAML, but surely not what was meant."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key given twice in one map."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys are YAML's merge, not a repeated key
            key = self.construct_object(key_node, deep=True)
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


def _describe(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark
    message = "" if isinstance(error, _RepeatedKey) else "not valid YAML: "
    if mark is not None:
        message += f"line {mark.line + 1}, column {mark.column + 1}: "
    message += error.problem or "cannot be read"
    if error.context:
        start = error.context_mark
        since = f" at line {start.line + 1}, column {start.column + 1}" if start else ""
        message += f" ({error.context}{since})"
    if "'\\t'" in message:
        message += "; YAML indents with spaces only: replace the tab with spaces"
    return message  # no snippet of the line: it may hold a key (apiKeys, upstreamApiKey)
