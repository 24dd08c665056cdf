"""Where minimize must NOT remove something (each guard fires), and where it must (each rule fires).

Every test checks both sides: the structure (what was or was not removed) and the outputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sqr_fx
from sqr_fx import check_equivalence, minimize


pytestmark = pytest.mark.usefixtures("float64_default")



def _same(m, s, *shapes):
    for shape in shapes:
        check_equivalence(m, s, (torch.randn(*shape),), rtol=1e-10, atol=1e-12)


def _width(gm, target):
    return dict(gm.named_parameters())[target].shape


class Head(nn.Module):
    """Linear -> relu -> Linear; hidden unit 0 made constant (zero row, bias 0.7)."""

    def __init__(self, out_is_hidden=False):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)
        self.out_is_hidden = out_is_hidden
        with torch.no_grad():
            self.a.weight[0] = 0
            self.a.bias[0] = 0.7

    def forward(self, x):
        h = F.relu(self.a(x))
        return h if self.out_is_hidden else self.b(h)


def test_constant_unit_is_folded_into_reader_bias():
    m = Head().eval()
    s = minimize(m, (torch.randn(2, 5),))
    assert _width(s, "a.weight") == (3, 5) and _width(s, "b.weight") == (3, 3)
    _same(m, s, (2, 5), (7, 5))


def test_guard_graph_output_keeps_its_shape():
    m = Head(out_is_hidden=True).eval()
    s = minimize(m, (torch.randn(2, 5),))
    assert _width(s, "a.weight") == (4, 5)  # constant unit 0 is returned: it stays
    _same(m, s, (3, 5))


class Residual(nn.Module):
    """Channel 0 is zero in branch a but live in branch b: the add couples them."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)
        with torch.no_grad():
            self.a.weight[0], self.a.bias[0] = 0, 0
            self.b.weight[1], self.b.bias[1] = 0, 0
            self.a.weight[1], self.a.bias[1] = 0, 0  # channel 1 is zero in BOTH branches

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def test_guard_residual_add_couples_channels():
    m = Residual().eval()
    s = minimize(m, (torch.randn(2, 4),))
    # channel 1 (dead in both branches) goes; channel 0 (live in b) stays
    assert _width(s, "a.weight") == (5, 4) and _width(s, "b.weight") == (5, 4)
    _same(m, s, (3, 4))


class PaddedConv(nn.Module):
    """Constant channel (zero conv row + bias) read by a zero-padded 3x3 conv."""

    def __init__(self, pool: nn.Module | None = None):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.pool = pool or nn.Identity()
        with torch.no_grad():
            self.c1.weight[2], self.c1.bias[2] = 0, 1.5

    def forward(self, x):
        return self.c2(self.pool(torch.sigmoid(self.c1(x))))


def test_constant_into_padded_conv_is_exact_at_every_resolution():
    m = PaddedConv().eval()
    s = minimize(m, (torch.randn(1, 3, 8, 8),), portable=False)
    assert _width(s, "c2.weight")[1] == 3
    assert any("ones_map" in str(n.target) for n in s.graph.nodes)  # the ones-map correction fired
    _same(m, s, (1, 3, 8, 8), (2, 3, 5, 11), (1, 3, 1, 1), (3, 3, 17, 4))


def test_guard_avg_pool_with_padding_makes_constants_static():
    m = PaddedConv(nn.AvgPool2d(3, 1, padding=1)).eval()  # borders average in zeros
    s = minimize(m, (torch.randn(1, 3, 8, 8),))
    assert _width(s, "c2.weight")[1] == 4
    _same(m, s, (2, 3, 6, 9))


def test_max_pool_keeps_constants_constant():
    m = PaddedConv(nn.MaxPool2d(2)).eval()
    s = minimize(m, (torch.randn(1, 3, 8, 8),))
    assert _width(s, "c2.weight")[1] == 3
    _same(m, s, (2, 3, 6, 10))


class SpatialSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.l = nn.Conv2d(2, 3, 1), nn.Linear(3, 2)
        with torch.no_grad():
            self.c.weight[0], self.c.bias[0] = 0, 2.0

    def forward(self, x):
        return self.l(self.c(x).sum((2, 3)))  # a constant summed over H*W depends on the size


def test_guard_sum_over_space_is_not_constant():
    m = SpatialSum().eval()
    s = minimize(m, (torch.randn(1, 2, 4, 4),))
    assert _width(s, "l.weight") == (2, 3)
    _same(m, s, (2, 2, 3, 7))


class NoRule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        with torch.no_grad():
            self.a.weight[0], self.a.bias[0] = 0, 1.0

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))  # mixes channels; no rule


def test_guard_op_without_rule_freezes_its_channels():
    m = NoRule().eval()
    s = minimize(m, (torch.randn(2, 3),))
    assert _width(s, "a.weight") == (4, 3)
    assert s.sqr_report.frozen_ops == ["cumsum"]
    _same(m, s, (5, 3))


def test_strict_mode_names_the_node():
    with pytest.raises(sqr_fx.UnsupportedOpError, match=r"cumsum.*torch\.cumsum"):
        minimize(NoRule().eval(), (torch.randn(2, 3),), strict=True)


class ReadsWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        with torch.no_grad():
            self.a.weight[0], self.a.bias[0] = 0, 0

    def forward(self, x):
        h = self.a(x)
        return h[:, 1:] * h.size(1)  # the channel count is part of the function


def test_guard_reading_the_channel_count_freezes():
    m = ReadsWidth().eval()
    s = minimize(m, (torch.randn(2, 3),))
    assert _width(s, "a.weight") == (4, 3)
    _same(m, s, (4, 3))


