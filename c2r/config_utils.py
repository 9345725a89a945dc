"""Building the per-component config dataclasses from plain dicts (JSON files, CLI overrides).

Unknown keys are errors that name the key and the valid ones: a typo in a config must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into fields whose type is itself a dataclass."""
    if not isinstance(data, dict):
        raise TypeError(f"config section {where or cls.__name__!r} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in config section {where or cls.__name__!r}; valid keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        field_type = hints[name]
        if dataclasses.is_dataclass(field_type) and isinstance(value, dict):
            value = config_from_dict(field_type, value, f"{where}.{name}" if where else name)
        kwargs[name] = value
    return cls(**kwargs)


def require_choice(name: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {list(choices)}")


def require_positive(**values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} ({value}) must be > 0")
