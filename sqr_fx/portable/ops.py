"""The sqr_fx helpers written in torch ops (step 3 of :func:`sqr_fx.portable.finish`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..attention import attend, project_heads
from ..window_attention import window_scores

# ---- 3. sqr_fx helpers in torch ops ---------------------------------------------------------------------------
# Each ``*_ops`` function computes what its sqr_fx helper computes, in the same op order (bit for bit),
# with torch ops only and without Python branches on tensor sizes or dtypes, so that it traces into an
# fx graph (and re-traces when a GraphModule is unpickled) and jit-scripts.

def _compute(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the helpers' statistics dtype: float64 stays, anything narrower computes in float32."""
    return x.to(torch.result_type(x, x.new_ones(1, dtype=torch.float32)))


def ones_map_ops(x: torch.Tensor, spatial: int) -> torch.Tensor:
    """``sqr_fx.rules.weighted.ones_map``: ones of shape ``[1, 1, *x.shape[2:]]`` (``spatial`` dims)."""
    return torch.ones([1, 1] + [x.shape[2 + i] for i in range(spatial)], dtype=x.dtype, device=x.device)


def layer_norm_ops(x, weight, bias, n: int, removed_mean, removed_m2, eps: float):
    """``sqr_fx.layers.compensated_layer_norm``."""
    r = n - x.shape[-1]
    xc = _compute(x)
    m_r = removed_mean.to(xc.dtype)
    mu = (xc.sum(-1, keepdim=True) + r * m_r) / n
    d = xc - mu
    var = ((d * d).sum(-1, keepdim=True) + removed_m2.to(xc.dtype) + r * (m_r - mu) ** 2) / n
    y = d * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(xc.dtype)
    if bias is not None:
        y = y + bias.to(xc.dtype)
    return y.to(x.dtype)


def rms_norm_ops(x, weight, n: int, removed_sumsq, eps: Optional[float]):
    """``sqr_fx.layers.compensated_rms_norm`` (``eps=None``: the machine epsilon of the compute dtype)."""
    xc = _compute(x)
    ms = ((xc * xc).sum(-1, keepdim=True) + removed_sumsq.to(xc.dtype)) / n
    if eps is None:
        one = xc.new_ones(())
        y = xc * torch.rsqrt(ms + (torch.nextafter(one, one + one) - one))
    else:
        y = xc * torch.rsqrt(ms + eps)
    if weight is not None:
        y = y * weight.to(xc.dtype)
    return y.to(x.dtype)


def upcast_rms_norm_ops(x, eps: float, stat_dtype: torch.dtype):
    """``sqr_fx.layers.upcast_rms_norm`` (T5's RMSNorm without its weight)."""
    return x * torch.rsqrt(x.to(stat_dtype).pow(2).mean(-1, keepdim=True) + eps)


def full_width_rms_norm_ops(x, kept, fill, eps: Optional[float], stat_dtype: Optional[torch.dtype], n: int):
    """``sqr_fx.layers.full_width_rms_norm`` (``n``: the full width, ``fill.shape[0]``)."""
    full = fill.to(x.dtype).expand(x.shape[:-1] + (n,)).index_copy(-1, kept, x)
    if stat_dtype is None:
        y = F.rms_norm(full, [n], None, eps)
    else:
        y = upcast_rms_norm_ops(full, eps, stat_dtype)
    return y.index_select(-1, kept)


def expert_linear_ops(x, weight, expert_ids):
    """``sqr_fx.moe.expert_linear``."""
    return torch.bmm(weight[expert_ids], x.unsqueeze(-1)).squeeze(-1)


def group_norm_ops(x, weight, bias, group_index, group_size: int, groups: int, removed_count, removed_mean,
                   removed_m2, eps: float):
    """``sqr_fx.layers.compensated_group_norm`` (``groups``: ``removed_count.shape[0]``)."""
    b, k = x.shape[0], x.shape[1]
    xf = _compute(x.reshape(b, k, -1))
    m = xf.shape[2]
    n = group_size * m
    cnt = removed_count.to(xf.dtype)
    m_r = removed_mean.to(xf.dtype)
    zeros = xf.new_zeros([b, groups])
    g_sum = zeros.index_add(1, group_index, xf.sum(-1))
    mu = (g_sum + m * cnt * m_r) / n
    d = xf - mu.index_select(1, group_index).unsqueeze(-1)
    g_ss = zeros.index_add(1, group_index, (d * d).sum(-1))
    var = (g_ss + m * (removed_m2.to(xf.dtype) + cnt * (m_r - mu) ** 2)) / n
    y = d * torch.rsqrt(var + eps).index_select(1, group_index).unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(xf.dtype).unsqueeze(-1)
    if bias is not None:
        y = y + bias.to(xf.dtype).unsqueeze(-1)
    return y.reshape(x.shape).to(x.dtype)


