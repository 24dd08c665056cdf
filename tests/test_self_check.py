"""The safety nets around the rules: trace check, self-check, set-aside of failing rules.

Each net is shown to be load-bearing: a deliberately broken rule (monkeypatched into the one rules
table for one test) must be caught, never returned as a wrong model.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sqr_fx
from sqr_fx import EquivalenceError, SqrFxError, check_equivalence, minimize
from sqr_fx.rules import RULES
from sqr_fx.verify import compute_tolerance, derived_inputs, outputs_match


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        m[0].weight[1], m[0].bias[1] = 0, 0.5  # a constant unit: folded into the second layer
        m[0].weight[2], m[0].bias[2] = 0, -1.0  # a dead unit: relu(-1) = 0
    return m


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.fixture
def patched(monkeypatch):
    """Replace one family's analyze / rewrite for one test (the rules table is restored after)."""
    def patch(family: str, **fields):
        for r in {id(r): r for r in RULES.values() if r.family == family}.values():
            for k, v in fields.items():
                monkeypatch.setattr(r, k, v)
    return patch


def test_self_check_refuses_a_wrong_constant_fold(patched):
    """A pointwise rule that lies about relu(0.5) (claims 2.0) folds a wrong bias: caught."""
    from sqr_fx.rules import pointwise as pw

    def lying(node, A, a):
        out = pw.pointwise(node, A, a)
        if out is not None:
            out.value = out.value + 1.5 * out.const
        return out

    patched("pointwise", analyze=lying)
    m = _mlp()
    with pytest.raises(EquivalenceError, match="self-check failed on the example inputs"):
        minimize(m, (_x(5, 4),))
    wrong = minimize(m, (_x(5, 4),), verify=False)  # the unchecked result really is wrong
    with pytest.raises(EquivalenceError):
        check_equivalence(m, wrong, (_x(5, 4),))


def test_self_check_compares_other_batch_and_spatial_sizes():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        m[0].weight[1] = 0
    s = minimize(m, (_x(2, 3, 8, 8),))
    assert s.sqr_report.verified_on == ["the example inputs", "batch 3", "batch 1", "spatial size (40, 40)"]
    assert s.sqr_report.verify_seconds > 0
    assert "self-check passed" in str(s.sqr_report)


def test_derived_inputs_follow_the_example():
    ids, mask = torch.randint(0, 9, (2, 8)), torch.ones(2, 8)
    labels = dict(derived_inputs((ids, mask)))
    b_ids, b_mask = labels["batch 3"]
    assert b_ids.shape == (3, 8) and b_mask.shape == (3, 8) and torch.equal(b_ids[:2], ids)
    s_ids, s_mask = labels["size 6 on axis 1"]
    assert s_ids.shape == (2, 6) and s_mask.shape == (2, 6) and s_ids.dtype == ids.dtype
    assert set(s_ids.unique().tolist()) <= set(ids.unique().tolist())


def test_a_shape_the_original_refuses_is_skipped():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 2)

        def forward(self, x):  # only [N, 3, 2, 2]
            return self.fc(x.reshape(x.shape[0], 12))

    s = minimize(Fixed().eval(), (torch.randn(2, 3, 2, 2),))
    assert s.sqr_report.verified_on == ["the example inputs", "batch 3", "batch 1"]


def test_outputs_match_names_the_first_difference():
    a = (torch.ones(3), {"x": torch.zeros(2)})
    assert outputs_match(a, (torch.ones(3), {"x": torch.zeros(2)})) is None
    assert "output[1]['x']" in outputs_match(a, (torch.ones(3), {"x": torch.ones(2)}))
    assert "non-finite" in outputs_match((torch.tensor([float("nan")]),), (torch.tensor([0.0]),))
    assert "shape" in outputs_match((torch.ones(3),), (torch.ones(2),))


class _Float32Inside(nn.Module):
    """A float64 model that computes one step in float32 (Hugging Face's RMSNorm does ``x.float()``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4, dtype=torch.float64), nn.Linear(4, 2, dtype=torch.float64)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x).float()).double())


def test_self_check_tolerance_follows_the_least_precise_compute_dtype():
    """Exact means exact up to the rounding of the dtype the model computes in: float32 inside a float64
    model is compared at float32 tolerance, and a wrong result is still refused."""
    inputs = (_x(3, 4),)
    plain = sqr_fx.trace.to_graph(_mlp(), inputs)[0]
    mixed = sqr_fx.trace.to_graph(_Float32Inside().eval(), inputs)[0]
    assert compute_tolerance(plain) == 1e-7
    assert compute_tolerance(mixed) == 1e-4
    a = (torch.ones(3, dtype=torch.float64),)
    assert outputs_match(a, (a[0] + 1e-6,), floor=compute_tolerance(mixed)) is None
    assert outputs_match(a, (a[0] + 1e-6,)) is not None
    assert outputs_match(a, (a[0] + 1e-3,), floor=compute_tolerance(mixed)) is not None


def test_a_rewrite_that_raises_is_set_aside(patched):
    """The rule's rewrite raises: the round is redone with that node frozen, and the report says so."""
    def boom(node, R, a):
        raise IndexError("simulated")

    patched("linear", rewrite=boom)
    m = _mlp()
    s = minimize(m, (_x(5, 4),))
    check_equivalence(m, s, (_x(7, 4),), rtol=1e-12, atol=1e-12)
    assert any("simulated" in line for line in s.sqr_report.set_aside)
    with pytest.raises(SqrFxError, match="rule 'linear' failed to rewrite node"):
        minimize(m, (_x(5, 4),), strict=True)


