"""Transformers and ConvNeXt: minimize across LayerNorms, exactly.

What is checked (docs/compensated_layernorm.md, ../shared/MATH.md "CompensatedLayerNorm"):

* a LayerNorm input channel j that is a known constant leaves the statistics through
  ``sqr_fx.layers.compensated_layer_norm`` (full-width mean and variance kept, one set of
  removed-constant statistics per LayerNorm);
* a residual-stream channel goes when every writer writes a constant into it (embedding /
  stem row, output-projection rows, layer-scale zeros) and, at every LayerNorm, output j is
  ignored by every reader (zero column) or gamma_j == 0 (beta_j folds into the readers);
* MLP hidden units that are constant (zero fc1 row) or unread (zero fc2 column) go;
* attention written with matmul/softmax or scaled_dot_product_attention behind head-split
  reshapes is not followed (its channels are kept): exactness and the stream around it are
  checked; stream channels also cross nn.MultiheadAttention (property test, torchvision ViT).

Every case compares against the original model in float64 at the traced shape and at
another batch / sequence length / spatial size. Real models: torchvision ConvNeXt-T, ViT
(small and vit_b_16), Swin (small and swin_t), Hugging Face BERT / ViT / GPT-2 (skipped when
``transformers`` is not installed).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import event, given
from hypothesis import strategies as st
from torch import nn

import sqr_fx
from sqr_fx import count_stored_floats, minimize
from sqr_fx.layers import compensated_layer_norm
from sqr_fx.masking import global_magnitude_mask, plant_dead_units, randomize_norm_stats

F64 = torch.float64
ATTENTION = ["none", "matmul", "sdpa", "mha"]


# ---- helpers --------------------------------------------------------------------------------------
def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # also Hugging Face ModelOutput (an OrderedDict)
        return [t for k in sorted(out, key=str) for t in _flat(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat(v)]
    return []


def assert_same(ref_model: nn.Module, small: nn.Module, inputs: tuple, rtol: float) -> float:
    """Outputs equal up to ``rtol`` relative to each output's scale; returns the max relative error."""
    with torch.no_grad():
        ref, out = _flat(ref_model(*inputs)), _flat(small(*inputs))
    assert len(ref) == len(out) and ref, "different number of outputs"
    worst = 0.0
    for r, o in zip(ref, out):
        assert r.shape == o.shape, (r.shape, o.shape)
        scale = max(r.abs().max().item(), 1e-300)
        torch.testing.assert_close(o, r, rtol=rtol, atol=rtol * scale)
        worst = max(worst, sqr_fx.max_relative_error(r, o))
    return worst


def params(gm: nn.Module) -> dict[str, torch.Tensor]:
    return dict(gm.named_parameters())


def rows(gm: nn.Module, name: str) -> int:
    """Output units of a weight in the minimized graph (0 when the layer is gone)."""
    p = params(gm).get(name)
    return 0 if p is None else p.shape[0]


def compensated_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is compensated_layer_norm]


def assert_fixpoint(small: torch.fx.GraphModule, inputs: tuple) -> None:
    again = minimize(small, inputs)
    assert again.sqr_report.rounds == 0, "a second minimize still removed something"
    assert count_stored_floats(again) == count_stored_floats(small)


@torch.no_grad()
def plant_mlp(fc1: nn.Linear, fc2: nn.Linear, g: torch.Generator, frac: float = 0.25) -> int:
    """Kill ``frac`` of the hidden units: half constant (zero fc1 row, non-zero bias: folded into
    fc2's bias), half unread (zero fc2 column). Returns how many units were killed."""
    n = fc1.out_features
    dead = torch.randperm(n, generator=g)[: max(2, int(frac * n))]
    const, unread = dead[::2], dead[1::2]
    fc1.weight[const] = 0
    fc1.bias[const] = torch.randn(len(const), generator=g, dtype=fc1.bias.dtype)
    fc2.weight[:, unread] = 0
    return len(dead)


# ---- hand-written transformer and ConvNeXt-style models ------------------------------------------
class Attention(nn.Module):
    """Softmax attention from Linear q/k/v/o. ``matmul``: single head with matmul/softmax;
    ``sdpa``: head-split reshape + F.scaled_dot_product_attention; ``mha``: nn.MultiheadAttention."""

    def __init__(self, c: int, kind: str, heads: int, dh: int):
        super().__init__()
        self.kind, self.heads, self.dh = kind, heads, dh
        if kind == "mha":
            self.mha = nn.MultiheadAttention(c, 1, batch_first=True, dtype=F64)
        else:
            d = heads * dh
            self.q, self.k, self.v = (nn.Linear(c, d, dtype=F64) for _ in range(3))
            self.o = nn.Linear(d, c, dtype=F64)

    def forward(self, x):
        if self.kind == "mha":
            return self.mha(x, x, x, need_weights=False)[0]
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.kind == "matmul":
            a = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1)
            return self.o(torch.matmul(a, v))
        # sizes are read from q (not x): reading x.shape would freeze the LayerNorm's channels.
        # Star-unpacking a shape is not symbolically traceable: this variant goes through torch.export.
        split = lambda t: t.view(*t.shape[:-1], self.heads, self.dh).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(q), split(k), split(v))
        y = y.transpose(1, 2)
        return self.o(y.reshape(*y.shape[:-2], self.heads * self.dh))


