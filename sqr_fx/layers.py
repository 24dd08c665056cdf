"""Exact replacements for normalisation layers whose input lost constant channels.

A LayerNorm over N channels reads every channel for its statistics, so a channel that
carries the same constant ``c_j`` at every position cannot simply be dropped: the mean and
variance of the survivors would change. Removing a set R of ``r`` such channels is exact when
the layer keeps what those channels contributed to the statistics. Two numbers per set
suffice, stored as buffers: the mean ``m_R`` of the removed constants and their centred
second moment ``M2_R = sum_R (c_j - m_R)^2``. With ``mu`` the full-width mean,

    mu     = (sum_K x_i + r * m_R) / N
    sum_R (c_j - mu)^2 = M2_R + r * (m_R - mu)^2

In MATH.md's notation ``S1 = r * m_R`` and ``S2 = M2_R + r * m_R^2``; the centred pair is the
same information without the cancellation of ``S2 - 2 mu S1 + r mu^2`` (docs/compensated_layernorm.md).

Each layer has ONE implementation, a plain function that FX keeps as a leaf call
(``torch.fx.wrap``), so the minimize rewrite can emit it with ``get_attr`` tensors; the modules'
``forward`` calls it. All three script with TorchScript and export with ``torch.export``.
Statistics are computed in float64 for float64 input and in float32 otherwise (as PyTorch's own
norms do for float16/bfloat16); the output has the input's dtype.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = [
    "CompensatedLayerNorm", "CompensatedRMSNorm", "CompensatedGroupNorm",
    "compensated_layer_norm", "compensated_rms_norm", "compensated_group_norm", "removed_stats",
    "upcast_rms_norm", "full_width_rms_norm",
]


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Never below float32: bf16/fp16 statistics would lose the compensation's precision.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.fx.wrap
def compensated_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], n: int,
                           removed_mean: Tensor, removed_m2: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim of ``x`` as if ``n - x.shape[-1]`` constant channels were present.

    ``removed_mean``/``removed_m2`` are 0-dim: mean and centred sum of squares of the removed
    constants (see :func:`removed_stats`). Equals ``F.layer_norm`` of the full-width input on the
    kept channels.

    >>> x = torch.tensor([[1.0, 2.0, 3.0, 10.0]], dtype=torch.float64)  # channel 3 == 10 always
    >>> y = compensated_layer_norm(x[:, :3], None, None, 4, torch.tensor(10.0), torch.tensor(0.0))
    >>> torch.allclose(y, torch.nn.functional.layer_norm(x, (4,))[:, :3])
    True
    """
    k = x.shape[-1]
    if k > n:
        raise ValueError(f"compensated_layer_norm: {k} kept channels exceed the original {n}")
    r = n - k
    ct = _compute_dtype(x)
    xc = x.to(ct)
    m_r = removed_mean.to(ct)
    mu = (xc.sum(-1, keepdim=True) + r * m_r) / n
    d = xc - mu
    # Every term is a sum of squares: no cancellation (unlike E[x^2] - mu^2 or S2 - 2 mu S1 + r mu^2).
    var = ((d * d).sum(-1, keepdim=True) + removed_m2.to(ct) + r * (m_r - mu) ** 2) / n
    y = d * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


@torch.fx.wrap
def compensated_rms_norm(x: Tensor, weight: Optional[Tensor], n: int, removed_sumsq: Tensor,
                         eps: Optional[float] = None) -> Tensor:
    """RMSNorm over the last dim of ``x``; the removed constants add ``removed_sumsq = sum_R c_j^2``.

    ``eps=None`` means ``torch.finfo`` of the computation dtype, as ``F.rms_norm``.

    >>> x = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)  # channel 2 == 3 always
    >>> y = compensated_rms_norm(x[:, :2], None, 3, torch.tensor(9.0))
    >>> torch.allclose(y, torch.nn.functional.rms_norm(x, (3,))[:, :2])
    True
    """
    k = x.shape[-1]
    if k > n:
        raise ValueError(f"compensated_rms_norm: {k} kept channels exceed the original {n}")
    ct = _compute_dtype(x)
    xc = x.to(ct)
    if eps is None:
        eps_val = 2.220446049250313e-16 if ct == torch.float64 else 1.1920928955078125e-07
    else:
        eps_val = eps
    ms = ((xc * xc).sum(-1, keepdim=True) + removed_sumsq.to(ct)) / n
    y = xc * torch.rsqrt(ms + eps_val)
    if weight is not None:
        y = y * weight.to(ct)
    return y.to(x.dtype)


