"""Hugging Face decoder families with planted dead structure: what goes, and exactness.

Each family (``sqr_fx/testing/hf_families.py``: the table, the planting, the widths read back) is built
from a small random config (hidden 64, 2 layers, 4 heads of 16 dims, 2 kv heads where the family has
grouped kv heads; no downloads), goes through the torch.export front end, and has planted, per layer:
dead heads (MHA) or a dead kv group with its q heads (GQA), 3 dead MLP units, and 3 dead residual-stream
channels. Each test asserts that every planted unit is gone (the parameter widths) and that the result
equals the original in float64 at three shapes (the traced (2, 10), (1, 5), (3, 13)): at 1e-9 for the
LayerNorm families, at float32 rounding (1e-6) where Hugging Face normalizes in float32 inside the float64
model (RMSNorm families). Then the rules behind them on hand-written blocks, with their guards:
soft-capped scores (Gemma 2), per-head q/k norms (Qwen3), a q norm over all heads (OLMo2).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqr_fx import count_stored_floats, minimize
from sqr_fx.testing.hf_families import C, FAMILIES, H, J, SHAPES, UNITS, build, dead_heads, dead_kv, widths
from test_transformers import F64, _hf, _ids, assert_same, params, randn


@pytest.mark.parametrize("name", list(FAMILIES))
def test_planted_structure_goes_exactly(name):
    _hf()
    torch.set_num_threads(1)
    m, fam = build(name)
    s = minimize(m, (_ids(*SHAPES[0]),))
    assert s.sqr_report.frontend == "export"
    for b, t in SHAPES:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=fam.rtol)
    for i, heads in enumerate(dead_heads(fam)):
        w = widths(s, fam, i)
        assert w == dict(heads=H - len(heads), kv=fam.kv - dead_kv(fam, heads), units=64 - len(UNITS),
                         stream=C - len(J)), (i, w)
    assert count_stored_floats(s) < count_stored_floats(m)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.kv < H])
def test_gqa_single_dead_q_heads_of_live_groups_go(name):
    """GQA with q heads dead one by one (head 1 of group 0; heads 0 and 3, one per group): every dead q head
    goes (its kv head stays for the live q heads of its group, gathered by index_select), exact at three shapes."""
    _hf()
    torch.set_num_threads(1)
    m, fam = build(name, single_q=True, stream=False)
    s = minimize(m, (_ids(*SHAPES[0]),))
    for b, t in SHAPES:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=fam.rtol)
    for i, heads in enumerate(dead_heads(fam)):
        w = widths(s, fam, i)
        assert (w["heads"], w["kv"], w["units"]) == (H - len(heads), fam.kv, 64 - len(UNITS)), (i, w)


@pytest.mark.parametrize("name", ["qwen3", "gemma2"])
def test_rmsnorm_families_without_stream_channels_are_bit_exact(name):
    """The float32 rounding of the RMSNorm families comes from the compensated float32 statistic alone:
    with no stream channel planted (heads, kv groups, MLP units only) the result is exact in float64."""
    _hf()
    torch.set_num_threads(1)
    m, fam = build(name, stream=False)
    s = minimize(m, (_ids(*SHAPES[0]),))
    for i, heads in enumerate(dead_heads(fam)):
        assert widths(s, fam, i) == dict(heads=H - len(heads), kv=1, units=64 - len(UNITS), stream=C)
    for b, t in SHAPES[1:]:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=1e-12)


def test_guard_olmo2_dead_head_with_live_queries_is_kept():
    """GUARD. OLMo2's q_norm / k_norm normalize q and k over ALL heads at once (RMS over H * D): a dead
    head's query values (o_proj columns zero, q rows live) still scale every other head's queries, so the
    head stays (only zero q and k rows, constants the compensated RMS accounts for, let it go: the family
    test)."""
    _hf()
    torch.set_num_threads(1)
    m, fam = build("olmo2", qk_rows=False)
    s = minimize(m, (_ids(*SHAPES[0]),))
    for i in range(2):
        assert widths(s, fam, i) == dict(heads=H, kv=fam.kv, units=64 - len(UNITS), stream=C - len(J))
    assert_same(m, s, (_ids(3, 13, seed=13),), rtol=fam.rtol)


# ---- the rules behind the families, on hand-written blocks (symbolic_trace front end) --------------------------
class _Heads(nn.Module):
    """2 heads of 8 dims over 12 channels. ``cap``: Gemma 2's soft-capped scores ``tanh(s / cap) * cap``
    (written-out attention); ``qk_norm``: Qwen3's RMSNorm of q and k over each head's dims, with the
    weight passed in (``"arg"``) or multiplied after (``"mul"``)."""

    def __init__(self, cap: float | None = None, qk_norm: str | None = None):
        super().__init__()
        self.cap, self.qk_norm = cap, qk_norm
        self.q, self.k, self.v, self.o = (nn.Linear(12, 16, dtype=F64), nn.Linear(12, 16, dtype=F64),
                                          nn.Linear(12, 16, dtype=F64), nn.Linear(16, 12, dtype=F64))
        self.qw, self.kw = nn.Parameter(torch.rand(8, dtype=F64) + 0.5), nn.Parameter(torch.rand(8, dtype=F64) + 0.5)

    def _norm(self, x, w):
        if self.qk_norm == "arg":
            return F.rms_norm(x, (8,), w, 1e-6)
        return w * F.rms_norm(x, (8,), None, 1e-6) if self.qk_norm == "mul" else x

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        q = self._norm(self.q(x).view(b, t, 2, 8), self.qw).transpose(1, 2)
        k = self._norm(self.k(x).view(b, t, 2, 8), self.kw).transpose(1, 2)
        v = self.v(x).view(b, t, 2, 8).transpose(1, 2)
        if self.qk_norm is not None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            s = q @ k.transpose(-2, -1) * 8 ** -0.5
            if self.cap is not None:
                s = torch.tanh(s / self.cap) * self.cap
            o = F.softmax(s, dim=-1) @ v
        return self.o(o.transpose(1, 2).reshape(b, t, 16))


def _heads_block(**kw) -> _Heads:
    torch.manual_seed(0)
    return _Heads(**kw).eval()


def _qkv_widths(m: nn.Module) -> tuple[int, int, int]:
    s = minimize(m, (randn(2, 6, 12),))
    assert s.sqr_report.frontend == "fx"
    for b, t in [(2, 6), (3, 9), (1, 4)]:
        assert_same(m, s, (randn(b, t, 12, seed=b + t),), rtol=1e-9)
    p = params(s)
    return p["q.weight"].shape[0], p["k.weight"].shape[0], p["v.weight"].shape[0]


@pytest.mark.parametrize("cap", [None, 30.0])
def test_softcapped_scores_keep_zero_key_dims_removable(cap):
    """Key dim 3 exactly zero in both heads (rows and biases): q.k gains 0, before or after tanh: it goes."""
    m = _heads_block(cap=cap)
    with torch.no_grad():
        m.k.weight[[3, 11]] = 0
        m.k.bias[[3, 11]] = 0
    assert _qkv_widths(m) == (14, 14, 16)


def test_guard_constant_key_dim_is_kept_under_softcapping():
    """GUARD. Key dim 3 constant but NOT zero (zero rows, bias 0.7): it adds 0.7 q_i3 to every score of
    row i, a per-row shift that softmax ignores, so plain attention drops it; soft-capping maps each score
    through tanh first, where a shift is no longer a shift: the dim must stay."""
    for cap, want in ((None, (14, 14, 16)), (30.0, (16, 16, 16))):
        m = _heads_block(cap=cap)
        with torch.no_grad():
            m.k.weight[[3, 11]] = 0
            m.k.bias[[3, 11]] = 0.7
        assert _qkv_widths(m) == want, cap


@pytest.mark.parametrize("qk_norm", ["arg", "mul"])
def test_per_head_qk_norm_dead_head_goes_whole(qk_norm):
    """Qwen3-style q/k RMSNorm over each head's 8 dims: head 1 writes nothing (o columns zero). Its
    statistic is its own, so q, k and v lose the whole head; the shared (8,) norm weights stay whole."""
    m = _heads_block(qk_norm=qk_norm)
    with torch.no_grad():
        m.o.weight[:, 8:] = 0
    assert _qkv_widths(m) == (8, 8, 8)


@pytest.mark.parametrize("qk_norm", [None, "arg", "mul"])
def test_guard_zero_query_dim_under_per_head_norm_is_kept(qk_norm):
    """GUARD. Query dim 3 zero in both heads (rows and biases). Without a norm q.k gains 0 from it and it
    goes; under a per-head RMSNorm it still divides the statistic by D = 8 (and the norm's weight is shared
    by every head), so it stays."""
    m = _heads_block(qk_norm=qk_norm)
    with torch.no_grad():
        m.q.weight[[3, 11]] = 0
        m.q.bias[[3, 11]] = 0
    assert _qkv_widths(m) == ((14, 14, 16) if qk_norm is None else (16, 16, 16))


@pytest.mark.parametrize("name", ["gemma2", "falcon", "qwen3"])
def test_mha_variant_single_dead_heads(name):
    """The GQA families built with as many kv heads as q heads: single dead heads (o columns zero: head 1,
    heads 0 and 3) go with their k and v heads (Falcon: one q head per (q, k, v) slot group; Qwen3: through
    the per-head q/k norms; Gemma 2: through soft-capped eager attention)."""
    _hf()
    torch.set_num_threads(1)
    m, fam = build(name, kv=H, qk_rows=False)
    s = minimize(m, (_ids(*SHAPES[0]),))
    for i, heads in enumerate(dead_heads(fam)):
        assert widths(s, fam, i) == dict(heads=H - len(heads), kv=H - len(heads), units=64 - len(UNITS),
                                         stream=C - len(J)), i
    for b, t in SHAPES[1:]:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=fam.rtol)
