"""Transformers: how much ``sqr_fx.minimize`` removes under planted structured sparsity, and is it exact.

Models with seeded random weights (no downloads), trained-looking LayerNorm/BatchNorm parameters
(``sqr_fx.masking.randomize_norm_stats``): torchvision ``vit_b_16``, ``swin_t``, ``convnext_tiny``;
Hugging Face ``BertModel``, ``GPT2LMHeadModel`` (tied embeddings), ``ViTForImageClassification``
at the moderate configurations of ``HF_CONFIGS``. Masks:

* ``planted``: per layer, 25 % of the attention heads dead (the output projection's input columns
  of the head zeroed: nothing reads it), 25 % of the MLP hidden units dead (the second MLP
  linear's input columns zeroed), and, where the model allows it, 3 dead residual-stream
  channels (every writer writes a constant, every LayerNorm output is ignored or has gamma 0);
* ``dims``: in every head, 25 % of the key dims constant (zero key rows: a per-query shift of the
  scores) and 25 % of the value dims constant (zero value rows, non-zero bias), positions drawn per head
  (same count in every head, so a rectangular [H, D'] layout can hold them);
* ``d25+m70``: the standard mask of the CNN benchmark (``benchmarks/workload.py``; GPT-2's Conv1D
  projections included, rows = output units).

Measured per (model, mask): size ratio (stored floats dense / minimized), max relative output
error in float32 against the masked model on fresh inputs at the traced shape and at a second
shape (other batch and sequence length / resolution; fixed-size models: other batch only), pass
wall time, and how many planted heads / MLP units / stream channels / per-head dims were NOT removed
(read off the shapes of the minimized weights).

    nice -n 10 python -m benchmarks.transformers            # ~3 min on 2 shared CPUs
    python -m benchmarks.transformers --quick               # Hugging Face models + swin_t, planted only
    python -m benchmarks.transformers --models bert gpt2 --masks planted --out /tmp/t

Writes ``transformers.json`` and ``transformers.md`` into ``benchmarks/results/`` (``--quick``:
``benchmarks/results/tmp/quick/``) and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn

import sqr_fx
from benchmarks.measure import stored_floats, timed_runs
from benchmarks.workload import MASKS, masked_model
from sqr_fx.masking import randomize_norm_stats

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
EXACT = 1e-4
DEAD_HEADS = DEAD_MLP = DEAD_DIMS = 0.25
N_STREAM = 3
ALL_MASKS = ["planted", "dims", "d25+m70"]

TV_MODELS = ["vit_b_16", "swin_t", "convnext_tiny"]
HF_CONFIGS = {
    "bert": dict(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024, max_position_embeddings=128, use_cache=False),
    "gpt2": dict(vocab_size=1000, n_positions=128, n_embd=256, n_layer=4, n_head=4, use_cache=False,
                 tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    "hf_vit": dict(image_size=224, patch_size=16, num_channels=3, hidden_size=384, num_hidden_layers=6,
                   num_attention_heads=6, intermediate_size=1536, num_labels=1000),
}
MODELS = [*TV_MODELS, *HF_CONFIGS]
QUICK_MODELS = [*HF_CONFIGS, "swin_t"]
SEQ, SEQ2 = 32, 20  # token models: traced / second sequence length
RES, RES2 = 224, 160  # image models: traced / second resolution
BATCH, BATCH2 = 2, 3  # traced / second batch (size-1 dims would be specialised by torch.export)


# ---- the structure that is planted, and how to find what is left of it -----------------------------------------
@dataclass
class Probe:
    """One planted structure in one layer, read back from the widths of minimized weights.

    Each read ``(names, axis, unit)`` is a weight (the first of ``names`` that exists) whose size along
    ``axis`` is ``before`` units of ``unit`` channels; ``planted`` of those units were made dead. After
    minimize, the units left are the largest width / unit over the reads (a head whose values went but
    whose queries stayed counts as kept).
    """

    kind: str  # "heads" | "mlp" | "stream"
    reads: list[tuple[tuple[str, ...], int, int]]
    before: int
    planted: int
    after: float | None = None  # filled in after minimize (None: a weight was not found)
    missing: list[str] = field(default_factory=list)
    fn: Callable[[dict[str, torch.Tensor]], float | None] | None = None  # a custom read (a width in units)

    def read(self, gm: nn.Module) -> None:
        tensors = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers())
        widths = []
        if self.fn is not None:
            w = self.fn(tensors)
            if w is None:
                self.missing.append(f"{self.kind}: custom read")
            else:
                widths.append(w)
        for names, axis, unit in self.reads:
            found = [tensors[n] for n in names if n in tensors]
            if found:
                widths.append(found[0].shape[axis] / unit)
            else:
                self.missing.append(names[0])
        self.after = max(widths) if widths and not self.missing else None

    @property
    def removed(self) -> float | None:
        return None if self.after is None else self.before - self.after


def _pick(n: int, frac: float, g: torch.Generator) -> list[int]:
    """round(frac * n) sorted random indices out of n, at least 1 and at most n - 1."""
    k = min(max(1, round(frac * n)), n - 1)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def _cols(heads: list[int], d: int) -> list[int]:
    return [h * d + i for h in heads for i in range(d)]


@torch.no_grad()
def _dead_heads(weight: torch.Tensor, heads: int, g: torch.Generator, in_axis: int = 1) -> list[int]:
    """Zero the output projection's input channels of 25 % of the heads; returns the heads."""
    d = weight.shape[in_axis] // heads
    dead = _pick(heads, DEAD_HEADS, g)
    if in_axis == 1:
        weight[:, _cols(dead, d)] = 0
    else:  # transformers' Conv1D stores [in, out]
        weight[_cols(dead, d)] = 0
    return dead


