"""The Hogwild engine: P processes per device on one shared model, lock-free (:mod:`.engine`)."""

from localsgd.engines.hogwild import engine as engine
