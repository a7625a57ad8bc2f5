"""Names of workloads, engines and algorithms come from one source: their registries.

Conventions this test checks (so that a document cannot drift from the code):

- A complete list in a document is a Markdown table right after the marker
  ``<!-- registered: KIND -->`` (KIND: algorithms, engines or workloads); its ``name``
  column holds the names in backticks. It must list exactly the registered names, and
  every kind has one.
- A docstring that lists every name says ``Registered KIND: ``a``, ``b``.``; the list ends
  at the sentence's full stop and must be exactly the registry.
- Any name a config example gives (``engine = "x"``, ``workload = "x"``, an algorithm
  table's ``name = "x"``, ``--set engine=x``) anywhere in docs/*.md, README.md and the CLI's
  help must be registered (an import path ``module:function`` is a workload too).
- The CLI's listing commands print exactly the registries.
- docs/algorithms.md's Symbols table: every config field it names exists where it says.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localsgd import algorithms, engines, workloads
from localsgd.cli import app
from localsgd.costmodel.model import Cluster, Link
from localsgd.run.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
REGISTRIES = {"algorithms": algorithms.names, "engines": engines.names, "workloads": workloads.names}
MARKER = re.compile(r"<!-- registered: (\w+) -->\n((?:\|.*\n)+)")


def table(text: str) -> list[dict[str, str]]:
    """A Markdown table's rows as {header: cell}."""
    lines = [line.strip().strip("|").split("|") for line in text.strip().splitlines()]
    header = [h.strip() for h in lines[0]]
    return [dict(zip(header, (c.strip() for c in row))) for row in lines[2:]]


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def complete_lists() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for kind, body in MARKER.findall(doc.read_text()):
            names = [ticked(row["name"])[0] for row in table(body)]
            found.append((doc.name, kind, names))
    return found


def test_every_complete_list_in_the_docs_is_the_registry() -> None:
    found = complete_lists()
    assert {kind for _, kind, _ in found} == set(REGISTRIES)
    for doc, kind, names in found:
        assert kind in REGISTRIES, f"{doc}: unknown registry {kind!r}"
        assert sorted(names) == REGISTRIES[kind](), f"{doc}: the {kind} table"
        assert len(names) == len(set(names)), f"{doc}: a name twice in the {kind} table"


def mentioned(text: str) -> dict[str, set[str]]:
    """Names that config examples in ``text`` give, by registry."""
    out: dict[str, set[str]] = {kind: set() for kind in REGISTRIES}
    out["engines"] |= set(re.findall(r'\bengine\s*=\s*"?([A-Za-z_]\w*)"?', text))
    for name in re.findall(r'\bworkload\s*=\s*"([^"]+)"', text):
        out["workloads"].add(name)
    for _section, body in re.findall(r"^\[([\w.]*workload)\]\n((?:[^\[\n].*\n)*)", text, flags=re.M):
        out["workloads"] |= set(re.findall(r'^name\s*=\s*"([^"]+)"', body, flags=re.M))
    for _section, body in re.findall(r"^\[([\w.]*algorithm)\]\n((?:[^\[\n].*\n)*)", text, flags=re.M):
        out["algorithms"] |= set(re.findall(r'^name\s*=\s*"([^"]+)"', body, flags=re.M))
    for line in re.findall(r"algorithm.*", text):
        out["algorithms"] |= set(re.findall(r'\{\s*"?name"?\s*[=:]\s*"(\w+)"', line))
    out["algorithms"] |= set(re.findall(r"algorithm\.name=(\w+)", text))
    out["workloads"] = {n for n in out["workloads"] if ":" not in n}  # import paths
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_names_in_config_examples_are_registered(doc: Path) -> None:
    for kind, names in mentioned(doc.read_text()).items():
        unknown = sorted(names - set(REGISTRIES[kind]()))
        assert not unknown, f"{doc.name} gives {kind} that are not registered: {unknown}"


def test_the_convention_catches_an_unknown_name() -> None:
    text = '[base]\nengine = "threads"\n[base.algorithm]\nname = "gossip"\nperiod = 4\n'
    assert mentioned(text) == {"engines": {"threads"}, "algorithms": {"gossip"}, "workloads": set()}
    assert mentioned('algorithm = [{name = "x"}, {name = "local_sgd", period = 4}]')["algorithms"] == {
        "x",
        "local_sgd",
    }
    assert MARKER.findall("<!-- registered: engines -->\n| name |\n|---|\n| `a` |\n")[0][0] == "engines"


