"""Rotary attention and grouped kv heads (GQA / MQA): what goes, what must stay, and exactness.

* rotate_half rotary embeddings (``x * cos + rotate_half(x) * sin``, ../shared/MATH.md "Rotary
  attention") become one ``sqr_fx.attention.rotary`` call; a rotation pair (i, i + D/2) leaves q and
  k when the query pair is zero for every token or the key pair is exactly zero, and cos/sin are
  sliced to the kept pairs. GUARD: a constant NON-zero key pair stays (after rotation it depends on
  the key position, so it is no per-query shift of the scores).
* grouped kv heads: Hugging Face's ``repeat_kv`` (``x[:, :, None].expand(...).reshape(...)``) and
  sdpa's ``enable_gqa=True``; q heads go in whole kv groups, a kv head with them.
* eager attention's ``softmax(..., dtype=float32).to(dtype)`` does not stop head removal.

Hugging Face Llama / Qwen2 / Mistral decoders are built from small random configs (no downloads)
and go through the torch.export front end; the hand-written module goes through symbolic_trace.
Every case compares against the original in float64 at two batch / sequence sizes (minimize's own
self-check runs too) and checks which parameters went.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqr_fx import SqrFxError, count_stored_floats, minimize
from sqr_fx.portable import sqr_fx_references
from test_transformers import F64, _hf, _ids, assert_same, params, randn


# ---- a hand-written rotary attention block (symbolic_trace front end) ---------------------------------
def rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryAttention(nn.Module):
    """q/k/v projections with biases, rotary q/k (tables computed from positions in forward), kv heads
    repeated Hugging Face style (``gqa="repeat"``) or by sdpa (``"sdpa"``); ``impl="matmul"`` writes the
    attention out (scale, softmax in float32 and back, @ v)."""

    def __init__(self, c: int = 12, heads: int = 4, kv: int = 2, d: int = 8, impl: str = "sdpa",
                 gqa: str = "repeat", rope: bool = True, form: str = "half", rot: int = 8):
        super().__init__()
        self.h, self.kv, self.d, self.impl, self.gqa, self.rope = heads, kv, d, impl, gqa, rope
        self.form, self.rot = form, rot  # rotate_half or GPT-J's interleaved; the first ``rot`` dims rotate
        self.q, self.o = nn.Linear(c, heads * d, dtype=F64), nn.Linear(heads * d, c, dtype=F64)
        self.k, self.v = nn.Linear(c, kv * d, dtype=F64), nn.Linear(c, kv * d, dtype=F64)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=F64) / d))

    def heads(self, x):
        """(b, t, q, k, v): the projections split into heads, ``[B, heads, T, D]``."""
        b, t = x.shape[0], x.shape[1]
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.d).transpose(1, 2)
        return b, t, q, k, v

    def forward(self, x):
        b, t, q, k, v = self.heads(x)
        if self.rope and self.form == "half" and self.rot == self.d:
            freqs = torch.arange(t, dtype=F64)[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[None, None], emb.sin()[None, None]
            q = q * cos + rotate_half(q, self.d // 2) * sin
            k = (rotate_half(k, self.d // 2) * sin) + (cos * k)  # operands in the other order
        elif self.rope:
            q, k = self._partial(q, t), self._partial(k, t)
        r = self.h // self.kv
        if self.gqa == "repeat" and r > 1:
            k = k[:, :, None, :, :].expand(b, self.kv, r, t, self.d).reshape(b, self.h, t, self.d)
            v = v[:, :, None, :, :].expand(b, self.kv, r, t, self.d).reshape(b, self.h, t, self.d)
        if self.impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.gqa == "sdpa")
        else:
            s = q @ k.transpose(-2, -1) * self.d ** -0.5
            o = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return self.o(o.transpose(1, 2).reshape(b, t, self.h * self.d))


    def _partial(self, x, t):
        """Rotate the first ``rot`` dims (Phi / GPT-NeoX ``rotary_pct``; GPT-J: interleaved), pass the rest."""
        r = self.rot
        freqs = torch.arange(t, dtype=F64)[:, None] * self.inv_freq[None, : r // 2]
        emb = torch.cat((freqs, freqs), -1) if self.form == "half" else freqs.repeat_interleave(2, -1)
        cos, sin = emb.cos(), emb.sin()
        x_rot, x_pass = x[..., :r], x[..., r:]
        if self.form == "half":
            x_rot = x_rot * cos + rotate_half(x_rot, r // 2) * sin
        else:  # GPT-J flattens the pair axis; timm's EVA reshapes to x's shape (export: computed sizes)
            rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1)
            rotated = rotated.reshape(x_rot.shape) if self.form == "eva" else rotated.flatten(-2)
            x_rot = x_rot * cos + rotated * sin
        return torch.cat((x_rot, x_pass), dim=-1)


def _block(**kw) -> RotaryAttention:
    torch.manual_seed(0)
    return RotaryAttention(**kw).eval()


def _minimize_checked(m: nn.Module, frontend: str = "fx") -> nn.Module:
    s = minimize(m, (randn(2, 6, 12),))
    assert s.sqr_report.frontend == frontend
    assert not sqr_fx_references(s)  # the rotary call is written back in torch ops
    for b, t in [(2, 6), (3, 9), (1, 4)]:
        assert_same(m, s, (randn(b, t, 12, seed=b + t),), rtol=1e-9)
    return s


def _widths(s) -> tuple[int, int, int]:
    p = params(s)
    return p["q.weight"].shape[0], p["k.weight"].shape[0], p["v.weight"].shape[0]


@torch.no_grad()
def _zero_rows(lin: nn.Linear, rows, bias: float | None = 0.0) -> None:
    lin.weight[rows] = 0
    if bias is not None:
        lin.bias[rows] = bias


def _pair(head: int, i: int, d: int = 8) -> list[int]:
    return [head * d + i, head * d + i + d // 2]


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
def test_zero_query_pair_leaves_q_and_k(impl):
    """Query pair (1, 5) zero in every q head (rows AND biases): the pair leaves q and every kv head."""
    m = _block(impl=impl, gqa="repeat")
    _zero_rows(m.q, [r for h in range(4) for r in _pair(h, 1)])
    s = _minimize_checked(m)
    assert _widths(s) == (4 * 6, 2 * 6, 2 * 8)
    assert count_stored_floats(s) < count_stored_floats(m)


def test_zero_key_pair_leaves_q_and_k():
    """Key pair (0, 4) exactly zero (rows and biases) in both kv heads: gone from k and all four q heads."""
    m = _block()
    _zero_rows(m.k, _pair(0, 0) + _pair(1, 0))
    assert _widths(_minimize_checked(m)) == (4 * 6, 2 * 6, 2 * 8)


def test_guard_constant_nonzero_key_pair_is_kept_under_rotation():
    """GUARD. Key pair (0, 4) constant but NOT zero (zero rows, bias 0.7): without rotation it is a
    per-query shift of the scores and goes; rotated, it depends on the key position and must stay."""
    for rope, want in ((False, (4 * 6, 2 * 6, 2 * 8)), (True, (4 * 8, 2 * 8, 2 * 8))):
        m = _block(rope=rope)
        _zero_rows(m.k, _pair(0, 0) + _pair(1, 0), bias=0.7)
        assert _widths(_minimize_checked(m)) == want, rope


def test_guard_half_a_pair_is_not_enough():
    """GUARD. Only dim 1 of pair (1, 5) is zero in q: the pair's other dim still rotates into dim 1."""
    m = _block()
    _zero_rows(m.q, [h * 8 + 1 for h in range(4)])
    assert _widths(_minimize_checked(m)) == (4 * 8, 2 * 8, 2 * 8)


