"""The last step of ``minimize``: make the result an ordinary module (docs/design.md, "The returned module").

The rounds work in a functional dialect: ``F.linear`` / ``F.conv2d`` / ``F.batch_norm(training=False)`` on
``get_attr`` tensors, and sqr_fx's own helpers where no torch op expresses a shrunk layer
(``ones_map``, the compensated norms, ``self_attention``, ``window_attention``, the rotary forms). That dialect is what
the rules read, but as a deliverable it has four defects: module-based tools (quantization, hooks,
PEFT, ``torch.nn.utils.prune``) find no module; ``.train()`` changes nothing (BatchNorm is frozen in
its eval form); a constant folded into a layer that had no bias becomes a new trainable tensor; and
the graph calls sqr_fx functions, so loading it needs sqr_fx (and ``pickle`` / ``torch.load`` fail:
unpickling re-traces the generated code, and a ``torch.fx.wrap``-ped helper then runs on a Proxy).

:func:`finish` repairs all four, on the result of the last round, in place:

1. **Fold biases are buffers.** A bias created by a fold (``<layer>.weight_bias``: the layer had no
   bias) is a buffer, not a parameter; where the layer becomes a module again (2.) it is added after
   the module (``sqr_fx_<layer>_folded_bias``, shaped to broadcast over the channel axis).
2. **Modules come back.** A functional ``linear`` / ``conv{1,2,3}d`` / ``batch_norm`` / ``layer_norm`` /
   ``group_norm`` / ``embedding`` call whose tensors are ``<path>.weight`` etc. of ONE plain container is
   a module again at that path (``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d`` ...; the same
   Parameter objects, so ties stay ties), with the original module's settings where the original
   model has a module of that type there (BatchNorm ``momentum`` and ``num_batches_tracked``, an
   embedding's ``padding_idx``). BatchNorm modules normalize with batch statistics and update their
   running statistics in train mode. torchvision's ``stochastic_depth`` traced in eval form becomes the
   ``StochasticDepth`` module it came from. A fold that changes a layer's math (a ones-map correction,
   a compensated norm) stays functional next to the module.
3. **sqr_fx leaves the graph** (``portable=True``): every sqr_fx helper call is replaced by its body
   written in torch ops (the ``*_ops`` functions below, traced into the graph with the call's
   constant arguments). They are written branch-free where the helper branches on sizes (the shifted
   window's padding, shift and mask), compute in the helper's dtypes whatever dtype the module is
   later cast to, and equal the helpers bit for bit (``tests/test_portable.py``). A
   ``self_attention``'s q/k/v projections are one ``in_proj_weight`` / ``in_proj_bias`` again and a
   window attention's one ``qkv.weight`` / ``qkv.bias``, sliced in the graph, so the trainable
   tensors are the original's.
4. ``torch.export``'s input guard (a function made with ``exec``) is traced into a GraphModule, so a
   result of the export front end pickles too. (The report pickles as a ``types.SimpleNamespace``:
   ``MinimizeReport.__reduce__``.)

``portable=False`` skips 3: the helpers stay, so a second ``minimize`` recognizes the compensated norms
and attention forms and can shrink them again (the Squeeze-Release cycle minimizes its own results
this way). Steps 1, 2 and 4 always run. Each rewrite is local and checked: a node whose pattern does not
match exactly is left as it was (exact, only less ordinary), and ``minimize``'s self-check runs on
the module this returns. :func:`sqr_fx_references` lists what still needs sqr_fx.
"""
from __future__ import annotations

import copy
import itertools
import math
import types
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .attention import attend, project_heads
from .rules.registry import has_hooks

__all__ = ["finish", "restore_modules", "inline_helpers", "sqr_fx_references", "layer_norm_ops", "rms_norm_ops",
           "group_norm_ops", "ones_map_ops", "self_attention_ops", "window_attention_ops", "rotary_ops",
           "rotary_interleaved_ops"]

aten = torch.ops.aten
_FOLD = "weight_bias"  # the name the rewrite gives a bias it creates for a layer that had none


