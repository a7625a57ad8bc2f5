"""Text workloads on HuggingFace transformers models, from local files only.

================== ========================================== ==============================================
name               task                                       metrics (primary first)
================== ========================================== ==============================================
``mnli``           sentence-pair classification (GLUE MNLI)  accuracy matched, accuracy mismatched, eval loss
``squad``          extractive QA (SQuAD v1.1)                F1, exact match, eval loss
``mlm``            masked-LM (continued) pretraining          eval loss, perplexity
``classification`` single-text classification (TSV/CSV/JSONL) accuracy, macro-F1, eval loss
================== ========================================== ==============================================

Each takes ``[workload.model]`` (:class:`~localsgd.workloads.text.config.ModelConfig`),
``[workload.data]`` and ``validation_fraction`` (the share of the training examples held out
as the validation split). Registering them imports no transformers: the factories import the
implementation when a run builds one (``pip install 'localsgd[text]'``). Each can export a
trained model as a ``save_pretrained`` folder (:mod:`~localsgd.workloads.text.export`).
``localsgd fixtures DIR`` writes a tiny tokenizer, model and data in the real formats.
"""

from __future__ import annotations

from localsgd.workloads.base import Workload, register
from localsgd.workloads.text.config import (
    ClassificationConfig,
    MlmConfig,
    MnliConfig,
    ModelConfig,
    SquadConfig,
)
from localsgd.workloads.text.export import MODEL_FOLDER, export_model

__all__ = [
    "MODEL_FOLDER",
    "ClassificationConfig",
    "MlmConfig",
    "MnliConfig",
    "ModelConfig",
    "SquadConfig",
    "classification",
    "export_model",
    "mlm",
    "mnli",
    "squad",
]


@register("mnli")
def mnli(config: MnliConfig) -> Workload:
    """GLUE MNLI; options in :class:`~localsgd.workloads.text.config.MnliConfig`."""
    from localsgd.workloads.text.mnli import Mnli

    return Mnli(config)


@register("squad")
def squad(config: SquadConfig) -> Workload:
    """SQuAD v1.1; options in :class:`~localsgd.workloads.text.config.SquadConfig`."""
    from localsgd.workloads.text.squad import Squad

    return Squad(config)


@register("mlm")
def mlm(config: MlmConfig) -> Workload:
    """Masked-LM on plain text; options in :class:`~localsgd.workloads.text.config.MlmConfig`."""
    from localsgd.workloads.text.mlm import MaskedLM

    return MaskedLM(config)


@register("classification")
def classification(config: ClassificationConfig) -> Workload:
    """Single-text classification; options in
    :class:`~localsgd.workloads.text.config.ClassificationConfig`."""
    from localsgd.workloads.text.classification import Classification

    return Classification(config)