def self_attention_ops(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight, out_bias,
                       num_heads: int, scale: float, batch_first: bool, rank: int, qk_pad: int = 0, v_pad: int = 0):
    """``sqr_fx.attention.self_attention`` for inputs of rank ``rank`` (a call of another rank fails clearly)."""
    torch._assert(x.dim() == rank, "the minimized attention was traced for inputs of another rank")
    if rank == 2:  # unbatched [L, E]: a batch of one (batch_first does not apply)
        x = x.unsqueeze(0)
    elif not batch_first:
        x = x.transpose(0, 1)
    out = attend(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight, out_bias, num_heads, scale,
                 qk_pad, v_pad)
    if rank == 2:
        return out.squeeze(0)
    return out if batch_first else out.transpose(0, 1)


def rotary_ops(x, cos, sin, half: int):
    """``sqr_fx.attention.rotary``."""
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rotary_interleaved_ops(x, cos, sin):
    """``sqr_fx.attention.rotary_interleaved``."""
    return x * cos + torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2) * sin


def window_attention_ops(input, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias,
                         relative_position_bias, window_size: list[int], num_heads: int, shift_size: list[int],
                         scale: Optional[float], logit_scale=None):
    """``sqr_fx.window_attention.window_attention``, branch-free in the map size: padding and window
    counts are computed, and a shift the map is too small for is multiplied by 0 (a roll by 0 and an
    all-zero mask, where the helper skips both: the same values)."""
    ws0, ws1 = window_size[0], window_size[1]
    B, H, W = input.shape[0], input.shape[1], input.shape[2]
    x = F.pad(input, [0, 0, 0, (ws1 - W % ws1) % ws1, 0, (ws0 - H % ws0) % ws0])
    pad_h, pad_w, c_in = x.shape[1], x.shape[2], x.shape[3]
    nh, nw = pad_h // ws0, pad_w // ws1
    shifted = shift_size[0] != 0 or shift_size[1] != 0
    s0, s1 = shift_size[0] * (1 - 1 // nh), shift_size[1] * (1 - 1 // nw)  # 0 where one window covers the map
    if shifted:
        x = torch.roll(x, shifts=[-s0, -s1], dims=[1, 2])
    num_windows = nh * nw
    x = x.view(B, nh, ws0, nw, ws1, c_in)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, ws0 * ws1, c_in)
    n, t = x.shape[0], ws0 * ws1
    q, k, v = (project_heads(x, w, bb, num_heads, n, t)
               for w, bb in ((q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias)))
    attn = window_scores(q, k, scale, logit_scale, relative_position_bias)
    if shifted:
        # torchvision's region labels (0/1/2 per axis: before the last window, in it before the shift,
        # after it), one id per (row region, column region); -100 between tokens of different regions
        ih = torch.arange(pad_h, device=x.device)
        iw = torch.arange(pad_w, device=x.device)
        lh = ((ih >= pad_h - ws0).long() + (ih >= pad_h - s0).long()) * (1 - 1 // nh)
        lw = ((iw >= pad_w - ws1).long() + (iw >= pad_w - s1).long()) * (1 - 1 // nw)
        lab = (lh.unsqueeze(1) * 3 + lw.unsqueeze(0)).view(nh, ws0, nw, ws1)
        lab = lab.permute(0, 2, 1, 3).reshape(num_windows, t)
        diff = lab.unsqueeze(1) - lab.unsqueeze(2)
        mask = x.new_zeros([num_windows, t, t]).masked_fill(diff != 0, -100.0)
        attn = attn.view(n // num_windows, num_windows, num_heads, t, t)
        attn = attn + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, t, t)
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(n, t, -1)
    x = F.linear(x, proj_weight, proj_bias)
    c_out = x.shape[-1]
    x = x.view(B, nh, nw, ws0, ws1, c_out)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_h, pad_w, c_out)
    if shifted:
        x = torch.roll(x, shifts=[s0, s1], dims=[1, 2])
    return x.narrow(1, 0, H).narrow(2, 0, W).contiguous()
