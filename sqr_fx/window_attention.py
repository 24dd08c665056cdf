"""Shifted-window attention (Swin) in a form whose per-head widths the minimize pass can shrink.

torchvision's ``shifted_window_attention`` derives every width from the input: ``C`` input
channels, ``C // num_heads`` query/key/value dims per head, ``C`` output channels. A minimized
block needs them apart (the residual stream keeps its width while heads lose dims), and it must
keep the ORIGINAL softmax scale ``(C // num_heads) ** -0.5``. :func:`window_attention` is the
same computation (eval mode) with explicit q/k/v projections, per-head widths read off their
shapes, and an explicit ``scale``. The rule in ``sqr_fx/rules/window_attention.py`` rewrites a
torchvision call into this one when it removes something.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import project_heads

__all__ = ["window_attention"]


def _mask(x: Tensor, pad_h: int, pad_w: int, window_size: Sequence[int], shift_size: Sequence[int]) -> Tensor:
    """torchvision's shifted-window mask: -100 between tokens of different shifted regions."""
    attn_mask = x.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            attn_mask[h[0]: h[1], w[0]: w[1]] = count
            count += 1
    num_windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    attn_mask = attn_mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
    attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
    attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))


@torch.fx.wrap
def window_attention(input: Tensor, q_weight: Tensor, q_bias: Tensor, k_weight: Tensor, k_bias: Tensor,
                     v_weight: Tensor, v_bias: Tensor, proj_weight: Tensor, proj_bias: Optional[Tensor],
                     relative_position_bias: Tensor, window_size: list[int], num_heads: int, shift_size: list[int],
                     scale: Optional[float], logit_scale: Optional[Tensor] = None) -> Tensor:
    """``torchvision.models.swin_transformer.shifted_window_attention`` in eval mode, any widths.

    ``input`` is ``[B, H, W, C_in]``; q/k rows are ``num_heads * d_qk``, v rows ``num_heads * d_v``,
    the output has ``proj_weight.shape[0]`` channels. ``logit_scale`` given: Swin V2 cosine attention
    (``scale`` unused; ``k_bias`` is used as given, torchvision zeroes it before the call). Otherwise
    scores are ``(q * scale) @ k^T``.

    >>> from torchvision.models.swin_transformer import shifted_window_attention
    >>> C, nh = 8, 2
    >>> qkv, proj, rpb = torch.randn(3 * C, C), torch.randn(C, C), torch.randn(1, nh, 16, 16)
    >>> bqkv, bo, x = torch.randn(3 * C), torch.randn(C), torch.randn(2, 6, 5, C)
    >>> ref = shifted_window_attention(x, qkv, proj, rpb, [4, 4], nh, [2, 2], qkv_bias=bqkv, proj_bias=bo,
    ...                                training=False)
    >>> (wq, wk, wv), (bq, bk, bv) = qkv.chunk(3), bqkv.chunk(3)
    >>> y = window_attention(x, wq, bq, wk, bk, wv, bv, proj, bo, rpb, [4, 4], nh, [2, 2], (C // nh) ** -0.5)
    >>> torch.allclose(y, ref, atol=1e-5)
    True
    """
    B, H, W, _ = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, c_in = x.shape
    shift = list(shift_size)
    if window_size[0] >= pad_h:  # window larger than the map: no shift (as torchvision)
        shift[0] = 0
    if window_size[1] >= pad_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    x = x.view(B, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], c_in)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], c_in)
    n, t = x.size(0), x.size(1)
    q, k, v = (project_heads(x, w, bb, num_heads, n, t)
               for w, bb in ((q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias)))
    attn = window_scores(q, k, scale, logit_scale, relative_position_bias)
    if sum(shift) > 0:
        attn = attn.view(n // num_windows, num_windows, num_heads, t, t)
        attn = attn + _mask(x, pad_h, pad_w, window_size, shift).unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, t, t)
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(n, t, -1)
    x = F.linear(x, proj_weight, proj_bias)
    c_out = x.shape[-1]
    x = x.view(B, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], c_out)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_h, pad_w, c_out)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def window_scores(q, k, scale: Optional[float], logit_scale, relative_position_bias):
    """Per-window attention logits: Swin v2's cosine form with its clamped logit scale, or v1's scaled dot
    product; plus the relative position bias (shared by the helper and its torch-ops form)."""
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * scale).matmul(k.transpose(-2, -1))
    return attn + relative_position_bias
