"""Attention: ``nn.MultiheadAttention`` (every call form), q/k/v projections with head split into
``scaled_dot_product_attention`` or into matmul / softmax / matmul (masks, fills, bmm), torchvision's
shifted-window attention (V1, V2, functional) and patch merging, rotary attention with grouped kv heads;
with planted dead head dims, dead heads, rotation pairs, kv groups, unused inputs and constant outputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import attention as sqr_attention  # (module attribute: fx.wrap patches it while tracing)
from .core import Ctx, Skip, State, divisors, fan_in_scale, gen, param_of

P = param_of
ATT_PLANTS = ("none", "q_rows", "k_rows", "v_rows", "o_cols", "head", "in_cols", "o_rows")


@torch.no_grad()
def plant_attention(c: Ctx, Wq, bq, Wk, Wv, Wo, bo, H: int, mode: str) -> None:
    """Zero structure into q/k/v/out projections (rows are ``H`` heads of ``E // H`` dims)."""
    E = Wq.shape[0]
    D = E // H
    if mode == "q_rows":
        rows = c.subset(E)
        Wq[rows], bq[rows] = 0.0, 0.0
    elif mode == "k_rows":
        Wk[c.subset(E)] = 0.0
    elif mode == "v_rows":
        Wv[c.subset(E)] = 0.0
    elif mode == "o_cols":
        Wo[:, c.subset(E)] = 0.0
    elif mode == "head":
        h = int(c.prng.integers(H))
        Wv[h * D:(h + 1) * D] = 0.0
        Wo[:, h * D:(h + 1) * D] = 0.0
    elif mode == "in_cols":
        cols = c.subset(Wq.shape[1])
        for W in (Wq, Wk, Wv):
            W[:, cols] = 0.0
    elif mode == "o_rows":
        rows = c.subset(Wo.shape[0])
        Wo[rows] = 0.0
        if bo is not None:
            bo[rows] = torch.as_tensor(1.0 + c.prng.random(len(rows)), dtype=bo.dtype)


def _qkvo(c: Ctx, E: int, H: int):
    W = [c.randn(E, E, scale=fan_in_scale(E)) for _ in range(4)]
    b = [c.randn(E, scale=0.3) for _ in range(4)]
    plant_attention(c, W[0], b[0], W[1], W[2], W[3], b[3], H, c.pick("plant", ATT_PLANTS))
    return W, b


def _heads(c: Ctx, E: int) -> int:
    return c.pick("heads", [d for d in divisors(E) if d <= 4])


@gen("mha", ("seq",), weight=1.5, families=("attention",))
def mha(c: Ctx, st: State) -> State:
    E = st.C
    H = _heads(c, E)
    forms = ["pos3", "kw", "noweights", "unpack", "weights_used", "seq_first", "nobias", "mask"]
    form = c.pick("form", forms)
    (Wq, Wk, Wv, Wo), (bq, bk, bv, bo) = _qkvo(c, E, H)
    mod = nn.MultiheadAttention(E, H, bias=form != "nobias", batch_first=form != "seq_first")
    with torch.no_grad():
        mod.in_proj_weight.copy_(torch.cat([Wq, Wk, Wv]))
        mod.out_proj.weight.copy_(Wo)
        if form != "nobias":
            mod.in_proj_bias.copy_(torch.cat([bq, bk, bv]))
            mod.out_proj.bias.copy_(bo)
    key = c.module(mod, "mha")
    if form == "mask":
        T = st.sp[0]
        mask = c.buffer(torch.ones(T, T, dtype=torch.bool).triu(1), "mask")
    if form == "weights_used" and not st.batched:
        raise Skip("weights shape")

    def fn(m, h):
        a = m.M[key]
        if form in ("pos3", "nobias", "seq_first"):
            return a(h, h, h)[0]
        if form == "kw":
            return a(query=h, key=h, value=h)[0]
        if form == "noweights":
            return a(h, h, h, need_weights=False)[0]
        if form == "unpack":
            out, _ = a(h, h, h)
            return out
        if form == "mask":
            return a(h, h, h, attn_mask=P(m, mask))[0]
        out, w = a(h, h, h)  # weights_used: rows of the attention weights sum to 1
        return out * w.sum(-1, keepdim=True)
    c.step_h(fn)
    return st


CORES = ["sdpa", "sdpa_kw", "sdpa_scale", "sdpa_causal", "sdpa_mask", "manual", "manual_mask", "manual_fill",
         "manual_dropout", "manual_bmm"]


@gen("attention", ("seq",), weight=2, families=("sdpa", "matmul", "softmax", "view", "unflatten", "permute"),
     enum=("core", "softmax", "matmul", "pads"))
def attention(c: Ctx, st: State) -> State:
    E, T, b = st.C, st.sp[0], st.batched
    H = _heads(c, E)
    D = E // H
    core = c.pick("core", CORES if not b else CORES[:-1])
    proj = c.pick("proj", ["separate", "fused_chunk", "fused_split"])
    split = c.pick("split", ["view", "unflatten"] if b else ["unflatten"])
    merge = c.pick("merge", ["reshape", "flatten"])
    sm = c.pick("softmax", ["F", "torch", "method"]) if core.startswith("manual") and core != "manual_bmm" else None
    mm = c.pick("matmul", ["op", "torch", "method"]) if core.startswith("manual") else None
    (Wq, Wk, Wv, Wo), (bq, bk, bv, bo) = _qkvo(c, E, H)
    if proj == "separate":
        names = [(c.param(W), c.param(bb, "b")) for W, bb in ((Wq, bq), (Wk, bk), (Wv, bv))]
    else:
        wqkv, bqkv = c.param(torch.cat([Wq, Wk, Wv]), "wqkv"), c.param(torch.cat([bq, bk, bv]), "bqkv")
    wo, bo_ = c.param(Wo, "wo"), c.param(bo, "bo")
    mask = c.buffer(torch.randn(T, T, generator=c.g, dtype=torch.float64) * 0.5, "mask") if core in (
        "sdpa_mask", "manual_mask") else None
    fill = c.buffer(torch.ones(T, T, dtype=torch.bool).triu(1), "fill") if core == "manual_fill" else None
    scale = 0.3 if core == "sdpa_scale" else 1.0 / math.sqrt(D)
    # sqr_fx's own padded form (what align=N emits), keywords or positions
    pads = c.pick("pads", [None, (0, 0, "kw"), (1, 1, "kw"), (2, 0, "pos"), (0, 3, "kw"), (1, 2, "pos"), (2, 2, "written"),
                           (1, 3, "written_int"), (0, 2, "written")]) if core == "sdpa_scale" else None
    matmul = {"op": lambda x, y: x @ y, "torch": torch.matmul, "method": lambda x, y: x.matmul(y)}.get(mm)
    softmax = {"F": lambda s: F.softmax(s, dim=-1), "torch": lambda s: torch.softmax(s, -1),
               "method": lambda s: s.softmax(-1)}.get(sm)

    def heads(t):
        if split == "view":
            return t.view(t.shape[0], t.shape[1], H, D).transpose(1, 2)
        return t.unflatten(-1, (H, D)).transpose(-3, -2)

    def fn(m, h):
        if proj == "separate":
            q, k, v = (F.linear(h, P(m, w), P(m, bb)) for w, bb in names)
        else:
            qkv = F.linear(h, P(m, wqkv), P(m, bqkv))
            q, k, v = qkv.chunk(3, dim=-1) if proj == "fused_chunk" else qkv.split(E, -1)
        q, k, v = heads(q), heads(k), heads(v)
        if core == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif core == "sdpa_kw":
            o = F.scaled_dot_product_attention(query=q, key=k, value=v)
        elif core == "sdpa_scale" and pads is None:
            o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        elif core == "sdpa_scale" and pads[2].startswith("written"):  # the padding written out (portable results)
            pq, pv = pads[0], pads[1]
            qq, kk = (F.pad(q, (0, pq)), F.pad(k, (0, pq))) if pq else (q, k)
            o = F.scaled_dot_product_attention(qq, kk, F.pad(v, (0, pv)), scale=scale)
            o = o.narrow(-1, 0, D) if pads[2] == "written_int" else o.narrow(-1, 0, o.shape[-1] - pv)
        elif core == "sdpa_scale" and pads[2] == "kw":
            o = sqr_attention.padded_sdpa(q, k, v, scale=scale, qk_pad=pads[0], v_pad=pads[1])
        elif core == "sdpa_scale":
            o = sqr_attention.padded_sdpa(q, k, v, None, 0.0, False, scale, False, pads[0], pads[1])
        elif core == "sdpa_causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif core == "sdpa_mask":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=P(m, mask))
        elif core == "manual_bmm":
            o = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * scale, -1), v) if mm != "method" else \
                (q.bmm(k.transpose(1, 2)) * scale).softmax(-1).bmm(v)
        else:
            s = matmul(q, k.transpose(-2, -1)) * scale
            if core == "manual_mask":
                s = s + P(m, mask)
            elif core == "manual_fill":
                s = s.masked_fill(P(m, fill), float("-inf"))
            p = softmax(s)
            if core == "manual_dropout":
                p = F.dropout(p, 0.1, False)
            o = matmul(p, v)
        o = o.transpose(-3, -2)
        o = o.reshape(o.shape[:-2] + (E,)) if merge == "reshape" else o.flatten(-2)
        return F.linear(o, P(m, wo), P(m, bo_))
    c.step_h(fn)
    return st


