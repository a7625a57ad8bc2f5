"""A metaparameter search batched in one process against the same runs one after another.

R = 64 trials of one K = 1 run of the MNIST-1D MLP and CNN (mini-batch SGD, batch 32,
learning rate log-spaced over [1e-3, 1], momentum 0 or 0.9, a seed each, 60 steps and 2
evaluations each, every record written: metrics rows, statuses, final models), trained

- ``batched``: together in one process (:func:`localsgd.run.trials.train_trials`: the
  trials as stacked replicas, one stacked evaluation, group commits of their records);
- ``sequential``: one after another (:func:`localsgd.run.training.train`, each run alone);

interleaved, repeated, the ratio sequential / batched taken per repetition (target >= 10
for the MLP). What bounds it is measured beside it, per workload, on the bare model (no
record, no evaluation), interleaved the same way:

- ``64 steps at batch 32 / one step at batch 64·32``: one plain model; what batching 64
  trials into one wide step could gain on the arithmetic at most, were the stacked step
  as cheap as one model's at the concatenated batch;
- ``stacked step / one step at batch 64·32``: the trials' stacked step (fused forward and
  backward of 64 replicas, their per-trial losses, the per-trial SGD) against that limit.

The batched search also reports how much of its time is training (the loop's own clock,
``batch_wall_seconds``) and how much the rest (building, evaluating, recording), and its
ceiling: sequential / (the same steps of the plain model at batch 64·32 + the rest),
the wide steps timed in the same repetitions as the searches; the ratio a batched search
would reach if its training cost no more than one wide step per step.

    python benchmarks/search.py            # the figures in docs: about 4 minutes on 2 cores
    python benchmarks/search.py --quick    # smoke run: 8 trials x 10 steps, 2 repetitions
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from localsgd import workloads
from localsgd.run.config import RunConfig, run_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import MIN_REPS, interleaved, machine_at_end, ratio, ratio_line, write_results

WORKLOADS = ("mnist1d_mlp", "mnist1d_cnn")
TARGET = {"mnist1d_mlp": 10.0}
"""The issue's target for sequential / batched; the CNN's figure is reported with its bound."""
BATCH = 32


def search_configs(workload: str, trials: int, steps: int) -> list[RunConfig]:
    """R trials of one K = 1 run: learning rate log-spaced over [1e-3, 1], momentum 0 or
    0.9, and a seed each, as a search of ``localsgd study`` would produce."""
    return [
        run_config(
            {
                "name": f"trial-{i}",
                "workload": {"name": workload, "num_samples": 1000},
                "workers": 1,
                "engine": "simulated",
                "seed": i,
                "algorithm": {"name": "minibatch_sgd"},
                "data": {"batch_size": BATCH},
                "optimizer": {
                    "lr": 10 ** (-3 + 3 * i / max(trials - 1, 1)),
                    "momentum": 0.9 * (i % 2),
                    "nesterov": False,
                },
                "schedule": {"name": "cosine"},
                "train": {"epochs": 100, "max_steps": steps, "eval_every": steps // 2},
            }
        )
        for i in range(trials)
    ]


class Search:
    """One workload's search, timed: each call trains every trial into fresh folders."""

    def __init__(self, name: str, configs: list[RunConfig], root: Path) -> None:
        self.workload = workloads.build(name, num_samples=1000)
        self.configs = configs
        self.root = root
        self.calls = 0
        self.training: list[float] = []
        """The batched search's training seconds (the loop's clock), per call."""

    def folders(self, kind: str) -> list[Path]:
        self.calls += 1
        out = [self.root / f"{kind}-{self.calls}-{i}" for i in range(len(self.configs))]
        for folder in out:
            folder.mkdir()
        return out

    def batched(self) -> float:
        from localsgd.run.trials import train_trials

        folders = self.folders("batched")
        start = time.perf_counter()
        statuses = train_trials(self.configs, folders, workload=self.workload)
        seconds = time.perf_counter() - start
        assert all(s.status in ("completed", "diverged") for s in statuses), [s.status for s in statuses]
        self.training.append(float(statuses[0].details["batch_wall_seconds"]))
        return seconds

    def sequential(self) -> float:
        from localsgd.run.training import train

        folders = self.folders("sequential")
        start = time.perf_counter()
        for config, folder in zip(self.configs, folders):
            train(config, folder, 0, 1, workload=self.workload)
        return time.perf_counter() - start


