"""Self-attention in the canonical form the minimize pass can shrink per head.

``nn.MultiheadAttention`` (self-attention: query is key is value, no masks) is rewritten by
the tracer into one call of :func:`self_attention` whose projections are plain ``get_attr``
tensors. Per-head widths are read off the tensor shapes, so the same call expresses a
minimized block whose heads have fewer query/key dims (``d_qk``) and value dims (``d_v``)
than the original; the softmax scale stays the ORIGINAL ``1/sqrt(head_dim)``.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["self_attention", "attend", "project_heads", "functionalize_mha", "rotary", "rotary_interleaved",
           "padded_sdpa", "padded_sdpa_ops"]


@torch.fx.wrap
def self_attention(x: Tensor, q_weight: Tensor, q_bias: Tensor, k_weight: Tensor, k_bias: Tensor,
                   v_weight: Tensor, v_bias: Tensor, out_weight: Tensor, out_bias: Optional[Tensor],
                   num_heads: int, scale: float, batch_first: bool = True, qk_pad: int = 0, v_pad: int = 0) -> Tensor:
    """Multi-head self-attention with explicit projections (any per-head widths). ``qk_pad`` / ``v_pad``:
    zero dims appended to each head of q and k / of v for the attention kernel (:func:`padded_sdpa`).

    >>> E, H = 8, 2
    >>> mha = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    >>> x = torch.randn(3, 5, E)
    >>> wq, wk, wv = mha.in_proj_weight.chunk(3); bq, bk, bv = mha.in_proj_bias.chunk(3)
    >>> y = self_attention(x, wq, bq, wk, bk, wv, bv, mha.out_proj.weight, mha.out_proj.bias, H, (E // H) ** -0.5)
    >>> torch.allclose(y, mha(x, x, x, need_weights=False)[0], atol=1e-6)
    True
    """
    if x.dim() == 2:  # unbatched [L, E] (batch_first does not apply): attend as a batch of one
        return self_attention(x.unsqueeze(0), q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight,
                              out_bias, num_heads, scale, True, qk_pad, v_pad).squeeze(0)
    if not batch_first:
        x = x.transpose(0, 1)
    out = attend(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight, out_bias, num_heads, scale,
                 qk_pad, v_pad)
    return out if batch_first else out.transpose(0, 1)


@torch.fx.wrap
def rotary(x: Tensor, cos: Tensor, sin: Tensor, half: int) -> Tensor:
    """Rotary position embedding, rotate_half form: ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half(x) = cat(-x[..., half:], x[..., :half])``; dims ``i`` and ``i + half`` are one
    rotation pair. The same ops in the same order as Hugging Face's ``apply_rotary_pos_emb`` (bit for
    bit); ``half`` is explicit so that a call on fewer kept pairs says how many.

    >>> x, c, s = torch.randn(2, 3, 5, 8), torch.randn(5, 8), torch.randn(5, 8)
    >>> torch.equal(rotary(x, c, s, 4), x * c + torch.cat((-x[..., 4:], x[..., :4]), -1) * s)
    True
    """
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@torch.fx.wrap
def rotary_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding, interleaved (GPT-J) form: ``x * cos + rotate_every_two(x) * sin`` with
    ``rotate_every_two(x) = stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)``; dims ``2i`` and ``2i + 1``
    are one rotation pair. The same ops in the same order as Hugging Face's GPT-J (bit for bit).

    >>> x, c, s = torch.randn(2, 5, 3, 8), torch.randn(5, 1, 8), torch.randn(5, 1, 8)
    >>> torch.equal(rotary_interleaved(x, c, s), x * c + torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2) * s)
    True
    """
    return x * cos + torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2) * sin


def project_heads(x: Tensor, weight: Tensor, bias: Optional[Tensor], num_heads: int, n, t) -> Tensor:
    """One projection of ``x`` [n, t, E] split into heads: [n, heads, t, d]."""
    return F.linear(x, weight, bias).view(n, t, num_heads, -1).transpose(1, 2)


def attend(x: Tensor, q_weight: Tensor, q_bias: Tensor, k_weight: Tensor, k_bias: Tensor, v_weight: Tensor,
           v_bias: Tensor, out_weight: Tensor, out_bias: Optional[Tensor], num_heads: int, scale: float,
           qk_pad: int = 0, v_pad: int = 0) -> Tensor:
    """The batch-first core of :func:`self_attention` ([B, T, E] in and out); plain torch (traceable)."""
    b, t = x.shape[0], x.shape[1]
    q, k, v = (project_heads(x, w, bb, num_heads, b, t)
               for w, bb in ((q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias)))
    o = padded_sdpa_ops(q, k, v, None, 0.0, False, scale, False, qk_pad, v_pad)
    return F.linear(o.transpose(1, 2).reshape(b, t, -1), out_weight, out_bias)


