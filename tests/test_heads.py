"""Head-split attention (``view -> transpose -> scaled_dot_product_attention``) and split/chunk.

Per head: query/key dims whose key is constant (or whose query is zero) leave q and k (softmax
shift invariance, the ORIGINAL scale kept); value dims nothing reads leave v and the output;
constant value dims fold into the output projection when no mask can empty a softmax row;
whole heads go when nothing reads them. Head-split tensors stay rectangular.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sqr_fx import count_stored_floats, minimize
from test_transformers import F64, _hf, _ids, assert_fixpoint, assert_same, params, randn

MASKS = ("none", "causal", "bool", "bias")


class HeadAttention(nn.Module):
    """Linear q/k/v -> view(B, T, H, D) -> transpose -> attention -> transpose -> reshape -> Linear.
    ``impl="sdpa"``: F.scaled_dot_product_attention; ``"matmul"``: written out with ``@``, a scale,
    the mask (masked_fill / added bias), softmax, dropout (eval) and ``@ v``."""

    def __init__(self, c: int, heads: int, dq: int, dv: int, mask: str = "none", t_bias: int = 5,
                 impl: str = "sdpa"):
        super().__init__()
        self.h, self.dq, self.dv, self.mask, self.impl = heads, dq, dv, mask, impl
        self.drop = nn.Dropout(0.1)
        self.q, self.k = nn.Linear(c, heads * dq, dtype=F64), nn.Linear(c, heads * dq, dtype=F64)
        self.v, self.o = nn.Linear(c, heads * dv, dtype=F64), nn.Linear(heads * dv, c, dtype=F64)
        if mask == "bias":  # a per-head additive mask: gathered to the kept heads
            self.register_buffer("bias", torch.randn(1, heads, t_bias, t_bias, dtype=F64))

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        q = self.q(x).view(b, t, self.h, self.dq).transpose(1, 2)
        k = self.k(x).view(b, t, self.h, self.dq).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, self.dv).transpose(1, 2)
        if self.impl == "matmul":
            return self.o(self._written_out(q, k, v, t).transpose(1, 2).contiguous().reshape(b, t, self.h * self.dv))
        if self.mask == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mask == "bool":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(t, t, dtype=torch.bool).tril())
        elif self.mask == "bias":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).contiguous().reshape(b, t, self.h * self.dv))

    def _written_out(self, q, k, v, t):
        s = q @ k.transpose(-2, -1) / self.dq ** 0.5
        if self.mask in ("causal", "bool"):
            s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        elif self.mask == "bias":
            s = s + self.bias
        return self.drop(torch.softmax(s, dim=-1)) @ v


@st.composite
def head_cases(draw):
    heads, dq, dv = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return dict(
        c=draw(st.integers(2, 6)), heads=heads, dq=dq, dv=dv, mask=draw(st.sampled_from(MASKS)),
        impl=draw(st.sampled_from(["sdpa", "matmul"])),
        dead_heads=draw(st.sets(st.integers(0, heads - 1), max_size=heads)),
        k_const=draw(st.sets(st.integers(0, dq - 1), max_size=dq)),  # same dims in every head
        q_zero=draw(st.sets(st.integers(0, dq - 1), max_size=dq)),
        v_const=draw(st.sets(st.integers(0, dv - 1), max_size=dv)),
        v_unread=draw(st.sets(st.integers(0, dv - 1), max_size=dv)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@torch.no_grad()
def plant_heads(m: HeadAttention, case: dict) -> None:
    h, dq, dv = m.h, m.dq, m.dv
    for head in range(h):
        for d in case["k_const"]:
            m.k.weight[head * dq + d] = 0
        for d in case["q_zero"]:
            m.q.weight[head * dq + d] = 0
            m.q.bias[head * dq + d] = 0
        for e in case["v_const"]:
            m.v.weight[head * dv + e] = 0
        for e in case["v_unread"]:
            m.o.weight[:, head * dv + e] = 0
    for head in case["dead_heads"]:
        m.o.weight[:, head * dv:(head + 1) * dv] = 0


def expected_widths(case: dict) -> tuple[int, int, int] | None:
    """(heads, q/k dims, v dims) kept, when no keep-one-channel step interferes (else None)."""
    heads = case["heads"] - len(case["dead_heads"])
    dq = case["dq"] - len(case["k_const"] | case["q_zero"])
    # constant values fold only where no mask can empty a softmax row: no mask, or sdpa's is_causal
    # (written out, the causal mask is a masked_fill like any other)
    unmasked = case["mask"] == "none" or (case["mask"] == "causal" and case["impl"] == "sdpa")
    v_gone = case["v_unread"] | (case["v_const"] if unmasked else set())
    dv = case["dv"] - len(v_gone)
    return (heads, dq, dv) if min(heads, dq, dv) >= 1 else None


@given(head_cases())
def test_random_head_attention_minimizes_exactly(case):
    torch.manual_seed(case["seed"])
    m = HeadAttention(case["c"], case["heads"], case["dq"], case["dv"], case["mask"], impl=case["impl"]).eval()
    plant_heads(m, case)
    before = copy.deepcopy(m.state_dict())
    t = 5
    s = minimize(m, (randn(2, t, case["c"], seed=1),))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()), "input model mutated"
    sizes = [(2, t), (3, t), (1, t)] if case["mask"] == "bias" else [(2, t), (3, 7), (1, 2)]
    for b, tt in sizes:
        assert_same(m, s, (randn(b, tt, case["c"], seed=b + tt),), rtol=1e-9)
    want = expected_widths(case)
    if case["impl"] == "matmul" and case["mask"] == "bias" and case["heads"] > 1:
        want = None  # a per-head bias added to written-out scores: the attention is kept whole
        assert params(s)["q.weight"].shape == m.q.weight.shape
    if want is not None:
        heads, dq, dv = want
        p = params(s)
        assert p["q.weight"].shape[0] == p["k.weight"].shape[0] == heads * dq
        assert p["v.weight"].shape[0] == p["o.weight"].shape[1] == heads * dv
        if (heads, dq, dv) != (case["heads"], case["dq"], case["dv"]):
            assert count_stored_floats(s) < count_stored_floats(m)
    assert_fixpoint(s, (randn(2, t, case["c"], seed=1),))


def test_original_scale_kept_when_query_dims_go():
    """sdpa's default scale is 1/sqrt(D) of the CURRENT width: the rewrite must pin the original."""
    torch.manual_seed(0)
    m = HeadAttention(4, 2, 4, 3).eval()
    plant_heads(m, dict(k_const={0, 2}, q_zero=set(), v_const=set(), v_unread=set(), dead_heads=set()))
    s = minimize(m, (randn(2, 5, 4),))
    assert params(s)["q.weight"].shape[0] == 2 * 2
    assert "scale = 0.5" in s.code  # 1/sqrt(4)
    assert_same(m, s, (randn(3, 6, 4, seed=3),), rtol=1e-9)


