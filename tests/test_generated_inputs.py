"""Generated bad input: thousands of malformed run configs and study files per run of the
suite (wrong types, out-of-range and non-finite numbers, huge values, unicode, unknown keys
at every depth, deep nesting). Each is either a valid config or a ``ConfigError`` of one
line naming a key; never another exception. Through the command line, a malformed study
file ends with exit code 2, one ``error:`` line and nothing written. The hand-written
battery (``tests/test_bad_inputs.py``) stays beside it."""

from __future__ import annotations

import copy
import math
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from localsgd.cli import app
from localsgd.run.config import run_config
from localsgd.studies.grid import load_grid
from localsgd.util.checks import ConfigError

RUN = tomllib.loads(
    """
workers = 2
engine = "simulated"
seed = 3
device = "cpu"
[workload]
name = "mnist1d_mlp"
num_samples = 1000
[algorithm]
name = "local_sgd"
period = 4
[data]
batch_size = 16
[optimizer]
lr = 0.1
momentum = 0.9
[schedule]
name = "step"
milestones = [0.5, 0.75]
warmup_epochs = 1.0
[train]
epochs = 2
max_steps = 8
eval_every = 4
[comm]
delay = { world = 0.0 }
"""
)

STUDY = {"study": {"name": "generated"}, "base": copy.deepcopy(RUN), "grid": [{"seed": [0, 1], "workers": [1, 2]}]}

# Values a config file or a JSON record may hold where they do not belong.
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 0.0, -0.0]),
    st.text(max_size=30),
    st.sampled_from(["", " ", "ü", "名前", "\u202e", "a" * 5000, "simulated\n", "../../etc"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
toml_scalars = scalars.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**63))
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a nested config: keys of tables (and their children), list items."""
    found = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, child in tree.items():
            found += paths(child, (*prefix, key))
    elif isinstance(tree, list):
        for i, child in enumerate(tree):
            found += paths(child, (*prefix, i))
    return found


def tables(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every table in a nested config (the root included), where an unknown key may go."""
    found = [prefix] if isinstance(tree, dict) else []
    if isinstance(tree, dict):
        for key, child in tree.items():
            found += tables(child, (*prefix, key))
    elif isinstance(tree, list):
        for i, child in enumerate(tree):
            found += tables(child, (*prefix, i))
    return found


def at(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], value_strategy: st.SearchStrategy[Any]) -> dict[str, Any]:
    """``base`` with one to three changes: a value replaced, a key removed, an unknown key
    added to some table, or a value buried in nesting."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "remove", "unknown", "nest"]))
        places = paths(tree)
        if kind == "unknown" or not places:
            table = at(tree, draw(st.sampled_from(tables(tree))))
            table[draw(st.text(min_size=1, max_size=12))] = draw(value_strategy)
            continue
        path = draw(st.sampled_from(places))
        parent, key = at(tree, path[:-1]), path[-1]
        if kind == "remove":
            del parent[key]
        elif kind == "nest":
            parent[key] = {"x": [[{"y": parent[key]}]]}
        else:
            parent[key] = draw(value_strategy)
    return tree


def one_line(exc: ConfigError) -> str:
    text = str(exc)
    assert text and "\n" not in text.strip(), f"not one line: {text!r}"
    assert "Traceback" not in text
    return text


FAST = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(mutated(RUN, values))
def test_a_generated_run_config_is_valid_or_one_line_naming_a_key(data: dict[str, Any]) -> None:
    try:
        config = run_config(data)
    except ConfigError as exc:
        one_line(exc)
    else:
        assert config.run_id()  # a valid one round-trips
        assert run_config(config.to_dict()).run_id() == config.run_id()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(STUDY, values))
def test_a_generated_study_file_is_valid_or_one_line_naming_a_key(data: dict[str, Any]) -> None:
    try:
        study = load_grid(data, [])
    except ConfigError as exc:
        one_line(exc)
    else:
        assert study.runs


def test_the_generator_reaches_errors_at_every_depth() -> None:
    """The strategies are not trivially valid: known bad values at depth 1, 2 and 3 are
    refused, naming their keys."""
    for path, value, key in (
        (("workers",), "two", "workers"),
        (("optimizer", "lr"), math.nan, "optimizer.lr"),
        (("comm", "delay", "world"), -1.0, "comm.delay"),
        (("optimizer", "surprise"), 1, "surprise"),
    ):
        data = copy.deepcopy(RUN)
        at(data, path[:-1])[path[-1]] = value
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            run_config(data)


def dump(value: Any) -> str:
    """A TOML value (the subset the generated values use)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return "{" + ", ".join(f"{dump(str(k))} = {dump(v)}" for k, v in value.items()) + "}"


def to_toml(study: dict[str, Any]) -> str:
    lines = []
    for section, body in study.items():
        if isinstance(body, (list, dict)):
            lines.append(f"{dump(section)} = {dump(body)}")
        else:
            lines.append(f"{dump(section)} = {dump(body)}")
    return "\n".join(lines) + "\n"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=mutated(STUDY, toml_values))
def test_the_command_line_refuses_a_generated_study_in_one_line_writing_nothing(
    data: dict[str, Any], tmp_path: Path
) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # a folder per example (examples replay)
    study = folder / "study.toml"
    study.write_text(to_toml(data))
    out = folder / "out"
    result = CliRunner().invoke(app, ["study", str(study), "--dry-run", "--out", str(out)])
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.output
    assert not out.exists()  # a dry run, valid or not, writes nothing
    assert sorted(p.name for p in folder.iterdir()) == ["study.toml"]