class MLP(nn.Module):
    def __init__(self, c: int, h: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, h, dtype=F64), nn.Linear(h, c, dtype=F64)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c, h, attention, post, heads=1, dh=2):
        super().__init__()
        self.post = post
        self.attn = None if attention == "none" else Attention(c, attention, heads, dh)
        self.ln1 = None if attention == "none" else nn.LayerNorm(c, dtype=F64)
        self.ln2, self.mlp = nn.LayerNorm(c, dtype=F64), MLP(c, h)

    def forward(self, x):
        if self.attn is not None:
            x = self.ln1(x + self.attn(x)) if self.post else x + self.attn(self.ln1(x))
        return self.ln2(x + self.mlp(x)) if self.post else x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """emb Linear -> blocks (pre-LN or post-LN) -> optional final LN -> head. Input [B, T, d_in]."""

    def __init__(self, d_in, c, h, n_blocks, attention="matmul", post=False, final_ln=True, n_out=2,
                 heads=1, dh=2):
        super().__init__()
        self.emb = nn.Linear(d_in, c, dtype=F64)
        self.blocks = nn.ModuleList(Block(c, h, attention, post, heads, dh) for _ in range(n_blocks))
        self.lnf = nn.LayerNorm(c, dtype=F64) if final_ln else None
        self.head = nn.Linear(c, n_out, dtype=F64)

    def forward(self, x):
        x = self.emb(x)
        for b in self.blocks:
            x = b(x)
        if self.lnf is not None:
            x = self.lnf(x)
        return self.head(x)


class CNBlock(nn.Module):
    """dwconv kxk -> channels-last -> LN -> Linear -> GELU -> Linear -> layer-scale -> back -> + x."""

    def __init__(self, c, h, k):
        super().__init__()
        self.dw = nn.Conv2d(c, c, k, padding=k // 2, groups=c, dtype=F64)
        self.ln, self.mlp = nn.LayerNorm(c, dtype=F64), MLP(c, h)
        self.gamma = nn.Parameter(torch.ones(c, dtype=F64))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.ln(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    def __init__(self, cin, c, h, n_blocks, k=7, stem_k=3, head_ln=True, n_out=2):
        super().__init__()
        self.stem = nn.Conv2d(cin, c, stem_k, padding=stem_k // 2, dtype=F64)
        self.blocks = nn.ModuleList(CNBlock(c, h, k) for _ in range(n_blocks))
        self.head_ln = nn.LayerNorm(c, dtype=F64) if head_ln else None
        self.head = nn.Linear(c, n_out, dtype=F64)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        x = x.mean((-2, -1))
        if self.head_ln is not None:
            x = self.head_ln(x)
        return self.head(x)


@torch.no_grad()
def init_random(m: nn.Module, g: torch.Generator, sparsity: float = 0.0) -> nn.Module:
    """Trained-looking parameters from ``g``: LN gamma ~ U(0.5, 1.5), beta ~ N(0, 0.5),
    layer-scale ~ U(0.2, 1), weights ~ N(0, 1/fan_in) with a ``sparsity`` fraction of exact zeros."""
    for mod in m.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g, dtype=F64))
            mod.bias.copy_(0.5 * torch.randn(mod.bias.shape, generator=g, dtype=F64))
        elif isinstance(mod, CNBlock):
            mod.gamma.copy_(0.2 + 0.8 * torch.rand(mod.gamma.shape, generator=g, dtype=F64))
        for name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, (nn.LayerNorm, CNBlock)):
                continue
            if p.dim() >= 2:
                fan_in = p[0].numel()
                w = torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(fan_in)
                if sparsity:
                    w[torch.rand(p.shape, generator=g, dtype=F64) < sparsity] = 0
                p.copy_(w)
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
    return m.eval()


def ln_readers(m: nn.Module) -> list[tuple[nn.LayerNorm, list[torch.Tensor]]]:
    """Every LayerNorm of a hand-written model with the weights that read its output."""
    out = []
    if isinstance(m, Transformer):
        for b in m.blocks:
            if b.attn is not None:
                a = b.attn
                out.append((b.ln1, [a.mha.in_proj_weight] if a.kind == "mha" else [a.q.weight, a.k.weight, a.v.weight]))
            out.append((b.ln2, [b.mlp.fc1.weight]))
        if m.lnf is not None:
            out.append((m.lnf, [m.head.weight]))
    else:
        out = [(b.ln, [b.mlp.fc1.weight]) for b in m.blocks]
        if m.head_ln is not None:
            out.append((m.head_ln, [m.head.weight]))
    return out


@torch.no_grad()
def plant_ln_routes(m: nn.Module, stream: set[int], gamma_at: list[set[int]]) -> None:
    """LN output j of a planted stream channel goes, per LayerNorm: gamma_j == 0 where
    ``j in gamma_at[i]`` (readers then fold beta_j), else every reader's column j is zero."""
    for (ln, readers), gammas in zip(ln_readers(m), gamma_at):
        for j in sorted(stream):
            if j in gammas:
                ln.weight[j] = 0
            else:
                for w in readers:
                    w[:, j] = 0


