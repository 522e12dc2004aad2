"""Cross references: groups, profiles, preload, unique names, the default model.

Each is checked against the models already built, with the key path of the
reference that does not hold.
"""

from __future__ import annotations

from collections.abc import Mapping

from .objects import Config, GroupConfig, ModelConfig, PoolConfig, resolve_name
from .reader import Reader, _suggest
from .settings import GroupSettings, Hooks, OnStartup, PoolSettings, yaml_names


def groups(
    reader: Reader, value: object, models: Mapping[str, ModelConfig]
) -> dict[str, GroupConfig]:
    if value is None:
        return {}
    groups: dict[str, GroupConfig] = {}
    owner: dict[str, str] = {}
    for group_id, entry in reader.mapping(value, "groups").items():
        base = f"groups.{group_id}"
        if entry is None:
            reader.mapping(entry, base)
        declared = reader.section(GroupSettings, entry, base)
        members = declared["members"]
        for i, member in enumerate(members):
            where = f"{base}.members[{i}]"
            if member not in models:
                raise reader.fail(
                    where, f"unknown model {member!r}" + _suggest(member, tuple(models), "models")
                )
            if member in owner:
                other = owner[member]
                raise reader.fail(
                    where,
                    f"{member!r} is listed twice"
                    if other == group_id
                    else f"{member!r} is already a member of group {other!r}",
                )
            owner[member] = group_id
        groups[group_id] = GroupConfig(id=group_id, **declared)
    return groups


def profiles(
    reader: Reader, value: object, models: Mapping[str, ModelConfig]
) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    profiles: dict[str, tuple[str, ...]] = {}
    for name, members in reader.mapping(value, "profiles").items():
        base = f"profiles.{name}"
        if not isinstance(name, str) or not name or ":" in name:
            raise reader.fail(base, "profile names are non-empty and contain no ':'")
        ids = reader.string_list(members, base)
        if not ids:
            raise reader.fail(base, "a profile needs at least one model")
        for i, member in enumerate(ids):
            if member not in models:
                raise reader.fail(
                    f"{base}[{i}]",
                    f"unknown model {member!r}" + _suggest(member, tuple(models), "models"),
                )
        profiles[name] = tuple(dict.fromkeys(ids))
    return profiles


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
        if model is None:
            raise reader.fail(
                f"hooks.on_startup.preload[{i}]",
                f"unknown model {name!r}" + _suggest(name, tuple(models), "models"),
            )
        ids.append(model.id)
    return tuple(ids)


def check_names_unique(reader: Reader, models: Mapping[str, ModelConfig]) -> None:
    owner: dict[str, str] = {}
    for model in models.values():
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
    if config.default_model is None or config.lookup(config.default_model) is not None:
        return
    if config.default_model in config.pools:
        return
    models = config.models
    names = tuple(models) + tuple(n for m in models.values() for n in m.names)
    raise reader.fail(
        "defaultModel",
        f"unknown model {config.default_model!r}" + _suggest(config.default_model, names, "models"),
    )


def pools(
    reader: Reader, value: object, models: Mapping[str, ModelConfig]
) -> dict[str, PoolConfig]:
    """``pools``: each member a model id; a pool's name is no model's id or alias."""
    if value is None:
        return {}
    taken = {name for m in models.values() for name in m.names}
    found: dict[str, PoolConfig] = {}
    for pool_id, entry in reader.mapping(value, "pools").items():
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
            if member not in models:
                raise reader.fail(
                    f"{base}.models[{i}]",
                    f"unknown model {member!r}" + _suggest(member, tuple(models), "models"),
                )
        found[pool_id] = PoolConfig(id=pool_id, models=tuple(dict.fromkeys(ids)), **declared)
    return found
