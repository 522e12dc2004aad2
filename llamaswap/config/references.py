"""Cross references: groups, profiles, preload, unique names, the default model.

Each is checked against the models already built, with the key path of the
reference that does not hold; each entry on its own (one problem hides no other),
and a reference to a model whose entry failed is no second problem.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from functools import partial

from .objects import Config, GroupConfig, ModelConfig, PoolConfig, resolve_name
from .reader import Reader, _suggest
from .settings import GroupSettings, Hooks, OnStartup, PoolSettings, yaml_names


def groups(
    reader: Reader, value: object, models: Mapping[str, ModelConfig]
) -> dict[str, GroupConfig]:
    if value is None:
        return {}
    owner: dict[str, str] = {}  # a model, and the group it is a member of
    read = partial(_group, reader, models=models, owner=owner)
    return reader.each_entry(reader.mapping(value, "groups"), read)


def _group(
    reader: Reader,
    group_id: str,
    entry: object,
    models: Mapping[str, ModelConfig],
    owner: dict[str, str],
) -> GroupConfig:
    base = f"groups.{group_id}"
    if entry is None:
        reader.mapping(entry, base)
    declared = reader.section(GroupSettings, entry, base)
    members = declared["members"]
    for i, member in enumerate(members):
        where = f"{base}.members[{i}]"
        _known(reader, where, member, models)
        if member in members[:i]:
            raise reader.fail(where, f"{member!r} is listed twice")
        if member in owner:
            raise reader.fail(where, f"{member!r} is already a member of group {owner[member]!r}")
    owner.update(dict.fromkeys(members, group_id))
    return GroupConfig(id=group_id, **declared)


def profiles(
    reader: Reader, value: object, models: Mapping[str, ModelConfig]
) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    read = partial(_profile, reader, models=models)
    return reader.each_entry(reader.mapping(value, "profiles"), read, referenced=True)


def _profile(
    reader: Reader, name: object, members: object, models: Mapping[str, ModelConfig]
) -> tuple[str, ...]:
    base = f"profiles.{name}"
    if not isinstance(name, str) or not name or ":" in name:
        raise reader.fail(base, "profile names are non-empty and contain no ':'")
    ids = reader.string_list(members, base)
    if not ids:
        raise reader.fail(base, "a profile needs at least one model")
    for i, member in enumerate(ids):
        _known(reader, f"{base}[{i}]", member, models)
    return tuple(dict.fromkeys(ids))


def preload(reader: Reader, value: object, models: Mapping[str, ModelConfig]) -> tuple[str, ...]:
    if value is None:
        return ()
    hooks = reader.mapping(value, "hooks")
    reader.check_keys(hooks, "hooks", yaml_names(Hooks))
    startup = reader.mapping(hooks.get("on_startup", {}), "hooks.on_startup")
    reader.check_keys(startup, "hooks.on_startup", yaml_names(OnStartup))
    ids = []
    for i, name in enumerate(
        reader.string_list(startup.get("preload", []), "hooks.on_startup.preload")
    ):
        model = resolve_name(name, models)
        if model is not None:
            ids.append(model.id)
        else:  # a problem, unless it names an entry that failed
            _known(reader, f"hooks.on_startup.preload[{i}]", name, models)
    return tuple(ids)


def check_names_unique(reader: Reader, models: Mapping[str, ModelConfig]) -> None:
    """No alias is another model's id or alias: each model's first clash is said."""
    owner: dict[str, str] = {}
    for model in models.values():
        reader.attempt(partial(_names_unique, reader, model, models, owner), None)


def _names_unique(
    reader: Reader, model: ModelConfig, models: Mapping[str, ModelConfig], owner: dict[str, str]
) -> None:
    for i, alias in enumerate(model.names):
        where = (
            f"models.{model.id}.aliases[{i}]"
            if i < len(model.aliases)
            else f"models.{model.id}.filters.setParamsByID.{alias}"
        )
        if alias in models:
            raise reader.fail(where, f"alias {alias!r} is already a model id")
        if alias in owner:
            raise reader.fail(where, f"alias {alias!r} is also used by {owner[alias]!r}")
        owner[alias] = model.id


def check_default_model(reader: Reader, config: Config) -> None:
    """``defaultModel`` names a model, alias, variant or ``profile:model``."""
    name = config.default_model
    if name is None or config.lookup(name) is not None or name in config.pools:
        return
    if any(reader.unchecked(part) for part in (name, *name.split(":", 1))):
        return  # it names an entry that failed (said already)
    models = config.models
    names = tuple(models) + tuple(n for m in models.values() for n in m.names)
    raise reader.fail("defaultModel", f"unknown model {name!r}" + _suggest(name, names, "models"))


def pools(
    reader: Reader, value: object, models: Mapping[str, ModelConfig]
) -> dict[str, PoolConfig]:
    """``pools``: each member a model id; a pool's name is no model's id or alias."""
    if value is None:
        return {}
    taken = {name for m in models.values() for name in m.names}
    read = partial(_pool, reader, models=models, taken=taken)
    return reader.each_entry(reader.mapping(value, "pools"), read, referenced=True)


def _pool(
    reader: Reader,
    pool_id: object,
    entry: object,
    models: Mapping[str, ModelConfig],
    taken: Collection[str],
) -> PoolConfig:
    base = f"pools.{pool_id}"
    if not isinstance(pool_id, str) or not pool_id.strip() or ":" in pool_id:
        raise reader.fail(base, "pool names are non-empty and contain no ':'")
    if pool_id in models or pool_id in taken:
        raise reader.fail(base, f"{pool_id!r} is already a model id or alias")
    declared = reader.section(PoolSettings, reader.mapping(entry, base), base)
    ids = declared.pop("models")
    if not ids:
        raise reader.fail(f"{base}.models", "a pool needs at least one model")
    for i, member in enumerate(ids):
        _known(reader, f"{base}.models[{i}]", member, models)
    return PoolConfig(id=pool_id, models=tuple(dict.fromkeys(ids)), **declared)


def _known(reader: Reader, where: str, member: str, models: Mapping[str, ModelConfig]) -> None:
    """A model id a group, profile or pool lists: unknown is a problem, unless it may
    be an entry that failed (its own problem is said already)."""
    if member not in models and not reader.unchecked(member):
        written = (*models, *reader.failed_models)  # the hint lists every entry written
        raise reader.fail(where, f"unknown model {member!r}" + _suggest(member, written, "models"))