def test_heads_dropping_different_pairs_gather_the_tables_per_head():
    """MHA (kv = heads): head h loses pair h via zero keys. Every head keeps 3 of 4 pairs, different
    ones: cos/sin are gathered per head (not one slice of their last axis)."""
    m = _block(kv=4)
    _zero_rows(m.k, [r for h in range(4) for r in _pair(h, h)])
    s = _minimize_checked(m)
    assert _widths(s) == (4 * 6, 4 * 6, 4 * 8)
    assert "unflatten" in s.code  # the per-head gather of the tables


@pytest.mark.parametrize("form, rot", [("half", 4), ("interleaved", 8), ("interleaved", 4), ("eva", 8), ("eva", 4)])
def test_interleaved_and_partial_rotary(form, rot):
    """GPT-J's interleaved pairs (2i, 2i + 1) (flattened, or reshaped to x's shape as timm's EVA writes it)
    and partial rotary (only the first ``rot`` dims rotate). The
    first pair of the rotated dims is exactly zero in k: it goes. In the passed-through dims a CONSTANT
    non-zero key dim goes as in plain attention; in the rotated dims the same constant pair stays (GUARD)."""
    first = [0, 1] if form != "half" else [0, rot // 2]
    m = _block(form=form, rot=rot, kv=2)
    _zero_rows(m.k, [g * 8 + i for g in range(2) for i in first])
    want = 8 - 2 - (1 if rot < 8 else 0)
    if rot < 8:  # dim 7 passes unrotated: a constant key there is a per-query shift
        _zero_rows(m.k, [7, 15], bias=0.9)
    assert _widths(_minimize_checked(m)) == (4 * want, 2 * want, 2 * 8)
    second = [2, 3] if form != "half" else [1, 1 + rot // 2]
    m = _block(form=form, rot=rot, kv=2)
    _zero_rows(m.k, [g * 8 + i for g in range(2) for i in second], bias=0.9)
    assert _widths(_minimize_checked(m)) == (4 * 8, 2 * 8, 2 * 8)


@pytest.mark.parametrize("gqa, impl", [("repeat", "sdpa"), ("sdpa", "sdpa"), ("repeat", "matmul")])
def test_dead_kv_group_goes_with_its_q_heads(gqa, impl):
    """kv head 1 and its q heads 2, 3 write nothing (o columns zero; k/v rows zero): one group left."""
    m = _block(gqa=gqa, impl=impl)
    with torch.no_grad():
        m.o.weight[:, 16:32] = 0
        _zero_rows(m.k, list(range(8, 16)), bias=None)
        _zero_rows(m.v, list(range(8, 16)), bias=None)
    s = _minimize_checked(m)
    assert _widths(s) == (2 * 8, 8, 8)
    assert params(s)["o.weight"].shape == (12, 16)
    assert "index_select" not in s.code  # the kept heads keep every dim: the cos/sin tables are read whole


@pytest.mark.parametrize("gqa, impl", [("repeat", "sdpa"), ("sdpa", "sdpa"), ("repeat", "matmul")])
@pytest.mark.parametrize("dead", [[3], [0, 3], [1, 2]])
def test_single_dead_q_heads_of_live_groups_go(gqa, impl, dead):
    """q heads go one by one: each kept q head reads its kv head through a gather of the kept copies
    (``index_select`` on the head axis) instead of a uniform repeat; every kv head stays while a q head
    of its group is kept."""
    m = _block(gqa=gqa, impl=impl)
    with torch.no_grad():
        for h in dead:
            m.o.weight[:, h * 8:(h + 1) * 8] = 0
    s = _minimize_checked(m)
    assert s.sqr_report.rounds == 1  # the gathered layout is a fixpoint (the gather takes over the repeat's copies)
    assert _widths(s) == ((4 - len(dead)) * 8, 2 * 8, 2 * 8)
    assert params(s)["o.weight"].shape == (12, (4 - len(dead)) * 8)
    assert "_copies" in s.code  # the gather of the kept copies (its index buffer)


def test_dead_q_head_and_zero_query_pair_together():
    """q head 3 dead and query pair (1, 5) zero in every q head: the pair leaves q and k, head 3 leaves q;
    the copies of each kv head keep exactly the kv head's kept dims."""
    m = _block()
    _zero_rows(m.q, [r for h in range(4) for r in _pair(h, 1)])
    with torch.no_grad():
        m.o.weight[:, 24:32] = 0
    assert _widths(_minimize_checked(m)) == (3 * 6, 2 * 6, 2 * 8)


def test_a_second_minimize_of_the_gathered_layout_removes_nothing_more_and_stays_exact():
    """The result (kv heads gathered by index_select) minimizes again to itself: the gather is followed."""
    m = _block()
    with torch.no_grad():
        m.o.weight[:, 24:32] = 0
    s = _minimize_checked(m)
    s2 = minimize(s, (randn(2, 6, 12),))
    assert count_stored_floats(s2) == count_stored_floats(s)
    for b, t in [(2, 6), (3, 9)]:
        assert_same(m, s2, (randn(b, t, 12, seed=b + t),), rtol=1e-9)


def test_mqa_zero_key_pair():
    """MQA (one kv head read by 4 q heads): a zero key pair leaves the kv head and all q heads."""
    m = _block(kv=1)
    _zero_rows(m.k, _pair(0, 2))
    assert _widths(_minimize_checked(m)) == (4 * 6, 6, 8)


# ---- Hugging Face decoders (torch.export front end) ----------------------------------------------------
_D, _H = 16, 4


def _decoder(name: str, kv: int, attn: str = "sdpa"):
    tf = _hf()
    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                          "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[name]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=_H,
                  num_key_value_heads=kv, max_position_embeddings=64, use_cache=False, attn_implementation=attn)
    return model_cls(cfg)


def _check_decoder(m, dead: list[list[int]], kv: int) -> None:
    """``dead[i]``: q heads of layer i that must be gone (with their kv heads where kv < heads)."""
    m = m.eval().double()
    s = minimize(m, (_ids(2, 10),))
    assert s.sqr_report.frontend == "export"
    r = _H // kv
    for i, heads in enumerate(dead):
        p = params(s)
        pre = f"model.layers.{i}.self_attn"
        assert p[f"{pre}.q_proj.weight"].shape[0] == (_H - len(heads)) * _D
        assert p[f"{pre}.k_proj.weight"].shape[0] == (kv - len(heads) // r) * _D
        assert p[f"{pre}.o_proj.weight"].shape[1] == (_H - len(heads)) * _D
    assert count_stored_floats(s) < count_stored_floats(m)
    for b, t in [(1, 5), (3, 13)]:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=1e-9)


def test_hf_llama_dead_heads():
    """MHA Llama (kv heads = heads): a head whose o_proj columns are zero loses q, k, v rows."""
    m = _decoder("llama", kv=_H)
    dead = [[1], [0, 3]]
    with torch.no_grad():
        for layer, heads in zip(m.model.layers, dead):
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * _D:(h + 1) * _D] = 0
    _check_decoder(m, dead, kv=_H)


