"""Norms: BatchNorm (module with / without affine or running statistics, functional), LayerNorm (channels
last, and channels first as in ConvNeXt), RMSNorm, GroupNorm, and sqr_fx's compensated forms (what
minimize emits when it removes constant channels); planted zero gammas make constant outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import layers as L  # called as L.compensated_*: torch.fx.wrap patches the name in sqr_fx.layers
from ..layers import removed_stats
from .core import CF, CL, Ctx, Skip, State, divisors, gen, param_of

P = param_of


# ---- BatchNorm -------------------------------------------------------------------------------------------
def _bn_params(c: Ctx, n: int, gamma0: bool):
    mean, var = c.randn(n, scale=0.5), c.rand(n, lo=0.5, hi=1.5)
    w, b = c.rand(n, lo=0.5, hi=1.5), c.randn(n, scale=0.5)
    if gamma0:
        w[c.subset(n)] = 0.0
    return mean, var, w, b


@gen("batch_norm", ("vec", "sig", "img", "vol"), weight=2, families=("batch_norm",), by_layout=True)
def batch_norm(c: Ctx, st: State) -> State:
    if not st.batched:
        raise Skip("unbatched")
    form = c.pick("form", ["nn", "nn", "nn_noaffine", "nn_nostats", "F", "F_kw", "F_noaffine"])
    gamma0 = c.pick("gamma0", [False, True])
    mean, var, w, b = _bn_params(c, st.C, gamma0)
    eps = c.pick("eps", [1e-5, 1e-3])
    if form.startswith("nn"):
        cls = {"vec": nn.BatchNorm1d, "sig": nn.BatchNorm1d, "img": nn.BatchNorm2d, "vol": nn.BatchNorm3d}[st.layout]
        mod = cls(st.C, eps=eps, affine=form != "nn_noaffine", track_running_stats=form != "nn_nostats")
        with torch.no_grad():
            if mod.running_mean is not None:
                mod.running_mean.copy_(mean), mod.running_var.copy_(var)
            if mod.weight is not None:
                mod.weight.copy_(w), mod.bias.copy_(b)
        key = c.module(mod, "bn")
        c.step_h(lambda m, h: m.M[key](h))
        return st
    rm, rv = c.buffer(mean, "rm"), c.buffer(var, "rv")
    wn, bn = (None, None) if form == "F_noaffine" else (c.param(w), c.param(b, "b"))
    if form == "F":
        c.step_h(lambda m, h: F.batch_norm(h, P(m, rm), P(m, rv), P(m, wn), P(m, bn), False, 0.1, eps))
    elif form == "F_kw":
        c.step_h(lambda m, h: F.batch_norm(h, P(m, rm), P(m, rv), weight=P(m, wn), bias=P(m, bn), training=False,
                                           eps=eps))
    else:
        c.step_h(lambda m, h: F.batch_norm(h, P(m, rm), P(m, rv)))
    return st


# ---- LayerNorm / RMSNorm over the last axis ----------------------------------------------------------------
def _gamma(c: Ctx, n: int, gamma0: bool) -> torch.Tensor:
    w = c.rand(n, lo=0.5, hi=1.5)
    if gamma0:
        w[c.subset(n)] = 0.0
    return w


def _compensation(c: Ctx, r: int):
    """``r`` removed constant channels: their values (so the compensated call is a real, valid layer)."""
    return c.randn(r, scale=0.7)


def _written_layer_norm(h, form: str, eps: float):
    if form == "written_mean":
        d = h - h.mean(-1, keepdim=True)
        return d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + eps)
    if form == "written_var":
        return (h - h.mean(-1, keepdim=True)) / torch.sqrt(torch.var(h, -1, unbiased=False, keepdim=True) + eps)
    v, u = torch.var_mean(h, dim=-1, correction=0, keepdim=True)
    return (h - u) * torch.rsqrt(eps + v)


@gen("layer_norm", CL, weight=2, families=("layer_norm",))
def layer_norm(c: Ctx, st: State) -> State:
    form = c.pick("form", ["nn", "nn", "nn_noaffine", "nn_nobias", "F", "F_kw", "F_plain", "F_shape", "compensated",
                           "written_mean", "written_var", "written_var_mean"])
    C, eps = st.C, c.pick("eps", [1e-5, 1e-6])
    w, b = _gamma(c, C, c.pick("gamma0", [False, True])), c.randn(C, scale=0.5)
    if form.startswith("nn"):
        mod = nn.LayerNorm(C, eps=eps, elementwise_affine=form != "nn_noaffine", bias=form != "nn_nobias")
        with torch.no_grad():
            if mod.weight is not None:
                mod.weight.copy_(w)
            if mod.bias is not None:
                mod.bias.copy_(b)
        key = c.module(mod, "ln")
        c.step_h(lambda m, h: m.M[key](h))
        return st
    wn, bn = c.param(w), c.param(b, "b")
    if form == "F":
        c.step_h(lambda m, h: F.layer_norm(h, (C,), P(m, wn), P(m, bn), eps))
    elif form == "F_kw":
        c.step_h(lambda m, h: F.layer_norm(input=h, normalized_shape=[C], weight=P(m, wn), bias=P(m, bn), eps=eps))
    elif form == "F_plain":
        c.step_h(lambda m, h: F.layer_norm(h, (C,)))
    elif form == "F_shape":
        c.step_h(lambda m, h: F.layer_norm(h, h.shape[-1:], P(m, wn), P(m, bn)))
    elif form.startswith("written"):  # patterns.layer_norm_from_pattern reads these as F.layer_norm
        c.step_h(lambda m, h: P(m, wn) * _written_layer_norm(h, form, eps) + P(m, bn))
    else:
        r = c.pick("removed", [1, 2, 3])
        mean, m2 = removed_stats(_compensation(c, r))
        mu, ss = c.buffer(mean, "rmean"), c.buffer(m2, "rm2")
        c.step_h(lambda m, h: L.compensated_layer_norm(h, P(m, wn), P(m, bn), C + r, P(m, mu), P(m, ss), eps))
    return st


@gen("layer_norm_cf", ("img", "sig"), weight=1, families=("layer_norm", "permute"))
def layer_norm_channels_first(c: Ctx, st: State) -> State:
    """ConvNeXt's LayerNorm2d: channels moved last, normalized, moved back."""
    form = c.pick("form", ["permute", "movedim", "Permute"] if st.batched else ["permute", "movedim"])
    w, b = _gamma(c, st.C, c.pick("gamma0", [False, True])), c.randn(st.C, scale=0.5)
    wn, bn = c.param(w), c.param(b, "b")
    C, r = st.C, st.rank
    fwd, back = list(range(r)), list(range(r))
    ch = st.lit(st.ch)
    fwd.append(fwd.pop(ch))
    back.insert(ch, back.pop())
    if form == "Permute":
        from torchvision.ops.misc import Permute
        k1, k2 = c.module(Permute(fwd), "perm"), c.module(Permute(back), "perm")
        c.step_h(lambda m, h: m.M[k2](F.layer_norm(m.M[k1](h), (C,), P(m, wn), P(m, bn))))
    elif form == "permute":
        c.step_h(lambda m, h: F.layer_norm(h.permute(*fwd), (C,), P(m, wn), P(m, bn)).permute(*back))
    else:
        c.step_h(lambda m, h: torch.movedim(F.layer_norm(h.movedim(ch, -1), (C,), P(m, wn), P(m, bn)), -1, ch))
    return st


