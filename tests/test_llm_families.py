"""Hugging Face decoder families with planted dead structure: what goes, and exactness.

Each family is built from a small random config (hidden 64, 2 layers, 4 heads of 16 dims, 2 kv heads
where the family has grouped kv heads; no downloads), goes through the torch.export front end, and has
planted, per layer:

* dead heads: a head's output-projection columns zero (MHA families), or a dead kv group: kv head g's
  k and v rows zero and its q heads' output-projection columns zero (GQA families);
* dead MLP units: down-projection columns zero;
* dead residual-stream channels J: every writer writes a constant there (embedding columns constant,
  output-projection / down-projection rows zero, biases kept; a post-norm writer has gamma 0) and every
  norm that reads the stream has gamma 0 there (Gemma: ``(1 + w) = 0``, w = -1); a LayerNorm's beta folds
  into its readers.

Each test asserts that every planted unit is gone (the parameter widths) and that the result equals the
original in float64 at three shapes (the traced (2, 10), (1, 5), (3, 13)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqr_fx import count_stored_floats, minimize
from test_transformers import F64, _hf, _ids, assert_same, params, randn

H, D, C = 4, 16, 64  # heads, head dim, hidden
J = [5, 17, 40]      # planted stream channels
UNITS = [3, 10, 21]  # planted dead MLP units (down-projection columns)
SHAPES = [(2, 10), (1, 5), (3, 13)]
# Hugging Face's RMSNorms normalize in float32 even in a float64 model (``x.float()`` / ``.to(float32)``):
# a compensated statistic summed in another order differs by float32 ulps there, so those families are
# compared at float32 rounding (the LayerNorm families stay at 1e-9)
F32 = 1e-6


@dataclass
class Family:
    """Where a family keeps its parts, by module name relative to a layer (``layers.format(i)``); q/k/v
    rows are ``(module, row indices)`` (a fused qkv projection names one module for all three)."""

    build: Callable[[Any, int], Any]        # (transformers, kv heads) -> model
    layers: str                             # "model.layers.{}"
    kv: int                                 # kv heads (== H: MHA)
    o: str                                  # output projection (columns = heads)
    q: Callable[[int], list]                # q head h -> [(weight name, rows)]
    k: Callable[[int], list]                # kv head g -> k rows
    v: Callable[[int], list]
    down: str                               # MLP down projection (columns = units)
    stream_norms: list[str]                 # norms reading the stream (gamma_j -> off)
    writers: list[str]                      # linears writing the stream (rows J zero)
    post_norms: list[str] = ()              # norms writing the stream (gamma_j -> off; their input rows zero)
    direct: list[str] = ()                  # linears reading the stream without a norm (columns J zero)
    embeds: list[str] = ("model.embed_tokens",)
    final_norm: str = "model.norm"
    gemma: bool = False                     # RMSNorm scales by (1 + w)
    q_rows: bool = False                    # a dead head's q rows are zero too (q_norm spans every head)
    rtol: float = 1e-9                      # float32 norms inside a float64 model: float32 rounding


def _plain(kv):
    return dict(q=lambda h: [("self_attn.q_proj", range(h * D, (h + 1) * D))],
                k=lambda g: [("self_attn.k_proj", range(g * D, (g + 1) * D))],
                v=lambda g: [("self_attn.v_proj", range(g * D, (g + 1) * D))], kv=kv, o="self_attn.o_proj")


_GATED = dict(down="mlp.down_proj")
_PRE = dict(stream_norms=["input_layernorm", "post_attention_layernorm"], writers=["self_attn.o_proj", "mlp.down_proj"])


def _cfg(tf, cls, kv, **kw):
    base = dict(vocab_size=100, hidden_size=C, intermediate_size=64, num_hidden_layers=2, num_attention_heads=H,
                num_key_value_heads=kv, max_position_embeddings=64, use_cache=False, pad_token_id=0, bos_token_id=0,
                eos_token_id=0)
    return getattr(tf, cls)(**{**base, **kw})


def _fused(offset_q, offset_k, offset_v, name):
    return dict(q=lambda h: [(name, range(offset_q(h), offset_q(h) + D))],
                k=lambda g: [(name, range(offset_k(g), offset_k(g) + D))],
                v=lambda g: [(name, range(offset_v(g), offset_v(g) + D))])


FAMILIES: dict[str, Family] = {
    "gemma": Family(lambda tf, kv: tf.GemmaForCausalLM(_cfg(tf, "GemmaConfig", kv, head_dim=D)),
                    "model.layers.{}", **_plain(2), **_GATED, **_PRE, gemma=True, rtol=F32),
    "gemma2": Family(lambda tf, kv: tf.Gemma2ForCausalLM(_cfg(tf, "Gemma2Config", kv, head_dim=D)),
                     "model.layers.{}", **_plain(2), **_GATED, stream_norms=["input_layernorm", "pre_feedforward_layernorm"],
                     writers=["self_attn.o_proj", "mlp.down_proj"],
                     post_norms=["post_attention_layernorm", "post_feedforward_layernorm"], gemma=True, rtol=F32),
    "phi3": Family(lambda tf, kv: tf.Phi3ForCausalLM(_cfg(tf, "Phi3Config", kv)), "model.layers.{}", kv=2,
                   o="self_attn.o_proj", **_fused(lambda h: h * D, lambda g: H * D + g * D, lambda g: (H + 2) * D + g * D,
                                                  "self_attn.qkv_proj"),
                   down="mlp.down_proj", **_PRE, rtol=F32),
    "gpt_neox": Family(lambda tf, kv: tf.GPTNeoXForCausalLM(_cfg(tf, "GPTNeoXConfig", kv)), "gpt_neox.layers.{}",
                       kv=H, o="attention.dense",
                       **_fused(lambda h: h * 3 * D, lambda g: g * 3 * D + D, lambda g: g * 3 * D + 2 * D,
                                "attention.query_key_value"),
                       down="mlp.dense_4h_to_h",
                       stream_norms=["input_layernorm", "post_attention_layernorm"],
                       writers=["attention.dense", "mlp.dense_4h_to_h"], embeds=["gpt_neox.embed_in"],
                       final_norm="gpt_neox.final_layer_norm"),
    # new decoder architecture: qkv as [kv groups, (H / kv) q heads + k + v, D]
    "falcon": Family(lambda tf, kv: tf.FalconForCausalLM(_cfg(tf, "FalconConfig", kv, new_decoder_architecture=True,
                                                              num_kv_heads=kv, ffn_hidden_size=64)),
                     "transformer.h.{}", kv=2, o="self_attention.dense",
                     **_fused(lambda h: (h // 2) * 4 * D + (h % 2) * D, lambda g: g * 4 * D + 2 * D,
                              lambda g: g * 4 * D + 3 * D, "self_attention.query_key_value"),
                     down="mlp.dense_4h_to_h", stream_norms=["ln_attn", "ln_mlp"],
                     writers=["self_attention.dense", "mlp.dense_4h_to_h"], embeds=["transformer.word_embeddings"],
                     final_norm="transformer.ln_f"),
    "opt": Family(lambda tf, kv: tf.OPTForCausalLM(_cfg(tf, "OPTConfig", kv, ffn_dim=64, word_embed_proj_dim=C,
                                                        attn_implementation="eager")),
                  "model.decoder.layers.{}", **{**_plain(H), "o": "self_attn.out_proj"}, down="fc2",
                  stream_norms=["self_attn_layer_norm", "final_layer_norm"], writers=["self_attn.out_proj", "fc2"],
                  embeds=["model.decoder.embed_tokens", "model.decoder.embed_positions"],
                  final_norm="model.decoder.final_layer_norm"),
    "qwen3": Family(lambda tf, kv: tf.Qwen3ForCausalLM(_cfg(tf, "Qwen3Config", kv, head_dim=D)), "model.layers.{}",
                    **_plain(2), **_GATED, **_PRE, rtol=F32),
    "olmo2": Family(lambda tf, kv: tf.Olmo2ForCausalLM(_cfg(tf, "Olmo2Config", kv)), "model.layers.{}", **_plain(2),
                    **_GATED, stream_norms=[], writers=["self_attn.o_proj", "mlp.down_proj"],
                    post_norms=["post_attention_layernorm", "post_feedforward_layernorm"],
                    direct=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"],
                    q_rows=True, rtol=F32),
    "stablelm": Family(lambda tf, kv: tf.StableLmForCausalLM(_cfg(tf, "StableLmConfig", kv)), "model.layers.{}",
                       **_plain(2), **_GATED, **_PRE),
}


def dead_heads(fam: Family) -> list[list[int]]:
    """q heads planted dead per layer: MHA head 1 / heads 0, 3; GQA: kv group 0 / kv group 1 with their q heads."""
    return [[1], [0, 3]] if fam.kv == H else [[0, 1], [2, 3]]


def _get(root, name):
    return root.get_submodule(name)


@torch.no_grad()
def plant(m, fam: Family) -> None:
    g = torch.Generator().manual_seed(1)
    off = -1.0 if fam.gemma else 0.0
    r = H // fam.kv
    for i, heads in enumerate(dead_heads(fam)):
        layer = _get(m, fam.layers.format(i))
        o = _get(layer, fam.o)
        for h in heads:
            o.weight[:, h * D:(h + 1) * D] = 0
        if fam.q_rows:
            for h in heads:
                for name, rows in fam.q(h):
                    _get(layer, name).weight[list(rows)] = 0
        if fam.kv < H:
            for kvh in sorted({h // r for h in heads}):
                for name, rows in fam.k(kvh) + fam.v(kvh):
                    lin = _get(layer, name)
                    lin.weight[list(rows)] = 0
                    if lin.bias is not None:
                        lin.bias[list(rows)] = 0
        _get(layer, fam.down).weight[:, UNITS] = 0
        for name in fam.writers:
            _get(layer, name).weight[J] = 0
        for name in fam.stream_norms + list(fam.post_norms):
            _get(layer, name).weight[J] = off
        for name in fam.direct:
            _get(layer, name).weight[:, J] = 0
    for name in fam.embeds:
        _get(m, name).weight[:, J] = torch.randn(len(J), generator=g)
    _get(m, fam.final_norm).weight[J] = off


def widths(s, fam: Family, i: int) -> dict[str, int]:
    """Kept q heads, kv heads, MLP units and stream channels of layer ``i`` of the minimized model."""
    p = params(s)
    pre = fam.layers.format(i)
    heads = p[f"{pre}.{fam.o}.weight"].shape[1] // D
    qkv = {name for name, _ in fam.q(0) + fam.k(0) + fam.v(0)}
    if len(qkv) == 1:  # fused: (q heads + 2 kv heads) * D rows
        kv = (p[f"{pre}.{qkv.pop()}.weight"].shape[0] // D - heads) // 2
    else:
        kv = p[f"{pre}.{fam.k(0)[0][0]}.weight"].shape[0] // D
    table = {v.shape[1] for v in p.values() if v.dim() == 2 and v.shape[0] == 100}  # token table (tied or not)
    return dict(heads=heads, kv=kv, units=p[f"{pre}.{fam.down}.weight"].shape[1], stream=min(table))


def build(name: str):
    tf = _hf()
    fam = FAMILIES[name]
    torch.manual_seed(0)
    m = fam.build(tf, fam.kv)
    plant(m, fam)
    return m.eval().double(), fam


@pytest.mark.parametrize("name", list(FAMILIES))
def test_planted_structure_goes_exactly(name):
    torch.set_num_threads(1)
    m, fam = build(name)
    s = minimize(m, (_ids(*SHAPES[0]),))
    assert s.sqr_report.frontend == "export"
    for b, t in SHAPES:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=fam.rtol)
    for i, heads in enumerate(dead_heads(fam)):
        w = widths(s, fam, i)
        kv = fam.kv - (len(heads) // (H // fam.kv) if fam.kv < H else 0)
        assert w == dict(heads=H - len(heads), kv=H - len(heads) if fam.kv == H else kv, units=64 - len(UNITS),
                         stream=C - len(J)), (i, w)
    assert count_stored_floats(s) < count_stored_floats(m)


def test_guard_olmo2_dead_head_with_live_queries_is_kept():
    """GUARD. OLMo2's q_norm normalizes q over ALL heads at once (RMS over H * D): a dead head's query
    values (o_proj columns zero, q rows live) still scale every other head's queries, so the head stays
    (only zero q rows, constants the compensated RMS accounts for, let it go: the family test)."""
    from dataclasses import replace

    torch.set_num_threads(1)
    fam = replace(FAMILIES["olmo2"], q_rows=False)
    torch.manual_seed(0)
    m = fam.build(_hf(), fam.kv)
    plant(m, fam)
    m = m.eval().double()
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
    from dataclasses import replace

    torch.set_num_threads(1)
    fam = replace(FAMILIES[name], kv=H, q_rows=False)
    torch.manual_seed(0)
    m = fam.build(_hf(), H)
    plant(m, fam)
    m = m.eval().double()
    s = minimize(m, (_ids(*SHAPES[0]),))
    for i, heads in enumerate(dead_heads(fam)):
        assert widths(s, fam, i) == dict(heads=H - len(heads), kv=H - len(heads), units=64 - len(UNITS),
                                         stream=C - len(J)), i
    for b, t in SHAPES[1:]:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=fam.rtol)
