"""The fused stacked path: equal to separate models and to vmap, and refused (back to vmap)
where its assumptions fail."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from localsgd.engines.simulated.engine import ReplicaGradients, StackedModel
from localsgd.engines.simulated.fused import FusedGradients, unsupported
from localsgd.workloads.mnist1d import ConvNet1D


def xent(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def image_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=None),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False),
        nn.BatchNorm2d(4, affine=False),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.0),
        nn.Linear(4, 3),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))


def signal_net() -> nn.Module:
    """1-D channel layers only (run in the length-first layout): "same" padding with
    dilation, grouped convolution, pooling, and batch norm on ``[N, C]`` after a flatten."""
    return nn.Sequential(
        nn.Unflatten(1, (2, 6)),
        nn.Conv1d(2, 4, 3, padding="same", dilation=2),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 4, 2, groups=2),
        nn.Flatten(),
        nn.Linear(8, 5),
        nn.BatchNorm1d(5, momentum=None),
        nn.ReLU(),
        nn.Linear(5, 3),
    )


MODELS = {
    "conv2d": (image_net, (2, 6, 6)),
    "conv1d": (lambda: ConvNet1D(channels=4), (40,)),
    "conv1d-mixed": (signal_net, (12,)),
    "mlp": (mlp, (5,)),
}
LENGTH_FIRST = {"conv1d", "conv1d-mixed"}


def perturbed(make, replicas: int, seed: int) -> tuple[list[nn.Module], StackedModel]:
    """``replicas`` different models (so a mix-up between replicas shows) and their stack."""
    torch.manual_seed(seed)
    models = [make() for _ in range(replicas)]
    stacked = StackedModel(copy.deepcopy(models[0]), replicas)
    with torch.no_grad():
        for k, m in enumerate(models):
            for name, p in zip(stacked.param_names, stacked.stacked):
                p[k] = dict(m.named_parameters())[name]
    return models, stacked


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_equals_separate_models_and_vmap(name):
    make, shape = MODELS[name]
    k = 3
    models, stacked = perturbed(make, k, 0)
    _, reference = perturbed(make, k, 0)
    fused = ReplicaGradients(stacked, xent)
    vmapped = ReplicaGradients(reference, xent, fused=False)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    opt_f = torch.optim.SGD(stacked.parameters(), lr=0.1, momentum=0.9)
    opt_v = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = {"x": torch.randn(k, 8, *shape, generator=g), "y": torch.randint(0, 3, (k, 8), generator=g)}
        for opt in (opt_f, opt_v, *opts):
            opt.zero_grad()
        loss_f = fused(batch)
        loss_v = vmapped(batch)
        losses = []
        for i, m in enumerate(models):
            loss = xent(m, {"x": batch["x"][i], "y": batch["y"][i]})
            loss.backward()
            losses.append(loss.item())
        assert fused.path == "fused", fused.fused_reason
        assert fused._fused is not None and fused._fused.layout.length_first == (name in LENGTH_FIRST)
        assert loss_f.shape == (1, 1) and float(loss_f) == pytest.approx(sum(losses) / k, rel=1e-5)
        torch.testing.assert_close(loss_v.flatten(), torch.tensor(losses), rtol=1e-5, atol=1e-6)
        for i, m in enumerate(models):
            for pname, p, q in zip(stacked.param_names, stacked.stacked, reference.stacked):
                want = dict(m.named_parameters())[pname].grad
                torch.testing.assert_close(p.grad[i], want, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(q.grad[i], want, rtol=1e-4, atol=1e-5)
        for opt in (opt_f, opt_v, *opts):
            opt.step()
    for i, m in enumerate(models):
        for bname, b in zip(stacked.buffer_names, stacked.stacked_buffers()):
            want = dict(m.named_buffers())[bname]
            torch.testing.assert_close(b[i], want, rtol=1e-4, atol=1e-5)


def test_group_losses_are_each_groups_mean():
    models, stacked = perturbed(lambda: ConvNet1D(channels=4), 4, 2)
    grads = FusedGradients(
        stacked.module,
        4,
        stacked.param_names,
        list(stacked.stacked),
        stacked.buffer_names,
        stacked.stacked_buffers(),
        xent,
        groups=2,
    )
    batch = {"x": torch.randn(4, 5, 40), "y": torch.randint(0, 10, (4, 5))}
    losses = grads(batch).flatten()
    want = [xent(m, {"x": batch["x"][i], "y": batch["y"][i]}).item() for i, m in enumerate(models)]
    assert losses.tolist() == pytest.approx([(want[0] + want[1]) / 2, (want[2] + want[3]) / 2], rel=1e-5)


def test_modules_it_cannot_stack_are_named():
    assert unsupported(nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2))) == "0: Embedding holds tensors of its own"
    assert unsupported(nn.Sequential(nn.Linear(3, 2), nn.Flatten(0))) == "1: Flatten over dim 0"
    reflect = nn.Sequential(nn.Conv1d(1, 2, 3, padding=1, padding_mode="reflect"))
    assert unsupported(reflect) == "0: padding_mode='reflect'"
    assert unsupported(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))) == "1: LayerNorm holds tensors of its own"
    stacked = StackedModel(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), 2)
    grads = ReplicaGradients(stacked, xent)
    grads({"x": torch.randn(2, 4, 3), "y": torch.randint(0, 3, (2, 4))})
    assert grads.path == "vmap" and grads.fused_reason == "1: LayerNorm holds tensors of its own"


class MixesSamples(nn.Module):
    """Subtracts the batch mean: on the concatenated batch that mixes the replicas."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x - x.mean(0))


def summed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="sum")


@pytest.mark.parametrize(
    ("make", "loss"),
    [(MixesSamples, xent), (lambda: nn.Sequential(nn.Linear(3, 3)), summed)],
    ids=["forward-mixes-samples", "summed-loss"],
)
def test_first_batch_check_falls_back_to_vmap(make, loss, caplog):
    torch.manual_seed(0)
    stacked = StackedModel(make(), 2)
    reference = StackedModel(copy.deepcopy(stacked.module), 2)
    grads = ReplicaGradients(stacked, loss)
    batch = {"x": torch.randn(2, 4, 3), "y": torch.randint(0, 3, (2, 4))}
    with caplog.at_level("WARNING"):
        losses = grads(batch)
    assert grads.path == "vmap" and "fused path disagrees with vmap" in (grads.fused_reason or "")
    assert "fused path disagrees" in caplog.text
    want = ReplicaGradients(reference, loss, fused=False)(batch)
    torch.testing.assert_close(losses, want)
    for p, q in zip(stacked.stacked, reference.stacked):
        torch.testing.assert_close(p.grad, q.grad)


def test_dropout_draws_a_mask_per_replica():
    stacked = StackedModel(nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 2)), 2)
    grads = ReplicaGradients(stacked, xent)
    x = torch.randn(1, 8, 4).expand(2, 8, 4)  # the same data on identical replicas
    y = torch.randint(0, 2, (1, 8)).expand(2, 8)
    torch.manual_seed(0)
    grads({"x": x, "y": y})
    assert grads.path == "fused", grads.fused_reason  # the check runs with dropout off
    w = stacked.stacked[0].grad
    assert not torch.allclose(w[0], w[1])  # different masks
    zeros = (w == 0).all(dim=2).float().mean().item()  # a unit dropped for all 8 samples
    assert zeros < 0.2
