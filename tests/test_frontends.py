"""Both front ends (symbolic_trace and torch.export), every mask form, and the result's own life
(export, jit, training) after minimize."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.nn.utils import parametrize, prune

from sqr_fx import check_equivalence, minimize


pytestmark = pytest.mark.usefixtures("float64_default")


def _cnn(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    with torch.no_grad():
        m[0].weight[[1, 5]] = 0          # constant channels after BN (beta - gamma*mean/std)
        m[0].bias[[1, 5]] = 0.3
        m[3].weight[:, 2] = 0            # channel 2 unread
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m.eval().to(dtype)


class ShapeBranch(nn.Module):
    """Python control flow on the rank: symbolic_trace fails, torch.export succeeds."""

    def __init__(self):
        super().__init__()
        self.net = _cnn()

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return self.net(x)


def test_symbolic_trace_front_end():
    m = _cnn()
    s = minimize(m, (torch.randn(2, 3, 16, 16),))
    assert s.sqr_report.frontend == "fx" and s.sqr_report.params_after < s.sqr_report.params_before
    for shape in [(2, 3, 16, 16), (5, 3, 9, 13)]:
        check_equivalence(m, s, (torch.randn(*shape),), rtol=1e-10, atol=1e-12)


def test_export_fallback_front_end_at_other_shapes():
    m = ShapeBranch().eval()
    s = minimize(m, (torch.randn(2, 3, 16, 16),))
    assert s.sqr_report.frontend == "export"
    assert s.sqr_report.params_after == minimize(m.net, (torch.randn(2, 3, 16, 16),)).sqr_report.params_after
    for shape in [(2, 3, 16, 16), (5, 3, 9, 13)]:
        check_equivalence(m, s, (torch.randn(*shape),), rtol=1e-10, atol=1e-12)


def test_graph_module_input_is_copied_not_retraced():
    gm = torch.fx.symbolic_trace(_cnn())
    code = gm.code
    s = minimize(gm, (torch.randn(1, 3, 8, 8),))
    assert gm.code == code
    check_equivalence(gm, s, (torch.randn(2, 3, 12, 12),), rtol=1e-10, atol=1e-12)


def test_aten_graph_from_torch_export_is_accepted():
    m = _cnn()
    gm = torch.export.export(m, (torch.randn(2, 3, 16, 16),)).module()
    s = minimize(gm, (torch.randn(2, 3, 16, 16),))
    assert s.sqr_report.params_after < s.sqr_report.params_before
    check_equivalence(m, s, (torch.randn(2, 3, 16, 16),), rtol=1e-10, atol=1e-12)


def test_torch_nn_utils_prune_masks():
    m = _cnn()
    prune.l1_unstructured(m[8], "weight", amount=0.5)
    prune.ln_structured(m[3], "weight", amount=0.5, n=2, dim=0)  # whole output channels
    before = copy.deepcopy(m.state_dict())
    s = minimize(m, (torch.randn(1, 3, 8, 8),))
    assert hasattr(m[3], "weight_mask") and m.state_dict().keys() == before.keys()  # input untouched
    assert not any("mask" in k or "orig" in k for k in s.state_dict())
    assert s.sqr_report.params_after < s.sqr_report.params_before
    check_equivalence(m, s, (torch.randn(3, 3, 10, 10),), rtol=1e-10, atol=1e-12)


class _Mask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def test_parametrize_masks():
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double().eval()
    mask = torch.ones(5, 6, dtype=torch.float64)
    mask[[0, 3]] = 0
    parametrize.register_parametrization(m[0], "weight", _Mask(mask))
    with torch.no_grad():
        m[0].bias[[0, 3]] = 0.0
    s = minimize(m, (torch.randn(2, 6, dtype=torch.float64),))
    assert dict(s.named_parameters())["0.weight"].shape == (3, 6)
    assert parametrize.is_parametrized(m[0])
    check_equivalence(m, s, (torch.randn(4, 6, dtype=torch.float64),), rtol=1e-10, atol=1e-12)


def test_result_exports_scripts_and_trains():
    m = _cnn()
    x = torch.randn(2, 3, 16, 16)
    s = minimize(m, (x,))
    ep = torch.export.export(s, (x,)).module()
    check_equivalence(m, ep, (x,), rtol=1e-10, atol=1e-12)
    with pytest.warns(Warning):  # jit.trace is deprecated upstream, but users still call it
        tr = torch.jit.trace(s, (x,))
    check_equivalence(m, tr, (x,), rtol=1e-10, atol=1e-12)
    s.train()
    opt = torch.optim.SGD(s.parameters(), lr=0.1)
    loss = s(x).square().mean()
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in s.parameters())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_lower_precision_has_its_own_tolerance(dtype, tol):
    m = _cnn(dtype)
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    s = minimize(m, (x,))
    assert next(s.parameters()).dtype == dtype
    check_equivalence(m, s, (x,), rtol=tol, atol=tol)


def _same_copy(a, b, path="model"):
    """``b`` is a deep copy of ``a`` as ``copy.deepcopy`` makes it: same types and state, nothing shared
    (a GraphModule has a class of its own per instance: the same base)."""
    assert type(a) is type(b) or (isinstance(a, fx.GraphModule) and type(a).__bases__ == type(b).__bases__), path
    if isinstance(a, nn.Module):
        assert a is not b and list(vars(a)) == list(vars(b)), path
        for k in vars(a):
            _same_copy(vars(a)[k], vars(b)[k], f"{path}.{k}")
    elif isinstance(a, dict):
        assert a is not b and list(a) == list(b), path
        for k in a:
            _same_copy(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b) and (a is not b or isinstance(a, tuple)), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_copy(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr() and type(a) is type(b), path
    elif isinstance(a, (set, int, float, str, bool, type(None), torch.dtype, torch.device)):
        assert a == b, path


def test_the_private_copy_is_a_deep_copy():
    """``trace.deepcopy_modules`` copies plain modules without ``copy``'s generic path: the same tree as
    ``copy.deepcopy`` (types, every attribute, hooks, aliasing between modules and tables), sharing nothing
    mutable with the original; classes that customise copying (a parametrized layer, a GraphModule) go
    through ``copy.deepcopy`` itself."""
    from sqr_fx.trace import deepcopy_modules

    class Mask(nn.Module):
        def forward(self, w):
            return w * 1.0

    shared = nn.Linear(3, 3)
    m = nn.Sequential(shared, nn.ReLU(), shared, nn.BatchNorm1d(3), torchvision.models.resnet18(num_classes=3))
    m.notes = {"calls": [1, 2]}
    m.also = m.notes  # one dict under two names
    m[1].register_forward_hook(lambda mod, i, o: o)
    parametrize.register_parametrization(m[3], "weight", Mask())
    m.traced = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3)))
    ref, got = copy.deepcopy(m), deepcopy_modules(m, {})
    _same_copy(ref, got)
    assert got[0] is got[2] and got.notes is got.also and got.notes is not m.notes
    assert len(got[1]._forward_hooks) == 1 and got[1]._forward_hooks is not m[1]._forward_hooks
    assert type(got[3]) is type(m[3]) and parametrize.is_parametrized(got[3], "weight")
    got.notes["calls"].append(3)
    got[1]._forward_pre_hooks[0] = print
    assert m.notes == {"calls": [1, 2]} and not m[1]._forward_pre_hooks
    x = torch.randn(2, 3)
    torch.testing.assert_close(got.traced(x), m.traced(x))
