"""Head removal through timm's fused-qkv attention: ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``
then ``unbind(0)`` or ``qkv[0], qkv[1], qkv[2]``, sdpa or matmul/softmax, merged back and projected."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqr_fx import minimize

C, H, D = 32, 4, 8


class Attention(nn.Module):
    def __init__(self, form: str, core: str):
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.form, self.core, self.scale = form, core, D ** -0.5

    def forward(self, x):
        B, N, C_ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.form == "unbind" else (qkv[0], qkv[1], qkv[2])
        q, k = self.q_norm(q), self.k_norm(k)
        if self.core == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C_))


class Block(nn.Module):
    def __init__(self, form: str, core: str):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(C), Attention(form, core), nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _block(form, core, dead_cols) -> Block:
    torch.manual_seed(0)
    m = Block(form, core).double().eval()
    with torch.no_grad():
        for c in dead_cols:
            m.attn.proj.weight[:, c] = 0
    return m


def _frontend(m, how):
    if how == "fx":
        return m
    auto = torch.export.Dim.AUTO
    x = torch.randn(2, 7, C, dtype=torch.float64)
    return torch.export.export(m, (x,), dynamic_shapes=({0: auto, 1: auto},)).module()


def _check(m, small):
    for b, n in ((1, 5), (3, 5), (1, 9), (3, 9)):
        x = torch.randn(b, n, C, dtype=torch.float64)
        torch.testing.assert_close(small(x), m(x), rtol=1e-10, atol=1e-10)


def _weights(small) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in small.state_dict().items() if "attn" in k}


@pytest.mark.parametrize("how", ["fx", "export"])
@pytest.mark.parametrize("core", ["sdpa", "manual"])
@pytest.mark.parametrize("form", ["unbind", "index"])
def test_dead_heads_leave_the_fused_qkv(form, core, how):
    """Heads 1 and 3 have zero output-projection columns: their q, k, v rows and proj columns go."""
    dead = list(range(D, 2 * D)) + list(range(3 * D, 4 * D))
    m = _block(form, core, dead)
    small = minimize(_frontend(m, how), (torch.randn(2, 7, C, dtype=torch.float64),))
    _check(m, small)
    w = _weights(small)
    assert w["attn.qkv.weight"] == (3 * 2 * D, C) and w["attn.qkv.bias"] == (3 * 2 * D,)
    assert w["attn.proj.weight"] == (C, 2 * D)
    # the kept rows are heads 0 and 2 of q, k and v, in order
    rows = torch.tensor([g * C + h * D + d for g in range(3) for h in (0, 2) for d in range(D)])
    sd = small.state_dict()
    key = next(k for k in sd if k.endswith("attn.qkv.weight"))
    torch.testing.assert_close(sd[key], m.attn.qkv.weight[rows], rtol=0, atol=0)


@pytest.mark.parametrize("how", ["fx", "export"])
def test_partly_dead_head_stays(how):
    """Head 1 has half its proj columns zero: its v dims alone cannot go (q/k/v heads keep equal
    widths), and the head is read: nothing is removed."""
    m = _block("unbind", "sdpa", list(range(D, D + D // 2)))
    small = minimize(_frontend(m, how), (torch.randn(2, 7, C, dtype=torch.float64),))
    _check(m, small)
    w = _weights(small)
    assert w["attn.qkv.weight"] == (3 * C, C) and w["attn.proj.weight"] == (C, C)


def test_fused_kv_two_groups():
    """PVT-style ``kv.reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4)``: two groups, dead heads go."""
    class KV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv, self.proj = nn.Linear(C, C), nn.Linear(C, 2 * C), nn.Linear(C, C)

        def forward(self, x):
            B, N, _ = x.shape
            q = self.q(x).reshape(B, N, H, D).permute(0, 2, 1, 3)
            k, v = self.kv(x).reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v)
            return self.proj(o.transpose(1, 2).reshape(B, N, C))

    torch.manual_seed(0)
    m = KV().double().eval()
    with torch.no_grad():
        m.proj.weight[:, :D] = 0
    small = minimize(m, (torch.randn(2, 7, C, dtype=torch.float64),))
    _check(m, small)
    assert tuple(small.kv.weight.shape) == (2 * (C - D), C) and tuple(small.q.weight.shape) == (C - D, C)


def test_group_read_whole_is_frozen():
    """The grouped tensor read by anything but a layout rule (here a sum over the group axis) keeps
    every channel."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

        def forward(self, x):
            B, N, _ = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, H, D)
            return self.proj(qkv.sum(2).reshape(B, N, C))

    torch.manual_seed(0)
    m = Odd().double().eval()
    with torch.no_grad():
        m.proj.weight[:, :D] = 0
    small = minimize(m, (torch.randn(2, 7, C, dtype=torch.float64),))
    _check(m, small)
    assert tuple(small.qkv.weight.shape) == (3 * C, C)