# ---- entry point --------------------------------------------------------------------------------------------
def finish(gm: fx.GraphModule, model: Optional[nn.Module] = None, *, portable: bool = True) -> fx.GraphModule:
    """Make ``gm`` (a fresh minimize result, edited in place) an ordinary module; see the module docstring.

    ``model``: the module minimize was given (its modules' settings are copied where they match)."""
    for name in ("train", "eval"):  # ``ExportedProgram.module()`` disables both per instance: mode now matters
        if isinstance(vars(gm).get(name), types.MethodType):
            delattr(gm, name)
    originals = _original_params(model)
    _fold_biases_to_buffers(gm, originals)
    restore_modules(gm, model)
    if portable:
        inline_helpers(gm, model)
    _picklable_guards(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    # the function minimize preserves is the eval-mode one (a graph from torch.export may say
    # training=True: it was traced in eval form): the result is returned in eval mode
    return gm.eval()


def sqr_fx_references(gm: nn.Module) -> list[str]:
    """What in ``gm`` needs sqr_fx importable: call targets, module classes and attribute types defined in
    sqr_fx (empty for a portable result)."""
    out = []

    def ours(obj: Any) -> bool:
        return str(getattr(obj, "__module__", "") or "").split(".")[0] == "sqr_fx"

    if isinstance(gm, fx.GraphModule):
        for node in gm.graph.nodes:
            if node.op in ("call_function",) and ours(node.target):
                out.append(f"{node.name}: {getattr(node.target, '__qualname__', node.target)}")
    for name, mod in gm.named_modules():
        if ours(type(mod)):
            out.append(f"module {name or '<root>'}: {type(mod).__qualname__}")
        for k, v in vars(mod).items():
            if not k.startswith("_") and ours(type(v)) and k != "sqr_report":
                out.append(f"attribute {name + '.' if name else ''}{k}: {type(v).__qualname__}")
    return out


# ---- helpers ------------------------------------------------------------------------------------------------
def _original_params(model: Optional[nn.Module]) -> set[str]:
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} if isinstance(model, nn.Module) else set()


