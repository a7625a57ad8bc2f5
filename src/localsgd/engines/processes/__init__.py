"""The process engine: K worker processes on torch.distributed (:mod:`.engine`)."""

from localsgd.engines.processes import engine as engine
