"""The rules table. Importing this package registers every op family's rule in ``RULES``.

Families and where they live: ``weighted`` (linear, conv), ``pointwise`` (activations,
dropout, BatchNorm, broadcasting binary ops), ``norm`` (LayerNorm/RMSNorm with
compensation, embeddings), ``attention`` (self-attention per head), ``heads`` (scaled_dot_product_attention on head-split
tensors), ``rotary`` (rotary position embeddings in pairs), ``window_attention`` (Swin's shifted-window attention per head), ``shape`` (graph interface, cat,
flatten, view, slicing, roll, pooling, reductions, shape reads), ``spatial`` (pad, interpolate, normalize
over non-channel axes), ``moe`` (mixture-of-experts linears: grouped / batched mm).
"""
from . import attention, heads, moe, norm, pointwise, rotary, shape, spatial, weighted, window_attention  # noqa: F401  (registration side effect)
from .registry import RULES, Args, OpRule, lookup, method, rule

__all__ = ["RULES", "Args", "OpRule", "lookup", "method", "rule"]
