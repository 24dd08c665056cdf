"""Steps 1 and 2 of :func:`sqr_fx.portable.finish`: fold biases are buffers; functional layers are
modules again at their original paths (settings copied from the original model), BatchNorm trains,
``stochastic_depth`` is the module it came from."""
from __future__ import annotations

import copy
import functools
import itertools
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..rules.registry import global_hooks, has_hooks
from .common import (_FOLD, _container, _fresh_name, _get_attrs, _original_module, _plain, _split,
                     aten, fetch)


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


def restore_modules(gm: fx.GraphModule, model: Optional[nn.Module] = None, recompile: bool = True) -> list[str]:
    """Turn functional weighted calls back into modules at their parameters' path (module docstring, 2.);
    returns the paths restored. ``recompile=False``: the graph only (:func:`finish` recompiles once)."""
    if global_hooks():  # a made module would run them again on what the graph computed with them (export)
        return []
    sites: dict[str, list[_Site]] = {}
    for node in gm.graph.nodes:
        s = _site(gm, node)
        if s is not None:
            sites.setdefault(s.path, []).append(s)
    attrs = _get_attrs(gm)
    under: dict[str, list[fx.Node]] = {}  # module path -> the get_attr nodes of every tensor below it
    for t, ns in attrs.items():
        atoms = t.split(".")
        for i in range(1, len(atoms)):
            under.setdefault(".".join(atoms[:i]), []).extend(ns)
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
        if first.family == "group_norm" and any(s.node.target is not F.group_norm for s in group):
            # nn.GroupNorm calls F.group_norm, which refuses N * C / G * prod(spatial) == 1 (a Python check
            # aten.group_norm does not make): only an F.group_norm call becomes one, so the result accepts what the graph did
            continue
        calls = {s.node for s in group}
        readers = under.get(path, [])
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
        if first.fold and first.family in ("linear", "conv"):
            # the folded constant is the layer's bias, a buffer (not trainable): one fused kernel, not a
            # second pass over the output (4-10 % of ResNet-50 / MobileNet v2 at batch 1 and 16)
            _buffer_bias(mod, fetch(gm, first.fold))
        elif first.fold:
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
    if recompile:
        gm.recompile()
    return done


def _buffer_bias(mod: nn.Module, t: torch.Tensor) -> None:
    """``mod.bias`` as a buffer holding ``t`` (a fold constant, or a minimized result's earlier one)."""
    mod._parameters.pop("bias", None)
    mod.register_buffer("bias", t.detach().clone())


def _bias(gm: nn.Module, a: dict) -> Optional[torch.Tensor]:
    """The bias tensor: a Parameter, or a buffer (a fold constant of an earlier minimize); None when absent."""
    v = a.get("bias")
    return None if v is None else fetch(gm, v.target)


def _param(gm: nn.Module, a: dict, slot: str) -> Optional[nn.Parameter]:
    v = a.get(slot)
    if v is None:
        return None
    t = fetch(gm, v.target)
    if not isinstance(t, nn.Parameter):
        raise TypeError(f"{v.target} is not a parameter")
    return t


def _empty(cls: type, *args: Any, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs)`` on the meta device, its tensors to be replaced by the caller's. A torch.nn layer
    is made without its ``reset_parameters`` (random init of meta tensors computes nothing but costs 0.1 ms a
    layer in Python: 5 % of a 512-layer chain's pass); its class is the layer's own afterwards."""
    if not cls.__module__.startswith("torch.nn.modules."):
        return cls(*args, device="meta", **kwargs)
    mod = _no_init(cls)(*args, device="meta", **kwargs)
    mod.__class__ = cls
    return mod


@functools.lru_cache(maxsize=None)
def _no_init(cls: type) -> type:
    return type(cls.__name__, (cls,), {"reset_parameters": lambda self: None, "__module__": cls.__module__})


def _linear(gm, s: _Site, orig) -> nn.Module:
    w = _param(gm, s.a, "weight")
    b = None if s.fold else _bias(gm, s.a)
    mod = _empty(nn.Linear, w.shape[1], w.shape[0], bias=isinstance(b, nn.Parameter))
    mod.weight = w
    _set_bias(mod, b)
    return mod


def _set_bias(mod: nn.Module, b: Optional[torch.Tensor]) -> None:
    if isinstance(b, nn.Parameter) or b is None:
        mod.bias = b
    else:
        _buffer_bias(mod, b)


def _conv(gm, s: _Site, orig) -> nn.Module:
    w = _param(gm, s.a, "weight")
    b = None if s.fold else _bias(gm, s.a)
    a = s.a
    dims = _CONV_DIMS[s.node.target]
    if w.dim() != dims + 2:
        return None
    groups = int(a["groups"])
    mod = _empty(_CONV_TYPES[dims], w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), a["stride"], a["padding"],
                 a["dilation"], groups, bias=isinstance(b, nn.Parameter), padding_mode="zeros")
    mod.weight = w
    _set_bias(mod, b)
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
    mod = _empty(cls, rm.shape[0], eps=float(a["eps"]), momentum=orig.momentum if orig is not None else 0.1,
                 affine=w is not None, track_running_stats=True)
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
    mod = _empty(nn.LayerNorm, tuple(a["normalized_shape"]), eps=float(a["eps"]), elementwise_affine=True,
                 bias=b is not None)
    if tuple(mod.normalized_shape) != tuple(w.shape):
        return None
    mod.weight, mod.bias = w, b
    return mod


def _group_norm(gm, s: _Site, orig) -> Optional[nn.Module]:
    a = s.a
    w, b = _param(gm, a, "weight"), _param(gm, a, "bias")
    if w is None or b is None or not isinstance(a["num_groups"], int):
        return None
    mod = _empty(nn.GroupNorm, a["num_groups"], w.shape[0], eps=float(a["eps"]), affine=True)
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
    mod = _empty(nn.Embedding, w.shape[0], w.shape[1], padding_idx=pi, norm_type=float(a.get("norm_type", 2.0)),
                 scale_grad_by_freq=bool(a.get("scale_grad_by_freq")), sparse=bool(a.get("sparse")))
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
