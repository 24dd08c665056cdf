"""Weighted layers with planted structure: linear / addmm / matmul, conv (grouped, depthwise, padded,
padding modes), embeddings, and weights shared between ops.

Every layer draws its argument form (module / functional positional / functional keyword / ...) and a
planting mode (``core.PLANTS``): dead output rows with a zero or a non-zero bias (zero or constant
channels), unused input columns, unstructured zeros; module forms may hold the zeros in a pruning mask
or a parametrization instead, or sit behind weight / spectral normalization.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .core import CF, CL, PLANTS, Ctx, Skip, State, divisors, fan_in_scale, gen, param_of, plant

P = param_of


# ---- linear ------------------------------------------------------------------------------------------
LINEAR_FORMS = ("nn", "nn_kw", "F", "F_kw", "F_bias_kw", "F_nobias", "F_wt", "addmm", "addmm_kw", "addmm_allkw",
                "addmm_beta", "matmul", "matmul_t", "einsum")


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
    if form in ("nn", "nn_kw"):
        mod = nn.Linear(st.C, out, bias=b is not None)
        with torch.no_grad():
            mod.weight.copy_(W)
            if b is not None:
                mod.bias.copy_(b)
        key = c.module(mask_weight(c, mod, W), "lin", tie=("linear", st.C, out))
        return (lambda m, h: m.M[key](h)) if form == "nn" else (lambda m, h: m.M[key](input=h))
    if form == "F_wt":  # the weight computed in forward (a transposed stored tensor)
        wt, bb = c.param(W.t().contiguous(), "wt"), c.param(b, "b")
        return lambda m, h: F.linear(h, P(m, wt).t(), P(m, bb))
    if form == "matmul_t":
        w, bb = c.param(W), c.param(b if b is not None else torch.zeros(out), "b")
        return lambda m, h: torch.matmul(h, P(m, w).t()) + P(m, bb)
    if form.startswith("addmm") or form == "matmul":
        wt, bb = c.param(W.t().contiguous(), "wt"), c.param(b if b is not None else torch.zeros(out), "b")
        if form == "addmm":
            return lambda m, h: torch.addmm(P(m, bb), h, P(m, wt))
        if form == "addmm_kw":
            return lambda m, h: torch.addmm(P(m, bb), h, P(m, wt), beta=1, alpha=1)
        if form == "addmm_allkw":  # ``input`` is the bias here
            return lambda m, h: torch.addmm(input=P(m, bb), mat1=h, mat2=P(m, wt))
        if form == "addmm_beta":
            return lambda m, h: torch.addmm(P(m, bb), h, P(m, wt), beta=0.5, alpha=2.0)
        return lambda m, h: h @ P(m, wt) + P(m, bb)
    w, bb = c.param(W, tie=True), c.param(b, "b")
    if form == "F":
        return lambda m, h: F.linear(h, P(m, w), P(m, bb))
    if form == "F_kw":
        return lambda m, h: F.linear(input=h, weight=P(m, w), bias=P(m, bb))
    if form == "F_bias_kw":
        return lambda m, h: F.linear(h, P(m, w), bias=P(m, bb))
    if form == "einsum":
        return lambda m, h: torch.einsum("...i,oi->...o", h, P(m, w)) + (0.0 if bb is None else P(m, bb))
    return lambda m, h: F.linear(h, P(m, w))  # F_nobias


@gen("linear", CL, weight=6, families=("linear", "addmm", "matmul"))
def linear(c: Ctx, st: State) -> State:
    rank2 = (st.layout == "vec" and st.batched) or (st.layout == "seq" and not st.batched)
    form = c.pick("form", [f for f in LINEAR_FORMS if rank2 or not f.startswith("addmm")],
                  weights=[3 if f in ("nn", "F", "F_kw") else 1 for f in LINEAR_FORMS
                           if rank2 or not f.startswith("addmm")])
    out = c.pick("out", range(1, 9))
    bias = c.pick("bias", [True, True, False]) if form in ("nn", "F", "F_kw", "F_bias_kw", "einsum") else \
        form != "F_nobias"
    c.step_h(dense(c, st, out, form, c.pick("plant", PLANTS), bias))
    return replace(st, C=out)


class _Mask(nn.Module):
    """A ``parametrize`` mask: weight = original * mask."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def mask_weight(c: Ctx, mod: nn.Module, W: torch.Tensor) -> nn.Module:
    """The planted zeros of ``W`` as a pruning mask instead of stored zeros (torch.nn.utils.prune, a
    parametrization), the weight behind weight / spectral normalization, or a forward hook."""
    from torch.nn.utils import parametrize, prune

    dead_row = bool((W.flatten(1) == 0).all(1).any())
    how = c.pick("mask", [None, None, None, "prune", "parametrize", "spectral_norm", "hook"]
                 + ([] if dead_row else ["weight_norm", "weight_norm_param"]))
    keep = W != 0
    if how in ("prune", "parametrize"):
        with torch.no_grad():  # the stored weight is dense: the zeros come from the mask only
            mod.weight.copy_(torch.where(keep, W, c.randn(*W.shape)))
        if how == "prune":
            prune.custom_from_mask(mod, "weight", keep)
        else:
            parametrize.register_parametrization(mod, "weight", _Mask(keep.to(W.dtype)))
    elif how == "spectral_norm":
        torch.nn.utils.spectral_norm(mod)
    elif how == "weight_norm":
        torch.nn.utils.weight_norm(mod)
    elif how == "weight_norm_param":
        torch.nn.utils.parametrizations.weight_norm(mod)
    elif how == "hook":  # not a mask: a forward hook, so the module stays a module (frozen) in minimize
        mod.register_forward_hook(_affine_hook)
    return mod