@torch.fx.wrap
def upcast_rms_norm(x: Tensor, eps: float, stat_dtype: torch.dtype) -> Tensor:
    """T5's RMSNorm without its weight: the mean square in ``stat_dtype``, the product in ``x``'s dtype
    (promoted), exactly as Hugging Face writes it (``patterns.py`` recognizes it as this call).

    >>> x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    >>> upcast_rms_norm(x, 0.0, torch.float32).tolist()
    [[0.8485281765460968, 1.1313709020614624]]
    """
    return x * torch.rsqrt(x.to(stat_dtype).pow(2).mean(-1, keepdim=True) + eps)


@torch.fx.wrap
def full_width_rms_norm(x: Tensor, kept: Tensor, fill: Tensor, eps: Optional[float],
                        stat_dtype: Optional[torch.dtype] = None) -> Tensor:
    """An RMSNorm (no weight) whose input lost channels that were constant, computed on the FULL-width
    input rebuilt from ``x`` (the kept channels, at positions ``kept``) and the constants (``fill``, the
    full width; entries at ``kept`` unused), then read at ``kept``: the original op on the original
    values, so the same result bit for bit. Used where the statistics run in a lower precision than the
    data (Llama's float32 upcast in a float64 model, T5's ``upcast_rms_norm``), in which a compensated
    statistic would differ from the original by that precision's rounding. ``stat_dtype`` None:
    ``F.rms_norm(full, (n,), None, eps)``; otherwise :func:`upcast_rms_norm`.

    >>> x = torch.tensor([[1.0, -2.0, 3.0]])  # channel 1 == -2 always
    >>> y = full_width_rms_norm(x[:, [0, 2]], torch.tensor([0, 2]), torch.tensor([0.0, -2.0, 0.0]), 1e-6)
    >>> torch.equal(y, torch.nn.functional.rms_norm(x, (3,), None, 1e-6)[:, [0, 2]])
    True
    """
    full = fill.to(x.dtype).expand(x.shape[:-1] + fill.shape).index_copy(-1, kept, x)
    if stat_dtype is None:
        y = torch.nn.functional.rms_norm(full, fill.shape, None, eps)
    else:
        y = upcast_rms_norm(full, eps, stat_dtype)
    return y.index_select(-1, kept)


@torch.fx.wrap
def compensated_group_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], group_index: Tensor,
                           group_size: int, removed_count: Tensor, removed_mean: Tensor, removed_m2: Tensor,
                           eps: float = 1e-5) -> Tensor:
    """GroupNorm over dim 1 of ``x`` (shape ``[B, K, *]``) with per-group compensation.

    ``group_index[i]`` is the group of kept channel i; each of the G groups had ``group_size``
    channels, of which ``removed_count[g]`` were removed with constants of mean
    ``removed_mean[g]`` and centred sum of squares ``removed_m2[g]``. Groups may keep different
    numbers of channels, so the sums are segment sums (``index_add``), not a reshape. A constant
    channel repeats its value at all M spatial positions, so its share scales with M.

    >>> x = torch.randn(2, 4, 3, dtype=torch.float64)
    >>> x[:, 2] = 5.0                                   # channel 2 (group 1) is constant
    >>> keep = torch.tensor([0, 1, 3])
    >>> y = compensated_group_norm(x[:, keep], None, None, keep // 2, 2, torch.tensor([0, 1]),
    ...                            torch.tensor([0.0, 5.0]), torch.zeros(2))
    >>> torch.allclose(y, torch.nn.functional.group_norm(x, 2)[:, keep])
    True
    """
    b, k = x.shape[0], x.shape[1]
    m = 1
    for s in x.shape[2:]:
        m *= s
    g = removed_count.shape[0]
    n = group_size * m
    ct = _compute_dtype(x)
    xf = x.reshape(b, k, m).to(ct)
    cnt = removed_count.to(ct)
    m_r = removed_mean.to(ct)
    zeros = torch.zeros(b, g, dtype=ct, device=x.device)
    g_sum = zeros.index_add(1, group_index, xf.sum(-1))
    mu = (g_sum + m * cnt * m_r) / n  # [B, G]
    d = xf - mu.index_select(1, group_index).unsqueeze(-1)
    g_ss = zeros.index_add(1, group_index, (d * d).sum(-1))
    var = (g_ss + m * (removed_m2.to(ct) + cnt * (m_r - mu) ** 2)) / n
    y = d * torch.rsqrt(var + eps).index_select(1, group_index).unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(ct).unsqueeze(-1)
    if bias is not None:
        y = y + bias.to(ct).unsqueeze(-1)
    return y.reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Construction (eager only, never scripted)

