"""The masking helpers: exact zeros where promised, nothing else touched, input never mutated."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sqr_fx.masking import (
    global_magnitude_mask,
    plant_dead_units,
    prunable_weights,
    randomize_norm_stats,
    sparsity,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
    ).eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9])
def test_global_magnitude_hits_target_and_removes_smallest(target):
    model = _net()
    before = _state(model)
    masked = global_magnitude_mask(model, target)
    _assert_unchanged(model, before)  # input never mutated
    assert masked is not model
    total = sum(w.tensor.numel() for w in prunable_weights(model))
    assert sparsity(masked) == pytest.approx(round(target * total) / total, abs=1e-9)
    # every surviving weight is at least as large as every removed one
    removed, kept = [], []
    for w0, w1 in zip(prunable_weights(model), prunable_weights(masked)):
        z = w1.tensor == 0
        removed.append(w0.tensor[z].abs())
        kept.append(w0.tensor[~z].abs())
        assert torch.equal(w1.tensor[~z], w0.tensor[~z])  # kept weights keep their values
    removed, kept = torch.cat(removed), torch.cat(kept)
    if removed.numel() and kept.numel():
        assert removed.max() <= kept.min()
    # plain tensors, no torch.nn.utils.prune re-parametrization left behind
    names = {n for n, _ in masked.named_parameters()} | {n for n, _ in masked.named_buffers()}
    assert not any(n.endswith(("_orig", "_mask")) for n in names)
    # biases and norm layers untouched
    for k, v in masked.state_dict().items():
        if not k.endswith("weight") or k.startswith("1."):
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("target", [0.3, 0.7])
def test_global_magnitude_matches_torch_prune(target, dtype):
    """The reference framework: prune.global_unstructured + prune.remove zeroes the same weights."""
    model = _net().to(dtype)
    ours = global_magnitude_mask(model, target)
    ref = copy.deepcopy(model)
    params = [(w.module, w.weight) for w in prunable_weights(ref)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=target)
    for module, attr in params:
        prune.remove(module, attr)
    for a, b in zip(prunable_weights(ours), prunable_weights(ref)):
        assert torch.equal(a.tensor, b.tensor), a.name


def test_global_magnitude_existing_zeros_count():
    """Zeros already present (dead units) count towards the target; above it, nothing more goes."""
    dead = plant_dead_units(_net(), 0.5, torch.Generator().manual_seed(3))
    s0 = sparsity(dead)
    assert sparsity(global_magnitude_mask(dead, s0 / 2)) == pytest.approx(s0)
    total = sum(w.tensor.numel() for w in prunable_weights(dead))
    assert sparsity(global_magnitude_mask(dead, 0.9)) == pytest.approx(round(0.9 * total) / total)


def test_global_magnitude_rejects_bad_sparsity():
    with pytest.raises(ValueError):
        global_magnitude_mask(_net(), 1.0)


def test_plant_dead_units_rows_are_constant_and_columns_unread():
    model = randomize_norm_stats(_net(), torch.Generator().manual_seed(1))
    before = _state(model)
    dead = plant_dead_units(model, 0.5, torch.Generator().manual_seed(2))
    _assert_unchanged(model, before)
    for w in prunable_weights(dead):
        t, b = w.tensor, w.bias_tensor
        flat = t.reshape(t.shape[0], -1)
        zero_rows = (flat == 0).all(dim=1)
        assert 0 < int(zero_rows.sum()) < t.shape[0]  # some killed, one at least alive
        if b is not None:
            assert (b[zero_rows] == 0).all()  # killed rows lost their bias too
        # a killed input channel is unread by every output row of its group
        n_in_g = t.shape[1]
        out_g = t.shape[0] // w.groups
        unread = 0
        for c in range(n_in_g * w.groups):
            g, local = divmod(c, n_in_g)
            unread += bool((t[g * out_g:(g + 1) * out_g, local] == 0).all())
        assert unread >= 1


def test_plant_dead_units_same_seed_same_mask_and_function_of_dead_row():
    model = randomize_norm_stats(_net(), torch.Generator().manual_seed(1))
    a = plant_dead_units(model, 0.4, torch.Generator().manual_seed(7))
    b = plant_dead_units(model, 0.4, torch.Generator().manual_seed(7))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # a killed row of the first conv is constant after BatchNorm (a non-zero constant,
    # since the statistics look trained): exactly what minimize() must fold
    rows = (a[0].weight.reshape(8, -1) == 0).all(dim=1)
    x = torch.randn(4, 3, 10, 10)
    y = a[1](a[0](x))[:, rows]
    assert torch.equal(y, y[:1, :, :1, :1].expand_as(y))
    assert (y != 0).any()


def test_plant_dead_units_exclusions():
    model = _net()
    dead = plant_dead_units(model, 0.5, torch.Generator().manual_seed(0),
                            exclude_rows=["7"], exclude_columns=["3"], exclude=["0"])
    assert torch.equal(dead[0].weight, model[0].weight)  # excluded entirely
    assert not (dead[3].weight == 0).all(dim=0).all(dim=(1, 2)).any()  # every input read
    assert (dead[3].weight == 0).reshape(8, -1).all(dim=1).any()  # but dead rows
    head = dead[7].weight
    assert not (head == 0).all(dim=1).any()  # no dead logits
    assert (head == 0).all(dim=0).any()  # but unread inputs


def test_multihead_attention_in_proj_is_prunable():
    mha = nn.MultiheadAttention(16, 4)
    names = [(w.name, w.weight) for w in prunable_weights(mha)]
    assert ("", "in_proj_weight") in names and ("out_proj", "weight") in names
    masked = global_magnitude_mask(mha, 0.5)
    assert (masked.in_proj_weight == 0).any()


class Conv1D(nn.Module):
    """The layout of Hugging Face's ``transformers.pytorch_utils.Conv1D``: ``x @ W + b``, ``W`` is [in, out]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def test_hugging_face_conv1d_is_prunable_with_rows_as_output_units():
    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(12, 6), nn.ReLU(), Conv1D(5, 12))
    ws = list(prunable_weights(net))
    assert [(w.name, w.transposed) for w in ws] == [("0", True), ("2", True)]
    assert ws[0].matrix.shape == (12, 6)  # [out, in]
    dead = plant_dead_units(net, 0.5, torch.Generator().manual_seed(1))
    w0 = dead[0].weight
    rows = (w0 == 0).all(dim=0)  # an output unit of a Conv1D is a column of the stored tensor
    assert int(rows.sum()) == 6 and (dead[0].bias[rows] == 0).all()
    assert int((w0 == 0).all(dim=1).sum()) == 3  # input units: rows of the stored tensor
    x = torch.randn(4, 6)
    assert torch.equal(dead[0](x)[:, rows], torch.zeros(4, 6))  # dead units output exactly 0
    masked = global_magnitude_mask(net, 0.5)
    assert sparsity(masked) == pytest.approx(0.5, abs=0.02)


def test_randomize_norm_stats_is_a_copy():
    model = _net()
    before = _state(model)
    out = randomize_norm_stats(model, torch.Generator().manual_seed(0))
    _assert_unchanged(model, before)
    assert (out[1].bias != 0).all() and not torch.equal(out[1].running_mean, model[1].running_mean)
    assert copy.deepcopy(out)[1].running_var.min() >= 0.5
