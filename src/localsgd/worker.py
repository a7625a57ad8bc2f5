"""``python -m localsgd.worker``: the worker process's entry point (:mod:`localsgd.run.worker`).

``forked_entry`` is the same entry point as a function, for the launcher that forks its
workers (:mod:`localsgd.engines.launching.elastic`)."""

from localsgd.run.worker import entry, forked_entry

FORK_PRELOAD = ("torch._dynamo",)
"""What a launcher that forks workers imports first: torch's optimizers import
``torch._dynamo`` at their first step, which costs a started worker about a second of CPU."""

__all__ = ["FORK_PRELOAD", "entry", "forked_entry"]

if __name__ == "__main__":
    entry()