def test_uneven_heads_keep_a_rectangular_layout():
    """Head 0 loses two q/k dims, head 1 none: both keep D (a ragged [H, D] does not exist)."""
    torch.manual_seed(0)
    m = HeadAttention(4, 2, 3, 2).eval()
    with torch.no_grad():
        m.k.weight[[0, 1]] = 0
    s = minimize(m, (randn(2, 5, 4),))
    assert params(s)["q.weight"].shape[0] == 6
    assert_same(m, s, (randn(3, 4, 4, seed=2),), rtol=1e-9)


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
def test_strict_mode_accepts_head_attention(impl):
    m = HeadAttention(4, 2, 3, 2, impl=impl).eval()
    minimize(m, (randn(2, 5, 4),), strict=True)


class ScoresRead(HeadAttention):
    """The raw scores are also returned: a per-row shift would change them, so q/k keep every dim."""

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        q = self.q(x).view(b, t, self.h, self.dq).transpose(1, 2)
        k = self.k(x).view(b, t, self.h, self.dq).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, self.dv).transpose(1, 2)
        s = q @ k.transpose(-2, -1)
        return self.o((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, t, self.h * self.dv)), s


def test_guard_scores_read_elsewhere_keep_query_key_dims():
    torch.manual_seed(0)
    m = ScoresRead(4, 2, 3, 2).eval()
    with torch.no_grad():
        m.k.weight[[0, 3]] = 0  # dim 0 of both heads: a constant key (removable if only softmax read it)
        m.o.weight[:, 2:4] = 0  # head 1 unread by o, but its scores are returned
    s = minimize(m, (randn(2, 5, 4),))
    assert params(s)["q.weight"].shape[0] == 6 and params(s)["k.weight"].shape[0] == 6
    assert_same(m, s, (randn(3, 6, 4, seed=3),), rtol=1e-9)