def _container(gm: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        mod = gm.get_submodule(path)
    except AttributeError:
        return None
    return mod


def _split(target: str) -> tuple[str, str]:
    path, _, leaf = target.rpartition(".")
    return path, leaf


def _original_module(model: Optional[nn.Module], path: str, types: tuple) -> Optional[nn.Module]:
    if not isinstance(model, nn.Module) or not path:
        return None
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return None
    return mod if type(mod) in types else None


def _fresh_name(gm: nn.Module, stem: str) -> str:
    stem = stem.replace(".", "_")
    name, i = stem, 1
    while hasattr(gm, name):
        i += 1
        name = f"{stem}_{i}"
    return name


def _get_attrs(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            found.setdefault(node.target, []).append(node)
    return found


_PLAIN_KEYS = set(vars(nn.Module()))


def _plain(mod: Optional[nn.Module], allowed: set[str]) -> bool:
    """A bare ``nn.Module`` container (as the rewrite builds them) holding only tensors named in ``allowed``."""
    return (type(mod) is nn.Module and not mod._modules and set(vars(mod)) <= _PLAIN_KEYS
            and set(mod._parameters) | set(mod._buffers) <= allowed)


# ---- 1. fold biases are buffers -----------------------------------------------------------------------------
def _fold_biases_to_buffers(gm: fx.GraphModule, originals: set[str]) -> None:
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        path, leaf = _split(name)
        if leaf != _FOLD or name in originals:
            continue
        owner = gm.get_submodule(path) if path else gm
        if owner._parameters.get(leaf) is p:
            del owner._parameters[leaf]
            owner.register_buffer(leaf, p.detach())


# ---- 2. modules ---------------------------------------------------------------------------------------------
_CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
              aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
_FAMILY: dict[Any, str] = {F.linear: "linear", aten.linear.default: "linear",
                           F.batch_norm: "batch_norm", aten.batch_norm.default: "batch_norm",
                           F.layer_norm: "layer_norm", aten.layer_norm.default: "layer_norm",
                           F.group_norm: "group_norm", aten.group_norm.default: "group_norm",
                           F.embedding: "embedding", aten.embedding.default: "embedding",
                           **{k: "conv" for k in _CONV_DIMS}}
# argument names per target (the functional signature; aten's where it differs) and their defaults
_NAMES: dict[Any, tuple[str, ...]] = {
    "linear": ("input", "weight", "bias"),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    aten.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
                              "eps", "cudnn_enabled"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
    "group_norm": ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
    "embedding": ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    aten.embedding.default: ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse"),
}
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "running_mean": None,
             "running_var": None, "weight": None, "training": False, "momentum": 0.1, "eps": 1e-5,
             "padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False,
             "cudnn_enabled": True, "cudnn_enable": True}
_TENSORS = {"linear": ("weight", "bias"), "conv": ("weight", "bias"), "layer_norm": ("weight", "bias"),
            "group_norm": ("weight", "bias"), "embedding": ("weight",),
            "batch_norm": ("weight", "bias", "running_mean", "running_var")}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_ORIGINAL_TYPES = {"linear": (nn.Linear,), "conv": tuple(_CONV_TYPES.values()), "batch_norm": _BN_TYPES,
                   "layer_norm": (nn.LayerNorm,), "group_norm": (nn.GroupNorm,), "embedding": (nn.Embedding,)}


def _bind(node: fx.Node, family: str) -> Optional[dict[str, Any]]:
    names = _NAMES.get(node.target, _NAMES[family])
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    values = {n: _DEFAULTS.get(n) for n in names if n in _DEFAULTS}
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    if node.target is aten.embedding.default and values.get("padding_idx") == -1:
        values["padding_idx"] = None
    return values


def _rank(node: Any) -> Optional[int]:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return len(tm.shape) if tm is not None and hasattr(tm, "shape") else None


class _Site:
    """One functional call that may become ``call_module(path)``."""

    def __init__(self, node: fx.Node, family: str, a: dict[str, Any], path: str, fold: Optional[str]):
        self.node, self.family, self.a, self.path, self.fold = node, family, a, path, fold

    def key(self) -> tuple:
        """The call's settings: every call of one module must agree on them."""
        named = lambda v: v.target if isinstance(v, fx.Node) and v.op == "get_attr" else v  # noqa: E731
        return (self.family, self.node.target, self.fold,
                tuple((k, repr(fx.node.map_aggregate(v, named))) for k, v in self.a.items() if k != "input"))


def _site(gm: fx.GraphModule, node: fx.Node) -> Optional[_Site]:
    family = _FAMILY.get(node.target) if node.op == "call_function" else None
    if family is None:
        return None
    a = _bind(node, family)
    if a is None or not isinstance(a.get("input"), fx.Node):
        return None
    path, fold = None, None
    for slot in _TENSORS[family]:
        v = a.get(slot)
        if v is None:
            continue
        if not (isinstance(v, fx.Node) and v.op == "get_attr"):
            return None
        p, leaf = _split(v.target)
        if slot == "bias" and leaf == _FOLD and family in ("linear", "conv"):
            fold = v.target
        elif leaf != slot:
            return None
        if path is None:
            path = p
        elif p != path:
            return None
    if not path:
        return None
    return _Site(node, family, a, path, fold)


def restore_modules(gm: fx.GraphModule, model: Optional[nn.Module] = None) -> list[str]:
    """Turn functional weighted calls back into modules at their parameters' path (module docstring, 2.);
    returns the paths restored."""
    sites: dict[str, list[_Site]] = {}
    for node in gm.graph.nodes:
        s = _site(gm, node)
        if s is not None:
            sites.setdefault(s.path, []).append(s)
    attrs = _get_attrs(gm)
    done = []
    for path, group in sites.items():
        first = group[0]
        if any(s.key() != first.key() for s in group[1:]):
            continue  # one container read by calls of different kinds or settings: not one module
        allowed = set(_TENSORS[first.family]) | ({_FOLD} if first.fold else set())
        cont = _container(gm, path)
        types_ = _ORIGINAL_TYPES[first.family]
        # a bare container (a rewritten round's), or the traced module itself (no round removed anything:
        # the front end turned its call into the functional form and left it in place)
        typed = type(cont) in types_ and not cont._modules and not has_hooks(cont) and (
            set(cont._parameters) | set(cont._buffers) <= allowed | {"num_batches_tracked"})
        if not (typed or _plain(cont, allowed)):
            continue
        calls = {s.node for s in group}
        readers = [n for t, ns in attrs.items() if t.startswith(path + ".") for n in ns]
        if any(set(n.users) - calls for n in readers):
            continue  # a tensor of the layer is read elsewhere too: the layer is not self-contained
        orig = _original_module(model, path, types_) or (cont if typed else None)
        try:
            mod = _BUILD[first.family](gm, first, orig)
        except Exception:  # noqa: BLE001 - a setting the module cannot express: the call stays functional
            mod = None
        if mod is None or any(t.is_meta for t in itertools.chain(mod.parameters(), mod.buffers())):
            continue
        fold = None
        if first.fold:
            t = fetch(gm, first.fold)
            spatial = mod.weight.dim() - 2 if first.family == "conv" else 0
            fold = _fresh_name(gm, f"sqr_fx_{path}_folded_bias")
            gm.register_buffer(fold, t.detach().reshape((-1,) + (1,) * spatial).clone())
        gm.add_submodule(path, mod.eval())
        g = gm.graph
        for s in group:
            with g.inserting_before(s.node):  # (the input as it is now: an earlier site may have replaced it)
                new = g.call_module(path, (_bind(s.node, s.family)["input"],))
                new.meta = dict(s.node.meta)
                out = new
                if fold is not None:
                    out = g.call_function(torch.add, (new, g.get_attr(fold)))
            s.node.replace_all_uses_with(out)
            g.erase_node(s.node)
        for n in readers:
            if not n.users:
                g.erase_node(n)
        done.append(path)
    _restore_stochastic_depth(gm, model)
    gm.recompile()
    return done


def fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _param(gm: nn.Module, a: dict, slot: str) -> Optional[nn.Parameter]:
    v = a.get(slot)
    if v is None:
        return None
    t = fetch(gm, v.target)
    if not isinstance(t, nn.Parameter):
        raise TypeError(f"{v.target} is not a parameter")
    return t


def _linear(gm, s: _Site, orig) -> nn.Module:
    w = _param(gm, s.a, "weight")
    b = None if s.fold else _param(gm, s.a, "bias")
    mod = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    mod.weight, mod.bias = w, b
    return mod


def _conv(gm, s: _Site, orig) -> nn.Module:
    w = _param(gm, s.a, "weight")
    b = None if s.fold else _param(gm, s.a, "bias")
    a = s.a
    dims = _CONV_DIMS[s.node.target]
    if w.dim() != dims + 2:
        return None
    groups = int(a["groups"])
    mod = _CONV_TYPES[dims](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), a["stride"], a["padding"],
                            a["dilation"], groups, bias=b is not None, padding_mode="zeros", device="meta")
    mod.weight, mod.bias = w, b
    return mod


