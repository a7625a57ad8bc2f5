"""A soak study: a study killed with SIGKILL again and again ends as if it had run in one go.

A study of many short MNIST-1D MLP runs (a mix of algorithms on the process engine and on
the simulated one, mid-run checkpoints every few steps; ``--batch-trials 1`` by default, so
that the simulated engine's runs train alone and take checkpoints too) is run twice:

- into store A, uninterrupted (``localsgd study``, once);
- into store B by the same command, whose whole process group is sent SIGKILL at seeded
  random moments -- some at a random time into a run, some right after a run starts, some
  while a run is writing a checkpoint (a rank's file written, ``latest.json`` not yet),
  some while the command starts up -- and which is started again after each kill until it
  exits 0.

After each kill every process of the killed tree, and every process that inherited the
soak's environment marker (:data:`TAG`), must be gone (else: an orphan). At the
end, store B must hold every planned run once, completed (index row, one run folder, no
``.partial`` folder, no checkpoints left), and every run's metrics rows must equal A's
field by field, but for the fields that measure time (:data:`TIMED`).

    python benchmarks/soak.py                         # the default soak (see --help)
    python benchmarks/soak.py --runs 6 --kills 3 --out /tmp/soak.json   # a smoke run

Exit code 1 on any mismatch, lost, duplicate or leftover run, orphaned process or failed
command; the JSON is written either way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shared import RESULTS, machine_at_end

from localsgd.util.lifetime import process_alive

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

TIMED = ("wall_seconds", "comm_seconds", "updates_per_second", "by_scope.*.seconds")
"""The fields of a metrics row that measure time and so differ between two runs of one
config: training wall seconds, seconds spent in collectives (in total and per scope) and the
rate derived from wall seconds. Every other field -- step, epoch, samples, lr, losses,
metrics, bytes, syncs and collectives (in total and per scope) -- must be equal bit for bit."""

# (engine, workers, algorithms): every synchronous algorithm on both engines that resume
# from mid-run checkpoints; workers that step alone (asynchronous algorithms, Hogwild) take
# no mid-run checkpoints and restart instead, so they are left out.
ALGORITHMS = [
    {"name": "minibatch_sgd"},
    {"name": "gradient_accumulation", "steps": 2},
    {"name": "local_sgd", "period": 2},
    {"name": "local_sgd", "period": 5},
    {"name": "post_local_sgd", "switch_epoch": 1.0, "period": 4},
    {"name": "slowmo", "period": 4, "outer_momentum": 0.5, "outer_lr": 1.0},
    {"name": "diloco", "period": 4, "outer_lr": 0.7, "outer_momentum": 0.9},
    {"name": "hierarchical_local_sgd", "period": 2, "block_period": 2, "block_size": 2},
    {"name": "sma", "momentum": 0.9},
]
GRIDS = [("processes", 2, ALGORITHMS[:7]), ("simulated", 4, ALGORITHMS)]


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def study_text(runs: int, steps: int, checkpoint_every: int) -> str:
    """The study file: ``runs`` runs, going through every (engine, algorithm) of the grids
    above for seed 0, then for seed 1, and so on."""
    # The engines take turns, so that a small study has runs of each.
    combos = [
        (engine, workers, algorithms[i])
        for i in range(max(len(algorithms) for _, _, algorithms in GRIDS))
        for engine, workers, algorithms in GRIDS
        if i < len(algorithms)
    ]
    lines = [
        "[study]",
        'name = "soak"',
        'description = "MNIST-1D MLP, short runs with mid-run checkpoints, killed and resumed."',
        "[base]",
        "threads = 1",
        'device = "cpu"',
        'workload = { name = "mnist1d_mlp", num_samples = 1000 }',
        "[base.data]",
        "batch_size = 16",
        "[base.optimizer]",
        'name = "sgd"',
        "lr = 0.05",
        "momentum = 0.9",
        "[base.train]",
        "epochs = 100",
        f"max_steps = {steps}",
        f"eval_every = {max(1, steps // 4)}",
        f"checkpoint_every = {checkpoint_every}",
    ]
    blocks: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
    for i in range(runs):
        engine, workers, algorithm = combos[i % len(combos)]
        blocks.setdefault((i // len(combos), engine, workers), []).append(algorithm)
    for (seed, engine, workers), algorithms in blocks.items():
        lines += [
            "[[grid]]",
            f"engine = [{json.dumps(engine)}]",
            f"workers = [{workers}]",
            f"seed = [{seed}]",
            f"algorithm = {toml_value(algorithms)}",
        ]
    return "\n".join(lines) + "\n"


# -- processes ---------------------------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (by parent links in /proc), at this moment."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def left_running(pids: set[int], timeout: float) -> set[int]:
    """Those of ``pids`` still alive after ``timeout`` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {pid for pid in pids if process_alive(pid)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


TAG = f"LOCALSGD_SOAK={os.getpid()}-{time.time_ns()}"
"""In the environment of every process a study of this soak starts (children inherit it):
how processes that left the killed tree (a launcher in a session of its own, reparented
once its parent died) are found."""


def tagged() -> set[int]:
    """This soak's processes still running, wherever they are in the process tree."""
    found = set()
    marker = TAG.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0") and process_alive(int(entry)):
                        found.add(int(entry))
            except OSError:  # gone, or another user's
                continue
    return found


def study_command(study: Path, store: Path, batch_trials: int) -> list[str]:
    return [
        sys.executable,
        *("-m", "localsgd.cli", "study", str(study), "--out", str(store)),
        *("--batch-trials", str(batch_trials)),
    ]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"
    name, value = TAG.split("=")
    env[name] = value
    return env


# -- where the study stands ----------------------------------------------------------------


def partials(store: Path) -> set[str]:
    try:
        return {p.name[: -len(".partial")] for p in (store / "runs").iterdir() if p.name.endswith(".partial")}
    except FileNotFoundError:
        return set()


def unnamed_checkpoint(store: Path, since: float, runs: set[str] | None = None) -> bool:
    """Whether a run (of ``runs``, default: any unfinished one) is writing a checkpoint: a
    rank's file (or its temporary file), written at or after ``since``, of a step that
    ``latest.json`` does not name yet. (A run killed during its first checkpoint by an
    earlier start keeps such files, older than ``since``.)"""
    for run in partials(store) if runs is None else runs:
        folder = store / "runs" / f"{run}.partial" / "checkpoints"
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        try:
            latest = json.loads((folder / "latest.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            latest = None
        for name in names:
            stem = name.lstrip(".")
            if stem.startswith("step") and "-rank" in stem:
                step = stem[4 : stem.index("-rank")]
                # Older steps' files linger a moment after latest.json moves on.
                if step.isdigit() and (latest is None or int(step) > latest):
                    try:
                        if (folder / name).stat().st_mtime >= since:
                            return True
                    except FileNotFoundError:  # a temporary file renamed, an old one deleted
                        continue
    return False


def in_progress(store: Path, since: float) -> list[str]:
    """Runs that this start of the study began (or resumed) and had not finished: the
    index rows still ``running`` that were (re)started at or after ``since``. (An earlier
    kill's run waiting to be resumed is unfinished too, but was not in progress.)"""
    if not (store / "index.sqlite").exists():
        return []
    # A plain connection: it rolls back a killed writer's journal, as the next start would.
    db = sqlite3.connect(store / "index.sqlite", timeout=30)
    try:
        found = db.execute(
            "SELECT run_id FROM runs WHERE status = 'running' AND started >= ? ORDER BY run_id", (since,)
        ).fetchall()
    finally:
        db.close()
    # A run moved into place but not yet indexed as finished was past its end.
    return [run_id for (run_id,) in found if (store / "runs" / f"{run_id}.partial").is_dir()]


class Watch:
    """Runs started (a ``.partial`` folder not seen before) since the command started."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.seen = partials(store)
        self.started = 0

    def poll(self) -> None:
        now = partials(self.store)
        self.started += len(now - self.seen)
        self.seen |= now


def kill_moment(rng: random.Random, mean_gap: float) -> dict[str, Any]:
    """Where the next kill lands: after ``after`` more runs have started, then ``mode``:
    ``random`` sleeps up to a run's length, ``run_start`` at most 0.2 s, ``checkpoint``
    waits for a checkpoint being written; ``startup`` kills at most 15 s after the command
    starts (its workers starting, or its first runs)."""
    mode = rng.choice(["random", "random", "run_start", "checkpoint", "startup"])
    after = 0 if mode == "startup" else rng.randint(1, max(1, round(2 * mean_gap) - 1))
    delay = {
        "random": rng.uniform(0.0, 2.0),
        "run_start": rng.uniform(0.0, 0.2),
        "checkpoint": 0.0,
        "startup": rng.uniform(0.0, 15.0),
    }[mode]
    return {"mode": mode, "after": after, "delay": delay}


def run_killed(
    cmd: list[str], store: Path, moment: dict[str, Any], log: Path
) -> tuple[int | None, dict[str, Any]]:
    """One start of the study command; SIGKILL to its process group at ``moment`` unless it
    exits first. Returns (exit code, None when killed; what the kill found)."""
    watch = Watch(store)
    began = time.time()
    with open(log, "a") as err:
        err.write(f"--- start, kill planned: {moment}\n")
        err.flush()
        proc = subprocess.Popen(
            cmd, stdout=err, stderr=err, env=environment(), start_new_session=True, text=True
        )
        armed_at: float | None = None
        while proc.poll() is None:
            watch.poll()
            if watch.started >= moment["after"]:
                if moment["mode"] == "checkpoint":
                    if unnamed_checkpoint(store, began):
                        break
                    # A run too short for another checkpoint: give up waiting after a while.
                    armed_at = armed_at or time.monotonic()
                    if time.monotonic() - armed_at > 5.0:
                        break
                else:
                    armed_at = armed_at or time.monotonic()
                    if time.monotonic() - armed_at >= moment["delay"]:
                        break
            time.sleep(0.001 if moment["mode"] == "checkpoint" and watch.started >= moment["after"] else 0.02)
        if proc.poll() is not None:
            return proc.returncode, {}
        tree = descendants(proc.pid)
        seen = tagged()  # the same processes, found by their environment: the check sees them
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # The state the kill froze (the study's processes are gone; its launchers and
        # workers follow within moments).
        orphans = left_running(tree, timeout=30.0)
        deadline = time.monotonic() + 10.0
        while tagged() and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans |= tagged()
        mid_run = in_progress(store, began)
        writing = unnamed_checkpoint(store, began, set(mid_run))
        for pid in orphans:  # so that the next start is not refused; counted as a failure
            os.kill(pid, signal.SIGKILL)
        err.write(
            f"--- killed: mid-run {mid_run}, writing a checkpoint {writing}, orphans {sorted(orphans)}\n"
        )
    return None, {
        **moment,
        "mid_run": bool(mid_run),
        "runs_in_progress": mid_run,
        "unfinished_runs": sorted(partials(store)),
        "during_checkpoint_write": writing,
        "processes_in_tree": len(tree),
        "processes_tagged": len(seen),
        "orphans": sorted(orphans),
    }


# -- checks --------------------------------------------------------------------------------


def resumes(store: Path) -> list[int]:
    """Per run of the store that resumed from a checkpoint, how many times it did
    (``status.json``'s ``resumed``: the steps it resumed from)."""
    found = []
    for status in sorted((store / "runs").glob("*/status.json")):
        steps = json.loads(status.read_text()).get("resumed") or []
        if steps:
            found.append(len(steps))
    return found


def untimed(row: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in row.items() if k not in TIMED}
    if isinstance(row.get("by_scope"), dict):
        row["by_scope"] = {
            scope: {k: v for k, v in fields.items() if f"by_scope.*.{k}" not in TIMED}
            for scope, fields in row["by_scope"].items()
        }
    return row


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def index(store: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(f"{(store / 'index.sqlite').resolve().as_uri()}?mode=ro", uri=True) as db:
        return [tuple(r) for r in db.execute("SELECT run_id, status, attempts FROM runs ORDER BY run_id")]


def check_store(store: Path, planned: set[str]) -> list[str]:
    """What is wrong with a finished store: every planned run once, completed, no leftovers."""
    problems = []
    indexed = index(store)
    ids = [run_id for run_id, _, _ in indexed]
    if len(ids) != len(set(ids)):
        problems.append(f"{store.name}: duplicate index rows")
    if set(ids) != planned:
        problems.append(f"{store.name}: index runs {len(set(ids))} != planned {len(planned)}")
    for run_id, status, _ in indexed:
        if status != "completed":
            problems.append(f"{store.name}: run {run_id} is {status}")
    folders = sorted(p.name for p in (store / "runs").iterdir())
    if folders != sorted(planned):
        extra = sorted(set(folders) - planned)
        missing = sorted(planned - set(folders))
        problems.append(f"{store.name}: run folders: extra {extra}, missing {missing}")
    for run_id in planned:
        folder = store / "runs" / run_id
        if (folder / "checkpoints").exists():
            problems.append(f"{store.name}: run {run_id} kept its checkpoints")
        status = json.loads((folder / "status.json").read_text()) if (folder / "status.json").exists() else {}
        if status.get("status") != "completed":
            problems.append(f"{store.name}: run {run_id} status.json says {status.get('status')}")
    return problems


def compare(a: Path, b: Path, planned: set[str]) -> tuple[int, list[str]]:
    """(rows compared, mismatches): every run's untimed rows in B against A's, in order."""
    compared, mismatches = 0, []
    for run_id in sorted(planned):
        got, expected = rows(b / "runs" / run_id), rows(a / "runs" / run_id)
        if len(got) != len(expected):
            mismatches.append(f"run {run_id}: {len(got)} rows in B, {len(expected)} in A")
            continue
        steps = [r["step"] for r in got]
        if steps != sorted(set(steps)):
            mismatches.append(f"run {run_id}: steps not strictly increasing in B: {steps}")
        for i, (g, e) in enumerate(zip(got, expected)):
            compared += 1
            if untimed(g) != untimed(e):
                fields = sorted(k for k in set(g) | set(e) if untimed(g).get(k) != untimed(e).get(k))
                mismatches.append(f"run {run_id} row {i} (step {e['step']}): {fields} differ")
    return compared, mismatches


# -- the soak --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="runs in the study, at least (default 100)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the study, at least (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument(
        "--checkpoint-every", type=int, default=10, help="train.checkpoint_every (default 10)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "soak.json", help="the JSON (default results/soak.json)"
    )
    parser.add_argument(
        "--batch-trials",
        type=int,
        default=1,
        help="localsgd study --batch-trials (default 1: every run trains alone and takes mid-run "
        "checkpoints; the simulated engine's batched trials take none and restart from step 0)",
    )
    parser.add_argument("--keep", type=Path, help="keep the stores and logs in this folder")
    args = parser.parse_args()
    if min(args.runs, args.steps, args.checkpoint_every, args.batch_trials) < 1 or args.kills < 0:
        parser.error(
            "--runs, --steps, --checkpoint-every and --batch-trials must be at least 1, --kills at least 0"
        )
    rng = random.Random(args.seed)
    began = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        text = study_text(args.runs, args.steps, args.checkpoint_every)
        planned_count = args.runs
        study = work / "soak.toml"
        study.write_text(text)
        a, b = work / "A", work / "B"
        failures: list[str] = []

        start = time.perf_counter()
        with open(work / "A.log", "w") as log:
            done = subprocess.run(
                study_command(study, a, args.batch_trials), stdout=log, stderr=log, env=environment()
            )
        seconds_a = time.perf_counter() - start
        if done.returncode != 0:
            failures.append(
                f"store A: the uninterrupted study exited {done.returncode} (see {work / 'A.log'})"
            )
        print(f"A: {planned_count} runs uninterrupted in {seconds_a:.0f} s", file=sys.stderr, flush=True)

        start = time.perf_counter()
        kills: list[dict[str, Any]] = []
        starts, code = 0, None
        # Kills are spaced by about half the runs there are per kill, so that all of them
        # land before the study ends (a random delay lets a few more runs go by).
        mean_gap = planned_count / (2 * max(1, args.kills))
        while code != 0:
            moment = kill_moment(rng, mean_gap) if len(kills) < args.kills else None
            starts += 1
            if moment is None:
                with open(work / "B.log", "a") as log:
                    log.write("--- start, no kill planned\n")
                    log.flush()
                    code = subprocess.run(
                        study_command(study, b, args.batch_trials), stdout=log, stderr=log, env=environment()
                    ).returncode
            else:
                code, kill = run_killed(study_command(study, b, args.batch_trials), b, moment, work / "B.log")
                if code is None:
                    kills.append(kill)
                    print(
                        f"kill {len(kills)}: {kill['mode']}, mid-run {kill['mid_run']}",
                        file=sys.stderr,
                        flush=True,
                    )
                    if kill["orphans"]:
                        failures.append(f"kill {len(kills)}: processes left running: {kill['orphans']}")
                    continue
            if code != 0:
                failures.append(f"store B: the study exited {code} (see {work / 'B.log'})")
                break
        seconds_b = time.perf_counter() - start
        log_b = (work / "B.log").read_text()
        # Runs that lost an unfinished attempt for want of a checkpoint: killed before their
        # first one, or trials batched together (they take none).
        restarted = len(set(re.findall(r"run (\w+): \S+: left unfinished without a checkpoint", log_b)))
        resumed = resumes(b)

        planned = {p.name for p in (a / "runs").iterdir()} if (a / "runs").is_dir() else set()
        if len(planned) != planned_count:
            failures.append(f"store A holds {len(planned)} runs, the study plans {planned_count}")
        failures += check_store(a, planned) + check_store(b, planned)
        compared, mismatches = compare(a, b, planned) if not failures else (0, [])
        attempts = sum(n for _, _, n in index(b)) if (b / "index.sqlite").exists() else 0

    mid = sum(k["mid_run"] for k in kills)
    summary = {
        "runs": planned_count,
        "kills": len(kills),
        "kills_mid_run": mid,
        "kills_between_runs": len(kills) - mid,
        "kills_during_checkpoint_write": sum(k["during_checkpoint_write"] for k in kills),
        "starts_of_B": starts,
        "resumes_from_checkpoint": sum(resumed),
        "runs_resumed_from_checkpoint": len(resumed),
        "runs_restarted_from_step_0": restarted,
        "attempts_in_B_index": attempts,
        "seconds_A": round(seconds_a, 1),
        "seconds_B": round(seconds_b, 1),
        "seconds_total": round(time.perf_counter() - began, 1),
        "rows_compared": compared,
        "mismatches": len(mismatches),
        "failures": len(failures),
        "completed_once": not failures,
    }
    table = [
        "| runs | kills | mid-run / between runs | during a checkpoint write | resumes from a checkpoint | runs restarted from step 0 | time A + B (s) | rows compared | mismatches |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {planned_count} | {len(kills)} | {mid} / {len(kills) - mid} | {summary['kills_during_checkpoint_write']} | "
        f"{sum(resumed)} ({len(resumed)} runs) | {restarted} | {seconds_a:.0f} + {seconds_b:.0f} | {compared} | {len(mismatches)} |",
    ]
    print("\n".join(table))
    for line in failures + mismatches[:20]:
        print(f"FAILED: {line}")
    out = {
        "command": ["python", "benchmarks/soak.py", *sys.argv[1:]],
        "seed": args.seed,
        "steps": args.steps,
        "checkpoint_every": args.checkpoint_every,
        "batch_trials": args.batch_trials,
        "timed_fields_excluded": list(TIMED),
        "machine": machine_at_end(),
        "summary": summary,
        "table": table,
        "tables": [
            {
                "title": "The soak",
                "columns": [c.strip() for c in table[0].strip("|").split("|")],
                "rows": [[c.strip() for c in table[2].strip("|").split("|")]],
                "note": (
                    "Every run completed once in store B, no process outlived a kill, and every metrics "
                    "row equalled the uninterrupted study's but for its timed fields."
                    if not failures and not mismatches
                    else f"{len(failures)} failures and {len(mismatches)} mismatches (listed in the JSON)."
                ),
            }
        ],
        "failures": failures,
        "mismatches": mismatches,
        "kills": kills,
        "study": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written: {args.out}")
    return 1 if failures or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
