"""One run: its config, its training loop, checkpoints, precision, learning-rate recipes,
and executing it on its engine. Studies (:mod:`localsgd.studies`) are built on top.

- ``config``: :class:`~localsgd.run.config.RunConfig`, every section validated;
- ``loading``: config files (TOML, a run record's JSON) and ``--set`` overrides;
- ``loop``: the training loop every engine and command shares, given what it trains and
  when it evaluates;
- ``training``: one run (:func:`~localsgd.run.training.train`, every rank's entry);
- ``trials``: runs that differ only in metaparameters, trained together in one process;
- ``bookkeeping``: what every run counts and writes (plan, stop rule, rows, status);
- ``checkpoints``, ``precision``, ``recipes``: what the loop uses;
- ``execute``: one run on its engine, in its own store folder;
- ``worker``: the worker process's entry point (``python -m localsgd.worker``).
"""
