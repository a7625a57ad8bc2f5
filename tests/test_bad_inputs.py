"""Every bad input a clear error: over a hundred malformed inputs through the command line
(in this process, and a handful through the real ``localsgd`` command). Each ends with
exit code 2 and one line ``error: ...`` naming the key or file, never a traceback, and
leaves every file as it was: nothing is created, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from harness import LAUNCHER_VARS
from localsgd.cli import app
from localsgd.records import RECORD_VERSION, Status, Store
from localsgd.records.record import to_json
from localsgd.util.files import write_json_atomic

RUN = """
workers = 2
device = "cpu"
[workload]
name = "mnist1d_mlp"
num_samples = 1000
[data]
batch_size = 16
[train]
epochs = 1
max_steps = 4
"""

STUDY = """
[study]
name = "bad"
[base]
workers = 2
device = "cpu"
[base.workload]
name = "mnist1d_mlp"
num_samples = 1000
[base.train]
epochs = 1
max_steps = 4
[[grid]]
seed = [0, 1]
"""

FACTORIES = """
def not_a_workload():
    return 42


def broken():
    raise RuntimeError("the bucket is gone")
"""


@dataclass
class Case:
    id: str
    args: Callable[[Path], list[str]]
    """Sets up what the case needs in the folder and returns the command line."""
    error: str
    """A regular expression the error line must match (after ``error: ``)."""


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def train_set(key: str, value: str, error: str) -> Case:
    """``localsgd train run.toml --set key=value``."""
    return Case(
        f"set-{key}={value}"[:60],
        lambda d: ["train", str(write(d / "run.toml", RUN)), "--out", "store", "--set", f"{key}={value}"],
        error,
    )


def train_file(name: str, content: str | bytes, error: str, *extra: str) -> Case:
    return Case(f"file-{name}", lambda d: ["train", str(write(d / name, content)), "--out", "store", *extra], error)


def study_text(text: str, error: str, case_id: str, *extra: str) -> Case:
    return Case(f"study-{case_id}", lambda d: ["study", str(write(d / "s.toml", text)), *extra], error)


def algorithm(spec: str) -> str:
    return spec


FINITE = r"must be a finite number"

VALUES = [
    ("optimizer.lr", "inf", r"optimizer\.lr must be a finite number > 0, got inf"),
    ("optimizer.lr", "nan", r"optimizer\.lr must be a finite number > 0, got nan"),
    ("optimizer.lr", "-inf", r"optimizer\.lr must be a finite number > 0"),
    ("optimizer.lr", "0", r"optimizer\.lr must be a finite number > 0, got 0"),
    ("optimizer.lr", "-0.1", r"optimizer\.lr must be a finite number > 0"),
    ("optimizer.lr", "'fast'", r"optimizer\.lr must be a number, got str 'fast'"),
    ("optimizer.lr", "true", r"optimizer\.lr must be a number, got bool True"),
    ("optimizer.lr", "[0.1]", r"optimizer\.lr must be a number, got list"),
    ("optimizer.momentum", "1.5", r"optimizer\.momentum must be a finite number >= 0 and < 1"),
    ("optimizer.momentum", "nan", r"optimizer\.momentum " + FINITE),
    ("optimizer.weight_decay", "-1", r"optimizer\.weight_decay must be a finite number >= 0"),
    ("optimizer.weight_decay", "inf", r"optimizer\.weight_decay " + FINITE),
    ("optimizer.beta1", "1.0", r"optimizer\.beta1 must be a finite number >= 0 and < 1"),
    ("optimizer.beta2", "-0.1", r"optimizer\.beta2 " + FINITE),
    ("optimizer.eps", "0", r"optimizer\.eps must be a finite number > 0"),
    ("optimizer.name", "'lamb'", r"optimizer\.name must be one of \['sgd', 'adamw'\], got 'lamb'"),
    ("optimizer.nesterov", "'yes'", r"optimizer\.nesterov must be true or false"),
    ("optimizer.lrr", "0.1", r"unknown key 'optimizer\.lrr'; allowed: \['beta1'"),
    ("optimizer.momentum", "0", r"optimizer\.nesterov needs optimizer\.momentum > 0"),
    ("data.batch_size", "0", r"data\.batch_size must be an integer in \[1, 16777216\], got 0"),
    ("data.batch_size", "1.5", r"data\.batch_size must be an integer, got float 1\.5"),
    ("data.batch_size", "1e12", r"data\.batch_size must be an integer, got float"),
    ("data.batch_size", "1000000000000", r"data\.batch_size must be an integer in \[1, 16777216\]"),
    ("data.batch_size", "-4", r"data\.batch_size must be an integer in \[1, 16777216\], got -4"),
    ("data.batch_size", "100000", r"data\.batch_size = 100000 with workers = 2: "),
    ("data.num_samples", "100", r"data\.num_samples was renamed: use workload\.num_samples"),
    ("data.path", "'x'", r"data\.path was renamed: use workload\.data_path"),
    ("workers", "0", r"workers must be an integer in \[1, 65536\], got 0"),
    ("workers", "1000000", r"workers must be an integer in \[1, 65536\], got 1000000"),
    ("workers", "true", r"workers must be an integer, got bool True"),
    ("workers", "four", r"workers must be an integer, got str 'four'"),
    ("seed", "-1", r"seed must be an integer in \[0, 9223372036854775807\], got -1"),
    ("threads", "0", r"threads must be an integer in \[1, 1024\], got 0"),
    ("threads", "100000", r"threads must be an integer in \[1, 1024\], got 100000"),
    ("device", "'tpu'", r"device must be one of \['auto', 'cpu', 'cuda'\], got 'tpu'"),
    ("engine", "'threads'", r"engine must be one of \['hogwild', 'processes', 'simulated'\], got 'threads'"),
    ("fixed", "'both'", r"fixed must be one of \['worker_batch', 'global_batch'\]"),
    ("name", "''", r"name must be 1 to 200 printable characters"),
    ("name", '"a\\u0007b"', r"name must be 1 to 200 printable characters"),
    ("train.epochs", "0", r"train\.epochs must be a finite number > 0 and <= 1e\+06, got 0"),
    ("train.epochs", "inf", r"train\.epochs " + FINITE),
    ("train.epochs", "nan", r"train\.epochs " + FINITE),
    ("train.epochs", "1e7", r"train\.epochs must be a finite number > 0 and <= 1e\+06"),
    ("train.eval_every", "0", r"train\.eval_every must be an integer >= 1, got 0"),
    ("train.max_steps", "0", r"train\.max_steps must be an integer >= 1, got 0"),
    ("train.max_steps", "-5", r"train\.max_steps must be an integer >= 1"),
    ("train.timeout_seconds", "0", r"train\.timeout_seconds must be a finite number >= 1 and <= 604800 seconds"),
    ("train.timeout_seconds", "inf", r"train\.timeout_seconds " + FINITE),
    ("train.timeout_seconds", "1e9", r"train\.timeout_seconds must be a finite number >= 1 and <= 604800"),
    ("train.checkpoint_every", "-1", r"train\.checkpoint_every must be an integer >= 0, got -1"),
    ("train.checkpoint_every", "2.5", r"train\.checkpoint_every must be an integer, got float 2\.5"),
    ("train.max_restarts", "-1", r"train\.max_restarts must be an integer in \[0, 100\], got -1"),
    ("train.max_restarts", "1000", r"train\.max_restarts must be an integer in \[0, 100\], got 1000"),
    ("train.bogus", "1", r"unknown key 'train\.bogus'; allowed: \['checkpoint_every', 'epochs'"),
    ("train.log_to", "['neptune']", r"train\.log_to must list trackers among \['tensorboard', 'wandb', 'mlflow'\]"),
    ("train.log_to", "'wandb'", r"train\.log_to must be a list, got str 'wandb'"),
    ("schedule.name", "'exponential'", r"schedule\.name must be one of \['constant', 'step'"),
    ("schedule.warmup_steps", "-1", r"schedule\.warmup_steps must be an integer >= 0, got -1"),
    ("schedule.warmup_ratio", "2", r"schedule\.warmup_ratio must be a finite number >= 0 and < 1"),
    ("train.precision", "'fp8'", r"train\.precision must be one of \['fp32', 'bf16', 'fp16'\], got 'fp8'"),
    ("comm.delay", "{world = inf}", r"comm\.delay\.world must be a finite number >= 0 seconds, got inf"),
    ("comm.delay", "{block3 = 1.0}", r"comm\.delay\.block3: scope 'block3': block size 3 does not divide"),
    ("comm.delay", "{ring = 1.0}", r"comm\.delay\.ring: unknown scope 'ring'; allowed: 'world' or 'block"),
    ("schedule.milestones", "[0.8, 0.5]", r"schedule\.milestones must be increasing, got \[0\.8, 0\.5\]"),
    ("schedule.milestones", "[1.5]", r"schedule\.milestones\[0\] must be a finite number > 0 and < 1"),
    ("schedule.milestones", "0.5", r"schedule\.milestones must be a list, got float 0\.5"),
    ("schedule.gamma", "0", r"schedule\.gamma must be a finite number > 0 and <= 1, got 0"),
    ("schedule.gamma", "2", r"schedule\.gamma must be a finite number > 0 and <= 1"),
    ("schedule.warmup_epochs", "-1", r"schedule\.warmup_epochs must be a finite number >= 0"),
    ("schedule.warmup_epochs", "inf", r"schedule\.warmup_epochs " + FINITE),
    ("schedule.base_batch", "0", r"schedule\.base_batch must be an integer >= 1, got 0"),
    ("schedule.linear_scaling", "1", r"schedule\.linear_scaling must be true or false, got int 1"),
    ("algorithm", "{name = 'nope'}", r"algorithm name 'nope' is unknown"),
    ("algorithm", "{name = 'local_sgd', period = 0}", r"algorithm: local_sgd\.period must be an integer >= 1, got 0"),
    ("algorithm", "{name = 'local_sgd', period = 2.5}", r"algorithm: local_sgd\.period must be an integer"),
    (
        "algorithm",
        "{name = 'local_sgd', optimizer_state = 'sometimes'}",
        r"algorithm: local_sgd\.optimizer_state must be one of \['local', 'average', 'reset'\]",
    ),
    (
        "algorithm",
        "{name = 'post_local_sgd', switch_epoch = inf}",
        r"algorithm\.switch_epoch must be a finite number >= 0",
    ),
    (
        "algorithm",
        "{name = 'post_local_sgd', switch_epoch = 1, switch_step = 3}",
        r"give algorithm\.switch_step or algorithm\.switch_epoch, not both",
    ),
    (
        "algorithm",
        "{name = 'local_sgd', switch_epoch = 1}",
        r"algorithm\.switch_epoch: local_sgd has no switch_step field to give in epochs",
    ),
    (
        "algorithm",
        "{name = 'hierarchical_local_sgd', block_size = 4}",
        r"algorithm\.block_size = 4 does not divide workers = 2",
    ),
    ("algorithm", "{name = 'slowmo', outer_lr = inf}", r"slowmo\.outer_lr " + FINITE),
    ("algorithm", "{name = 'slowmo', outer_momentum = 1.5}", r"slowmo\.outer_momentum " + FINITE),
    ("algorithm", "{name = 'sma', alpha = inf}", r"sma\.alpha " + FINITE),
    ("algorithm", "{name = 'gradient_accumulation', steps = 0}", r"gradient_accumulation\.steps must be an integer >= 1"),
    ("algorithm", "{name = 'diloco', outer_lr = nan}", r"diloco\.outer_lr " + FINITE),
    ("algorithm", "{name = 'local_sgd', bogus = 1}", r"algorithm: .*bogus"),
    ("workload.name", "'mnist1d'", r"workload = 'mnist1d' is not a registered workload"),
    ("workload.num_samples", "1000000000000", r"workload\.num_samples must be an integer in \[100, 10000000\]"),
    ("workload.num_samples", "10", r"workload\.num_samples must be an integer in \[100, 10000000\], got 10"),
    ("workload.bogus", "1", r"unknown key 'workload\.bogus'; allowed: \['data_path'"),
    ("workload.seed", "-1", r"workload\.seed must be an integer in \[0, 4294967295\], got -1"),
    ("workload", "{name = 'nosuchmodule:f'}", r"workload = 'nosuchmodule:f': cannot import 'nosuchmodule'"),
    ("workload", "{name = 'os:nope'}", r"workload = 'os:nope': module 'os' has no 'nope'"),
    ("workload", "{num_samples = 100}", r"workload must be a name or import path, or a table with a 'name' key"),
    ("workload", "{name = 'mnli', data = {path = 'nope'}, model = {tokenizer = 'x'}}", r"workload\.data\.path 'nope' does not exist"),
    ("workload", "{name = 'mlm', model = {tokenizer = 'x'}}", r"workload\.model needs exactly one of path \(a checkpoint folder\) or config"),
]


def cifar_tar(folder: Path) -> Path:
    """A gzip'd tar that is not CIFAR-10 (it holds one unrelated file)."""
    (folder / "notes.txt").write_text("hello")
    path = folder / "cifar.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder / "notes.txt", arcname="notes.txt")
    (folder / "notes.txt").unlink()
    return path


