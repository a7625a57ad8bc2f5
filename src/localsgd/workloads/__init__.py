"""Workloads: data + model + loss + declared metrics, built by name or import path.

>>> from localsgd import workloads
>>> wl = workloads.build("mnist1d_cnn", num_samples=20000)   # generated once, then cached
>>> model = wl.make_model(seed=0)
>>> for batch in wl.train_batches(rank, world_size, batch_size=64, epoch=0, seed=0, device="cpu"):
...     wl.loss(model, batch).backward()                    # batch = {"x": ..., "y": ...}
>>> wl.evaluate(model, "cpu")   # {"accuracy": ..., "eval_loss": ...}; wl.primary == "accuracy"
>>> wl.evaluate(model, "cpu", "validation")   # the same on the held-out validation split

Registered workloads: ``cifar10_resnet20``, ``classification``, ``imagenet_resnet101``,
``imagenet_resnet50``, ``mlm``, ``mnist1d_cnn``, ``mnist1d_fc``, ``mnist1d_mlp``, ``mnli``,
``squad``. :data:`DEFAULT` is the default; the text ones (:mod:`localsgd.workloads.text`)
need the ``localsgd[text]`` extra; :func:`names` and ``localsgd workloads`` list them;
any ``package.module:function`` returning a :class:`Workload` works too. Studies, engines
and examples use workloads; algorithms never do. A workload with ``export(model, folder)`` (the
text ones) leaves a run's final model where a later run loads it (:func:`export_model`).
"""

from localsgd.workloads import cifar10, imagenet, mnist1d, text
from localsgd.workloads.base import (
    ACCURACY,
    EVAL_LOSS,
    SPLITS,
    VALIDATION_FRACTION,
    Batch,
    Metric,
    TensorWorkload,
    Workload,
    augment_generator,
    build,
    cache_dir,
    check_spec,
    evaluate,
    metric,
    names,
    register,
    resolve,
    shard_indices,
    shuffle_generator,
    split_spec,
    stacked_train_batches,
    validation_size,
    validation_split,
)
from localsgd.workloads.text.export import export_model

DEFAULT = "mnist1d_cnn"

__all__ = [
    "ACCURACY",
    "DEFAULT",
    "EVAL_LOSS",
    "SPLITS",
    "VALIDATION_FRACTION",
    "Batch",
    "Metric",
    "TensorWorkload",
    "Workload",
    "augment_generator",
    "build",
    "cache_dir",
    "check_spec",
    "cifar10",
    "evaluate",
    "export_model",
    "imagenet",
    "metric",
    "mnist1d",
    "names",
    "register",
    "resolve",
    "shard_indices",
    "shuffle_generator",
    "split_spec",
    "stacked_train_batches",
    "text",
    "validation_size",
    "validation_split",
]
