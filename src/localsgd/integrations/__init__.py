"""Integrations with other training libraries (each needs its extra; see docs/integrations.md):
:mod:`localsgd.integrations.accelerate` (a drop-in for accelerate's ``LocalSGD``),
:mod:`localsgd.integrations.transformers` (``LocalSGDTrainer`` for transformers' ``Trainer``)
and :mod:`localsgd.integrations.lightning` (``LocalSGDStrategy`` for PyTorch Lightning)."""
