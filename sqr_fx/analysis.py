"""Channel analysis: values forward, coupling groups, liveness backward -> a removal plan.

One forward sweep applies each node's rule (``rules.lookup``): the rule returns the
node's :class:`ChanInfo`, couples channel ids that must share a fate (residual add,
BatchNorm, grouped conv), records weighted reads (``read``) and freezes channels it
cannot follow (``freeze``). Then :meth:`Analysis.plan` decides, per coupling group:

* **unused**: no kept reader reads any member with a non-zero weight -> delete;
* **constant**: every member position is ``const`` -> fold into readers, delete;
* otherwise, or when frozen (graph outputs, ops without a rule) -> keep.

Post-plan steps only keep more: no tensor loses every channel, head-split tensors stay rectangular,
and with ``align=N`` every width the plan reduces is padded back, with the cheapest removable groups,
to a multiple of N (or to its width before the round): see :meth:`Analysis._align_widths`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Optional

import numpy as np
import torch
from torch import fx

from .coupling import Groups
from .errors import SqrFxError, UnsupportedOpError
from .rules import lookup
from .rules.registry import UNNORMALIZED, has_hooks
from .trace import OTHER_SHAPES, OtherSizes, fetch_attr, record_other_shapes, shared_ties, tied_targets
from .values import GROUP_AWARE, META_KEY, ChanInfo, shape_of

__all__ = ["Analysis", "Plan"]


@dataclass
class Plan:
    """What to delete: ``removed[root]`` per channel-group root, with the reason per root."""

    root_of: np.ndarray
    removed: np.ndarray
    unused: np.ndarray
    frozen_nodes: list[str] = field(default_factory=list)
    local_changes: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)  # nodes outside their rule's preconditions, with why
    align: int = 1  # the width multiple the plan keeps (``minimize(..., align=N)``); rules read it too
    unaligned: Optional[np.ndarray] = None  # ``removed`` before the alignment step (None: align 1)

    @property
    def aligned(self) -> np.ndarray:
        """Roots the plan keeps only to align widths (removable, kept back)."""
        if self.unaligned is None:
            return np.zeros_like(self.removed)
        return self.unaligned & ~self.removed

    def removed_at(self, info: Optional[ChanInfo]) -> np.ndarray:
        """Bool mask of removed positions of ``info`` (all False for an untracked tensor)."""
        if info is None:
            return np.zeros(0, bool)
        return self.removed[self.root_of[info.ids]]

    def keep(self, info: ChanInfo) -> np.ndarray:
        return ~self.removed_at(info)

    @property
    def any(self) -> bool:
        """Something to rewrite: channel groups to remove, or an op that shrinks inside itself."""
        return bool(self.removed.any()) or bool(self.local_changes)


def _read_cols(nz: Optional[np.ndarray], live_rows: np.ndarray, n: int) -> np.ndarray:
    """Input positions read by the live output rows (``nz`` None: every row reads every position; an
    integer ``nz``: output row o reads input position ``nz[o]`` alone, a gather)."""
    if nz is None:
        return np.full(n, bool(live_rows.any()))
    if nz.dtype.kind == "i":
        cols = np.zeros(n, bool)
        cols[nz[live_rows]] = True
        return cols
    return nz[live_rows].any(0)


class Analysis:
    """State shared by the rules during the forward sweep (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, strict: bool = False, drop_inputs: bool = True,
                 example_inputs: Optional[tuple | OtherSizes] = None, align: int = 1, gqa_heads: str = "gather"):
        self.gm, self.strict, self.drop_inputs = gm, strict, drop_inputs
        self.example_inputs = example_inputs
        self.align = max(int(align or 1), 1)
        self.gqa_heads = gqa_heads  # "groups": the copies of a kv head share its ids (q heads go in whole groups)
        self.weighted: list[tuple[fx.Node, str, Any]] = []  # (node, family, args) of weight-reading ops
        self.groups = Groups()
        self.edges: list[tuple[ChanInfo, np.ndarray, Optional[np.ndarray]]] = []
        self.local: list[str] = []
        self.unknown: list[str] = []
        self.declined: list[str] = []
        self._rule = ""
        self.head_links: list[list[ChanInfo]] = []
        self.kernel_ids: set[int] = set()  # head dims an attention kernel pads at run time (align_heads)
        self.uniform: list[ChanInfo] = []  # head-split infos whose kept heads keep the same dims
        self.copies: list[tuple[ChanInfo, ChanInfo, np.ndarray]] = []  # (copied heads, source, source position)
        self.pending: dict[fx.Node, Any] = {}  # facts a rule leaves for a later node (attention's q, k)
        self.owed: dict[fx.Node, ChanInfo] = {}  # infos a later node's rule must take over; frozen if it does not
        self._hidden: set[fx.Node] = set()
        self._probe_cache: dict[str, Any] = {}
        # tied tensors: ``shared`` ones are sliced once for all readers (``_couple_shared``), the
        # others (``tied``) are opaque to the rules and kept whole
        self.shared = shared_ties(gm)
        self.tied = {k: v for k, v in tied_targets(gm).items() if k not in self.shared}

    # ---- queries used by rules -------------------------------------------------------------
    def info(self, a: Any) -> Optional[ChanInfo]:
        """``a``'s channel info; None when untracked, or head-split and the current rule is not
        head-aware (that info is then frozen: see :meth:`run`)."""
        if not isinstance(a, fx.Node) or a in self._hidden:
            return None
        return a.meta.get(META_KEY)

    shape = staticmethod(shape_of)

    def other_shapes(self, node: fx.Node) -> Optional[list]:
        """``node``'s shapes at the other input sizes the graph accepts (``trace.OTHER_SHAPES``; each
        None for a non-tensor), recorded on the first call of a round that needs them; None when no
        example inputs were given (a rule then treats the traced sizes as the only ones it knows)."""
        if OTHER_SHAPES not in node.meta:
            if self.example_inputs is None:
                return None
            record_other_shapes(self.gm, self.example_inputs)
        return node.meta[OTHER_SHAPES]

    def tensor(self, a: Any) -> Optional[torch.Tensor]:
        """The constant tensor behind a ``get_attr`` node (None for anything computed, and for a
        tied tensor: slicing it for one reader would change the others, so rules treat it as opaque)."""
        if isinstance(a, fx.Node) and a.op == "get_attr" and a.target not in self.tied:
            t = fetch_attr(self.gm, a.target)
            return t.detach() if isinstance(t, torch.Tensor) else None
        return None

    def module(self, node: fx.Node) -> torch.nn.Module:
        return self.gm.get_submodule(node.target)

    # ---- facts recorded by rules -----------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        return self.groups.fresh(n)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        self.groups.union(a, b)

    def decline(self, node: fx.Node, reason: str, *items: Any) -> None:
        """``node`` is outside its rule's preconditions (``reason`` names the failed one): keep every
        channel of ``items`` (default: all its arguments); ``strict=True`` raises naming both."""
        msg = f"node {node.format_node()} is outside rule {self._rule!r}'s preconditions: {reason}"
        if self.strict:
            raise UnsupportedOpError(msg + " (pass strict=False to keep its channels)")
        self.declined.append(f"{node.name}: {reason}")
        self.freeze(*(items or (list(node.args), dict(node.kwargs))))

    def freeze(self, *items: Any) -> None:
        """Keep every channel of the given infos / nodes (nested lists allowed)."""
        for it in items:
            if isinstance(it, ChanInfo):
                self.groups.freeze(it.ids)
            elif isinstance(it, fx.Node):
                if it.meta.get(META_KEY) is not None:
                    self.groups.freeze(it.meta[META_KEY].ids)
            elif isinstance(it, (list, tuple)):
                self.freeze(*it)
            elif isinstance(it, dict):
                self.freeze(*it.values())

    def attach(self, param: Any, dim: int, ids: np.ndarray) -> None:
        """A per-channel ``get_attr`` tensor joins the group ``ids`` along ``dim``: sliced with it."""
        t = self.tensor(param)
        if t is not None:
            n = len(ids)
            param.meta[META_KEY] = ChanInfo(dim, ids, np.ones(n, bool), np.zeros(n))

    def read(self, src: ChanInfo, out_ids: np.ndarray, nz: np.ndarray) -> None:
        """A weighted op reads ``src``; ``nz[o, i]``: output position o reads input position i."""
        self.edges.append((src, out_ids, np.asarray(nz, bool)))

    def need_const(self, src: ChanInfo, out_ids: np.ndarray) -> None:
        """A statistic over the channel axis (LayerNorm's mean and variance) reads ``src`` for every
        output position ``out_ids``: while any output is live, a channel may leave it only when its
        value there is a known constant, which the rewrite compensates. An unread output reads nothing."""
        self.edges.append((src, out_ids, None))

    def keep_whole_heads(self, src: ChanInfo) -> None:
        """An op mixes the dims of each head of ``src`` (a norm over the per-head axis, a per-dim weight
        shared by all heads): while any output position of head h is live, every position of head h is
        read and kept, constant or not (nothing compensates inside the head); a head with no live output
        reads nothing and may go whole. One dense read per head (``need_const`` on a dynamic view)."""
        D = len(src) // src.heads
        for h in range(src.heads):
            ids = src.ids[h * D:(h + 1) * D]
            self.need_const(ChanInfo.dynamic(src.dim, ids), ids)

    def copy_heads(self, src: ChanInfo, sources: np.ndarray, head: int, dim: int) -> ChanInfo:
        """Heads copied from a head-split ``src``: head ``t`` of the result (head axis ``head``, per-head
        axis ``dim``) holds head ``sources[t]`` of ``src``. Grouped-query attention repeats each kv head
        for its r q heads (Hugging Face's ``repeat_kv``, sdpa's ``enable_gqa``: ``sources = arange(H) // r``);
        a gather of whole heads (``index_select`` on the head axis) copies the heads it names.

        Each copy gets ids of its own, so a q head (with the copy of k and v it reads) can go alone
        while its kv head stays for the other q heads of the group. A live copy position reads its
        source position (a gather edge: the source stays while a kept copy reads it); the plan keeps
        each live copy's dims equal to its source's kept dims (``_keep_copies_even``), so the rewrite
        is a gather of whole heads (``index_select`` on the head axis). With
        ``minimize(..., gqa_heads="groups")`` the copies share their source's ids instead."""
        D = len(src) // src.heads
        pos = (np.asarray(sources, np.int64)[:, None] * D + np.arange(D)[None, :]).reshape(-1)
        groups = self.gqa_heads == "groups"  # one fate for a kv head and all its copies: the repeat stays uniform
        ids = src.ids[pos] if groups else self.fresh(len(pos))
        out = ChanInfo(dim, ids, src.const[pos], src.value[pos], head=head, heads=len(sources))
        if groups:
            return out
        self.edges.append((ChanInfo.dynamic(src.dim, src.ids), ids, pos))
        self.copies.append((out, src, pos))
        return out

    def align_heads(self, *infos: ChanInfo) -> None:
        """Head-split infos whose heads pair up (attention's q, k, v): the same heads must stay."""
        self.head_links.append(list(infos))

    def kernel_heads(self, *infos: ChanInfo) -> None:
        """Head-split infos read by an attention kernel that pads their per-head dims at run time for
        ``align`` (``padded_sdpa``): :meth:`_align_widths` keeps no removable dims for them."""
        self.kernel_ids.update(int(i) for info in infos for i in np.unique(info.ids))

    def uniform_heads(self, info: ChanInfo) -> None:
        """Every kept head of ``info`` keeps the same dims (a slice of the per-head axis, rewritten as one
        ``index_select`` for all heads, needs the same new positions in every head)."""
        self.uniform.append(info)

    def local_change(self, node: fx.Node) -> None:
        """``node`` can shrink inside itself (attention heads) even if no channel group goes."""
        self.local.append(node.name)

    def evaluate(self, node: fx.Node, replace: dict[fx.Node, Any]) -> Optional[torch.Tensor]:
        """Run ``node``'s own op on probe values (float64): the op's meaning is its value rule.

        ``replace`` maps argument nodes to probes; other ``get_attr`` args are fetched. Returns
        None when some argument is neither (a computed tensor): the caller must treat it dynamic.
        """

        def sub(a: Any) -> Any:
            if a in replace:
                return replace[a]
            t = self.tensor(a)
            if t is None:
                raise LookupError
            return t.double() if t.is_floating_point() else t

        try:
            args = fx.node.map_aggregate(node.args, lambda a: sub(a) if isinstance(a, fx.Node) else a)
            kwargs = fx.node.map_aggregate(node.kwargs, lambda a: sub(a) if isinstance(a, fx.Node) else a)
            with torch.no_grad():
                if node.op == "call_function":
                    out = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    out = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    out = self._probe_module(node)(*args, **kwargs)
        except LookupError:
            return None
        return out if isinstance(out, torch.Tensor) else None

    def _probe_module(self, node: fx.Node) -> torch.nn.Module:
        if node.target not in self._probe_cache:
            import copy

            mod = self.module(node)
            stateless = next(iter(chain(mod.parameters(), mod.buffers(), mod.children())), None) is None
            # a module with no tensors and no children converts nothing: a shallow copy takes .eval()
            self._probe_cache[node.target] = (copy.copy(mod) if stateless else copy.deepcopy(mod)).double().eval()
        return self._probe_cache[node.target]

    # ---- the sweep ---------------------------------------------------------------------------
    def run(self) -> "Analysis":
        for node in self.gm.graph.nodes:
            found = lookup(node, self.gm)
            if found is None:
                why = ("its arguments bind to no single schema layout" if node.meta.get(UNNORMALIZED) else
                       "the module has forward hooks" if node.op == "call_module" and has_hooks(self.module(node))
                       else "no sqr_fx rule")
                if self.strict:
                    raise UnsupportedOpError(
                        f"{why} for node {node.format_node()} (target {node.target!r}); "
                        "add one in sqr_fx/rules/ or pass strict=False to keep its channels"
                    )
                self.unknown.append(node.name)
                self.freeze(list(node.args), dict(node.kwargs))
                out = None
            else:
                r, args = found
                self._rule = r.family
                if not r.heads:  # head-split channels reach only head-aware rules; others freeze them
                    self._hidden = {a for a in node.all_input_nodes
                                    if a.meta.get(META_KEY) is not None and a.meta[META_KEY].split}
                    self.freeze(list(self._hidden))
                if r.family not in GROUP_AWARE:  # a three-factor split (fused qkv) reaches only layout rules
                    self._hidden |= {a for a in node.all_input_nodes
                                     if a.meta.get(META_KEY) is not None and a.meta[META_KEY].group is not None}
                    self.freeze(list(self._hidden))
                if r.family in _ALIGNED_FAMILIES:
                    self.weighted.append((node, r.family, args))
                try:
                    out = r.analyze(node, self, args)
                except SqrFxError:
                    raise  # raised on purpose (strict mode): already names the node
                except Exception as e:  # noqa: BLE001 - a rule outside its preconditions: keep the channels
                    msg = f"rule {r.family!r} failed on node {node.format_node()}: {type(e).__name__}: {e}"
                    if self.strict:
                        raise SqrFxError(msg) from e
                    self.unknown.append(f"{node.name} ({msg})")
                    self.freeze(list(node.args), dict(node.kwargs))
                    out = None
                finally:
                    self._hidden = set()
            if out is not None and self._mutates_shared_input(node):
                # x.relu_() with x read elsewhere: x's recorded values are stale after the op
                self.freeze(out, node.args[0])
            node.meta[META_KEY] = out
        self.freeze(list(self.owed.values()))  # (a reader that failed or had no rule never took them over)
        self._couple_shared()
        return self

    def _couple_shared(self) -> None:
        """One tied tensor read by embeddings (columns = output channels) and linears (columns = input
        channels): couple every reader's channel ids on axis 1, so one keep mask slices it for all.
        A linear reader's output rows (axis 0) are frozen; a reader the analysis did not follow
        (no info) keeps the tensor whole: every other reader's channels on that axis are frozen."""
        readers: dict[tuple[str, ...], list[Optional[np.ndarray]]] = {}
        for node in self.gm.graph.nodes:
            if node.op != "get_attr" or node.target not in self.shared:
                continue
            cols = readers.setdefault(tuple(self.shared[node.target]), [])
            width = fetch_attr(self.gm, node.target).shape[1]
            for user in node.users:
                out = user.meta.get(META_KEY)
                found = lookup(user, self.gm)
                if found is not None and found[0].family == "linear":
                    self.freeze(out)
                    x = found[1]["input"]
                    src, s = x.meta.get(META_KEY) if isinstance(x, fx.Node) else None, self.shape(x)
                    ok = (out is not None and src is not None and s is not None and src.dim == len(s) - 1
                          and not src.split)
                    out = src if ok else None
                cols.append(out.ids if out is not None and len(out) == width else None)
        for cols in readers.values():
            known = [c for c in cols if c is not None]
            if len(known) < len(cols):
                self.freeze(*[ChanInfo.dynamic(0, c) for c in known])
            for c in known[1:]:
                self.union(known[0], c)

    def _mutates_shared_input(self, node: fx.Node) -> bool:
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or len(x.users) <= 1:
            return False
        if node.op == "call_method":
            return node.target.endswith("_")
        if node.op == "call_module":
            return bool(getattr(self.module(node), "inplace", False))
        name = getattr(node.target, "__name__", "")
        return name.startswith("__i") or name.endswith("_") or bool(node.kwargs.get("inplace", False))

    def plan(self) -> Plan:
        """Decide per group. A group may go when nothing needs it: not frozen, and every kept reader
        either reads it with zero weight or reads a constant there (which that reader folds)."""
        root_of, frozen = self.groups.resolve()
        n = len(root_of)
        present = np.zeros(n, bool)  # roots that some tensor of the graph actually carries
        for node in self.gm.graph.nodes:
            i = node.meta.get(META_KEY)
            if i is not None:
                present[root_of[i.ids]] = True
        used = frozen.copy()
        seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # edge -> (live rows, columns they read)

        def read_cols(k: int, live_rows: np.ndarray) -> np.ndarray:
            src, _, nz = self.edges[k]
            if k not in seen or not np.array_equal(seen[k][0], live_rows):  # same rows read the same columns
                seen[k] = (live_rows, _read_cols(nz, live_rows, len(src)))
            return seen[k][1]

        changed = True
        while changed:  # backward liveness over weighted reads, to a fixpoint (the least one: any order)
            changed = False
            for k in reversed(range(len(self.edges))):  # readers first: a chain settles in one sweep
                src, out_ids, _ = self.edges[k]
                live_rows = used[root_of[out_ids]]
                if not live_rows.any():
                    continue
                read_roots = root_of[src.ids[read_cols(k, live_rows)]]
                if not used[read_roots].all():
                    used[read_roots] = True
                    changed = True
        read_dynamic = frozen.copy()
        gathers = []
        for k, (src, out_ids, nz) in enumerate(self.edges):
            if nz is not None and nz.dtype.kind == "i":
                gathers.append(k)
                continue
            live_rows = used[root_of[out_ids]]
            if live_rows.any():
                read_dynamic[root_of[src.ids[read_cols(k, live_rows) & ~src.const]]] = True
        changed = bool(gathers)
        while changed:  # a copy (``copy_heads``) needs its source only where the copy itself is kept
            changed = False
            for k in gathers:
                src, out_ids, nz = self.edges[k]
                need = root_of[src.ids[nz[read_dynamic[root_of[out_ids]]]]]
                if not read_dynamic[need].all():
                    read_dynamic[need] = True
                    changed = True
        removed = present & ~read_dynamic
        while (self._keep_one_channel(removed, root_of) | self._keep_heads_rectangular(removed, root_of)
               | self._keep_copies_even(removed, root_of)):
            pass  # each step only keeps more, so this ends
        unaligned = None
        if self.align > 1 and removed.any():
            unaligned = removed.copy()
            kernel = self._padded_ids()
            cost, widths = self._root_costs(root_of), self._widths(kernel)
            while (self._align_widths(removed, root_of, cost, widths, kernel) | self._keep_one_channel(removed, root_of)
                   | self._keep_heads_rectangular(removed, root_of) | self._keep_copies_even(removed, root_of)):
                pass  # only keeps more: ends aligned, or with every width as it was
        return Plan(root_of, removed, ~used, list(self.unknown), list(self.local), list(self.declined),
                    align=self.align, unaligned=unaligned)

    # Keeping a removable group is always exact: a constant one is simply not folded, an unused one
    # is read by no kept reader whatever it holds. The steps below only ever keep more.
    def _keep_one_channel(self, removed: np.ndarray, root_of: np.ndarray) -> bool:
        """No tensor loses every channel (torch ops reject zero-width inputs): keep its first group.

        Tensors are visited in the order of the data flow, the graph's own tensors (``get_attr``) last: they share
        their groups with the activations they meet, and where a graph places them is not part of its function
        (a result traced again has them elsewhere). So a rewritten graph makes the same choices again: the
        first kept group of each tensor is the one chosen before, and the result is a fixpoint."""
        changed = False
        nodes = self.gm.graph.nodes
        for node in chain((n for n in nodes if n.op != "get_attr"), (n for n in nodes if n.op == "get_attr")):
            i = node.meta.get(META_KEY)
            if i is not None and len(i) and removed[root_of[i.ids]].all():
                removed[root_of[i.ids[0]]] = False
                changed = True
        return changed

    def _keep_copies_even(self, removed: np.ndarray, root_of: np.ndarray) -> bool:
        """A kept copy of a kv head (``copy_heads``) keeps exactly its source's kept dims: a kept copy
        position keeps its source position, and a live copy keeps every dim its source keeps."""
        changed = False
        for out, src, pos in self.copies:
            gone_out, gone_src = removed[root_of[out.ids]], removed[root_of[src.ids[pos]]]
            alive = np.repeat(~out.per_head(gone_out).all(1), len(out) // out.heads)
            fix_src = ~gone_out & gone_src
            fix_out = alive & gone_out & ~gone_src
            if fix_src.any():
                removed[root_of[src.ids[pos[fix_src]]]] = False
                changed = True
            if fix_out.any():
                removed[root_of[out.ids[fix_out]]] = False
                changed = True
        return changed

    def _keep_heads_rectangular(self, removed: np.ndarray, root_of: np.ndarray) -> bool:
        """A head-split tensor stays [.., H', D', ..]: every kept head keeps the same number of
        positions, and paired tensors (``align_heads``) keep the same heads. Laid out (dim, head)
        in memory (a transposed merge follows), the i-th kept dim of every head lands together:
        there the kept positions must form a full grid of kept heads x kept dims."""
        changed = False

        def keep_first(info: ChanInfo, h: int) -> None:
            nonlocal changed
            ids = info.per_head(info.ids)[h]
            gone = np.flatnonzero(removed[root_of[ids]])
            if not len(gone):  # kept meanwhile by a head sharing its ids (grouped kv heads)
                return
            removed[root_of[ids[gone[0]]]] = False
            changed = True

        for infos in self.head_links:
            alive = np.logical_or.reduce([~i.per_head(removed[root_of[i.ids]]).all(1) for i in infos])
            for i in infos:
                for h in np.flatnonzero(alive & i.per_head(removed[root_of[i.ids]]).all(1)):
                    keep_first(i, h)
        for i in self.uniform:  # every kept head keeps the union of the dims kept heads keep
            kept = ~i.per_head(removed[root_of[i.ids]])
            alive = kept.any(1)
            fix = alive[:, None] & kept[alive].any(0)[None, :] & ~kept
            if fix.any():
                removed[root_of[i.per_head(i.ids)[fix]]] = False
                changed = True
        for node in self.gm.graph.nodes:
            i = node.meta.get(META_KEY)
            if i is None or not i.split:
                continue
            if i.head > i.dim:  # memory order (dim, head) (channel shuffle): kept = heads x dims grid
                gone = i.per_head(removed[root_of[i.ids]])
                grid = (~gone).any(1)[:, None] & (~gone).any(0)[None, :] & gone
                if grid.any():
                    removed[root_of[i.per_head(i.ids)[grid]]] = False
                    changed = True
            while True:
                kept = (~i.per_head(removed[root_of[i.ids]])).sum(1)
                short = np.flatnonzero((kept > 0) & (kept < kept.max()))
                if not len(short):
                    break
                keep_first(i, short[0])
        return changed

    # ---- align=N: latency-aware widths -----------------------------------------------------------
    def _widths(self, kernel: np.ndarray) -> list[ChanInfo]:
        """The tensor axes whose width sets a kernel's cost: every weight-reading op's output channels and
        the input channels it reads (Linear / conv / addmm / attention projections; an embedding's output
        channels), and every head-split tensor (its per-head dim: see :meth:`_align_widths`); but none whose ids
        are all in ``kernel`` (:meth:`_padded_ids`: padded at run time instead)."""
        from .rules.weighted import READS

        split = [i for n in self.gm.graph.nodes if (i := n.meta.get(META_KEY)) is not None and i.split]
        # the same positions before the head split (a q/k/v projection's output, the merged heads an output
        # projection reads) follow their per-head dims: H' x D' is aligned when D' is
        heads = {np.unique(i.ids).tobytes() for i in split}  # (a repeated kv head: its ids once)
        # dims an attention kernel pads at run time (``kernel``: ``padded_sdpa``) are not aligned in storage
        split = [i for i in split if not np.isin(i.ids, kernel).all()]
        out: list[ChanInfo] = []
        for node, family, a in self.weighted:
            info = node.meta.get(META_KEY)
            if info is None:
                continue
            src = (node.meta.get(READS) if family in ("linear", "conv", "addmm") else
                   None if family == "embedding" else self.info(a.get("input")))
            out += [i for i in (info, src) if i is not None and not i.split and np.unique(i.ids).tobytes() not in heads
                    and not np.isin(i.ids, kernel).all()]
        return split + out

    def _padded_ids(self) -> np.ndarray:
        """The ids :meth:`kernel_heads` recorded, and those of the heads their copies were made from (grouped kv
        heads read through ``enable_gqa`` or ``repeat_kv``): a kv head whose every copy is padded at run time
        needs no stored alignment either."""
        ids = set(self.kernel_ids)
        grown = True
        while grown:
            grown = False
            for copy, src, _ in self.copies:
                if not set(np.unique(src.ids).tolist()) <= ids and set(np.unique(copy.ids).tolist()) <= ids:
                    ids.update(np.unique(src.ids).tolist())
                    grown = True
        return np.fromiter(ids, dtype=np.int64, count=len(ids))

    def _root_costs(self, root_of: np.ndarray) -> np.ndarray:
        """Stored floats that keeping each group costs (weights, biases, attached per-channel tensors):
        the alignment keeps the cheapest groups first."""
        from .rules.weighted import READS

        cost = np.zeros(len(root_of))

        def add(info: Optional[ChanInfo], per: float) -> None:
            if info is not None and len(info):
                np.add.at(cost, root_of[info.ids], per)

        def numel(a: Any) -> int:
            t = self.tensor(a)
            return t.numel() if t is not None else 0

        for node, family, a in self.weighted:
            info = node.meta.get(META_KEY)
            if info is None:
                continue
            if family in ("linear", "conv", "addmm"):
                w = self.tensor(a["weight"])
                if w is None:
                    continue
                if family == "addmm":
                    w = w.t()
                rows = w.shape[0]
                add(info, w[0].numel() + (1 if a.get("bias") is not None else 0))
                if family != "conv" or int(a.get("groups", 1)) == 1:
                    add(node.meta.get(READS), rows * w[0, 0].numel())
            elif family in ("attention", "window_attention"):
                # the projections read every input channel; the output rows read every value dim
                names = [n for n in a.names if n.endswith("weight")]
                total = sum(numel(a.get(n)) for n in names)
                src = self.info(a.get("input"))
                if src is not None and not src.split:
                    add(src, (total - numel(a.get(names[-1]))) / max(len(src), 1))
                add(info, numel(a.get(names[-1])) / max(len(info), 1) + 1)
        for node in self.gm.graph.nodes:
            i = node.meta.get(META_KEY)
            if node.op == "get_attr" and i is not None and len(i):
                add(i, numel(node) / len(i))
        return cost

    def _align_widths(self, removed: np.ndarray, root_of: np.ndarray, cost: np.ndarray,
                      widths: list[ChanInfo], kernel: np.ndarray) -> bool:
        """Every reduced width a multiple of ``align``: keep back the cheapest removed groups of each
        width that is not (a width the plan leaves whole stays as it is; one that cannot reach a multiple
        ends whole). A head-split tensor aligns its per-head dim: each kept head keeps the same count
        (rectangular); its heads may go, and one read by an sdpa kernel is padded at run time instead
        (``kernel_heads``). An attention written with matmuls whose query/key and value heads
        were equally wide keeps them equally wide. Keeping a group changes every tensor it spans: the caller repeats
        this with the other steps until nothing changes."""
        n_align = self.align
        changed = False

        def keep_cheapest(ids: np.ndarray, gone: np.ndarray, kept: int, target: int) -> None:
            nonlocal changed
            roots = root_of[ids[gone]]
            uniq, first, counts = np.unique(roots, return_index=True, return_counts=True)
            for j in np.lexsort((first, cost[uniq])):  # cheapest first, then by position
                if kept >= target:
                    break
                removed[uniq[j]] = False
                kept += int(counts[j])
                changed = True

        for info in widths:
            gone = removed[root_of[info.ids]]
            if not gone.any():
                continue
            if not info.split:
                n, kept = len(info), int((~gone).sum())
                if kept % n_align:
                    keep_cheapest(info.ids, gone, kept, min(-(-kept // n_align) * n_align, n))
                continue
            gone, ids = info.per_head(gone), info.per_head(info.ids)
            kept = (~gone).sum(1)
            alive = np.flatnonzero(kept > 0)
            if not len(alive):
                continue
            target = min(-(-int(kept.max()) // n_align) * n_align, gone.shape[1])
            for h in alive:
                if kept[h] < target:
                    keep_cheapest(ids[h], gone[h], int(kept[h]), target)
                    gone = info.per_head(removed[root_of[info.ids]])  # (a group may span several heads)
                    kept = (~gone).sum(1)
        # attention whose query/key and value heads were equally wide keeps them equally wide: torch's
        # fused CPU attention kernel needs one head dim for q, k and v (else a 3-4x slower path)
        for infos in self.head_links:
            if len(infos) != 3 or len({i.per_head(i.ids).shape for i in infos}) != 1 \
                    or np.isin(infos[0].ids, kernel).all():
                continue
            gone = [i.per_head(removed[root_of[i.ids]]) for i in infos]
            alive = np.flatnonzero(np.logical_or.reduce([~g.all(1) for g in gone]))
            if not len(alive):
                continue
            target = max(int((~g[alive]).sum(1).max()) for g in gone)
            for i, g in zip(infos, gone):
                ids = i.per_head(i.ids)
                for h in alive:
                    kept = int((~i.per_head(removed[root_of[i.ids]])[h]).sum())
                    if kept < target:
                        keep_cheapest(ids[h], i.per_head(removed[root_of[i.ids]])[h], kept, target)
        return changed


#: the rule families whose channel widths the alignment looks at (weight-reading ops)
_ALIGNED_FAMILIES = ("linear", "conv", "addmm", "attention", "window_attention", "embedding")