@pytest.mark.parametrize("name, attn", [("llama", "sdpa"), ("qwen2", "sdpa"), ("mistral", "eager")])
def test_hf_decoder_dead_kv_groups(name, attn):
    """GQA (4 q heads, 2 kv heads): kv group g (k_proj and v_proj rows zero, its q heads' o_proj columns
    zero) goes with both of its q heads. Qwen2 has q/k/v biases; eager attention casts the softmax."""
    m = _decoder(name, kv=2, attn=attn)
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            a, g = layer.self_attn, i % 2
            a.o_proj.weight[:, 2 * g * _D:(2 * g + 2) * _D] = 0
            for proj in (a.k_proj, a.v_proj):
                proj.weight[g * _D:(g + 1) * _D] = 0
    _check_decoder(m, [[0, 1], [2, 3]], kv=2)


@pytest.mark.parametrize("name", ["gptj", "phi"])
def test_hf_partial_rotary_dead_head_and_key_pair(name):
    """Partial rotary (8 of 16 dims): GPT-J (interleaved pairs, rotation on [B, T, H, D] before the
    transpose, no biases) and Phi (rotate_half, biases). Layer i loses head i (dense columns zero) and,
    in every head, one rotation pair whose key rows and biases are zero."""
    tf = _hf()
    torch.manual_seed(0)
    if name == "gptj":
        m = tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                             use_cache=False, bos_token_id=0, eos_token_id=0))
        attn, out, pair, pre = [b.attn for b in m.transformer.h], "out_proj", (2, 3), "transformer.h.{}.attn"
    else:
        m = tf.PhiForCausalLM(tf.PhiConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=64,
                                           use_cache=False))
        attn, out, pair, pre = [l.self_attn for l in m.model.layers], "dense", (1, 5), "model.layers.{}.self_attn"
    with torch.no_grad():
        for i, a in enumerate(attn):
            getattr(a, out).weight[:, i * _D:(i + 1) * _D] = 0
            rows = [h * _D + p for h in range(_H) for p in pair]
            a.k_proj.weight[rows] = 0
            if a.k_proj.bias is not None:
                a.k_proj.bias[rows] = 0
    m = m.eval().double()
    s = minimize(m, (_ids(2, 10),))
    p = params(s)
    for i in range(2):
        assert p[f"{pre.format(i)}.q_proj.weight"].shape[0] == p[f"{pre.format(i)}.k_proj.weight"].shape[0] == 3 * 14
        assert p[f"{pre.format(i)}.v_proj.weight"].shape[0] == 3 * _D
    for b, t in [(1, 5), (3, 13)]:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=1e-9)


