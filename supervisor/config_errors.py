"""Where a config problem is, and how to say it: field paths, environment names, the fix.

pydantic reports a problem as a location (``("tasks", "items", 3, "issue")``) in its own words;
the user needs one paragraph naming the file, the field -- or the flag or the environment
variable that set it --, what is wrong and the fix.  This module turns the one into the other:
:class:`FieldNames` knows a config model's fields as dotted paths and as ``AGENTIZE_FLEET_*``
variables (built once from :class:`supervisor.config.FleetConfig`), suggests the nearest key for
a misspelt one, warns about variables no field reads, and :meth:`FieldNames.describe` writes the
message of each problem.  :func:`supervisor.config.load_config` raises the result as a
:class:`ConfigError`.
"""

from __future__ import annotations

import difflib
import inspect
import json
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel


class ConfigError(Exception):
    """The config cannot be used; the message says where, what and how to fix it."""


class FieldsError(ValueError):
    """A rule over several fields broke: ``fields`` names them (dotted paths), for the message.

    A model validator's plain ValueError reaches the message as ``(top level)``; this one
    carries the fields the user has to look at.
    """

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


# -- where a field is, what it is called in the environment ------------------------------------


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` → ``X``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (``X``, or the ``X`` of ``list[X]``), if any."""
    inner = _unwrap(annotation)
    if get_origin(inner) is list:
        inner = _unwrap(get_args(inner)[0])
    return inner if inspect.isclass(inner) and issubclass(inner, BaseModel) else None


def _settable(model: type[BaseModel]) -> Iterator[tuple[str, Any]]:
    for name, info in model.model_fields.items():
        if not info.exclude:
            yield name, info.annotation


def _env_names(root: type[BaseModel], prefix: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """Every ``AGENTIZE_FLEET_*`` name a field reads → its kind (``scalar``, ``list``, ``dict``,
    ``table``), and the prefixes under which any name is a key of a dict field."""
    names: dict[str, str] = {}
    open_prefixes: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for field, annotation in _settable(model):
            env = prefix + field.upper()
            inner = _unwrap(annotation)
            nested = _model(annotation)
            if nested is not None and get_origin(inner) is not list:
                names[env] = "table"
                walk(nested, env + "__")
            elif get_origin(inner) is dict:
                names[env] = "dict"
                open_prefixes.append(env + "__")
            elif get_origin(inner) in (list, tuple, set) or nested is not None:
                names[env] = "list"
            else:
                names[env] = "scalar"

    walk(root, prefix)
    return names, tuple(open_prefixes)


def _nearest(word: str, candidates: list[str]) -> str | None:
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


_EXAMPLES = {
    "list": '\'["claude","-p","{prompt}"]\'',
    "dict": '\'{"KEY":"value"}\'',
    "table": '\'{"field":"value"}\'',
}


def _path(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "items" or loc[0] != "tasks")


def _fix_hint(field: str, error_type: str) -> str:
    if error_type == "missing":
        return "add it to the file (or set the environment variable)"
    if field.endswith("concurrency"):
        return "set it to 1 or more"
    if error_type.startswith(("int", "float", "bool", "string", "list", "dict")):
        return "give a value of the right type, as in configs/fleet.example.toml"
    return "see configs/fleet.example.toml for a valid value"


def _task_label(path: str, data: Mapping[str, Any]) -> str:
    """`` (issue 42)`` for a field of the 3rd ``[[tasks]]`` entry whose issue is 42."""
    parts = path.split(".")
    if len(parts) < 2 or parts[0] != "tasks" or not parts[1].isdigit():
        return ""
    tasks = data.get("tasks")
    items = tasks.get("items") if isinstance(tasks, dict) else tasks
    try:
        issue = items[int(parts[1])].get("issue")  # type: ignore[index]
    except (TypeError, IndexError, AttributeError):
        return ""
    return f" (issue {issue})" if isinstance(issue, int) and not isinstance(issue, bool) else ""


class FieldNames:
    """A config model's fields by their names: dotted paths in the file (``restart.max_crashes``)
    and environment variables (``AGENTIZE_FLEET_RESTART__MAX_CRASHES``, nested with ``__``).

    ``run_env`` are variables under ``prefix`` that are not config (the fleet sets them in every
    run's environment): never warned about.
    """

    def __init__(
        self, root: type[BaseModel], prefix: str, run_env: frozenset[str] = frozenset()
    ) -> None:
        self.root = root
        self.prefix = prefix
        self.run_env = run_env
        self.env_names, self.env_open = _env_names(root, prefix)

    def keys_at(self, loc: tuple[str | int, ...]) -> list[str]:
        """The keys the config accepts in the table that holds ``loc``'s last part."""
        model: type[BaseModel] | None = self.root
        for part in loc[:-1]:
            if model is None:
                return []
            if isinstance(part, int):
                continue
            fields = dict(_settable(model))
            if part not in fields:
                return []
            model = _model(fields[part])
        return [] if model is None else [name for name, _ in _settable(model)]

    def env_field(self, name: str) -> str | None:
        """The kind of field ``name`` sets (``scalar``, ``list``, ``dict``, ``table``, ``key`` for
        one key of a dict field), or None when it is no config field's name."""
        upper = name.upper()
        if upper in self.env_names:
            return self.env_names[upper]
        if upper.startswith(self.env_open) and not upper.endswith("__"):
            return "key"
        return None

    def env_of(self, path: str) -> str | None:
        """The variable that sets the field at dotted ``path`` (None inside a list)."""
        if any(part.isdigit() for part in path.split(".")):
            return None
        name = self.prefix + path.upper().replace(".", "__")
        return name if name in self.env_names else None

    def check_environment(self, environ: Mapping[str, str], warn: Callable[[str], None]) -> None:
        """Warn about ``AGENTIZE_FLEET_*`` variables no field reads; refuse malformed JSON ones.

        pydantic-settings ignores a variable whose name is no field's (a typo would silently do
        nothing) and reports JSON it cannot parse as its own internals; both are said here in
        the user's words instead.
        """
        known = sorted(self.env_names)
        for name in sorted(environ):
            if not name.upper().startswith(self.prefix) or name.upper() in self.run_env:
                continue
            kind = self.env_field(name)
            if kind is None:
                near = _nearest(name.upper(), known)
                hint = f"; did you mean {near}?" if near else ""
                warn(f"environment variable {name} is not a config field and is ignored{hint}")
                continue
            if kind in _EXAMPLES:
                try:
                    json.loads(environ[name])
                except ValueError:
                    what = {"list": "a list", "dict": "a table of keys", "table": "a table"}[kind]
                    more = f" (or set one key as {name}__KEY=value)" if kind == "dict" else ""
                    raise ConfigError(
                        f"environment variable {name}={environ[name]!r}: {what} is expected, "
                        f"written as JSON; fix: e.g. {name}={_EXAMPLES[kind]}{more}."
                    ) from None

    def describe(
        self,
        error: Any,
        file: Path,
        data: Mapping[str, Any],
        flags: Mapping[str, str],
        environ: Mapping[str, str],
    ) -> str:
        """One problem: which field (from the file, a flag or a variable), what is wrong, the
        fix."""
        loc: tuple[str | int, ...] = tuple(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        cause = (error.get("ctx") or {}).get("error")
        if not loc and isinstance(cause, FieldsError):
            fields = " and ".join(f"`{f}`" for f in cause.fields)
            label = "".join(_task_label(f, data) for f in cause.fields[:1])
            noun = "fields" if len(cause.fields) > 1 else "field"
            return f"{file}: {noun} {fields}{label}: {message}"
        path = _path(loc) or "(top level)"
        got = ""
        if error["type"] != "missing" and "input" in error and not isinstance(error["input"], dict):
            got = f" (got {error['input']!r})"
        if error["type"] == "extra_forbidden":
            near = _nearest(str(loc[-1]), self.keys_at(loc))
            fix = (
                f"did you mean `{near}`?"
                if near
                else "remove it or check its spelling against configs/fleet.example.toml"
            )
            return f"{file}: field `{path}`{_task_label(path, data)}: unknown key{got}; fix: {fix}"
        if "; fix: " not in message:
            message += f"; fix: {_fix_hint(path, str(error['type']))}"
        top = str(loc[0]) if loc else ""
        if top in flags and len(loc) == 1:
            return f"{flags[top]} {error.get('input')!r}: {message}"
        env = self.env_of(path)
        if env is not None and env in environ:
            return (
                f"environment variable {env}={environ[env]!r} (overrides field `{path}` of "
                f"{file}): {message}"
            )
        hint = f" [env override: {env}]" if env is not None else ""
        where = f"{file}: field `{path}`{_task_label(path, data)}"
        if "; fix: " in message and got:
            what, fix = message.split("; fix: ", 1)
            return f"{where}: {what}{got}; fix: {fix}{hint}"
        return f"{where}: {message}{hint}"