Step = Callable[[], None]


def bound_steps(name: str, trials: int, steps: int) -> dict[str, Callable[[], float]]:
    """Seconds for ``steps`` steps of: one plain model at batch 32 run ``trials`` times
    (``alone``), one plain model at batch trials·32 (``wide``), and the trials' stacked
    step over ``trials`` replicas (``stacked``), on the same data."""
    from localsgd.engines.simulated.trials import ReplicaSGD, SeededModels, TrialReplicas

    workload = workloads.build(name, num_samples=1000)
    seeds = list(range(trials))
    replicas = TrialReplicas(
        workload, SeededModels(workload.make_model, seeds, torch.device("cpu")), 1, seeds, torch.device("cpu")
    )
    params = [p for p in replicas.module.parameters() if p.requires_grad]
    sgd = ReplicaSGD(
        [{"params": params, "weight_decay": replicas.per_replica([0.0] * trials)}],
        momentum=replicas.per_replica([0.9 * (i % 2) for i in range(trials)]),
        nesterov=False,
    )
    sgd.set_lr(replicas.per_replica([0.01] * trials))
    batches = [b for b, _ in zip(replicas.batches(BATCH, 0), range(4))]
    model = workload.make_model(0)
    plain = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def stacked_step(batch: Any) -> None:
        sgd.zero_grad()
        replicas.forward_backward(batch)
        sgd.step()

    def plain_step(batch: dict[str, torch.Tensor]) -> None:
        plain.zero_grad()
        workload.loss(model, batch).backward()
        plain.step()

    def timed(step: Callable[[int], None]) -> float:
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        return time.perf_counter() - start

    def alone(i: int) -> None:
        batch = batches[i % len(batches)]
        for r in range(trials):
            plain_step({"x": batch["x"][r], "y": batch["y"][r]})

    def wide(i: int) -> None:
        batch = batches[i % len(batches)]
        plain_step({"x": batch["x"].flatten(0, 1), "y": batch["y"].flatten()})

    return {
        "alone": lambda: timed(alone),
        "wide": lambda: timed(wide),
        "stacked": lambda: timed(lambda i: stacked_step(batches[i % len(batches)])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="8 trials x 10 steps, 2 repetitions: a smoke run"
    )
    parser.add_argument("--trials", type=int, default=None, help="R: trials of the search (default 64)")
    parser.add_argument("--steps", type=int, default=None, help="steps of each trial (default 60)")
    parser.add_argument("--reps", type=int, default=None, help=f"repetitions (default {MIN_REPS})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here (even --quick)")
    args = parser.parse_args()
    trials = args.trials or (8 if args.quick else 64)
    steps = args.steps or (10 if args.quick else 60)
    reps = args.reps or (2 if args.quick else MIN_REPS)
    warmup = 0 if args.quick else 1
    chosen = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(chosen) - set(WORKLOADS))
    if unknown or not chosen:
        parser.error(f"--workloads must name some of {', '.join(WORKLOADS)}, got {args.workloads!r}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    ratios: list[dict[str, Any]] = []
    search_rows: list[list[Any]] = []
    bound_rows: list[list[Any]] = []
    print(
        f"{trials} trials x {steps} steps, {reps} repetitions (+{warmup} warm-up), {args.threads} thread(s)"
    )
    for name in chosen:
        configs = search_configs(name, trials, steps)
        bound_fns = bound_steps(name, trials, steps)
        with tempfile.TemporaryDirectory() as tmp:
            search = Search(name, configs, Path(tmp))
            # The wide step of the bare model, in the same repetitions: the ceiling below.
            seconds = interleaved(
                {"batched": search.batched, "sequential": search.sequential, "wide": bound_fns["wide"]},
                reps,
                warmup=warmup,
            )
        search_ratio = ratio(
            "search: sequential / batched",
            seconds["sequential"],
            seconds["batched"],
            target=TARGET.get(name),
            workload=name,
            trials=trials,
        )
        training = search.training[warmup:]
        # What the ratio would be if the trials' training cost one wide step of the bare model
        # per step (their arithmetic in one matmul per layer, nothing else) and the rest of the
        # batched search (building, evaluations, records) stayed as measured.
        rest = [b - t for b, t in zip(seconds["batched"], training)]
        ceiling = ratio(
            "ceiling: sequential / (wide steps + the rest)",
            seconds["sequential"],
            [w + r for w, r in zip(seconds["wide"], rest)],
            workload=name,
            trials=trials,
        )
        ratios += [search_ratio, ceiling]
        print(ratio_line(search_ratio), flush=True)
        print(ratio_line(ceiling), flush=True)
        batched = statistics.median(seconds["batched"])
        train_part = statistics.median(training)
        search_rows.append(
            [
                name,
                trials,
                steps,
                round(statistics.median(seconds["sequential"]), 2),
                round(batched, 2),
                round(train_part, 2),
                round(batched - train_part, 2),
                _range(search_ratio),
                search_ratio["verdict"] or "(no target)",
                _range(ceiling),
            ]
        )

        bound = interleaved(bound_fns, reps, warmup=1)
        limit = ratio(
            f"bound: {trials} steps at batch 32 / one at {trials}·32",
            bound["alone"],
            bound["wide"],
            workload=name,
        )
        stacked = ratio(
            f"stacked step / one at batch {trials}·32", bound["stacked"], bound["wide"], workload=name
        )
        ratios += [limit, stacked]
        print(ratio_line(limit), flush=True)
        print(ratio_line(stacked), flush=True)
        per_step = {k: 1e3 * statistics.median(v) / steps for k, v in bound.items()}
        bound_rows.append(
            [
                name,
                round(per_step["alone"], 2),
                round(per_step["wide"], 2),
                round(per_step["stacked"], 2),
                _range(limit),
                _range(stacked),
            ]
        )

    out = {
        "benchmark": "search",
        "trials": trials,
        "steps": steps,
        "threads": args.threads,
        "ratios": ratios,
        "tables": [
            {
                "title": f"A {trials}-trial search: batched in one process against the runs one after another",
                "columns": [
                    "workload",
                    "trials",
                    "steps",
                    "sequential (s)",
                    "batched (s)",
                    "of which training (s)",
                    "of which the rest (s)",
                    "sequential / batched",
                    "verdict (target >= 10, MLP)",
                    "ceiling: sequential / (wide steps + the rest)",
                ],
                "rows": search_rows,
                "note": (
                    "K = 1 trials of mini-batch SGD at batch 32, learning rate log-spaced over [1e-3, 1], "
                    f"momentum 0 or 0.9, a seed each, {steps} steps and 2 evaluations each, every record "
                    "written. Seconds are medians over the repetitions; the ratio is per repetition, "
                    "median [min, max]. 'Training' is the batched loop's own clock; 'the rest' is "
                    "building the trials, their stacked evaluations and their group-committed records. "
                    "The ceiling is, per repetition, sequential over the time of the same steps of the "
                    f"bare model at batch {trials}·32 plus that repetition's rest: the ratio a batched "
                    "search whose training cost no more than one wide step per step would reach."
                ),
            },
            {
                "title": "What bounds the batched search: one training step of the bare model",
                "columns": [
                    "workload",
                    f"{trials} steps at batch 32 (ms per step of all)",
                    f"one step at batch {trials}·32 (ms)",
                    f"stacked step of {trials} trials (ms)",
                    f"{trials} steps at batch 32 / one at {trials}·32",
                    f"stacked step / one at {trials}·32",
                ],
                "rows": bound_rows,
                "note": (
                    "A plain model (no engine, no record) stepped with torch's SGD: the first ratio is the "
                    "most that batching the trials' arithmetic into one wide step can gain; the second "
                    "is how far the trials' stacked step (fused R-replica forward and backward, per-trial "
                    "losses, per-trial SGD) is from that wide step. Medians over the repetitions."
                ),
            },
        ],
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine_at_end(),
        "command": ["python", "benchmarks/search.py", *sys.argv[1:]],
    }
    print(f"took {out['seconds']} s")
    write_results("search", out, args.quick)
    if args.out is not None:
        import json

        args.out.write_text(json.dumps(out, indent=2) + "\n")


def _range(r: dict[str, Any]) -> str:
    return f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"


if __name__ == "__main__":
    main()
