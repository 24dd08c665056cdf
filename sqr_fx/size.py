"""Deployable size: every stored floating-point number (parameters and buffers)."""
from __future__ import annotations

import torch  # noqa: F401 - the doctests below use it
from torch import nn

__all__ = ["count_stored_floats", "count_parameters"]


def _unique_tensors(module: nn.Module, params: bool, buffers: bool):
    seen: set[int] = set()
    tensors = []
    if params:
        tensors += [p for _, p in module.named_parameters(remove_duplicate=True)]
    if buffers:
        tensors += [b for _, b in module.named_buffers(remove_duplicate=True)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def count_stored_floats(module: nn.Module) -> int:
    """Number of floating-point values stored in ``module``: parameters AND buffers.

    This is the deployable size: BatchNorm statistics, folded constants and
    gather indices of floating type all count; a tied tensor counts once, and so do views of one
    storage (``torch.save`` writes a storage once, whole).

    >>> count_stored_floats(torch.nn.BatchNorm1d(4))  # weight, bias, mean, var
    16
    """
    storages: dict[tuple, int] = {}  # views of one storage (a table sliced per use) are stored once
    for t in _unique_tensors(module, True, True):
        if t.is_floating_point() and t.numel():
            st = t.untyped_storage()
            key = (t.device, st.data_ptr()) if st.data_ptr() else ("tensor", id(t))
            n = st.nbytes() // t.element_size() if st.data_ptr() else t.numel()
            storages[key] = max(storages.get(key, 0), n)
    return sum(storages.values())


def count_parameters(module: nn.Module) -> int:
    """Number of parameter entries (tied parameters counted once).

    >>> count_parameters(torch.nn.Linear(3, 2))
    8
    """
    return sum(t.numel() for t in _unique_tensors(module, True, False))
