"""Nested data: dotted flattening of dicts, and nests (mappings, lists, tuples) of tensors."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def flatten(
    data: Mapping[str, Any],
    prefix: str = "",
    *,
    lists_as_json: bool = True,
    whole: Callable[[str, Mapping[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``. Lists become JSON text (one spreadsheet cell)
    unless ``lists_as_json`` is false; a table for which ``whole(path, table)`` is true
    stays one value."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and not (whole is not None and whole(dotted, value)):
            out.update(flatten(value, f"{dotted}.", lists_as_json=lists_as_json, whole=whole))
        elif lists_as_json and isinstance(value, (list, tuple)):
            out[dotted] = json.dumps(list(value))
        else:
            out[dotted] = value
    return out


def deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of nested mappings (other values are shared)."""
    return {k: deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def set_dotted(tree: dict[str, Any], path: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``path = "a.b"``, creating tables on the way."""
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def map_nest(fn: Callable[[Any], Any], nest: Any) -> Any:
    """``fn`` applied to every leaf of a nest of mappings, lists and tuples."""
    if isinstance(nest, Mapping):
        return {k: map_nest(fn, v) for k, v in nest.items()}
    if isinstance(nest, (list, tuple)):
        return type(nest)(map_nest(fn, v) for v in nest)
    return fn(nest)


def zip_nests(fn: Callable[[list[Any]], Any], nests: Sequence[Any]) -> Any:
    """Combine same-shaped nests leaf by leaf: ``fn([leaf of nest 0, leaf of nest 1, ...])``."""
    first = nests[0]
    if isinstance(first, Mapping):
        return {k: zip_nests(fn, [n[k] for n in nests]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(zip_nests(fn, [n[i] for n in nests]) for i in range(len(first)))
    return fn(list(nests))


def leaves(nest: Any) -> list[Any]:
    """The leaves of a nest, in order."""
    if isinstance(nest, Mapping):
        return [x for v in nest.values() for x in leaves(v)]
    if isinstance(nest, (list, tuple)):
        return [x for v in nest for x in leaves(v)]
    return [nest]
