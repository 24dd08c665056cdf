"""minimize across GroupNorm (F.group_norm, nn.GroupNorm, aten.group_norm): a channel leaves its
group's statistic only when it is a known constant there (docs/compensated_layernorm.md,
"GroupNorm"); the output channel then goes when it is unread or gamma_j == 0 (beta_j folds).
Everything in float64, compared with the original at two batch and two spatial sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sqr_fx import count_stored_floats, minimize
from sqr_fx.layers import compensated_group_norm

F64 = torch.float64
SIZES = [(2, 6, 6), (3, 9, 7)]  # (batch, H, W): the traced size and another one


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class Net(nn.Module):
    """conv -> GroupNorm -> SiLU -> conv (both convs zero-padded)."""

    def __init__(self, c_in: int, c: int, groups: int, c_out: int, functional: bool = False):
        super().__init__()
        self.functional, self.groups = functional, groups
        self.c1 = nn.Conv2d(c_in, c, 3, padding=1, dtype=F64)
        self.gn = nn.GroupNorm(groups, c, dtype=F64)
        self.c2 = nn.Conv2d(c, c_out, 3, padding=1, dtype=F64)

    def forward(self, x):
        h = self.c1(x)
        h = F.group_norm(h, self.groups, self.gn.weight, self.gn.bias, self.gn.eps) if self.functional else self.gn(h)
        return self.c2(F.silu(h))


@torch.no_grad()
def plant(m: Net, const: list[int], gamma0: list[int], unread: list[int], seed: int = 0) -> Net:
    """``const``: conv1 rows zeroed (the GroupNorm input there is the bias, a constant);
    ``gamma0``: gamma_j = 0 (output j is beta_j); ``unread``: conv2 columns zeroed."""
    g = torch.Generator().manual_seed(seed)
    for p in m.gn.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    m.c1.bias.copy_(3 * torch.randn(m.c1.bias.shape, generator=g, dtype=F64))
    m.c1.weight[const] = 0
    m.gn.weight[gamma0] = 0
    m.c2.weight[:, unread] = 0
    return m.eval()


def gn_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is compensated_group_norm]


def check(m: nn.Module, s: nn.Module, rtol: float = 1e-10) -> None:
    for b, h, w in SIZES:
        x = randn(b, 3, h, w, seed=b * h)
        with torch.no_grad():
            want, got = m(x), s(x)
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


# GroupNorm(4, 12): groups {0,1,2} {3,4,5} {6,7,8} {9,10,11}
CONST = [0, 1, 2, 4, 7, 8, 10, 11]
GAMMA0 = [0, 1, 4, 11]     # constant input, gamma 0: output beta_j folds into conv2 (padded: correction conv)
UNREAD = [2, 7, 8, 9]      # 9 is unread but its input varies: it stays (the statistic needs it)
REMOVED = [0, 1, 2, 4, 7, 8, 11]  # 10: constant input, read, gamma != 0: its output varies, it stays


@pytest.mark.parametrize("front", ["module", "functional", "export"])
def test_group_norm_removes_constant_channels_inside_groups(front):
    m = plant(Net(3, 12, 4, 5, functional=front == "functional"), CONST, GAMMA0, UNREAD)
    x = randn(*SIZES[0][:1], 3, *SIZES[0][1:])
    src = m
    if front == "export":
        auto = torch.export.Dim.AUTO
        src = torch.export.export(m, (x,), dynamic_shapes=({0: auto, 2: auto, 3: auto},)).module()
    s = minimize(src, (x,), portable=False)
    assert not s.sqr_report.frozen_ops
    kept = [j for j in range(12) if j not in REMOVED]
    p = dict(s.named_parameters())
    assert p["c1.weight"].shape[0] == len(kept) and p["c2.weight"].shape[1] == len(kept)
    assert torch.equal(p["gn.weight"], m.gn.weight[kept])
    (node,) = gn_nodes(s)
    assert node.args[4] == 3  # original group size
    # group 0 lost everything, groups 1-3 keep 2, 1, 2 channels
    assert s.get_buffer(node.args[3].target).tolist() == [1, 1, 2, 3, 3]
    assert s.get_buffer(node.args[5].target).tolist() == [3, 1, 2, 1]
    assert count_stored_floats(s) < count_stored_floats(m)
    check(m, s)
    again = minimize(s, (x,))
    assert again.sqr_report.rounds == 0 and count_stored_floats(again) == count_stored_floats(s)


def test_group_norm_guards_keep_varying_or_read_channels():
    """Unread output over a varying input, and a constant input whose (read) output varies, stay."""
    m = plant(Net(3, 8, 2, 4), const=[1], gamma0=[], unread=[0, 5])
    s = minimize(m, (randn(2, 3, 6, 6),))
    assert dict(s.named_parameters())["c1.weight"].shape[0] == 8 and not gn_nodes(s)
    check(m, s)


def test_compensated_group_norm_is_shrunk_again():
    """A second removal at an already compensated GroupNorm merges each group's statistics."""
    m = plant(Net(3, 12, 4, 5), CONST, GAMMA0, UNREAD)
    x = randn(2, 3, 6, 6)
    s = minimize(m, (x,), portable=False)
    p = dict(s.named_parameters())
    with torch.no_grad():  # kept channels 3 (group 1) and 10 (group 3) become removable in `s`
        for j in (0, 4):
            p["c1.weight"][j] = 0
            p["gn.weight"][j] = 0
    s2 = minimize(s, (x,), portable=False)
    (node,) = gn_nodes(s2)
    assert s2.get_buffer(node.args[3].target).tolist() == [1, 2, 3]
    assert s2.get_buffer(node.args[5].target).tolist() == [3, 2, 2, 2]
    check(s, s2)


@settings(deadline=None, max_examples=15)
@given(data=st.data())
def test_group_norm_property(data):
    groups = data.draw(st.integers(1, 4), label="groups")
    size = data.draw(st.integers(1, 4), label="group size")
    c = groups * size
    flags = st.lists(st.booleans(), min_size=c, max_size=c)
    const, gamma0, unread = ([j for j, f in enumerate(data.draw(flags, label=lab)) if f]
                             for lab in ("const", "gamma0", "unread"))
    m = plant(Net(3, c, groups, 3), const, gamma0, unread, seed=data.draw(st.integers(0, 99), label="seed"))
    s = minimize(m, (randn(2, 3, 6, 6),))
    removable = {j for j in const if j in gamma0 or j in unread}
    if set(range(c)) - removable <= set(unread):  # no kept output is read: the statistic is dead too
        removable = set(range(c))
    width = dict(s.named_parameters())["c1.weight"].shape[0]
    assert width == max(c - len(removable), 1)
    check(m, s, rtol=1e-9)
