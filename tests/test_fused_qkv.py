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


class NeoXStyle(nn.Module):
    """GPT-NeoX's layout: ``qkv.view(B, T, H, 3D).transpose(1, 2).chunk(3, -1)`` (per-head q | k | v)."""

    def __init__(self, how: str):
        super().__init__()
        self.qkv, self.proj, self.how = nn.Linear(C, 3 * C), nn.Linear(C, C), how

    def forward(self, x):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, -1, 3 * D).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1) if self.how == "chunk" else qkv.split(D, -1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("how", ["chunk", "split"])
def test_neox_style_per_head_chunk(how):
    """Head 2 dead (proj columns zero): its 3D rows go; in every other head the v dims 0 and 5 are
    dead: they go from every kept head alike (the split sizes stay equal per head)."""
    torch.manual_seed(0)
    m = NeoXStyle(how).double().eval()
    with torch.no_grad():
        m.proj.weight[:, 2 * D:3 * D] = 0
        for h in range(H):
            m.proj.weight[:, [h * D, h * D + 5]] = 0
    small = minimize(m, (torch.randn(2, 7, C, dtype=torch.float64),))
    _check(m, small)
    assert tuple(small.proj.weight.shape) == (C, 3 * (D - 2))
    assert tuple(small.qkv.weight.shape) == (3 * (2 * D + D - 2), C)


def test_neox_partly_dead_v_dims_of_one_head_stay():
    """Dead v dims in one head only: the kept heads must keep the same dims, so they stay."""
    torch.manual_seed(0)
    m = NeoXStyle("chunk").double().eval()
    with torch.no_grad():
        m.proj.weight[:, [D, D + 3]] = 0
    small = minimize(m, (torch.randn(2, 7, C, dtype=torch.float64),))
    _check(m, small)
    assert tuple(small.qkv.weight.shape) == (3 * C, C)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_gpt_neox_dead_heads(attn):
    """Hugging Face GPT-NeoX (partial rotary 0.5, fused query_key_value laid out [H, 3D]): layer i
    loses head i (dense columns zero): 48 of 192 qkv rows, 16 of 64 dense columns."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPTNeoXConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, use_cache=False, rotary_pct=0.5,
                           attn_implementation=attn)
    m = tf.GPTNeoXForCausalLM(cfg)
    with torch.no_grad():
        for i, layer in enumerate(m.gpt_neox.layers):
            layer.attention.dense.weight[:, i * 16:(i + 1) * 16] = 0
    m = m.eval().double()

    def ids(b, t):
        return torch.randint(0, 100, (b, t), generator=torch.Generator().manual_seed(t))

    small = minimize(m, (ids(2, 10),))
    p = dict(small.named_parameters())
    for i in range(2):
        assert p[f"gpt_neox.layers.{i}.attention.query_key_value.weight"].shape == (144, 64)
        assert p[f"gpt_neox.layers.{i}.attention.dense.weight"].shape == (64, 48)
    for b, t in [(1, 5), (3, 13)]:
        x = ids(b, t)
        torch.testing.assert_close(small(x)["logits"], m(x).logits, rtol=1e-9, atol=1e-9)


def test_timm_vit_dead_heads_after_export():
    """A real timm ViT (2 blocks, 3 heads of 64, built from its config): block i's head i dead. After
    torch.export the heads go (qkv 576 -> 384 rows, proj 192 -> 128 columns). Under symbolic_trace
    timm's ``attn_mask`` / ``is_causal`` arrive as graph inputs, so sdpa keeps its heads there."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          num_classes=10).double().eval()
    with torch.no_grad():
        for i, blk in enumerate(m.blocks):
            blk.attn.proj.weight[:, i * 64:(i + 1) * 64] = 0
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    small = minimize(ep, (x,))
    p = dict(small.named_parameters())
    for i in range(2):
        assert p[f"blocks.{i}.attn.qkv.weight"].shape == (384, 192)
        assert p[f"blocks.{i}.attn.proj.weight"].shape == (192, 128)
    for b in (1, 3):
        xx = torch.randn(b, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(small(xx), m(xx), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("how", ["fx", "export"])
def test_full_slice_of_the_grouped_tensor_freezes(how):
    """``qkv[:, :, :]`` (``aten.slice`` on axis 0 after export) is no group index: channels kept, exact."""
    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

        def forward(self, x):
            B, N, _ = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[0:2]
            q, k = qkv.unbind(0)
            o = F.scaled_dot_product_attention(q, k, k)
            return self.proj(o.transpose(1, 2).reshape(B, N, C))

    torch.manual_seed(0)
    m = Sliced().double().eval()
    with torch.no_grad():
        m.proj.weight[:, :D] = 0
    small = minimize(_frontend(m, how), (torch.randn(2, 7, C, dtype=torch.float64),))
    _check(m, small)
    assert tuple(small.qkv.weight.shape) == (3 * C, C)
