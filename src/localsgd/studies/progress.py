"""What a study and a run say while they go.

A study prints one plain line per finished run -- its variant (as the report labels it), K,
seed, status, primary metric, run time and the ETA -- which reads the same in a log file;
in a terminal the same lines scroll above a progress bar. The ETA is the mean run time so
far times the runs left (divided among the runs in parallel): runs take minutes each, and
a speed estimated over a short window, as progress bars do by default, knows nothing.

``localsgd train`` follows its run's ``metrics.jsonl`` as rank 0 writes it
(:func:`follow_rows`), whichever engine or process trains it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from localsgd.records.record import Metric, MetricsRow, RecordError, Status, lost_line, read_metrics
from localsgd.report.labels import variant_label
from localsgd.run.config import RunConfig
from localsgd.util.nest import flatten


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def primary_value(info: Status | None, metric: Metric | None = None) -> str:
    """``"test accuracy 97.45%"``: the primary metric's last evaluation ('-' without one).
    ``metric``: the workload's primary metric, for a status that does not declare it (a
    run that failed or diverged)."""
    if info is not None and info.metric() is not None:
        metric = info.metric()
    if info is None or metric is None or info.final is None:
        return "-"
    return f"{metric.title} {metric.show(info.final.metrics.get(metric.name))}"


def run_label(run: RunConfig) -> str:
    """``"local_sgd H=4  K=4  seed=1"``."""
    return f"{variant_label(run.to_dict())}  K={run.workers}  seed={run.seed}"


def plan_lines(runs: Sequence[RunConfig]) -> list[str]:
    """One line per planned run: its id, label and batch, then every other setting that
    differs between the runs (``engine_options.speed_spread=0.5``)."""
    flat = [flatten(run.to_dict()) for run in runs]
    shown = ("name", "algorithm.", "workers", "seed", "data.batch_size")
    keys = sorted({k for f in flat for k in f if not k.startswith(shown)})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]
    lines = []
    for run, f in zip(runs, flat):
        extra = "".join(f"  {k}={f[k]}" for k in varying if k in f)
        lines.append(f"{run.run_id()}  {run_label(run)}  B={run.data.batch_size}{extra}")
    return lines


class StudyProgress:
    """Reports a study's runs as they finish (see the module docstring).

    ``terminal``: draw a bar (default: when ``output`` is a terminal); ``parallel``: runs
    at once, for the ETA."""

    def __init__(
        self,
        name: str,
        total: int,
        *,
        parallel: int = 1,
        output: TextIO | None = None,
        terminal: bool | None = None,
    ) -> None:
        self.name = name
        self.total = total
        self.parallel = max(1, parallel)
        self.output = output or sys.stdout
        self.done = 0
        self.seconds: list[float] = []
        self._lock = threading.Lock()
        self._bar: Progress | None = None
        self._task: Any = None
        self._eta: tuple[float, float] | None = None  # (when estimated, seconds left then)
        if terminal is None:
            terminal = bool(getattr(self.output, "isatty", lambda: False)())
        self.terminal = terminal

    def __enter__(self) -> StudyProgress:
        if self.terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                _EtaColumn(self),
                TextColumn("{task.fields[running]}"),
                console=Console(file=self.output),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.name, total=self.total, running="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def say(self, line: str) -> None:
        """A line of its own (above the bar in a terminal)."""
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.output, flush=True)

    def eta(self) -> float | None:
        """Seconds left: the mean run time so far times the runs left, over the runs in
        parallel (None before the first run ends)."""
        if self._eta is None:
            return None
        when, left = self._eta
        return max(0.0, left - (time.monotonic() - when))

    def started(self, run: RunConfig) -> None:
        if self._bar is not None:
            self._bar.update(self._task, running=f"running {run_label(run)}")

    def finished(
        self,
        run: RunConfig,
        status: str,
        info: Status | None,
        seconds: float,
        metric: Metric | None = None,
    ) -> None:
        """Record one finished run and print its line (``metric``: the workload's primary
        metric, for a status that does not declare it)."""
        with self._lock:
            self.done += 1
            self.seconds.append(seconds)
            mean = sum(self.seconds) / len(self.seconds)
            left = self.total - self.done
            self._eta = (time.monotonic(), mean * left / min(self.parallel, max(left, 1)))
            eta = self.eta()
            width = len(str(self.total))
            parts = [
                f"[{self.done:>{width}}/{self.total}]",
                f"{status:<9}",
                run_label(run),
                primary_value(info, metric),
                duration(seconds),
                f"ETA {duration(eta) if eta is not None else '?'}",
            ]
            if info is not None and info.error is not None and status != "completed":
                parts.append(f"error: {info.error.line()}")
            if lost_line(info):
                parts.append(lost_line(info))
            self.say("  ".join(parts))
            if self._bar is not None:
                self._bar.update(self._task, advance=1, running="")


class _EtaColumn(ProgressColumn):
    """The bar's ETA from the mean run time (rich's own estimates speed over a 30 s window,
    which a run longer than that leaves empty)."""

    def __init__(self, progress: StudyProgress) -> None:
        super().__init__()
        self.progress = progress

    def render(self, task: Task) -> Text:
        eta = self.progress.eta()
        return Text(f"ETA {duration(eta) if eta is not None else '?'}", style="progress.remaining")


def row_line(row: MetricsRow, metric: Metric) -> str:
    """``"step 25 (epoch 0.40): train loss 0.5123, test accuracy 89.2%"``."""
    loss = "n/a" if row.train_loss is None else f"{row.train_loss:.4f}"
    return (
        f"step {row.step} (epoch {row.epoch:.2f}): train loss {loss}, "
        f"{metric.title} {metric.show(row.metrics.get(metric.name))}"
    )


@contextlib.contextmanager
def follow_rows(
    paths: Sequence[Path], on_row: Callable[[MetricsRow], None], interval: float = 0.25
) -> Iterator[None]:
    """Call ``on_row`` for each evaluation row as it is written to the first of ``paths``
    that exists (a run's ``.partial`` folder, then its final place), from a thread, until
    the block ends; rows written meanwhile are passed on before it returns."""
    stop = threading.Event()
    seen = 0

    def poll() -> None:
        nonlocal seen
        for path in paths:
            try:
                rows = read_metrics(path)
            except (RecordError, OSError):
                continue
            if rows or path.exists():
                for row in rows[seen:]:
                    on_row(row)
                seen = max(seen, len(rows))
                return

    def loop() -> None:
        while not stop.wait(interval):
            poll()

    thread = threading.Thread(target=loop, name="follow-rows", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()
