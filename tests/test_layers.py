"""The package's layers: every import inside localsgd points to a lower layer (or stays
inside its own part), so nothing below can depend on what is built on top of it.

A part is a top-level module or package, or a sub-package given a layer of its own (the
engines' parts, the studies' executors). Every import is seen: module-level, inside
functions, ``from localsgd import x``, and modules named by a string
(``importlib.import_module("localsgd...")``, ``python -m localsgd...``). A module started
as a process of its own (``python -m``) is a process boundary, not an import: those are
listed in :data:`ENTRY_POINTS`, and each must exist.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "localsgd"

# Higher numbers may import lower ones; two different parts of one layer may not import
# each other. Dotted parts are sub-packages with a layer of their own inside their package.
LAYERS = {
    "util": 0,
    "comm": 1,
    "costmodel": 1,
    "records": 1,
    "distributed": 1,
    "algorithms": 2,
    "trackers": 2,
    "data_parallel": 3,
    "workloads": 3,
    "engines": 4,  # engines/base: the protocol, capabilities and the registry
    "engines.launching": 4.1,  # starting and watching worker processes
    "engines.processes": 4.2,
    "engines.simulated": 4.2,
    "engines.hogwild": 4.2,
    "engines.__init__": 4.3,  # `from localsgd import engines`: registers the built-in engines
    "integrations": 4,
    "run": 5,
    "report": 5,
    "emulation": 5,
    "studies.executors": 6,
    "studies": 6.1,
    "worker": 7,
    "cli": 8,
}

ENTRY_POINTS = {
    "localsgd.worker": "the worker process every launch path starts",
    "localsgd.engines.launching.elastic": "torch's elastic launcher, tied to its parent",
    "localsgd.engines.launching.server": "the launcher server every launcher is forked from",
    "localsgd.emulation.probe": "the link probe run inside an emulated node",
}
"""Modules started with ``python -m`` by a lower layer: a process boundary, not an import."""

FACADES = {"localsgd.engines"}
"""Packages whose ``__init__`` gathers their parts (importing it registers them): a layer of
its own above those parts."""

MODULE_NAME = re.compile(r"^localsgd(\.[a-z_][a-z0-9_]*)+$")


def part_of(module: str) -> str | None:
    """``localsgd.run.training`` -> ``run``; ``localsgd.engines.simulated.fused`` ->
    ``engines.simulated``; None for the package's own __init__ or an outside module."""
    parts = module.split(".")
    if module in FACADES:
        return f"{parts[1]}.__init__"
    if len(parts) < 2 or parts[0] != "localsgd":
        return None
    if len(parts) > 2 and f"{parts[1]}.{parts[2]}" in LAYERS:
        return f"{parts[1]}.{parts[2]}"
    return parts[1]


def exists(module: str) -> bool:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module of the package ``path`` depends on, with the line that says so."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from localsgd import workloads`, `from localsgd.engines import simulated`
            found += [
                (node.lineno, f"{node.module}.{alias.name}")
                for alias in node.names
                if exists(f"{node.module}.{alias.name}")
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value
            if MODULE_NAME.match(name) and exists(name) and name not in ENTRY_POINTS:
                found.append((node.lineno, name))  # a module named by a string
    return found


def module_of(path: Path) -> str:
    return ".".join(("localsgd", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("_")}
    parts = {p for p in parts if (PACKAGE / p).is_dir() or (PACKAGE / f"{p}.py").is_file()}
    assert parts <= set(LAYERS), f"give these a layer: {sorted(parts - set(LAYERS))}"
    nested = {p for p in LAYERS if "." in p and not p.endswith(".__init__")}
    missing = [p for p in nested if not (PACKAGE / p.replace(".", "/") / "__init__.py").is_file()]
    assert not missing, f"layered sub-packages that do not exist: {missing}"


def test_entry_points_exist():
    for module, what in ENTRY_POINTS.items():
        path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
        assert path.is_file(), f"{module} ({what}) does not exist"
        assert '__name__ == "__main__"' in path.read_text(), f"{module} cannot be run with python -m"


def test_imports_point_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = part_of(module_of(path))
        if source is None:
            continue
        for line, module in imports(path):
            target = part_of(module)
            if target is None or target == source or target not in LAYERS:
                continue
            if LAYERS[target] >= LAYERS[source]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({source}) imports {module} ({target})")
    assert not upward, "imports that do not point downward:\n" + "\n".join(upward)


def test_the_checker_sees_every_kind_of_import(tmp_path):
    """A module that reaches upward by each route is caught by :func:`imports`."""
    source = tmp_path / "probe.py"
    source.write_text(
        "import importlib\n"
        "from localsgd import studies\n"
        "def f():\n"
        "    from localsgd.run.training import train\n"
        "    return importlib.import_module('localsgd.report.build')\n"
    )
    found = {module for _, module in imports(source)}
    assert {"localsgd.studies", "localsgd.run.training", "localsgd.report.build"} <= found
    assert part_of("localsgd.engines.simulated.fused") == "engines.simulated"
    assert part_of("localsgd.engines.base") == "engines"
    assert part_of("localsgd.studies.executors.slurm") == "studies.executors"
