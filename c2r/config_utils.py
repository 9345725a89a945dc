"""Building the per-component config dataclasses from plain dicts (JSON files, CLI overrides).

Unknown keys are errors that name the key and the valid ones: a typo in a config must never be silently ignored.
Values are checked against the field's type before the dataclass sees them, so ``--set model.moe.num_experts=abc``
says which key wants which type rather than failing in a comparison deep inside a validator.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into fields whose type is itself a dataclass."""
    section = f"config section {where!r}" if where else "the config's top level"
    if not isinstance(data, dict):
        raise TypeError(f"{section} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {section}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        field_type, key = hints[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(field_type):
            if not isinstance(value, dict):
                keys = [f.name for f in dataclasses.fields(field_type)]
                raise ValueError(f"{key} is a config section (keys {keys}), not a value; got {value!r}")
            value = config_from_dict(field_type, value, key)
        else:
            value = typed_value(key, value, field_type)
        kwargs[name] = value
    return cls(**kwargs)


# What each scalar type accepts from JSON (and from ``--set``, whose values are parsed as JSON). bool is an int in
# Python, so it is refused explicitly where a number is wanted; an int is a fine float.
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def typed_value(key: str, value: Any, field_type: Any) -> Any:
    """``value`` if it fits ``field_type`` (int, float, bool, str, or one of them | None), else a ValueError naming
    the key, the value and the expected type. Other field types (dataclasses given a non-dict, containers) pass
    through to the dataclass's own checks."""
    union = typing.get_origin(field_type) in (typing.Union, types.UnionType)
    allowed = typing.get_args(field_type) if union else (field_type,)
    if value is None and type(None) in allowed:
        return None
    scalars = [t for t in allowed if t in TYPE_NAMES]
    if not scalars:
        return value
    for t in scalars:
        if t is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `--set data.path=2024` parses as JSON 2024; the field wants the text
        if isinstance(value, bool) != (t is bool):
            continue
        if isinstance(value, t) or (t is float and isinstance(value, int)):
            return value
    expected = " or ".join(TYPE_NAMES[t] for t in scalars) + (" or null" if type(None) in allowed else "")
    raise ValueError(f"{key} expects {expected}, got {value!r}")


def require_choice(name: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {list(choices)}")


def require_positive(**values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} ({value}) must be > 0")
