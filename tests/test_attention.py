"""Self-attention per head: each identity fires, each guard holds, outputs stay equal."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sqr_fx import check_equivalence, minimize
from sqr_fx.attention import self_attention

E, H, D = 16, 4, 4


class Block(nn.Module):
    def __init__(self, cross: bool = False, need_weights: bool = False, batch_first: bool = True):
        super().__init__()
        self.inp = nn.Linear(E, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.head = nn.Linear(E, 3)
        self.cross, self.need_weights = cross, need_weights

    def forward(self, x):
        x = self.inp(x)
        kv = x.flip(1) if self.cross else x
        out, w = self.attn(x, kv, kv, need_weights=self.need_weights)
        y = self.head(out)
        return (y, w) if self.need_weights else y


def _block(**kw) -> nn.Module:
    torch.manual_seed(0)
    return Block(**kw).double().eval()


def _weights(m):
    return m.attn.in_proj_weight.data, m.attn.in_proj_bias.data


def _attn_params(s):
    return {k.rsplit(".", 1)[-1]: tuple(v.shape) for k, v in s.named_parameters() if "attn" in k or "inp" in k}


def _same(m, s):
    for shape in [(2, 5, E), (3, 9, E)]:
        check_equivalence(m, s, (torch.randn(*shape, dtype=torch.float64),), rtol=1e-9, atol=1e-10)


def test_constant_value_head_is_removed_and_folded():
    m = _block()
    W, _ = _weights(m)
    W[2 * E: 2 * E + D] = 0  # head 0: every value dim is its bias, a constant
    s = minimize(m, (torch.randn(2, 5, E, dtype=torch.float64),), portable=False)
    assert _attn_params(s)["sqr_fx_v_weight"] == ((H - 1) * D, E)
    _same(m, s)


def test_query_key_dims_removed_in_every_head():
    m = _block()
    W, b = _weights(m)
    for h in range(H):
        W[E + h * D] = 0  # key dim 0 of every head: k_d = b_k[d], a per-query shift of the scores
        W[h * D + 1], b[h * D + 1] = 0, 0  # query dim 1 of every head is exactly zero
    s = minimize(m, (torch.randn(2, 5, E, dtype=torch.float64),), portable=False)
    p = _attn_params(s)
    assert p["sqr_fx_q_weight"] == (H * (D - 2), E) and p["sqr_fx_k_weight"] == (H * (D - 2), E)
    assert [n.args[-2] for n in s.graph.nodes if n.target is self_attention] == [D ** -0.5]  # original scale
    _same(m, s)


def test_guard_uneven_heads_are_padded_not_cut():
    m = _block()
    W, _ = _weights(m)
    W[E + 0] = 0  # one key dim in head 0 only
    s = minimize(m, (torch.randn(2, 5, E, dtype=torch.float64),), portable=False)
    assert _attn_params(s)["sqr_fx_k_weight"] == (H * D, E)  # heads share one width
    _same(m, s)


def test_unread_output_channel_and_input_column():
    m = _block(batch_first=False)
    m.head.weight.data[:, 3] = 0  # attention output channel 3 unread
    W, _ = _weights(m)
    W[:, 5] = 0  # input channel 5 unread by q, k and v
    s = minimize(m, (torch.randn(5, 2, E, dtype=torch.float64),), portable=False)
    p = _attn_params(s)
    assert p["sqr_fx_q_weight"] == (H * D, E - 1)
    assert dict(s.named_parameters())["inp.weight"].shape == (E - 1, E)  # its row 5 is unread
    assert dict(s.named_parameters())["attn.out_proj.weight"].shape == (E - 1, H * D)
    for shape in [(5, 2, E), (7, 3, E)]:
        check_equivalence(m, s, (torch.randn(*shape, dtype=torch.float64),), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kw", [{"cross": True}, {"need_weights": True}])
def test_guard_cross_attention_and_used_weights_are_not_converted(kw):
    m = _block(**kw)
    W, _ = _weights(m)
    W[2 * E: 2 * E + D] = 0
    s = minimize(m, (torch.randn(2, 5, E, dtype=torch.float64),), portable=False)
    assert not any(n.target is self_attention for n in s.graph.nodes)
    assert s.sqr_report.params_after == s.sqr_report.params_before
    _same(m, s)


def test_vit_stream_channels_heads_and_mlp_units_go():
    """A small torchvision ViT: class token + positional embedding + LayerNorms + attention + MLP."""
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                             mlp_dim=128, num_classes=10).double().eval()
    J = [0, 1, 2]  # stream channels every writer leaves constant and every LayerNorm reader ignores
    with torch.no_grad():
        nn.init.normal_(m.heads.head.weight)  # torchvision initializes the head to zero
        m.conv_proj.weight[J], m.conv_proj.bias[J] = 0, 0
        m.class_token[..., J], m.encoder.pos_embedding[..., J] = 0.0, 0.25
        for layer in m.encoder.layers:
            a = layer.self_attention
            a.in_proj_weight[:, J] = 0
            a.in_proj_weight[2 * 64: 2 * 64 + 16] = 0  # head 0's values are constants
            a.out_proj.weight[J], a.out_proj.bias[J] = 0, 0
            layer.mlp[0].weight[:, J] = 0
            layer.mlp[0].weight[:40] = 0  # dead MLP units (constant gelu(bias))
            layer.mlp[3].weight[J], layer.mlp[3].bias[J] = 0, 0
        m.heads.head.weight[:, J] = 0
    s = minimize(m, (torch.randn(2, 3, 32, 32, dtype=torch.float64),), portable=False)
    p = {k: tuple(v.shape) for k, v in s.named_parameters()}
    assert p["conv_proj.weight"] == (61, 3, 8, 8)
    assert p["encoder.layers.encoder_layer_0.self_attention.sqr_fx_v_weight"] == (48, 61)
    assert p["encoder.layers.encoder_layer_0.mlp.0.weight"] == (88, 61)
    assert any("compensated_layer_norm" in str(n.target) for n in s.graph.nodes)
    check_equivalence(m, s, (torch.randn(3, 3, 32, 32, dtype=torch.float64),), rtol=1e-9, atol=1e-10)
