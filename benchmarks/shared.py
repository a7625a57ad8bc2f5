"""What the benchmarks that run studies' runs record about the machine they ran on."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch

from localsgd.studies.runner import usable_cores


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