def _batch_norm(gm, s: _Site, orig) -> Optional[nn.Module]:
    a = s.a
    if a["training"] is not False or a["running_mean"] is None or a["running_var"] is None:
        return None
    w, b = _param(gm, a, "weight"), _param(gm, a, "bias")
    if (w is None) != (b is None):
        return None
    rm, rv = fetch(gm, a["running_mean"].target), fetch(gm, a["running_var"].target)
    rank = _rank(a["input"])
    cls = type(orig) if orig is not None else {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d,
                                               5: nn.BatchNorm3d}.get(rank)
    if cls is None:
        return None
    mod = cls(rm.shape[0], eps=float(a["eps"]), momentum=orig.momentum if orig is not None else 0.1,
              affine=w is not None, track_running_stats=True, device="meta")
    if w is not None:
        mod.weight, mod.bias = w, b
    mod.running_mean, mod.running_var = rm, rv
    nbt = getattr(orig, "num_batches_tracked", None)
    mod.num_batches_tracked = (nbt.detach().clone() if isinstance(nbt, torch.Tensor)
                               else torch.tensor(0, dtype=torch.long, device=rm.device))
    return mod


def _layer_norm(gm, s: _Site, orig) -> Optional[nn.Module]:
    a = s.a
    w, b = _param(gm, a, "weight"), _param(gm, a, "bias")
    if w is None:
        return None
    mod = nn.LayerNorm(tuple(a["normalized_shape"]), eps=float(a["eps"]), elementwise_affine=True,
                       bias=b is not None, device="meta")
    if tuple(mod.normalized_shape) != tuple(w.shape):
        return None
    mod.weight, mod.bias = w, b
    return mod


def _group_norm(gm, s: _Site, orig) -> Optional[nn.Module]:
    a = s.a
    w, b = _param(gm, a, "weight"), _param(gm, a, "bias")
    if w is None or b is None or not isinstance(a["num_groups"], int):
        return None
    mod = nn.GroupNorm(a["num_groups"], w.shape[0], eps=float(a["eps"]), affine=True, device="meta")
    mod.weight, mod.bias = w, b
    return mod


def _embedding(gm, s: _Site, orig) -> Optional[nn.Module]:
    a = s.a
    if a.get("max_norm") is not None:
        return None
    w = _param(gm, a, "weight")
    pi = a.get("padding_idx")
    if orig is not None and orig.padding_idx is not None and pi is None and s.node.target is aten.embedding.default:
        pi = orig.padding_idx  # export drops it (it only matters for gradients): the original module has it
    mod = nn.Embedding(w.shape[0], w.shape[1], padding_idx=pi, norm_type=float(a.get("norm_type", 2.0)),
                       scale_grad_by_freq=bool(a.get("scale_grad_by_freq")), sparse=bool(a.get("sparse")),
                       device="meta")
    mod.weight = w
    return mod


_BUILD: dict[str, Callable[..., Optional[nn.Module]]] = {
    "linear": _linear, "conv": _conv, "batch_norm": _batch_norm, "layer_norm": _layer_norm,
    "group_norm": _group_norm, "embedding": _embedding}


