"""Starting and watching worker processes, shared by the engines that run processes.

- ``launch``: one run's worker group under torch's elastic launcher (torchrun);
- ``pool``: a pool of worker processes kept between the runs of a study;
- ``heartbeat``: workers that stop answering are found and named;
- ``elastic``: the launcher process itself, tied to the process that started it.
"""
