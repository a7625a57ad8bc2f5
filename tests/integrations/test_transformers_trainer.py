"""``LocalSGDTrainer`` under ``torchrun`` (2 CPU processes, gloo), every scenario in one
launch of ``trainer_parity.py``: mini-batch SGD through it equals the plain ``Trainer`` (DDP)
bit for bit; local SGD through it equals ``localsgd.DataParallel`` in a bare loop on the
same batches, with and without gradient accumulation and under bf16 autocast; checkpoints
and ``save_model`` hold the consensus; a resumed run ends where the uninterrupted one did.

Bit-for-bit, not a tolerance: both sides run the same kernels on the same tensors in the
same order (the Trainer's DDP wrapper only forwards when it does not all-reduce), and an
average over two ranks, (a + b) / 2, rounds the same whichever rank computes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from harness import finished, free_port, launch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

# One worker runs the module, so that the launch behind ``ranks`` runs once per session.
pytestmark = pytest.mark.xdist_group("transformers_trainer")

SCRIPT = Path(__file__).with_name("trainer_parity.py")
ROOT = Path(__file__).resolve().parents[2]
N_PARAMS_BYTES = 14412  # the tiny BERT's 3603 float32 parameters


def torchrun_env(tmp: Path) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp / "cache")}


def torchrun() -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("trainer")
    proc = launch([*torchrun(), str(SCRIPT), str(out)], 400, torchrun_env(out))
    files = [out / f"rank{r}.pt" for r in range(2)]
    assert finished(proc, files), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(f, weights_only=False) for f in files]


def test_minibatch_sgd_through_the_trainer_equals_plain_trainer_ddp(ranks):
    for r in ranks:
        assert r["world_size"] == 2
        assert r["plain"]["wrapped"] == r["minibatch"]["wrapped"] == "DistributedDataParallel"
        assert torch.equal(r["plain"]["final"], r["minibatch"]["final"])
        for a, b in zip(r["plain"]["trace"], r["minibatch"]["trace"], strict=True):
            assert torch.equal(a, b)
        stats = r["minibatch"]["stats"]
        # DDP's all-reduce averaged every update's gradients (one bucket here), no more.
        assert stats["steps"] == 6 and stats["syncs"] == 6 and stats["bytes"] == 6 * N_PARAMS_BYTES
        assert stats["comm_seconds"] == 0.0
    assert torch.equal(ranks[0]["minibatch"]["final"], ranks[1]["minibatch"]["final"])


def test_local_sgd_through_the_trainer_equals_data_parallel_in_a_bare_loop(ranks):
    for r in ranks:
        local = r["local"]
        for a, b in zip(local["trace"], local["bare"]["trace"], strict=True):
            assert torch.equal(a, b)
        assert torch.equal(local["final"], local["bare"]["final"])
        # H = 4 over 6 updates: a sync after the 4th and one when training ends.
        assert local["stats"]["steps"] == 6 and local["stats"]["syncs"] == 2
        assert local["stats"]["collectives"] == 2 and local["stats"]["bytes"] == 2 * N_PARAMS_BYTES
        assert [e["localsgd/syncs"] for e in local["logged"]] == [0, 1, 1]  # evals at 3, 6; the summary
    traces = [r["local"]["trace"] for r in ranks]
    assert [torch.equal(a, b) for a, b in zip(*traces)] == [False, False, False, True, False, False]
    assert torch.equal(ranks[0]["local"]["final"], ranks[1]["local"]["final"])


def test_gradient_accumulation_counts_updates_and_keeps_ddp_quiet(ranks):
    for r in ranks:
        acc = r["accumulated"]
        # 16 micro-batches, 8 updates, H = 4: syncs = updates // H.
        assert acc["stats"]["steps"] == 8 and acc["stats"]["syncs"] == 8 // 4
        # Equal to the bare loop, whose gradients are this rank's alone: DDP did not average
        # on the last micro-batch of an update, where the Trainer leaves no_sync().
        assert torch.equal(acc["final"], acc["bare"]["final"])
        # Mini-batch SGD: 8 micro-batches, 4 updates, one DDP all-reduce each, as the plain Trainer.
        assert torch.equal(acc["minibatch"]["final"], acc["plain_minibatch"])
        assert (
            acc["minibatch"]["stats"]["syncs"] == 4
            and acc["minibatch"]["stats"]["bytes"] == 4 * N_PARAMS_BYTES
        )


def test_bf16_autocast_equals_the_bare_loop(ranks):
    for r in ranks:
        assert torch.equal(r["bf16"]["final"], r["bf16"]["bare"]["final"])
        assert r["bf16"]["stats"]["steps"] == 4 and r["bf16"]["stats"]["syncs"] == 2
    assert torch.equal(ranks[0]["bf16"]["final"], ranks[1]["bf16"]["final"])


def test_checkpoints_and_save_model_hold_the_consensus(ranks):
    replicas = [r["local"]["trace"][2] for r in ranks]  # after update 3, mid-period
    assert not torch.equal(*replicas)
    for r in ranks:
        local = r["local"]
        assert torch.equal(local["checkpoint3"], (replicas[0] + replicas[1]) / 2)
        assert {"localsgd-rank0.pt", "localsgd-rank1.pt", "model.safetensors"} <= set(local["files3"])
        # The evaluation at step 3 scored the consensus: the loss of checkpoint-3's model.
        assert local["evals"][0] == pytest.approx(local["eval3_of_checkpoint"], rel=1e-6)
        assert torch.equal(local["saved"], local["final"])  # every rank's final model


def test_resume_from_a_mid_period_checkpoint_continues_exactly(ranks):
    for r in ranks:
        resumed, local = r["resumed"], r["local"]
        assert torch.equal(resumed["final"], local["final"])
        for a, b in zip(resumed["trace"], local["trace"][3:], strict=True):
            assert torch.equal(a, b)
        assert resumed["stats"]["steps"] == 6 and resumed["stats"]["syncs"] == 2
        assert resumed["stats"]["bytes"] == local["stats"]["bytes"]


def test_diloco_through_the_trainer_equals_the_bare_loop_and_resumes_exactly(ranks):
    for r in ranks:
        run = r["diloco"]
        for a, b in zip(run["trace"], run["bare"]["trace"], strict=True):
            assert torch.equal(a, b)
        # Resumed after update 3, between two outer steps: the anchor and the outer momentum
        # came back with the replica.
        for a, b in zip(run["resumed"]["trace"], run["trace"][3:], strict=True):
            assert torch.equal(a, b)
        assert run["stats"]["syncs"] == run["resumed"]["stats"]["syncs"] == 3
    assert torch.equal(ranks[0]["diloco"]["final"], ranks[1]["diloco"]["final"])


def test_a_compiled_model_still_runs_its_local_steps_without_ddp(ranks):
    for r in ranks:
        run = r["compiled"]
        assert run["wrapped"] == "OptimizedModule"  # torch.compile around the DDP model
        assert torch.equal(run["final"], run["bare"]["final"])
        assert run["stats"]["steps"] == 4 and run["stats"]["syncs"] == 1


def test_refusals_in_one_process(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from localsgd.integrations.transformers import LocalSGDTrainer

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from trainer_parity import Rows, tiny_bert

    def args(**kwargs: Any) -> TrainingArguments:
        return TrainingArguments(
            str(tmp_path), use_cpu=True, report_to=[], max_steps=2, per_device_train_batch_size=4,
            disable_tqdm=True, save_strategy="steps", save_steps=2, **kwargs,
        )  # fmt: skip

    model = tiny_bert()
    with pytest.raises(ValueError, match=r"args\.load_best_model_at_end is not supported"):
        LocalSGDTrainer(
            model=model, args=args(load_best_model_at_end=True, eval_strategy="steps", eval_steps=2),
            eval_dataset=Rows(8, 1), algorithm={"name": "local_sgd", "period": 2},
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: no checkpoint in args\.output_dir"):
        LocalSGDTrainer(
            model=model, args=args(), train_dataset=Rows(8, 0), algorithm={"name": "local_sgd", "period": 2}
        ).train(True)
    trainer = LocalSGDTrainer(
        model=model, args=args(), train_dataset=Rows(16, 0), algorithm={"name": "local_sgd", "period": 2}
    )
    trainer.train()
    assert trainer.localsgd.stats["steps"] == 2 and trainer.localsgd.stats["syncs"] == 1  # a world of one
    (tmp_path / "checkpoint-2" / "localsgd-rank0.pt").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-2/localsgd-rank0\.pt is missing"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert not trainer.localsgd.active  # the failed train() removed the hooks


def test_example_trains_mnli_under_torchrun_with_local_sgd(tmp_path, text_fixtures):
    fx = text_fixtures
    command = [
        *torchrun(), str(ROOT / "examples" / "text" / "trainer.py"), "--task", "mnli",
        "--data_dir", str(fx["mnli"]), "--config_name", str(fx["model_config"]),
        "--tokenizer_name", str(fx["tokenizer"]), "--max_length", "64", "--train_subset", "512",
        "--eval_subset", "64", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
        "--max_steps", "12", "--save_steps", "6", "--report_to", "none", "--disable_tqdm", "true",
        "--output_dir", str(tmp_path / "model"), "--algorithm", '{"name": "local_sgd", "period": 4}',
    ]  # fmt: skip
    proc = launch(command, 400, torchrun_env(tmp_path))
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"')]
    # the main process prints the results once, after the last checkpoint
    saved = [tmp_path / "model" / "checkpoint-12" / f"localsgd-rank{rank}.pt" for rank in (0, 1)]
    assert finished(proc, saved if len(lines) == 1 else [tmp_path / "missing"]), (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
    assert len(lines) == 1, proc.stdout[-3000:]
    out = json.loads(lines[0])
    assert out["processes"] == 2 and out["updates"] == 12
    assert out["stats"]["steps"] == 12 and out["stats"]["syncs"] == 3 and out["stats"]["collectives"] == 3
    assert set(out["metrics"]) == {"accuracy_matched", "accuracy_mismatched", "eval_loss"}
    assert (tmp_path / "model" / "model.safetensors").is_file()
    for step in (6, 12):
        for rank in (0, 1):
            assert (tmp_path / "model" / f"checkpoint-{step}" / f"localsgd-rank{rank}.pt").is_file()
