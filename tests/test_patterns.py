"""Written-out RMSNorm (Hugging Face's Llama/Qwen/Mistral/Gemma/T5 form) is read as ``F.rms_norm``:
residual-stream channels leave through it with a compensated RMS, exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqr_fx import check_equivalence, minimize

C, H, V = 8, 16, 11
J = [2, 5]  # planted dead stream channels


class WrittenRMSNorm(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form, self.weight, self.eps = form, nn.Parameter(torch.rand(C) + 0.5), 1e-6

    def forward(self, x):
        h = x.to(torch.float64)
        var = {"pow": lambda: h.pow(2), "mul": lambda: h * h, "square": lambda: torch.square(h)}[self.form]()
        if self.form == "mul":  # operands the other way round
            h = torch.rsqrt(var.mean(-1, keepdim=True) + self.eps) * h
        else:
            h = h * torch.rsqrt(var.mean(-1, keepdim=True) + self.eps)
        w = (1 + self.weight) if self.form == "square" else self.weight  # Gemma's (1 + w)
        return w * h.to(x.dtype)


class TinyDecoder(nn.Module):
    """emb -> x + mlp(norm1(x)) -> norm_f -> head, channels J dead in the stream."""

    def __init__(self, form: str):
        super().__init__()
        self.emb, self.norm1, self.norm_f = nn.Embedding(V, C), WrittenRMSNorm(form), WrittenRMSNorm(form)
        self.up, self.down, self.head = nn.Linear(C, H), nn.Linear(H, C), nn.Linear(C, V)
        with torch.no_grad():
            self.emb.weight[:, J] = 0
            self.up.weight[:, J] = 0
            self.down.weight[J] = 0
            self.down.bias[J] = 0
            self.head.weight[:, J] = 0

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.down(F.silu(self.up(self.norm1(x))))
        return self.head(self.norm_f(x))


def _ids(b, t, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form", ["pow", "mul", "square"])
@pytest.mark.parametrize("front", ["fx", "export"])
def test_written_out_rms_norm_lets_stream_channels_go(form, front):
    torch.manual_seed(0)
    m = TinyDecoder(form).double().eval()
    x = _ids(2, 6)
    src = m
    if front == "export":
        auto = torch.export.Dim.AUTO
        src = torch.export.export(m, (x,), dynamic_shapes=({0: auto, 1: auto},)).module()
    s = minimize(src, (x,))
    assert s.get_parameter("up.weight").shape == (H, C - len(J))
    for b, t in [(3, 5), (1, 9)]:
        check_equivalence(m, s, (_ids(b, t, seed=t),), rtol=1e-10, atol=1e-12)


def test_a_shared_intermediate_is_left_written_out():
    """The variance is read elsewhere too: the pattern does not match, the stream stays (exact)."""
    class Shared(WrittenRMSNorm):
        def forward(self, x):
            var = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(var + self.eps)) + var

    m = Shared("pow").double().eval()
    s = minimize(m, (torch.randn(2, 3, C, dtype=torch.float64),))
    assert not [n for n in s.graph.nodes if n.target is F.rms_norm]
    check_equivalence(m, s, (torch.randn(4, 2, C, dtype=torch.float64),), rtol=1e-12, atol=1e-12)


def test_an_rms_over_a_spatial_axis_is_left_written_out():
    """Found by the fuzzer: a written-out RMS over a flattened (size-dependent) axis. F.rms_norm would
    pin the traced width; the pattern is left as it is and the result runs at every size."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 3, 1)

        def forward(self, x):
            h = self.conv(x).flatten(1)
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)

    m = Flat().double().eval()
    s = minimize(m, (torch.randn(2, 4, 6, dtype=torch.float64),))
    assert not [n for n in s.graph.nodes if n.target is F.rms_norm]
    check_equivalence(m, s, (torch.randn(3, 4, 9, dtype=torch.float64),), rtol=1e-12, atol=1e-12)


def test_two_written_out_rms_norms_in_a_row():
    """Found by the fuzzer: the second norm reads the first one's product, rewritten before it."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, C)

        def forward(self, x):
            h = self.fc(x)
            for _ in range(2):
                h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return h

    m = Twice().double().eval()
    s = minimize(m, (torch.randn(2, 4, dtype=torch.float64),))
    assert len([n for n in s.graph.nodes if n.target is F.rms_norm]) == 2
    check_equivalence(m, s, (torch.randn(5, 4, dtype=torch.float64),), rtol=1e-12, atol=1e-12)
