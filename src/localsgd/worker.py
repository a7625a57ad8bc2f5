"""``python -m localsgd.worker``: the worker process's entry point (:mod:`localsgd.run.worker`).

``forked_entry`` is the same entry point as a function, for the launcher that forks its
workers (:mod:`localsgd.engines.launching.elastic`)."""

from localsgd.run.worker import entry, forked_entry

__all__ = ["entry", "forked_entry"]

if __name__ == "__main__":
    entry()
