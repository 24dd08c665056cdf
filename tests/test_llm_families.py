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

from sqr_fx import count_stored_floats, minimize
from test_transformers import F64, _hf, _ids, assert_same, params

H, D, C = 4, 16, 64  # heads, head dim, hidden
J = [5, 17, 40]      # planted stream channels
UNITS = [3, 10, 21]  # planted dead MLP units (down-projection columns)
SHAPES = [(2, 10), (1, 5), (3, 13)]


@dataclass
class Family:
    """Where a family keeps its parts. Rows are ``(parameter, row indices)``; ``attn(layer)`` returns the
    attention module, names are relative to a layer's prefix ``layers.format(i)``."""

    build: Callable[[Any, int], Any]        # (transformers, kv heads) -> model
    layers: str                             # "model.layers.{}"
    kv: int                                 # kv heads (== H: MHA)
    o: str                                  # output projection (columns = heads)
    q: Callable[[int, int], list]           # (head) -> [(weight name, rows)]: q rows of head h
    k: Callable[[int], list]                # kv head g -> k rows
    v: Callable[[int], list]
    down: str                               # MLP down projection (columns = units)
    up: list[tuple[str, int]]               # MLP input projections (name, row offset of unit 0)
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


_GATED = dict(down="mlp.down_proj", up=[("mlp.gate_proj", 0), ("mlp.up_proj", 0)])
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
                    "model.layers.{}", **_plain(2), **_GATED, **_PRE, gemma=True),
    "gemma2": Family(lambda tf, kv: tf.Gemma2ForCausalLM(_cfg(tf, "Gemma2Config", kv, head_dim=D)),
                     "model.layers.{}", **_plain(2), **_GATED, stream_norms=["input_layernorm", "pre_feedforward_layernorm"],
                     writers=["self_attn.o_proj", "mlp.down_proj"],
                     post_norms=["post_attention_layernorm", "post_feedforward_layernorm"], gemma=True),
    "phi3": Family(lambda tf, kv: tf.Phi3ForCausalLM(_cfg(tf, "Phi3Config", kv)), "model.layers.{}", kv=2,
                   o="self_attn.o_proj", **_fused(lambda h: h * D, lambda g: H * D + g * D, lambda g: (H + 2) * D + g * D,
                                                  "self_attn.qkv_proj"),
                   down="mlp.down_proj", up=[("mlp.gate_up_proj", 0), ("mlp.gate_up_proj", 64)], **_PRE),
    "gpt_neox": Family(lambda tf, kv: tf.GPTNeoXForCausalLM(_cfg(tf, "GPTNeoXConfig", kv)), "gpt_neox.layers.{}",
                       kv=H, o="attention.dense",
                       **_fused(lambda h: h * 3 * D, lambda g: g * 3 * D + D, lambda g: g * 3 * D + 2 * D,
                                "attention.query_key_value"),
                       down="mlp.dense_4h_to_h", up=[("mlp.dense_h_to_4h", 0)],
                       stream_norms=["input_layernorm", "post_attention_layernorm"],
                       writers=["attention.dense", "mlp.dense_4h_to_h"], embeds=["gpt_neox.embed_in"],
                       final_norm="gpt_neox.final_layer_norm"),
    # new decoder architecture: qkv as [kv groups, (H / kv) q heads + k + v, D]
    "falcon": Family(lambda tf, kv: tf.FalconForCausalLM(_cfg(tf, "FalconConfig", kv, new_decoder_architecture=True,
                                                              num_kv_heads=kv, ffn_hidden_size=64)),
                     "transformer.h.{}", kv=2, o="self_attention.dense",
                     **_fused(lambda h: (h // 2) * 4 * D + (h % 2) * D, lambda g: g * 4 * D + 2 * D,
                              lambda g: g * 4 * D + 3 * D, "self_attention.query_key_value"),
                     down="mlp.dense_4h_to_h", up=[("mlp.dense_h_to_4h", 0)], stream_norms=["ln_attn", "ln_mlp"],
                     writers=["self_attention.dense", "mlp.dense_4h_to_h"], embeds=["transformer.word_embeddings"],
                     final_norm="transformer.ln_f"),
    "opt": Family(lambda tf, kv: tf.OPTForCausalLM(_cfg(tf, "OPTConfig", kv, ffn_dim=64, word_embed_proj_dim=C,
                                                        attn_implementation="eager")),
                  "model.decoder.layers.{}", **{**_plain(H), "o": "self_attn.out_proj"}, down="fc2", up=[("fc1", 0)],
                  stream_norms=["self_attn_layer_norm", "final_layer_norm"], writers=["self_attn.out_proj", "fc2"],
                  embeds=["model.decoder.embed_tokens", "model.decoder.embed_positions"],
                  final_norm="model.decoder.final_layer_norm"),
    "qwen3": Family(lambda tf, kv: tf.Qwen3ForCausalLM(_cfg(tf, "Qwen3Config", kv, head_dim=D)), "model.layers.{}",
                    **_plain(2), **_GATED, **_PRE),
    "olmo2": Family(lambda tf, kv: tf.Olmo2ForCausalLM(_cfg(tf, "Olmo2Config", kv)), "model.layers.{}", **_plain(2),
                    **_GATED, stream_norms=[], writers=["self_attn.o_proj", "mlp.down_proj"],
                    post_norms=["post_attention_layernorm", "post_feedforward_layernorm"],
                    direct=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"],
                    q_rows=True),
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
    o = p[f"{pre}.{fam.o}.weight"]
    table = {v.shape[1] for v in p.values() if v.dim() == 2 and v.shape[0] == 100}  # token table (tied or not)
    return dict(heads=o.shape[1] // D, units=p[f"{pre}.{fam.down}.weight"].shape[1], stream=min(table))


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
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=1e-9)
    for i, heads in enumerate(dead_heads(fam)):
        w = widths(s, fam, i)
        assert w == dict(heads=H - len(heads), units=64 - len(UNITS), stream=C - len(J)), (i, w)
    assert count_stored_floats(s) < count_stored_floats(m)
