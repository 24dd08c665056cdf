"""Mixture-of-experts (Mixtral), T5, CLIP text and written-out LayerNorms: planted structure goes, exactly.

Every model test plants dead structure, checks that the widths shrank as planted AND that the result
equals the original in float64 (rtol 1e-9) at three shapes: the traced one, another batch, another
sequence length / resolution. Hugging Face models come from small random configs (no downloads).

* Mixtral: an expert hidden unit dead in EVERY expert leaves ``gate_up_proj`` (both halves) and
  ``down_proj`` of all experts; a unit dead in only some experts stays (``rules/moe.py``); dead heads and
  dead residual-stream channels go as in other Llama-like models (the float32 RMSNorm statistic is rebuilt
  at full width: ``layers.full_width_rms_norm``).
* T5: its RMSNorm (mean square of a float32 cast) is ``layers.upcast_rms_norm``; heads, MLP units and
  stream channels go.
* Written-out LayerNorm (``mean``/``var``/``var_mean``, ``sqrt``/``rsqrt``, last axis or ConvNeXt's
  channels-first axis 1) is read as ``F.layer_norm``; unbiased variance, two axes or a tensor eps are not.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqr_fx import check_equivalence, minimize
from sqr_fx.portable import sqr_fx_references
from sqr_fx.trace import to_graph

F64 = torch.float64
AUTO = torch.export.Dim.AUTO


def _ids(b: int, t: int, seed: int = 0, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _same(ref: nn.Module, small: nn.Module, *inputs, rtol: float = 1e-9) -> None:
    with torch.no_grad():
        a, b = ref(*inputs), small(*inputs)
    a = [v for v in (a.values() if isinstance(a, dict) else [a]) if isinstance(v, torch.Tensor)]
    b = [v for v in (b.values() if isinstance(b, dict) else [b]) if isinstance(v, torch.Tensor)]
    assert len(a) == len(b) and a
    for r, o in zip(a, b):
        torch.testing.assert_close(o, r, rtol=rtol, atol=rtol * r.abs().max().item())


def _p(s: nn.Module, name: str) -> tuple:
    return tuple(dict(s.named_parameters())[name].shape)


# ---- Mixtral -------------------------------------------------------------------------------------------------
_H, _D, _I, _E = 64, 16, 32, 4
DEAD_UNITS = [[3, 7], [3, 8]]  # per layer: dead in every expert
RAGGED = {11: [1], 12: [0, 2]}  # unit -> the experts it is dead in (not all): kept
STREAM = [5, 9]


def _mixtral(impl: str, layers: int = 2):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=100, hidden_size=_H, intermediate_size=_I, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=4, num_local_experts=_E, num_experts_per_tok=2,
                           max_position_embeddings=64, use_cache=False, experts_implementation=impl)
    m = tf.MixtralForCausalLM(cfg)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, STREAM] = 0
        for i, layer in enumerate(m.model.layers):
            a, ex = layer.self_attn, layer.mlp.experts
            a.o_proj.weight[:, i * _D:(i + 1) * _D] = 0  # head i
            a.o_proj.weight[STREAM] = 0
            ex.down_proj[:, STREAM, :] = 0
            ex.down_proj[:, :, DEAD_UNITS[i]] = 0
            for j, experts in RAGGED.items():
                ex.down_proj[experts, :, j] = 0
    return m.eval()


def _check_mixtral(s, layers: int, experts_name: bool = True) -> None:
    for i in range(layers):
        pre = f"model.layers.{i}"
        assert _p(s, f"{pre}.self_attn.q_proj.weight") == (3 * _D, _H - len(STREAM))
        assert _p(s, f"{pre}.self_attn.o_proj.weight") == (_H - len(STREAM), 3 * _D)
        if experts_name:
            assert _p(s, f"{pre}.mlp.experts.gate_up_proj") == (_E, 2 * (_I - 2), _H - len(STREAM))
            assert _p(s, f"{pre}.mlp.experts.down_proj") == (_E, _H - len(STREAM), _I - 2)
    assert _p(s, "model.embed_tokens.weight") == (100, _H - len(STREAM))


def test_mixtral_batched_mm_experts_heads_and_stream():
    """transformers' batched_mm experts (``bmm(W[ids], x)``, read as ``moe.expert_linear``), float64: the two
    units dead in every expert go from all four experts, the ragged ones stay; head i of layer i and the two
    dead stream channels go."""
    m = _mixtral("batched_mm", layers=1).double()  # (2 layers: the same, in 13 s)
    s = minimize(m, (_ids(2, 10),))
    _check_mixtral(s, 1)
    assert sqr_fx_references(s) == []  # expert_linear and the full-width RMSNorm written out in torch ops
    for b, t in [(2, 10), (1, 5), (3, 13)]:
        _same(m, s, _ids(b, t, seed=t))


def test_mixtral_grouped_mm_default_in_float32():
    """The default experts (``grouped_mm``): torch.export records ``transformers::grouped_mm_fallback`` on
    ``W.transpose(-2, -1)`` (folded into one ``[E, in, out]`` tensor). Float32 only: eager ``torch._grouped_mm``
    rejects float64 on CPU, so a float64 original does not run (the float64 test of this rule is below)."""
    m = _mixtral("grouped_mm", layers=1)
    s = minimize(m, (_ids(2, 10),))
    folded = sorted(tuple(t.shape) for t in s.parameters() if t.dim() == 3)
    assert folded == [(_E, _I - 2, _H - 2), (_E, _H - 2, 2 * (_I - 2))]
    for b, t in [(2, 10), (1, 5), (3, 13)]:
        _same(m, s, _ids(b, t, seed=t), rtol=2e-5)


class _GroupedExperts(nn.Module):
    """Tokens sorted by a fixed routing, then ``grouped_mm_fallback`` up, relu, down (float64)."""

    def __init__(self):
        super().__init__()
        pytest.importorskip("transformers.integrations.moe")
        g = torch.Generator().manual_seed(0)
        self.up = nn.Parameter(torch.randn(3, 6, 10, generator=g, dtype=F64))  # [E, in, out]
        self.down = nn.Parameter(torch.randn(3, 10, 5, generator=g, dtype=F64))
        with torch.no_grad():
            self.up[:, :, [2, 7]] = 0  # hidden units 2 and 7 dead in every expert (zero up columns)
            self.down[:, 4, :] = 0  # unit 4 unread in every expert
            self.down[1, 5, :] = 0  # unit 5 unread by expert 1 only: kept

    def forward(self, x):
        offs = torch.tensor([x.shape[0] // 3, 2 * x.shape[0] // 3, x.shape[0]], dtype=torch.int32)
        gm = torch.ops.transformers.grouped_mm_fallback
        return gm(torch.relu(gm(x, self.up, offs)), self.down, offs)


def test_grouped_mm_rule_float64():
    m = _GroupedExperts().eval()
    x = torch.randn(6, 6, dtype=F64)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: AUTO},)).module()
    s = minimize(ep, (x,))
    assert _p(s, "up") == (3, 6, 7) and _p(s, "down") == (3, 7, 5)
    for n in (6, 9, 12):
        _same(m, s, torch.randn(n, 6, dtype=F64, generator=torch.Generator().manual_seed(n)))


def ragged_expert_savings(model: nn.Module) -> tuple[int, int]:
    """(floats removed by all-experts units, floats per-expert ragged removal would ADD) over the MoE layers
    of a transformers Mixtral: unit j of expert e is dead when its gate row, up row or down column is zero;
    each (e, j) is ``3 * hidden`` floats (gate row, up row, down column)."""
    every = ragged = 0
    for layer in model.model.layers:
        ex = layer.mlp.experts
        inter = ex.down_proj.shape[2]
        gate, up = ex.gate_up_proj[:, :inter], ex.gate_up_proj[:, inter:]
        dead = (ex.down_proj == 0).all(1) | (gate == 0).all(2) | (up == 0).all(2)  # [E, I]
        per = 3 * ex.down_proj.shape[1]
        all_e = dead.all(0)
        every += int(all_e.sum()) * dead.shape[0] * per
        ragged += int((dead & ~all_e).sum()) * per
    return every, ragged


def test_ragged_expert_units_are_measured_not_removed():
    """Units dead in only some experts would save 3 * 64 floats per (expert, unit): 3 such pairs per layer
    here, 1,152 floats over 2 layers, next to 3,072 for the units dead in every expert."""
    m = _mixtral("batched_mm")
    assert ragged_expert_savings(m) == (2 * 2 * _E * 3 * _H, 2 * 3 * 3 * _H)


# ---- T5 ------------------------------------------------------------------------------------------------------
def _t5(kind: str, layers: int):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=100, d_model=_H, d_kv=_D, d_ff=_H, num_layers=layers, num_decoder_layers=layers,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      use_cache=False, dropout_rate=0.0, num_labels=3)
    m = (tf.T5ForTokenClassification if kind == "tok" else tf.T5ForConditionalGeneration)(cfg)
    stacks = [m.transformer.encoder] if kind == "tok" else [m.encoder, m.decoder]
    with torch.no_grad():
        (m.transformer.shared if kind == "tok" else m.shared).weight[:, STREAM] = 0
        for st in stacks:
            for i, blk in enumerate(st.block):
                for lay in blk.layer:
                    for name in ("SelfAttention", "EncDecAttention"):
                        a = getattr(lay, name, None)
                        if a is not None:
                            a.o.weight[:, i * _D:(i + 1) * _D] = 0
                            a.o.weight[STREAM] = 0
                    ff = getattr(lay, "DenseReluDense", None)
                    if ff is not None:
                        ff.wo.weight[:, DEAD_UNITS[i]] = 0
                        ff.wo.weight[STREAM] = 0
    return m.eval().double()


def test_t5_encoder_heads_units_and_stream():
    """T5 encoder + token classifier (logits the only output): head i of block i, two DenseReluDense units
    per block and the two dead stream channels go through the upcast RMSNorm."""
    m = _t5("tok", 2)
    s = minimize(m, (_ids(2, 10),))
    c = _H - len(STREAM)
    for i in range(2):
        pre = f"transformer.encoder.block.{i}.layer"
        assert _p(s, f"{pre}.0.SelfAttention.q.weight") == (3 * _D, c)
        assert _p(s, f"{pre}.1.DenseReluDense.wi.weight") == (_H - 2, c)
        assert _p(s, f"{pre}.1.DenseReluDense.wo.weight") == (c, _H - 2)
    assert _p(s, "transformer.encoder.embed_tokens.weight") == (100, c) and _p(s, "classifier.weight") == (3, c)
    assert sqr_fx_references(s) == []  # the full-width upcast RMSNorm written out in torch ops
    for b, t in [(2, 10), (1, 5), (3, 13)]:
        _same(m, s, _ids(b, t, seed=t))


def test_t5_seq2seq_heads_and_units():
    """T5ForConditionalGeneration: encoder and decoder self-attention heads, cross-attention heads and MLP
    units go. The stream stays: ``encoder_last_hidden_state`` is an output, and the embedding it starts
    from is shared with the decoder."""
    m = _t5("gen", 1)
    dec = lambda b, t: _ids(b, t + 2, seed=t + 1)  # noqa: E731
    s = minimize(m, (_ids(2, 10), None, dec(2, 10)))
    for st in ("encoder", "decoder"):
        assert _p(s, f"{st}.block.0.layer.0.SelfAttention.q.weight") == (3 * _D, _H)
        assert _p(s, f"{st}.block.0.layer.{1 if st == 'encoder' else 2}.DenseReluDense.wo.weight") == (_H, _H - 2)
    assert _p(s, "decoder.block.0.layer.1.EncDecAttention.k.weight") == (3 * _D, _H)
    for b, t in [(2, 10), (1, 5), (3, 13)]:
        _same(m, s, _ids(b, t, seed=t), None, dec(b, t))


# ---- CLIP text -----------------------------------------------------------------------------------------------
def test_clip_text_eager_heads_and_units():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.CLIPTextConfig(vocab_size=100, hidden_size=_H, intermediate_size=_H, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=32, attn_implementation="eager",
                            eos_token_id=99, bos_token_id=98, pad_token_id=1)
    m = tf.CLIPTextModel(cfg)
    layers = m.encoder.layers if hasattr(m, "encoder") else m.text_model.encoder.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.self_attn.out_proj.weight[:, i * _D:(i + 1) * _D] = 0
            layer.mlp.fc2.weight[:, DEAD_UNITS[i]] = 0
    m = m.eval().double()
    s = minimize(m, (_ids(2, 10),))
    pre = "encoder.layers" if hasattr(m, "encoder") else "text_model.encoder.layers"
    for i in range(2):
        assert _p(s, f"{pre}.{i}.self_attn.k_proj.weight") == (3 * _D, _H)
        assert _p(s, f"{pre}.{i}.mlp.fc1.weight") == (_H - 2, _H)
    for b, t in [(2, 10), (1, 5), (3, 13)]:
        _same(m, s, _ids(b, t, seed=t))


# ---- written-out LayerNorm ----------------------------------------------------------------------------------
C, J = 8, [2, 5]


class WrittenLN(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.w, self.b = nn.Parameter(torch.rand(C) + 0.5), nn.Parameter(torch.randn(C))
        self.register_buffer("eps_t", torch.tensor(1e-5))

    def forward(self, x):
        f = self.form
        if f == "mean":  # HF-style: one centred tensor, rsqrt
            u = x.mean(-1, keepdim=True)
            d = x - u
            y = d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5)
        elif f == "var":
            y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(torch.var(x, -1, unbiased=False, keepdim=True) + 1e-5)
        elif f == "var_mean":
            v, u = torch.var_mean(x, dim=-1, correction=0, keepdim=True)
            y = (x - u) * torch.rsqrt(1e-5 + v)
        elif f == "convnext":  # ConvNeXt's channels-first LayerNorm
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            y = (x - u) / torch.sqrt(s + 1e-6)
            return self.w[:, None, None] * y + self.b[:, None, None]
        elif f == "unbiased":  # guard: torch.var's default is the unbiased variance
            y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)
        elif f == "axes":  # guard: mean over one axis, variance over another
            y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)
        elif f == "eps_tensor":  # guard: eps is a tensor, not a constant number
            y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps_t)
        return self.w * y + self.b


class Seq(nn.Module):
    """fc -> written LN -> out; stream channels J written as zero and read by nobody after the norm."""

    def __init__(self, form: str):
        super().__init__()
        self.fc, self.norm, self.out = nn.Linear(4, C), WrittenLN(form), nn.Linear(C, 3)
        with torch.no_grad():
            self.fc.weight[J] = 0
            self.fc.bias[J] = 0
            self.out.weight[:, J] = 0

    def forward(self, x):
        return self.out(self.norm(self.fc(x)))


class Img(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.norm, self.pw = nn.Conv2d(3, C, 3, padding=1), WrittenLN("convnext"), nn.Conv2d(C, 5, 1)
        with torch.no_grad():
            self.stem.weight[J] = 0
            self.stem.bias[J] = 0
            self.pw.weight[:, J] = 0

    def forward(self, x):
        return self.pw(self.norm(self.stem(x)))


def _front(m: nn.Module, x: torch.Tensor, front: str, dims: dict) -> nn.Module:
    return m if front == "fx" else torch.export.export(m, (x,), dynamic_shapes=(dims,)).module()


def _layer_norms(m: nn.Module, x: torch.Tensor) -> int:
    """``F.layer_norm`` calls the front end reads ``m`` as (the result inlines its compensated ones)."""
    return sum(n.target is F.layer_norm for n in to_graph(m, (x,))[0].graph.nodes)


@pytest.mark.parametrize("front", ["fx", "export"])
@pytest.mark.parametrize("form", ["mean", "var", "var_mean"])
def test_written_out_layer_norm_lets_stream_channels_go(form, front):
    torch.manual_seed(0)
    m = Seq(form).double().eval()
    x = torch.randn(2, 6, 4, dtype=F64)
    src = _front(m, x, front, {0: AUTO, 1: AUTO})
    s = minimize(src, (x,))
    assert _p(s, "fc.weight") == (C - len(J), 4) and _layer_norms(src, x) == 1
    for shape in [(2, 6, 4), (3, 6, 4), (2, 11, 4)]:
        check_equivalence(m, s, (torch.randn(*shape, dtype=F64),), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("front", ["fx", "export"])
def test_convnext_channels_first_layer_norm(front):
    torch.manual_seed(0)
    m = Img().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    src = _front(m, x, front, {0: AUTO, 2: AUTO, 3: AUTO})
    s = minimize(src, (x,))
    assert _layer_norms(src, x) == 1 and _p(s, "stem.weight") == (C - len(J), 3, 3, 3) and _p(s, "pw.weight") == (5, C - len(J), 1, 1)
    for shape in [(2, 3, 6, 6), (3, 3, 6, 6), (2, 3, 9, 7)]:
        check_equivalence(m, s, (torch.randn(*shape, dtype=F64),), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("front", ["fx", "export"])
@pytest.mark.parametrize("form", ["unbiased", "axes", "eps_tensor"])
def test_guard_not_a_layer_norm_is_left_written_out(form, front):
    """Unbiased variance, mean and variance over different axes, eps a tensor: not a LayerNorm; the mean
    over the channel axis keeps the stream (nothing removed), the result is still exact."""
    torch.manual_seed(0)
    m = Seq(form).double().eval()
    x = torch.randn(2, 6, 4, dtype=F64)
    src = _front(m, x, front, {0: AUTO, 1: AUTO})
    s = minimize(src, (x,))
    assert _p(s, "fc.weight") == (C, 4) and _layer_norms(src, x) == 0
    for shape in [(2, 6, 4), (3, 6, 4), (2, 11, 4)]:
        check_equivalence(m, s, (torch.randn(*shape, dtype=F64),), rtol=1e-9, atol=1e-12)


# ---- the new helpers and their torch-ops forms ---------------------------------------------------------------
def test_new_helpers_and_their_ops_forms_agree_bit_for_bit():
    from sqr_fx.layers import full_width_rms_norm, upcast_rms_norm
    from sqr_fx.moe import expert_linear
    from sqr_fx.portable.ops import expert_linear_ops, full_width_rms_norm_ops, upcast_rms_norm_ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=F64, generator=g)
    full = torch.cat([x[..., :2], torch.zeros(2, 5, 1, dtype=F64), x[..., 2:4], torch.full((2, 5, 1), 0.5, dtype=F64),
                      x[..., 4:]], -1)
    kept, fill = torch.tensor([0, 1, 3, 4, 6, 7]), torch.tensor([0, 0, 0, 0, 0, 0.5, 0, 0], dtype=F64)
    for stat in (None, torch.float32):
        ref = (F.rms_norm(full, (8,), None, 1e-6) if stat is None else upcast_rms_norm(full, 1e-6, stat))[..., kept]
        assert torch.equal(full_width_rms_norm(x, kept, fill, 1e-6, stat), ref)
        assert torch.equal(full_width_rms_norm_ops(x, kept, fill, 1e-6, stat, 8), ref)
    assert torch.equal(upcast_rms_norm_ops(x, 1e-6, torch.float32), upcast_rms_norm(x, 1e-6, torch.float32))
    W, ids = torch.randn(3, 4, 6, dtype=F64, generator=g), torch.tensor([2, 0, 1, 2, 2])
    assert torch.equal(expert_linear_ops(x[0], W, ids), expert_linear(x[0], W, ids))
    torch.testing.assert_close(expert_linear(x[0], W, ids), torch.stack([W[e] @ r for e, r in zip(ids, x[0])]))