@gen("rms_norm", CL, weight=1, families=("rms_norm", "rms_norm_full_width"))
def rms_norm(c: Ctx, st: State) -> State:
    form = c.pick("form", ["F", "F_kw", "F_plain", "nn", "compensated", "upcast", "full_width"])
    C, eps = st.C, c.pick("eps", [1e-6, None])
    w = _gamma(c, C, c.pick("gamma0", [False, True]))
    if form == "nn":
        mod = nn.RMSNorm(C, eps=eps)
        with torch.no_grad():
            mod.weight.copy_(w)
        key = c.module(mod, "rms")
        c.step_h(lambda m, h: m.M[key](h))
        return st
    wn = c.param(w)
    if form == "F":
        c.step_h(lambda m, h: F.rms_norm(h, (C,), P(m, wn), eps))
    elif form == "F_kw":
        c.step_h(lambda m, h: F.rms_norm(input=h, normalized_shape=(C,), weight=P(m, wn), eps=eps))
    elif form == "F_plain":
        c.step_h(lambda m, h: F.rms_norm(h, [C]))
    elif form == "upcast":  # T5's form (statistic dtype float64 here: the fuzzer compares at float64)
        c.step_h(lambda m, h: P(m, wn) * L.upcast_rms_norm(h, 1e-6 if eps is None else eps, torch.float64))
    elif form == "full_width":  # what minimize emits for it: C kept of C + r, the r constants rebuilt
        r = c.pick("removed", [1, 2])
        fill = torch.cat([torch.zeros(C, dtype=torch.float64), _compensation(c, r)])
        perm = torch.randperm(C + r, generator=torch.Generator().manual_seed(C + r))
        kept = c.buffer(torch.sort(perm[:C]).values, "kept")
        fill_b = c.buffer(fill[torch.argsort(torch.cat([torch.sort(perm[:C]).values, torch.sort(perm[C:]).values]))],
                          "fill")
        stat = c.pick("stat", [None, torch.float64])
        c.step_h(lambda m, h: P(m, wn) * L.full_width_rms_norm(h, P(m, kept), P(m, fill_b), eps, stat))
    else:
        r = c.pick("removed", [1, 2])
        ss = c.buffer(_compensation(c, r).square().sum(), "rss")
        c.step_h(lambda m, h: L.compensated_rms_norm(h, P(m, wn), C + r, P(m, ss), eps))
    return st