def test_hf_llama_mqa_zero_key_pair():
    """MQA Llama (one kv head for 4 q heads, 1 layer): a key rotation pair (3, 11) with zero k_proj rows
    leaves k and all four q heads."""
    tf = _hf()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=_H,
                         num_key_value_heads=1, max_position_embeddings=64, use_cache=False)
    m = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.model.layers[0].self_attn.k_proj.weight[[3, 11]] = 0
    m = m.eval().double()
    s = minimize(m, (_ids(2, 10),))
    p = params(s)
    assert p["model.layers.0.self_attn.q_proj.weight"].shape[0] == _H * 14
    assert p["model.layers.0.self_attn.k_proj.weight"].shape[0] == 14
    for b, t in [(1, 5), (3, 13)]:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=1e-9)


class _FlattenRepeat(RotaryAttention):
    """repeat_kv written with ``flatten(1, 2)`` instead of ``reshape`` (no rotary)."""

    def forward(self, x):
        b, t, q, k, v = self.heads(x)
        r = self.h // self.kv
        k = k[:, :, None].expand(b, self.kv, r, t, self.d).flatten(1, 2)
        v = v[:, :, None].expand(b, self.kv, r, t, self.d).flatten(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.o(o.transpose(1, 2).reshape(b, t, self.h * self.d))


def test_guard_repeat_written_with_flatten_keeps_whole_groups():
    """GUARD. Only view/reshape rewrite the pick of kept copies: a repeat merged by ``flatten`` keeps one fate
    per kv group (a lone dead q head stays, exactly); a dead whole group still goes."""
    torch.manual_seed(0)
    m = _FlattenRepeat().eval()
    with torch.no_grad():
        m.o.weight[:, 24:32] = 0
    assert _widths(_minimize_checked(m)) == (4 * 8, 2 * 8, 2 * 8)
    torch.manual_seed(0)
    m = _FlattenRepeat().eval()
    with torch.no_grad():
        m.o.weight[:, 16:32] = 0
        _zero_rows(m.k, list(range(8, 16)), bias=None)
        _zero_rows(m.v, list(range(8, 16)), bias=None)
    assert _widths(_minimize_checked(m)) == (2 * 8, 8, 8)


@pytest.mark.parametrize("gqa", ["repeat", "sdpa"])
def test_gqa_heads_groups_keeps_the_uniform_repeat(gqa):
    """``gqa_heads="groups"``: a lone dead q head stays (no gather emitted), a dead whole group still goes;
    a value other than "gather" / "groups" is a clear error."""
    m = _block(gqa=gqa)
    with torch.no_grad():
        m.o.weight[:, 24:32] = 0
    s = minimize(m, (randn(2, 6, 12),), gqa_heads="groups")
    assert _widths(s) == (4 * 8, 2 * 8, 2 * 8) and "_copies" not in s.code  # (the gather's index buffers)
    with torch.no_grad():
        m.o.weight[:, 16:24] = 0
        _zero_rows(m.k, list(range(8, 16)), bias=None)
        _zero_rows(m.v, list(range(8, 16)), bias=None)
    s = minimize(m, (randn(2, 6, 12),), gqa_heads="groups")
    assert _widths(s) == (2 * 8, 8, 8) and "_copies" not in s.code
    for b, t in [(2, 6), (3, 9)]:
        assert_same(m, s, (randn(b, t, 12, seed=b + t),), rtol=1e-9)
    with pytest.raises(SqrFxError, match="gqa_heads"):
        minimize(m, (randn(2, 6, 12),), gqa_heads="heads")
