"""The package's layers: every import inside localsgd points to a lower layer (or stays
inside its own package), so nothing below can depend on what is built on top of it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "localsgd"

# Higher numbers may import lower ones; two different parts of one layer may not import
# each other.
LAYERS = {
    "util": 0,
    "comm": 1,
    "costmodel": 1,
    "records": 1,
    "distributed": 1,
    "algorithms": 2,
    "data_parallel": 3,
    "workloads": 3,
    "engines": 4,
    "integrations": 4,
    "report": 5,
    "emulation": 5,
    "studies": 6,
    "worker": 7,
    "cli": 8,
}


def part_of(module: str) -> str | None:
    """``localsgd.studies.trainer`` -> ``studies``; None for the package's own __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "localsgd" else None


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "localsgd":  # `from localsgd import workloads`
                found += [(node.lineno, f"localsgd.{alias.name}") for alias in node.names]
    return found


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("_")}
    parts = {p for p in parts if (PACKAGE / p).is_dir() or (PACKAGE / f"{p}.py").is_file()}
    assert parts <= set(LAYERS), f"give these a layer: {sorted(parts - set(LAYERS))}"


def test_imports_point_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = part_of(".".join(("localsgd", *path.relative_to(PACKAGE).with_suffix("").parts)))
        if source is None or source == "__init__":
            continue
        for line, module in imports(path):
            target = part_of(module)
            if target is None or target == source or target not in LAYERS:
                continue
            if LAYERS[target] >= LAYERS[source]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({source}) imports {module} ({target})")
    assert not upward, "imports that do not point downward:\n" + "\n".join(upward)