@torch.no_grad()
def plant_transformer_stream(m: Transformer, stream: set[int], gamma_at: list[set[int]]) -> None:
    """Every writer of stream channel j writes a constant: emb row, attention output row and fc2 row
    zero, biases kept (the constant changes from block to block). LN outputs: ``plant_ln_routes``."""
    for j in sorted(stream):
        m.emb.weight[j] = 0
        for b in m.blocks:
            b.mlp.fc2.weight[j] = 0
            if b.attn is not None:
                (b.attn.mha.out_proj if b.attn.kind == "mha" else b.attn.o).weight[j] = 0
    plant_ln_routes(m, stream, gamma_at)


@torch.no_grad()
def plant_convnext_stream(m: ConvNeXtish, stream: set[int], gamma_at: list[set[int]], writers: list[str]) -> None:
    """Stem row j and every dwconv row j zero (constant biases); per block, writer "row": fc2 row j
    zero, "scale": layer-scale_j == 0 (fc2 row j stays random), "both". LN outputs as above."""
    for j in sorted(stream):
        m.stem.weight[j] = 0
        for b, writer in zip(m.blocks, writers):
            b.dw.weight[j] = 0
            if writer in ("row", "both"):
                b.mlp.fc2.weight[j] = 0
            if writer in ("scale", "both"):
                b.gamma[j] = 0
    plant_ln_routes(m, stream, gamma_at)


@torch.no_grad()
def plant_units(blocks, dead_const: list[set[int]], dead_unread: list[set[int]], g: torch.Generator) -> None:
    for b, const, unread in zip(blocks, dead_const, dead_unread):
        fc1, fc2 = b.mlp.fc1, b.mlp.fc2
        for u in const:
            fc1.weight[u] = 0
            fc1.bias[u] = torch.randn((), generator=g, dtype=F64)
        for u in unread:
            fc2.weight[:, u] = 0


def assert_dead_units_gone(s: torch.fx.GraphModule, case: dict) -> int:
    """Every block's planted dead MLP units are removed (a layer whose units are all dead keeps one:
    no zero-width tensors); returns how many units could go in all."""
    h = case["h"]
    dead = [a | b for a, b in zip(case["dead_const"], case["dead_unread"])]
    for i, d in enumerate(dead):
        assert rows(s, f"blocks.{i}.mlp.fc1.weight") <= max(h - len(d), 1), f"dead MLP units of block {i} kept"
    return sum(min(len(d), h - 1) for d in dead)


# ---- hypothesis: random transformer and ConvNeXt-style models ------------------------------------
@st.composite
def transformer_cases(draw):
    c = draw(st.integers(2, 7))
    h = draw(st.integers(1, 8))
    n_blocks = draw(st.integers(1, 3))
    post = draw(st.booleans())
    attention = draw(st.sampled_from(ATTENTION))
    heads, dh = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    final_ln = False if post else draw(st.booleans())
    stream = draw(st.sets(st.integers(0, c - 1), min_size=1, max_size=c - 1))
    n_ln = n_blocks * (1 if attention == "none" else 2) + final_ln
    # post-LN: the LN output IS the stream (read by the next LN's statistics): gamma_j == 0 everywhere
    gamma_at = [set(stream) if post else draw(st.sets(st.sampled_from(sorted(stream)))) if stream else set()
                for _ in range(n_ln)]
    dead_const = [draw(st.sets(st.integers(0, h - 1), max_size=h)) for _ in range(n_blocks)]
    dead_unread = [draw(st.sets(st.integers(0, h - 1), max_size=h)) for _ in range(n_blocks)]
    return dict(
        d_in=draw(st.integers(1, 4)), c=c, h=h, n_blocks=n_blocks, post=post, attention=attention, heads=heads,
        dh=dh, final_ln=final_ln, n_out=draw(st.integers(1, 3)), stream=stream, gamma_at=gamma_at,
        dead_const=dead_const,
        dead_unread=dead_unread, seed=draw(st.integers(0, 2**31 - 1)), sparsity=draw(st.sampled_from([0.0, 0.3])),
        # traced sizes >= 2: torch.export (the sdpa variant's front end) specialises size-1 dims
        shape=(2, draw(st.integers(2, 5))), other=(draw(st.integers(1, 4)), draw(st.integers(1, 7))),
    )


@given(transformer_cases())
def test_random_transformer_blocks_minimize_exactly(case):
    g = torch.Generator().manual_seed(case["seed"])
    m = Transformer(case["d_in"], case["c"], case["h"], case["n_blocks"], case["attention"], case["post"],
                    case["final_ln"], case["n_out"], case["heads"], case["dh"])
    init_random(m, g, case["sparsity"])
    plant_transformer_stream(m, case["stream"], case["gamma_at"])
    plant_units(m.blocks, case["dead_const"], case["dead_unread"], g)
    x = torch.randn(*case["shape"], case["d_in"], generator=g, dtype=F64)
    x2 = torch.randn(*case["other"], case["d_in"], generator=g, dtype=F64)

    routes = {"gamma" if j in g_ else "ignore" for g_ in case["gamma_at"] for j in case["stream"]}
    event(f"attention={case['attention']} post={case['post']} LN routes={'+'.join(sorted(routes)) or '-'}")
    s = minimize(m, (x,), portable=False)
    assert_same(m, s, (x,), rtol=1e-9)
    assert_same(m, s, (x2,), rtol=1e-9)

    c = case["c"]
    removable_units = assert_dead_units_gone(s, case)
    # every kind of attention reads the stream only through Linear q/k/v (nn.MultiheadAttention: its
    # in_proj, rewritten per head) and writes it through a Linear output projection
    stream_removable = bool(case["stream"])
    if stream_removable:
        assert rows(s, "emb.weight") <= c - len(case["stream"]), "planted stream channels kept"
        assert compensated_nodes(s), "stream channels left LayerNorms without compensation"
    if stream_removable or removable_units:
        assert count_stored_floats(s) < count_stored_floats(m)
    assert_fixpoint(s, (x,))