def test_matmul_attention_loses_constant_key_dims_and_dead_heads():
    torch.manual_seed(0)
    m = HeadAttention(4, 3, 3, 2, impl="matmul", mask="causal").eval()
    with torch.no_grad():
        m.k.weight[[0, 3, 6]] = 0  # dim 0 of every head
        m.o.weight[:, 2:4] = 0     # head 1
    s = minimize(m, (randn(2, 5, 4),))
    assert params(s)["q.weight"].shape[0] == 2 * 2 and params(s)["v.weight"].shape[0] == 2 * 2
    assert "scale" not in s.code  # the written-out scale is a literal of the original width
    for b, t in [(2, 5), (3, 8)]:
        assert_same(m, s, (randn(b, t, 4, seed=t),), rtol=1e-9)


# ---- split / chunk ----------------------------------------------------------------------------
class Gated(nn.Module):
    """One Linear producing three pieces (chunk or split on the channel axis), a gated unit."""

    def __init__(self, c: int, h: int, how: str):
        super().__init__()
        self.h, self.how = h, how
        self.fc, self.out = nn.Linear(c, 3 * h, dtype=F64), nn.Linear(h, c, dtype=F64)

    def forward(self, x):
        if self.how == "chunk":
            a, b, g = self.fc(x).chunk(3, dim=-1)
        elif self.how == "split":
            a, b, g = torch.split(self.fc(x), self.h, dim=1)
        else:  # uneven sections
            a, b, g = self.fc(x).split([self.h, self.h, self.h], -1)
        return self.out(a * torch.sigmoid(g) + b)


@pytest.mark.parametrize("how", ["chunk", "split", "sections"])
def test_chunk_and_split_on_the_channel_axis(how):
    torch.manual_seed(0)
    m = Gated(5, 6, how).eval()
    with torch.no_grad():
        m.out.weight[:, [1, 4]] = 0        # units 1, 4 unread: their a, b, g rows all go
        m.fc.weight[[2, 6 + 2, 12 + 2]] = 0  # unit 2: a, b, g constant: folded into out's bias
        m.fc.weight[[6 + 3, 12 + 3]] = 0   # unit 3: b, g constant but a is not: the unit stays
    s = minimize(m, (randn(3, 5),))
    assert params(s)["fc.weight"].shape[0] == 3 * 3
    assert params(s)["out.weight"].shape[1] == 3
    for b in (3, 1, 7):
        assert_same(m, s, (randn(b, 5, seed=b),), rtol=1e-9)
    assert_fixpoint(s, (randn(3, 5),))


class BatchSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6, dtype=F64), nn.Linear(6, 3, dtype=F64)

    def forward(self, x):
        parts = self.a(x).split(1, dim=0)  # along the batch axis: every piece has all channels
        return self.b(torch.cat([p.relu() for p in parts], 0))


def test_split_on_another_axis_passes_channels_through():
    m = BatchSplit().eval()
    with torch.no_grad():
        m.b.weight[:, 2] = 0
    s = minimize(m, (randn(3, 4),))
    assert params(s)["a.weight"].shape[0] == 5
    assert_same(m, s, (randn(3, 4, seed=1),), rtol=1e-9)


