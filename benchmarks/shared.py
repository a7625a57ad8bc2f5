"""What the benchmarks record about the machine they ran on, and where their results go."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from localsgd.studies.executors.local import usable_cores

RESULTS = Path(__file__).resolve().parent / "results"


def machine_at_end() -> dict[str, Any]:
    """Date, versions, usable cores and the load average now (the machine is shared); the
    line saying so is printed."""
    load = os.getloadavg()
    print(f"\n{usable_cores()} cores; load average {load[0]:.1f} at the end (the machine is shared)")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cores": usable_cores(),
        "load_average_at_end": load,
    }


def write_results(name: str, out: dict[str, Any], quick: bool) -> None:
    """``benchmarks/results/<name>.json``, unless the run was ``--quick`` (a smoke test)."""
    if quick:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"written: {RESULTS.name}/{name}.json")
