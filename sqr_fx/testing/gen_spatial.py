"""Ops along the spatial axes and shape reads: roll, pooling (max / avg / padded / ceil / adaptive, 1-3d),
reductions (global, keepdim, centering, a hand-written RMS norm), expand / class tokens, size reads;
module / functional / keyword forms, literal and negative dims.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .core import CF, CL, Ctx, Skip, State, gen, param_of
from .gen_shape import _dim

P = param_of
ANY = CL + CF


# ---- roll -----------------------------------------------------------------------------------------------------
@gen("roll", ANY, weight=0.7, families=("roll",), enum=("what", "form"))
def roll(c: Ctx, st: State) -> State:
    what = c.pick("what", (["sp", "sp_all"] if st.sp else []) + ["ch", "flat"])
    form = c.pick("form", ["torch", "torch_kw", "method"])
    sh = c.pick("shift", [1, -2, 3])
    if what == "flat":
        dims = None
    elif what == "ch":
        dims = _dim(c, st, st.ch)
    elif what == "sp":
        dims = _dim(c, st, st.sp_axes[-1])
    else:
        dims = tuple(st.sp_axes)
    shifts = sh if dims is None or isinstance(dims, int) else tuple(sh + i for i in range(len(dims)))
    if dims is None:
        f = {"torch": lambda h: torch.roll(h, shifts), "torch_kw": lambda h: torch.roll(h, shifts=shifts),
             "method": lambda h: h.roll(shifts)}[form]
    else:
        f = {"torch": lambda h: torch.roll(h, shifts, dims),
             "torch_kw": lambda h: torch.roll(h, shifts=shifts, dims=dims),
             "method": lambda h: h.roll(shifts, dims)}[form]
    c.step_h(lambda m, h: f(h))
    return st


# ---- pooling and reductions ----------------------------------------------------------------------------------
POOLS = ["max", "avg", "avg_pad", "avg_nocount", "ceil", "adaptive_avg", "adaptive_max", "global"]


@gen("pool", CF, weight=2, families=("pool",), enum=("kind", "form"), by_layout=True)
def pool(c: Ctx, st: State) -> State:
    nd = len(st.sp)
    kind = c.pick("kind", POOLS)
    form = c.pick("form", ["nn", "F", "F_kw"])
    sfx = f"{nd}d"
    if kind in ("max", "avg", "ceil"):
        if min(st.sp) < 2:
            raise Skip("small")
        name, args, kw = ("max_pool" if kind != "avg" else "avg_pool"), (2,), {"kernel_size": 2, "stride": 2}
        if kind == "ceil":
            kw["ceil_mode"] = True
        new = tuple((s + 1) // 2 if kind == "ceil" else s // 2 for s in st.sp)
    elif kind in ("avg_pad", "avg_nocount"):
        name, args, kw, new = "avg_pool", (3, 1, 1), {"kernel_size": 3, "stride": 1, "padding": 1}, st.sp
        if kind == "avg_nocount":
            kw["count_include_pad"] = False
    else:
        o = 1 if kind == "global" else c.pick("size", [s for s in (1, 2) if s <= min(st.sp)])
        name = "adaptive_max_pool" if kind == "adaptive_max" else "adaptive_avg_pool"
        args, kw, new = (o,), {"output_size": o}, (o,) * nd
        if name == "adaptive_max_pool" and nd == 3:
            raise Skip("no rule either way")
    if form == "nn":
        cls = getattr(nn, {"max_pool": "MaxPool", "avg_pool": "AvgPool", "adaptive_avg_pool": "AdaptiveAvgPool",
                           "adaptive_max_pool": "AdaptiveMaxPool"}[name] + sfx)
        key = c.module(cls(**kw), "pool")
        c.step_h(lambda m, h: m.M[key](h))
    else:
        fn = getattr(F, name + sfx)
        c.step_h((lambda m, h: fn(h, *args)) if form == "F" and "ceil_mode" not in kw and "count_include_pad" not in kw
                 else (lambda m, h: fn(h, **kw)))
    return replace(st, sp=tuple(new))


@gen("reduce", ANY, weight=2, families=("reduce",), enum=("what", "op", "form"))
def reduce(c: Ctx, st: State) -> State:
    whats = (["global", "keepdim"] if st.sp else []) + ["center", "manual_rms"]
    what = c.pick("what", whats)
    op = c.pick("op", ["mean", "mean", "amax", "sum"] if what in ("global", "keepdim") else ["mean"])
    form = c.pick("form", ["method", "method_kw", "torch", "torch_kw"])
    fn = {"method": lambda h, d, k: getattr(h, op)(d, k), "method_kw": lambda h, d, k: getattr(h, op)(dim=d, keepdim=k),
          "torch": lambda h, d, k: getattr(torch, op)(h, d, k),
          "torch_kw": lambda h, d, k: getattr(torch, op)(h, dim=d, keepdim=k)}[form]
    if what in ("global", "keepdim"):
        axes = [c.pick("dims", [a, st.lit(a)], ) for a in st.sp_axes[:1]] + [a for a in st.sp_axes[1:]]
        d = axes[0] if len(axes) == 1 and c.pick("as_int", [True, False]) else tuple(axes)
        keep = what == "keepdim"
        c.step_h(lambda m, h: fn(h, d, keep))
        if keep:
            if not st.first:
                raise Skip("channels-last keepdim")
            return replace(st, sp=(1,) * len(st.sp))
        return State("vec", st.C, (), st.batched)
    d = _dim(c, st, st.ch)
    if what == "center":
        c.step_h(lambda m, h: h - fn(h, d, True))
    else:
        c.step_h(lambda m, h: h * torch.rsqrt(fn(h * h, d, True) + 1e-6))
    return st


# ---- expand / tokens ---------------------------------------------------------------------------------------
@gen("expand", ("vec", "seq"), weight=1, families=("expand", "cat", "size"), by_layout=True)
def expand(c: Ctx, st: State) -> State:
    b = st.batched
    if st.layout == "vec":
        T = c.pick("T", [2, 3])
        form = c.pick("form", ["neg", "literal"])
        sizes = ((-1,) if b else ()) + (T, -1 if form == "neg" else st.C)
        c.step_h(lambda m, h: h.unsqueeze(-2).expand(*sizes))
        return State("seq", st.C, (T,), b)
    form = c.pick("form", ["cls_token", "expand_as"])
    if form == "cls_token":
        tok = c.param(c.randn(1, 1, st.C) if b else c.randn(1, st.C), "cls")
        if b:
            c.step_h(lambda m, h: torch.cat([P(m, tok).expand(h.shape[0], -1, -1), h], dim=1))
        else:
            c.step_h(lambda m, h: torch.cat([P(m, tok), h], dim=0))
        return replace(st, sp=(st.sp[0] + 1,))
    pos = c.param(c.randn(st.C), "pos")
    c.step_h(lambda m, h: h + P(m, pos).expand_as(h))
    return st


@gen("size", ANY, weight=0.5, families=("size",), enum=("what",))
def size(c: Ctx, st: State) -> State:
    """Shape reads used as numbers: the channel count (freezes), the whole shape, numel."""
    what = c.pick("what", ["size_ch", "shape_ch", "view_size", "numel", "new_zeros"])
    ch = st.ch
    c.step_h({"size_ch": lambda m, h: h / h.size(ch), "shape_ch": lambda m, h: h * (1.0 / h.shape[ch]),
              "view_size": lambda m, h: h.view(h.size()), "numel": lambda m, h: h * (100.0 / h.numel()),
              "new_zeros": lambda m, h: h + h.new_zeros(h.shape)}[what])
    return st


# ---- pad / interpolate / normalize ---------------------------------------------------------------------
@gen("pad", ANY, weight=1, families=("pad",), enum=("what", "form"))
def pad(c: Ctx, st: State) -> State:
    """``F.pad`` on the last spatial axis (constant / reflect / replicate / circular, growing or cropping)
    or on the channel axis; functional positional / keyword and module forms."""
    whats = (["sp", "sp_crop"] if st.sp else []) + ["ch"]
    what = c.pick("what", whats)
    sp_last = st.sp_axes[-1] if st.sp else None
    ax = st.ch if what == "ch" else sp_last
    lo, hi = c.pick("amount", [(1, 1), (0, 2), (2, 0)]) if what != "sp_crop" else (-1, 0)
    mode = c.pick("mode", ["constant", "reflect", "replicate", "circular"]) if what == "sp" else "constant"
    value = c.pick("value", [None, 0.0, 0.5]) if mode == "constant" else None
    pads = (0, 0) * (-ax - 1) + (lo, hi)  # F.pad lists the last axis first
    forms = ["F", "F_kw"] + (["nn"] if mode != "circular" and what != "sp_crop" and value is not None else [])
    form = c.pick("form", forms)
    if form == "nn":
        n = -ax if not st.first or what == "ch" else len(st.sp)
        if n > 3:
            raise Skip("no such module")
        cls = {"constant": "ConstantPad", "reflect": "ReflectionPad", "replicate": "ReplicationPad"}[mode]
        mod = getattr(nn, f"{cls}{n}d")(pads + (0, 0) * (n - len(pads) // 2), *([value] if mode == "constant" else []))
        key = c.module(mod, "pad")
        c.step_h(lambda m, h: m.M[key](h))
    elif form == "F":
        c.step_h(lambda m, h: F.pad(h, pads, mode, value))
    else:
        kw = {"mode": mode} if mode != "constant" else ({"value": value} if value is not None else {})
        c.step_h(lambda m, h: F.pad(input=h, pad=pads, **kw))
    if what == "ch":
        return replace(st, C=st.C + lo + hi)
    sp = list(st.sp)
    sp[-1] += lo + hi
    if sp[-1] < 1:
        raise Skip("cropped away")
    return replace(st, sp=tuple(sp))


MODES = {1: ["nearest", "nearest-exact", "linear", "area"], 2: ["nearest", "nearest-exact", "bilinear", "bicubic",
                                                                 "area", "bilinear_aa"],
         3: ["nearest", "trilinear", "area"]}


@gen("interpolate", CF, weight=1, families=("interpolate",), enum=("mode", "form"), by_layout=True)
def interpolate(c: Ctx, st: State) -> State:
    if not st.batched:
        raise Skip("an unbatched input reads as a batched one of lower rank")
    nd = len(st.sp)
    mode = c.pick("mode", MODES[nd])
    form = c.pick("form", ["scale", "size", "scale_kw", "upsample", "nn"])
    align = c.pick("align", [None, True, False]) if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
    aa = mode.endswith("_aa")
    mode = mode.replace("_aa", "")
    size = tuple(s + 1 for s in st.sp)
    kw = {"mode": mode, **({"align_corners": align} if align is not None else {}),
          **({"antialias": True} if aa else {})}
    if form == "nn":
        if aa:
            raise Skip("nn.Upsample has no antialias")
        key = c.module(nn.Upsample(scale_factor=2, mode=mode, align_corners=align), "up")
        c.step_h(lambda m, h: m.M[key](h))
    elif form == "scale":
        c.step_h(lambda m, h: F.interpolate(h, None, 2, **kw))
    elif form == "size":
        c.step_h(lambda m, h: F.interpolate(h, size, **kw))
    elif form == "scale_kw":
        c.step_h(lambda m, h: F.interpolate(input=h, scale_factor=2.0, **kw))
    else:
        if aa:
            raise Skip("F.upsample has no antialias")
        c.step_h(lambda m, h: F.upsample(h, scale_factor=2, **kw))
    return replace(st, sp=size if form == "size" else tuple(2 * s for s in st.sp))


@gen("normalize", ANY, weight=1, families=("normalize",), enum=("along", "form"))
def normalize(c: Ctx, st: State) -> State:
    along = c.pick("along", ["ch", "sp"] if st.sp else ["ch"])
    d = _dim(c, st, st.ch if along == "ch" else st.sp_axes[0])
    p = c.pick("p", [2.0, 1.0])
    form = c.pick("form", ["F", "F_kw", "F_default"] if d in (1, -3 if st.first else 99) else ["F", "F_kw"])
    c.step_h({"F": lambda m, h: F.normalize(h, p, d), "F_kw": lambda m, h: F.normalize(input=h, p=p, dim=d, eps=1e-6),
              "F_default": lambda m, h: F.normalize(h)}[form])
    return st