# ---- Hugging Face models: whole heads --------------------------------------------------------
def test_hf_bert_dead_heads():
    tf = _hf()
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, use_cache=False)
    m = tf.BertModel(cfg)
    with torch.no_grad():
        for layer in m.encoder.layer:
            layer.attention.output.dense.weight[:, 8:16] = 0  # head 1: nothing reads it
            layer.attention.self.key.weight[[0, 8, 16, 24]] = 0  # dim 0 of every head: constant key
    m = m.eval().double()
    s = minimize(m, (_ids(2, 12),))
    for i in range(2):
        pre = f"encoder.layer.{i}.attention."
        assert params(s)[pre + "self.query.weight"].shape == (3 * 7, 32)
        assert params(s)[pre + "self.key.weight"].shape == (3 * 7, 32)
        assert params(s)[pre + "self.value.weight"].shape == (3 * 8, 32)
        assert params(s)[pre + "output.dense.weight"].shape == (32, 3 * 8)
    for b, t in [(2, 12), (3, 7), (1, 20)]:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=1e-9)
    assert_fixpoint(s, (_ids(2, 12),))


def test_hf_gpt2_dead_heads_through_split():
    """GPT-2's fused c_attn is split into q, k, v (aten.split): each piece loses its own head."""
    tf = _hf()
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, use_cache=False,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    m = tf.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for blk in m.transformer.h:  # Conv1D weights are [in, out]
            blk.attn.c_proj.weight[16:24] = 0  # head 2 unread
    m = m.eval().double()
    s = minimize(m, (_ids(2, 12),))
    for i in range(2):
        assert params(s)[f"transformer.h.{i}.attn.c_attn.weight"].shape == (32, 3 * 24)
        assert params(s)[f"transformer.h.{i}.attn.c_proj.weight"].shape == (24, 32)
    for b, t in [(2, 12), (3, 7)]:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=1e-9)


