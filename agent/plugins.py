"""What every plugin (source, sink, service) shares: a strict config class tagged by `kind`, a registry
built from the plugin classes, and the pydantic discriminated union the agent config is validated with.

A plugin class names its config class (`config_class`); the config class carries the `kind` tag as a
one-value Literal. Registries and unions are derived from the list of plugin classes, so adding a plugin
is its own file plus one line in that list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field

from lineside.agent.errors import ConfigError

QueuePolicy = Literal["drop_oldest", "block"]


class StrictConfig(BaseModel):
    """Base of every config section: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid")

    def problems(self, key: str) -> list[str]:
        """What can be checked without starting (paths exist, are readable or writable), as 'key: message'."""
        return []


class Plugin:
    """Mixin of plugin classes: the config class that selects and configures them."""

    config_class: ClassVar[type[StrictConfig]]


def kind_of(config_class: type[StrictConfig]) -> str:
    """The `kind` tag of a plugin config class (its `kind: Literal["..."]` field)."""
    field = config_class.model_fields.get("kind")
    values = get_args(field.annotation) if field is not None else ()
    if len(values) != 1 or not isinstance(values[0], str):
        raise TypeError(f"{config_class.__name__} needs a field `kind: Literal['<name>']`")
    return values[0]


def registry(plugins: Sequence[type[Plugin]], what: str) -> dict[str, type[Plugin]]:
    """kind -> plugin class; refuses two plugins with one kind."""
    out: dict[str, type[Plugin]] = {}
    for plugin in plugins:
        kind = kind_of(plugin.config_class)
        if kind in out:
            raise TypeError(f"{what} kind {kind!r} is registered twice ({out[kind].__name__}, {plugin.__name__})")
        out[kind] = plugin
    return out


def config_union(plugins: Sequence[type[Plugin]]) -> Any:
    """The discriminated union of the plugins' config classes, for a pydantic field."""
    classes = tuple(p.config_class for p in plugins)
    member = classes[0] if len(classes) == 1 else Union[classes]  # noqa: UP007 - built at run time
    return Annotated[member, Field(discriminator="kind")]


def plugin_for(table: dict[str, type[Plugin]], config: StrictConfig, what: str, key: str) -> type[Plugin]:
    """The plugin class a config selects; ConfigError naming the key for an unknown kind."""
    kind = getattr(config, "kind", None)
    plugin = table.get(str(kind))
    if plugin is None or not isinstance(config, plugin.config_class):
        raise ConfigError(
            f"unknown {what} kind {kind!r}; expected one of {sorted(table)}",
            [f"{key}.kind: unknown kind {kind!r}, expected one of {sorted(table)}"],
        )
    return plugin


def path_problems(
    path: Path | None, key: str, *, kind: str = "dir", write: bool = False, create: bool = False
) -> list[str]:
    """What keeps `path` from being used as `kind` ('dir' or 'file'), as 'key: message' lines.

    `create`: a missing path is fine when its nearest existing parent is a writable folder (it is
    made at start). `write`: the path (or, for a file, its folder) must be writable. Checked as the
    user running the command, so run check-config as the service user.
    """
    if path is None:
        return []
    path = Path(path)
    if not path.exists():
        if not create:
            return [f"{key}: {path} does not exist"]
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            return [f"{key}: {path} does not exist and cannot be created ({parent} is not writable)"]
        return []
    if kind == "dir" and not path.is_dir():
        return [f"{key}: {path} is not a folder"]
    if kind == "file" and path.is_dir():
        return [f"{key}: {path} is a folder, expected a file"]
    needed = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, needed):
        return [f"{key}: {path} is not readable"]
    target = path if path.is_dir() else path.parent
    if write and not os.access(target, os.W_OK | os.X_OK):
        return [f"{key}: {target} is not writable"]
    return []
