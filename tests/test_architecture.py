"""docs/architecture.md is the map of the package: every place it names exists, every part
of the layer table is on its picture, and every recipe names the test that does it."""

from __future__ import annotations

import re
from pathlib import Path

from test_layers import LAYERS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "src" / "localsgd"


def text() -> str:
    return DOC.read_text()


def test_every_place_in_the_concept_table_exists():
    table = text().split("## Where each concept lives", 1)[1].split("\n## ", 1)[0]
    places = []
    for row in table.splitlines():
        if row.startswith("| ") and not row.startswith("| concept") and not row.startswith("| ---"):
            where = row.rsplit("|", 2)[-2]
            places += re.findall(r"`([^`]+)`", where)
    assert len(places) >= 15, places
    missing = []
    for place in places:
        if "<name>" in place:  # one per engine
            ok = any((PACKAGE / place.split("<name>")[0]).glob("*/__init__.py"))
        elif place.endswith("/"):
            ok = (PACKAGE / place).is_dir()
        else:
            ok = (PACKAGE / place).is_file()
        if not ok:
            missing.append(place)
    assert not missing, f"docs/architecture.md names places that do not exist: {missing}"


def test_every_part_is_on_the_picture():
    picture = text().split("```", 2)[1]
    for part in LAYERS:
        if part.endswith(".__init__"):
            continue
        name = part.split(".")[-1]
        assert re.search(rf"\b{re.escape(name)}(/|\.py|\b)", picture), f"{part} is not on the layer picture"


def test_every_recipe_names_its_test_and_the_test_exists():
    recipes = text().split("## Adding things", 1)[1].split("\n## ", 1)[0]
    sections = recipes.split("\n### ")[1:]
    assert [s.splitlines()[0].split(":")[0] for s in sections] == [
        "An algorithm",
        "A workload",
        "An engine",
        "A report section",
    ]
    for section in sections:
        tests = re.findall(r"`(tests/[\w/]+\.py)`", section)
        assert tests, f"the recipe {section.splitlines()[0]!r} names no test"
        for test in tests:
            assert (ROOT / test).is_file(), f"{test} does not exist"


def test_every_file_a_recipe_names_exists():
    recipes = text().split("## Adding things", 1)[1]
    for place in re.findall(r"`((?:algorithms|workloads|engines|report)/[\w/]+\.py)`", recipes):
        assert (PACKAGE / place).is_file(), f"{place} does not exist"
