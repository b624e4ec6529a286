"""Value checks shared by every public entry point, each written once; a dataclass names its fields' checks in their
metadata (`"check"`) and `check_fields` runs them, `Literal` fields included."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "positive_int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
    "non_negative_int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                         "an integer >= 0"),
    "positive": (lambda v: _number(v) and 0 < v < math.inf, "a finite number > 0"),
    "non_negative": (lambda v: _number(v) and 0 <= v < math.inf, "a finite number >= 0"),
    "fraction": (lambda v: _number(v) and 0 < v <= 1, "a fraction in (0, 1]"),
    "finite": (lambda v: _number(v) and math.isfinite(v), "a finite number"),
}


def check_value(owner: str, name: str, value: Any, check: str, optional: bool = False) -> None:
    """Raise ValueError naming `owner.name` unless `value` passes `check` (None passes when `optional`)."""
    if optional and value is None:
        return
    test, description = CHECKS[check]
    if not test(value):
        raise ValueError(f"{owner}.{name} must be {description}{' or None' if optional else ''}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


def check_fields(instance: Any) -> None:
    """Run the checks a dataclass instance's fields declare: `metadata["check"]` and `Literal[...]` annotations."""
    owner = type(instance).__name__
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value, hint = getattr(instance, f.name), hints.get(f.name)
        optional = type(None) in typing.get_args(hint)
        literal = next((a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is Literal), None)
        if literal is not None and not (optional and value is None):
            check_choice(owner, f.name, value, typing.get_args(literal))
        if "check" in f.metadata:
            check_value(owner, f.name, value, f.metadata["check"], optional)