@gen("group_norm", CF, weight=2, families=("group_norm",))
def group_norm(c: Ctx, st: State) -> State:
    if not st.batched:
        raise Skip("unbatched")
    form = c.pick("form", ["nn", "nn", "nn_noaffine", "F", "F_kw", "compensated"])
    G = c.pick("groups", divisors(st.C))
    w, b = _gamma(c, st.C, c.pick("gamma0", [False, True])), c.randn(st.C, scale=0.5)
    if form.startswith("nn"):
        mod = nn.GroupNorm(G, st.C, affine=form == "nn")
        if form == "nn":
            with torch.no_grad():
                mod.weight.copy_(w), mod.bias.copy_(b)
        key = c.module(mod, "gn")
        c.step_h(lambda m, h: m.M[key](h))
        return st
    wn, bn = c.param(w), c.param(b, "b")
    if form == "F":
        c.step_h(lambda m, h: F.group_norm(h, G, P(m, wn), P(m, bn), 1e-5))
    elif form == "F_kw":
        c.step_h(lambda m, h: F.group_norm(input=h, num_groups=G, weight=P(m, wn), bias=P(m, bn)))
    else:  # every group had one more channel, removed with a constant
        size = st.C // G + 1
        gi = c.buffer(torch.arange(st.C) // (st.C // G), "gidx")
        cnt = c.buffer(torch.ones(G, dtype=torch.long), "gcnt")
        mu, m2 = c.buffer(c.randn(G, scale=0.5), "gmean"), c.buffer(torch.zeros(G, dtype=torch.float64), "gm2")
        c.step_h(lambda m, h: L.compensated_group_norm(h, P(m, wn), P(m, bn), P(m, gi), size, P(m, cnt), P(m, mu),
                                                     P(m, m2), 1e-5))
    return st