def test_docstrings_that_list_every_name_list_the_registry() -> None:
    seen = set()
    for path in sorted((ROOT / "src" / "localsgd").rglob("*.py")):
        for kind, body in re.findall(r"Registered (\w+): ((?:``[^`]+``,?\s*)+)\.", path.read_text()):
            assert kind in REGISTRIES, f"{path}: 'Registered {kind}:'"
            assert sorted(ticked(body.replace("``", "`"))) == REGISTRIES[kind](), f"{path}: Registered {kind}"
            seen.add(kind)
    assert "workloads" in seen


def test_the_cli_lists_the_registries_and_its_help_names_only_registered_ones() -> None:
    runner = CliRunner()
    for command, kind in (("algorithms", "algorithms"), ("engines", "engines"), ("workloads", "workloads")):
        result = runner.invoke(app, [command])
        assert result.exit_code == 0, result.output
        assert [line.split(":")[0].split()[0] for line in result.output.splitlines()] == REGISTRIES[kind]()
    assert "mnist1d_cnn (default)" in runner.invoke(app, ["workloads"]).output
    for command in ([], ["train"], ["study"], ["report"], ["algorithms"], ["engines"], ["workloads"]):
        help_text = runner.invoke(app, [*command, "--help"]).output
        for kind, names in mentioned(help_text).items():
            assert names <= set(REGISTRIES[kind]()), (command, kind, names)


def test_error_messages_list_the_registries() -> None:
    from localsgd.util.checks import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"engine must be one of {engines.names()}, got 'x'")):
        engines.get("x")
    with pytest.raises(ConfigError, match=re.escape(f"allowed: {algorithms.names()}")):
        algorithms.get("x")
    with pytest.raises(ConfigError, match=re.escape(f"not a registered workload {workloads.names()}")):
        workloads.build("x")
    assert RunConfig().workload == {"name": workloads.DEFAULT}


def test_the_symbols_table_names_fields_that_exist() -> None:
    text = (ROOT / "docs" / "algorithms.md").read_text()
    body = re.search(r"<!-- symbols -->\n((?:\|.*\n)+)", text)
    assert body is not None
    rows = table(body.group(1))
    symbols = [row["symbol"] for row in rows]
    concepts = {}
    for row in rows:  # one symbol per concept: a symbol twice must be one concept (μ)
        concepts.setdefault(row["symbol"], set()).add(row["concept"].split(" (")[0])
    assert all(len(c) == 1 for c in concepts.values()), concepts
    assert {"η", "μ", "λ", "α", "β", "G", "M", "H"} <= set(symbols)
    run_fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for row in rows:
        (field,) = ticked(row["config field"])
        where = ticked(row["where used"])
        named = [w for w in where if w in algorithms.names()]
        if named:
            for name in named:
                cls = algorithms.get(name)
                assert field in {f.name for f in dataclasses.fields(cls)}, (name, field)  # type: ignore[arg-type]
            continue
        section, _, key = field.rpartition(".")
        if section == "engine_options":
            (engine,) = [w for w in where if w in engines.names()]
            options = engines.get(engine).options({})
            assert key in {f.name for f in dataclasses.fields(options)}, (engine, key)  # type: ignore[arg-type]
        elif section:
            sub = run_fields[section].default_factory()  # type: ignore[misc]
            assert key in {f.name for f in dataclasses.fields(sub)}, field
        elif key in run_fields:
            continue
        else:
            assert "cost model" in row["where used"], row
            assert key in {f.name for f in dataclasses.fields(Link)} | {
                f.name for f in dataclasses.fields(Cluster)
            }
    # The algorithms' own label symbols are the table's.
    for name in algorithms.names():
        cls = algorithms.get(name)
        for key, symbol in {**cls.SYMBOLS, **cls.OPTIONAL_SYMBOLS}.items():
            shown = {"Hb": "H_b"}.get(symbol, symbol)
            assert any(row["symbol"] == shown and f"`{key}`" == row["config field"] for row in rows), (
                name,
                key,
            )
