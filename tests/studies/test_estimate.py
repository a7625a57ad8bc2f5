"""``[study.estimate]``: each planned run's wall time on a named cluster before it runs,
from its planned steps and synchronisations and the cost model's collectives."""

from __future__ import annotations

import math
import re
from pathlib import Path

from typer.testing import CliRunner

from localsgd.cli import app
from localsgd.costmodel import collective_seconds, load_cluster
from localsgd.studies.estimate import EstimateSection, estimate_run
from localsgd.studies.loading import load_study

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "studies" / "clusters" / "v100x8_10gbe.toml"

STUDY = """
[study]
name = "estimated"

[study.estimate]
cluster = "{cluster}"
train_samples = 12800
seconds_per_sample = {{ mnist1d_mlp = 1.0e-3 }}
parameters = {{ mnist1d_mlp = 1000000 }}

[base]
engine = "simulated"
workload = "mnist1d_mlp"

[base.data]
batch_size = 32

[base.train]
epochs = 3

[[grid]]
workers = [16]
algorithm = [
    {{ name = "minibatch_sgd" }},
    {{ name = "local_sgd", period = 4 }},
    {{ name = "post_local_sgd", period = 8, switch_epoch = 1.0 }},
    {{ name = "async_local_sgd", period = 4 }},
    {{ name = "diloco", period = 4, fragments = 2, overlap = 1 }},
]
"""


def study_file(tmp_path: Path, cluster: str = str(CLUSTER), **replace: str) -> Path:
    text = STUDY.format(cluster=cluster)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_an_estimate_is_compute_plus_planned_syncs_times_the_collective(tmp_path):
    study = load_study(study_file(tmp_path))
    section = study.section.estimate
    assert isinstance(section, EstimateSection)
    cluster = load_cluster(CLUSTER)
    # 12800 examples less the validation split (1280): 11520 // (16 x 32) = 22 steps an epoch.
    steps = 3 * 22
    allreduce = collective_seconds(4e6, "world", 16, cluster)
    by_name = {run.algorithm["name"]: estimate_run(run, section, cluster) for run in study.runs}
    for name, syncs in (("minibatch_sgd", steps), ("local_sgd", steps // 4), ("post_local_sgd", 22 + (steps - 22) // 8)):
        got = by_name[name]
        assert got.steps == steps
        assert math.isclose(got.compute_seconds, steps * 32 * 1e-3)
        assert got.comm_seconds is not None
        assert math.isclose(got.comm_seconds, syncs * allreduce), name
    assert by_name["async_local_sgd"].comm_seconds is None
    # Streamed, F = 2, τ = 1: 2·steps/H - 1 fragment syncs landed, each of half the model,
    # each waiting for what one step's compute (32 ms) does not hide.
    half = collective_seconds(2e6, "world", 16, cluster)
    streamed = by_name["diloco"].comm_seconds
    assert streamed is not None
    assert math.isclose(streamed, (2 * steps // 4 - 1) * max(0.0, half - 32 * 1e-3))
    assert half < 32e-3 and streamed == 0.0  # on 10 GbE one step hides a 2 MB fragment whole


def test_dry_run_prints_each_runs_estimate(tmp_path):
    result = CliRunner().invoke(app, ["study", str(study_file(tmp_path)), "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "est." in line]
    assert len(lines) == 5
    assert all(line.endswith("on v100x8-10gbe") for line in lines)
    hours = [float(re.search(r"est\. ([0-9.]+) h", line).group(1)) for line in lines[:3]]
    assert hours[0] >= hours[2] >= hours[1]  # every step > post-local > local SGD, H = 4
    assert "communication not planned (asynchronous)" in lines[3]
    assert "5 runs ->" in result.output


def test_a_workload_without_sizes_or_a_wrong_cluster_is_one_line(tmp_path):
    runner = CliRunner()
    missing = study_file(tmp_path, **{"{ mnist1d_mlp = 1000000 }": "{ mnist1d_cnn = 1000000 }"})
    result = runner.invoke(app, ["study", str(missing), "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "study.estimate.parameters has no entry for workload 'mnist1d_mlp'" in result.output
    unknown = study_file(tmp_path, cluster="no_such_cluster")
    result = runner.invoke(app, ["study", str(unknown), "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "study.estimate.cluster" in result.output
    bad = study_file(tmp_path, **{"train_samples = 12800": "train_samples = -3"})
    result = runner.invoke(app, ["study", str(bad), "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "study.estimate.train_samples must be an integer >= 1" in result.output
    assert not (tmp_path / "o").exists()