# ---- channel shuffle: the same split/merge machinery with the axes swapped ----------------------
class Shuffle(nn.Module):
    """conv -> view(B, g, C/g, H, W) -> transpose(1, 2) -> view(B, C, H, W) -> conv (ShuffleNet's shuffle
    with literal widths; ``b, _, h, w = y.shape`` reads no channel count)."""

    def __init__(self, c: int = 12, g: int = 3):
        super().__init__()
        self.g, self.c = g, c
        self.a, self.b = nn.Conv2d(4, c, 1, dtype=F64), nn.Conv2d(c, 5, 3, padding=1, dtype=F64)

    def forward(self, x):
        y = torch.relu(self.a(x))
        b, _, h, w = y.shape
        y = y.view(b, self.g, self.c // self.g, h, w).transpose(1, 2).contiguous().view(b, self.c, h, w)
        return self.b(y)


def test_channel_shuffle_loses_a_whole_group():
    torch.manual_seed(0)
    m = Shuffle().eval()
    with torch.no_grad():
        m.b.weight[:, [0, 3, 6, 9]] = 0  # shuffled position d * g + h: group h = 0 entirely unread
        m.b.weight[:, [1, 4]] = 0        # two of group 1: uneven, padded back
    s = minimize(m, (randn(2, 4, 5, 5),))
    assert params(s)["a.weight"].shape[0] == 8 and params(s)["b.weight"].shape[1] == 8
    for b, hw in [(2, 5), (3, 7), (1, 1)]:
        assert_same(m, s, (randn(b, 4, hw, hw, seed=hw),), rtol=1e-9)
    assert_fixpoint(s, (randn(2, 4, 5, 5),))


def test_flatten_after_pooling_at_batch_one():
    """[1, C, 1, 1] -> [1, C]: the channel block is found past the leading size-1 dims."""
    m = nn.Sequential(nn.Conv2d(3, 6, 3, dtype=F64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(6, 2, dtype=F64)).eval()
    with torch.no_grad():
        m[4].weight[:, 1] = 0
    s = minimize(m, (randn(1, 3, 8, 8),))
    assert params(s)["0.weight"].shape[0] == 5
    assert_same(m, s, (randn(4, 3, 9, 7, seed=2),), rtol=1e-9)


class FirstToken(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6, dtype=F64), nn.Linear(6, 3, dtype=F64)

    def forward(self, x):
        return self.b(self.a(x)[:, 0])


def test_select_on_another_axis_after_export():
    """``x[:, 0]`` is ``aten.select.int`` after torch.export: the token axis goes, channels stay."""
    torch.manual_seed(0)
    m = FirstToken().eval()
    with torch.no_grad():
        m.b.weight[:, 2] = 0
    x = randn(2, 5, 4)
    auto = torch.export.Dim.AUTO
    for model in (m, torch.export.export(m, (x,), dynamic_shapes=({0: auto, 1: auto},)).module()):
        s = minimize(model, (x,))
        assert params(s)["a.weight"].shape[0] == 5
        assert_same(m, s, (randn(3, 7, 4, seed=1),), rtol=1e-9)


# ---- regressions from the adversarial review: each was a wrong answer or a crash -------------------
_C, _H, _D = 8, 2, 4


def _close(m, small, *xs):
    with torch.no_grad():
        r, c = m(*xs), small(*xs)
    r, c = (r, c) if isinstance(r, tuple) else ((r,), (c,))
    for a, b in zip(r, c):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


class _Written(nn.Module):
    def __init__(self, mode, fill=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.mode, self.fill = mode, fill
        self.q, self.k, self.v, self.o = (nn.Linear(_C, _C, dtype=F64) for _ in range(4))
        with torch.no_grad():
            self.k.weight[1] = 0; self.k.weight[_D + 1] = 0     # constant key dim 1 in both heads
            self.k.bias[1], self.k.bias[_D + 1] = 2.0, -1.5
            if mode in ("return_p", "mean_p"):
                self.o.weight[:, _D:] = 0                        # head 1 dead

    def forward(self, x):
        B, T, _ = x.shape
        sp = lambda t: t.view(B, T, _H, _D).transpose(1, 2)
        q, k, v = sp(self.q(x)), sp(self.k(x)), sp(self.v(x))
        s = q @ k.transpose(-2, -1)
        if self.mode == "square":
            s = s * s
        if self.mode == "fill":
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), self.fill)
        p = F.softmax(s, dim=-1)
        y = self.o((p @ v).transpose(1, 2).reshape(B, T, _C))
        if self.mode == "return_p":
            return y, p
        if self.mode == "mean_p":
            return y + p.mean(1)[..., :1]
        return y


@pytest.mark.parametrize("mode,fill", [("square", 0.0), ("fill", 0.0), ("fill", -5.0), ("return_p", 0.0),
                                       ("mean_p", 0.0)])
def test_written_out_attention_guards(mode, fill):
    m = _Written(mode, fill).eval()
    small = minimize(m, (torch.randn(2, 5, _C, dtype=F64),))
    _close(m, small, torch.randn(3, 7, _C, dtype=F64))


def test_masked_fill_minus_inf_still_removes():
    m = _Written("fill", float("-inf")).eval()
    small = minimize(m, (torch.randn(2, 5, _C, dtype=F64),))
    _close(m, small, torch.randn(3, 7, _C, dtype=F64))
    assert small.sqr_report.params_after < small.sqr_report.params_before


class _SplitTuple(nn.Module):
    def __init__(self, rev):
        super().__init__()
        torch.manual_seed(2)
        self.rev = rev
        self.a, self.b = nn.Linear(4, _C, dtype=F64), nn.Linear(_C, 3, dtype=F64)
        with torch.no_grad():
            self.a.weight[1] = 0; self.a.bias[1] = 0.7
            self.b.weight[:, 6] = 0

    def forward(self, x):
        h = self.a(x)
        pieces = h.chunk(2, -1)
        if self.rev:
            pieces = pieces[::-1]
        return self.b(h) + torch.hstack(pieces).mean(-1, keepdim=True)


@pytest.mark.parametrize("rev", [False, True])
def test_split_tuple_read_whole_freezes(rev):
    m = _SplitTuple(rev).eval()
    small = minimize(m, (torch.randn(3, 4, dtype=F64),))
    _close(m, small, torch.randn(5, 4, dtype=F64))


def test_cat_of_sliced_split_tuple_does_not_crash():
    class M(_SplitTuple):
        def forward(self, x):
            h = self.a(x)
            return self.b(torch.cat(h.split(2, -1)[::-1], -1))
    m = M(False).eval()
    small = minimize(m, (torch.randn(3, 4, dtype=F64),))
    _close(m, small, torch.randn(5, 4, dtype=F64))


def test_channel_shuffle_with_ragged_per_head_dims():
    torch.manual_seed(3)
    Cs, Hs, Ds = 12, 3, 4

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, Cs, dtype=F64), nn.Linear(Cs, 4, dtype=F64)
            with torch.no_grad():
                self.a.weight[1] = 0; self.a.bias[1] = 0.7
                self.a.weight[Ds + 1] = 0; self.a.bias[Ds + 1] = -0.3
                self.b.weight[:, 6] = 0
                self.b.weight[:, 2 * Ds:] = 0

        def forward(self, x):
            B, T, _ = x.shape
            return self.b(self.a(x).view(B, T, Hs, Ds).transpose(2, 3).reshape(B, T, Cs))

    m = M().eval()
    small = minimize(m, (torch.randn(2, 3, 5, dtype=F64),))
    _close(m, small, torch.randn(3, 6, 5, dtype=F64))