def _restore_stochastic_depth(gm: fx.GraphModule, model: Optional[nn.Module]) -> None:
    """torchvision's ``stochastic_depth(x, p, mode, training=False)`` traced through its ``StochasticDepth``
    module (``nn_module_stack`` names it) is that module again, so it follows ``.train()``."""
    try:
        from torchvision.ops import StochasticDepth, stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is optional
        return
    if not isinstance(model, nn.Module):
        return
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not stochastic_depth or node.kwargs or len(node.args) != 4:
            continue
        x, p, mode, training = node.args
        stack = node.meta.get("nn_module_stack") or {}
        if training is not False or not stack:
            continue
        path = list(stack.values())[-1][0]
        orig = _original_module(model, path, (StochasticDepth,))
        if orig is None or orig.p != p or orig.mode != mode or not path:
            continue
        existing = _container(gm, path)
        if existing is None:
            parent, _ = _split(path)
            if parent and _container(gm, parent) is None and hasattr(gm, parent.split(".")[0]) \
                    and not isinstance(getattr(gm, parent.split(".")[0]), nn.Module):
                continue
            try:
                gm.add_submodule(path, copy.deepcopy(orig).eval())
            except (KeyError, AttributeError):
                continue
        elif type(existing) is not StochasticDepth:
            continue
        with g.inserting_before(node):
            new = g.call_module(path, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)


def _picklable_guards(gm: fx.GraphModule) -> None:
    """``torch.export``'s input guard (``_guards_fn``, a ``GuardsFn`` whose ``forward`` is a function made
    with ``exec``) cannot be pickled: its guards are traced into a small GraphModule, whose ``forward``
    becomes the guard's (the module keeps its type, so the rules still know it)."""
    try:
        from torch.export._unlift import GuardsFn
    except ImportError:  # pragma: no cover - older torch
        return
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.kwargs:
            continue
        mod = gm.get_submodule(node.target)
        fn = vars(mod).get("forward")
        if type(mod) is not GuardsFn or fn is None or isinstance(fn, types.MethodType):
            continue
        graph = fx.Graph()
        tracer = fx.proxy.GraphAppendingTracer(graph)
        try:
            fn(*[fx.Proxy(graph.placeholder(f"arg{i}"), tracer) for i in range(len(node.args))])
        except Exception:  # noqa: BLE001 - a guard that does not trace: kept as it is (not picklable)
            continue
        graph.output(None)
        mod.forward = fx.GraphModule(nn.Module(), graph, class_name="Guards").forward


# ---- 3. sqr_fx helpers in torch ops ---------------------------------------------------------------------------
# Each ``*_ops`` function computes what its sqr_fx helper computes, in the same op order (bit for bit),
# with torch ops only and without Python branches on tensor sizes or dtypes, so that it traces into an
# fx graph (and re-traces when a GraphModule is unpickled) and jit-scripts.

