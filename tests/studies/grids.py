"""A study file that exercises every grid feature, shared by the grid and runner tests."""

from __future__ import annotations

from pathlib import Path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


STUDY = """
[study]
name = "grid-test"

[base]
workload = "mnist1d_mlp"
[base.data]
batch_size = 32
[base.algorithm]
name = "local_sgd"
period = 8

[[grid]]
workers = [1]
seed = [0, 1]
algorithm = [{name = "minibatch_sgd"}]

[[grid]]
workers = [2, 4]
seed = [0, 1]
global_batch = 128
[grid.algorithm]
period = [4, 16]

[[grid]]
workers = [2]
[grid.schedule]
name = "step"
milestones = [[0.5], [0.3, 0.6]]
"""