class Grouped(nn.Module):
    def __init__(self, whole_group: bool):
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            rows = [0, 1] if whole_group else [0]
            self.a.weight[rows], self.a.bias[rows] = 0, 0
            self.g.weight[rows], self.g.bias[rows] = 0, 0

    def forward(self, x):
        return self.b(self.g(self.a(x)))


def test_grouped_conv_removes_whole_groups_only():
    whole, part = Grouped(True).eval(), Grouped(False).eval()
    s_whole = minimize(whole, (torch.randn(1, 2, 5, 5),))
    s_part = minimize(part, (torch.randn(1, 2, 5, 5),))
    assert _width(s_whole, "g.weight") == (2, 2, 3, 3)
    assert _width(s_part, "g.weight") == (4, 2, 3, 3)  # guard: half a group cannot go
    _same(whole, s_whole, (2, 2, 7, 6))
    _same(part, s_part, (2, 2, 7, 6))


def test_unread_input_features_are_gathered_unless_disabled():
    m = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        m[0].weight[:, [1, 4]] = 0
    s = minimize(m, (torch.randn(2, 6),))
    assert _width(s, "0.weight") == (3, 4) and s.sqr_report.input_features_dropped == 2
    kept = minimize(m, (torch.randn(2, 6),), drop_inputs=False)
    assert _width(kept, "0.weight") == (3, 6)
    _same(m, s, (5, 6))
    _same(m, kept, (5, 6))


def test_training_mode_is_a_clear_error():
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(sqr_fx.TrainingModeError, match="model.eval"):
        minimize(m, (torch.randn(4, 3),))
    minimize(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), (torch.randn(4, 3),))  # no train-sensitive module


class Tied(nn.Module):
    """One Linear applied twice, its row 0 dead: slicing it for one call would break the other."""

    def __init__(self):
        super().__init__()
        self.l, self.head = nn.Linear(3, 3), nn.Linear(3, 2)
        with torch.no_grad():
            self.l.weight[0], self.l.bias[0] = 0, 0

    def forward(self, x):
        return self.head(self.l(torch.relu(self.l(x))))


def test_guard_tied_weights_are_kept_whole_and_stay_tied():
    m = Tied().eval()
    s = minimize(m, (torch.randn(2, 3),))
    assert _width(s, "l.weight") == (3, 3)
    assert sum(p.numel() for p in s.parameters()) == sum(p.numel() for p in m.parameters())
    _same(m, s, (4, 3))


def test_tied_weights_in_strict_mode_are_a_clear_error():
    with pytest.raises(sqr_fx.TiedWeightsError, match="l.weight"):
        minimize(Tied().eval(), (torch.randn(2, 3),), strict=True)


def test_tied_embedding_stays_one_parameter():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid = nn.Embedding(7, 4), nn.Linear(4, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight  # tied input/output embedding

        def forward(self, ids):
            return self.out(torch.relu(self.mid(self.emb(ids))))

    m = LM().eval()
    ids = torch.randint(0, 7, (2, 5))
    s = minimize(m, (ids,))
    assert len(list(s.parameters())) == 3  # emb/out weight once, mid weight and bias
    check_equivalence(m, s, (torch.randint(0, 7, (3, 9)),), rtol=1e-10, atol=1e-12)


def test_untraceable_model_is_a_clear_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(sqr_fx.TraceError, match="symbolic_trace.*export"):
        minimize(DataDependent().eval(), (torch.randn(2, 3),))


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(sqr_fx.UnsupportedDtypeError):
        minimize(nn.Linear(2, 2).eval(), (torch.randn(2, 2, dtype=torch.complex64),))


def test_input_is_never_mutated_and_output_owns_its_tensors():
    m = Head().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = minimize(m, (torch.randn(2, 5),))
    with torch.no_grad():
        for p in s.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert isinstance(m.a, nn.Linear) and not m.training


def test_inputs_that_do_not_fit_are_a_clear_error():
    with pytest.raises(sqr_fx.SqrFxError, match=r"does not run on example_inputs \(\(2, 7\)"):
        minimize(nn.Linear(3, 2).eval(), (torch.randn(2, 7),))


class InPlace(nn.Module):
    """relu_ overwrites h, which another reader also reads: h's recorded constant -1 is stale."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)
        with torch.no_grad():
            self.a.weight[0], self.a.bias[0] = 0, -1.0

    def forward(self, x):
        h = self.a(x)
        y = torch.relu_(h)
        return self.b(y) + self.c(h)


def test_in_place_op_on_a_shared_tensor_is_read_after_the_mutation():
    """The front end re-points c's read of h to relu_'s output (what torch computes): unit 0 is
    relu(-1) = 0 for both readers then, and goes; the stale -1 is never folded."""
    m = InPlace().eval()
    s = minimize(m, (torch.randn(2, 3),))
    assert _width(s, "a.weight") == (3, 3)
    _same(m, s, (5, 3))


def test_minimize_again_extends_its_own_input_gather():
    m = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        m[0].weight[:, 1] = 0
    s1 = minimize(m, (torch.randn(3, 6),))
    with torch.no_grad():  # a later cycle leaves original feature 3 unread as well
        dict(s1.named_parameters())["0.weight"][:, 2] = 0
    s2 = minimize(s1, (torch.randn(3, 6),))
    assert s2.sqr_report.input_features_dropped == 1
    assert [n.target for n in s2.graph.nodes].count(torch.index_select) == 1  # one gather, not a chain
    assert dict(s2.named_buffers())["sqr_fx_index_select_idx_1"].tolist() == [0, 2, 4, 5]
    _same(s1, s2, (5, 6))
    assert minimize(s2, (torch.randn(3, 6),)).sqr_report.rounds == 0  # a fixpoint