def _compute(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the helpers' statistics dtype: float64 stays, anything narrower computes in float32."""
    return x.to(torch.result_type(x, x.new_ones(1, dtype=torch.float32)))


def ones_map_ops(x: torch.Tensor, spatial: int) -> torch.Tensor:
    """``sqr_fx.rules.weighted.ones_map``: ones of shape ``[1, 1, *x.shape[2:]]`` (``spatial`` dims)."""
    return torch.ones([1, 1] + [x.shape[2 + i] for i in range(spatial)], dtype=x.dtype, device=x.device)


def layer_norm_ops(x, weight, bias, n: int, removed_mean, removed_m2, eps: float):
    """``sqr_fx.layers.compensated_layer_norm``."""
    r = n - x.shape[-1]
    xc = _compute(x)
    m_r = removed_mean.to(xc.dtype)
    mu = (xc.sum(-1, keepdim=True) + r * m_r) / n
    d = xc - mu
    var = ((d * d).sum(-1, keepdim=True) + removed_m2.to(xc.dtype) + r * (m_r - mu) ** 2) / n
    y = d * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(xc.dtype)
    if bias is not None:
        y = y + bias.to(xc.dtype)
    return y.to(x.dtype)


def rms_norm_ops(x, weight, n: int, removed_sumsq, eps: Optional[float]):
    """``sqr_fx.layers.compensated_rms_norm`` (``eps=None``: the machine epsilon of the compute dtype)."""
    xc = _compute(x)
    ms = ((xc * xc).sum(-1, keepdim=True) + removed_sumsq.to(xc.dtype)) / n
    if eps is None:
        one = xc.new_ones(())
        y = xc * torch.rsqrt(ms + (torch.nextafter(one, one + one) - one))
    else:
        y = xc * torch.rsqrt(ms + eps)
    if weight is not None:
        y = y * weight.to(xc.dtype)
    return y.to(x.dtype)


def group_norm_ops(x, weight, bias, group_index, group_size: int, groups: int, removed_count, removed_mean,
                   removed_m2, eps: float):
    """``sqr_fx.layers.compensated_group_norm`` (``groups``: ``removed_count.shape[0]``)."""
    b, k = x.shape[0], x.shape[1]
    xf = _compute(x.reshape(b, k, -1))
    m = xf.shape[2]
    n = group_size * m
    cnt = removed_count.to(xf.dtype)
    m_r = removed_mean.to(xf.dtype)
    zeros = xf.new_zeros([b, groups])
    g_sum = zeros.index_add(1, group_index, xf.sum(-1))
    mu = (g_sum + m * cnt * m_r) / n
    d = xf - mu.index_select(1, group_index).unsqueeze(-1)
    g_ss = zeros.index_add(1, group_index, (d * d).sum(-1))
    var = (g_ss + m * (removed_m2.to(xf.dtype) + cnt * (m_r - mu) ** 2)) / n
    y = d * torch.rsqrt(var + eps).index_select(1, group_index).unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(xf.dtype).unsqueeze(-1)
    if bias is not None:
        y = y + bias.to(xf.dtype).unsqueeze(-1)
    return y.reshape(x.shape).to(x.dtype)


def self_attention_ops(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight, out_bias,
                       num_heads: int, scale: float, batch_first: bool, rank: int):
    """``sqr_fx.attention.self_attention`` for inputs of rank ``rank`` (a call of another rank fails clearly)."""
    torch._assert(x.dim() == rank, "the minimized attention was traced for inputs of another rank")
    if rank == 2:  # unbatched [L, E]: a batch of one (batch_first does not apply)
        x = x.unsqueeze(0)
    elif not batch_first:
        x = x.transpose(0, 1)
    out = attend(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight, out_bias, num_heads, scale)
    if rank == 2:
        return out.squeeze(0)
    return out if batch_first else out.transpose(0, 1)


def rotary_ops(x, cos, sin, half: int):
    """``sqr_fx.attention.rotary``."""
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rotary_interleaved_ops(x, cos, sin):
    """``sqr_fx.attention.rotary_interleaved``."""
    return x * cos + torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2) * sin


