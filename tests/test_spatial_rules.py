"""pad / interpolate / normalize over non-channel axes, and x @ W.T as a linear layer: channels go
through them exactly; over the channel axis they decline (kept)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqr_fx import check_equivalence, minimize


def _x(*s, seed=0):
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Spatial(nn.Module):
    """conv -> (op over spatial axes) -> conv, with one dead, one constant (0.5) and one zero channel."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a, self.b = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 1)
        with torch.no_grad():
            self.a.weight[1], self.a.bias[1] = 0, -1.0   # relu -> 0: zero
            self.a.weight[2], self.a.bias[2] = 0, 0.5    # constant 0.5
            self.b.weight[:, 4] = 0                      # unread

    def forward(self, x):
        return self.b(self.op(torch.relu(self.a(x))))


OPS = {
    "pad_const0": lambda h: F.pad(h, (1, 2, 0, 1)),
    "pad_value": lambda h: F.pad(h, (1, 1, 1, 1), value=0.5),
    "pad_reflect": lambda h: F.pad(h, (1, 1, 1, 1), mode="reflect"),
    "pad_replicate": lambda h: F.pad(h, (2, 0, 0, 0), mode="replicate"),
    "interp_nearest": lambda h: F.interpolate(h, scale_factor=2, mode="nearest"),
    "interp_bilinear": lambda h: F.interpolate(h, size=(7, 5), mode="bilinear", align_corners=False),
    "interp_bicubic": lambda h: F.interpolate(h, scale_factor=1.5, mode="bicubic", align_corners=True),
    "normalize_spatial": lambda h: F.normalize(h, dim=-1),
    "gather_rows": lambda h: h[:, :, torch.tensor([0, 5, 5, 2])],  # advanced indexing of a spatial axis
}


class Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return OPS[self.fn](h)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("front", ["fx", "export"])
def test_spatial_ops_keep_channels_in_place(name, front):
    m = Spatial(Op(name)).double().eval()
    x = _x(2, 3, 8, 8)
    auto = torch.export.Dim.AUTO
    src = m if front == "fx" else torch.export.export(m, (x,), dynamic_shapes=({0: auto},)).module()
    s = minimize(src, (x,))
    if not (front == "export" and name.startswith("normalize")):  # export decomposes F.normalize
        assert s.get_parameter("a.weight").shape[0] < 6  # the unread channel at least
    check_equivalence(m, s, (_x(3, 3, 8, 8, seed=1),), rtol=1e-10, atol=1e-12)
    if front == "fx":
        check_equivalence(m, s, (_x(1, 3, 12, 10, seed=2),), rtol=1e-10, atol=1e-12)


def test_pad_with_another_value_keeps_a_constant_channel_out_of_the_fold():
    """Padding with 0 makes the 0.5 channel position-dependent: it is not folded (the next conv reads it)."""
    m = Spatial(Op("pad_const0")).double().eval()
    s = minimize(m, (_x(2, 3, 8, 8),))
    assert s.get_parameter("a.weight").shape[0] == 4  # zero (1) and unread (4) go; the 0.5 channel stays
    check_equivalence(m, s, (_x(2, 3, 9, 8, seed=3),), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", [lambda h: F.pad(h.transpose(1, 3), (1, 1)).transpose(1, 3),
                                lambda h: F.normalize(h, dim=1)])
def test_over_the_channel_axis_they_decline(fn):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = Spatial(nn.Identity())

        def forward(self, x):
            m = self.m
            return m.b(fn(torch.relu(m.a(x)))[:, :6])

    m = M().double().eval()
    s = minimize(m, (_x(2, 3, 8, 8),))
    assert s.sqr_report.declined
    check_equivalence(m, s, (_x(3, 3, 8, 8, seed=4),), rtol=1e-10, atol=1e-12)


def test_matmul_with_a_transposed_parameter_is_a_linear_layer():
    """Falcon's ``x @ W.T``: read by the linear rule, its dead rows go."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.V = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(3, 6))
            with torch.no_grad():
                self.W[:2] = 0

        def forward(self, x):
            return torch.matmul(torch.relu(x @ self.W.T - 1), self.V.t())

    m = M().double().eval()
    x = _x(5, 7, 4)
    auto = torch.export.Dim.AUTO
    for src in (m, torch.export.export(m, (x,), dynamic_shapes=({0: auto, 1: auto},)).module()):
        s = minimize(src, (x,))
        assert s.sqr_report.ratio == pytest.approx(1.5)
        check_equivalence(m, s, (_x(2, 3, 4, seed=5),), rtol=1e-10, atol=1e-12)


class EosPooling(nn.Module):
    """CLIP's text pooling: the hidden state at each sequence's argmax token, ``x[arange(B), ids.argmax(-1)]``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        with torch.no_grad():
            self.a.weight[2:5], self.a.bias[2:5] = 0, -1.0  # three dead units behind the relu

    def forward(self, x, ids):
        h = torch.relu(self.a(x))
        return self.b(h[torch.arange(h.shape[0]), ids.argmax(-1)])


@pytest.mark.parametrize("front", ["fx", "export"])
def test_token_pooling_by_index_tensors_keeps_channels(front):
    m = EosPooling().double().eval()
    x, ids = _x(3, 5, 6), _x(3, 5, seed=1)
    auto = torch.export.Dim.AUTO
    src = m if front == "fx" else torch.export.export(
        m, (x, ids), dynamic_shapes=({0: auto, 1: auto}, {0: auto, 1: auto})).module()
    s = minimize(src, (x, ids))
    assert s.sqr_report.params_after == s.sqr_report.params_before - 3 * 6 - 3 - 3 * 3
    for b, t in [(3, 5), (4, 7)]:
        args = (_x(b, t, 6, seed=b), _x(b, t, seed=t))
        check_equivalence(m, s, args, rtol=1e-10, atol=1e-12)


def test_indexing_the_channel_axis_with_a_tensor_declines():
    class ChannelGather(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(3, 2)
            with torch.no_grad():
                self.a.weight[1], self.a.bias[1] = 0, 0.5  # a constant channel, gathered twice below

        def forward(self, x):
            return self.b(self.a(x)[:, torch.tensor([1, 1, 4])])

    m = ChannelGather().double().eval()
    s = minimize(m, (_x(2, 6),))
    check_equivalence(m, s, (_x(5, 6, seed=3),), rtol=1e-10, atol=1e-12)