def test_a_rewrite_that_breaks_the_graph_is_undone(patched):
    """The rewrite emits a graph that fails shape propagation: that round is undone, the nodes
    around the failure are kept as they are, and the result is still exact."""
    def narrowing(node, R, a):
        return R.graph.call_function(torch.narrow, (R.copy(node), 1, 0, 1))

    patched("flatten", rewrite=narrowing)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU(),
                      nn.Linear(5, 2)).double().eval()
    with torch.no_grad():
        m[3].weight[1], m[3].bias[1] = 0, -1.0
    s = minimize(m, (_x(2, 3, 8, 8),))
    check_equivalence(m, s, (_x(3, 3, 8, 8),), rtol=1e-12, atol=1e-12)
    assert any("failed at" in line for line in s.sqr_report.set_aside)


def test_an_analysis_that_raises_freezes_the_node(patched):
    def boom(node, A, a):
        raise KeyError("simulated")

    patched("pointwise", analyze=boom)
    m = _mlp()
    s = minimize(m, (_x(5, 4),))
    check_equivalence(m, s, (_x(7, 4),), rtol=1e-12, atol=1e-12)
    assert any("simulated" in op for op in s.sqr_report.frozen_ops)
    with pytest.raises(SqrFxError, match="rule 'pointwise' failed on node"):
        minimize(m, (_x(5, 4),), strict=True)


def test_a_trace_that_computes_another_function_falls_back_to_export():
    """symbolic_trace records ``h += 1`` out of place; the alias ``ident`` sees the add in torch."""
    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            h = self.a(x)
            ident = h
            h += 1
            return ident * 2

    m = Alias().double().eval()
    s = minimize(m, (_x(4, 3),))
    assert s.sqr_report.frontend == "export"
    check_equivalence(m, s, (_x(6, 3),), rtol=1e-12, atol=1e-12)


def test_keyword_arguments_are_normalized_to_one_layout():
    """``torch.add(input=a, other=b)`` reaches the binary rule as ``torch.add(a, b)``."""
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)
            with torch.no_grad():
                self.a.weight[0], self.b.weight[0] = 0, 0
                self.a.bias[0], self.b.bias[0] = 1.0, -1.0  # a + b = 0 there: foldable

        def forward(self, x):
            return self.c(torch.add(input=self.a(x), other=self.b(x)))

    m = Kw().double().eval()
    s = minimize(m, (_x(4, 3),))
    adds = [n for n in s.graph.nodes if n.target is torch.add]
    assert adds and all(not n.kwargs and len(n.args) == 2 for n in adds)
    assert s.sqr_report.params_after < s.sqr_report.params_before
    check_equivalence(m, s, (_x(6, 3),), rtol=1e-12, atol=1e-12)


def test_a_call_that_binds_to_no_schema_is_frozen_and_named_in_strict_mode():
    from sqr_fx.normalize import canonical
    from torch import fx

    g = fx.Graph()
    x = g.placeholder("x")
    node = g.call_function(torch.add, (x,), {"bogus": 1})
    assert canonical(node, nn.Module()) is None


def test_verify_false_skips_the_check():
    s = minimize(_mlp(), (_x(5, 4),), verify=False)
    assert s.sqr_report.verified_on == [] and s.sqr_report.verify_seconds == 0.0


def test_functional_relu_inplace_keyword():
    m = _mlp()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x):
            h = self.m[0](x)
            F.relu(h, inplace=True)
            return self.m[2](h)

    w = Wrap().eval()
    s = minimize(w, (_x(5, 4),))
    assert s.sqr_report.frontend == "fx" and s.sqr_report.params_after < s.sqr_report.params_before
    check_equivalence(w, s, (_x(7, 4),), rtol=1e-12, atol=1e-12)
    assert sqr_fx.minimize(s, (_x(5, 4),)).sqr_report.rounds == 0  # a fixpoint


def test_strict_mode_names_the_failed_precondition():
    """max_pool1d on a [N, C] tensor pools across the channels: outside the pool rule's precondition.
    Default: kept and listed in the report; strict: an error naming the node and the precondition."""
    class PoolFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(F.max_pool1d(self.a(x), 2))

    m = PoolFeatures().double().eval()
    s = minimize(m, (_x(4, 3),))
    assert any("unbatched" in d for d in s.sqr_report.declined)
    assert "preconditions" in str(s.sqr_report)
    with pytest.raises(sqr_fx.UnsupportedOpError, match=r"max_pool1d.*outside rule 'pool'.*rank 2"):
        minimize(m, (_x(4, 3),), strict=True)
