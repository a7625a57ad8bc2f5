"""The simulated engine: K replicas stacked in one process with the semantics of K worker
processes.

- ``engine``: the engine and its replicas (what a run talks to);
- ``stacked``: the stacked model (one ``[K, P]`` storage per dtype, BatchNorm kept per replica);
- ``communicator``: averaging as a mean over the replica dimension, with the process engine's counters;
- ``gradients``: every replica's gradients at once (``fused``, ``vmap`` or a loop);
- ``fused``: stacked layers that run all replicas in one kernel;
- ``asynchrony``: worker speeds and an asynchronous schedule on an event loop;
- ``trials``: R runs batched as R groups of replicas.
"""

from localsgd.engines.simulated import engine as engine
