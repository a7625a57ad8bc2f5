"""The run config: what one training run is, section by section (TOML tables)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from localsgd import trackers
from localsgd.records.record import SPLITS
from localsgd.util.checks import (
    ConfigError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    from_dict,
    to_dict,
)
from localsgd.util.lifetime import DEFAULT_TIMEOUT_SECONDS

if TYPE_CHECKING:
    from localsgd.algorithms import AlgorithmCapabilities
    from localsgd.engines import Capability, Engine

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine", "half_cosine", "linear")
WARMUPS = ("gradual", "constant")
MOMENTUM_FORMS = ("lr_outside", "lr_inside")
PRECISIONS = ("fp32", "bf16", "fp16")


MAX_BATCH = 2**24
"""The largest per-worker batch a config may ask for."""
MAX_WORKERS = 65536
MAX_THREADS = 1024
"""The most intra-op threads per worker a config may ask for."""
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600.0
"""The longest ``train.timeout_seconds``: a week."""
MAX_RESTARTS = 100
"""The most ``train.max_restarts``."""


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: the batch. What data and how much belongs to the workload's own section
    (``[workload]``)."""

    RENAMED: ClassVar[dict[str, str]] = {"num_samples": "workload.num_samples", "path": "workload.data_path"}

    batch_size: int = 64
    """B: the batch each worker takes per step (the per-worker batch)."""

    def __post_init__(self) -> None:
        check_int("data.batch_size", self.batch_size, 1, MAX_BATCH)


@dataclass(frozen=True)
class OptimizerConfig:
    """``[optimizer]``: the inner (per-worker) optimizer."""

    name: str = "sgd"
    """``sgd`` or ``adamw``."""
    lr: float = 0.1
    """Base learning rate (at ``schedule.base_batch`` when the linear scaling rule is on)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """SGD with Nesterov momentum."""
    momentum_form: str = "lr_outside"
    """Where SGD's rate η sits (Goyal et al. 2017, §2.1): ``lr_outside``, u ← μu + g,
    θ ← θ − ηu (``torch.optim.SGD``); ``lr_inside``, v ← μv + ηg, θ ← θ − v
    (:class:`~localsgd.run.optimizers.VelocitySGD`; Nesterov: θ ← θ − (μv + ηg)). The two
    are one update while η is fixed; they part when η changes, unless
    ``momentum_correction``."""
    momentum_correction: bool = True
    """``lr_inside``: scale v by η_{t+1}/η_t when the rate changes, which makes it follow
    ``lr_outside`` exactly. ``lr_outside`` needs none (the correction is implicit in its
    form), so the key changes nothing there."""
    weight_decay: float = 5e-4
    """L2 weight decay (decoupled for AdamW)."""
    decay_norm_and_bias: bool = True
    """Apply weight decay to normalization weights and biases too; false exempts them."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.999
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""

    def __post_init__(self) -> None:
        check_choice("optimizer.name", self.name, OPTIMIZERS)
        check_float("optimizer.lr", self.lr, 0.0, None, low_open=True)
        check_float("optimizer.momentum", self.momentum, 0.0, 1.0)
        check_bool("optimizer.nesterov", self.nesterov)
        check_choice("optimizer.momentum_form", self.momentum_form, MOMENTUM_FORMS)
        check_bool("optimizer.momentum_correction", self.momentum_correction)
        check_float("optimizer.weight_decay", self.weight_decay, 0.0)
        check_bool("optimizer.decay_norm_and_bias", self.decay_norm_and_bias)
        check_float("optimizer.beta1", self.beta1, 0.0, 1.0)
        check_float("optimizer.beta2", self.beta2, 0.0, 1.0)
        check_float("optimizer.eps", self.eps, 0.0, None, low_open=True)
        if self.nesterov and self.name == "sgd" and self.momentum == 0:
            raise ConfigError("optimizer.nesterov needs optimizer.momentum > 0")
        if self.momentum_form != "lr_outside" and self.name != "sgd":
            raise ConfigError(
                f"optimizer.momentum_form = {self.momentum_form!r} is for optimizer.name = 'sgd'; "
                f"{self.name} allows only 'lr_outside'"
            )

    @property
    def batchable(self) -> bool:
        """Whether trials of this optimizer can be stepped together by the simulated
        engine's per-trial SGD, which is the ``lr_outside`` form."""
        return self.name == "sgd" and self.momentum_form == "lr_outside"


