"""Text workloads on HuggingFace transformers models, from local files only.

======== ========================================== ==============================================
name     task                                       metrics (primary first)
======== ========================================== ==============================================
``mnli`` sentence-pair classification (GLUE MNLI)  accuracy matched, accuracy mismatched, eval loss
``squad`` extractive QA (SQuAD v1.1)                F1, exact match, eval loss
``mlm``  masked-LM (continued) pretraining          eval loss, perplexity
======== ========================================== ==============================================

Each takes ``[workload.model]`` (:class:`~localsgd.workloads.text.config.ModelConfig`) and
``[workload.data]``. Registering them imports no transformers: the factories import the
implementation when a run builds one (``pip install 'localsgd[text]'``).
``localsgd fixtures DIR`` writes a tiny tokenizer, model config and data in the real formats.
"""

from __future__ import annotations

from localsgd.workloads.base import Workload, register
from localsgd.workloads.text.config import MlmConfig, MnliConfig, ModelConfig, SquadConfig

__all__ = ["MlmConfig", "MnliConfig", "ModelConfig", "SquadConfig", "mlm", "mnli", "squad"]


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
