"""The accelerate drop-in: under ``accelerate launch`` (2 CPU processes, gloo) it trains the
same tiny BERT on the same data to the same bits as accelerate's own LocalSGD; mini-batch
SGD goes through DDP; gradient accumulation composes with ``accelerator.accumulate``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from harness import LAUNCHER_VARS, free_port

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

# One worker runs the module, so that the launch behind its module fixture runs once per session.
pytestmark = pytest.mark.xdist_group("accelerate")

SCRIPT = Path(__file__).with_name("accelerate_parity.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("accelerate")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])),
    )
    # --multi_gpu picks accelerate's torchrun launcher; without CUDA the processes run on
    # the CPU with gloo (accelerate's MULTI_CPU).
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), str(SCRIPT), str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_drop_in_equals_accelerates_local_sgd_bit_for_bit(ranks):
    for r in ranks:
        assert r["world_size"] == 2
        ours, theirs = r["localsgd"], r["accelerate"]
        for a, b in zip(ours["trace"], theirs["trace"]):
            assert torch.equal(a, b)
        assert torch.equal(ours["final"], theirs["final"])
        # H = 4 over 6 updates: a sync after the 4th and one on leaving; one flat all-reduce each.
        assert ours["stats"]["syncs"] == 2 and ours["stats"]["collectives"] == 2
        assert ours["stats"]["bytes"] == 2 * 4 * ours["final"].numel()
    traces = [r["localsgd"]["trace"] for r in ranks]
    same = [torch.equal(a, b) for a, b in zip(*traces)]
    assert same == [False, False, False, True, False, False]  # identical right after the sync
    assert torch.equal(ranks[0]["localsgd"]["final"], ranks[1]["localsgd"]["final"])


def test_minibatch_sgd_lets_ddp_average(ranks):
    n = ranks[0]["minibatch"]["final"].numel()
    for r in ranks:
        stats = r["minibatch"]["stats"]
        assert stats["syncs"] == 6 and stats["bytes"] == 6 * 4 * n and stats["comm_seconds"] == 0.0
    for a, b in zip(ranks[0]["minibatch"]["trace"], ranks[1]["minibatch"]["trace"]):
        assert torch.equal(a, b)  # DDP kept the replicas identical after every step


def test_gradient_accumulation_counts_optimizer_updates(ranks):
    for r in ranks:
        ours, theirs = r["accumulated"], r["accumulated_accelerate"]
        # 12 micro-batches, 6 updates: H = 4 updates is accelerate's local_sgd_steps = 8 calls.
        assert ours["stats"]["steps"] == 6 and ours["stats"]["syncs"] == 2
        assert torch.equal(ours["final"], theirs["final"])
        for a, b in zip(ours["trace"], theirs["trace"]):
            assert torch.equal(a, b)


def test_single_process_is_disabled_and_refuses_no_optimizer():
    from accelerate import Accelerator

    from localsgd.integrations.accelerate import LocalSGD

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2) as local_sgd:
        local_sgd.step()
    assert local_sgd.num_steps == 1 and local_sgd.stats == {} and not local_sgd.enabled
    with pytest.raises(ValueError, match="local_sgd_steps"):
        LocalSGD(accelerator=accelerator, model=model)
    with pytest.raises(ValueError, match="local_sgd_steps must be an integer >= 1"):
        LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=0)
    local = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2)
    with pytest.raises(ValueError, match=r"none of the optimizers accelerator\.prepare"):
        local._find_optimizer()