def _affine_hook(_mod: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
    return out * 2 + 1


# ---- convolution ---------------------------------------------------------------------------------------
def _conv_out(n: int, k: int, s: int, p, d: int) -> int:
    if p == "same":
        return n
    p = 0 if p == "valid" else p
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@gen("conv", CF, weight=6, families=("conv",), by_layout=True)
def conv(c: Ctx, st: State) -> State:
    nd = len(st.sp)
    form = c.pick("form", ["nn", "nn", "nn_pm", "nn_kw", "F", "F", "F_kw", "F_min"])
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
        same = new_sp == tuple(st.sp)
        key = c.module(mask_weight(c, mod, W), "conv", tie=(f"conv{nd}d", st.C, out) if same else None)
        c.step_h((lambda m, h: m.M[key](input=h)) if form == "nn_kw" else (lambda m, h: m.M[key](h)))
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


# ---- embeddings ------------------------------------------------------------------------------------------
@gen("embedding", ("tok",), weight=1, families=("embedding",))
def embedding(c: Ctx, st: State) -> State:
    form = c.pick("form", ["nn", "nn_pad", "F", "F_kw", "F_pad_kw"])
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
        c.ties.append(("modweight", key, E, st.C))
        c.step_h(lambda m, h: m.M[key](h))
    else:
        w = c.param(W)
        c.ties.append(("param", w, E, st.C))  # the table [V, E] is a Linear weight [out=V, in=E] (lm head)
        if form == "F":
            c.step_h(lambda m, h: F.embedding(h, P(m, w)))
        elif form == "F_pad_kw":
            c.step_h(lambda m, h: F.embedding(h, P(m, w), padding_idx=0))
        else:
            c.step_h(lambda m, h: F.embedding(input=h, weight=P(m, w)))
    return State("seq", E, tuple(st.sp), st.batched)


# ---- shared weights ----------------------------------------------------------------------------------------
@gen("tie", CL + CF, weight=1.5, families=("linear", "conv", "embedding"))
def tie(c: Ctx, st: State) -> State:
    """A weight read again: a Linear / conv module called a second time (ALBERT-style), a Linear weight
    shared by two ``F.linear`` calls or read transposed (tied autoencoder), an embedding table as the
    output layer (GPT-2's lm head)."""
    kinds = ("linear", "param", "modweight") if not st.first else (f"conv{len(st.sp)}d",)
    weights = ("param", "modweight")
    cands = [t for t in c.b.ties if t[0] in kinds and (t[2] == st.C or (t[0] in weights and t[3] == st.C))]
    kind, name, n_in, n_out = cands[-c.pick("back", list(range(1, len(cands) + 1)))]
    if kind in weights:  # a weight [out, in]: read as is, or transposed
        forms = (["F", "matmul"] if n_in == st.C else []) + (["F_t"] if n_out == st.C else [])
    else:  # a module: called again
        forms = ["module"]
    form = c.pick("form", forms)
    W = (lambda m: P(m, name)) if kind == "param" else (lambda m: m.M[name].weight)
    if form == "module":
        c.step_h(lambda m, h: m.M[name](h))
        return replace(st, C=n_out)
    if form == "F":
        c.step_h(lambda m, h: F.linear(h, W(m)))
        return replace(st, C=n_out)
    if form == "matmul":
        c.step_h(lambda m, h: h @ W(m).t())
        return replace(st, C=n_out)
    c.step_h(lambda m, h: F.linear(h, W(m).t()))
    return replace(st, C=n_in)


# ---- mixture-of-experts linears ------------------------------------------------------------------------------
@gen("experts", ("vec",), weight=1, families=("expert_linear", "repeat_interleave"))
def experts(c: Ctx, st: State) -> State:
    """Rows through their own expert's matrix, as transformers' ``batched_mm`` experts: every row repeated
    ``k`` times (one per chosen expert), an expert id per row, ``bmm(W[ids], x.unsqueeze(-1)).squeeze(-1)``
    or ``sqr_fx.moe.expert_linear``, then the ``k`` copies summed back. Planted: units dead in every expert
    (zero rows in all of them, removable) and in one expert only (kept)."""
    from .. import moe  # called as moe.expert_linear: torch.fx.wrap patches the name in sqr_fx.moe

    if not st.batched:
        raise Skip("unbatched")
    E, k, out = c.pick("experts", [2, 3]), c.pick("k", [1, 2]), c.pick("out", range(2, 9))
    W = c.randn(E, out, st.C, scale=fan_in_scale(st.C))
    with torch.no_grad():
        W[:, c.subset(out)] = 0.0  # dead in every expert
        W[0, c.subset(out)] = 0.0  # dead in expert 0 only
        if c.pick("cols", [False, True]):
            W[:, :, c.subset(st.C)] = 0.0  # inputs no expert reads
    wn = c.param(W)
    form = c.pick("form", ["bmm", "call"])
    rep = c.pick("rep", ["method", "torch"])

    def step(m, h):
        x = h.repeat_interleave(k, dim=0) if rep == "method" else torch.repeat_interleave(h, k, 0)
        ids = torch.arange(x.shape[0], device=x.device) % E
        w = P(m, wn)
        y = torch.bmm(w[ids], x.unsqueeze(-1)).squeeze(-1) if form == "bmm" else moe.expert_linear(x, w, ids)
        return y.view(h.shape[0], k, out).sum(1)

    c.step_h(step)
    return replace(st, C=out)