def data_cases() -> list[Case]:
    def run_with(workload: str) -> Callable[[Path], list[str]]:
        return lambda d: ["train", str(write(d / "run.toml", RUN.replace('name = "mnist1d_mlp"\nnum_samples = 1000', workload))), "--out", "store"]

    def cifar_path(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
        def args(d: Path) -> list[str]:
            path = make(d)
            return run_with(f'name = "cifar10_resnet20"\ndata_path = "{path}"')(d)

        return args

    def factory(name: str) -> Callable[[Path], list[str]]:
        def args(d: Path) -> list[str]:
            write(d / "factories.py", FACTORIES)
            return run_with(f'name = "factories:{name}"')(d)

        return args

    return [
        Case("cifar-missing", cifar_path(lambda d: d / "nowhere.tar.gz"), r"workload\.data_path '.*nowhere\.tar\.gz' does not exist"),
        Case("cifar-garbage", cifar_path(lambda d: write(d / "c.tar.gz", b"\x00garbage" * 50)), r"workload\.data_path '.*c\.tar\.gz' is not a readable tar archive"),
        Case("cifar-wrong-tar", cifar_path(cifar_tar), r"workload\.data_path '.*cifar\.tar\.gz' has no cifar-10-batches-py/data_batch_1"),
        Case("cifar-empty-folder", cifar_path(lambda d: (d / "empty").mkdir() or d / "empty"), r"workload\.data_path '.*empty' has no cifar-10-batches-py"),
        Case("cifar-no-path", run_with('name = "cifar10_resnet20"'), r"workload\.data_path is required"),
        Case("cifar-num-samples", lambda d: run_with(f'name = "cifar10_resnet20"\ndata_path = "{d}"\nnum_samples = 60000')(d), r"workload\.num_samples must be an integer in \[1, 50000\], got 60000"),
        Case("mnist1d-path-is-file", run_with('name = "mnist1d_mlp"\ndata_path = "run.toml"'), r"workload\.data_path 'run\.toml' is a file; it must be a directory"),
        Case("factory-not-a-workload", factory("not_a_workload"), r"'factories:not_a_workload' returned int, not a workload"),
        Case("factory-raises", factory("broken"), r"workload = 'factories:broken': building it failed: RuntimeError: the bucket is gone"),
        Case("section-as-value", lambda d: ["train", str(write(d / "run.toml", "data = 'big'\n" + RUN.replace("[data]\nbatch_size = 16\n", ""))), "--out", "store"], r"data must be a table, got str 'big'"),
    ]


def file_cases() -> list[Case]:
    return [
        Case("file-missing", lambda d: ["train", "missing.toml"], r"config file 'missing\.toml' does not exist"),
        Case("file-folder", lambda d: (d / "conf").mkdir() or ["train", "conf"], r"config file 'conf' is a folder"),
        train_file("binary.toml", b"\xff\xfe\x00\x01garbage", r"config file '.*binary\.toml' is not UTF-8 text"),
        train_file("latin1.toml", "name = 'caf\xe9'\n".encode("latin-1"), r"config file '.*latin1\.toml' is not UTF-8 text"),
        train_file("bad.toml", "workers = = 2", r"config file '.*bad\.toml' is not valid TOML"),
        train_file("list.json", "[1, 2]", r"config file '.*list\.json' must hold a JSON object, got list"),
        train_file("bad.json", "{workers: 2", r"config file '.*bad\.json' is not valid JSON"),
        train_file("bigseed.json", json.dumps({"seed": 2**70}), r"seed must be an integer in \[0, 9223372036854775807\], got 1180591620717411303424"),
        train_file("top.toml", "bogus = 1\n" + RUN, r"unknown key 'bogus'; allowed: \['algorithm'"),
        train_file("scalar.toml", "optimizer = 5\n", r"optimizer must be a table, got int 5"),
        train_file("binary.json", b"\x89PNG\r\n\x1a\n", r"config file '.*binary\.json' is not valid JSON"),
    ]


def override_cases() -> list[Case]:
    def with_set(item: str) -> Callable[[Path], list[str]]:
        return lambda d: ["train", str(write(d / "run.toml", RUN)), "--set", item]

    return [
        Case("set-no-equals", with_set("workers"), r"override 'workers' must look like section\.key=value"),
        Case("set-empty-key", with_set("=4"), r"override '=4' has an empty key"),
        Case("set-empty-part", with_set("optimizer..lr=1"), r"override 'optimizer\.\.lr=1' has an empty key"),
        Case("set-into-scalar", with_set("workers.x=1"), r"override 'workers\.x=1': 'workers' is not a table"),
    ]


def study_cases() -> list[Case]:
    return [
        study_text(STUDY + "\n[extra]\na = 1\n", r"unknown top-level key\(s\) \['extra'\]", "top-level"),
        study_text(STUDY.replace('name = "bad"', 'name = "../escape"'), r"study\.name must be 1 to 100 letters, digits", "name-escape"),
        study_text(STUDY.replace('name = "bad"', 'name = ""'), r"study\.name must be 1 to 100 letters", "name-empty"),
        study_text(STUDY.replace('name = "bad"', 'name = "my study"'), r"study\.name must be 1 to 100 letters", "name-space"),
        study_text(STUDY.replace('name = "bad"', "name = 5"), r"study\.name must be a string, got int 5", "name-int"),
        study_text(STUDY.replace("seed = [0, 1]", "seed = []"), r"grid\[0\]\.seed is an empty list", "empty-axis"),
        study_text("grid = 5\n" + STUDY.replace("[[grid]]\nseed = [0, 1]", ""), r"grid must be an array of tables", "grid-scalar"),
        study_text(STUDY + "global_batch = 0\n", r"grid\[0\]\.global_batch must be an integer >= 1, got 0", "global-batch-0"),
        study_text(STUDY + "global_batch = 33\n", r"grid\[0\]\.global_batch = 33 is not divisible by workers = 2", "global-batch-odd"),
        study_text(STUDY.replace("[base]\nworkers = 2", "base = 5\n[base2]\nworkers = 2"), r"unknown top-level key|base must be a table", "base-scalar"),
        study_text(STUDY + "algorithm = ['local_sgd']\n", r"grid\[0\]\.algorithm values must be tables", "algorithm-string"),
        study_text(STUDY.replace("seed = [0, 1]", "seed = [0, 1]\nworkers = [2]"), r"--set workers changes \[base\], but grid\[0\] sets 'workers'", "set-shadowed", "--set", "workers=4"),
        study_text(STUDY.replace('name = "bad"', 'name = "bad"\nowner = "me"'), r"unknown key 'study\.owner'", "study-key"),
        study_text(STUDY.replace('name = "bad"', 'name = "bad"\nout = ""'), r"study\.out must be a folder path", "study-out-empty"),
        study_text(STUDY.replace("seed = [0, 1]", "seed = [0, 1]\noptimizer.lr = [inf]"), r"grid\[0\]: optimizer\.lr must be a finite number", "grid-inf"),
        study_text(STUDY.replace("seed = [0, 1]", "seed = [-1]"), r"grid\[0\]: seed must be an integer in \[0,", "grid-seed"),
    ]


def foreign_checkpoint(folder: Path, world_size: int) -> None:
    """A whole checkpoint of step 2 in ``folder`` that another run ('other') wrote."""
    (folder / "checkpoints").mkdir()
    write(folder / "checkpoints" / "latest.json", json.dumps({"step": 2, "world_size": world_size}))
    for rank in range(world_size):
        torch.save({"format": 1, "run_id": "other", "rank": rank, "step": 2}, folder / "checkpoints" / f"step2-rank{rank}.pt")


def option_cases() -> list[Case]:
    def study_with(*extra: str) -> Callable[[Path], list[str]]:
        return lambda d: ["study", str(write(d / "s.toml", STUDY)), "--out", "store", *extra]

    def run_folder(d: Path) -> Path:
        """A store holding one run left unfinished, with a checkpoint of another run (a
        damaged checkpoint is no bad input: resuming falls back, see test_checkpoints.py)."""
        from localsgd.run.loading import load_run_config

        run = load_run_config(write(d / "run.toml", RUN))
        store = Store(d / "store")
        folder = store.begin(run.run_id(), run.name, run.to_dict())
        foreign_checkpoint(folder, world_size=2)
        return folder

    return [
        Case("parallel-0", study_with("--parallel", "0"), r"--parallel must be an integer >= 1, got 0"),
        Case("parallel-negative", study_with("--parallel", "-2"), r"--parallel must be an integer >= 1, got -2"),
        Case("executor", study_with("--executor", "cloud"), r"--executor must be one of \['local', 'slurm'\], got 'cloud'"),
        Case("slurm-without-executor", study_with("--slurm", "nodes=2"), r"--slurm options need --executor slurm"),
        Case("slurm-malformed", study_with("--executor", "slurm", "--slurm", "nodes"), r"--slurm takes KEY=VALUE, got 'nodes'"),
        Case(
            "slurm-restarts",
            lambda d: ["study", str(write(d / "s.toml", STUDY.replace("max_steps = 4", "max_steps = 4\nmax_restarts = 1"))), "--out", "store", "--executor", "slurm", "--slurm", "cluster=local"],
            r"train\.max_restarts = 1 needs --executor local",
        ),
        Case("train-both", lambda d: ["train", str(write(d / "run.toml", RUN)), "--resume", "x"], r"give a run config or --resume RUN_DIR, not both"),
        Case("train-neither", lambda d: ["train"], r"a run config is required \(or --resume RUN_DIR\)"),
        Case("resume-not-a-run", lambda d: ["train", "--resume", str(d)], r"--resume '.*' is not a run folder \(no config\.json inside\)"),
        Case(
            "resume-changed",
            lambda d: ["train", "--resume", str(run_folder(d)), "--set", "seed=3"],
            r"--resume '.*\.partial': the run's config \(with --set\) has id \w+, not \w+",
        ),
        Case(
            "resume-foreign-checkpoint",
            lambda d: ["train", "--resume", str(run_folder(d))],
            r"checkpoint .*step2-rank0\.pt belongs to run 'other' .*; delete .*checkpoints to start the run again",
        ),
        Case(
            "resume-outside-store",
            lambda d: (write(d / "config.json", "{}"), ["train", "--resume", str(d)])[1],
            r"--resume '.*' is not inside a store",
        ),
        Case(
            "report-cluster",
            lambda d: ["report", str(finished_store(d)), "--cluster", "moon"],
            r"unknown cluster 'moon': not a preset \(one of 10gbe, .*\) nor a cluster TOML file",
        ),
        Case(
            "report-target",
            lambda d: ["report", str(finished_store(d)), "--cluster", "10gbe", "--target", "accuracy=high"],
            r"--target must be METRIC=VALUE or a number for the primary metric, got 'accuracy=high'",
        ),
        Case(
            "report-select-on",
            lambda d: ["report", str(finished_store(d)), "--select-on", "train"],
            r"--select-on must be one of validation, test, got 'train'",
        ),
    ]


def finished_store(d: Path, status: str = "completed") -> Path:
    """A store holding one finished run (no training: the record is written by hand)."""
    store = Store(d / "done")
    folder = store.begin("abc", "x", {"workers": 1, "workload": {"name": "mnist1d_mlp"}})
    write(folder / "metrics.jsonl", "")
    write_json_atomic(folder / "status.json", to_json(Status(RECORD_VERSION, status)))
    store.finish("abc")
    return d / "done"


def path_cases() -> list[Case]:
    def study_out(out: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
        return lambda d: ["study", str(write(d / "s.toml", STUDY)), "--out", str(out(d))]

    def train_out(out: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
        return lambda d: ["train", str(write(d / "run.toml", RUN)), "--out", str(out(d))]

    def project(d: Path) -> Path:
        (d / "project").mkdir()
        write(d / "project" / "notes.txt", "mine")
        return d / "project"

    return [
        Case("train-out-file", train_out(lambda d: write(d / "afile", "x")), r"--out '.*afile' is a file; give a folder"),
        Case("train-out-under-file", train_out(lambda d: write(d / "afile", "x") / "store"), r"--out '.*afile/store' cannot be created: '.*afile' is a file"),
        Case("train-out-project", train_out(project), r"--out '.*project' is a folder that is not a localsgd store \(it holds 'notes\.txt'\)"),
        Case("study-out-file", study_out(lambda d: write(d / "afile", "x")), r"--out '.*afile' is a file; give a folder"),
        Case("study-out-under-file", study_out(lambda d: write(d / "afile", "x") / "s"), r"cannot be created: '.*afile' is a file"),
        Case("study-out-project", study_out(project), r"is a folder that is not a localsgd store \(it holds 'notes\.txt'\)"),
        Case("report-missing", lambda d: ["report", "nowhere"], r"'nowhere' is not a localsgd store: no index\.sqlite inside"),
        Case("report-not-a-store", lambda d: ["report", str(project(d))], r"is not a localsgd store"),
        Case("report-out-file", lambda d: ["report", str(finished_store(d)), "--out", str(write(d / "afile", "x"))], r"--out '.*afile' is a file"),
    ]


def corrupt_index(d: Path) -> Path:
    (d / "store").mkdir()
    write(d / "store" / "index.sqlite", b"this is not sqlite at all" * 100)
    return d / "store"


def store_cases() -> list[Case]:
    def owned(d: Path) -> Path:
        store = Store(d / "store")
        store.set_owner("alpha")
        return d / "store"

    def corrupt_status(d: Path) -> list[str]:
        from localsgd.studies.loading import load_study

        study = load_study(write(d / "s.toml", STUDY))
        store = Store(d / "store")
        store.set_owner("bad")
        run = study.runs[0]
        folder = store.begin(run.run_id(), run.name, run.to_dict())
        write_json_atomic(folder / "status.json", to_json(Status(RECORD_VERSION, "completed")))
        store.finish(run.run_id())
        write(store.run_dir(run.run_id()) / "status.json", '{"version": 2, "stat')
        return ["study", str(d / "s.toml"), "--out", "store"]

    def corrupt_checkpoint(d: Path) -> list[str]:
        from localsgd.studies.loading import load_study

        study = load_study(write(d / "s.toml", STUDY))
        store = Store(d / "store")
        store.set_owner("bad")
        run = study.runs[1]
        folder = store.begin(run.run_id(), run.name, run.to_dict())
        foreign_checkpoint(folder, world_size=1)
        return ["study", str(d / "s.toml"), "--out", "store"]

    def other_version(d: Path) -> list[str]:
        done = finished_store(d)
        write(done / "runs" / "abc" / "status.json", json.dumps({"version": 1, "status": "completed"}))
        return ["report", str(done)]

    def locked(d: Path) -> list[str]:
        write(d / "s.toml", STUDY)
        Store(d / "store").set_owner("bad")
        HELD.append(Store.lock_for_study(d / "store").acquire())
        return ["study", str(d / "s.toml"), "--out", "store"]

    return [
        Case("index-train", lambda d: ["train", str(write(d / "run.toml", RUN)), "--out", str(corrupt_index(d))], r"index\.sqlite is not a readable SQLite index .*; move it away"),
        Case("index-study", lambda d: ["study", str(write(d / "s.toml", STUDY)), "--out", str(corrupt_index(d))], r"index\.sqlite is not a readable SQLite index"),
        Case("index-report", lambda d: ["report", str(corrupt_index(d))], r"index\.sqlite is not a readable SQLite index"),
        Case("status-study", corrupt_status, r"status\.json is unreadable .*; delete the run folder to redo the run"),
        Case("checkpoint-study", corrupt_checkpoint, r"checkpoint .*step2-rank0\.pt belongs to run 'other' .*; delete .*checkpoints to start the run again from step 0"),
        Case("version-report", other_version, r"status\.json: record version 1 is not supported"),
        Case("owner-train", lambda d: ["train", str(write(d / "run.toml", RUN)), "--out", str(owned(d))], r"store .* belongs to study 'alpha', which does not plan this run"),
        Case("owner-study", lambda d: ["study", str(write(d / "s.toml", STUDY)), "--out", str(owned(d))], r"store .* belongs to study 'alpha', not 'bad'; give another --out, or pass --adopt-store"),
        Case("locked-study", locked, rf"store store is in use by PID {os.getpid()} "),
    ]


HELD: list = []

CUDA = [
    Case("cuda-train", lambda d: ["train", str(write(d / "run.toml", RUN.replace('device = "cpu"', 'device = "cuda"'))), "--out", "store"], r"device = 'cuda' with workers = 2 needs 2 CUDA device\(s\)"),
    Case("cuda-study", lambda d: ["study", str(write(d / "s.toml", STUDY.replace('device = "cpu"', 'device = "cuda"'))), "--out", "store"], r"device = 'cuda' with workers = 2 needs 2 CUDA device\(s\)"),
]

CASES = [
    *(train_set(key, value, error) for key, value, error in VALUES),
    *data_cases(),
    *file_cases(),
    *override_cases(),
    *study_cases(),
    *option_cases(),
    *path_cases(),
    *store_cases(),
    *CUDA,
]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time, and every folder.
    Left out: Python's byte-code caches, and the lock files a study or run creates in a
    store that exists already (it takes its locks before it reads the store)."""
    found = {}
    for path in folder.rglob("*"):
        if "__pycache__" in path.parts or ".lock.d" in path.parts or path.name == ".lock":
            continue
        stat = path.stat()
        found[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns) if path.is_file() else (-1, 0)
    return found


@pytest.fixture(scope="module")
def cache(data_cache: str) -> Path:
    return Path(data_cache)


def test_the_battery_is_large_and_its_inputs_distinct():
    assert len(CASES) >= 100
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, cache):
    if case.id.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.syspath_prepend(str(tmp_path))
    args = case.args(tmp_path)
    before = snapshot(tmp_path)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        for lock in HELD:
            lock.release()
        HELD.clear()
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    import re

    assert re.search(case.error, lines[0]), lines[0]
    assert snapshot(tmp_path) == before  # nothing created, nothing changed


REAL = ["set-optimizer.lr=inf", "file-binary.toml", "study-name-escape", "train-out-file", "index-report"]


@pytest.mark.parametrize("case_id", REAL)
def test_the_real_command_line_says_the_same(case_id, tmp_path, cache):
    """A handful through the installed command: the same line, exit code 2, no traceback."""
    case = next(c for c in CASES if c.id == case_id)
    args = case.args(tmp_path)
    before = snapshot(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["XDG_CACHE_HOME"] = str(cache)
    done = subprocess.run(
        [sys.executable, "-m", "localsgd.cli", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    import re

    assert len(lines) == 1 and re.search(case.error, lines[0]), done.stderr
    assert snapshot(tmp_path) == before


def test_report_flags_runs_whose_folders_are_missing_or_unreadable(tmp_path):
    """Not a bad input but a damaged store: the report is written, and says which runs it
    could not read instead of counting them."""
    import shutil

    store = Store(tmp_path / "store")
    for run_id, seed in (("good", 0), ("gone", 1), ("bad", 2), ("rows", 3)):
        config = {"workers": 1, "seed": seed, "workload": {"name": "mnist1d_mlp"}, "algorithm": {"name": "minibatch_sgd"}}
        folder = store.begin(run_id, "x", config)
        write(folder / "metrics.jsonl", '{"step": 1, "epoch": 0.1, "samples": 64, "wall_seconds": 0.1, "lr": 0.1, "train_loss": 1.0, "metrics": {"accuracy": 0.5}}\n')
        from localsgd.workloads.base import ACCURACY

        status = Status(RECORD_VERSION, "completed", steps=1, metrics=(ACCURACY,), primary="accuracy")
        write_json_atomic(folder / "status.json", to_json(status))
        store.finish(run_id)
    shutil.rmtree(store.run_dir("gone"))
    write(store.run_dir("bad") / "status.json", "{")
    write(store.run_dir("rows") / "metrics.jsonl", "not json\n" + (store.run_dir("good") / "metrics.jsonl").read_text())
    index = (tmp_path / "store" / "index.sqlite").read_bytes()
    # A report reads the store while a study holds it, and writes nothing into its index.
    with Store.lock_for_study(tmp_path / "store"):
        result = CliRunner().invoke(app, ["report", str(tmp_path / "store")])
    assert result.exit_code == 3, result.output  # written, but incomplete
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert sorted(line.split(": ")[1] for line in warned) == ["run bad", "run gone", "run rows"]
    assert (tmp_path / "store" / "index.sqlite").read_bytes() == index
    text = (tmp_path / "store" / "report" / "report.md").read_text()
    assert text.count("unreadable") >= 3
    assert "runs/gone is missing" in text and "status.json is unreadable" in text
    assert "metrics.jsonl, line 1: not JSON" in text