@dataclass(frozen=True)
class ScheduleConfig:
    """``[schedule]``: the learning rate over training."""

    name: str = "constant"
    """``constant``; ``step`` (× ``gamma`` at each milestone); ``cosine`` (to 0 at the end);
    ``half_cosine`` (constant for the first half, cosine to 0 over the second); ``linear``
    (linear decay to 0 at the end, from the end of the warmup: the fine-tuning recipe of
    BERT and of transformers' ``get_linear_schedule_with_warmup``)."""
    milestones: tuple[float, ...] = (0.5, 0.75)
    """``step``: fractions of training at which the rate is multiplied by ``gamma``."""
    gamma: float = 0.1
    """``step``: the factor applied at each milestone."""
    warmup_epochs: float = 0.0
    """Warmup over W epochs from ``warmup_start`` (by default the base rate) up to the peak
    (Goyal et al. 2017), in the way ``warmup`` names. 0 disables it."""
    warmup: str = "gradual"
    """How ``warmup_epochs`` warms up: ``gradual`` (the rate rises linearly from the start
    to the peak) or ``constant`` (the start rate for W epochs, then the peak at once:
    Goyal et al.'s constant warmup, Table 1)."""
    warmup_steps: int = 0
    """Warmup from ``warmup_start`` (by default 0) to the peak rate, linear over this many
    steps (the transformers recipe). Not with ``warmup_epochs`` or ``warmup_ratio``."""
    warmup_ratio: float = 0.0
    """The same warmup, over this fraction of the training steps."""
    warmup_start: str | float | None = None
    """Where the warmup starts: ``"base"``, the base rate ``optimizer.lr`` (Goyal et al.'s
    η, rising to the scaled kη; when the peak is not above it, k ≤ 1, the run takes no
    warmup and its record says so), or a fraction of the peak in [0, 1] (0: from zero).
    Default: ``"base"`` for ``warmup_epochs``, 0 for ``warmup_steps`` and ``warmup_ratio``.
    The rate never exceeds the peak during the warmup."""
    linear_scaling: bool = False
    """Linear scaling rule: lr = base lr × global batch / ``base_batch``."""
    base_batch: int = 128
    """The batch at which ``optimizer.lr`` was tuned, for the linear scaling rule."""

    def __post_init__(self) -> None:
        check_choice("schedule.name", self.name, SCHEDULES)
        for i, m in enumerate(self.milestones):
            check_float(f"schedule.milestones[{i}]", m, 0.0, 1.0, low_open=True)
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"schedule.milestones must be increasing, got {list(self.milestones)}")
        check_float("schedule.gamma", self.gamma, 0.0, 1.0, low_open=True, high_open=False)
        check_float("schedule.warmup_epochs", self.warmup_epochs, 0.0)
        check_choice("schedule.warmup", self.warmup, WARMUPS)
        if self.warmup == "constant" and (self.warmup_steps or self.warmup_ratio):
            raise ConfigError(
                'schedule.warmup = "constant" holds the base rate for warmup_epochs; '
                "warmup_steps and warmup_ratio warm up from 0 and are always gradual"
            )
        check_int("schedule.warmup_steps", self.warmup_steps, 0)
        check_float("schedule.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        given = [k for k in ("warmup_epochs", "warmup_steps", "warmup_ratio") if getattr(self, k) > 0]
        if len(given) > 1:
            raise ConfigError(
                f"schedule: give one of warmup_epochs (from the base rate to the scaled one), "
                f"warmup_steps or warmup_ratio (from 0), not {' and '.join(given)}"
            )
        check_bool("schedule.linear_scaling", self.linear_scaling)
        check_int("schedule.base_batch", self.base_batch, 1)
        start = self.warmup_start
        if not (
            start is None
            or start == "base"
            or (isinstance(start, (int, float)) and not isinstance(start, bool) and 0 <= start <= 1)
        ):
            raise ConfigError(
                f'schedule.warmup_start must be "base" (the base rate optimizer.lr) or a fraction of '
                f"the peak rate in [0, 1], got {start!r}"
            )
        if self.warmup_ratio and self.name == "step" and self.milestones[0] <= self.warmup_ratio:
            raise ConfigError(
                f"schedule.milestones[0] = {self.milestones[0]} falls inside the warmup "
                f"(warmup_ratio = {self.warmup_ratio}): a step decay must come after the warmup"
            )

    def start_of_warmup(self) -> str | float:
        """``warmup_start`` with its default filled in (``"base"`` for ``warmup_epochs``, 0
        for ``warmup_steps`` and ``warmup_ratio``)."""
        if self.warmup_start is not None:
            return self.warmup_start
        return "base" if self.warmup_epochs else 0.0


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: how long, how often to evaluate, and how a run survives faults."""

    OPERATIONAL: ClassVar[tuple[str, ...]] = ("timeout_seconds", "checkpoint_every", "max_restarts", "log_to")
    """Keys that change how a run is carried out, never its result: not part of its id."""

    epochs: float = 10.0
    """Passes over the training set (fractions allowed)."""
    eval_every: int = 100
    """Evaluate the consensus model every this many steps (and at the end)."""
    max_steps: int | None = None
    """Stop after this many steps even if the epochs are not done (smoke tests)."""
    stop_at: str | None = None
    """``METRIC=VALUE``: stop at the first evaluation whose metric (on ``stop_split``)
    strictly crosses VALUE in the metric's direction (``accuracy=0.9``: accuracies are
    fractions). A search measuring
    steps-to-result needs nothing after the crossing; the learning-rate schedule keeps the
    planned length, so the run is the start of the full run."""
    stop_split: str = "validation"
    """The split ``stop_at`` reads: ``validation`` (held out of the training data; a run
    stopped on it can be reported on test without having looked at test) or ``test``."""
    precision: str = "fp32"
    """``fp32``; ``bf16`` or ``fp16``: the forward pass under autocast in that type (on CPU
    too), parameters, optimizer and averaging in fp32; ``fp16`` scales the loss with a
    ``GradScaler`` whose overflow decision every worker shares."""
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    """How long a collective or the rendezvous may wait before the run fails; a worker
    silent for half of it (stopped, frozen) fails the run naming its rank. The default
    suits CPU runs; raise it for long evaluations between two collectives."""
    checkpoint_every: int = 1000
    """Write a checkpoint (every rank's model, optimizer, algorithm state, data position,
    RNG states, the metrics so far) at the first sync at or after every this many steps;
    an interrupted run resumes from its last one. 0 turns them off."""
    max_restarts: int = 0
    """Restarts of the worker group torch's elastic launcher makes after a worker dies;
    each restart resumes from the last checkpoint. A run with restarts gets a launch of its
    own rather than a study's worker pool."""
    log_to: tuple[str, ...] = ()
    """Experiment trackers that receive each evaluation's metrics, learning rate and
    communication counters, and the resolved config, besides the run record:
    ``tensorboard``, ``wandb``, ``mlflow`` (:mod:`localsgd.trackers`; offline by default,
    the pip extra ``localsgd[trackers]``)."""

    def __post_init__(self) -> None:
        check_choice("train.precision", self.precision, PRECISIONS)
        check_float("train.epochs", self.epochs, 0.0, 1e6, low_open=True, high_open=False)
        check_int("train.eval_every", self.eval_every, 1)
        if self.max_steps is not None:
            check_int("train.max_steps", self.max_steps, 1)
        check_float(
            "train.timeout_seconds",
            self.timeout_seconds,
            1.0,
            MAX_TIMEOUT_SECONDS,
            high_open=False,
            unit="seconds",
        )
        check_int("train.checkpoint_every", self.checkpoint_every, 0)
        check_int("train.max_restarts", self.max_restarts, 0, MAX_RESTARTS)
        if self.stop_at is not None:
            parse_stop_at(self.stop_at)
        check_choice("train.stop_split", self.stop_split, SPLITS)
        trackers.check_names(self.log_to)

    def stop_metric(self) -> tuple[str, float] | None:
        """``stop_at`` as (metric name, value)."""
        return None if self.stop_at is None else parse_stop_at(self.stop_at)


