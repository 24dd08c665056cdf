"""prune(): exact zeros, exactly the smallest magnitudes, the right count; keep_zeros() holds them."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import sqr_fx
from sqr_fx.prune import keep_zeros, make_prune_permanent, prunable_parameters, prune, weight_sparsity


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 15), nn.ReLU(), nn.Linear(15, 4))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in prunable_parameters(model).items()}


def test_selects_weight_matrices_only():
    class WithScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.LayerNorm(4)
            self.layer_scale = nn.Parameter(torch.ones(4, 1, 1))  # ndim 3 but not a weight

        def forward(self, x):
            return self.layer_scale * self.conv(x)

    assert list(prunable_parameters(WithScale())) == ["conv.weight"]


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.75, 1.0])
def test_global_prunes_exact_count_of_smallest(amount):
    model = _mlp()
    before = _weights(model)
    biases = [model[i].bias.detach().clone() for i in (0, 2, 4)]
    report = prune(model, amount, "global")
    after = _weights(model)
    total = sum(t.numel() for t in before.values())
    assert report.zeros_after == round(amount * total) == sum(int((t == 0).sum()) for t in after.values())
    zeroed = torch.cat([b[a == 0].abs() for b, a in zip(before.values(), after.values())])
    kept = torch.cat([b[a != 0].abs() for b, a in zip(before.values(), after.values())])
    if zeroed.numel() and kept.numel():
        assert zeroed.max() <= kept.min()  # one global threshold
    for b, a in zip(before.values(), after.values()):  # survivors are untouched, bit for bit
        assert torch.equal(a[a != 0], b[a != 0])
    for i, b in zip((0, 2, 4), biases):
        assert torch.equal(model[i].bias, b)


def test_layer_scope_prunes_each_tensor_separately():
    model = _mlp()
    before = _weights(model)
    report = prune(model, 0.5, "layer")
    for t, (name, b) in zip(report.tensors, before.items()):
        a = dict(model.named_parameters())[name]
        assert t.zeros_after == round(0.5 * b.numel())
        assert b[a == 0].abs().max() <= b[a != 0].abs().min()
        assert t.threshold == pytest.approx(float(b[a == 0].abs().max()))


def test_amount_applies_to_remaining_nonzeros():
    model = _mlp()
    prune(model, 0.5)
    report = prune(model, 0.5)
    total = report.total
    first = round(0.5 * total)
    assert report.zeros_after == first + round(0.5 * (total - first))
    assert weight_sparsity(model) == pytest.approx(report.sparsity)


def test_existing_torch_prune_masks_are_kept_and_made_permanent():
    model = _mlp()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.6)
    torch_prune.l1_unstructured(model[0], "weight", amount=0.2)  # a PruningContainer now
    masked = model[0].weight.detach().clone()
    prune(model, 0.1, "layer")
    assert not hasattr(model[0], "weight_orig") and not hasattr(model[0], "weight_mask")
    assert isinstance(model[0].weight, nn.Parameter) and not model[0]._forward_pre_hooks
    w = model[0].weight
    assert bool((w[masked == 0] == 0).all())  # the user's zeros stay zero
    assert int((w == 0).sum()) == int((masked == 0).sum()) + round(0.1 * int((masked != 0).sum()))
    assert make_prune_permanent(model) == []  # nothing left to fold


def test_prunes_minimized_graph_module_by_parameter_name():
    model = _mlp().eval()
    prune(model, 0.9)
    x = torch.randn(16, 20)
    small = sqr_fx.minimize(model, (x,))
    names = list(prunable_parameters(small))
    assert names and all(n.endswith("weight") for n in names)
    report = prune(small, 0.5)
    assert report.total == sum(p.numel() for p in prunable_parameters(small).values())
    assert report.zeros_after == sum(t.zeros_before for t in report.tensors) + round(
        0.5 * sum(t.numel - t.zeros_before for t in report.tensors))


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_keep_zeros_holds_exact_zeros_through_training(opt):
    model = _mlp()
    prune(model, 0.8)
    zeros = {n: p == 0 for n, p in prunable_parameters(model).items()}
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2)}[opt]
    gen = torch.Generator().manual_seed(0)
    with keep_zeros(model) as masks:
        optimizer = make(model.parameters())
        for _ in range(5):
            loss = model(torch.randn(8, 20, generator=gen)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            for n, p in prunable_parameters(model).items():  # gradients are masked, not just weights
                assert bool((p.grad[zeros[n]] == 0).all())
            optimizer.step()
    assert all(torch.equal(masks[n], ~zeros[n]) for n in zeros)
    for n, p in prunable_parameters(model).items():
        assert bool((p[zeros[n]] == 0).all()) and bool((p[~zeros[n]] != 0).all())
        assert not p._backward_hooks  # hooks removed on exit


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        prune(_mlp(), 1.5)
    with pytest.raises(ValueError):
        prune(_mlp(), 0.5, scope="block")
    with pytest.raises(KeyError):
        prune(_mlp(), 0.5, weights=["nope.weight"])
