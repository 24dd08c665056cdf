"""Layout ops: flatten / view / reshape / squeeze / unsqueeze / unflatten, permutations, cat and split
(channel and spatial axes), slicing, select, index_select; each with literal and negative dims and
every call form torch offers.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from .core import CF, CL, PLANTS, Ctx, Skip, State, divisors, gen, param_of
from .gen_layers import dense, dense_form

P = param_of
ANY = CL + CF


def _dim(c: Ctx, st: State, neg: int, key: str = "dim") -> int:
    return c.pick(key, [neg, st.lit(neg)])


# ---- flatten / squeeze / unsqueeze / unflatten ----------------------------------------------------
@gen("flatten", CF + ("seq", "hw"), weight=1.5, families=("flatten", "view", "size", "shape_guard"))
def flatten(c: Ctx, st: State) -> State:
    n, b = st.C * math.prod(st.sp), st.batched
    if n > 96:
        raise Skip("too wide")
    B, s0 = c.b.case.B, int(b)
    start = _dim(c, st, s0 - st.rank, "start")
    form = c.pick("form", ["method", "method_kw", "torch", "torch_kw", "torch_kw2", "view_size", "view_shape",
                           "reshape_neg", "reshape_lit", "torch_reshape", "dim"] + (["nn"] if b else []))
    if form == "nn":
        key = c.module(nn.Flatten(), "flat")
        c.step_h(lambda m, h: m.M[key](h))
    else:
        c.step_h({
            "method": lambda m, h: h.flatten(start),
            "torch": lambda m, h: torch.flatten(h, start),
            "torch_kw": lambda m, h: torch.flatten(h, start_dim=start),
            "torch_kw2": lambda m, h: torch.flatten(h, start_dim=start, end_dim=-1),
            "method_kw": lambda m, h: h.flatten(start_dim=start),
            "view_size": lambda m, h: h.view(h.size(0), -1) if b else h.view(-1),
            "view_shape": lambda m, h: h.view(h.shape[0], -1) if b else h.view(n),
            "reshape_neg": lambda m, h: h.reshape(-1, n) if b else h.reshape(n),
            "reshape_lit": lambda m, h: h.reshape(B, n) if b else h.reshape(-1),
            "torch_reshape": lambda m, h: torch.reshape(h, (h.shape[0], -1) if b else (-1,)),
            "dim": lambda m, h: h.flatten(h.dim() - len(st.sp) - 1),
        }[form])
    return State("vec", n, (), b)


@gen("squeeze", CF, weight=1, families=("flatten", "slice"))
def squeeze(c: Ctx, st: State) -> State:
    if any(s != 1 for s in st.sp):
        raise Skip("spatial dims are not 1")
    axes = [st.lit(a) for a in st.sp_axes]
    form = c.pick("form", ["method_each", "torch_dims", "method_all", "getitem", "flatten"])
    lead = (slice(None),) * (st.lit(st.ch) + 1)
    c.step_h({
        "method_each": lambda m, h: _repeat(h, len(axes), lambda t: t.squeeze(-1)),
        "torch_dims": lambda m, h: torch.squeeze(h, tuple(axes)),
        "method_all": lambda m, h: h.squeeze(),
        "getitem": lambda m, h: h[lead + (0,) * len(axes)],
        "flatten": lambda m, h: h.flatten(st.lit(st.ch)),
    }[form])
    return State("vec", st.C, (), st.batched)


def _repeat(h, n, f):
    for _ in range(n):
        h = f(h)
    return h


@gen("unsqueeze", ("vec",), weight=1, families=("flatten", "view", "slice"), enum=("to", "form"))
def unsqueeze(c: Ctx, st: State) -> State:
    to = c.pick("to", ["sig", "img", "seq"])
    b, C = st.batched, st.C
    if to == "seq":
        form = c.pick("form", ["method", "torch", "none_idx"])
        d = c.pick("dim", [-2, int(b)])  # the new axis goes before the channels
        c.step_h({"method": lambda m, h: h.unsqueeze(d), "torch": lambda m, h: torch.unsqueeze(h, d),
                  "none_idx": lambda m, h: h[..., None, :]}[form])
        return State("seq", C, (1,), b)
    k = 1 if to == "sig" else 2
    form = c.pick("form", ["method", "torch", "none_idx", "reshape_lit", "view_neg"])
    c.step_h({
        "method": lambda m, h: _repeat(h, k, lambda t: t.unsqueeze(-1)),
        "torch": lambda m, h: _repeat(h, k, lambda t: torch.unsqueeze(t, t.dim())),
        "none_idx": lambda m, h: h[(slice(None),) * (1 + b) + (None,) * k],
        "reshape_lit": lambda m, h: h.reshape(((h.shape[0],) if b else ()) + (C,) + (1,) * k),
        "view_neg": lambda m, h: h.view(((h.size(0),) if b else ()) + (-1,) + (1,) * k),
    }[form])
    return State(to, C, (1,) * k, b)


@gen("unflatten", ("vec", "seq"), weight=1, families=("unflatten", "view"), by_layout=True)
def unflatten(c: Ctx, st: State) -> State:
    b = st.batched
    if st.layout == "vec":  # channels -> (C', k): a signal of C' channels and length k
        k = c.pick("k", [d for d in divisors(st.C) if 1 < d < st.C])
        a = st.C // k
        form = c.pick("form", ["method", "torch", "view", "neg"])
        d = _dim(c, st, -1)
        c.step_h({"method": lambda m, h: h.unflatten(d, (a, k)), "torch": lambda m, h: torch.unflatten(h, d, (a, k)),
                  "view": lambda m, h: h.view(((h.shape[0],) if b else ()) + (a, k)),
                  "neg": lambda m, h: h.unflatten(-1, (-1, k))}[form])
        return State("sig", a, (k,), b)
    T = st.sp[0]  # tokens -> an H x W map (channels last)
    hh = c.pick("h", [d for d in divisors(T) if 1 < d < T])
    form = c.pick("form", ["method", "view"])
    d = _dim(c, st, -2)
    c.step_h({"method": lambda m, h: h.unflatten(d, (hh, T // hh)),
              "view": lambda m, h: h.view(((h.shape[0],) if b else ()) + (hh, T // hh, h.shape[-1]))}[form])
    return State("hw", st.C, (hh, T // hh), b)


# ---- permutations ----------------------------------------------------------------------------------------
@gen("permute", ("seq", "sig", "hw", "img"), weight=1.5, families=("permute", "size"), by_layout=True)
def permute(c: Ctx, st: State) -> State:
    b, r = st.batched, st.rank
    to = {"seq": "sig", "sig": "seq", "hw": "img", "img": "hw"}[st.layout]
    perm = list(range(r))
    src = st.lit(st.ch)
    dst = r - 1 if st.first else int(b)
    perm.insert(dst, perm.pop(src))
    forms = ["permute", "permute_kw", "torch_permute", "movedim", "torch_movedim", "Permute"]
    if len(st.sp) == 1:
        forms += ["transpose", "transpose_lit", "torch_transpose", "torch_transpose_kw", "mT"] + (
            [] if b else ["t", "torch_t", "T"])
    form = c.pick("form", forms if b else [f for f in forms if f != "Permute"])
    if form == "Permute":
        from torchvision.ops.misc import Permute
        key = c.module(Permute(perm), "perm")
        c.step_h(lambda m, h: m.M[key](h))
    else:
        c.step_h({
            "permute": lambda m, h: h.permute(*perm),
            "permute_kw": lambda m, h: h.permute(dims=perm),
            "torch_permute": lambda m, h: torch.permute(h, perm),
            "movedim": lambda m, h: h.movedim(src, dst),
            "torch_movedim": lambda m, h: torch.movedim(h, src - r, dst - r),
            "transpose": lambda m, h: h.transpose(-1, -2),
            "transpose_lit": lambda m, h: h.transpose(r - 2, r - 1),
            "torch_transpose": lambda m, h: torch.transpose(h, -2, -1),
            "torch_transpose_kw": lambda m, h: torch.transpose(input=h, dim0=r - 1, dim1=-2),
            "mT": lambda m, h: h.mT, "t": lambda m, h: h.t(), "torch_t": lambda m, h: torch.t(h),
            "T": lambda m, h: h.T,
        }[form])
    sp = tuple(st.sp)
    return State(to, st.C, sp, b)


# ---- cat and split -----------------------------------------------------------------------------------------
CATS = {"cat": lambda ts, d: torch.cat(ts, d), "cat_kw": lambda ts, d: torch.cat(tensors=ts, dim=d),
        "concat": lambda ts, d: torch.concat(ts, dim=d), "cat_tuple": lambda ts, d: torch.cat(tuple(ts), d)}


@gen("cat", ANY, weight=2, families=("cat",), enum=("what", "form"))
def cat(c: Ctx, st: State) -> State:
    what = c.pick("what", ["branches", "dense", "spatial"] if st.sp else ["branches", "dense"])
    form = c.pick("form", list(CATS))
    f = CATS[form]
    if what == "spatial":
        ax = c.pick("axis", list(range(len(st.sp))))
        d = _dim(c, st, st.sp_axes[ax])
        g = dense(c, st, st.C, dense_form(c, st), c.pick("plant", PLANTS))
        c.step_h(lambda m, h: f([h, g(m, h)], d))
        return replace(st, sp=tuple(s * 2 if i == ax else s for i, s in enumerate(st.sp)))
    d = _dim(c, st, st.ch)
    a = c.pick("a", range(1, 7))
    f1 = dense(c, st, a, dense_form(c, st, "branch1"), c.pick("plant1", PLANTS))
    if what == "dense":
        c.step_h(lambda m, h: f([h, f1(m, h)], d))
        return replace(st, C=st.C + a)
    k = c.pick("b", range(1, 7))
    f2 = dense(c, st, k, dense_form(c, st, "branch2"), c.pick("plant2", PLANTS))
    c.step_h(lambda m, h: f([f1(m, h), f2(m, h)], d))
    return replace(st, C=a + k)


SPLITS = {
    "torch_list": lambda h, s, d, n: torch.split(h, s, d), "torch_kw": lambda h, s, d, n: torch.split(
        h, split_size_or_sections=s, dim=d),
    "method": lambda h, s, d, n: h.split(s, d), "method_kw": lambda h, s, d, n: h.split(s, dim=d),
    "with_sizes": lambda h, s, d, n: h.split_with_sizes(s, d), "chunk": lambda h, s, d, n: torch.chunk(h, n, d),
    "method_chunk": lambda h, s, d, n: h.chunk(n, dim=d),
    "tensor_split": lambda h, s, d, n: torch.tensor_split(h, [s[0]], d),
    "method_tensor_split": lambda h, s, d, n: h.tensor_split(n, d),
    "torch_int": lambda h, s, d, n: torch.split(h, s[0], d),
}


@gen("split", ANY, weight=2, families=("split", "slice", "cat", "binary"),
     enum=("along", "form", "then"))
def split(c: Ctx, st: State) -> State:
    along = c.pick("along", ["ch", "ch", "sp"] if st.sp else ["ch"])
    ax = st.ch if along == "ch" else st.sp_axes[c.pick("axis", list(range(len(st.sp))))]
    size = st.C if along == "ch" else st.sp[st.sp_axes.index(ax)]
    if size < 2:
        raise Skip("too narrow")
    form = c.pick("form", list(SPLITS))
    c1 = c.pick("c1", range(1, size))
    d = _dim(c, st, ax)
    sizes, n = [c1, size - c1], 2
    if form in ("chunk", "method_chunk", "method_tensor_split"):
        sizes = [len(p) for p in (torch.chunk if "chunk" in form else torch.tensor_split)(torch.empty(size), 2)]
    elif form == "torch_int":
        sizes = [len(p) for p in torch.split(torch.empty(size), c1)]
    if len(sizes) < 2:
        raise Skip("one piece")
    fs = SPLITS[form]
    s = [c1, size - c1]
    thens = ["cat_back", "first", "reverse_cat", "cat_swapped"] + (["glu", "sum"] if sizes[0] == sizes[1] else [])
    then = c.pick("then", thens if along == "ch" else ["cat_back", "first", "reverse_cat"])
    k = len(sizes)
    if then == "cat_back":
        st0 = replace(st, C=sizes[0]) if along == "ch" else st
        g = dense(c, st0, sizes[0], dense_form(c, st0), c.pick("plant", PLANTS)) if along == "ch" else \
            (lambda m, t: torch.tanh(t))

        def cat_back(m, h):
            parts = fs(h, s, d, n)
            return torch.cat([g(m, parts[0])] + [parts[i] for i in range(1, k)], d)
        c.step_h(cat_back)
        return st
    if then == "first":
        c.step_h(lambda m, h: fs(h, s, d, n)[0])
        if along == "ch":
            return replace(st, C=sizes[0])
        i = st.sp_axes.index(ax)
        return replace(st, sp=tuple(sizes[0] if j == i else v for j, v in enumerate(st.sp)))
    if then == "reverse_cat":  # a slice of the tuple: cat reads a node, not a list
        c.step_h(lambda m, h: torch.cat(fs(h, s, d, n)[::-1], d))
    elif then == "cat_swapped":
        def swapped(m, h):
            parts = fs(h, s, d, n)
            return torch.cat([parts[i] for i in range(1, k)] + [parts[0]], d)
        c.step_h(swapped)
    elif then == "glu":
        def glu(m, h):
            a, g_ = fs(h, s, d, n)  # tuple unpacking (fx reads the UNPACK_SEQUENCE)
            return a * torch.sigmoid(g_)
        c.step_h(glu)
        return replace(st, C=sizes[0])
    else:
        def add(m, h):
            a, g_ = fs(h, s, d, n)
            return a + g_
        c.step_h(add)
        return replace(st, C=sizes[0])
    return st


# ---- slicing, select, index_select ---------------------------------------------------------------------
@gen("slice", ANY, weight=2, families=("slice", "select"), enum=("what", "form"))
def slice_(c: Ctx, st: State) -> State:
    whats = ["ch_range", "ch_step", "ch_neg"] + (["ellipsis"] if not st.first else []) + (
        ["sp_crop", "sp_drop"] if st.sp else [])
    what = c.pick("what", whats)
    C, lead = st.C, (slice(None),) * st.lit(st.ch)
    if what.startswith("ch") or what == "ellipsis":
        if what == "ch_step":
            sl = c.pick("step", [slice(None, None, 2), slice(1, None, 2)])
        elif what == "ch_neg":
            sl = slice(-c.pick("k", range(1, C + 1)), None)
        else:
            a = c.pick("start", range(0, C))
            sl = slice(a, c.pick("stop", range(a + 1, C + 1)))
        n = len(range(C)[sl])
        if n < 1:
            raise Skip("empty")
        idx = (Ellipsis, sl) if what == "ellipsis" else lead + (sl,)
        c.step_h(lambda m, h: h[idx])
        return replace(st, C=n)
    i = c.pick("axis", list(range(len(st.sp))))
    ax = st.lit(st.sp_axes[i])
    if what == "sp_crop":
        if st.sp[i] < 3:
            raise Skip("small")
        sl = c.pick("crop", [slice(1, -1), slice(1, None), slice(None, -1)])
        c.step_h(lambda m, h: h[(slice(None),) * ax + (sl,)])
        return replace(st, sp=tuple(len(range(v)[sl]) if j == i else v for j, v in enumerate(st.sp)))
    k = c.pick("index", [0, -1])  # drop a spatial axis: x[:, 0] (cls token), select, torch.select
    form = c.pick("form", ["getitem", "method", "torch"])
    c.step_h({"getitem": lambda m, h: h[(slice(None),) * ax + (k,)], "method": lambda m, h: h.select(ax, k),
              "torch": lambda m, h: torch.select(h, ax - st.rank, k)}[form])
    sp = tuple(v for j, v in enumerate(st.sp) if j != i)
    layout = {("seq", 0): "vec", ("hw", 1): "seq", ("sig", 0): "vec", ("img", 1): "sig", ("vol", 2): "img"}
    return State(layout[(st.layout, len(sp))], C, sp, st.batched)


@gen("index_select", ANY, weight=1, families=("index_select",), enum=("along", "form"))
def index_select(c: Ctx, st: State) -> State:
    along = c.pick("along", ["ch", "ch", "sp"] if st.sp else ["ch"])
    ax = st.ch if along == "ch" else st.sp_axes[0]
    n = st.C if along == "ch" else st.sp[0]
    k = c.pick("k", range(1, n + 2))
    order = c.pick("order", ["sorted", "shuffled", "repeats"])
    idx = c.prng.choice(n, size=k, replace=order == "repeats" or k > n).tolist()
    idx = sorted(idx) if order == "sorted" else idx
    form = c.pick("form", ["torch", "method", "kw", "inline"])
    d = _dim(c, st, ax)
    t = c.buffer(torch.tensor(idx, dtype=torch.long), "idx")
    c.step_h({"torch": lambda m, h: torch.index_select(h, d, P(m, t)),
              "method": lambda m, h: h.index_select(d, P(m, t)),
              "kw": lambda m, h: torch.index_select(h, dim=d, index=P(m, t)),
              "inline": lambda m, h: h.index_select(d, torch.tensor(idx))}[form])
    if along == "ch":
        return replace(st, C=k)
    return replace(st, sp=(k,) + tuple(st.sp[1:]))


@gen("gather", ANY, weight=1, families=("slice", "index"), enum=("form",))
def gather(c: Ctx, st: State) -> State:
    """Advanced indexing of a spatial/sequence axis with an index tensor (``x[:, ids]``; ``aten.index`` after
    export): whole channel vectors are gathered, so channels pass with their values."""
    if not st.sp:
        raise Skip("no spatial axis")
    i = c.pick("axis", list(range(len(st.sp))))
    n = st.sp[i]
    k = c.pick("k", range(1, n + 2))
    idx = c.prng.choice(n, size=k, replace=k > n).tolist()
    form = c.pick("form", ["getitem", "negative", "inline"])
    if form == "negative":
        idx = [v - n for v in idx]
    ax = st.lit(st.sp_axes[i])
    t = c.buffer(torch.tensor(idx, dtype=torch.long), "gidx")
    if form == "inline":
        c.step_h(lambda m, h: h[(slice(None),) * ax + (torch.tensor(idx),)])
    else:
        c.step_h(lambda m, h: h[(slice(None),) * ax + (P(m, t),)])
    return replace(st, sp=tuple(k if j == i else v for j, v in enumerate(st.sp)))


# ---- a branch on a size ------------------------------------------------------------------------------
@gen("size_branch", ANY, weight=0.3, families=())
def size_branch(c: Ctx, st: State) -> State:
    """Python control flow on a size (``if h.shape[0] > 1``): symbolic_trace cannot follow it, so an fx case
    goes through torch.export, whose ``Dim.AUTO`` assumes the size is at least 2 and keeps one branch. The
    fuzzer's other batch size is sometimes 1: the result must answer it as the model does, or refuse it."""
    form = c.pick("form", ["center_if_many", "double_if_one"])
    if form == "center_if_many":
        c.step_h(lambda m, h: h - h.mean(0, keepdim=True) if h.shape[0] > 1 else h)
    else:
        c.step_h(lambda m, h: h * 2 if h.shape[0] == 1 else h)
    return st
