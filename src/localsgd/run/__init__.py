"""One run: its config, its training loop, checkpoints, precision, learning-rate recipes,
and executing it on its engine. Studies (:mod:`localsgd.studies`) are built on top.

- ``config``: :class:`~localsgd.run.config.RunConfig`, every section validated;
- ``loading``: config files (TOML, a run record's JSON) and ``--set`` overrides;
- ``training``: the training loop every engine and command shares;
- ``trials``: runs that differ only in metaparameters, trained together in one process;
- ``checkpoints``, ``precision``, ``recipes``: what the loop uses;
- ``execute``: one run on its engine, in its own store folder;
- ``worker``: the worker process's entry point (``python -m localsgd.worker``).
"""