def removed_stats(values: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and centred sum of squares of ``values``, two-pass in float64 (no cancellation).

    >>> removed_stats(torch.tensor([100.0, 101.0, 102.0]))
    (tensor(101., dtype=torch.float64), tensor(2., dtype=torch.float64))
    """
    v = torch.as_tensor(values).detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        return v.new_zeros(()), v.new_zeros(())
    mean = v.mean()
    return mean, ((v - mean) ** 2).sum()


def _split_channels(keep: Tensor, removed_values: Tensor, n: Optional[int], what: str) -> Tuple[Tensor, Tensor, int]:
    """(kept indices in ``keep``'s order, removed indices ascending, N) from indices or a bool mask.

    Without a mask or a known width, N = |keep| + |removed_values|: one value per removed channel.
    """
    keep = torch.as_tensor(keep).detach().cpu().reshape(-1)
    n_removed = torch.as_tensor(removed_values).numel()
    if keep.dtype == torch.bool:
        if n is not None and keep.numel() != n:
            raise ValueError(f"{what}: keep mask has {keep.numel()} entries, the layer has {n} channels")
        n, kept = keep.numel(), keep.nonzero().reshape(-1)
    else:
        n, kept = (keep.numel() + n_removed if n is None else n), keep.long()
    kept = _check_kept(kept, n, what)
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    removed = mask.nonzero().reshape(-1)
    if n_removed != removed.numel():
        raise ValueError(f"{what}: {removed.numel()} channels are removed but {n_removed} removed_values "
                         "were given (one per removed channel, in increasing channel order)")
    return kept, removed, n


def _check_kept(kept: Tensor, n: int, what: str) -> Tensor:
    if kept.numel() == 0:
        raise ValueError(f"{what}: at least one channel must be kept (delete the whole layer instead)")
    if kept.unique().numel() != kept.numel() or kept.min() < 0 or kept.max() >= n:
        raise ValueError(f"{what}: kept channels must be distinct indices in [0, {n})")
    return kept


def _width(shape: Union[int, Sequence[int]], original_size: int, what: str) -> Tuple[int, int]:
    """(K, r) for a one-dim normalized_shape of K kept channels out of ``original_size``."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(dims) != 1:
        raise ValueError(f"{what}: only a one-dim normalized_shape (the last dim) is supported, got {dims}")
    if not 1 <= dims[0] <= original_size:
        raise ValueError(f"{what}: need 1 <= kept ({dims[0]}) <= original_size ({original_size})")
    return int(dims[0]), int(original_size) - int(dims[0])


def _kept_param(src: Optional[Tensor], kept: Tensor) -> Optional[nn.Parameter]:
    return None if src is None else nn.Parameter(src.detach()[kept.to(src.device)].clone())


def _new_param(fill: float, k: int, device: Optional[torch.device], dtype: Optional[torch.dtype]) -> nn.Parameter:
    return nn.Parameter(torch.full((k,), fill, device=device, dtype=dtype))


def _like(ref: Optional[Tensor], fallback: Tensor) -> dict:
    t = ref if ref is not None else torch.as_tensor(fallback)
    return {"device": t.device, "dtype": t.dtype if t.is_floating_point() else None}


def _stat(value: Union[float, Tensor], device: Optional[torch.device], dtype: Optional[torch.dtype]) -> Tensor:
    # Statistics never below float32 (see _CompensatedNorm._apply).
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return torch.as_tensor(value, dtype=torch.float64).to(device=device, dtype=dtype or torch.get_default_dtype())


# ---------------------------------------------------------------------------------------------
# Modules

class _CompensatedNorm(nn.Module):
    """Keeps the compensation statistics at float32 or wider through ``.half()``/``.bfloat16()``.

    The original layer saw the constants at full precision and reduced in float32; rounding m_R
    to 8 mantissa bits would move mu by up to 2^-9 |m_R| r / N, an error it never had.
    """

    _stat_buffers: Tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        saved = {k: self._buffers[k] for k in self._stat_buffers}
        super()._apply(fn, recurse)
        for k, old in saved.items():
            new = self._buffers[k]
            if old is not None and new is not None and new.dtype in (torch.float16, torch.bfloat16):
                self._buffers[k] = old.to(device=new.device, dtype=torch.float32)
        return self


class CompensatedLayerNorm(_CompensatedNorm):
    """``nn.LayerNorm`` over K kept channels of an original N, exact on the kept outputs.

    Buffers ``removed_mean`` (m_R) and ``removed_m2`` (sum_R (c_j - m_R)^2) hold what the
    ``r = N - K`` removed constant channels contribute to the statistics; they are saved in the
    state dict and never trained. ``weight``/``bias`` are the kept channels' affine parameters.

    >>> ln = nn.LayerNorm(4).double()
    >>> x = torch.randn(3, 4, dtype=torch.float64)
    >>> x[:, 1] = 2.5                                   # channel 1 is constant
    >>> keep = torch.tensor([0, 2, 3])
    >>> cln = CompensatedLayerNorm.from_layernorm(ln, keep, torch.tensor([2.5]))
    >>> cln
    CompensatedLayerNorm((3,), original_size=4, eps=1e-05, elementwise_affine=True)
    >>> torch.allclose(cln(x[:, keep]), ln(x)[:, keep])
    True
    """

    __constants__ = ["normalized_shape", "original_size", "num_removed", "eps", "elementwise_affine"]
    _stat_buffers = ("removed_mean", "removed_m2")
    normalized_shape: Tuple[int]
    original_size: int
    num_removed: int
    eps: float
    elementwise_affine: bool

    def __init__(self, normalized_shape: Union[int, Sequence[int]], original_size: int,
                 removed_mean: Union[float, Tensor] = 0.0, removed_m2: Union[float, Tensor] = 0.0,
                 eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        k, r = _width(normalized_shape, original_size, type(self).__name__)
        self.normalized_shape, self.original_size, self.num_removed = (k,), int(original_size), r
        self.eps, self.elementwise_affine = float(eps), elementwise_affine
        mean, m2 = float(removed_mean), float(removed_m2)
        if m2 < 0 or (r < 2 and m2 != 0) or (r == 0 and mean != 0):
            raise ValueError(f"{type(self).__name__}: removed_mean={mean}, removed_m2={m2} impossible "
                             f"for {r} removed channels")
        self.register_buffer("removed_mean", _stat(mean, device, dtype), persistent=True)
        self.register_buffer("removed_m2", _stat(m2, device, dtype), persistent=True)
        self.register_parameter("weight", _new_param(1.0, k, device, dtype) if elementwise_affine else None)
        self.register_parameter("bias", _new_param(0.0, k, device, dtype) if elementwise_affine and bias else None)

    @classmethod
    def from_layernorm(cls, ln: Union[nn.LayerNorm, Tuple[Optional[Tensor], Optional[Tensor], float]],
                       keep: Tensor, removed_values: Tensor) -> "CompensatedLayerNorm":
        """Replace ``ln`` (or ``(weight, bias, eps)`` of an ``F.layer_norm`` call) by its kept part.

        ``keep``: indices (output order) or a bool mask of the kept channels. ``removed_values``:
        the constant input of each removed channel, ascending channel order (order is irrelevant
        to LayerNorm, which only needs their mean and spread).
        """
        if isinstance(ln, nn.LayerNorm):
            n = _width(ln.normalized_shape, ln.normalized_shape[-1], cls.__name__)[0]
            weight, bias, eps = ln.weight, ln.bias, ln.eps
        else:
            weight, bias, eps = ln
            if weight is None and bias is not None:
                raise ValueError(f"{cls.__name__}: a bias without a weight is not a LayerNorm")
            n = None if weight is None else weight.numel()
        kept, _, n = _split_channels(keep, removed_values, n, cls.__name__)
        new = cls(kept.numel(), n, *removed_stats(removed_values), eps, weight is not None,
                  bias is not None, **_like(weight, removed_values))
        if weight is not None:
            new.weight, new.bias = _kept_param(weight, kept), _kept_param(bias, kept)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return compensated_layer_norm(x, self.weight, self.bias, self.original_size,
                                      self.removed_mean, self.removed_m2, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, original_size={self.original_size}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class CompensatedRMSNorm(_CompensatedNorm):
    """``nn.RMSNorm`` over K kept channels of N; buffer ``removed_sumsq = sum_R c_j^2``.

    >>> rms = nn.RMSNorm(3).double()
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> x[:, 0] = -4.0
    >>> crms = CompensatedRMSNorm.from_rmsnorm(rms, torch.tensor([1, 2]), torch.tensor([-4.0]))
    >>> crms
    CompensatedRMSNorm((2,), original_size=3, eps=None, elementwise_affine=True)
    >>> torch.allclose(crms(x[:, 1:]), rms(x)[:, 1:])
    True
    """

    __constants__ = ["normalized_shape", "original_size", "num_removed", "eps", "elementwise_affine"]
    _stat_buffers = ("removed_sumsq",)
    normalized_shape: Tuple[int]
    original_size: int
    num_removed: int
    eps: Optional[float]
    elementwise_affine: bool

    def __init__(self, normalized_shape: Union[int, Sequence[int]], original_size: int,
                 removed_sumsq: Union[float, Tensor] = 0.0, eps: Optional[float] = None,
                 elementwise_affine: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        k, r = _width(normalized_shape, original_size, type(self).__name__)
        self.normalized_shape, self.original_size, self.num_removed = (k,), int(original_size), r
        self.eps, self.elementwise_affine = eps, elementwise_affine
        s2 = float(removed_sumsq)
        if s2 < 0 or (r == 0 and s2 != 0):
            raise ValueError(f"{type(self).__name__}: removed_sumsq={s2} impossible for {r} removed channels")
        self.register_buffer("removed_sumsq", _stat(s2, device, dtype), persistent=True)
        self.register_parameter("weight", _new_param(1.0, k, device, dtype) if elementwise_affine else None)

    @classmethod
    def from_rmsnorm(cls, rms: Union[nn.RMSNorm, Tuple[Optional[Tensor], Optional[float]]],
                     keep: Tensor, removed_values: Tensor) -> "CompensatedRMSNorm":
        """Replace ``rms`` (or ``(weight, eps)``) by its kept part; arguments as in ``from_layernorm``."""
        if isinstance(rms, nn.RMSNorm):
            n = _width(rms.normalized_shape, rms.normalized_shape[-1], cls.__name__)[0]
            weight, eps = rms.weight, rms.eps
        else:
            weight, eps = rms
            n = None if weight is None else weight.numel()
        kept, _, n = _split_channels(keep, removed_values, n, cls.__name__)
        sumsq = (torch.as_tensor(removed_values).detach().to(torch.float64) ** 2).sum()
        new = cls(kept.numel(), n, sumsq, eps, weight is not None, **_like(weight, removed_values))
        if weight is not None:
            new.weight = _kept_param(weight, kept)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return compensated_rms_norm(x, self.weight, self.original_size, self.removed_sumsq, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, original_size={self.original_size}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class CompensatedGroupNorm(_CompensatedNorm):
    """``nn.GroupNorm`` over the kept channels (dim 1) of an original ``num_channels``.

    Every group had ``group_size = num_channels // num_groups`` channels; per group it keeps
    ``removed_count``, ``removed_mean`` and ``removed_m2`` of its removed constant channels, and
    ``group_index`` maps each kept channel to its group (groups may keep different numbers).

    >>> gn = nn.GroupNorm(2, 4).double()
    >>> x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    >>> x[:, 3] = 7.0
    >>> keep = torch.tensor([0, 1, 2])
    >>> cgn = CompensatedGroupNorm.from_groupnorm(gn, keep, torch.tensor([7.0]))
    >>> cgn
    CompensatedGroupNorm(2, 4, kept=3, eps=1e-05, affine=True)
    >>> torch.allclose(cgn(x[:, keep]), gn(x)[:, keep])
    True
    """

    __constants__ = ["num_groups", "num_channels", "group_size", "eps", "affine"]
    _stat_buffers = ("removed_mean", "removed_m2")
    num_groups: int
    num_channels: int
    group_size: int
    eps: float
    affine: bool

    def __init__(self, num_groups: int, num_channels: int, kept_channels: Union[Sequence[int], Tensor],
                 removed_mean: Optional[Tensor] = None, removed_m2: Optional[Tensor] = None,
                 eps: float = 1e-5, affine: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        name = type(self).__name__
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"{name}: num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels = int(num_groups), int(num_channels)
        self.group_size, self.eps, self.affine = self.num_channels // self.num_groups, float(eps), affine
        kept = _check_kept(torch.as_tensor(kept_channels).detach().cpu().long().reshape(-1), num_channels, name)
        group_index = kept // self.group_size
        count = self.group_size - torch.bincount(group_index, minlength=self.num_groups)
        zeros = torch.zeros(self.num_groups)
        mean = _stat(zeros if removed_mean is None else removed_mean, None, torch.float64).cpu()
        m2 = _stat(zeros if removed_m2 is None else removed_m2, None, torch.float64).cpu()
        if (mean.shape != (self.num_groups,) or m2.shape != (self.num_groups,) or (m2 < 0).any()
                or ((count < 2) & (m2 != 0)).any() or ((count == 0) & (mean != 0)).any()):
            raise ValueError(f"{name}: removed_mean/removed_m2 must have shape ({num_groups},) and fit "
                             f"the removed channels per group {count.tolist()}")
        self.register_buffer("group_index", group_index.to(device), persistent=True)
        self.register_buffer("removed_count", count.to(device), persistent=True)
        self.register_buffer("removed_mean", _stat(mean, device, dtype), persistent=True)
        self.register_buffer("removed_m2", _stat(m2, device, dtype), persistent=True)
        self.register_parameter("weight", _new_param(1.0, kept.numel(), device, dtype) if affine else None)
        self.register_parameter("bias", _new_param(0.0, kept.numel(), device, dtype) if affine else None)

    @classmethod
    def from_groupnorm(cls, gn: nn.GroupNorm, keep: Tensor, removed_values: Tensor) -> "CompensatedGroupNorm":
        """Replace ``gn`` by its kept part; ``removed_values`` in ascending channel order (it matters here)."""
        kept, removed, _ = _split_channels(keep, removed_values, gn.num_channels, cls.__name__)
        values = torch.as_tensor(removed_values).detach().reshape(-1).cpu()
        group = removed // (gn.num_channels // gn.num_groups)
        stats = [removed_stats(values[group == g]) for g in range(gn.num_groups)]
        new = cls(gn.num_groups, gn.num_channels, kept, torch.stack([s[0] for s in stats]),
                  torch.stack([s[1] for s in stats]), gn.eps, gn.affine, **_like(gn.weight, removed_values))
        if gn.affine:
            new.weight, new.bias = _kept_param(gn.weight, kept), _kept_param(gn.bias, kept)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return compensated_group_norm(x, self.weight, self.bias, self.group_index, self.group_size,
                                      self.removed_count, self.removed_mean, self.removed_m2, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, kept={self.group_index.numel()}, "
                f"eps={self.eps}, affine={self.affine}")
