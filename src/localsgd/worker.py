"""``python -m localsgd.worker``: the worker process's entry point (:mod:`localsgd.run.worker`)."""

import sys

from localsgd.run.worker import main

if __name__ == "__main__":
    sys.exit(main())