@torch.no_grad()
def _dead_units(weight: torch.Tensor, g: torch.Generator, in_axis: int = 1) -> list[int]:
    """Zero 25 % of the second MLP linear's input columns (hidden units nothing reads)."""
    dead = _pick(weight.shape[in_axis], DEAD_MLP, g)
    if in_axis == 1:
        weight[:, dead] = 0
    else:
        weight[dead] = 0
    return dead


# ---- torchvision -------------------------------------------------------------------------------------------------
def build_tv(name: str) -> nn.Module:
    """Seeded random init with trained-looking norms. torchvision zero-initialises ViT's head
    (every logit would be its bias: any error is hidden) and sets ConvNeXt's layer scale to 1e-6
    (the blocks would vanish from the output): both get trained-looking values."""
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED + 1)
    m = torchvision.models.get_model(name, weights=None)
    with torch.no_grad():
        if name == "vit_b_16":
            m.heads.head.weight.normal_(0, 0.05, generator=g)
            m.heads.head.bias.normal_(0, 0.1, generator=g)
        if name == "convnext_tiny":
            for blk in m.modules():
                if isinstance(blk, torchvision.models.convnext.CNBlock):
                    blk.layer_scale.uniform_(0.1, 1.0, generator=g)
    return randomize_norm_stats(m, g).eval()


@torch.no_grad()
def plant_vit_b_16(m: nn.Module, g: torch.Generator) -> list[Probe]:
    """Heads through nn.MultiheadAttention's out_proj columns; MLP units (mlp.3 columns); stream channels J:
    patch-embedding row j zero (writes its bias), class token j equal to that bias, position embedding j the
    same at every position, out_proj and fc2 rows j zero, LN_1 / LN_2 outputs j ignored (in_proj / fc1
    columns), final LN gamma_j = 0 (the head reads the class token of the final LN)."""
    probes = []
    c = m.hidden_dim
    J = _pick(c, N_STREAM / c, g)
    m.conv_proj.weight[J] = 0
    m.class_token[..., J] = m.conv_proj.bias[J]
    m.encoder.pos_embedding[..., J] = torch.randn(len(J), generator=g)
    for i, layer in enumerate(m.encoder.layers):
        a = layer.self_attention
        pre = f"encoder.layers.encoder_layer_{i}."
        dead = _dead_heads(a.out_proj.weight, a.num_heads, g)
        probes.append(Probe("heads", [((pre + "self_attention.out_proj.weight",), 1, a.head_dim),  # rewritten q
                                      ((pre + "self_attention.sqr_fx_q_weight",), 0, a.head_dim)],
                            a.num_heads, len(dead)))
        fc1, fc2 = layer.mlp[0], layer.mlp[3]
        units = _dead_units(fc2.weight, g)
        probes.append(Probe("mlp", [((pre + "mlp.0.weight",), 0, 1)], fc1.out_features, len(units)))
        a.in_proj_weight[:, J] = 0
        a.out_proj.weight[J] = 0
        fc1.weight[:, J] = 0
        fc2.weight[J] = 0
    m.encoder.ln.weight[J] = 0
    probes.append(Probe("stream", [(("conv_proj.weight",), 0, 1)], c, len(J)))
    return probes