@st.composite
def convnext_cases(draw):
    c = draw(st.integers(2, 6))
    h = draw(st.integers(1, 8))
    n_blocks = draw(st.integers(1, 3))
    head_ln = draw(st.booleans())
    stream = draw(st.sets(st.integers(0, c - 1), min_size=1, max_size=c - 1))
    gamma_at = [draw(st.sets(st.sampled_from(sorted(stream)))) if stream else set() for _ in range(n_blocks + head_ln)]
    return dict(
        cin=draw(st.integers(1, 3)), c=c, h=h, n_blocks=n_blocks, k=draw(st.sampled_from([3, 7])),
        stem_k=draw(st.sampled_from([1, 3])), head_ln=head_ln, n_out=draw(st.integers(1, 3)),
        stream=stream, gamma_at=gamma_at,
        writers=[draw(st.sampled_from(["row", "scale", "both"])) for _ in range(n_blocks)],
        scale_zeros=draw(st.sets(st.integers(0, c - 1), max_size=c)) - stream,
        dead_const=[draw(st.sets(st.integers(0, h - 1), max_size=h)) for _ in range(n_blocks)],
        dead_unread=[draw(st.sets(st.integers(0, h - 1), max_size=h)) for _ in range(n_blocks)],
        seed=draw(st.integers(0, 2**31 - 1)), sparsity=draw(st.sampled_from([0.0, 0.3])),
        size=(draw(st.integers(3, 8)), draw(st.integers(3, 8))),
        other=(draw(st.integers(1, 3)), draw(st.integers(2, 11)), draw(st.integers(2, 11))),
    )


@given(convnext_cases())
def test_random_convnext_blocks_minimize_exactly(case):
    g = torch.Generator().manual_seed(case["seed"])
    m = ConvNeXtish(case["cin"], case["c"], case["h"], case["n_blocks"], case["k"], case["stem_k"],
                    case["head_ln"], case["n_out"])
    init_random(m, g, case["sparsity"])
    with torch.no_grad():
        for b in m.blocks:  # layer-scale zeros on live channels: exactness only, nothing to remove
            b.gamma[sorted(case["scale_zeros"])] = 0
    plant_convnext_stream(m, case["stream"], case["gamma_at"], case["writers"])
    plant_units(m.blocks, case["dead_const"], case["dead_unread"], g)
    cin = case["cin"]
    x = torch.randn(2, cin, *case["size"], generator=g, dtype=F64)
    n, hh, ww = case["other"]
    x2 = torch.randn(n, cin, hh, ww, generator=g, dtype=F64)

    routes = {"gamma" if j in g_ else "ignore" for g_ in case["gamma_at"] for j in case["stream"]}
    event(f"LN routes={'+'.join(sorted(routes)) or '-'} writers={'+'.join(sorted(set(case['writers'])))}")
    s = minimize(m, (x,), portable=False)
    assert_same(m, s, (x,), rtol=1e-9)
    assert_same(m, s, (x2,), rtol=1e-9)

    c = case["c"]
    removable_units = assert_dead_units_gone(s, case)
    if case["stream"]:
        kept = c - len(case["stream"])
        assert rows(s, "stem.weight") <= kept, "planted stream channels kept"
        for i in range(case["n_blocks"]):
            assert rows(s, f"blocks.{i}.dw.weight") <= kept
        assert compensated_nodes(s), "stream channels left LayerNorms without compensation"
    if case["stream"] or removable_units:
        assert count_stored_floats(s) < count_stored_floats(m)
    assert_fixpoint(s, (x,))


# ---- deterministic LayerNorm / residual-stream cases ----------------------------------------------
def _prenorm(routes: str, head_reads_stream: bool = False) -> Transformer:
    """Pre-LN MLP transformer, C=6, stream channel 0 constant (emb row 0 zero, bias 0.7; fc2 rows 0
    zero). ``routes[i]`` says how LN i's output 0 is dropped: "g" gamma_0 = 0, "i" readers ignore it.
    The last letter is the final LN (absent when ``head_reads_stream``: the head reads the stream)."""
    g = torch.Generator().manual_seed(1)
    n_blocks = len(routes) - (0 if head_reads_stream else 1)
    m = init_random(Transformer(3, 6, 8, n_blocks, "none", final_ln=not head_reads_stream), g)
    with torch.no_grad():
        m.emb.weight[0], m.emb.bias[0] = 0, 0.7
        lns = [b.ln2 for b in m.blocks] + ([] if head_reads_stream else [m.lnf])
        readers = [b.mlp.fc1 for b in m.blocks] + ([] if head_reads_stream else [m.head])
        for b in m.blocks:
            b.mlp.fc2.weight[0] = 0
        for r, ln, reader in zip(routes, lns, readers):
            if r == "g":
                ln.weight[0] = 0
            else:
                reader.weight[:, 0] = 0
    return m


