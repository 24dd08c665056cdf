"""Hugging Face decoder families from small random configs, with planted dead structure (test support).

One table (:data:`FAMILIES`) says where each family keeps its parts; :func:`plant` kills, per layer,
dead heads (MHA: a head's output-projection columns zero; GQA: kv group g's k and v rows zero and its q
heads' output-projection columns zero), dead MLP units (down-projection columns zero) and dead
residual-stream channels ``J`` (every writer writes a constant there: embedding columns constant,
output-/down-projection rows zero, a post-norm writer's gamma 0; every norm reading the stream has gamma 0
there, Gemma's ``(1 + w)`` with w = -1; a LayerNorm's beta folds into its readers); :func:`widths` reads
what a minimized model kept. Used by ``tests/test_llm_families.py`` and ``benchmarks/llm_families.py``.
Needs ``transformers``; builds models only (no downloads).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["H", "D", "C", "J", "UNITS", "SHAPES", "F32", "Family", "FAMILIES", "dead_heads", "dead_kv", "plant", "widths",
           "build", "token_ids"]

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
    qk_rows: bool = False                   # a dead head's q and k rows are zero too (q/k norms span all heads)
    rtol: float = 1e-9                      # float32 norms inside a float64 model: float32 rounding
    stream: bool = True                     # plant the dead stream channels J
    single_q: bool = False                  # GQA: single dead q heads in live kv groups (no dead kv head)


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
                    qk_rows=True, rtol=F32),
    "stablelm": Family(lambda tf, kv: tf.StableLmForCausalLM(_cfg(tf, "StableLmConfig", kv)), "model.layers.{}",
                       **_plain(2), **_GATED, **_PRE),
}


def dead_heads(fam: Family) -> list[list[int]]:
    """q heads planted dead per layer: MHA head 1 / heads 0, 3; GQA: kv group 0 / kv group 1 with their q
    heads, or with ``single_q`` head 1 / heads 0, 3 again (one q head of a live group / one in each group)."""
    return [[1], [0, 3]] if fam.kv == H or fam.single_q else [[0, 1], [2, 3]]


def dead_kv(fam: Family, heads: list[int]) -> int:
    """kv heads planted dead in a layer whose dead q heads are ``heads``."""
    if fam.kv == H:
        return len(heads)
    return 0 if fam.single_q else len(heads) // (H // fam.kv)


def _get(root, name):
    return root.get_submodule(name)


@torch.no_grad()
def plant(m, fam: Family) -> None:
    g = torch.Generator().manual_seed(1)
    off = -1.0 if fam.gemma else 0.0
    r = H // fam.kv
    J_ = J if fam.stream else []
    for i, heads in enumerate(dead_heads(fam)):
        layer = _get(m, fam.layers.format(i))
        o = _get(layer, fam.o)
        for h in heads:
            o.weight[:, h * D:(h + 1) * D] = 0
        if fam.qk_rows:  # (GQA: the dead kv group's k rows are zeroed below anyway)
            for h in heads:
                for name, rows in fam.q(h) + fam.k(h // r):
                    _get(layer, name).weight[list(rows)] = 0
        if fam.kv < H and not fam.single_q:
            for kvh in sorted({h // r for h in heads}):
                for name, rows in fam.k(kvh) + fam.v(kvh):
                    lin = _get(layer, name)
                    lin.weight[list(rows)] = 0
                    if lin.bias is not None:
                        lin.bias[list(rows)] = 0
        _get(layer, fam.down).weight[:, UNITS] = 0
        for name in fam.writers:
            _get(layer, name).weight[J_] = 0
        for name in fam.stream_norms + list(fam.post_norms):
            _get(layer, name).weight[J_] = off
        for name in fam.direct:
            _get(layer, name).weight[:, J_] = 0
    for name in fam.embeds:
        _get(m, name).weight[:, J_] = torch.randn(len(J_), generator=g)
    _get(m, fam.final_norm).weight[J_] = off


def widths(s, fam: Family, i: int) -> dict[str, int]:
    """Kept q heads, kv heads, MLP units and stream channels of layer ``i`` of the minimized model."""
    p = dict(s.named_parameters())
    pre = fam.layers.format(i)
    heads = p[f"{pre}.{fam.o}.weight"].shape[1] // D
    qkv = {name for name, _ in fam.q(0) + fam.k(0) + fam.v(0)}
    if len(qkv) == 1:  # fused: (q heads + 2 kv heads) * D rows
        kv = (p[f"{pre}.{qkv.pop()}.weight"].shape[0] // D - heads) // 2
    else:
        kv = p[f"{pre}.{fam.k(0)[0][0]}.weight"].shape[0] // D
    table = {v.shape[1] for v in p.values() if v.dim() == 2 and v.shape[0] == 100}  # token table (tied or not)
    return dict(heads=heads, kv=kv, units=p[f"{pre}.{fam.down}.weight"].shape[1], stream=min(table))


def build(name: str, **changes: Any) -> tuple[nn.Module, Family]:
    """Family ``name`` (fields replaced by ``changes``, e.g. ``kv=H``) built with seed 0, planted, in
    float64 eval mode."""
    import transformers as tf

    fam = replace(FAMILIES[name], **changes)
    torch.manual_seed(0)
    m = fam.build(tf, fam.kv)
    plant(m, fam)
    return m.eval().double(), fam


def token_ids(b: int, t: int, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))
