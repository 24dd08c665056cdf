"""Swin's shifted-window attention per head (``sqr_fx/rules/window_attention.py``) and ``torch.roll``.

Each identity of docs/rules.md ("Shifted-window attention") is planted in small float64 Swin
V1/V2 models (torchvision's own classes): constant and unread value dims, query/key dims that are
a per-query shift (V1) or zero in q and k (V2), a whole dead head, constant input channels. The
minimized model must equal the original at a size that is a multiple of the window and at one
that is not (zero-padded windows), at several batch sizes; be strictly smaller; be a fixpoint;
and leave the input model untouched. Guards: constant inputs that padded tokens would see, V2's
norms, training mode, rolling the channel axis.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import swin_transformer as tvs

from sqr_fx import check_equivalence, count_stored_floats, minimize
from sqr_fx.window_attention import window_attention

F64 = torch.float64
WS = [4, 4]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _same(m: nn.Module, s: nn.Module, shapes) -> None:
    for i, shape in enumerate(shapes):
        check_equivalence(m, s, (randn(*shape, seed=10 + i),), rtol=1e-9, atol=1e-11)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _unchanged(m: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = m.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "minimize modified its input"


def _fixpoint(s, x) -> None:
    again = minimize(s, (x,))
    assert again.sqr_report.rounds == 0, "a second minimize still removed something"
    assert count_stored_floats(again) == count_stored_floats(s)


def _calls(gm: torch.fx.GraphModule, target=window_attention) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _t(gm: torch.fx.GraphModule, a) -> torch.Tensor:
    return gm.get_parameter(a.target) if isinstance(a, torch.fx.Node) else a


def _widths(gm, node) -> tuple[int, int, int]:
    """(heads, query/key dims per head, value dims per head) of an emitted window_attention call."""
    heads = node.args[11]
    return heads, _t(gm, node.args[1]).shape[0] // heads, _t(gm, node.args[5]).shape[0] // heads


def _attns(m: nn.Module) -> list[tvs.ShiftedWindowAttention]:
    return [mod for mod in m.modules() if isinstance(mod, tvs.ShiftedWindowAttention)]


@torch.no_grad()
def plant_heads(attn: tvs.ShiftedWindowAttention, g: torch.Generator, cosine: bool) -> None:
    """In every head: value dim 0 constant (zero W_v row, non-zero bias), value dim 1 unread (zero
    W_o column), key dim 2 a constant (zero W_k row), query dim 3 identically 0 (and, for V2, key
    dim 3 too). The last head: every value dim constant, so the head goes."""
    C, H = attn.qkv.in_features, attn.num_heads
    d = C // H
    W, b, Wo = attn.qkv.weight, attn.qkv.bias, attn.proj.weight
    for h in range(H):
        r = h * d
        W[2 * C + r] = 0
        b[2 * C + r] = torch.randn((), generator=g, dtype=b.dtype) + 1.0
        Wo[:, r + 1] = 0
        W[C + r + 2] = 0
        W[r + 3], b[r + 3] = 0, 0
        if cosine:
            W[C + r + 3] = 0
    W[2 * C + (H - 1) * d:] = 0


@torch.no_grad()
def plant_constant_stream_reads(block: tvs.SwinTransformerBlock, g: torch.Generator) -> None:
    """norm1 output channel 0 is the constant 0.7 and channel 1 the constant 0 (gamma = 0): the
    attention reads constants that padded tokens do not hold."""
    norm = block.norm1
    norm.weight[:2] = 0
    norm.bias[0], norm.bias[1] = 0.7, 0.0


def _swin(v2: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kw = dict(block=tvs.SwinTransformerBlockV2, downsample_layer=tvs.PatchMergingV2) if v2 else {}
    m = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                           window_size=WS, num_classes=10, **kw)
    return m.double().eval()


# ---- the canonical call ------------------------------------------------------------------------------
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_equals_torchvision(cosine, shift):
    """At torchvision's own widths the explicit form is the same function (padded sizes included)."""
    C, H = 12, 3
    qkv, proj, bqkv, bo = randn(3 * C, C, seed=1), randn(C, C, seed=2), randn(3 * C, seed=3), randn(C, seed=4)
    rpb, ls = randn(1, H, 16, 16, seed=5), randn(H, 1, 1, seed=6) if cosine else None
    (wq, wk, wv), (bq, bk, bv) = qkv.chunk(3), bqkv.chunk(3)
    if cosine:
        bk = torch.zeros_like(bk)  # torchvision zeroes the key bias of cosine attention
    for shape in [(2, 8, 8, C), (3, 6, 9, C), (1, 3, 2, C)]:
        x = randn(*shape, seed=7)
        ref = tvs.shifted_window_attention(x, qkv, proj, rpb, WS, H, [shift, shift], qkv_bias=bqkv, proj_bias=bo,
                                           logit_scale=ls, training=False)
        out = window_attention(x, wq, bq, wk, bk, wv, bv, proj, bo, rpb, WS, H, [shift, shift],
                               None if cosine else (C // H) ** -0.5, ls)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# ---- small Swin V1 / V2 with planted structure -------------------------------------------------------
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_planted_heads_and_dims(v2):
    """V1: per head, q/k loses dims 2 (per-query shift) and 3 (q == 0); V2: only dim 3 (0 in q and k;
    dim 2 is 0 in k but not in q, and |q| needs it). Value dims 0 (folded) and 1 (unread) go, and the
    last head of every block with its relative-position-bias (and logit-scale) slice. Exact at a
    window multiple and at sizes whose maps get zero-padded (constant stream reads included)."""
    m = _swin(v2)
    g = torch.Generator().manual_seed(0)
    for attn in _attns(m):
        plant_heads(attn, g, cosine=v2)
    for block in (b for b in m.modules() if isinstance(b, tvs.SwinTransformerBlock)):
        plant_constant_stream_reads(block, g)
    before, floats = _snapshot(m), count_stored_floats(m)
    x = randn(2, 3, 32, 32)
    s = minimize(m, (x,), portable=False)
    _unchanged(m, before)
    assert count_stored_floats(m) == floats
    calls = _calls(s)
    assert len(calls) == len(_attns(m)) == 4
    assert not _calls(s, tvs.shifted_window_attention)
    for node, attn in zip(calls, _attns(m)):
        H, d = attn.num_heads, attn.qkv.in_features // attn.num_heads
        assert _widths(s, node) == (H - 1, d - (1 if v2 else 2), d - 2)
        assert _t(s, node.args[7]).shape == (attn.qkv.in_features, (H - 1) * (d - 2))  # proj_weight
        assert node.args[12] == attn.shift_size and node.args[10] == WS
        if v2:
            assert _t(s, node.args[14]).shape == (H - 1, 1, 1)  # logit_scale
            assert node.args[13] is None
        else:
            assert node.args[13] == d ** -0.5  # the ORIGINAL scale, not (new width) ** -0.5
    if not v2:  # the relative position bias tables lose the removed heads' columns
        tables = {k: p.shape for k, p in s.named_parameters() if k.endswith("relative_position_bias_table")}
        assert sorted(tables.values()) == [(49, 1), (49, 1), (49, 3), (49, 3)]
    assert count_stored_floats(s) < floats
    # 8x8 maps (a window multiple), 9x7 and 13x9 (zero-padded to 12x8 / 16x12; a pad equal to the shift
    # would hide the padded tokens behind the -100 mask, so these pads differ from it)
    _same(m, s, [(2, 3, 32, 32), (3, 3, 36, 28), (1, 3, 52, 36)])
    _fixpoint(s, x)


def test_swin_without_planted_structure_keeps_torchvision_calls():
    """Nothing to remove inside attention: the original call is copied as is."""
    m = _swin(False)
    s = minimize(m, (randn(1, 3, 32, 32),))
    assert len(_calls(s, tvs.shifted_window_attention)) == 4 and not _calls(s)
    _same(m, s, [(2, 3, 40, 24)])


# ---- constant input channels: what zero padding allows ----------------------------------------------
class ConvWindowAttention(nn.Module):
    """1x1 conv -> [B, H, W, C] -> shifted-window attention -> 1x1 conv head."""

    def __init__(self, v2: bool, shift: int, c: int = 16, heads: int = 2):
        super().__init__()
        self.inp = nn.Conv2d(3, c, 1)
        cls = tvs.ShiftedWindowAttentionV2 if v2 else tvs.ShiftedWindowAttention
        self.attn = cls(c, WS, [shift, shift], heads)
        self.out = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        y = self.attn(self.inp(x).permute(0, 2, 3, 1))
        return self.out(y.permute(0, 3, 1, 2))


@torch.no_grad()
def _constant_inputs(v2: bool, shift: int) -> nn.Module:
    """Input channels 0..3 are constants (zero conv rows): 0 is 0.0; 1 (0.7) is read by q only;
    2 (0.7) by k only; 3 (0.7) by v only."""
    torch.manual_seed(1)
    m = ConvWindowAttention(v2, shift).double().eval()
    C = m.attn.qkv.in_features
    m.inp.weight[:4] = 0
    m.inp.bias[:4] = torch.tensor([0.0, 0.7, 0.7, 0.7], dtype=F64)
    W = m.attn.qkv.weight
    W[C:, 1] = 0  # 1: q only
    W[:C, 2], W[2 * C:, 2] = 0, 0  # 2: k only
    W[:2 * C, 3] = 0  # 3: v only
    return m


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("shift", [0, 2])
def test_constant_inputs_fold_only_where_padding_cannot_see_them(v2, shift):
    """A zero channel and a q-only constant go (padded queries are cropped); constants read by k or v
    stay, since padded tokens hold 0 there, not the constant."""
    m = _constant_inputs(v2, shift)
    before = _snapshot(m)
    x = randn(2, 3, 8, 8)
    s = minimize(m, (x,), portable=False)
    _unchanged(m, before)
    assert s.get_parameter("inp.weight").shape[0] == 16 - 2
    (node,) = _calls(s)
    assert _t(s, node.args[1]).shape[1] == 14
    _same(m, s, [(2, 3, 8, 8), (3, 3, 9, 7), (1, 3, 5, 13)])
    _fixpoint(s, x)


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("channel", [2, 3], ids=["key", "value"])
@torch.no_grad()
def test_guard_folding_a_key_or_value_constant_is_wrong_on_padded_windows(channel, shift):
    """Why channels 2 and 3 above stay: folding one into the qkv bias is exact at a window multiple
    and wrong where the map is zero-padded (padded keys/values change)."""
    m = _constant_inputs(False, shift)
    naive = _constant_inputs(False, shift)
    W, b = naive.attn.qkv.weight, naive.attn.qkv.bias
    b += W[:, channel] * naive.inp.bias[channel]
    W[:, channel] = 0
    naive.inp.bias[channel] = 0
    x8, x9 = randn(2, 3, 8, 8), randn(2, 3, 9, 7)
    torch.testing.assert_close(naive(x8), m(x8), rtol=1e-12, atol=1e-12)
    assert (naive(x9) - m(x9)).abs().max() > 1e-4


def test_guard_training_mode_is_not_minimized():
    """training=True (no Dropout module to trip the model check): the call is kept whole."""
    m = _constant_inputs(False, 2).train()
    plant_heads(m.attn, torch.Generator().manual_seed(0), cosine=False)
    s = minimize(m, (randn(2, 3, 8, 8),))
    (node,) = _calls(s, tvs.shifted_window_attention)
    assert s.get_parameter("attn.qkv.weight").shape == m.attn.qkv.weight.shape
    assert s.get_parameter("inp.weight").shape == m.inp.weight.shape
    assert not _calls(s)


@pytest.mark.slow
def test_torchvision_swin_t_planted_attention():
    """Full swin_t: planted heads in every block; exact at the traced size and a padded one."""
    torch.manual_seed(0)
    m = torchvision.models.swin_t(num_classes=10).double().eval()
    g = torch.Generator().manual_seed(0)
    for attn in _attns(m):
        plant_heads(attn, g, cosine=False)
    x = randn(1, 3, 64, 64)
    s = minimize(m, (x,), portable=False)
    assert len(_calls(s)) == 12
    assert count_stored_floats(s) < count_stored_floats(m)
    _same(m, s, [(1, 3, 64, 64), (2, 3, 48, 80)])


# ---- torch.roll ----------------------------------------------------------------------------------------
class RollNet(nn.Module):
    def __init__(self, form: str, dims):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.form, self.dims = form, dims

    def forward(self, x):
        y = torch.relu(self.c1(x))
        shifts = (1, -2) if isinstance(self.dims, tuple) else 1
        y = torch.roll(y, shifts, self.dims) if self.form == "function" else y.roll(shifts, self.dims)
        return self.c2(y)


@pytest.mark.parametrize("form", ["function", "method"])
@pytest.mark.parametrize("dims,kept", [((2, 3), 6), ((-1, -2), 6), (1, 8)])
@torch.no_grad()
def test_roll_passes_channels_through_unless_it_rolls_them(form, dims, kept):
    """Rolling spatial axes keeps channel j in place: a dead unit (constant 0 after relu) and an
    unread one go. Rolling the channel axis moves values across channels: frozen."""
    torch.manual_seed(0)
    m = RollNet(form, dims).double().eval()
    m.c1.weight[2], m.c1.bias[2] = 0, -1.0
    m.c2.weight[:, 5] = 0
    s = minimize(m, (randn(2, 3, 6, 6),))
    assert s.get_parameter("c1.weight").shape[0] == kept
    _same(m, s, [(2, 3, 6, 6), (3, 3, 5, 7)])


class _TwoFunctionalCalls(nn.Module):
    """Two ``shifted_window_attention`` calls on tensors held by one module: top-level (``qkv``, ``qkv2``) or
    in one container (``P.qkv``, ``P.qkv2``). Both calls' q/k/v tensors were named ``<module>.q_weight``:
    the second overwrote the first (a wrong answer), and a top-level ``qkv`` made ``qkv.q_weight`` (a crash)."""

    def __init__(self, container: bool, C: int = 8, H: int = 2, w: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.H, self.w = H, w

        def p(*shape, scale=0.3):
            return nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64) * scale)

        params = {"qkv": p(3 * C, C), "qkvb": p(3 * C), "proj": p(C, C), "projb": p(C), "rpb": p(1, H, w * w, w * w),
                  "qkv2": p(3 * C, C), "qkvb2": p(3 * C), "proj2": p(C, C), "projb2": p(C), "rpb2": p(1, H, w * w, w * w)}
        with torch.no_grad():  # key dims 0-2 of each head (call 1) and 1-2 (call 2): constant, removable
            params["qkv"][C:C + 3] = 0
            params["qkv"][C + 4:C + 7] = 0
            params["qkv2"][C + 1:C + 3] = 0
            params["qkv2"][C + 5:C + 7] = 0
        self.P = nn.ParameterDict(params) if container else None
        if not container:
            for k, v in params.items():
                setattr(self, k, v)

    def forward(self, x):
        P = self.P if self.P is not None else self._parameters
        w, H = [self.w, self.w], self.H
        y = tvs.shifted_window_attention(x, P["qkv"], P["proj"], P["rpb"], w, H, [1, 1], 0.0, 0.0, P["qkvb"],
                                         P["projb"], training=False)
        return tvs.shifted_window_attention(y, P["qkv2"], P["proj2"], P["rpb2"], w, H, [0, 0], 0.0, 0.0, P["qkvb2"],
                                            P["projb2"], training=False)


@pytest.mark.parametrize("container", [True, False])
def test_two_functional_calls_keep_their_own_projections(container):
    m = _TwoFunctionalCalls(container).eval()
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    small = minimize(m, (x,))
    assert count_stored_floats(small) < count_stored_floats(m)
    for xi in (x, torch.randn(3, 12, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))):
        check_equivalence(m, small, (xi,), rtol=1e-9, atol=1e-12)
