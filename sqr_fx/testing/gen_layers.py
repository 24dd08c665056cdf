"""Weighted layers with planted structure: linear / addmm, conv (grouped, depthwise, padded), the norms
(BatchNorm, LayerNorm, RMSNorm, GroupNorm, their compensated forms) and embeddings.

Every layer draws its argument form (module / functional positional / functional keyword / ...) and a
planting mode (``core.PLANTS``): dead output rows with a zero or a non-zero bias (zero or constant
channels), unused input columns, unstructured zeros; norms get zero gammas (constant outputs).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import compensated_group_norm, compensated_layer_norm, compensated_rms_norm, removed_stats
from .core import CF, CL, PLANTS, Ctx, Skip, State, divisors, fan_in_scale, gen, param_of, plant

P = param_of


# ---- linear ------------------------------------------------------------------------------------------
LINEAR_FORMS = ("nn", "F", "F_kw", "F_bias_kw", "F_nobias", "addmm", "addmm_kw", "addmm_beta", "matmul", "einsum")


def dense_form(c: Ctx, st: State, key: str = "branch") -> str:
    return c.pick(key, ["nn", "F", "nn3", "F3"] if st.first else ["nn", "F", "F_kw"])


def dense(c: Ctx, st: State, out: int, form: str, plant_mode: str, bias: bool = True):
    """``fn(m, h)``: a planted Linear (channels last) or 1x1 / 3x3 conv (channels first) C -> out."""
    if st.first:
        nd = len(st.sp)
        k = 3 if form in ("F3", "nn3") else 1
        W, b = c.randn(out, st.C, *(k,) * nd, scale=fan_in_scale(st.C * k ** nd)), c.randn(out, scale=0.5)
        plant(c, W, b, plant_mode)
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        if form.startswith("nn"):
            mod = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1](st.C, out, k, padding=k // 2)
            with torch.no_grad():
                mod.weight.copy_(W), mod.bias.copy_(b)
            key = c.module(mod, "conv")
            return lambda m, h: m.M[key](h)
        w, bb = c.param(W), c.param(b, "b")
        return lambda m, h: conv(h, P(m, w), P(m, bb), padding=k // 2)
    W, b = c.randn(out, st.C, scale=fan_in_scale(st.C)), c.randn(out, scale=0.5) if bias else None
    plant(c, W, b, plant_mode)
    if form == "nn":
        mod = nn.Linear(st.C, out, bias=b is not None)
        with torch.no_grad():
            mod.weight.copy_(W)
            if b is not None:
                mod.bias.copy_(b)
        key = c.module(mod, "lin")
        return lambda m, h: m.M[key](h)
    if form.startswith("addmm") or form == "matmul":
        wt, bb = c.param(W.t().contiguous(), "wt"), c.param(b if b is not None else torch.zeros(out), "b")
        if form == "addmm":
            return lambda m, h: torch.addmm(P(m, bb), h, P(m, wt))
        if form == "addmm_kw":
            return lambda m, h: torch.addmm(P(m, bb), h, P(m, wt), beta=1, alpha=1)
        if form == "addmm_beta":
            return lambda m, h: torch.addmm(P(m, bb), h, P(m, wt), beta=0.5, alpha=2.0)
        return lambda m, h: h @ P(m, wt) + P(m, bb)
    w, bb = c.param(W), c.param(b, "b")
    if form == "F":
        return lambda m, h: F.linear(h, P(m, w), P(m, bb))
    if form == "F_kw":
        return lambda m, h: F.linear(input=h, weight=P(m, w), bias=P(m, bb))
    if form == "F_bias_kw":
        return lambda m, h: F.linear(h, P(m, w), bias=P(m, bb))
    if form == "einsum":
        return lambda m, h: torch.einsum("...i,oi->...o", h, P(m, w)) + (0.0 if bb is None else P(m, bb))
    return lambda m, h: F.linear(h, P(m, w))  # F_nobias


@gen("linear", CL, weight=4, families=("linear", "addmm", "matmul"))
def linear(c: Ctx, st: State) -> State:
    rank2 = (st.layout == "vec" and st.batched) or (st.layout == "seq" and not st.batched)
    form = c.pick("form", [f for f in LINEAR_FORMS if rank2 or not f.startswith("addmm")],
                  weights=[3 if f in ("nn", "F", "F_kw") else 1 for f in LINEAR_FORMS if rank2 or not f.startswith("addmm")])
    out = c.pick("out", range(1, 9))
    bias = c.pick("bias", [True, True, False]) if form in ("nn", "F", "F_kw", "F_bias_kw", "einsum") else \
        form != "F_nobias"
    c.step_h(dense(c, st, out, form, c.pick("plant", PLANTS), bias))
    return replace(st, C=out)


# ---- convolution ---------------------------------------------------------------------------------------
def _conv_out(n: int, k: int, s: int, p, d: int) -> int:
    if p == "same":
        return n
    p = 0 if p == "valid" else p
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@gen("conv", CF, weight=4, families=("conv",))
def conv(c: Ctx, st: State) -> State:
    nd = len(st.sp)
    form = c.pick("form", ["nn", "nn", "nn_pm", "F", "F", "F_kw", "F_min"])
    groups = c.pick("groups", divisors(st.C), weights=[4 if g == 1 else 1 for g in divisors(st.C)])
    out = c.pick("out", [groups * k for k in range(1, 13) if groups * k <= max(8, 2 * st.C)])
    k = c.pick("k", [1, 2, 3])
    stride = c.pick("stride", [1, 1, 2])
    dil = c.pick("dil", [1, 1, 2])
    pads = [0, 1, 2] + (["same"] if stride == 1 else []) + ["valid"]
    if form == "F_min":
        pads = [0]
    pad = c.pick("pad", pads)
    new_sp = tuple(_conv_out(n, k, stride, pad, dil) for n in st.sp)
    if min(new_sp) < 1:
        raise Skip("spatial")
    bias = c.pick("bias", [True, True, False])
    plant_mode = c.pick("plant", PLANTS)
    W = c.randn(out, st.C // groups, *(k,) * nd, scale=fan_in_scale(st.C // groups * k ** nd))
    b = c.randn(out, scale=0.5) if bias else None
    plant(c, W, b, plant_mode, groups)
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    if form.startswith("nn"):
        pm = c.pick("pm", ["reflect", "circular", "replicate"]) if form == "nn_pm" else "zeros"
        if pm != "zeros" and (not isinstance(pad, int) or pad == 0 or (pm == "reflect" and pad >= min(st.sp))):
            raise Skip("padding_mode")
        tup = c.pick("tuple", [False, True])
        kk = (k,) * nd if tup else k
        mod = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1](st.C, out, kk, stride, pad, dil, groups, bias, pm)
        with torch.no_grad():
            mod.weight.copy_(W)
            if b is not None:
                mod.bias.copy_(b)
        key = c.module(mod, "conv")
        c.step_h(lambda m, h: m.M[key](h))
    else:
        w, bb = c.param(W), c.param(b, "b")
        if form == "F":
            c.step_h(lambda m, h: fn(h, P(m, w), P(m, bb), stride, pad, dil, groups))
        elif form == "F_kw":
            c.step_h(lambda m, h: fn(input=h, weight=P(m, w), bias=P(m, bb), stride=stride, padding=pad,
                                     dilation=dil, groups=groups))
        else:  # F_min: only what differs from the defaults, as keywords
            kw = {k_: v for k_, v in (("stride", stride), ("dilation", dil), ("groups", groups)) if v != 1}
            c.step_h(lambda m, h: fn(h, P(m, w), P(m, bb), **kw))
    return replace(st, C=out, sp=new_sp)


# ---- BatchNorm -------------------------------------------------------------------------------------------
def _bn_params(c: Ctx, n: int, gamma0: bool):
    mean, var = c.randn(n, scale=0.5), c.rand(n, lo=0.5, hi=1.5)
    w, b = c.rand(n, lo=0.5, hi=1.5), c.randn(n, scale=0.5)
    if gamma0:
        w[c.subset(n)] = 0.0
    return mean, var, w, b


@gen("batch_norm", ("vec", "sig", "img", "vol"), weight=2, families=("batch_norm",))
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


@gen("layer_norm", CL, weight=2, families=("layer_norm",))
def layer_norm(c: Ctx, st: State) -> State:
    form = c.pick("form", ["nn", "nn", "nn_noaffine", "nn_nobias", "F", "F_kw", "F_plain", "F_shape", "compensated"])
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
    else:
        r = c.pick("removed", [1, 2, 3])
        mean, m2 = removed_stats(_compensation(c, r))
        mu, ss = c.buffer(mean, "rmean"), c.buffer(m2, "rm2")
        c.step_h(lambda m, h: compensated_layer_norm(h, P(m, wn), P(m, bn), C + r, P(m, mu), P(m, ss), eps))
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


@gen("rms_norm", CL, weight=1, families=("rms_norm",))
def rms_norm(c: Ctx, st: State) -> State:
    form = c.pick("form", ["F", "F_kw", "F_plain", "nn", "compensated"])
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
    else:
        r = c.pick("removed", [1, 2])
        ss = c.buffer(_compensation(c, r).square().sum(), "rss")
        c.step_h(lambda m, h: compensated_rms_norm(h, P(m, wn), C + r, P(m, ss), eps))
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
        c.step_h(lambda m, h: compensated_group_norm(h, P(m, wn), P(m, bn), P(m, gi), size, P(m, cnt), P(m, mu),
                                                     P(m, m2), 1e-5))
    return st


# ---- embeddings ------------------------------------------------------------------------------------------
@gen("embedding", ("tok",), weight=1, families=("embedding",))
def embedding(c: Ctx, st: State) -> State:
    form = c.pick("form", ["nn", "nn_pad", "F", "F_kw"])
    E = c.pick("dim", range(2, 9))
    W = c.randn(st.C, E)
    mode = c.pick("plant", ["none", "constcols", "zerocols", "constcols+zerocols"])
    with torch.no_grad():
        for part in mode.split("+"):
            if part != "none":
                for j in c.subset(E):
                    W[:, j] = 0.0 if part == "zerocols" else float(1 + c.prng.random())
    if form.startswith("nn"):
        mod = nn.Embedding(st.C, E, padding_idx=0 if form == "nn_pad" else None)
        with torch.no_grad():
            mod.weight.copy_(W)
            if form == "nn_pad":
                mod.weight[0] = 0.0
        key = c.module(mod, "emb")
        c.step_h(lambda m, h: m.M[key](h))
    else:
        w = c.param(W)
        if form == "F":
            c.step_h(lambda m, h: F.embedding(h, P(m, w)))
        else:
            c.step_h(lambda m, h: F.embedding(input=h, weight=P(m, w)))
    return State("seq", E, tuple(st.sp), st.batched)
