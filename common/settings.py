"""One way to declare and load typed settings: the run configuration's sections and a node's
privacy policy are both frozen dataclasses whose fields carry their help text, built from plain
mappings (TOML, JSON, Flower's run or node config, CLI flags) with unknown keys and wrong types
rejected by name. The CLI's flags and help are generated from the same fields.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def setting(help: str, default: Any = dataclasses.MISSING, *,
            default_factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field whose metadata holds its help text (and, for flags, `flag`, `invert`,
    `shown_default`)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, **meta})


# A field's annotation (a string under `from __future__ import annotations`) -> accepted types.
_ACCEPTED: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
    "list[str]": (list, tuple, str), "float | None": (int, float), "bool | None": (bool,),
}


def coerce(name: str, kind: str, value: Any, error: type[Exception]) -> Any:
    """`value` as the field type `kind` (an int where a float is asked too, "a,b" or a list of
    strings for a list); `error` naming `name` otherwise."""
    accepted = _ACCEPTED[kind]
    if value is None and kind.endswith("| None"):  # unset: the field's default decides
        return None
    if kind == "list[str]":
        if isinstance(value, str):  # Flower's run/node config and CLI flags carry "a,b"
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise error(f"`{name}` must be a list of strings, got {value!r}")
    if isinstance(value, bool) and bool not in accepted:
        raise error(f"`{name}` must be of type {accepted[-1].__name__}, got {value!r}")
    if not isinstance(value, accepted):
        raise error(f"`{name}` must be of type {accepted[-1].__name__}, got {value!r}")
    if float in accepted and not math.isfinite(value):  # NaN, Infinity: JSON and TOML allow them
        raise error(f"`{name}` must be a finite number, got {value!r}")
    return float(value) if float in accepted and not isinstance(value, bool) else value


def build(kind: type, values: Mapping[str, Any], error: type[Exception], *,
          key: Callable[[str], str] = str, label: Callable[[str], str] = str,
          unknown_keys: str = "unknown keys") -> Any:
    """`kind(**values)` after rejecting unknown keys (all named at once) and wrong types.

    `key` maps a field name to its key in `values` (e.g. kebab-case), `label` a key to the name
    errors use (e.g. a dotted `train.lr`), `unknown_keys` opens the error for unknown ones."""
    fields = {key(f.name): f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise error(f"{unknown_keys}: {', '.join(label(k) for k in unknown)}")
    kwargs = {fields[k].name: coerce(label(k), str(fields[k].type), v, error)
              for k, v in values.items()}
    return kind(**kwargs)


def help_of(kind: type, name: str) -> str:
    """The help text of field `name` of `kind`."""
    return next(f.metadata["help"] for f in dataclasses.fields(kind) if f.name == name)


def read_toml(path: str | Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The tables of the TOML file `path`; `error` naming it as `what` (e.g. "config file")
    when it is missing or unreadable."""
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as problem:
        raise error(f"{what} {path} is not readable TOML: {problem}") from None


# How a flag's value is read, by the field's annotation (a list is read as "a,b", a string).
FLAG_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "list[str]": str,
                               "float | None": float, "bool": bool}


def default_of(field: dataclasses.Field) -> Any:
    """A field's default, a factory's value included (a list as "a,b", as flags take it)."""
    if field.default_factory is not dataclasses.MISSING:
        made = field.default_factory()
        return ",".join(made) if isinstance(made, list) else made
    return field.default


def flag_help(field: dataclasses.Field, *, say_unset: bool = False) -> str:
    """A flag's help: the field's own text and its own default. An unset default (off, 0, empty,
    none, whose meaning the text explains) is named only where `say_unset` (a node's policy)."""
    text, default = field.metadata["help"], default_of(field)
    if default is dataclasses.MISSING or default is False or (not default and not say_unset):
        return text
    shown = "none" if default is None else "empty" if default == "" else default
    return f"{text} (default: {shown})"