@torch.fx.wrap
def padded_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                enable_gqa: bool = False, qk_pad: int = 0, v_pad: int = 0) -> Tensor:
    """``F.scaled_dot_product_attention`` whose kernel sees every head of q and k with ``qk_pad`` and of v
    with ``v_pad`` zero dims appended; the output's padded dims are cut off again. The same function (a zero
    dim adds 0 to every score and gives an output dim of 0; ``scale`` must be explicit, sdpa's default
    would follow the padded width): ``minimize(..., align=N)`` keeps the stored per-head widths minimal and
    lets the fused attention kernels (one head dim for q, k and v, a multiple of 8 on GPUs) see aligned ones.

    >>> q, k, v = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 7, 6), torch.randn(2, 3, 7, 4)
    >>> want = F.scaled_dot_product_attention(q, k, v, scale=0.5)
    >>> torch.allclose(padded_sdpa(q, k, v, scale=0.5, qk_pad=2, v_pad=4), want, atol=1e-6)
    True
    """
    return padded_sdpa_ops(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, qk_pad, v_pad)


def padded_sdpa_ops(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                    is_causal: bool, scale: Optional[float], enable_gqa: bool, qk_pad: int, v_pad: int) -> Tensor:
    """:func:`padded_sdpa` in plain torch ops (what the portable result holds)."""
    if qk_pad:
        query, key = F.pad(query, (0, qk_pad)), F.pad(key, (0, qk_pad))
    if v_pad:
        value = F.pad(value, (0, v_pad))
    if enable_gqa:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale)
    return out.narrow(-1, 0, out.shape[-1] - v_pad) if v_pad else out


def functionalize_mha(gm: fx.GraphModule, node: fx.Node, mod: nn.MultiheadAttention) -> bool:
    """Replace a self-attention ``call_module`` by :func:`self_attention`; False when it does not apply
    (cross-attention, masks, attention weights used, separate q/k/v widths, bias_k/v, zero_attn)."""
    args = list(node.args) + [None] * (3 - len(node.args))
    q, k, v = (node.kwargs.get(n, a) for n, a in zip(("query", "key", "value"), args[:3]))
    extra = {n: val for n, val in node.kwargs.items() if n not in ("query", "key", "value")}
    masks_off = all(extra.get(n) is None for n in ("key_padding_mask", "attn_mask")) and not extra.get("is_causal")
    # used only as ``out, _ = mha(x, x, x)``: the attention weights are never read
    weights_unused = all(u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in node.users)
    if not (q is k is v and masks_off and weights_unused and mod._qkv_same_embed_dim and mod.bias_k is None
            and not mod.add_zero_attn and len(node.args) <= 3):
        return False
    E, H = mod.embed_dim, mod.num_heads
    wq, wk, wv = mod.in_proj_weight.detach().chunk(3)
    b = mod.in_proj_bias.detach() if mod.in_proj_bias is not None else torch.zeros(3 * E, dtype=wq.dtype)
    bq, bk, bv = b.chunk(3)
    tensors = {"q_weight": wq, "q_bias": bq, "k_weight": wk, "k_bias": bk, "v_weight": wv, "v_bias": bv}
    for name, t in tensors.items():
        mod.register_parameter(f"sqr_fx_{name}", nn.Parameter(t.clone()))
    del mod.in_proj_weight, mod.in_proj_bias  # (a private copy) now held as the six tensors above
    g = gm.graph
    with g.inserting_before(node):
        attrs = [g.get_attr(f"{node.target}.sqr_fx_{n}") for n in tensors]
        ow = g.get_attr(f"{node.target}.out_proj.weight")
        ob = g.get_attr(f"{node.target}.out_proj.bias") if mod.out_proj.bias is not None else None
        new = g.call_function(self_attention, (q, *attrs, ow, ob, H, float((E // H) ** -0.5), mod.batch_first))
    new.meta = dict(node.meta)
    for u in list(node.users):
        if u.args[1] == 0:
            u.replace_all_uses_with(new)
        g.erase_node(u)
    g.erase_node(node)
    return True
