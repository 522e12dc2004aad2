"""Reading YAML values by their declarations, with the key path in every error."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import attrs

from ..resources import parse_size
from .settings import REQUIRED, keys_of, yaml_names

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, located by file and key path."""

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source = source
        self.path = path
        self.message = message
        where = f"{source}: {path}: " if path else f"{source}: "
        super().__init__(where + message)

    @property
    def problems(self) -> tuple[ConfigError, ...]:
        """Each problem found, one per independent part of the file: this one."""
        return (self,)


class AlreadySaid(ConfigError):
    """A part that cannot be checked because of a problem noted elsewhere (it uses a
    macro that failed): it fails, with no second problem of its own."""


class ConfigProblems(ConfigError):
    """Several independent problems in one file, said in one go (a line each: the
    file, the key path, what is wrong), so a file with three mistakes takes one run
    to fix, not three.  Like any ConfigError it reads ``<file>: <message>``; here the
    path is empty (the file as a whole) and the message counts and lists them."""

    def __init__(self, source: str, problems: Sequence[ConfigError]) -> None:
        lines = "\n".join(str(problem) for problem in problems)
        super().__init__(source, "", f"{len(problems)} problems:\n{lines}")
        self._problems = tuple(problems)

    @property
    def problems(self) -> tuple[ConfigError, ...]:
        return self._problems


def _suggest(key: str, allowed: tuple[str, ...], known: str = "keys") -> str:
    """A hint after an unknown name: the close one, else every ``known`` one, each
    once in the order given (an alias clashing with an id is a problem said apart)."""
    allowed = tuple(dict.fromkeys(allowed))
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known {known}: {', '.join(allowed)})"