@pytest.mark.parametrize("routes", ["iii", "ggg", "ig", "gi", "gig", "ii+head"])
def test_stream_channel_removed_through_every_layernorm(routes):
    """The LN-output condition holds per LayerNorm: gamma_0 == 0 at some, zero reader columns at
    others; "+head": no final LN, the head reads the constant stream directly (and folds it)."""
    head = routes.endswith("+head")
    m = _prenorm(routes.removesuffix("+head"), head_reads_stream=head)
    x = randn(2, 5, 3)
    s = minimize(m, (x,), portable=False)
    assert rows(s, "emb.weight") == 5
    assert len(compensated_nodes(s)) == len(routes.removesuffix("+head"))
    assert not [n for n in s.graph.nodes if n.target is F.layer_norm], "a full-width LayerNorm is left"
    for i, shape in enumerate([(2, 5, 3), (4, 9, 3), (1, 1, 3)]):
        assert_same(m, s, (randn(*shape, seed=i),), rtol=1e-10)
    assert_fixpoint(s, (x,))


def test_each_compensated_layernorm_stores_its_own_stream_constants():
    """Two stream channels whose constants change from block to block (fc2 biases): every LN
    stores the mean and centred sum of squares of the constants IT sees."""
    g = torch.Generator().manual_seed(2)
    m = init_random(Transformer(3, 6, 8, 2, "none"), g)
    J = [1, 4]
    with torch.no_grad():
        m.emb.weight[J] = 0
        m.emb.bias[J] = torch.tensor([0.7, -0.3], dtype=F64)
        m.blocks[0].mlp.fc2.bias[J] = torch.tensor([0.2, 0.5], dtype=F64)
        m.blocks[1].mlp.fc2.bias[J] = torch.tensor([-1.5, 2.0], dtype=F64)
        for b in m.blocks:
            b.mlp.fc2.weight[J] = 0
            b.mlp.fc1.weight[:, J] = 0
        m.head.weight[:, J] = 0
    x = randn(2, 4, 3)
    s = minimize(m, (x,), portable=False)
    seen = [torch.tensor(v, dtype=F64) for v in ([0.7, -0.3], [0.9, 0.2], [-0.6, 2.2])]
    nodes = compensated_nodes(s)
    assert len(nodes) == 3
    for node, c in zip(nodes, seen):
        n, mean_node, m2_node = node.args[3:6]  # (x, weight, bias, n, removed_mean, removed_m2, eps)
        assert n == 6
        mean, m2 = (getattr(s, a.target) for a in (mean_node, m2_node))
        torch.testing.assert_close(mean.double(), c.mean(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m2.double(), ((c - c.mean()) ** 2).sum(), rtol=1e-12, atol=1e-12)
    assert_same(m, s, (randn(3, 7, 3, seed=1),), rtol=1e-10)


def test_guard_stream_channel_read_by_a_layernorm_reader_is_kept():
    """Constant stream channel, but fc1 reads LN output 0 (gamma_0 != 0): y_0 varies per token."""
    m = _prenorm("ii")
    with torch.no_grad():
        m.blocks[0].mlp.fc1.weight[:, 0] = 0.3
    s = minimize(m, (randn(2, 5, 3),))
    assert rows(s, "emb.weight") == 6
    assert_same(m, s, (randn(3, 4, 3, seed=1),), rtol=1e-10)


def test_guard_dynamic_stream_channel_ignored_by_every_reader_is_kept():
    """Every reader ignores LN output 0, but the stream channel is not constant: it still enters
    the LayerNorm's mean and variance, so it must stay."""
    m = _prenorm("ii")
    with torch.no_grad():
        m.emb.weight[0] = torch.tensor([0.5, -1.0, 0.25], dtype=F64)
    s = minimize(m, (randn(2, 5, 3),))
    assert rows(s, "emb.weight") == 6 and not compensated_nodes(s)
    assert_same(m, s, (randn(3, 4, 3, seed=1),), rtol=1e-10)


# ---- torch.export of a minimized model with compensated LayerNorms --------------------------------
def _export_cases():
    g = torch.Generator().manual_seed(3)
    t = init_random(Transformer(3, 6, 8, 2, "matmul"), g)
    plant_transformer_stream(t, {0, 3}, [set(), {0}, set(), {0, 3}, {3}])  # 2 x (ln1, ln2) + lnf
    c = init_random(ConvNeXtish(3, 5, 6, 2), g)
    plant_convnext_stream(c, {1, 2}, [{1, 2}, {1}, set()], ["row", "scale"])
    D = torch.export.Dim.DYNAMIC
    return {
        "transformer": (t, (2, 5, 3), (4, 9, 3), {0: D, 1: D}),
        "convnext": (c, (2, 3, 8, 8), (3, 3, 11, 7), {0: D, 2: D, 3: D}),
    }


@pytest.mark.parametrize("name", ["transformer", "convnext"])
def test_compensated_layer_norm_exports_with_torch_export(name):
    m, shape, other, dyn = _export_cases()[name]
    x = randn(*shape)
    s = minimize(m, (x,), portable=False)
    assert compensated_nodes(s)
    ep = torch.export.export(s, (x,), dynamic_shapes=(dyn,))
    exported = ep.module()
    for inp in (x, randn(*other, seed=1)):
        with torch.no_grad():
            torch.testing.assert_close(exported(inp), s(inp), rtol=1e-12, atol=1e-12)
        assert_same(m, exported, (inp,), rtol=1e-10)


# ---- torchvision models ---------------------------------------------------------------------------
@pytest.mark.slow
def planted_convnext_tiny() -> tuple[nn.Module, list[int]]:
    """ConvNeXt-T, float64: trained-looking norms and layer scales, 50 % magnitude mask, 20 % dead
    units, and 10 planted dead stream channels ``J`` in stage 0 (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = torchvision.models.convnext_tiny(num_classes=10).double()
    with torch.no_grad():  # init is 1e-6, which would hide every error in the block branches
        for blk in m.modules():
            if isinstance(blk, torchvision.models.convnext.CNBlock):
                blk.layer_scale.uniform_(0.1, 1.0, generator=g)
    m = randomize_norm_stats(m, g)
    m = global_magnitude_mask(m, 0.5)
    m = plant_dead_units(m, 0.2, g, exclude_rows=["classifier.2"], exclude_columns=["features.0.0"]).eval()
    J = sorted(torch.randperm(96, generator=g)[:10].tolist())
    with torch.no_grad():
        m.features[0][0].weight[J] = 0   # stem conv row + bias: writes 0
        m.features[0][0].bias[J] = 0
        m.features[0][1].weight[J] = 0   # stem LN gamma: the stream holds beta_j
        for blk in m.features[1]:
            b = blk.block
            b[0].weight[J] = 0           # dwconv row: constant (its bias) into the block LN
            b[3].weight[:, J] = 0        # fc1 ignores LN output j
            b[5].weight[J] = 0           # fc2 row j writes 0
            b[5].bias[J] = 0
        m.features[2][1].weight[:, J] = 0  # downsample conv ignores LN2d output j
    return m, J


def test_torchvision_convnext_tiny_planted_stream_channels():
    m, J = planted_convnext_tiny()
    x = randn(2, 3, 64, 64)
    s = minimize(m, (x,), portable=False)

    p = params(s)
    for i in range(3):
        assert p[f"features.1.{i}.block.0.weight"].shape[0] == 96 - len(J)
        assert p[f"features.1.{i}.block.3.weight"].shape[1] == 96 - len(J)
    assert p["features.0.0.weight"].shape[0] == 96 - len(J)
    assert p["features.2.1.weight"].shape[1] == 96 - len(J)
    assert len(compensated_nodes(s)) >= 5  # stem LN, three block LNs, downsample LN
    assert count_stored_floats(s) < count_stored_floats(m)
    assert_same(m, s, (x,), rtol=1e-8)
    assert_same(m, s, (randn(3, 3, 96, 80),), rtol=1e-8)


def _tv_vit(**kw) -> tuple[nn.Module, int]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = randomize_norm_stats(torchvision.models.VisionTransformer(**kw) if kw else
                             torchvision.models.vit_b_16(num_classes=10), g)
    with torch.no_grad():  # torchvision zero-initialises the head: every output would be 0
        m.heads.head.weight.normal_(0, 0.05, generator=g)
        m.heads.head.bias.normal_(0, 0.1, generator=g)
        killed = [plant_mlp(layer.mlp[0], layer.mlp[3], g) for layer in m.encoder.layers]
    return m.eval().double(), killed


def _check_vit(m, killed, size, batches):
    x = randn(batches[0], 3, size, size)
    s = minimize(m, (x,))
    for i, k in enumerate(killed):
        w = params(s)[f"encoder.layers.encoder_layer_{i}.mlp.0.weight"]
        assert w.shape[0] == m.encoder.layers[i].mlp[0].out_features - k
    assert count_stored_floats(s) < count_stored_floats(m)
    for b in batches:
        assert_same(m, s, (randn(b, 3, size, size, seed=b),), rtol=1e-9)
    return s


def test_torchvision_vit_small_dead_mlp_units():
    m, killed = _tv_vit(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                        num_classes=10)
    s = _check_vit(m, killed, 32, (2, 5))
    assert_fixpoint(s, (randn(2, 3, 32, 32),))


@pytest.mark.parametrize("class_token_matches", [True, False])
def test_torchvision_vit_small_planted_stream_channels(class_token_matches):
    """Stream channels j of a torchvision ViT: patch-embedding row j zero (writes its bias), class
    token j equal to that bias, position embedding j the same at every position, attention and
    fc2 rows j zero; LN_1/LN_2 outputs j ignored (in_proj / fc1 columns), final LN gamma_j == 0.
    Guard: a class token that differs from the patches' value makes channel j position-dependent
    (not a constant): it must stay."""
    m, _ = _tv_vit(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                   num_classes=10)
    J = [3, 17, 40]
    with torch.no_grad():
        m.conv_proj.weight[J] = 0
        m.class_token[..., J] = m.conv_proj.bias[J] + (0 if class_token_matches else 0.25)
        m.encoder.pos_embedding[..., J] = torch.tensor([0.1, -0.2, 0.3], dtype=F64)
        for layer in m.encoder.layers:
            layer.self_attention.in_proj_weight[:, J] = 0
            layer.self_attention.out_proj.weight[J] = 0
            layer.mlp[0].weight[:, J] = 0
            layer.mlp[3].weight[J] = 0
        m.encoder.ln.weight[J] = 0
    s = minimize(m, (randn(2, 3, 32, 32),), portable=False)
    width = params(s)["conv_proj.weight"].shape[0]
    if class_token_matches:
        assert width == 64 - len(J) and params(s)["class_token"].shape[-1] == 64 - len(J)
        assert len(compensated_nodes(s)) == 5  # 2 x (ln_1, ln_2) + final ln
    else:
        assert width == 64 and not compensated_nodes(s)
    for b in (2, 5):
        assert_same(m, s, (randn(b, 3, 32, 32, seed=b),), rtol=1e-9)


@pytest.mark.slow
def test_torchvision_vit_b_16_dead_mlp_units():
    m, killed = _tv_vit()
    _check_vit(m, killed, 224, (1, 2))


def _swin_mlps(m):
    return [mod for mod in m.modules() if isinstance(mod, torchvision.ops.MLP)]


@pytest.mark.parametrize("name", ["small", pytest.param("swin_t", marks=pytest.mark.slow)])
def test_torchvision_swin(name):
    """Swin traces with symbolic_trace (shifted_window_attention is one node with its own rule, no longer
    frozen; heads are planted in tests/test_window_attention.py); MLP units go; exact at the traced shape
    and at another resolution (Swin pads to windows)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "small":
        m = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                               window_size=[4, 4], num_classes=10)
        shape, other = (2, 3, 32, 32), (3, 3, 40, 24)
    else:
        m = torchvision.models.swin_t(num_classes=10)
        shape, other = (1, 3, 64, 64), (2, 3, 48, 80)
    m = randomize_norm_stats(m, g)
    killed = [plant_mlp(mlp[0], mlp[3], g) for mlp in _swin_mlps(m)]
    m = m.eval().double()
    x = randn(*shape)
    s = minimize(m, (x,))
    assert s.sqr_report.frontend == "fx"
    assert not [n for n in s.sqr_report.frozen_ops if n.startswith("shifted_window_attention")]
    names = [n for n, mod in m.named_modules() if isinstance(mod, torchvision.ops.MLP)]
    for n, k, mlp in zip(names, killed, _swin_mlps(m)):
        assert params(s)[f"{n}.0.weight"].shape[0] == mlp[0].out_features - k
    assert count_stored_floats(s) < count_stored_floats(m)
    assert_same(m, s, (x,), rtol=1e-9)
    assert_same(m, s, (randn(*other, seed=1),), rtol=1e-9)