def parse_stop_at(text: object, key: str = "train.stop_at") -> tuple[str, float]:
    """``"accuracy=0.9"`` -> ("accuracy", 0.9); ``ConfigError`` naming ``key`` otherwise."""
    name, _, raw = text.partition("=") if isinstance(text, str) else ("", "", "")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not name.strip().isidentifier() or not math.isfinite(value):
        raise ConfigError(f"{key} must be METRIC=VALUE with a finite VALUE (accuracy=0.9), got {text!r}")
    return name.strip(), value


@dataclass(frozen=True)
class CommConfig:
    """``[comm]``: what the communication of the run is subjected to, beyond the network."""

    delay: dict[str, float] = field(default_factory=dict)
    """Seconds added to every collective of a scope: ``{world = 1.0}`` delays each global
    average (the delayed global synchronisations of Lin et al. 2020, §4), ``block2`` each
    average inside blocks of 2. The process engine waits them out after the collective (in
    the run's communication time); the simulated engine does not wait, and the cost model
    adds delay × collectives of the scope to its estimates. Keys: ``world`` or
    ``block<G>`` (G dividing the workers); values: finite seconds >= 0."""

    def __post_init__(self) -> None:
        from localsgd.costmodel import check_delay

        try:
            # Block keys are checked against the workers by RunConfig; any G is a scope here.
            object.__setattr__(self, "delay", check_delay(self.delay, None, "comm.delay"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def check_workers(self, workers: int) -> None:
        """Every block key names a block size that divides ``workers``."""
        from localsgd.costmodel import check_delay

        try:
            check_delay(self.delay, workers, "comm.delay")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _default_algorithm() -> dict[str, Any]:
    return {"name": "minibatch_sgd"}


def _default_workload() -> dict[str, Any]:
    from localsgd.workloads import DEFAULT

    return {"name": DEFAULT}


@dataclass(frozen=True)
class RunConfig:
    """One training run: workload, K workers, algorithm and recipe."""

    name: str = "run"
    """A label for humans; the run's identity is the hash of the whole config."""
    workload: dict[str, Any] = field(default_factory=_default_workload)
    """The workload's section: ``name`` (a registered workload: ``localsgd workloads`` lists
    them, ``localsgd.workloads.DEFAULT`` the default; or an import path
    ``package.module:function``) and the workload's own options. ``workload = "name"`` is
    short for ``[workload] name = "name"``."""
    workers: int = 1
    """K: workers."""
    engine: str = "processes"
    """How the K workers run: a registered engine (``localsgd engines`` lists them with the
    capabilities each declares; docs/engines.md describes them)."""
    engine_options: dict[str, Any] = field(default_factory=dict)
    """The engine's own options, checked by the engine (its options dataclass names and
    documents each key: docs/engines.md); what they ask of the engine (worker speeds, say)
    must be among the capabilities it declares."""
    seed: int = 0
    """Model init (identical on every worker) and data order (shards per worker)."""
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu`` or ``cuda``."""
    threads: int = 1
    """Intra-op CPU threads per worker (``torch.set_num_threads``). One per worker keeps K
    processes from oversubscribing the cores; small models gain nothing from more."""
    algorithm: dict[str, Any] = field(default_factory=_default_algorithm)
    """The algorithm table, as for ``localsgd.algorithms.build`` (``localsgd algorithms``
    lists the registered ones); every ``<x>_step`` field may be given as ``<x>_epoch``
    instead (``switch_epoch``, converted from the steps per epoch)."""
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    fixed: str = "worker_batch"
    """What was held fixed when the worker count varied: ``worker_batch`` or
    ``global_batch`` (recorded in the run record)."""
    from_run: dict[str, str] = field(default_factory=dict)
    """A run of a study's later stage: the earlier stage's run whose exported model it
    starts from, ``{stage = "pretrain", run_id = "..."}`` (``localsgd.studies.stages``);
    empty otherwise."""

    def __post_init__(self) -> None:
        from localsgd import engines, workloads

        if not 1 <= len(self.name) <= 200 or not self.name.isprintable():
            raise ConfigError(f"name must be 1 to 200 printable characters, got {self.name[:80]!r}")
        check_int("workers", self.workers, 1, MAX_WORKERS)
        engine = engines.get(self.engine)
        options = engine.options(self.engine_options, self.workers)
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_int("threads", self.threads, 1, MAX_THREADS)
        check_choice("fixed", self.fixed, ("worker_batch", "global_batch"))
        algorithm = self.algorithm_config(steps_per_epoch=1)  # validates the algorithm table
        self._check_capabilities(engine, engines.requests(options), algorithm.capabilities)
        schedule = self.schedule
        first_decay = schedule.milestones[0] * self.train.epochs if schedule.milestones else math.inf
        if schedule.name == "step" and schedule.warmup_epochs and first_decay <= schedule.warmup_epochs:
            raise ConfigError(
                f"schedule.milestones[0] = {schedule.milestones[0]} of {self.train.epochs:g} epochs falls "
                f"inside the warmup (warmup_epochs = {schedule.warmup_epochs:g}): a step decay must come "
                "after the warmup"
            )
        workloads.check_spec(self.workload)
        self.comm.check_workers(self.workers)
        if self.from_run and (
            set(self.from_run) != {"stage", "run_id"}
            or not all(isinstance(v, str) and v for v in self.from_run.values())
        ):
            raise ConfigError(
                "from_run must be a table {stage = NAME, run_id = ID} (the earlier stage's run), "
                f"got {self.from_run!r}"
            )

    def _check_capabilities(
        self, engine: Engine, asked: Mapping[Capability, str], algorithm: AlgorithmCapabilities
    ) -> None:
        """What this run needs of its engine and algorithm against what they declare."""
        from localsgd.engines import Capability, require

        for capability, setting in asked.items():
            require(engine, capability, setting)
        if self.train.max_restarts:
            require(engine, Capability.RESTARTS, f"train.max_restarts = {self.train.max_restarts}")
        self._check_speeds(engine, asked, algorithm)
        self._check_alone(self._alone(engine, algorithm))
        for key, size in algorithm.blocks:
            if self.workers % size:
                raise ConfigError(
                    f"algorithm.{key} = {size} does not divide workers = {self.workers}; "
                    "blocks are groups of consecutive workers"
                )

    def _check_speeds(
        self, engine: Engine, asked: Mapping[Capability, str], algorithm: AlgorithmCapabilities
    ) -> None:
        """Workers of unequal speeds: what an asynchronous schedule of them needs."""
        from localsgd.engines import Capability

        name = self.algorithm.get("name")
        if Capability.STEPS_BY_SPEED in asked and not algorithm.asynchronous:
            raise ConfigError(
                f"{asked[Capability.STEPS_BY_SPEED]} needs an asynchronous algorithm (a parameter server); "
                f"{name!r} steps every worker together"
            )
        held = Capability.WORKER_SPEEDS in asked and Capability.SPEEDS_BY_HOLDING_STILL in engine.capabilities
        if held and algorithm.asynchronous:
            warm = self.schedule.warmup_epochs or self.schedule.warmup_steps or self.schedule.warmup_ratio
            constant = self.schedule.name == "constant" and not warm
            if self.optimizer.name != "sgd" or not constant:
                raise ConfigError(
                    f"{asked[Capability.WORKER_SPEEDS]}: engine {self.engine!r} steps workers of unequal "
                    "speeds under an asynchronous algorithm while others are held still, each at a step of "
                    "its own, which needs optimizer.name = 'sgd' and a constant schedule "
                    "(schedule.name = 'constant', no warmup)"
                )

    def _check_alone(self, alone: str) -> None:
        """What workers that step without waiting for one another (``alone`` says why, ''
        when they wait) cannot do."""
        # fp16 agrees on overflows with a collective before every step (Replicas.unscale_):
        # asynchronous workers take no collectives once training has started, and workers of
        # an engine that steps without agreement (Hogwild's helpers) step without a GradScaler.
        if self.train.precision == "fp16" and alone:
            raise ConfigError(
                f"train.precision = 'fp16' needs every worker to agree on overflows before each step, "
                f"which {alone} does not do; use 'bf16' or 'fp32'"
            )
        # Mid-run checkpoints are taken at a step every worker has reached (a barrier); workers
        # that never wait for one another have none, so their runs restart instead of resuming.
        if self.train.max_restarts and alone:
            raise ConfigError(
                f"train.max_restarts = {self.train.max_restarts}: {alone} takes no mid-run checkpoints to "
                "restart from; set it to 0"
            )
        # Stopping at a crossing needs every worker to stop at the same step, after an
        # evaluation they all see; such workers do not wait for one another.
        if self.train.stop_at is not None and alone:
            raise ConfigError(
                f"train.stop_at = {self.train.stop_at!r}: {alone} cannot stop every worker at one "
                "evaluation; leave it unset"
            )

    def _alone(self, engine: Engine, algorithm: AlgorithmCapabilities) -> str:
        """What makes the workers step without waiting for one another, in words ('' if nothing)."""
        from localsgd.engines import Capability

        if algorithm.asynchronous:
            return f"an asynchronous algorithm ({self.algorithm.get('name')!r})"
        if Capability.STEPS_WITHOUT_AGREEMENT in engine.capabilities:
            return f"engine {self.engine!r} (its workers step without agreement)"
        return ""

    def steps_alone(self) -> bool:
        """Whether workers step without waiting for one another: an asynchronous algorithm,
        or an engine that declares ``STEPS_WITHOUT_AGREEMENT`` (processes sharing one model,
        such as Hogwild's)."""
        from localsgd import engines

        algorithm = self.algorithm_config(steps_per_epoch=1).capabilities
        return bool(self._alone(engines.get(self.engine), algorithm))

    def processes(self) -> int:
        """The worker processes (torch.distributed ranks) the run's engine starts."""
        from localsgd import engines

        return engines.get(self.engine).processes(self.workers, self.engine_options)

    @property
    def global_batch(self) -> int:
        return self.workers * self.data.batch_size

    @property
    def workload_name(self) -> str:
        return str(self.workload["name"])

    def algorithm_config(self, steps_per_epoch: int) -> Any:
        """The algorithm config, with every ``<x>_epoch`` key resolved to the algorithm's
        ``<x>_step`` field (post-local SGD's ``switch_epoch``, say)."""
        from localsgd import algorithms

        spec = dict(self.algorithm)
        try:
            cls = algorithms.get(spec.get("name"))
        except ValueError as exc:
            raise ConfigError(f"algorithm.name: {exc}") from None
        steps = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in [k for k in spec if k.endswith("_epoch")]:
            target = key.removesuffix("_epoch") + "_step"
            if target not in steps:
                raise ConfigError(f"algorithm.{key}: {cls.name} has no {target} field to give in epochs")
            if target in spec:
                raise ConfigError(f"give algorithm.{target} or algorithm.{key}, not both")
            epochs = spec.pop(key)
            check_float(f"algorithm.{key}", epochs, 0.0, 1e9)
            spec[target] = round(float(epochs) * steps_per_epoch)
        try:
            return algorithms.build(spec)
        except ValueError as exc:
            raise ConfigError(f"algorithm: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def run_id(self) -> str:
        """A stable identity: the same config always maps to the same id. How the run is
        carried out (``TrainConfig.OPERATIONAL``: timeouts, checkpoints, restarts, trackers) is left
        out, so changing it resumes a run instead of starting another."""
        data = self.to_dict()
        # Sections added after stores were written are left out at their defaults, so a
        # store's finished runs keep their ids (and a rerun skips them).
        for key in TrainConfig.OPERATIONAL:
            data["train"].pop(key, None)
        if self.comm == CommConfig():
            del data["comm"]
        if not self.engine_options:
            del data["engine_options"]
        if not self.from_run:
            del data["from_run"]
        for section, key in ADDED_LATER:
            if getattr(getattr(self, section), key) == getattr(type(getattr(self, section)), key):
                del data[section][key]
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


ADDED_LATER = (
    ("schedule", "warmup"),
    ("schedule", "warmup_start"),
    ("train", "stop_at"),
    ("train", "stop_split"),
    ("optimizer", "momentum_form"),
    ("optimizer", "momentum_correction"),
)
"""Fields added after stores were written: left out of the run id at their defaults."""


def normalize(data: Mapping[str, Any]) -> dict[str, Any]:
    """``workload = "name"`` written out as the table ``{"name": "name"}``."""
    out = dict(data)
    if isinstance(out.get("workload"), str):
        out["workload"] = {"name": out["workload"]}
    return out


def run_config(data: Mapping[str, Any]) -> RunConfig:
    """A ``RunConfig`` from a plain dict (a parsed TOML file); errors name the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a run config must be a table of sections, got {type(data).__name__}")
    try:
        return from_dict(RunConfig, normalize(data))
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
