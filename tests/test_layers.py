"""Compensated norms: equal to the full-width norm on the kept channels (float64 properties),
as accurate as PyTorch's own norms in float32/bfloat16, train only gamma/beta, and survive
state_dict, FX tracing, torch.export and TorchScript."""
from __future__ import annotations

import doctest
import io
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sqr_fx.layers as layers
from sqr_fx.layers import (
    CompensatedGroupNorm,
    CompensatedLayerNorm,
    CompensatedRMSNorm,
    compensated_layer_norm,
    removed_stats,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")
F64 = torch.float64
KINDS = ["layer", "rms", "group"]

# Removed constants: zero, small, large and everything between (float32-representable).
CONSTS = st.one_of(
    st.just(0.0),
    st.sampled_from([1.0, -1.0, 100.0, -100.0, 1000.0]),
    st.floats(-1e3, 1e3, allow_nan=False, width=32),
)


class Case(NamedTuple):
    ref: nn.Module        # the original norm, full width
    comp: nn.Module       # its compensated replacement
    x_full: torch.Tensor  # input whose removed channels hold their constants
    kept: torch.Tensor    # kept channel indices, in the replacement's channel order
    dim: int              # channel dim


def _randomize(module: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _build(kind: str, n: int, keep: torch.Tensor, kept: list[int], removed: list[int], values: torch.Tensor,
           shape: tuple[int, ...], *, affine: bool = True, bias: bool = True, eps: float | None = 1e-5,
           groups: int = 1, offset: float = 0.0, seed: int = 0, dtype: torch.dtype = F64) -> Case:
    g = torch.Generator().manual_seed(seed)
    if kind == "layer":
        ref = nn.LayerNorm(n, eps=eps, elementwise_affine=affine, bias=bias, dtype=dtype)
    elif kind == "rms":
        ref = nn.RMSNorm(n, eps=eps, elementwise_affine=affine, dtype=dtype)
    else:
        ref = nn.GroupNorm(groups, n, eps=eps, affine=affine, dtype=dtype)
    _randomize(ref, g)
    dim = 1 if kind == "group" else -1
    x = offset + torch.randn(shape, generator=g, dtype=F64)
    x.movedim(dim, -1)[..., removed] = values  # writes through the view: removed channels are constant
    make = {"layer": CompensatedLayerNorm.from_layernorm, "rms": CompensatedRMSNorm.from_rmsnorm,
            "group": CompensatedGroupNorm.from_groupnorm}[kind]
    return Case(ref, make(ref, keep, values.to(dtype)), x.to(dtype), torch.tensor(kept), dim)


def _fixed(kind: str, *, const: float = 3.0, offset: float = 0.0, dtype: torch.dtype = F64) -> Case:
    """8 channels, keep {0,2,3,6,7}; for GroupNorm(4, 8) group 2 loses both its channels."""
    n, kept, removed = 8, [0, 2, 3, 6, 7], [1, 4, 5]
    values = torch.tensor([const, offset - const / 2, offset], dtype=F64)
    shape = (2, n, 3, 2) if kind == "group" else (2, 3, n)
    return _build(kind, n, torch.tensor(kept), kept, removed, values, shape, groups=4, offset=offset,
                  dtype=dtype)


def _kept_out(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(replacement on the kept input, original on the full input restricted to the kept channels)."""
    return case.comp(case.x_full.index_select(case.dim, case.kept)), case.ref(case.x_full).index_select(
        case.dim, case.kept)


@st.composite
def cases(draw: st.DrawFn, kind: str) -> Case:
    groups, size = (draw(st.integers(1, 3)), draw(st.integers(1, 4))) if kind == "group" else (1, 0)
    n = groups * size if kind == "group" else draw(st.integers(1, 16))
    mask = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
    kept = [i for i, m in enumerate(mask) if m]
    removed = [i for i, m in enumerate(mask) if not m]
    values = torch.tensor(draw(st.lists(CONSTS, min_size=len(removed), max_size=len(removed))), dtype=F64)
    if draw(st.booleans()):
        keep = torch.tensor(mask)
    else:
        kept = draw(st.permutations(kept))  # the replacement's channels follow the order of `keep`
        keep = torch.tensor(kept, dtype=torch.long)
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=3)))
    if kind == "group":
        batch, spatial = (lead[0] if lead else 2), lead[1:]
        if size == 1 and all(s == 1 for s in spatial):
            spatial = (*spatial, 2)  # nn.GroupNorm refuses groups of one value
        shape = (batch, n, *spatial)
    else:
        shape = (*lead, n)
    eps_choices = [None, 1e-6, 1e-2] if kind == "rms" else [1e-5, 1e-2]
    return _build(kind, n, keep, kept, removed, values, shape, affine=draw(st.booleans()),
                  bias=draw(st.booleans()), eps=draw(st.sampled_from(eps_choices)), groups=groups,
                  offset=draw(st.sampled_from([0.0, 5.0, 100.0])), seed=draw(st.integers(0, 2**16)))


# ---------------------------------------------------------------------------------------------
# Exactness (float64 properties)

@pytest.mark.parametrize("kind", KINDS)
@settings(deadline=None)
@given(data=st.data())
def test_matches_full_norm_on_kept_channels(kind: str, data: st.DataObject) -> None:
    case = data.draw(cases(kind))
    got, want = _kept_out(case)
    assert got.dtype == F64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_plain_layernorm_over_kept_channels_is_wrong() -> None:
    # N = 2, channel 1 constant 0: the full LN maps x0 to ~sign(x0); LayerNorm(1) maps it to 0.
    x = torch.tensor([[3.0, 0.0], [-2.0, 0.0]], dtype=F64)
    full = nn.functional.layer_norm(x, (2,))[:, :1]
    torch.testing.assert_close(full, torch.tensor([[1.0], [-1.0]], dtype=F64), rtol=0, atol=1e-5)
    assert torch.equal(nn.functional.layer_norm(x[:, :1], (1,)), torch.zeros(2, 1, dtype=F64))
    zero = torch.tensor(0.0, dtype=F64)
    torch.testing.assert_close(compensated_layer_norm(x[:, :1], None, None, 2, zero, zero), full,
                               rtol=1e-15, atol=1e-15)


def test_removed_layernorm_output_varies_unless_gamma_is_zero() -> None:
    # Why the rewrite may drop LN output j only when no reader needs it or gamma_j == 0.
    case = _fixed("layer")
    y = case.ref(case.x_full).reshape(-1, 8)
    assert (y[:, 1].std() > 1e-3).item()  # input channel 1 is constant, its output is not
    with torch.no_grad():
        case.ref.weight[1] = 0.0
    y = case.ref(case.x_full).reshape(-1, 8)
    assert torch.equal(y[:, 1], case.ref.bias[1].detach().expand(y.shape[0]))


def test_removed_stats_is_two_pass() -> None:
    v = torch.tensor([1e8 + 1.0, 1e8 + 2.0, 1e8 + 3.0], dtype=F64)
    mean, m2 = removed_stats(v)
    assert mean.item() == 1e8 + 2.0 and m2.item() == 2.0  # sum(v^2) - n mean^2 would give garbage


# ---------------------------------------------------------------------------------------------
# Precision

def _naive_s1_s2(x: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The uncentred formula var = (sum_K d^2 + S2 - 2 mu S1 + r mu^2) / N, in float32."""
    s1, s2, r = values.sum().float(), (values**2).sum().float(), values.numel()
    mu = (x.sum(-1, keepdim=True) + s1) / n
    d = x - mu
    return d * torch.rsqrt(((d * d).sum(-1, keepdim=True) + s2 - 2 * mu * s1 + r * mu * mu) / n + 1e-5)


@pytest.mark.parametrize(("x_offset", "c_offset", "c_spread"),
                         [(0.0, 0.0, 1.0), (0.0, 100.0, 0.0), (0.0, 100.0, 1.0), (0.0, 1000.0, 10.0),
                          (100.0, 100.0, 1.0)])
def test_float32_layernorm_tracks_torch(x_offset: float, c_offset: float, c_spread: float) -> None:
    g = torch.Generator().manual_seed(0)
    n, r = 64, 32
    values = (c_offset + c_spread * torch.randn(r, generator=g, dtype=F64)).float().double()
    x = (x_offset + torch.randn(256, n - r, generator=g, dtype=F64)).float().double()
    full = torch.cat([x, values.expand(256, r)], -1)
    exact = nn.functional.layer_norm(full, (n,))[:, : n - r]
    torch32 = nn.functional.layer_norm(full.float(), (n,))[:, : n - r]
    ours = CompensatedLayerNorm.from_layernorm(nn.LayerNorm(n), torch.arange(n - r), values.float())(x.float())
    err_torch, err_ours = (torch32.double() - exact).abs().max(), (ours.double() - exact).abs().max()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)
    assert (ours - torch32).abs().max() <= 3e-5
    if x_offset == c_offset == 100.0:  # clustered around 100: the uncentred S1/S2 form cancels
        assert (_naive_s1_s2(x.float(), values, n).double() - exact).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_float32_matches_torch_with_large_constants(kind: str, offset: float) -> None:
    case64 = _fixed(kind, const=100.0, offset=offset)
    case32 = _fixed(kind, const=100.0, offset=offset, dtype=torch.float32)
    exact = _kept_out(case64)[1]
    got, torch32 = _kept_out(case32)
    assert got.dtype == torch.float32
    err_torch, err_ours = (torch32.double() - exact).abs().max(), (got.double() - exact).abs().max()
    assert err_ours <= 2 * err_torch + 2e-6, (err_ours, err_torch)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("module_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_input(kind: str, module_dtype: torch.dtype) -> None:
    case = _fixed(kind, const=100.0)
    exact = _kept_out(case)[1]
    case.ref.to(module_dtype)
    case.comp.to(module_dtype)
    for name, buf in case.comp.named_buffers():
        if buf.is_floating_point():  # statistics never drop below float32
            assert buf.dtype == torch.float32, name
    xb = case.x_full.bfloat16()
    got = case.comp(xb.index_select(case.dim, case.kept))
    torch_bf16 = case.ref(xb).index_select(case.dim, case.kept)
    assert got.dtype == torch.bfloat16
    err_torch, err_ours = (torch_bf16.double() - exact).abs().max(), (got.double() - exact).abs().max()
    scale = exact.abs().max()
    assert err_ours <= err_torch + scale * 2**-8, (err_ours, err_torch)


def test_statistics_stay_float32_in_half_precision_modules() -> None:
    m = CompensatedLayerNorm(4, 6, removed_mean=100.25, removed_m2=2.0, dtype=torch.bfloat16)  # 100.25: no bf16
    assert m.weight.dtype == torch.bfloat16 and m.removed_mean.dtype == torch.float32
    assert m.removed_mean.item() == 100.25
    for cast in (lambda t: t.half(), lambda t: t.to(torch.bfloat16), lambda t: t.double()):
        cast(m)
        assert m.removed_mean.item() == 100.25 and m.removed_mean.dtype in (torch.float32, F64)


# ---------------------------------------------------------------------------------------------
# Training and state

@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_full_norm_and_skip_buffers(kind: str) -> None:
    case = _fixed(kind)
    x_kept = case.x_full.index_select(case.dim, case.kept).requires_grad_(True)
    full = case.x_full.clone().index_copy(case.dim, case.kept, x_kept)  # removed channels stay constant
    w = torch.randn(x_kept.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    (case.ref(full).index_select(case.dim, case.kept) * w).sum().backward()
    grad_ref = x_kept.grad.clone()
    x_kept.grad = None
    (case.comp(x_kept) * w).sum().backward()
    torch.testing.assert_close(x_kept.grad, grad_ref, rtol=1e-10, atol=1e-10)
    for name, p in case.comp.named_parameters():
        torch.testing.assert_close(p.grad, getattr(case.ref, name).grad[case.kept], rtol=1e-10, atol=1e-10)
    assert {n for n, _ in case.comp.named_parameters()} == ({"weight"} if kind == "rms" else {"weight", "bias"})
    for buf in case.comp.buffers():
        assert not buf.requires_grad and buf.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind: str) -> None:
    case = _fixed(kind)
    fresh = {"layer": lambda: CompensatedLayerNorm(5, 8, dtype=F64),
             "rms": lambda: CompensatedRMSNorm(5, 8, eps=1e-5, dtype=F64),
             "group": lambda: CompensatedGroupNorm(4, 8, range(5), dtype=F64)}[kind]()
    state = case.comp.state_dict()
    assert {"removed_mean", "removed_m2"} <= state.keys() or "removed_sumsq" in state
    fresh.load_state_dict(state)
    x = case.x_full.index_select(case.dim, case.kept)
    assert torch.equal(fresh(x), case.comp(x))


# ---------------------------------------------------------------------------------------------
# Graph capture

def _other_batch(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, 2 * x, x - 1])


@pytest.mark.parametrize("kind", KINDS)
def test_fx_keeps_the_functional_form_as_a_leaf(kind: str) -> None:
    case = _fixed(kind)
    gm = torch.fx.symbolic_trace(case.comp)
    gm2 = torch.fx.symbolic_trace(gm)  # a rewritten GraphModule retraces to the same leaf
    for graph_module in (gm, gm2):
        calls = [n for n in graph_module.graph.nodes if n.op == "call_function"]
        assert [c.target.__name__ for c in calls] == [f"compensated_{kind}_norm"]
        assert all(a.op in ("get_attr", "placeholder") for a in calls[0].all_input_nodes)
        x = case.x_full.index_select(case.dim, case.kept)
        assert torch.equal(graph_module(x), case.comp(x))


@pytest.mark.parametrize("kind", KINDS)
def test_torch_export_round_trip(kind: str) -> None:
    case = _fixed(kind)
    x = case.x_full.index_select(case.dim, case.kept)
    ep = torch.export.export(case.comp, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    x2 = _other_batch(x)
    torch.testing.assert_close(loaded(x2), case.comp(x2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_torchscript_round_trip(kind: str) -> None:
    case = _fixed(kind)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(case.comp), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x2 = _other_batch(case.x_full.index_select(case.dim, case.kept))
    torch.testing.assert_close(loaded(x2), case.comp(x2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_export(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    case = _fixed(kind, dtype=torch.float32)
    x = case.x_full.index_select(case.dim, case.kept)
    path = tmp_path / "norm.onnx"
    torch.onnx.export(case.comp.eval(), (x,), str(path), dynamo=True)
    onnx.checker.check_model(onnx.load(str(path)))
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), case.comp(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Guards: each refuses an impossible layer

@pytest.mark.parametrize("make", [
    lambda: CompensatedLayerNorm((2, 3), 8),                   # more than one normalized dim
    lambda: CompensatedLayerNorm(9, 8),                        # more kept than original
    lambda: CompensatedLayerNorm(0, 8),                        # nothing kept
    lambda: CompensatedLayerNorm(8, 8, removed_mean=1.0),      # r = 0 but a removed mean
    lambda: CompensatedLayerNorm(7, 8, removed_m2=1.0),        # one constant has no spread
    lambda: CompensatedLayerNorm(6, 8, removed_m2=-1.0),
    lambda: CompensatedRMSNorm(8, 8, removed_sumsq=1.0),
    lambda: CompensatedGroupNorm(3, 8, [0, 1]),                # 8 channels in 3 groups
    lambda: CompensatedGroupNorm(2, 8, [0, 0]),                # duplicate channel
    lambda: CompensatedGroupNorm(2, 8, [0, 9]),                # out of range
    lambda: CompensatedGroupNorm(2, 8, [0, 1, 2, 3], removed_mean=torch.ones(2)),  # group 0 lost nothing
    lambda: CompensatedLayerNorm.from_layernorm(nn.LayerNorm(4), torch.tensor([0, 1]), torch.ones(3)),
    lambda: CompensatedLayerNorm.from_layernorm(nn.LayerNorm(4), torch.tensor([True, False]), torch.ones(1)),
    lambda: CompensatedLayerNorm.from_layernorm((None, torch.ones(2), 1e-5), torch.tensor([0]), torch.ones(1)),
    lambda: CompensatedRMSNorm.from_rmsnorm(nn.RMSNorm(4), torch.tensor([0, 0, 1]), torch.ones(1)),
    lambda: compensated_layer_norm(torch.ones(2, 5), None, None, 4, torch.tensor(0.0), torch.tensor(0.0)),
])
def test_guards(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        make()


def test_functional_tuple_source_and_repr() -> None:
    ln = nn.LayerNorm(4, dtype=F64)
    a = CompensatedLayerNorm.from_layernorm(ln, torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))
    b = CompensatedLayerNorm.from_layernorm((ln.weight, ln.bias, ln.eps), torch.tensor([0, 2]),
                                            torch.tensor([1.0, 2.0]))
    c = CompensatedLayerNorm.from_layernorm((None, None, ln.eps), torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))
    x = torch.randn(3, 2, dtype=F64)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), c(x))
    assert repr(c) == "CompensatedLayerNorm((2,), original_size=4, eps=1e-05, elementwise_affine=False)"


def test_doctests() -> None:
    result = doctest.testmod(layers, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
