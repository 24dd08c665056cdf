"""The general rules the timm zoo needed (tests/test_timm_zoo.py), each in a small model with its guard:

* arguments left at a plain default (``forward(x, attn_mask=None, is_causal=False)``) are traced as
  constants by symbolic_trace, so sdpa sees literals and drops heads; other values are refused;
* an aliasing op (``nn.Identity``) that is its fresh input's only reader may be written in place
  (timm's ``BatchNormAct2d``: bn -> drop -> act(inplace=True)), so symbolic_trace is kept;
* pad by amounts computed from the input size on non-channel axes (timm's window padding);
* a per-head sdpa mask of lower rank than q (timm's ``[H, T, S]`` attention bias) is gathered to kept heads.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqr_fx import minimize


def _x(*s, seed=0):
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


class Attn(nn.Module):
    """timm-style attention: fused qkv -> [3, B, H, T, D] -> unbind -> sdpa; head 1 of 4 is dead (proj columns)."""

    def __init__(self, bias_mask: bool = False, H: int = 4, D: int = 4):
        super().__init__()
        self.H, self.D = H, D
        self.qkv, self.proj = nn.Linear(H * D, 3 * H * D), nn.Linear(H * D, H * D)
        self.bias = nn.Parameter(torch.randn(H, 6, 6)) if bias_mask else None
        with torch.no_grad():
            self.proj.weight[:, D:2 * D] = 0

    def forward(self, x, attn_mask=None, is_causal=False):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.H, self.D).permute(2, 0, 3, 1, 4).unbind(0)
        if self.bias is not None:
            attn_mask = self.bias  # [H, T, S]: broadcast over the batch
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(o.transpose(1, 2).reshape(B, T, C))


def _width(gm, suffix):
    return next(tuple(getattr(m, "weight").shape) for n, m in gm.named_modules() if n.endswith(suffix))


def test_defaults_are_fixed_so_sdpa_drops_the_dead_head_and_other_values_are_refused():
    m = Attn().double().eval()
    small = minimize(m, (_x(2, 6, 16),))
    assert small.sqr_report.frontend == "fx"
    assert _width(small, "proj") == (16, 12)  # one head of 4 dims gone
    x = _x(3, 5, 16, seed=1)
    _close(small(x), m(x))
    _close(small(x, attn_mask=None), m(x))  # the argument keeps its name
    with pytest.raises(AssertionError):  # FX's guard: another value than the traced default is refused
        small(x, is_causal=True)
    with pytest.raises(AssertionError):
        small(x, attn_mask=torch.zeros(5, 5, dtype=torch.float64))


def test_guard_a_mask_given_as_an_input_is_a_real_mask():
    m = Attn().double().eval()
    mask = _x(2, 4, 6, 6, seed=2)  # a graph input: its values are the caller's, the rule does not follow it
    small = minimize(m, (_x(2, 6, 16), mask))
    assert _width(small, "proj") == (16, 16)
    assert small.sqr_report.frontend == "fx"
    x, mask2 = _x(2, 6, 16, seed=3), _x(2, 4, 6, 6, seed=4)
    _close(small(x, mask2), m(x, mask2))


def test_per_head_mask_of_lower_rank_is_gathered_to_the_kept_heads():
    m = Attn(bias_mask=True).double().eval()
    small = minimize(m, (_x(2, 6, 16),))
    assert _width(small, "proj") == (16, 12)
    x = _x(3, 6, 16, seed=5)
    _close(small(x), m(x))


class BnAct(nn.Module):
    """conv -> bn -> Identity -> ReLU(inplace): timm's BatchNormAct2d; channel 2 is dead (ReLU of -1)."""

    def __init__(self, reuse: bool = False):
        super().__init__()
        self.reuse = reuse
        self.conv, self.bn, self.drop, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Identity(), nn.ReLU(True)
        self.out = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.conv.weight[2], self.conv.bias[2] = 0, 0
            self.bn.weight[2], self.bn.bias[2] = 0, -1.0

    def forward(self, x):
        h = self.bn(self.conv(x))
        y = self.act(self.drop(h))
        return self.out(y) + (h.sum() if self.reuse else 0)


def test_inplace_act_after_identity_keeps_symbolic_trace():
    m = BnAct().double().eval()
    small = minimize(m, (_x(2, 3, 8, 8),))
    assert small.sqr_report.frontend == "fx"
    assert _width(small, "out")[1] == 3
    x = _x(3, 3, 11, 9, seed=6)
    _close(small(x), m(x))


def test_guard_inplace_act_after_identity_whose_input_is_read_elsewhere():
    m = BnAct(reuse=True).double().eval()  # the write is visible through h: not the Identity's own storage
    small = minimize(m, (_x(2, 3, 8, 8),))
    assert small.sqr_report.frontend == "export"
    x = _x(3, 3, 11, 9, seed=7)
    _close(small(x), m(x))


class WindowPad(nn.Module):
    """[B, H, W, C] padded to a multiple of 4 on H and W by amounts computed from the size, and cropped back
    (timm's window attention)."""

    def __init__(self, pad_channels: bool = False):
        super().__init__()
        self.pad_channels = pad_channels
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)
        with torch.no_grad():
            self.b.weight[:, 1] = 0  # unread

    def forward(self, x):
        h = self.a(x)
        H, W = h.shape[1], h.shape[2]
        pad_c = (4 - h.shape[0] % 4) % 4 if self.pad_channels else 0
        h = F.pad(h, (0, pad_c, 0, (4 - W % 4) % 4, 0, (4 - H % 4) % 4))
        h = h[:, :H, :W, :]  # cropped back by bounds computed from the size, off the channel axis
        return self.b(h[..., :5] if self.pad_channels else h)


@pytest.mark.parametrize("front", ["fx", "export"])
def test_pad_and_crop_by_computed_amounts_on_other_axes_keep_channels_removable(front):
    m = WindowPad().double().eval()
    if front == "export":
        m = torch.export.export(m, (_x(2, 5, 6, 3),), dynamic_shapes=({1: torch.export.Dim.AUTO,
                                                                        2: torch.export.Dim.AUTO},)).module()
    small = minimize(m, (_x(2, 5, 6, 3),))
    assert _width(small, "a") == (4, 3) if front == "fx" else any(r.shape_after == (4, 3) for r in small.sqr_report.rows)
    x = _x(2, 7, 9, 3, seed=8)
    _close(small(x), m(x))


def test_guard_pad_of_the_channel_axis_by_a_computed_amount_declines():
    m = WindowPad(pad_channels=True).double().eval()
    small = minimize(m, (_x(2, 5, 6, 3),))
    assert _width(small, "a") == (5, 3)
    assert any("pad" in d for d in small.sqr_report.declined)
    x = _x(3, 7, 9, 3, seed=9)
    _close(small(x), m(x))