@gen("fused_qkv", ("seq",), weight=1.5, families=("unbind", "select", "slice", "permute", "view", "sdpa", "matmul"),
     enum=("form",))
def fused_qkv(c: Ctx, st: State) -> State:
    """timm's fused qkv: ``qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)``, then ``unbind(0)`` (method or
    torch) or ``qkv[0], qkv[1], qkv[2]`` (``select`` after export); sdpa or matmul/softmax; heads merged back
    with the width read off the input's shape (``B, T, C = x.shape``). Unbatched inputs get a batch axis.
    Also GPT-NeoX's per-head layout: ``view(B, T, H, 3D).transpose(1, 2)`` then ``chunk(3, -1)`` / ``split(D, -1)``."""
    E = st.C
    H = _heads(c, E)
    D = E // H
    form = c.pick("form", ["unbind", "torch_unbind", "index", "neox_chunk", "neox_split"])
    core = c.pick("core", ["sdpa", "manual"])
    (Wq, Wk, Wv, Wo), (bq, bk, bv, bo) = _qkvo(c, E, H)
    if form.startswith("neox"):  # rows regrouped per head: (H, 3, D)
        def per_head(ts):
            return torch.stack([t.reshape(H, D, *t.shape[1:]) for t in ts], 1).reshape(3 * E, *ts[0].shape[1:])

        wqkv_h, bqkv_h = c.param(per_head([Wq, Wk, Wv]), "wqkv"), c.param(per_head([bq, bk, bv]), "bqkv")
    else:
        wqkv, bqkv = c.param(torch.cat([Wq, Wk, Wv]), "wqkv"), c.param(torch.cat([bq, bk, bv]), "bqkv")
    wo, bo_ = c.param(Wo, "wo"), c.param(bo, "bo")
    b = st.batched

    def fn(m, h):
        x = h if b else h.unsqueeze(0)
        B, T, C = x.shape
        if form.startswith("neox"):  # GPT-NeoX: per head q | k | v, [B, H, T, 3D]
            qkv = F.linear(x, P(m, wqkv_h), P(m, bqkv_h)).view(B, T, H, 3 * D).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=-1) if form == "neox_chunk" else qkv.split(D, -1)
        else:
            qkv = F.linear(x, P(m, wqkv), P(m, bqkv)).reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        if form.startswith("neox"):
            pass
        elif form == "unbind":
            q, k, v = qkv.unbind(0)
        elif form == "torch_unbind":
            q, k, v = torch.unbind(qkv, 0)
        else:
            q, k, v = qkv[0], qkv[1], qkv[2]
        if core == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = (q * D ** -0.5 @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        o = F.linear(o.transpose(1, 2).reshape(B, T, C), P(m, wo), P(m, bo_))
        return o if b else o.squeeze(0)
    c.step_h(fn)
    return st


# ---- rotary attention with grouped kv heads --------------------------------------------------------------------
ROPE_PLANTS = ("none", "q_pair", "k_pair", "k_const_pair", "half_pair", "k_pair_per_head", "group", "q_head")


@torch.no_grad()
def _plant_rope(c: Ctx, Wq, bq, Wk, bk, Wv, Wo, H: int, KV: int, D: int, pairs: list, mode: str) -> None:
    """Rotation pairs (``pairs``: the two dims of each) zero in q or k (or only one of the two dims, or
    constant non-zero in k: both must stay), a dead kv group, a dead q head of a live group."""
    r = H // KV
    j = int(c.prng.integers(len(pairs)))
    if mode in ("q_pair", "half_pair"):
        dims = pairs[j][:1] if mode == "half_pair" else pairs[j]
        rows = [h * D + d for h in range(H) for d in dims]
        Wq[rows], bq[rows] = 0.0, 0.0
    elif mode in ("k_pair", "k_const_pair"):
        rows = [g * D + d for g in range(KV) for d in pairs[j]]
        Wk[rows] = 0.0
        bk[rows] = 0.0 if mode == "k_pair" else 0.5
    elif mode == "k_pair_per_head":
        rows = [g * D + d for g in range(KV) for d in pairs[(j + g) % len(pairs)]]
        Wk[rows], bk[rows] = 0.0, 0.0
    elif mode == "group":
        g = int(c.prng.integers(KV))
        Wo[:, g * r * D:(g + 1) * r * D] = 0.0
        Wk[g * D:(g + 1) * D] = 0.0
        Wv[g * D:(g + 1) * D] = 0.0
    elif mode == "q_head":
        h = int(c.prng.integers(H))
        Wo[:, h * D:(h + 1) * D] = 0.0


ROPE_FORMS = ["written", "sqr", "interleaved", "sqr_interleaved", "interleaved_reshape", "partial"]


@gen("rotary_attention", ("seq",), weight=1.5, families=("rotary", "sdpa", "matmul", "expand", "slice", "view", "cat"),
     enum=("form", "gqa", "core"))
def rotary_attention(c: Ctx, st: State) -> State:
    """Llama-style attention: rotary q/k (tables from the positions; rotate_half or GPT-J's interleaved
    rotate_every_two, written out (flattened, or reshaped to x's shape as timm's EVA does) or as sqr_fx's
    call; ``partial``: only the first D/2 dims rotate), kv heads repeated Hugging Face style
    (``repeat_kv``) or by sdpa's ``enable_gqa``."""
    import sqr_fx.attention as sa  # called as sa.rotary: torch.fx.wrap patches the name there
    if not st.batched:
        raise Skip("needs [B, T, C]")
    E = st.C
    H = c.pick("heads", [h for h in divisors(E) if h <= 4 and (E // h) % 2 == 0])
    KV = c.pick("kv", divisors(H))
    D, r = E // H, H // KV
    form = c.pick("form", ROPE_FORMS if D % 4 == 0 else ROPE_FORMS[:-1])
    gqa = c.pick("gqa", ["repeat", "sdpa"] if r > 1 else ["none"])
    core = c.pick("core", ["sdpa", "manual"] if gqa != "sdpa" else ["sdpa"])
    rot = D // 2 if form == "partial" else D
    half = rot // 2
    pairs = [(2 * i, 2 * i + 1) if "interleaved" in form else (i, i + half) for i in range(half)]
    Wq, Wo = c.randn(H * D, E, scale=fan_in_scale(E)), c.randn(E, H * D, scale=fan_in_scale(E))
    Wk, Wv = (c.randn(KV * D, E, scale=fan_in_scale(E)) for _ in range(2))
    bq, bk, bv, bo = c.randn(H * D, scale=0.3), c.randn(KV * D, scale=0.3), c.randn(KV * D, scale=0.3), c.randn(E)
    _plant_rope(c, Wq, bq, Wk, bk, Wv, Wo, H, KV, D, pairs, c.pick("plant", ROPE_PLANTS))
    names = [c.param(t, "w") for t in (Wq, bq, Wk, bk, Wv, bv, Wo, bo)]
    inv = c.buffer(1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot), "inv_freq")

    def rope(x, freqs):
        if "interleaved" in form:
            emb = freqs.repeat_interleave(2, -1)
            cos, sin = emb.cos(), emb.sin()
            if form == "sqr_interleaved":
                return sa.rotary_interleaved(x, cos, sin)
            rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1)
            # timm's EVA: ``.reshape(x.shape)``, which torch.export writes with computed sizes
            rotated = rotated.reshape(x.shape) if form == "interleaved_reshape" else rotated.flatten(-2)
            return x * cos + rotated * sin
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if form == "sqr":
            return sa.rotary(x, cos, sin, half)
        if form == "partial":
            x_rot, x_pass = x[..., :rot], x[..., rot:]
            x_rot = x_rot * cos + torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1) * sin
            return torch.cat((x_rot, x_pass), dim=-1)
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def fn(m, h):
        wq, bq_, wk, bk_, wv, bv_, wo, bo_ = (P(m, n) for n in names)
        b, t = h.shape[0], h.shape[1]
        q = F.linear(h, wq, bq_).view(b, t, H, D).transpose(1, 2)
        k = F.linear(h, wk, bk_).view(b, t, KV, D).transpose(1, 2)
        v = F.linear(h, wv, bv_).view(b, t, KV, D).transpose(1, 2)
        freqs = torch.arange(t, dtype=h.dtype)[:, None] * P(m, inv)[None, :]
        q, k = rope(q, freqs), rope(k, freqs)
        if gqa == "repeat":
            k = k[:, :, None, :, :].expand(b, KV, r, t, D).reshape(b, H, t, D)
            v = v[:, :, None, :, :].expand(b, KV, r, t, D).reshape(b, H, t, D)
        if core == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa == "sdpa")
        else:
            o = F.softmax(q @ k.transpose(-2, -1) * D ** -0.5, dim=-1) @ v
        return F.linear(o.transpose(1, 2).reshape(b, t, H * D), wo, bo_)
    c.step_h(fn)
    return st