# ---- Hugging Face transformers --------------------------------------------------------------------
def _hf():
    return pytest.importorskip("transformers")


def _ids(b, t, vocab=100, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_hf_bert_dead_mlp_units():
    tf = _hf()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, use_cache=False)
    m = tf.BertModel(cfg)
    killed = [plant_mlp(layer.intermediate.dense, layer.output.dense, g) for layer in m.encoder.layer]
    m = m.eval().double()
    s = minimize(m, (_ids(2, 12),))
    assert s.sqr_report.frontend == "export"
    for i, k in enumerate(killed):
        assert rows(s, f"encoder.layer.{i}.intermediate.dense.weight") == 64 - k
    assert count_stored_floats(s) < count_stored_floats(m)
    for b, t in [(2, 12), (3, 7), (1, 20)]:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=1e-9)
    assert_fixpoint(s, (_ids(2, 12),))


def test_hf_bert_with_attention_mask():
    tf = _hf()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, use_cache=False)
    m = tf.BertModel(cfg)
    for layer in m.encoder.layer:
        plant_mlp(layer.intermediate.dense, layer.output.dense, g)
    m = m.eval().double()

    def inputs(b, t, pad):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - pad:] = 0
        return _ids(b, t, seed=t), mask

    s = minimize(m, inputs(2, 12, 4))
    assert count_stored_floats(s) < count_stored_floats(m)
    for b, t, pad in [(2, 12, 4), (3, 9, 5)]:
        assert_same(m, s, inputs(b, t, pad), rtol=1e-9)


