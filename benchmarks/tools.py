"""The tools under comparison, each used the way its own users would use it.

Every adapter takes the masked eval-mode model and the example input and returns a new
model (the input is deep-copied first: two of the peers modify their argument in place).
A peer that is not installed gives a row that says so; nothing here copies peer code.

* ``masked``: the masked model itself, what ``torch.nn.utils.prune`` leaves after
  ``prune.remove``: the reference point that is exact, no smaller and no faster.
* ``sqr_fx``: ``sqr_fx.minimize(model, (x,))``.
* ``torch-simplify`` (EIDOSLab ``simplify``, pip ``torch-simplify``): ``simplify(model, zeros)``,
  its documented one-call API (BatchNorm fusion, bias propagation, removal of zeroed channels).
* ``torch-pruning`` (DepGraph, pip ``torch-pruning``): build the dependency graph, find in
  every coupled group the channels whose producing Conv/Linear rows are all zero, prune
  those groups (the classifier head is ignored, as its docs advise).
* ``nni`` (``nni.compression.speedup.ModelSpeedup``): channel masks of the all-zero rows,
  then ``speedup_model()``. NNI 3.0's own concrete tracer fails on torch 2.14, so the
  graph comes from ``torch.fx.symbolic_trace`` (the ``graph_module=`` escape hatch its
  docstring offers). Runs in its own process: importing NNI re-registers torch.fx pytree
  nodes globally.
"""
from __future__ import annotations

import copy
import importlib.metadata
import io
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["Tool", "TOOLS", "PEER_VERSIONS", "tool_status"]

PEER_VERSIONS = {"torch-simplify": "1.1.4", "torch-pruning": "1.6.1", "nni": "3.0"}


@dataclass(frozen=True)
class Tool:
    name: str
    dist: str | None  # PyPI distribution that must be installed (None: always available)
    run: Callable[[nn.Module, torch.Tensor], nn.Module]
    isolated: bool = False  # needs its own process


def _masked(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return copy.deepcopy(model)


def _sqr_fx(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from sqr_fx import minimize

    return minimize(model, (x,))


def _torch_simplify(model: nn.Module, x: torch.Tensor) -> nn.Module:
    # the import name ``simplify`` is shared with an unrelated PyPI package: insist on the API
    import simplify

    if not hasattr(simplify, "propagate_bias"):
        raise ImportError("the installed `simplify` module is not torch-simplify")
    model = copy.deepcopy(model)
    return simplify.simplify(model, torch.zeros_like(x))


def _zero_rows(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return (w.reshape(w.shape[0], -1) == 0).all(dim=1)


def _torch_pruning(model: nn.Module, x: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    linear_conv = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    plan = []
    for group in dg.get_all_groups(ignored_layers=heads, root_module_types=linear_conv):
        root = group[0].dep.target.module
        n = dg.get_out_channels(root)
        zero = torch.ones(n, dtype=torch.bool)
        for item in group:
            module = item.dep.target.module
            if dg.is_out_channel_pruning_fn(item.dep.handler) and isinstance(module, linear_conv):
                member = torch.zeros(n, dtype=torch.bool)
                member[torch.as_tensor(item.root_idxs, dtype=torch.long)] = _zero_rows(module)[item.idxs]
                zero &= member
        idxs = zero.nonzero().flatten().tolist()[: n - 1]  # DepGraph cannot empty a layer
        if idxs:
            plan.append((root, idxs))
    for root, idxs in plan:
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs)
        if dg.check_pruning_group(group):
            group.prune()
    return model


def _nni(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from nni.compression.speedup import ModelSpeedup

    model = copy.deepcopy(model)
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            alive = (~_zero_rows(m)).to(m.weight.dtype)
            masks[name] = {"weight": alive.view(-1, *[1] * (m.weight.dim() - 1)).expand_as(m.weight).clone()}
            if m.bias is not None:
                masks[name]["bias"] = alive.clone()
    logger = logging.getLogger("benchmarks.nni")
    logger.addHandler(logging.StreamHandler(io.StringIO()))
    logger.propagate = False
    return ModelSpeedup(model, x, masks, graph_module=torch.fx.symbolic_trace(model), logger=logger).speedup_model()


TOOLS: dict[str, Tool] = {t.name: t for t in [
    Tool("masked", None, _masked),
    Tool("sqr_fx", None, _sqr_fx),
    Tool("torch-simplify", "torch-simplify", _torch_simplify),
    Tool("torch-pruning", "torch-pruning", _torch_pruning),
    Tool("nni", "nni", _nni, isolated=True),
]}


def tool_status(tool: Tool) -> tuple[bool, str]:
    """(available, version or reason). A peer that is not installed is reported, never fatal."""
    if tool.dist is None:
        return True, ""
    try:
        version = importlib.metadata.version(tool.dist)
    except importlib.metadata.PackageNotFoundError:
        return False, f"not installed (pip install {tool.dist}=={PEER_VERSIONS[tool.dist]})"
    want = PEER_VERSIONS[tool.dist]
    return True, version if version == want else f"{version} (benchmarked version is {want})"