class Unflattened(HeadAttention):
    """The head split written with ``unflatten(-1, (H, D))``."""

    def forward(self, x):
        q = self.q(x).unflatten(-1, (self.h, self.dq)).transpose(1, 2)
        k = self.k(x).unflatten(-1, (self.h, self.dq)).transpose(1, 2)
        v = self.v(x).unflatten(-1, (self.h, -1)).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_unflatten_head_split():
    torch.manual_seed(0)
    m = Unflattened(4, 3, 2, 2).eval()
    with torch.no_grad():
        m.k.weight[[0, 2, 4]] = 0  # dim 0 of every head: constant key
        m.o.weight[:, 2:4] = 0     # head 1
    s = minimize(m, (randn(2, 5, 4),))
    assert params(s)["q.weight"].shape[0] == 2 and params(s)["v.weight"].shape[0] == 4
    for b, t in [(2, 5), (3, 2)]:
        assert_same(m, s, (randn(b, t, 4, seed=t),), rtol=1e-9)


# ---- guards: the same ops where the channel axis itself is touched --------------------------------
class ChannelReaders(nn.Module):
    """Channel 1 of ``a`` is read by ``select`` / ``softmax`` / ``unflatten`` over the channel axis,
    besides a Linear that ignores it: it must stay."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(4, 6, dtype=F64), nn.Linear(6, 3, dtype=F64)

    def forward(self, x):
        y = self.a(x)
        if self.how == "select":
            return self.b(y) + y.select(-1, 1).unsqueeze(-1)
        if self.how == "softmax":
            return self.b(torch.softmax(y, -1))
        return self.b(y) + y.unflatten(-1, (2, 3)).sum(-1)[..., :1]  # sums channels within a block


@pytest.mark.parametrize("how", ["select", "softmax", "unflatten"])
def test_guard_channel_axis_reads_keep_the_channel(how):
    torch.manual_seed(0)
    m = ChannelReaders(how).eval()
    with torch.no_grad():
        m.b.weight[:, 1] = 0
    x = randn(2, 5, 4)
    s = minimize(m, (x,))
    assert params(s)["a.weight"].shape[0] == 6
    assert_same(m, s, (randn(3, 7, 4, seed=1),), rtol=1e-9)