class Reader:
    """Shapes (a map, a number, ...) and declared sections, read at a key path."""

    def __init__(self, source: str, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ
        self.cli_models_dirs: tuple[str, ...] = ()
        self.found: list[ConfigError] = []  # the problems so far
        self.passed_over: list[AlreadySaid] = []  # parts left unchecked (see AlreadySaid)
        self.sections: tuple[str, ...] = ()  # the top-level keys, in the file's order
        # names (ids, aliases, profiles, pools) of entries that failed: a reference
        # to one is not a second problem; None: which models exist is not known
        self.failed_names: set[str] | None = set()
        self.failed_models: list[str] = []  # their ids, for the "known models" hint

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(self.source, path, message)

    def attempt(self, read: Callable[[], T], fallback: T) -> T:
        """What ``read`` returns, or ``fallback`` with its problem noted: a mistake in
        one part of the file does not hide one in the next (see :meth:`finish`)."""
        try:
            return read()
        except ConfigError as e:
            self.note(e)
            return fallback

    def note(self, problem: ConfigError) -> None:
        """Keep ``problem`` (each of several) for :meth:`finish`; one whose cause is
        noted already only as a part passed over."""
        for each in problem.problems:
            if isinstance(each, AlreadySaid):
                self.passed_over.append(each)
            else:
                self.found.append(each)

    def whole(self, read: Callable[[], T | None]) -> T:
        """What ``read`` returns, ``read`` being one entry whose parts are each read in
        an :meth:`attempt`: the entry fails with every problem of its parts at once
        (``read`` returns None when one failed), or passed over when it uses a broken
        macro and has no problem of its own."""
        outer, self.found = self.found, []
        outer_passed, self.passed_over = self.passed_over, []
        try:
            result = read()
        except ConfigError as e:  # a part without which the rest is not read
            self.note(e)
            result = None
        finally:
            problems, self.found = self.found, outer
            passed, self.passed_over = self.passed_over, outer_passed
        if len(problems) > 1:
            raise ConfigProblems(self.source, problems)
        if problems or passed:
            raise (problems or passed)[0]
        if result is None:
            raise AssertionError("an entry read nothing, with no problem said")
        return result

    def failing(self) -> bool:
        """Whether a part of what is being read had a problem (or was passed over)."""
        return bool(self.found or self.passed_over)

    def each_entry(
        self, doc: Mapping[Any, Any], read: Callable[[Any, Any], T], referenced: bool = False
    ) -> dict[Any, T]:
        """``read(name, entry)`` of each entry of the map ``doc``, each on its own: one
        with a problem is noted and left out (and, ``referenced``, so is a reference
        to its name)."""
        found: dict[Any, T] = {}
        for name, entry in doc.items():
            try:
                found[name] = read(name, entry)
            except ConfigError as e:
                self.note(e)
                if referenced:
                    self.entry_failed(str(name))
        return found

    def gathered(self) -> ConfigError:
        """The problems found (at least one): one as itself, several as one error,
        in the order of the sections they are in (as the file has them)."""
        if len(self.found) == 1:
            return self.found[0]

        def place(problem: ConfigError) -> int:
            path = problem.path
            return next(
                (
                    i
                    for i, key in enumerate(self.sections)
                    if path == key or path.startswith((f"{key}.", f"{key}["))
                ),
                -1,  # the file as a whole, or the command line
            )

        return ConfigProblems(self.source, sorted(self.found, key=place))

    def finish(self) -> None:
        """Raise the problems found, if any."""
        if self.found:
            raise self.gathered()

    def entry_failed(self, *names: str) -> None:
        """Note the names an entry that failed would have given."""
        if self.failed_names is not None:
            self.failed_names.update(names)

    def unchecked(self, name: str) -> bool:
        """Whether a reference to ``name`` goes unchecked: it may name an entry that
        failed, whose problem is already said."""
        return self.failed_names is None or name in self.failed_names

    def section(
        self,
        cls: type,
        value: object,
        path: str,
        fallback: Mapping[str, Any] | None = None,
        every_key: bool = False,
    ) -> dict[str, Any]:
        """The simple keys of section ``cls`` in ``value`` (a map or null), by field name.

        Unknown keys are refused; a missing key takes ``fallback`` or its declared
        default; keys of kind ``custom`` are left to the caller.  ``every_key`` (in
        :meth:`whole`): each key on its own, a wrong one noted and given its default.
        """
        doc = self.mapping(value if value is not None else {}, path)
        if every_key:
            for written in doc:
                self.attempt(partial(self.check_keys, {written: None}, path, yaml_names(cls)), None)
        else:
            self.check_keys(doc, path, yaml_names(cls))
        fields = attrs.fields_dict(cls)
        values: dict[str, Any] = {}
        for name, key in keys_of(cls):
            if key.kind == "custom":
                continue
            required = fields[name].default is REQUIRED
            if fallback is not None and name in fallback:
                otherwise, required = fallback[name], False
            else:
                otherwise = None if required else fields[name].default
            read = partial(self._key, key, doc, path, otherwise, required)
            values[name] = self.attempt(read, otherwise) if every_key else read()
        return values

    def _key(
        self, key: Any, doc: Mapping[str, Any], path: str, otherwise: Any, required: bool
    ) -> Any:
        """The value of declared ``key`` in ``doc``; ``otherwise`` when not given."""
        where = f"{path}.{key.yaml}" if path else key.yaml
        if key.yaml not in doc:
            if required:
                raise self.fail(where, "required key is missing")
            return otherwise
        raw = doc[key.yaml]
        if raw is None and key.nullable:
            return None
        return self.value(key, raw, where)

    def value(self, key: Any, raw: object, where: str) -> Any:
        """One declared value, checked against its kind and bounds."""
        if key.kind == "size":
            return self.size(raw, where)
        if key.kind == "texts":
            return tuple(self.string_list(raw, where))
        if key.kind == "text":
            return self.string(raw, where)
        if key.kind == "boolean":
            return self.boolean(raw, where)
        if key.kind == "enum":
            text = self.string(raw, where)
            if text not in key.choices:
                message = key.message or "must be one of {choices}, got {value!r}"
                raise self.fail(where, message.format(choices=", ".join(key.choices), value=text))
            return text
        number: float = (
            self.integer(raw, where) if key.kind == "integer" else self.number(raw, where)
        )
        low_ok = key.minimum is None or number >= key.minimum
        above = key.exclusive_minimum is None or number > key.exclusive_minimum
        high_ok = key.maximum is None or number <= key.maximum
        if not (low_ok and above and high_ok):
            if key.message:
                message = key.message
            elif key.exclusive_minimum == 0:
                message = "must be a positive number, got {value!r}"
            elif key.minimum == 0:
                message = "must be 0 or more, got {value!r}"
            else:
                message = "must be at least {minimum}, got {value!r}"
            minimum = int(key.minimum) if key.minimum is not None else None
            raise self.fail(where, message.format(value=number, minimum=minimum))
        return number

    def size(self, value: object, path: str) -> int:
        try:
            size = parse_size(value)
        except ValueError as e:
            raise self.fail(path, f"expected {e}, got {_describe(value)}") from e
        if size <= 0:
            raise self.fail(path, f"must be more than 0, got {value!r}")
        return size

    def limit(self, value: object, path: str) -> int:
        number = self.integer(value, path)
        if number < 1:
            raise self.fail(path, f"must be at least 1, got {number!r}")
        return number

    def mapping(self, value: object, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path or "(top level)", f"expected a map, got {_describe(value)}")
        return value

    def string(self, value: object, path: str) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(path, f"expected a string, got {_describe(value)}")
        return str(value)

    def not_negative(self, value: object, path: str) -> float:
        number = self.number(value, path)
        if number < 0:
            raise self.fail(path, f"must be 0 or more, got {number!r}")
        return number

    def positive(self, value: object, path: str) -> float:
        number = self.number(value, path)
        if number <= 0:
            raise self.fail(path, f"must be a positive number, got {number!r}")
        return number

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


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