@torch.no_grad()
def plant_swin_t(m: nn.Module, g: torch.Generator) -> list[Probe]:
    """Heads through the window attention's proj columns; MLP units (mlp.3 columns); stream channels J of
    stage 0 that hold 0: stem conv row and bias zero, stem LN gamma_j = beta_j = 0, qkv and fc1 columns j
    zero (norm1 / norm2 outputs ignored), proj and fc2 rows and biases j zero, the PatchMerging reduction
    ignores the four slots of j. (A non-zero constant cannot cross PatchMerging: at an odd size it pads
    with zeros, so channel j would not be constant there.)"""
    probes = []
    for name, mod in m.named_modules():
        if isinstance(mod, torchvision.models.swin_transformer.ShiftedWindowAttention):
            h = mod.num_heads
            dead = _dead_heads(mod.proj.weight, h, g)
            d = mod.proj.in_features // h
            probes.append(Probe("heads", [((f"{name}.proj.weight",), 1, d), ((f"{name}.qkv.q_weight",), 0, d)],
                                h, len(dead)))
        elif isinstance(mod, torchvision.ops.MLP):
            units = _dead_units(mod[3].weight, g)
            probes.append(Probe("mlp", [((f"{name}.0.weight",), 0, 1)], mod[0].out_features, len(units)))
    stem, stem_ln = m.features[0][0], m.features[0][2]
    c = stem.out_channels
    J = _pick(c, N_STREAM / c, g)
    stem.weight[J] = 0
    stem.bias[J] = 0
    stem_ln.weight[J] = 0
    stem_ln.bias[J] = 0
    for blk in m.features[1]:
        blk.attn.qkv.weight[:, J] = 0
        blk.attn.proj.weight[J] = 0
        blk.attn.proj.bias[J] = 0
        blk.mlp[0].weight[:, J] = 0
        blk.mlp[3].weight[J] = 0
        blk.mlp[3].bias[J] = 0
    m.features[2].reduction.weight[:, [k * c + j for k in range(4) for j in J]] = 0
    probes.append(Probe("stream", [(("features.0.0.weight",), 0, 1)], c, len(J)))
    return probes


@torch.no_grad()
def plant_convnext_tiny(m: nn.Module, g: torch.Generator) -> list[Probe]:
    """MLP units of every block (block.5 columns); stream channels J of stage 0 (as in
    tests/test_transformers.py::test_torchvision_convnext_tiny_planted_stream_channels): stem row and
    bias zero, stem LN gamma_j = 0, dwconv rows j zero, fc1 ignores LN output j, fc2 row and bias j
    zero, the downsampling conv ignores LN2d output j."""
    probes = []
    for s, stage in enumerate(m.features):
        if not isinstance(stage, nn.Sequential) or not isinstance(stage[0], torchvision.models.convnext.CNBlock):
            continue
        for b, blk in enumerate(stage):
            fc1, fc2 = blk.block[3], blk.block[5]
            units = _dead_units(fc2.weight, g)
            probes.append(Probe("mlp", [((f"features.{s}.{b}.block.3.weight",), 0, 1)], fc1.out_features,
                                len(units)))
    c = m.features[0][0].out_channels
    J = _pick(c, N_STREAM / c, g)
    m.features[0][0].weight[J] = 0
    m.features[0][0].bias[J] = 0
    m.features[0][1].weight[J] = 0
    for blk in m.features[1]:
        blk.block[0].weight[J] = 0
        blk.block[3].weight[:, J] = 0
        blk.block[5].weight[J] = 0
        blk.block[5].bias[J] = 0
    m.features[2][1].weight[:, J] = 0
    probes.append(Probe("stream", [(("features.0.0.weight",), 0, 1)], c, len(J)))
    return probes


# ---- Hugging Face ------------------------------------------------------------------------------------------------
def build_hf(name: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED + 1)
    cls, cfg = {"bert": (tf.BertModel, tf.BertConfig), "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config),
                "hf_vit": (tf.ViTForImageClassification, tf.ViTConfig)}[name]
    m = cls(cfg(**HF_CONFIGS[name]))
    if name == "gpt2":
        assert m.lm_head.weight is m.transformer.wte.weight, "GPT-2 embeddings are not tied"
    return randomize_norm_stats(m, g).eval()


@torch.no_grad()
def plant_bert(m: nn.Module, g: torch.Generator) -> list[Probe]:
    """Heads (attention.output.dense columns) and MLP units (output.dense columns). No stream channels:
    BertModel returns the residual stream itself (last_hidden_state), so no stream channel can go."""
    probes = []
    h = m.config.num_attention_heads
    d = m.config.hidden_size // h
    for i, layer in enumerate(m.encoder.layer):
        pre = f"encoder.layer.{i}."
        dead = _dead_heads(layer.attention.output.dense.weight, h, g)
        probes.append(Probe("heads", [((pre + "attention.output.dense.weight",), 1, d),
                                      ((pre + "attention.self.query.weight",), 0, d)], h, len(dead)))
        units = _dead_units(layer.output.dense.weight, g)
        probes.append(Probe("mlp", [((pre + "intermediate.dense.weight",), 0, 1)],
                            layer.intermediate.dense.out_features, len(units)))
    return probes