def test_hf_vit_dead_mlp_units():
    tf = _hf()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=10)
    m = tf.ViTForImageClassification(cfg)
    layers = m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer
    pairs = [(lay.mlp.fc1, lay.mlp.fc2) if hasattr(lay, "mlp") else (lay.intermediate.dense, lay.output.dense)
             for lay in layers]
    killed = [plant_mlp(a, b, g) for a, b in pairs]
    m = m.eval().double()
    x = randn(2, 3, 32, 32)
    s = minimize(m, (x,))
    names = {id(mod): n for n, mod in m.named_modules()}
    for (fc1, _), k in zip(pairs, killed):
        assert rows(s, f"{names[id(fc1)]}.weight") == 64 - k
    assert count_stored_floats(s) < count_stored_floats(m)
    for b in (2, 5):
        assert_same(m, s, (randn(b, 3, 32, 32, seed=b),), rtol=1e-9)


def _gpt2(tf, tie: bool, activation: str = "gelu_new"):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, use_cache=False,
                        tie_word_embeddings=tie, activation_function=activation, bos_token_id=0, eos_token_id=0)
    m = tf.GPT2LMHeadModel(cfg)
    assert (m.lm_head.weight is m.transformer.wte.weight) == tie
    with torch.no_grad():  # GPT-2's Conv1D stores weights as [in, out]: rows are inputs
        for blk in m.transformer.h:
            c_fc, c_proj = blk.mlp.c_fc, blk.mlp.c_proj
            c_fc.weight[:, :32] = 0
            c_fc.bias[:32] = torch.randn(32, generator=g)  # constant units
            c_proj.weight[32:64] = 0                       # unread units
    return m.eval().double()


