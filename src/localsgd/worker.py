"""``python -m localsgd.worker``: the worker process's entry point (:mod:`localsgd.run.worker`)."""

from localsgd.run.worker import entry

if __name__ == "__main__":
    entry()
