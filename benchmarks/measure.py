"""The four measurements: function kept, size, pass time, inference speed (+ FLOPs)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from sqr_fx import count_stored_floats, max_relative_error

__all__ = ["stored_floats", "output_error", "timed_runs", "latencies", "flops", "graph_nodes"]


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in _tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def stored_floats(module: nn.Module) -> int:
    """Deployable size: ``sqr_fx.count_stored_floats`` plus any floating tensor a GraphModule
    reads through ``get_attr`` without registering it as a parameter or buffer."""
    n = count_stored_floats(module)
    if isinstance(module, fx.GraphModule):
        registered = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
        for node in module.graph.nodes:
            if node.op == "get_attr":
                obj: Any = module
                for atom in node.target.split("."):
                    obj = getattr(obj, atom)
                if isinstance(obj, torch.Tensor) and obj.is_floating_point() and id(obj) not in registered:
                    registered.add(id(obj))
                    n += obj.numel()
    return n


@torch.no_grad()
def output_error(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> float:
    """Max over outputs of ``max|y - y_ref| / max|y_ref|`` (``sqr_fx.max_relative_error``).

    Raises when the candidate fails or returns another shape (the caller records the reason).
    """
    ref, cand = _tensors(reference(x)), _tensors(candidate(x))
    if len(ref) != len(cand):
        raise RuntimeError(f"{len(cand)} outputs instead of {len(ref)}")
    worst = 0.0
    for r, c in zip(ref, cand):
        if r.shape != c.shape:
            raise RuntimeError(f"output shape {tuple(c.shape)} instead of {tuple(r.shape)}")
        err = max_relative_error(r, c)
        worst = max(worst, err if err == err else float("inf"))  # NaN counts as infinitely wrong
    return worst


def timed_runs(fn: Callable[[], Any], repeats: int, slow_s: float) -> tuple[list[float], Any]:
    """Wall times of ``fn()``: one warm-up run (excluded), then ``repeats`` timed runs.

    With ``repeats`` = 0, or a warm-up slower than ``slow_s`` seconds, the warm-up is the only
    measurement (no repeats),
    so a slow pass cannot eat the whole budget; the caller reports how many runs it got.
    Returns (times, result of the last run).
    """
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    if first > slow_s or repeats <= 0:
        return [first], out
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


@torch.inference_mode()
def latencies(models: dict[str, nn.Module], x: torch.Tensor, repeats: int,
              warmup: bool = True) -> dict[str, tuple[float, float]]:
    """(median, min) forward latency (seconds) of each model on ``x``.

    The models are timed interleaved (one run of each, ``repeats`` rounds, after one
    warm-up round unless ``warmup`` is False) so that a load spike from other processes
    hits all of them alike.
    """
    for m in models.values() if warmup else ():
        m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass as ``torch.utils.flop_counter.FlopCounterMode`` counts them
    (matmul/conv/attention; elementwise ops are free).

    Runs with autograd enabled: under ``no_grad`` an eval ``nn.MultiheadAttention`` takes
    its fused fast path (``_native_multi_head_attention``), which the counter does not
    see, and the dense ViT would look 2x cheaper than it is.
    """
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def graph_nodes(model: nn.Module) -> int | None:
    """Node count of ``torch.fx.symbolic_trace(model)`` (None when it does not trace)."""
    try:
        return len(fx.symbolic_trace(model).graph.nodes)
    except Exception:  # noqa: BLE001 - graph size is informative only
        return None