def _plant_gpt2_stream(m, J=(2, 9, 20)) -> list[int]:
    """Stream channels J of GPT-2: wte/wpe columns constant, ln_1/ln_2 outputs ignored (c_attn/c_fc
    rows), attention/MLP write only their bias (c_proj columns), ln_f gamma_j = 0 (beta_j folds)."""
    J = list(J)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        t = m.transformer
        t.wte.weight[:, J] = torch.randn(len(J), generator=g, dtype=F64)
        t.wpe.weight[:, J] = torch.randn(len(J), generator=g, dtype=F64)
        for blk in t.h:
            blk.attn.c_attn.weight[J, :] = 0
            blk.attn.c_proj.weight[:, J] = 0
            blk.mlp.c_fc.weight[J, :] = 0
            blk.mlp.c_proj.weight[:, J] = 0
        t.ln_f.weight[J] = 0
    return J


@pytest.mark.parametrize("stream", [False, True])
def test_hf_gpt2_tied_embeddings(stream):
    """wte and lm_head are one tensor, read by embedding (columns = output channels) and linear
    (columns = input channels): it is sliced once along the stream and stays one parameter.
    strict=True no longer trips on the tie (GPT-2's mask/position ops have no rule, though)."""
    tf = _hf()
    m = _gpt2(tf, tie=True)
    J = _plant_gpt2_stream(m) if stream else []
    with pytest.raises(sqr_fx.UnsupportedOpError):
        minimize(m, (_ids(2, 12),), strict=True)
    s = minimize(m, (_ids(2, 12),))
    # torch.export lifts the shared tensor once; after a rewrite only that name is left
    assert not s.sqr_report.tied_tensors
    assert set(s.sqr_report.shared_tensors) <= {"lm_head.weight", "transformer.wte.weight"}
    assert params(s)["transformer.h.0.mlp.c_fc.weight"].shape == (32 - len(J), 64)
    table = [p for p in s.parameters() if p.shape == (100, 32 - len(J))]
    assert len(table) == 1  # one tensor serves the embedding and the head
    assert torch.equal(table[0], m.lm_head.weight[:, [j for j in range(32) if j not in J]])
    assert s.sqr_report.ratio > (1.5 if stream else 1.35)  # 1.51x / 1.37x
    for b, t in [(2, 12), (3, 7)]:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=1e-9)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu"])
def test_hf_gpt2_untied_mlp_units(activation):
    """GPT-2's Conv1D MLP (addmm after torch.export): 32 constant + 32 unread of 128 units go."""
    tf = _hf()
    m = _gpt2(tf, tie=False, activation=activation)
    s = minimize(m, (_ids(2, 12),))
    for i in range(2):
        assert params(s)[f"transformer.h.{i}.mlp.c_fc.weight"].shape == (32, 64)
        assert params(s)[f"transformer.h.{i}.mlp.c_proj.weight"].shape == (64, 32)
    assert count_stored_floats(s) < count_stored_floats(m)
    for b, t in [(2, 12), (3, 7), (1, 30)]:
        assert_same(m, s, (_ids(b, t, seed=t),), rtol=1e-9)


def test_hf_wav2vec2_dead_mlp_units():
    """Wav2Vec2 (a conv feature encoder on raw audio ``[B, L]``, its ``input_values[:, None]`` and grouped
    positional conv, then a post-norm transformer) crashed before issue 10; now its dead MLP units go."""
    tf = _hf()
    torch.manual_seed(0)
    cfg = tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                            num_conv_pos_embedding_groups=2, vocab_size=12, do_stable_layer_norm=False)
    m = tf.Wav2Vec2ForCTC(cfg).eval().double()
    with torch.no_grad():
        for layer in m.wav2vec2.encoder.layers:
            layer.feed_forward.output_dense.weight[:, :16] = 0  # 16 of 64 MLP units unread
    s = minimize(m, (randn(2, 400),))
    for i in range(2):
        assert params(s)[f"wav2vec2.encoder.layers.{i}.feed_forward.intermediate_dense.weight"].shape[0] == 48
    for shape in [(2, 400), (3, 560)]:
        x = randn(*shape, seed=shape[1])
        torch.testing.assert_close(s(x).logits, m(x).logits, rtol=1e-9, atol=1e-10)