# ---- Swin -------------------------------------------------------------------------------------------------------
@gen("swin", ("hw",), weight=1, families=("window_attention",))
def swin(c: Ctx, st: State) -> State:
    import torchvision.models.swin_transformer as tv  # tv.shifted_window_attention: the fx-wrapped name
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
    if not st.batched:
        raise Skip("Swin needs [B, H, W, C]")
    C = st.C
    H = _heads(c, C)
    form = c.pick("form", ["v1", "v2", "F", "sqr"])
    w = c.pick("window", [2, 3, 4])
    s = c.pick("shift", [0, 1])
    if s >= w:
        raise Skip("shift")
    (Wq, Wk, Wv, Wo), (bq, bk, bv, bo) = _qkvo(c, C, H)
    if form == "F":
        N = w * w
        names = [c.param(torch.cat([Wq, Wk, Wv]), "qkv"), c.param(Wo, "proj"),
                 c.param(c.randn(1, H, N, N, scale=0.3), "rpb"), c.param(torch.cat([bq, bk, bv]), "qkvb"),
                 c.param(bo, "projb")]
        c.step_h(lambda m, h: tv.shifted_window_attention(h, P(m, names[0]), P(m, names[1]), P(m, names[2]), [w, w], H,
                                                       [s, s], 0.0, 0.0, P(m, names[3]), P(m, names[4]),
                                                       training=False))
        return st
    if form == "sqr":  # sqr_fx's own explicit-width form (what minimize emits for a shrunk Swin block)
        import sqr_fx.window_attention as swa
        N = w * w
        names = [c.param(t, "w") for t in (Wq, bq, Wk, bk, Wv, bv, Wo, bo)] + [c.param(c.randn(1, H, N, N), "rpb")]
        scale = float((C // H) ** -0.5)
        c.step_h(lambda m, h: swa.window_attention(h, *(P(m, n) for n in names), [w, w], H, [s, s], scale))
        return st
    mod = (ShiftedWindowAttention if form == "v1" else ShiftedWindowAttentionV2)(C, [w, w], [s, s], H)
    with torch.no_grad():
        mod.qkv.weight.copy_(torch.cat([Wq, Wk, Wv]))
        mod.qkv.bias.copy_(torch.cat([bq, bk, bv]))
        mod.proj.weight.copy_(Wo)
        mod.proj.bias.copy_(bo)
        if form == "v1":
            mod.relative_position_bias_table.normal_(0, 0.3, generator=c.g)
    key = c.module(mod, "swa")
    c.step_h(lambda m, h: m.M[key](h))
    return st


@gen("patch_merging", ("hw",), weight=1, families=("patch_merging_pad", "layer_norm", "linear"))
def patch_merging(c: Ctx, st: State) -> State:
    import torchvision.models.swin_transformer as tv
    from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2
    if not st.batched or 4 * st.C > 64:
        raise Skip("batched, narrow")
    form = c.pick("form", ["v1", "v2", "F"])
    C = st.C
    W = c.randn(2 * C, 4 * C, scale=fan_in_scale(4 * C))
    gamma = c.rand(4 * C if form != "v2" else 2 * C, lo=0.5, hi=1.5)
    mode = c.pick("plant", ["none", "rows", "cols", "gamma0"])
    with torch.no_grad():
        if mode == "rows":
            W[c.subset(2 * C)] = 0.0
        elif mode == "cols":
            W[:, c.subset(4 * C)] = 0.0
        elif mode == "gamma0":
            gamma[c.subset(len(gamma))] = 0.0
    new = State("hw", 2 * C, tuple((v + 1) // 2 for v in st.sp), True)
    if form == "F":
        w, g = c.param(W), c.param(gamma, "g")
        c.step_h(lambda m, h: F.linear(F.layer_norm(tv._patch_merging_pad(h), (4 * C,), P(m, g)), P(m, w)))
        return new
    mod = (PatchMerging if form == "v1" else PatchMergingV2)(C)
    with torch.no_grad():
        mod.reduction.weight.copy_(W)
        mod.norm.weight.copy_(gamma)
        mod.norm.bias.normal_(0, 0.3, generator=c.g)
    key = c.module(mod, "pm")
    c.step_h(lambda m, h: m.M[key](h))
    return new
