"""Writes docs/benchmarks.md from the benchmarks' JSON results, and nothing else: the page is
what benchmarks/results/*.json hold, rendered the same way every time.

For every script in benchmarks/ (but shared.py and this one) a section: what it measures (the
first paragraph of its docstring), how to run it (the docstring's ``python benchmarks/...``
lines), the machine its JSON was written on, the JSON's ``tables`` and every one of its
``ratios`` as median [min, max] (n). Before them, one table gathers every ratio that has a
target. A script without a JSON is shown as not run; a JSON written before the ratios and
tables format is shown as such, with the command that rewrites it.

    python benchmarks/render.py            # writes docs/benchmarks.md (make bench-docs)
    python benchmarks/render.py --check    # exit 1 if docs/benchmarks.md is not what it would write
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
DOC = BENCHMARKS.parent / "docs" / "benchmarks.md"
COMMAND = "python benchmarks/render.py"

NOT_BENCHMARKS = {"shared", "render"}
ORDER = [
    "sync_cost",
    "simulator",
    "search",
    "async",
    "text_step",
    "study_throughput",
    "imagenet_pipeline",
    "emulated_cluster",
    "streaming",
    "soak",
    "gpu_smoke",
]
"""The sections' order; a script not named here comes after these, by name."""

RATIO_FIELDS = {"name", "median", "min", "max", "reps", "values", "target", "target_is", "verdict"}
"""A ratio record's own fields (benchmarks/shared.py's ``ratio``); any other key is a label."""

VERDICTS = {
    "meets": "meets",
    "misses": "misses",
    "meets in median": "straddles: meets in median only",
    "misses in median": "straddles: misses in median",
}


# -- what a script and its JSON say -------------------------------------------------------------


def benchmark_names(scripts: Path) -> list[str]:
    found = {p.stem for p in scripts.glob("*.py")} - NOT_BENCHMARKS
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def describe(script: Path) -> tuple[str, list[str]]:
    """The first paragraph of the script's docstring, on one line, and its ``python
    benchmarks/...`` usage lines."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    first = " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())
    # reStructuredText to Markdown: ``code`` and :role:`~target` become `code`.
    first = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", first).replace("``", "`")
    usage = [line.strip() for line in doc.splitlines() if line.strip().startswith("python benchmarks/")]
    return first, usage


def load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a benchmark's results must be a JSON object, not {type(data).__name__}")
    return data


def machine(data: dict[str, Any]) -> dict[str, Any]:
    """Date, torch, cores and load average, from the current layout (``machine_at_end``) or
    from an older one (top-level date and torch, ``cpus``)."""
    m = data.get("machine")
    m = m if isinstance(m, dict) else {}
    return {
        "date": m.get("date", data.get("date")),
        "torch": m.get("torch", data.get("torch")),
        "cores": m.get("cores", m.get("cpus", data.get("cpu_count"))),
        "load": m.get("load_average_at_end"),
    }


def tables(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON's ``tables``; from an older JSON, its ``table`` (Markdown lines) as one."""
    if "tables" in data:
        return list(data["tables"])
    lines = data.get("table")
    if isinstance(lines, list) and len(lines) >= 2 and all(isinstance(x, str) for x in lines):

        def cells(line: str) -> list[str]:
            return [c.strip() for c in line.strip().strip("|").split("|")]

        return [{"title": "", "columns": cells(lines[0]), "rows": [cells(x) for x in lines[2:]], "note": ""}]
    return []


# -- formatting ---------------------------------------------------------------------------------


def number(v: float) -> str:
    if math.isnan(v):
        return "nan"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01 or a == 0:
        return f"{v:.3f}"
    return f"{v:.2e}"


def cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return number(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def when(date: str | None) -> str:
    if not date:
        return "date not recorded"
    try:
        t = datetime.datetime.fromisoformat(date)
    except ValueError:
        return date
    if t.tzinfo is not None:
        t = t.astimezone(datetime.UTC)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def load_now(m: dict[str, Any]) -> str:
    return "not recorded" if not m["load"] else f"{m['load'][0]:.1f}"


def markdown_table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out


def figure(r: dict[str, Any]) -> str:
    labels = ", ".join(f"{k} {v}" for k, v in r.items() if k not in RATIO_FIELDS)
    return f"{r['name']} ({labels})" if labels else str(r["name"])


def spread(r: dict[str, Any]) -> str:
    return f"{number(r['median'])} [{number(r['min'])}, {number(r['max'])}] ({r['reps']})"


def target(r: dict[str, Any]) -> str:
    return "" if r.get("target") is None else f"{r['target_is']} {r['target']:g}"


def verdict(r: dict[str, Any]) -> str:
    v = r.get("verdict")
    return "" if v is None else VERDICTS.get(v, v)


# -- the page -----------------------------------------------------------------------------------


def render(scripts: Path = BENCHMARKS, results: Path = RESULTS) -> str:
    names = benchmark_names(scripts)
    loaded = {name: load(results / f"{name}.json") for name in names}
    lines = [
        "# Benchmarks",
        "",
        f"<!-- Generated by `{COMMAND}` (`make bench-docs`) from benchmarks/results/*.json. "
        "Do not edit: rerun the benchmark, then the renderer. -->",
        "",
        f"*Generated by `{COMMAND}` (`make bench-docs`) from `benchmarks/results/*.json`; do not "
        "edit this page by hand: rerun a benchmark (it rewrites its JSON), then the renderer. "
        "What the studies run here found is in [findings.md](findings.md).*",
        "",
        "Absolute times on a shared machine are noisy, so every benchmark measures its variants "
        "interleaved (each repetition runs every variant once, in an order that rotates) and "
        "repeats at least 5 times; a ratio is taken within each repetition and reported as its "
        "median [min, max] (n repetitions). Against a target, a ratio *meets* it when its whole "
        "range is on the target's side, *misses* it when its whole range is on the other side, "
        "and *straddles* it when its range crosses the target (then whether the median meets it "
        "is said). Each section says when, and under what load average, its run ended: the "
        "machine may be shared.",
        "",
        "## Targets",
        "",
    ]
    rows = []
    for name in names:
        data = loaded[name]
        if data is None or "ratios" not in data:
            continue
        m = machine(data)
        for r in data["ratios"]:
            if r.get("target") is not None:
                rows.append(
                    [
                        f"[{name}](#{name})",
                        figure(r),
                        target(r),
                        number(r["median"]),
                        f"[{number(r['min'])}, {number(r['max'])}]",
                        r["reps"],
                        verdict(r),
                        when(m["date"]),
                        load_now(m),
                    ]
                )
    columns = [
        "benchmark",
        "figure",
        "target",
        "median",
        "range",
        "reps",
        "verdict",
        "run",
        "load average at end",
    ]
    lines += markdown_table(columns, rows) if rows else ["No ratio with a target has been recorded."]
    absent = [f"[{n}](#{n}) ({status(loaded[n])})" for n in names if status(loaded[n]) != "run"]
    if absent:
        lines += ["", "Without figures here: " + ", ".join(absent) + "."]
    for name in names:
        lines += ["", *section(name, scripts / f"{name}.py", loaded[name])]
    return "\n".join(lines) + "\n"


def status(data: dict[str, Any] | None) -> str:
    """``not run`` (no JSON), ``old format: rerun`` (neither ratios nor any table to show), or
    ``run``."""
    if data is None:
        return "not run"
    if "ratios" not in data and not tables(data):
        return "old format: rerun"
    return "run"


def command(name: str, data: dict[str, Any]) -> str:
    """The command that wrote the JSON, with the interpreter's path cut to ``python``."""
    words = data.get("command")
    if not isinstance(words, list) or not words:
        return f"python benchmarks/{name}.py"
    if Path(str(words[0])).name.startswith("python"):
        words = ["python", *words[1:]]
    return " ".join(str(w) for w in words)


def section(name: str, script: Path, data: dict[str, Any] | None) -> list[str]:
    what, usage = describe(script)
    out = [f"## {name}", "", f"`benchmarks/{name}.py`: {what}", ""]
    if usage:
        out += ["```", *usage, "```", ""]
    if data is None:
        return [*out, f"**Not run**: there is no `benchmarks/results/{name}.json`."]
    m = machine(data)
    load_line = (
        "load average not recorded"
        if not m["load"]
        else "load average " + ", ".join(f"{x:.1f}" for x in m["load"]) + " at the end (1, 5, 15 min)"
    )
    out += [
        f"This run: `{command(name, data)}`, ended {when(m['date'])}; torch {m['torch'] or 'not recorded'}, "
        f"{m['cores'] or 'unrecorded'} cores, {load_line}.",
    ]
    if status(data) != "run":
        out += [
            "",
            f"**Old format**: this JSON predates the ratios-and-tables format; rerun `python "
            f"benchmarks/{name}.py` to render its figures here.",
        ]
    for table in tables(data):
        out += [""]
        if table.get("title"):
            out += [f"**{table['title']}**", ""]
        out += markdown_table(table["columns"], table["rows"])
        if table.get("note"):
            out += ["", str(table["note"])]
    ratios = data.get("ratios", [])
    if ratios:
        out += ["", "Ratios, median [min, max] (repetitions):", ""]
        if any(r.get("target") is not None for r in ratios):
            out += markdown_table(
                ["figure", "median [min, max] (n)", "target", "verdict"],
                [[figure(r), spread(r), target(r), verdict(r)] for r in ratios],
            )
        else:
            out += markdown_table(
                ["figure", "median [min, max] (n)"], [[figure(r), spread(r)] for r in ratios]
            )
    elif status(data) == "run":
        out += ["", "It records no ratios."]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare with docs/benchmarks.md")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is not what {COMMAND} writes: run it", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"written: {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
