"""Wall-clock estimates of a study's runs before they run: ``[study.estimate]`` names a
cluster and what a run cannot know without its data and its hardware (training examples,
parameters, compute per example), and the cost model turns each run's planned steps and
synchronisations into hours on that cluster (``localsgd study FILE --dry-run``).

The estimate of a run of K workers at batch B per worker, T steps::

    compute = T · B · seconds_per_sample                (the workers in parallel)
    comm    = Σ_scope syncs(scope) · allreduce(4·P bytes, scope, K, cluster)
            (with a codec: Σ_scope syncs(scope) · allgather(payload(P), scope, K, cluster))

with T from the epochs and ``train_samples`` (less the workload's validation split), the
synchronisations from the algorithm's schedule
(:meth:`~localsgd.algorithms.AlgorithmConfig.planned_syncs`), fp32 parameters, and the
collective costs of :mod:`localsgd.costmodel`. Compute and communication do not overlap,
except in a streamed run (fragments F, overlap τ): a world sync carries 4·P/F bytes and a
step waits max(0, its transfer − τ · B · seconds_per_sample) for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from localsgd.algorithms.streaming import streaming_options
from localsgd.comm.codecs import payload_bytes
from localsgd.costmodel import Cluster, collective_seconds, gather_scope_cost, load_cluster, scope_size
from localsgd.run.config import RunConfig
from localsgd.util.checks import ConfigError
from localsgd.workloads import VALIDATION_FRACTION

FP32_BYTES = 4


@dataclass(frozen=True)
class EstimateSection:
    """``[study.estimate]``: the cluster and the sizes an estimate before the runs needs."""

    cluster: str
    """A cluster preset (``localsgd.costmodel.presets()``) or a cluster TOML file."""
    train_samples: int
    """Examples in the training data (before the validation split is held out)."""
    seconds_per_sample: dict[str, float] = field(default_factory=dict)
    """Per workload name: forward and backward of one example on one device, in seconds."""
    parameters: dict[str, int] = field(default_factory=dict)
    """Per workload name: the model's parameters (what one synchronisation averages)."""

    def __post_init__(self) -> None:
        if isinstance(self.train_samples, bool) or not isinstance(self.train_samples, int) or self.train_samples < 1:
            raise ConfigError(f"study.estimate.train_samples must be an integer >= 1, got {self.train_samples!r}")
        for name, value in self.seconds_per_sample.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"study.estimate.seconds_per_sample.{name} must be a number > 0, got {value!r}")
        for name, count in self.parameters.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"study.estimate.parameters.{name} must be an integer >= 1, got {count!r}")

    def load_cluster(self) -> Cluster:
        try:
            return load_cluster(self.cluster)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"study.estimate.cluster: {exc}") from None


@dataclass(frozen=True)
class RunEstimate:
    steps: int
    compute_seconds: float
    comm_seconds: float | None
    """None where the algorithm's schedule is not planned in advance (asynchronous)."""

    def line(self) -> str:
        compute = self.compute_seconds / 3600
        if self.comm_seconds is None:
            return f"est. {compute:.1f} h compute + communication not planned (asynchronous)"
        total = compute + self.comm_seconds / 3600
        return f"est. {total:.1f} h (compute {compute:.1f} h, communication {self.comm_seconds / 3600:.1f} h)"


def estimate_run(run: RunConfig, section: EstimateSection, cluster: Cluster) -> RunEstimate:
    """One run's estimate on ``cluster``; ``ConfigError`` naming the missing size."""
    name = run.workload_name
    for table, values in (("seconds_per_sample", section.seconds_per_sample), ("parameters", section.parameters)):
        if name not in values:
            raise ConfigError(f"study.estimate.{table} has no entry for workload {name!r}; it has {sorted(values)}")
    fraction = float(run.workload.get("validation_fraction", VALIDATION_FRACTION))
    trained = section.train_samples - round(section.train_samples * fraction)
    steps_per_epoch = trained // (run.workers * run.data.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"study.estimate.train_samples = {section.train_samples}: fewer than one step of "
            f"{run.workers} x {run.data.batch_size} examples"
        )
    steps = math.ceil(run.train.epochs * steps_per_epoch)
    if run.train.max_steps is not None:
        steps = min(steps, run.train.max_steps)
    per_step = run.data.batch_size * section.seconds_per_sample[name]
    compute = steps * per_step
    algorithm = run.algorithm_config(steps_per_epoch)
    syncs = algorithm.planned_syncs(steps)
    if syncs is None:
        return RunEstimate(steps, compute, None)
    compression = algorithm.capabilities.compression
    if compression.enabled:
        count = section.parameters[name]
        payload = payload_bytes(compression, count)
        own = int(compression.error_feedback)

        def exchange(scope: str) -> float:
            # The codec's own work where the cluster prices it (nothing was measured yet):
            # n values encoded, and each member's payload (and one's own, with error
            # feedback) decoded.
            members = scope_size(scope, run.workers)
            counters = {"encoded": count, "decoded": count * (members + own)}
            # (Without a price the cost model charges measured seconds: none here, so 0.)
            work = cluster.codec_seconds(compression.codec, counters)
            return gather_scope_cost(scope, run.workers, cluster).seconds(payload) + work

        comm = sum(n * exchange(scope) for scope, n in syncs.items() if n)
        return RunEstimate(steps, compute, comm)
    nbytes = FP32_BYTES * section.parameters[name]
    streaming = streaming_options(algorithm)

    def wait(scope: str) -> float:
        if scope != "world":
            return collective_seconds(nbytes, scope, run.workers, cluster)
        # A streamed world sync carries one fragment (1/F of the model, balanced by elements)
        # and waits only for what τ steps of compute do not hide.
        one = collective_seconds(nbytes / streaming.fragments, scope, run.workers, cluster)
        return max(0.0, one - streaming.overlap * per_step)

    comm = sum(n * wait(scope) for scope, n in syncs.items() if n)
    return RunEstimate(steps, compute, comm)


def estimate_lines(runs: list[RunConfig], section: EstimateSection) -> list[str]:
    """Per run, its estimate on the section's cluster (for ``--dry-run``)."""
    cluster = section.load_cluster()
    return [estimate_run(run, section, cluster).line() + f" on {cluster.name}" for run in runs]
