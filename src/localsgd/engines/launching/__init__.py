"""Starting and watching worker processes, shared by the engines that run processes.

- ``launch``: one run's worker group under torch's elastic launcher (torchrun);
- ``tolerant``: one run's workers started here, one process per rank, going on without a
  lost worker of an asynchronous run (rank 0's death still fails it);
- ``pool``: a pool of worker processes kept between the runs of a study;
- ``heartbeat``: workers that stop answering are found and named;
- ``elastic``: the launcher process itself, tied to the process that started it;
- ``server``: the process every launcher of a process is forked from, which imported the
  launcher's modules once.
"""
