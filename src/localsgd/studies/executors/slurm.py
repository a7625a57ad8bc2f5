"""Runs as Slurm jobs, through submitit: one job per run, one task per worker process.

The study's process (on a login node) writes each run's folder into the store, which must
be on a filesystem the compute nodes share, and submits a job of P tasks, P =
``engine.processes(K)`` (K for the process engine, 1 for the simulated one), spread over
``nodes`` nodes. Each task joins the run's process group through the job's first node --
rank 0 binds a free port there and writes ``host:port`` into the run folder, where the
other tasks read it -- and runs the worker entry point (``localsgd.worker CONFIG --run-dir
DIR``) as torchrun's workers do: rank 0 writes the record, a failing rank its own
exception. The study's process waits for the job and records the run from its folder, so
the store is the same as a local study's.

Options are submitit's executor parameters (``--slurm KEY=VALUE``): ``slurm_partition``,
``timeout_min`` (default 60), ``gpus_per_node``, ``mem_gb``, ``slurm_account``,
``slurm_additional_parameters``, ...; plus ``nodes`` (default 1; it must divide P) and
``cluster``: ``slurm``, or ``local`` for submitit's LocalExecutor, which runs each job's
tasks as local processes through the same code (to try a study before a cluster has it).
Set per run, not as options: ``tasks_per_node`` (P / nodes) and ``cpus_per_task`` (the
run's ``threads``).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from localsgd.engines.base import Cancelled, Engine, Job, WorkerFailure
from localsgd.engines.launching.launch import loopback_interface, root_error
from localsgd.records.record import ErrorInfo, read_json
from localsgd.util.checks import ConfigError
from localsgd.util.files import write_json_atomic

CLUSTERS = ("slurm", "local")
DEFAULT_TIMEOUT_MIN = 60
SET_PER_RUN = ("tasks_per_node", "cpus_per_task", "name")
RENDEZVOUS_WAIT = 600.0
"""Seconds a task waits for rank 0 to publish the rendezvous address (tasks of one job may
start minutes apart on a busy cluster)."""


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "--executor slurm needs submitit: pip install 'localsgd[slurm]' (or pip install submitit)"
        ) from None
    return submitit


class SlurmSession:
    """Submits each run as a Slurm job (module docstring) and waits for it; several threads
    may execute runs at once (one job each). ``folder`` holds submitit's job files and the
    tasks' logs."""

    def __init__(self, engine: Engine, folder: Path, options: Mapping[str, Any] | None = None) -> None:
        self.engine = engine
        self.folder = Path(folder)
        parameters = dict(options or {})
        self.cluster = str(parameters.pop("cluster", "slurm"))
        self.nodes = int(parameters.pop("nodes", 1))
        parameters.setdefault("timeout_min", DEFAULT_TIMEOUT_MIN)
        self.parameters = parameters
        self._jobs: set[Any] = set()
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def check_options(options: Mapping[str, Any], runs: Sequence[Any] = ()) -> None:
        """``ConfigError`` naming the option for what submitit or Slurm would refuse, before
        any run is recorded; ``runs`` (run configs) must fit on ``nodes`` nodes."""
        submitit = _submitit()
        parameters = dict(options)
        cluster = parameters.pop("cluster", "slurm")
        if cluster not in CLUSTERS:
            raise ConfigError(f"--slurm cluster must be one of {list(CLUSTERS)}, got {cluster!r}")
        nodes = parameters.pop("nodes", 1)
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ConfigError(f"--slurm nodes must be an integer >= 1, got {nodes!r}")
        fixed = sorted(set(parameters) & set(SET_PER_RUN))
        if fixed:
            raise ConfigError(
                f"--slurm {fixed[0]} is set per run (tasks_per_node from workers and nodes, "
                "cpus_per_task from threads, name from the run id); leave it out"
            )
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError(
                "--executor slurm: no sbatch on this machine; run the study on a Slurm login node "
                "(or pass --slurm cluster=local to try the same path with local processes)"
            )
        for run in runs:

            if run.train.max_restarts:
                raise ConfigError(
                    f"train.max_restarts = {run.train.max_restarts} needs --executor local (torch's "
                    "elastic launcher restarts the workers there); under Slurm set it to 0 (a run "
                    "left unfinished resumes from its last checkpoint when the study runs again)"
                )
            processes = run.processes()
            if processes % nodes:
                raise ConfigError(
                    f"--slurm nodes = {nodes} does not divide the {processes} worker process(es) "
                    f"of a run with workers = {run.workers}"
                )
        with tempfile.TemporaryDirectory() as tmp:
            try:
                executor = submitit.AutoExecutor(folder=tmp, cluster=cluster)
                executor.update_parameters(
                    nodes=nodes,
                    tasks_per_node=1,
                    cpus_per_task=1,
                    **{"timeout_min": DEFAULT_TIMEOUT_MIN, **parameters},
                )
            except (NameError, AssertionError, ValueError, TypeError) as exc:
                raise ConfigError(f"--slurm: {exc}") from None

    def execute(self, job: Job) -> None:
        submitit = _submitit()
        processes = self.engine.processes(job.workers, job.engine_options)
        parameters = dict(self.parameters)
        if job.timeout is not None:
            parameters["timeout_min"] = max(1, math.ceil(job.timeout / 60))
        executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.cluster)
        executor.update_parameters(
            name=f"localsgd-{job.run_dir.name.removesuffix('.partial')}",
            nodes=self.nodes,
            tasks_per_node=processes // self.nodes,
            cpus_per_task=job.threads,
            **parameters,
        )
        env = {"OMP_NUM_THREADS": str(job.threads), **job.env}
        path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
        env["PYTHONPATH"] = path  # an import-path workload in the current directory
        with self._lock:
            if self._closed:
                raise Cancelled("the session is closed")
            submitted = executor.submit(run_task, str(job.run_dir.resolve()), env)
            self._jobs.add(submitted)
        try:
            submitted.results()
        except Exception as exc:  # submitit's FailedJobError / UncompletedJobError
            if self._closed:
                raise Cancelled("the session was closed during the run") from None
            text = str(exc).strip()
            error = root_error(job.run_dir) or ErrorInfo(
                type(exc).__name__,
                f"Slurm job {submitted.job_id} failed: {(text.splitlines() or [''])[0]}",
                text,
            )
            raise WorkerFailure(error) from None
        except BaseException:
            with contextlib.suppress(Exception):
                submitted.cancel(check=False)
            raise
        finally:
            with self._lock:
                self._jobs.discard(submitted)

    def close(self) -> None:
        """Cancel the jobs still running (their runs are :class:`Cancelled`)."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for submitted in jobs:
            with contextlib.suppress(Exception):
                submitted.cancel(check=False)


def run_task(run_dir: str, env: Mapping[str, str]) -> int:
    """One task of a run's job: join the run's process group (when it has more than one
    process) and run the worker entry point on the run folder. Runs on the compute node."""
    import submitit

    os.environ.update(env)
    task = submitit.JobEnvironment()
    folder = Path(run_dir)
    if task.num_nodes == 1:
        # One node: gloo's sockets on loopback, as a local launch's (rank 0's store binds
        # to the loopback address it publishes, in init_distributed).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    if task.num_tasks > 1:
        host, port = _rendezvous(folder, task)
        os.environ.update(
            MASTER_ADDR=host,
            MASTER_PORT=str(port),
            RANK=str(task.global_rank),
            WORLD_SIZE=str(task.num_tasks),
            LOCAL_RANK=str(task.local_rank),
            LOCAL_WORLD_SIZE=str(task.num_tasks // task.num_nodes),
            GROUP_RANK=str(task.node),
        )
    from localsgd.run import worker  # here: the submitting process never needs it

    code = int(worker.main([str(folder / "config.json"), "--run-dir", str(folder)]))
    if code != 0:
        raise RuntimeError(f"the worker of rank {task.global_rank} exited with code {code}")
    return code


def _rendezvous(folder: Path, task: Any) -> tuple[str, int]:
    """Rank 0 publishes its node and a free port in the run folder; the others wait for it.
    One node: loopback."""
    path = folder / f"rendezvous-{task.job_id}.json"
    if task.global_rank == 0:
        host = "127.0.0.1" if task.num_nodes == 1 else str(task.hostnames[0])
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("" if task.num_nodes > 1 else "127.0.0.1", 0))
            port = int(s.getsockname()[1])
        write_json_atomic(path, {"host": host, "port": port})
        return host, port
    deadline = time.monotonic() + RENDEZVOUS_WAIT
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not publish {path} within {RENDEZVOUS_WAIT:.0f} s")
        time.sleep(0.1)
    data = read_json(path)
    return str(data["host"]), int(data["port"])