def window_attention_ops(input, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias,
                         relative_position_bias, window_size: list[int], num_heads: int, shift_size: list[int],
                         scale: Optional[float], logit_scale=None):
    """``sqr_fx.window_attention.window_attention``, branch-free in the map size: padding and window
    counts are computed, and a shift the map is too small for is multiplied by 0 (a roll by 0 and an
    all-zero mask, where the helper skips both: the same values)."""
    ws0, ws1 = window_size[0], window_size[1]
    B, H, W = input.shape[0], input.shape[1], input.shape[2]
    x = F.pad(input, [0, 0, 0, (ws1 - W % ws1) % ws1, 0, (ws0 - H % ws0) % ws0])
    pad_h, pad_w, c_in = x.shape[1], x.shape[2], x.shape[3]
    nh, nw = pad_h // ws0, pad_w // ws1
    shifted = shift_size[0] != 0 or shift_size[1] != 0
    s0, s1 = shift_size[0] * (1 - 1 // nh), shift_size[1] * (1 - 1 // nw)  # 0 where one window covers the map
    if shifted:
        x = torch.roll(x, shifts=[-s0, -s1], dims=[1, 2])
    num_windows = nh * nw
    x = x.view(B, nh, ws0, nw, ws1, c_in)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, ws0 * ws1, c_in)
    n, t = x.shape[0], ws0 * ws1
    q, k, v = (project_heads(x, w, bb, num_heads, n, t)
               for w, bb in ((q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias)))
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * scale).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if shifted:
        # torchvision's region labels (0/1/2 per axis: before the last window, in it before the shift,
        # after it), one id per (row region, column region); -100 between tokens of different regions
        ih = torch.arange(pad_h, device=x.device)
        iw = torch.arange(pad_w, device=x.device)
        lh = ((ih >= pad_h - ws0).long() + (ih >= pad_h - s0).long()) * (1 - 1 // nh)
        lw = ((iw >= pad_w - ws1).long() + (iw >= pad_w - s1).long()) * (1 - 1 // nw)
        lab = (lh.unsqueeze(1) * 3 + lw.unsqueeze(0)).view(nh, ws0, nw, ws1)
        lab = lab.permute(0, 2, 1, 3).reshape(num_windows, t)
        diff = lab.unsqueeze(1) - lab.unsqueeze(2)
        mask = x.new_zeros([num_windows, t, t]).masked_fill(diff != 0, -100.0)
        attn = attn.view(n // num_windows, num_windows, num_heads, t, t)
        attn = attn + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, t, t)
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(n, t, -1)
    x = F.linear(x, proj_weight, proj_bias)
    c_out = x.shape[-1]
    x = x.view(B, nh, nw, ws0, ws1, c_out)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_h, pad_w, c_out)
    if shifted:
        x = torch.roll(x, shifts=[s0, s1], dims=[1, 2])
    return x.narrow(1, 0, H).narrow(2, 0, W).contiguous()


def _trace_into(gm: fx.GraphModule, node: fx.Node, fn: Callable[..., Any], args: tuple) -> bool:
    """Replace ``node`` by ``fn`` traced on its arguments (Nodes become Proxies) right before it; on any
    failure the graph is left as it was and False returned."""
    g = gm.graph
    tracer = fx.proxy.GraphAppendingTracer(g)
    before = set(g.nodes)
    wrap = lambda a: fx.Proxy(a, tracer) if isinstance(a, fx.Node) else a  # noqa: E731
    try:
        with g.inserting_before(node):
            out = fn(*[wrap(a) for a in args])
        if not isinstance(out, fx.Proxy):
            raise TypeError("the traced body returned no graph value")
    except Exception:  # noqa: BLE001 - left as the helper call: exact, only not portable
        for n in reversed([n for n in g.nodes if n not in before]):
            g.erase_node(n)
        return False
    out.node.meta = {k: v for k, v in node.meta.items() if k in ("tensor_meta", "nn_module_stack", "stack_trace")}
    node.replace_all_uses_with(out.node)
    g.erase_node(node)
    return True




class _Stack:
    """q, k, v projections of one attention call as ONE weight (and one bias) again, the original's
    ``in_proj_weight`` / ``qkv.weight``: registered first, committed (the three old tensors deleted)
    only when the call was inlined, undone otherwise."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, ws: list, bs: list, names: tuple[str, str, str],
                 trainable: tuple[str, ...], originals: set[str]):
        self.gm, self.node, self.ok = gm, node, False
        self.olds = [t for t in ws + bs if t is not None]
        attrs = _get_attrs(gm)
        if not all(isinstance(t, fx.Node) and t.op == "get_attr" and set(t.users) == {node}
                   and len(attrs[t.target]) == 1 for t in self.olds):
            return
        stem = _split(ws[0].target)[0]
        if not stem or any(_split(w.target) != (stem, names[2].format(p)) for w, p in zip(ws, "qkv")) \
                or any(_split(t.target)[0] != stem for t in self.olds):
            return
        cont = _container(gm, stem)
        # a bare container, or (nothing removed: the traced graph itself) the MultiheadAttention module the
        # front end took in_proj_weight / in_proj_bias from
        if type(cont) not in (nn.Module, nn.MultiheadAttention) or any(hasattr(cont, n) for n in names[:2]):
            return
        W = [fetch(gm, w.target) for w in ws]
        B = [fetch(gm, b.target) if b is not None else None for b in bs]
        if not all(isinstance(w, nn.Parameter) for w in W) or len({(w.dtype, w.device, w.shape[1:]) for w in W}) != 1:
            return
        self.stem, self.cont, self.names = stem, cont, names
        self.sizes = [int(w.shape[0]) for w in W]
        cont.register_parameter(names[0], nn.Parameter(torch.cat([w.detach() for w in W]),
                                                       requires_grad=W[0].requires_grad))
        self.bias = False
        if any(b is not None for b in B):
            bias = torch.cat([b.detach() if b is not None else w.detach().new_zeros(w.shape[0])
                              for w, b in zip(W, B)])
            if any(f"{stem}.{n}" in originals for n in trainable) or (
                    not originals and all(isinstance(b, nn.Parameter) for b in B)):
                cont.register_parameter(names[1], nn.Parameter(bias))
                self.bias = True
            elif bool(bias.any()):  # a bias the original did not have (folded constants): a buffer
                cont.register_buffer(names[1], bias)
                self.bias = True
            # else: the zero biases the trace made up for an attention without bias go
        g = gm.graph
        self.new: list[fx.Node] = []
        with g.inserting_before(node):
            wn = g.get_attr(f"{stem}.{names[0]}")
            bn = g.get_attr(f"{stem}.{names[1]}") if self.bias else None
            self.new += [n for n in (wn, bn) if n is not None]
            lo, self.weights, self.biases = 0, [], []
            for n in self.sizes:
                self.weights.append(g.call_method("narrow", (wn, 0, lo, n)))
                self.biases.append(g.call_method("narrow", (bn, 0, lo, n)) if bn is not None else None)
                lo += n
            self.new += self.weights + [b for b in self.biases if b is not None]
        self.ok = True

    def done(self, inlined: bool) -> None:
        if not self.ok:
            return
        g = self.gm.graph
        if inlined:
            for t in self.olds:
                g.erase_node(t)
                delattr(self.cont, _split(t.target)[1])
            return
        for n in reversed(self.new):
            g.erase_node(n)
        for name in self.names[:2]:
            if hasattr(self.cont, name):
                delattr(self.cont, name)


def inline_helpers(gm: fx.GraphModule, model: Optional[nn.Module] = None) -> list[str]:
    """Replace every sqr_fx helper call by torch ops (module docstring, 3.); returns what still needs sqr_fx
    (nothing when every call matched its pattern)."""
    from .attention import rotary, rotary_interleaved, self_attention
    from .layers import compensated_group_norm, compensated_layer_norm, compensated_rms_norm
    from .rules.weighted import ones_map
    from .window_attention import window_attention

    originals = _original_params(model)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        t, a = node.target, tuple(node.args)
        if t is ones_map and len(a) == 1:
            spatial = _rank(a[0])
            if spatial is None:
                spatial = _conv_spatial(gm, list(node.users))
            else:
                spatial -= 2
            if spatial is not None and spatial >= 0:
                _trace_into(gm, node, ones_map_ops, (a[0], spatial))
        elif t is rotary and len(a) == 4:
            _trace_into(gm, node, rotary_ops, a)
        elif t is rotary_interleaved and len(a) == 3:
            _trace_into(gm, node, rotary_interleaved_ops, a)
        elif t is compensated_layer_norm and len(a) in (6, 7):
            _trace_into(gm, node, layer_norm_ops, a + (1e-5,) * (7 - len(a)))
        elif t is compensated_rms_norm and len(a) in (4, 5):
            _trace_into(gm, node, rms_norm_ops, a + (None,) * (5 - len(a)))
        elif t is compensated_group_norm and len(a) in (8, 9):
            a = a + (1e-5,) * (9 - len(a))
            count = a[5]
            if isinstance(count, fx.Node) and count.op == "get_attr":
                groups = int(fetch(gm, count.target).shape[0])
                _trace_into(gm, node, group_norm_ops, a[:5] + (groups,) + a[5:])
        elif t is self_attention and len(a) in (11, 12):
            a = a + (True,) * (12 - len(a))
            rank = _rank(a[0])
            if rank not in (2, 3):
                continue
            stack = _Stack(gm, node, [a[1], a[3], a[5]], [a[2], a[4], a[6]],
                           ("in_proj_weight", "in_proj_bias", "sqr_fx_{}_weight"), ("in_proj_bias", "sqr_fx_q_bias"),
                           originals)
            qkv = _interleave(stack.weights, stack.biases) if stack.ok else a[1:7]
            stack.done(_trace_into(gm, node, self_attention_ops, (a[0], *qkv, *a[7:], rank)))
        elif t is window_attention and len(a) in (14, 15):
            a = a + (None,) * (15 - len(a))
            window, shift = list(a[10]), list(a[12])
            if len(window) != 2 or len(shift) != 2 or not all(0 <= s < w for s, w in zip(shift, window)):
                continue
            stack = _Stack(gm, node, [a[1], a[3], a[5]], [a[2], a[4], a[6]], ("weight", "bias", "{}_weight"),
                           ("bias", "q_bias"), originals)
            qkv = _interleave(stack.weights, stack.biases) if stack.ok else a[1:7]
            stack.done(_trace_into(gm, node, window_attention_ops,
                                   (a[0], *qkv, a[7], a[8], a[9], window, a[11], shift, a[13], a[14])))
    gm.recompile()
    return sqr_fx_references(gm)


def _interleave(ws: list, bs: list) -> tuple:
    return tuple(x for pair in zip(ws, bs) for x in pair)


def _conv_spatial(gm: fx.GraphModule, users: list[fx.Node]) -> Optional[int]:
    """Spatial rank of the convs reading a ones map (they fix its rank), None when they do not agree."""
    dims = set()
    for u in users:
        if u.op == "call_function" and u.target in _CONV_DIMS:
            dims.add(_CONV_DIMS[u.target])
        else:
            return None
    return dims.pop() if len(dims) == 1 else None
