"""The package's metadata, checked without building it (`make package`, .ci/package, builds,
installs and runs the wheel): the version is defined once, every file the package ships is
package data, every third-party library that src/ imports or a test skips without is declared
in the base dependencies or an extra (and `make setup` installs the extras the tests need),
and the README's example is the file that the package check runs."""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib.metadata
import json
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "localsgd"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]

# Import names whose distribution is named otherwise, for when the library is not installed
# here (when it is, importlib.metadata.packages_distributions() answers).
DISTRIBUTION_OF = {"PIL": "pillow", "mlflow": "mlflow-skinny", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(requirements: list[str]) -> set[str]:
    return {_normalize(Requirement(r).name) for r in requirements}


def _extras() -> dict[str, set[str]]:
    return {extra: _declared(reqs) for extra, reqs in PROJECT["optional-dependencies"].items()}


@functools.cache
def _installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    installed = _installed_distributions().get(module)
    if installed:
        return {_normalize(d) for d in installed}
    return {_normalize(DISTRIBUTION_OF.get(module, module))}


def _python_files(folder: Path) -> Iterator[Path]:
    yield from sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _third_party(module: str) -> bool:
    return module not in sys.stdlib_module_names and module != "localsgd" and module != "__future__"


def _imported_by_src() -> dict[str, list[str]]:
    """Top-level third-party modules imported anywhere in src/ (also inside functions)."""
    found: dict[str, list[str]] = {}
    for path in _python_files(PACKAGE):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if _third_party(top):
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def _skipped_without_in_tests() -> dict[str, list[str]]:
    """Top-level modules that a test skips without: pytest.importorskip("<module>")."""
    found: dict[str, list[str]] = {}
    for path in _python_files(ROOT / "tests"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "importorskip"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                top = node.args[0].value.split(".")[0]
                if _third_party(top):
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def _version_literal() -> str:
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str), (
                "__version__ must be a string literal: setuptools reads it without importing localsgd"
            )
            return node.value.value
    raise AssertionError("src/localsgd/__init__.py assigns no __version__")


def test_version_is_defined_once_and_read_by_the_build() -> None:
    version = _version_literal()
    Version(version)  # PEP 440, or InvalidVersion
    assert "version" not in PROJECT, "pyproject.toml [project] must not repeat the version"
    assert "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "localsgd.__version__"}
    assert not (ROOT / "setup.py").exists() and not (ROOT / "setup.cfg").exists()
    elsewhere = [
        str(p.relative_to(ROOT))
        for p in _python_files(PACKAGE)
        if p.name != "__init__.py" or p.parent != PACKAGE
        if re.search(r"^__version__\s*=", p.read_text(encoding="utf-8"), re.M)
    ]
    assert elsewhere == []


def test_installed_metadata_has_the_version() -> None:
    # The distribution pip installed from this tree (`make setup`: pip install -e .), found by
    # its direct_url.json among any others on the path (another checkout, a built egg-info).
    ours = [
        dist
        for dist in importlib.metadata.distributions(name="localsgd")
        if json.loads(dist.read_text("direct_url.json") or "{}").get("url") == ROOT.as_uri()
    ]
    if not ours:
        pytest.skip(f"localsgd is not installed from this tree ({ROOT}): pip install -e .")
    # An editable install's metadata is written at install time: after a version bump, run
    # `make setup` (pip install -e .) again.
    assert [dist.version for dist in ours] == [_version_literal()] * len(ours)


def test_py_typed_is_package_data() -> None:
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["localsgd"]


def test_every_non_python_file_of_the_package_is_package_data() -> None:
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["localsgd"]
    data = [
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    ]
    assert data, "py.typed at least"
    unshipped = [f for f in data if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert unshipped == [], f"add to [tool.setuptools.package-data] localsgd: {unshipped}"


def test_every_library_src_imports_is_declared() -> None:
    declared = _declared(PROJECT["dependencies"]).union(*_extras().values())
    imported = _imported_by_src()
    assert {"torch", "numpy", "typer"} <= set(imported)  # the scan sees the package's imports
    undeclared = {m: files for m, files in imported.items() if not _distributions(m) & declared}
    assert undeclared == {}, "declare in pyproject.toml dependencies or an extra"


def test_the_base_install_is_lean() -> None:
    base = _declared(PROJECT["dependencies"])
    integrations = set().union(*(v for k, v in _extras().items() if k not in {"test", "dev"}))
    assert {"torch", "numpy"} <= base
    assert base.isdisjoint(integrations), "a library is both a base dependency and an extra"
    assert {
        "transformers",
        "accelerate",
        "lightning",
        "tensorboard",
        "mlflow-skinny",
        "wandb",
    } <= integrations


def test_every_library_a_test_skips_without_is_an_extra_make_setup_installs() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"pip install -q -e '\.\[([a-z,]+)\]'", makefile)
    assert match, "the Makefile's setup installs the package editable with its extras"
    installed_extras = match.group(1).split(",")
    extras = _extras()
    assert set(installed_extras) <= set(extras)
    installed = _declared(PROJECT["dependencies"]).union(*(extras[e] for e in installed_extras))
    skipped = _skipped_without_in_tests()
    missing = {m: files for m, files in skipped.items() if not _distributions(m) & installed}
    assert missing == {}, f"declare in an extra that `make setup` installs ({installed_extras})"


def test_the_torch_pin_is_exact_and_admitted_by_the_requirement() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    pin = re.search(r"^TORCH_PIN := torch==(\S+)$", makefile, re.M)
    assert pin, "the Makefile pins torch exactly (an unpinned torch fetches a CUDA build)"
    (torch,) = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "torch"]
    assert Version(pin.group(1)) in torch.specifier


def test_readme_example_is_the_file_the_package_check_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", readme, re.S | re.M)
    assert blocks, "README.md has a ```python block"
    example = ROOT / "examples" / "readme.py"
    assert blocks[0] == example.read_text(encoding="utf-8"), (
        "README.md's first python block and examples/readme.py differ: change both"
    )
    assert "examples/readme.py" in (ROOT / ".ci" / "package").read_text(encoding="utf-8")


def test_the_command_prints_the_version() -> None:
    from typer.testing import CliRunner

    from localsgd.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"localsgd {_version_literal()}\n"
