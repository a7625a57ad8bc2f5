"""``python -m localsgd.worker``: the worker process's entry point (:mod:`localsgd.run.worker`)."""

from localsgd.run.worker import entry, forked_entry

__all__ = ["entry", "forked_entry"]

if __name__ == "__main__":
    entry()
