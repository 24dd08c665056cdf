"""Tied input embedding / output projection (GPT-2 style ``lm_head.weight is wte.weight``).

The one tensor is read by ``embedding`` (its columns are the output channels) and by ``linear``
(its columns are the input channels). Both slice axis 1 along the residual stream's channel
group, so the analysis couples the two readers' ids there, the tensor is sliced once and the
result still holds ONE parameter read by both. Any other reader keeps the tensor whole (and
``strict=True`` raises TiedWeightsError for it, as before)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sqr_fx
from sqr_fx import count_stored_floats, minimize

F64 = torch.float64
VOCAB, C, H = 40, 16, 32
CONST = [1, 6]      # wte column constant (non-zero), ln_f gamma_j = 0: beta_j folds into lm_head's bias
ZERO = [3, 11]      # wte column zero: lm_head ignores ln_f output j
KEPT_CONST = [8]    # wte column constant but ln_f output j is read: its output varies, it stays
STREAM = CONST + ZERO


def ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


class TinyLM(nn.Module):
    """wte -> x + MLP(LN(x)) -> LN_f -> lm_head (weight tied to wte)."""

    def __init__(self, head: str = "linear"):
        super().__init__()
        self.head = head
        self.wte = nn.Embedding(VOCAB, C, dtype=F64)
        self.ln1, self.ln_f = nn.LayerNorm(C, dtype=F64), nn.LayerNorm(C, dtype=F64)
        self.fc1, self.fc2 = nn.Linear(C, H, dtype=F64), nn.Linear(H, C, dtype=F64)
        self.lm_head = nn.Linear(C, VOCAB, bias=False, dtype=F64)
        self.lm_head.weight = self.wte.weight

    def forward(self, i):
        x = self.wte(i)
        x = x + self.fc2(F.gelu(self.fc1(self.ln1(x))))
        x = self.ln_f(x)
        if self.head == "matmul":  # x @ W.T: the front end reads it as F.linear(x, W), a column-sliced tie
            return torch.matmul(x, self.wte.weight.t())
        if self.head == "scale":  # the tied tensor also read by a reduction: not followed
            return self.lm_head(x) * self.wte.weight.sum()
        return self.lm_head(x)


@torch.no_grad()
def planted(head: str = "linear") -> TinyLM:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m = TinyLM(head)
    for ln in (m.ln1, m.ln_f):
        ln.weight.normal_(1.0, 0.3, generator=g)
        ln.bias.normal_(0.0, 0.3, generator=g)
    W = m.wte.weight
    W[:, CONST + KEPT_CONST] = torch.randn(len(CONST + KEPT_CONST), generator=g, dtype=F64)  # same for every token
    W[:, ZERO] = 0
    m.fc1.weight[:, STREAM + KEPT_CONST] = 0  # ln1 output j ignored
    m.fc2.weight[STREAM + KEPT_CONST] = 0     # the MLP writes its bias into j: still a constant
    m.ln_f.weight[CONST] = 0
    m.fc1.weight[:5] = 0                      # 5 constant hidden units (fold into fc2's bias)
    m.fc2.weight[:, 5:9] = 0                  # 4 unread hidden units
    return m.eval()


def check(m: nn.Module, s: nn.Module) -> None:
    for b, t in [(2, 7), (3, 12)]:
        x = ids(b, t, seed=t)
        with torch.no_grad():
            want, got = m(x), s(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


@pytest.mark.parametrize("front", ["fx", "export"])
def test_tied_embedding_and_head_are_sliced_once_and_stay_tied(front):
    m = planted()
    x = ids(2, 7)
    src = m
    if front == "export":
        auto = torch.export.Dim.AUTO
        src = torch.export.export(m, (x,), dynamic_shapes=({0: auto, 1: auto},)).module()
    s = minimize(src, (x,), strict=front == "fx")  # nothing kept whole: strict mode has nothing to refuse
    rep = s.sqr_report
    assert not rep.tied_tensors and rep.shared_tensors
    names = [n for n in ("wte.weight", "lm_head.weight") if n in dict(s.named_parameters(remove_duplicate=False))]
    assert names
    kept = [j for j in range(C) if j not in STREAM]
    w = s.get_parameter(names[0])
    assert w.shape == (VOCAB, len(kept)) and torch.equal(w, m.wte.weight[:, kept])
    if front == "fx":  # both names survive and are the SAME parameter
        assert s.get_parameter("wte.weight") is s.get_parameter("lm_head.weight")
    # one table (the head also gained a bias: the folded beta_j of the removed channels)
    assert len([p for p in s.parameters() if p.dim() == 2 and p.shape[0] == VOCAB]) == 1
    assert dict(s.named_parameters())["fc1.weight"].shape == (H - 9, len(kept))
    assert count_stored_floats(s) < count_stored_floats(m)
    check(m, s)
    again = minimize(s, (x,))
    assert again.sqr_report.rounds == 0 and count_stored_floats(again) == count_stored_floats(s)
    if front == "fx":
        assert again.get_parameter("wte.weight") is again.get_parameter("lm_head.weight")


def test_matmul_with_the_transposed_tied_table_is_a_linear_head():
    """``x @ wte.weight.t()`` is ``F.linear(x, wte.weight)``: sliced once with the embedding."""
    m = planted(head="matmul")
    s = minimize(m, (ids(2, 7),), strict=True)
    assert not s.sqr_report.tied_tensors and s.sqr_report.shared_tensors
    kept = [j for j in range(C) if j not in STREAM]
    assert s.get_parameter("wte.weight").shape == (VOCAB, len(kept))
    check(m, s)


def test_tied_tensor_with_another_reader_is_kept_whole():
    """``wte.weight.sum()`` reads the tied tensor outside the embedding/linear slicing: it stays whole
    (and its stream channels with it), strict mode refuses it; the MLP units still go."""
    m = planted(head="scale")
    with pytest.raises(sqr_fx.TiedWeightsError, match="wte.weight"):
        minimize(m, (ids(2, 7),), strict=True)
    s = minimize(m, (ids(2, 7),))
    assert s.sqr_report.tied_tensors and not s.sqr_report.shared_tensors
    assert s.get_parameter("wte.weight").shape == (VOCAB, C)
    assert dict(s.named_parameters())["fc1.weight"].shape == (H - 9, C)
    check(m, s)


def test_untied_reference_removes_the_same_stream_channels():
    """The same planted model with the head untied: the tie costs nothing any more."""
    m = planted()
    with torch.no_grad():
        m.lm_head.weight = nn.Parameter(m.wte.weight.detach().clone())
    s = minimize(m, (ids(2, 7),))
    assert s.get_parameter("wte.weight").shape == (VOCAB, C - len(STREAM))
    assert s.get_parameter("lm_head.weight").shape == (VOCAB, C - len(STREAM))
    check(m, s)
