"""Mixture-of-experts linears in the canonical form the minimize pass can shrink.

Hugging Face transformers 5 stores a MoE layer's experts as 3-D tensors (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) and runs them in one of three forms:

* ``batched_mm``: ``bmm(W[expert_ids], x.unsqueeze(-1)).squeeze(-1)``, every row with its own expert's
  matrix. ``patterns.expert_linear_from_pattern`` rewrites it to one :func:`expert_linear` call (the
  same ops, in the same order, so the same values bit for bit);
* ``grouped_mm`` (the default): rows sorted by expert, ``grouped_mm(x, W.transpose(-2, -1), offs)``:
  ``aten._grouped_mm`` in eager mode, ``transformers::grouped_mm_fallback`` (a loop of ``mm``) under
  ``torch.export``; both read directly (``rules/moe.py``);
* ``eager``: a Python loop over the experts hit (``nonzero``, ``torch.where``, ``index_add_``): data
  dependent, neither ``symbolic_trace`` nor ``torch.export`` traces it (nothing to minimize).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["expert_linear"]


@torch.fx.wrap
def expert_linear(x: Tensor, weight: Tensor, expert_ids: Tensor) -> Tensor:
    """Row ``s`` through its own expert: ``y[s] = weight[expert_ids[s]] @ x[s]`` (``x [S, in]``,
    ``weight [E, out, in]``, ``expert_ids [S]``), computed as transformers' ``batched_mm`` does.

    >>> W = torch.arange(12.).reshape(2, 3, 2)
    >>> expert_linear(torch.ones(3, 2), W, torch.tensor([1, 0, 1])).tolist()
    [[13.0, 17.0, 21.0], [1.0, 5.0, 9.0], [13.0, 17.0, 21.0]]
    """
    return torch.bmm(weight[expert_ids], x.unsqueeze(-1)).squeeze(-1)