@torch.no_grad()
def plant_gpt2(m: nn.Module, g: torch.Generator) -> list[Probe]:
    """Heads (attn.c_proj rows: Conv1D is [in, out]) and MLP units (mlp.c_proj rows); stream channels J as in
    tests/test_transformers.py::_plant_gpt2_stream: wte / wpe columns j constant, ln_1 / ln_2 outputs j
    ignored (c_attn / c_fc rows), attention and MLP write only their bias (c_proj columns), ln_f gamma_j = 0.
    wte is also the (tied) lm_head."""
    probes = []
    t = m.transformer
    c, h = m.config.n_embd, m.config.n_head
    J = _pick(c, N_STREAM / c, g)
    t.wte.weight[:, J] = torch.randn(len(J), generator=g)
    t.wpe.weight[:, J] = torch.randn(len(J), generator=g)
    for i, blk in enumerate(t.h):
        pre = f"transformer.h.{i}."
        dead = _dead_heads(blk.attn.c_proj.weight, h, g, in_axis=0)
        probes.append(Probe("heads", [((pre + "attn.c_proj.weight",), 0, c // h),  # c_attn: [in, q|k|v]
                                      ((pre + "attn.c_attn.weight",), 1, 3 * (c // h))], h, len(dead)))
        units = _dead_units(blk.mlp.c_proj.weight, g, in_axis=0)
        probes.append(Probe("mlp", [((pre + "mlp.c_fc.weight",), 1, 1)], blk.mlp.c_fc.weight.shape[1], len(units)))
        blk.attn.c_attn.weight[J, :] = 0
        blk.attn.c_proj.weight[:, J] = 0
        blk.mlp.c_fc.weight[J, :] = 0
        blk.mlp.c_proj.weight[:, J] = 0
    t.ln_f.weight[J] = 0
    probes.append(Probe("stream", [(("transformer.wte.weight", "lm_head.weight"), 1, 1)], c, len(J)))
    return probes


def _hf_vit_layers(m: nn.Module):
    return m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer


@torch.no_grad()
def plant_hf_vit(m: nn.Module, g: torch.Generator) -> list[Probe]:
    """Heads (o_proj columns), MLP units (fc2 columns); stream channels J as for torchvision's ViT: patch
    projection row j zero, CLS token j equal to its bias, position embedding j the same at every position,
    q/k/v and fc1 columns j zero, o_proj and fc2 rows j zero, final LayerNorm gamma_j = 0."""
    probes = []
    cfg = m.config
    c, h = cfg.hidden_size, cfg.num_attention_heads
    emb = m.vit.embeddings
    names = {id(mod): n for n, mod in m.named_modules()}
    proj = emb.patch_embeddings.projection
    J = _pick(c, N_STREAM / c, g)
    proj.weight[J] = 0
    emb.cls_token[..., J] = proj.bias[J]
    emb.position_embeddings[..., J] = torch.randn(len(J), generator=g)
    for layer in _hf_vit_layers(m):
        at = layer.attention
        if hasattr(at, "o_proj"):
            qkv, o, fc1, fc2 = (at.q_proj, at.k_proj, at.v_proj), at.o_proj, layer.mlp.fc1, layer.mlp.fc2
        else:  # transformers < 5
            s = at.attention
            qkv, o = (s.query, s.key, s.value), at.output.dense
            fc1, fc2 = layer.intermediate.dense, layer.output.dense
        dead = _dead_heads(o.weight, h, g)
        probes.append(Probe("heads", [((f"{names[id(o)]}.weight",), 1, c // h),
                                      ((f"{names[id(qkv[0])]}.weight",), 0, c // h)], h, len(dead)))
        units = _dead_units(fc2.weight, g)
        probes.append(Probe("mlp", [((f"{names[id(fc1)]}.weight",), 0, 1)], fc1.out_features, len(units)))
        for lin in (*qkv, fc1):
            lin.weight[:, J] = 0
        o.weight[J] = 0
        fc2.weight[J] = 0
    m.vit.layernorm.weight[J] = 0
    probes.append(Probe("stream", [((f"{names[id(proj)]}.weight",), 0, 1)], c, len(J)))
    return probes


# ---- per-head dims (mask "dims") --------------------------------------------------------------------------------
def _head_dims(heads: int, d: int, g: torch.Generator) -> list[int]:
    """25 % of the dims of every head, drawn per head (same count, other positions), as flat channel ids."""
    return [h * d + i for h in range(heads) for i in _pick(d, DEAD_DIMS, g)]


def _either(first: str, fallback: str, fallback_unit: int, axis: int = 0):
    """Width of ``first`` (a rewritten per-role weight) or of ``fallback`` (the packed original) / unit."""
    def fn(t: dict[str, torch.Tensor]) -> float | None:
        if first in t:
            return t[first].shape[axis]
        return t[fallback].shape[axis] / fallback_unit if fallback in t else None
    return fn


@torch.no_grad()
def _plant_packed_dims(w: torch.Tensor, b: torch.Tensor, c: int, heads: int, g: torch.Generator,
                       cols: bool = False) -> tuple[int, int]:
    """Packed q|k|v projection of width 3c: key dims constant (zero rows: k = its bias, a per-query shift of
    the scores), value dims constant (zero rows, bias drawn non-zero). ``cols``: Conv1D's [in, out]."""
    d = c // heads
    k, v = _head_dims(heads, d, g), _head_dims(heads, d, g)
    kk, vv = [c + i for i in k], [2 * c + i for i in v]
    if cols:
        w[:, kk] = 0
        w[:, vv] = 0
    else:
        w[kk] = 0
        w[vv] = 0
    b[vv] = torch.randn(len(vv), generator=g)
    return len(k), len(v)


@torch.no_grad()
def dims_vit_b_16(m: nn.Module, g: torch.Generator) -> list[Probe]:
    probes = []
    for i, layer in enumerate(m.encoder.layers):
        a = layer.self_attention
        e, pre = a.embed_dim, f"encoder.layers.encoder_layer_{i}.self_attention."
        nk, nv = _plant_packed_dims(a.in_proj_weight, a.in_proj_bias, e, a.num_heads, g)
        probes.append(Probe("q/k dims", [], e, nk, fn=_either(pre + "sqr_fx_q_weight", pre + "in_proj_weight", 3)))
        probes.append(Probe("v dims", [], e, nv, fn=_either(pre + "sqr_fx_v_weight", pre + "in_proj_weight", 3)))
    return probes


@torch.no_grad()
def dims_swin_t(m: nn.Module, g: torch.Generator) -> list[Probe]:
    probes = []
    for name, mod in m.named_modules():
        if isinstance(mod, torchvision.models.swin_transformer.ShiftedWindowAttention):
            c = mod.qkv.in_features
            nk, nv = _plant_packed_dims(mod.qkv.weight, mod.qkv.bias, c, mod.num_heads, g)
            probes.append(Probe("q/k dims", [], c, nk, fn=_either(f"{name}.qkv.q_weight", f"{name}.qkv.weight", 3)))
            probes.append(Probe("v dims", [], c, nv, fn=_either(f"{name}.qkv.v_weight", f"{name}.qkv.weight", 3)))
    return probes


@torch.no_grad()
def _dims_separate(q: nn.Linear, k: nn.Linear, v: nn.Linear, heads: int, names: dict, g) -> list[Probe]:
    c = q.out_features
    kd, vd = _head_dims(heads, c // heads, g), _head_dims(heads, c // heads, g)
    k.weight[kd] = 0
    v.weight[vd] = 0
    v.bias[vd] = torch.randn(len(vd), generator=g)
    return [Probe("q/k dims", [((f"{names[id(q)]}.weight",), 0, 1)], c, len(kd)),
            Probe("v dims", [((f"{names[id(v)]}.weight",), 0, 1)], c, len(vd))]


@torch.no_grad()
def dims_bert(m: nn.Module, g: torch.Generator) -> list[Probe]:
    names = {id(mod): n for n, mod in m.named_modules()}
    h = m.config.num_attention_heads
    return [p for layer in m.encoder.layer
            for p in _dims_separate(layer.attention.self.query, layer.attention.self.key,
                                    layer.attention.self.value, h, names, g)]


@torch.no_grad()
def dims_hf_vit(m: nn.Module, g: torch.Generator) -> list[Probe]:
    names = {id(mod): n for n, mod in m.named_modules()}
    h = m.config.num_attention_heads
    return [p for layer in _hf_vit_layers(m)
            for p in _dims_separate(layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj, h,
                                    names, g)]


@torch.no_grad()
def dims_gpt2(m: nn.Module, g: torch.Generator) -> list[Probe]:
    """c_attn is [in, q|k|v] (Conv1D): v dims are read off c_proj's rows, q/k dims off the rest of c_attn."""
    probes = []
    c, h = m.config.n_embd, m.config.n_head
    for i, blk in enumerate(m.transformer.h):
        pre = f"transformer.h.{i}.attn."
        nk, nv = _plant_packed_dims(blk.attn.c_attn.weight, blk.attn.c_attn.bias, c, h, g, cols=True)

        def qk(t, pre=pre):
            a, o = t.get(pre + "c_attn.weight"), t.get(pre + "c_proj.weight")
            return None if a is None or o is None else (a.shape[1] - o.shape[0]) / 2
        probes.append(Probe("q/k dims", [], c, nk, fn=qk))
        probes.append(Probe("v dims", [((pre + "c_proj.weight",), 0, 1)], c, nv))
    return probes


# ---- the cases ---------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    config: str
    build: Callable[[], nn.Module]
    plant: Callable[[nn.Module, torch.Generator], list[Probe]]  # mask "planted"
    plant_dims: Callable[[nn.Module, torch.Generator], list[Probe]] | None  # mask "dims"
    tokens: bool  # inputs are token ids (else images)
    fixed_size: bool = False  # images of one resolution only: the second shape changes the batch only
    vocab: int = 0
    skip_masks: dict[str, str] = field(default_factory=dict)  # mask -> why it is not run
    no_stream: str = ""  # why no stream channels are planted

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if self.tokens:
            return (BATCH, SEQ), (BATCH2, SEQ2)
        r2 = RES if self.fixed_size else RES2
        return (BATCH, 3, RES, RES), (BATCH2, 3, r2, r2)

    def inputs(self, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        if self.tokens:
            return (torch.randint(0, self.vocab, shape, generator=g),)
        return (torch.randn(shape, generator=g),)


def _hf_desc(name: str) -> str:
    c = HF_CONFIGS[name]
    if name == "gpt2":
        return (f"GPT2LMHeadModel, tied embeddings: {c['n_layer']} layers, hidden {c['n_embd']}, {c['n_head']} heads, "
                f"MLP {4 * c['n_embd']}, vocab {c['vocab_size']}")
    kind = "BertModel" if name == "bert" else "ViTForImageClassification"
    extra = f"vocab {c['vocab_size']}" if name == "bert" else \
        f"{c['image_size']} px / patch {c['patch_size']}, {c['num_labels']} classes"
    return (f"{kind}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads, "
            f"MLP {c['intermediate_size']}, {extra}")


def cases() -> dict[str, Case]:
    vocab = {k: c["vocab_size"] for k, c in HF_CONFIGS.items() if "vocab_size" in c}
    return {
        "vit_b_16": Case("vit_b_16", "torchvision default: 12 layers, hidden 768, 12 heads, MLP 3072, 224 px",
                         lambda: build_tv("vit_b_16"), plant_vit_b_16, dims_vit_b_16, tokens=False, fixed_size=True),
        "swin_t": Case("swin_t", "torchvision default: depths 2-2-6-2, dim 96, heads 3-6-12-24, window 7",
                       lambda: build_tv("swin_t"), plant_swin_t, dims_swin_t, tokens=False),
        "convnext_tiny": Case("convnext_tiny", "torchvision default: depths 3-3-9-3, dims 96-768",
                              lambda: build_tv("convnext_tiny"), plant_convnext_tiny, None, tokens=False,
                              skip_masks={"dims": "no attention"}),
        "bert": Case("bert", _hf_desc("bert"), lambda: build_hf("bert"), plant_bert, dims_bert, tokens=True,
                     vocab=vocab["bert"], no_stream="no stream channels planted: BertModel returns the residual "
                                                    "stream (last_hidden_state), so none can go"),
        "gpt2": Case("gpt2", _hf_desc("gpt2"), lambda: build_hf("gpt2"), plant_gpt2, dims_gpt2, tokens=True,
                     vocab=vocab["gpt2"]),
        "hf_vit": Case("hf_vit", _hf_desc("hf_vit"), lambda: build_hf("hf_vit"), plant_hf_vit, dims_hf_vit,
                       tokens=False, fixed_size=True),
    }


# ---- measurement -------------------------------------------------------------------------------------------------
def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # also Hugging Face ModelOutput
        return [t for k in sorted(out, key=str) for t in _tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


@torch.no_grad()
def output_error(ref_model: nn.Module, model: nn.Module, inputs: tuple) -> float:
    ref, out = _tensors(ref_model(*inputs)), _tensors(model(*inputs))
    if len(ref) != len(out) or not ref:
        raise RuntimeError(f"{len(out)} outputs instead of {len(ref)}")
    worst = 0.0
    for r, o in zip(ref, out):
        if r.shape != o.shape:
            raise RuntimeError(f"output shape {tuple(o.shape)} instead of {tuple(r.shape)}")
        e = sqr_fx.max_relative_error(r, o)
        worst = max(worst, e if e == e else float("inf"))
    return worst


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "sqr_fx" in f.filename] or frames
    f = own[-1] if own else None
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}" if f else ""


def summarize_probes(probes: list[Probe]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in probes:
        s = out.setdefault(p.kind, {"layers": 0, "planted": 0, "removed": 0.0, "not_removed": 0.0,
                                    "extra_removed": 0.0, "missing": []})
        s["layers"] += 1
        s["planted"] += p.planted
        if p.removed is None:
            s["missing"] += p.missing
            continue
        s["removed"] += p.removed
        s["not_removed"] += max(0.0, p.planted - p.removed)
        s["extra_removed"] += max(0.0, p.removed - p.planted)
    return out


def run_one(case: Case, mask: str, dense: nn.Module, repeats: int, slow_s: float) -> dict[str, Any]:
    row: dict[str, Any] = {"model": case.name, "config": case.config, "mask": mask, "no_stream": case.no_stream}
    if mask in case.skip_masks:
        row.update(status="not run", reason=case.skip_masks[mask])
        return row
    t0 = time.perf_counter()
    if mask in ("planted", "dims"):
        model = copy.deepcopy(dense)
        probes = (case.plant if mask == "planted" else case.plant_dims)(model, torch.Generator().manual_seed(SEED + 2))
        model.eval()
    else:
        model, probes = masked_model(dense, MASKS[mask]), []
    shape, shape2 = case.shapes()
    example = case.inputs(shape, SEED + 3)
    row.update(shape=list(shape), shape2=list(shape2), size_before=stored_floats(dense),
               second_note="other batch (fixed-size model)" if case.fixed_size else "other batch and size")
    try:
        times, small = timed_runs(lambda: sqr_fx.minimize(model, example), repeats, slow_s)
    except Exception as exc:  # noqa: BLE001 - recorded, not worked around
        row.update(status="minimize fails", error=f"{type(exc).__name__}: {exc}"[:2000], where=_where(exc),
                   traceback=traceback.format_exc()[-4000:])
        return row
    rep = small.sqr_report
    row.update(status="ok", pass_s=sorted(times)[len(times) // 2], pass_times=times, pass_runs=len(times),
               size_after=stored_floats(small), frontend=rep.frontend, rounds=rep.rounds,
               frozen_ops=list(rep.frozen_ops), shared_tensors=list(rep.shared_tensors),
               tied_tensors=list(rep.tied_tensors),
               compensated_norms=sum(1 for n in small.graph.nodes if "compensated" in str(n.target)))
    row["ratio"] = row["size_before"] / row["size_after"]
    for key, shp, seed in (("err", shape, SEED + 4), ("err2", shape2, SEED + 5)):
        try:
            row[key] = output_error(model, small, case.inputs(shp, seed))
        except Exception as exc:  # noqa: BLE001
            row[key] = None
            row[key + "_note"] = f"{type(exc).__name__}: {exc}"[:500]
    for p in probes:
        p.read(small)
    row["probes"] = [{k: v for k, v in asdict(p).items() if k != "fn"} for p in probes]
    row["structure"] = summarize_probes(probes)
    if any(row.get(k) is None or row[k] > EXACT for k in ("err", "err2")):
        row["status"] = "inexact"
    row["wall_s"] = time.perf_counter() - t0
    return row


# ---- report ------------------------------------------------------------------------------------------------------
def _e(v: Any) -> str:
    if v is None:
        return "fails"
    return "0" if v == 0 else (f"{v:.0e}" if v < 1e-3 else f"{v:.3g}") + (" ✗" if v > EXACT else "")


def _n(v: float) -> str:
    return f"{v:g}"


def _structure_cell(row: dict) -> str:
    """``kind removed/planted`` for every planted kind (units: heads, MLP units, channels, per-head dims)."""
    parts = []
    for kind, s in row.get("structure", {}).items():
        if s["missing"]:
            parts.append(f"{kind} ? ({len(s['missing'])} weights not found)")
        else:
            parts.append(f"{kind} {_n(s['removed'] - s['extra_removed'])}/{s['planted']}")
    return ", ".join(parts) or "-"


def _not_removed(row: dict) -> str:
    if row.get("status") not in ("ok", "inexact") or not row.get("structure"):
        return "-"
    parts = []
    for kind, s in row["structure"].items():
        if s["missing"]:
            parts.append(f"{kind}: weights not found")
        elif s["not_removed"]:
            parts.append(f"{_n(s['not_removed'])} {kind}")
    return ", ".join(parts) or "none"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# sqr_fx on transformers: planted structured sparsity",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}: torch {meta['torch']}, torchvision "
        f"{meta['torchvision']}, transformers {meta['transformers']}, {meta['cpu_count']} CPU(s), "
        f"{meta['threads']} thread, load average at start {', '.join(f'{x:.1f}' for x in meta['loadavg_start'])}. "
        f"Total {meta['wall_s']:.0f} s.",
        "",
        "Masks: `planted`: per layer 25 % of the heads dead (output-projection columns zero), 25 % of the "
        "MLP hidden units dead (second MLP linear's columns zero), plus 3 dead residual-stream channels "
        "where the model allows it. `dims`: in every head, 25 % of the key dims constant (zero key rows) and "
        "25 % of the value dims constant (zero value rows, non-zero bias), positions drawn per head. "
        "`d25+m70`: the CNN benchmark's standard mask (25 % dead rows and columns per layer, then 70 % global "
        "magnitude). Size: stored floats dense / minimized. Error: max relative output error (float32) "
        "against the masked model, fresh inputs at the traced shape / at a second shape (other batch and "
        f"size; fixed-size models: other batch); ✗ marks > {EXACT:g}. Removed: planted units removed / "
        "planted (read off the minimized weights' widths). Pass: median wall time of `sqr_fx.minimize` "
        "(warm-up excluded; n=1: single run).",
        "",
        "| model | mask | size | err traced | err second | pass (s) | removed / planted | not removed | status |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        if r["status"] in ("ok", "inexact"):
            shp = "x".join(map(str, r["shape"])) + " / " + "x".join(map(str, r["shape2"]))
            runs = "" if r["pass_runs"] > 1 else " (n=1)"
            lines.append(
                f"| {r['model']} | {r['mask']} | {r['ratio']:.2f}x | {_e(r['err'])} | {_e(r['err2'])} | "
                f"{r['pass_s']:.1f}{runs} | {_structure_cell(r)} | {_not_removed(r)} | "
                f"{r['status']} ({r['frontend']}, {shp}) |")
        else:
            why = (r.get("error") or r.get("reason") or "").replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['model']} | {r['mask']} | - | - | - | - | - | - | {r['status']}: {why[:160]} |")
    lines += ["", "Models (ops without a rule: sqr_fx keeps the channels they touch):", ""]
    seen = set()
    for r in rows:
        if r["model"] not in seen:
            seen.add(r["model"])
            frozen = sorted({re.sub(r"_\d+$", "", f) for x in rows if x["model"] == r["model"]
                             for f in x.get("frozen_ops", [])})
            shown = ", ".join(f"`{f}`" for f in frozen[:12]) + (f" (+{len(frozen) - 12})" if len(frozen) > 12 else "")
            note = f"; {r['no_stream']}" if r.get("no_stream") else ""
            lines.append(f"* `{r['model']}`: {r['config']}{note}. Ops without a rule: {shown or 'none'}")
    failures = [r for r in rows if r["status"] not in ("ok", "not run")]
    if failures:
        lines += ["", "Failures / inexact results:", ""]
        for r in failures:
            detail = r.get("error") or f"err {r.get('err')} / {r.get('err2')} {r.get('err_note', '')} " \
                                       f"{r.get('err2_note', '')}"
            lines.append(f"* `{r['model']}` `{r['mask']}`: {detail} ({r.get('where', '')})")
    return "\n".join(lines) + "\n"


def meta_info(args: argparse.Namespace, wall: float, load: tuple) -> dict[str, Any]:
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "loadavg_start": list(load), "wall_s": wall, "seed": SEED, "dead_heads": DEAD_HEADS,
        "dead_mlp": DEAD_MLP, "stream_channels": N_STREAM, "exact_rtol": EXACT, "repeats": args.repeats,
        "batch": [BATCH, BATCH2], "seq": [SEQ, SEQ2], "res": [RES, RES2], "hf_configs": HF_CONFIGS,
        "command": "python -m benchmarks.transformers" + (" --quick" if args.quick else "")
                   + (f" --models {' '.join(args.models)}" if args.models_given else "")
                   + (f" --masks {' '.join(args.masks)}" if args.masks_given else ""),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transformers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"{', '.join(QUICK_MODELS)}, planted mask, one timed pass (< 2 min)")
    p.add_argument("--models", nargs="+", choices=MODELS, help=f"default: {' '.join(MODELS)}")
    p.add_argument("--masks", nargs="+", choices=ALL_MASKS, help=f"default: {' '.join(ALL_MASKS)}")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--repeats", type=int, help="timed passes after one warm-up (default 2 at planted, 0 "
                                               "otherwise; --quick: 0)")
    p.add_argument("--slow-s", type=float, default=20.0, help="a warm-up pass slower than this is the only run")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results, --quick: .../tmp/quick)")
    a = p.parse_args(argv)
    a.models_given, a.masks_given = a.models is not None, a.masks is not None
    a.models = a.models or (QUICK_MODELS if a.quick else MODELS)
    a.masks = a.masks or (["planted"] if a.quick else ALL_MASKS)
    a.out = a.out or (RESULTS / "tmp" / "quick" if a.quick else RESULTS)
    return a


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    load = os.getloadavg()
    t0 = time.perf_counter()
    all_cases = cases()
    rows = []
    for name in a.models:
        case = all_cases[name]
        print(f"[{time.perf_counter() - t0:6.0f} s] {name}: building", flush=True)
        dense = case.build()
        for mask in a.masks:
            repeats = a.repeats if a.repeats is not None else (0 if a.quick or mask != "planted" else 2)
            row = run_one(case, mask, dense, repeats, a.slow_s)
            rows.append(row)
            msg = (f"size {row['ratio']:.2f}x err {_e(row['err'])} / {_e(row['err2'])} pass {row['pass_s']:.1f} s "
                   f"not removed: {_not_removed(row)}" if "ratio" in row else row.get("error") or row.get("reason"))
            print(f"[{time.perf_counter() - t0:6.0f} s]   {mask}: {row['status']}: {msg}", flush=True)
        del dense
    meta = meta_info(a, time.perf_counter() - t0, load)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "transformers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    md = markdown(rows, meta)
    (a.out / "transformers.md").write_text(md)
    print("\n" + md)
    print(f"wrote {a.out / 'transformers.json'} and {a.out / 'transformers.md'}")
    return rows


if __name__ == "__main__":
    main()
