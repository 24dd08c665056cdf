"""Weights computed in forward from parameters only are folded into plain tensors, so their layers
minimize like any other; expressions that would make the model grow (a table built from a small
buffer) stay computed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqr_fx import check_equivalence, count_stored_floats, minimize
from sqr_fx.constfold import fold_constants


def _x(*s, seed=0):
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Computed(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.register_buffer("mask", torch.ones(6, 3, 3, 3))
        self.W = nn.Parameter(torch.randn(6, 4))  # used transposed: [in=6, out=4]
        self.out = nn.Linear(4, 2)
        with torch.no_grad():
            self.mask[1] = 0          # output channel 1 is dead: relu(0 - 1) = 0
            self.W[3] = 0             # input 3 of the linear unread
        self.b = nn.Parameter(-torch.ones(6))

    def weight(self):
        if self.form == "masked":
            return self.w * self.mask
        w = self.w * self.mask  # weight standardization (timm StdConv2d's formula), per output channel
        m = w.mean(dim=(1, 2, 3), keepdim=True)
        v = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - m) / torch.sqrt(v + 1e-5)

    def forward(self, x):
        h = torch.relu(F.conv2d(x, self.weight(), self.b)).mean((2, 3))
        return self.out(F.linear(h, self.W.t()))


@pytest.mark.parametrize("form", ["masked", "standardized"])
def test_computed_weights_minimize(form):
    m = Computed(form).double().eval()
    s = minimize(m, (_x(2, 3, 8, 8),))
    assert s.sqr_report.params_after < s.sqr_report.params_before
    assert not s.sqr_report.declined
    check_equivalence(m, s, (_x(3, 3, 10, 9, seed=1),), rtol=1e-10, atol=1e-12)
    assert minimize(s, (_x(2, 3, 8, 8),)).sqr_report.rounds == 0


def test_an_expression_that_would_grow_the_model_stays_computed():
    """A rotary table [T, D] from a [D/2] inv_freq buffer: folding would store more floats."""
    class Rope(nn.Module):
        def __init__(self):
            super().__init__()
            # parameters (symbolic_trace evaluates buffer-only expressions itself, into a traced constant)
            self.inv_freq = nn.Parameter(1.0 / (10000 ** (torch.arange(0, 8, 2).double() / 8)), requires_grad=False)
            self.pos = nn.Parameter(torch.arange(16).double(), requires_grad=False)
            self.q = nn.Linear(8, 8)

        def forward(self, x):
            ang = torch.outer(self.pos, self.inv_freq)
            return self.q(x) * torch.cat([ang.cos(), ang.sin()], -1)

    m = Rope().double().eval()
    gm = torch.fx.symbolic_trace(m)
    assert fold_constants(gm) == 0
    s = minimize(m, (_x(2, 16, 8),))
    assert count_stored_floats(s) <= count_stored_floats(m)
    check_equivalence(m, s, (_x(3, 16, 8, seed=2),), rtol=1e-10, atol=1e-12)


def test_random_and_in_place_expressions_are_never_folded():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return F.linear(x, self.w + 0 * torch.randn_like(self.w))

    gm = torch.fx.symbolic_trace(Noisy())
    assert fold_constants(gm) == 0


def test_a_buffer_table_sliced_at_every_use_is_counted_once():
    """symbolic_trace evaluates a buffer-only expression into a ``_tensor_constant`` per use (timm eva02's
    RoPE sin/cos, 48 views of one table): the result stores the views of one storage once, and the size
    report counts them once (it grew 0.88x on eva02 when each view was counted)."""
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.randn(16, 8, dtype=torch.float64))
            self.fc = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

        def forward(self, x):
            for fc in self.fc:
                sin, cos = self.table.tensor_split(2, -1)
                x = fc(x * cos + x * sin)
            return x

    m = Blocks().double().eval()
    gm = torch.fx.symbolic_trace(m)
    assert sum(n.op == "get_attr" and n.target.startswith("_tensor_constant") for n in gm.graph.nodes) >= 4
    s = minimize(m, (_x(2, 16, 4),))
    assert count_stored_floats(s) <= count_stored_floats(m)
    assert s.sqr_report.floats_after <= s.sqr_report.floats_before
    check_equivalence(m, s, (_x(3, 16, 4, seed=2),), rtol=1e-10, atol=1e-12)


class TwoRegions(nn.Module):
    """A qkv-style bias ``cat(q_bias, zero k_bias buffer, v_bias)`` (EVA) folds; a table expanded from a small
    buffer in the same model would grow and stays computed: regions are decided one by one."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
        self.register_buffer("k_bias", torch.zeros(2), persistent=False)
        self.freq = nn.Parameter(torch.randn(6))

    def forward(self, x):
        table = self.freq.expand(5, 6).cos()  # 30 floats from 6: folding it would grow the model
        y = F.linear(x, self.lin.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        return y * table


def test_each_region_is_folded_on_its_own():
    m = TwoRegions().double().eval()
    gm = torch.fx.symbolic_trace(m)
    assert fold_constants(gm) == 1
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.cat not in targets and torch.Tensor.cos not in targets
    assert any(n.op == "call_method" and n.target == "cos" for n in gm.graph.nodes)  # the table stays computed
    x = _x(5, 4)
    torch.testing.assert_close(gm(x), m(x))
