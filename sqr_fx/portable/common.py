"""Small helpers shared by the steps of :mod:`sqr_fx.portable`: module paths, fresh names, attributes."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx, nn

aten = torch.ops.aten
_FOLD = "weight_bias"  # the name the rewrite gives a bias it creates for a layer that had none


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



def fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


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
