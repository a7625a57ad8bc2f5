"""Validation with messages that name the key and say what is allowed, and typed configs
built from plain dicts (TOML, JSON).

Every config in the package is a frozen dataclass whose fields carry a docstring;
:func:`from_dict` rejects unknown keys and values of the wrong type, naming the dotted key,
and the dataclass's ``__post_init__`` checks ranges with the ``check_*`` functions here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that does not fit its schema; the message names the dotted key. It is
    one line whatever the input held: a line break inside a key or value that the message
    quotes is written as ``\\n``."""

    def __init__(self, message: object = "") -> None:
        text = str(message)
        super().__init__(text.replace("\r", "\\r").replace("\n", "\\n") if "\n" in text or "\r" in text else text)


# -- range checks --------------------------------------------------------------------------

INT_CAP = 2**62
"""No integer setting may exceed this: beyond it counts and sizes stop being meaningful."""


def check_int(field: str, value: object, minimum: int, maximum: int = INT_CAP) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        allowed = f">= {minimum}" if maximum == INT_CAP else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{field} must be an integer {allowed}, got {value!r}")


def check_float(
    field: str,
    value: object,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = True,
    unit: str = "",
) -> float:
    """A finite real number between ``low`` and ``high`` (open or closed ends), returned as
    a float; ``unit`` is named in the message."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(v) and (v > low if low_open else v >= low)
        if ok and high is not None:
            ok = v < high if high_open else v <= high
    if not ok:
        allowed = f"{'>' if low_open else '>='} {low:g}"
        if high is not None:
            allowed += f" and {'<' if high_open else '<='} {high:g}"
        if unit:
            allowed += f" {unit}"
        raise ConfigError(f"{field} must be a finite number {allowed}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_choice(field: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{field} must be one of {list(choices)}, got {value!r}")


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(field: str, value: object) -> None:
    """A name that is also a folder name: letters, digits, '.', '_', '-', at most 100
    characters, not starting with a dot or dash (no path separators)."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{field} must be 1 to 100 letters, digits, '.', '_' or '-' (starting with a letter or "
            f"digit), got {value!r}"
        )


def check_bool(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field} must be true or false, got {value!r}")


# -- typed configs from plain dicts ---------------------------------------------------------


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursively, checking keys and types.

    A class may name fields it renamed in ``RENAMED = {"old": "new"}``: the old key gets an
    error naming the new one. Errors raised by the dataclass itself (its range checks) are
    re-raised as :class:`ConfigError` prefixed with ``where``'s section when they do not
    already name it.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'} must be a table, got {type(data).__name__} {data!r}")
    assert dataclasses.is_dataclass(cls), cls
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    renamed: Mapping[str, str] = getattr(cls, "RENAMED", {})
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key in renamed:
            # A new name with a dot is a key elsewhere in the config; else a sibling.
            new = renamed[key] if "." in renamed[key] or not where else f"{where}.{renamed[key]}"
            raise ConfigError(f"{dotted} was renamed: use {new}")
        if key not in fields:
            raise ConfigError(f"unknown key {dotted!r}; allowed: {sorted(fields)}")
        kwargs[key] = coerce(dotted, value, hints[key])
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in kwargs]
    if missing:
        dotted = f"{where}.{missing[0]}" if where else missing[0]
        raise ConfigError(f"missing key {dotted!r}; required: {required}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def coerce(dotted: str, value: Any, annotation: Any) -> Any:
    """``value`` checked (and lightly converted: int -> float, list -> tuple) against
    ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(dotted, value, typing.get_args(annotation))
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, dotted)  # type: ignore[arg-type]
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted} must be a list, got {type(value).__name__} {value!r}")
        return tuple(coerce(f"{dotted}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is typing.Literal:
        check_choice(dotted, value, typing.get_args(annotation))
        return value
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{dotted} must be a table, got {type(value).__name__} {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    return _coerce_scalar(dotted, value, annotation)


def _coerce_union(dotted: str, value: Any, options: tuple[Any, ...]) -> Any:
    """The first of ``options`` that ``value`` fits; the reasons for each otherwise."""
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return coerce(dotted, value, option)
        except ConfigError as exc:
            errors.append(str(exc))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    raise ConfigError(f"{dotted}: {'; or '.join(errors)}")


def _scalar(annotation: Any, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` is a ``bool``/``int``/``float``/``str`` as a config means it (a
    bool is no number; an int is a float; a path is a string), and the value converted."""
    if annotation is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):
        return False, value
    if annotation is int:
        return isinstance(value, int), value
    if annotation is float:
        fits = isinstance(value, (int, float))
        return fits, float(value) if fits else value
    if isinstance(value, os.PathLike):  # a Path from Python code, where a path is wanted
        return True, os.fspath(value)
    return isinstance(value, str), value


def _coerce_scalar(dotted: str, value: Any, annotation: Any) -> Any:
    if annotation not in (bool, int, float, str):
        raise TypeError(f"{dotted}: unsupported annotation {annotation!r}")
    fits, converted = _scalar(annotation, value)
    if not fits:
        raise ConfigError(f"{dotted} must be {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    return converted


def _type_name(annotation: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain TOML/JSON-ready data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def check_directory(field: str, value: object) -> None:
    """A path that is a directory or can become one (it does not exist yet)."""
    from pathlib import Path

    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field} must be a directory path, got {value!r}")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field} '{value}' is a file; it must be a directory")


def check_output_folder(key: str, value: object) -> None:
    """A folder this process may write into: an existing folder, or a new one whose
    nearest existing parent is a writable folder (nothing is created here)."""
    from pathlib import Path

    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigError(f"{key} must be a folder path, got {value!r}")
    path = Path(value)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key} {str(path)!r} is a file; give a folder (a new one, or an existing store)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{key} {str(path)!r} is not writable")
        return
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{key} {str(path)!r} cannot be created: {str(parent)!r} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{key} {str(path)!r} cannot be created: {str(parent)!r} is not writable")
            return
