"""The Squeeze-Release cycle: train -> prune -> (masked fine-tune) -> minimize -> release, N times.

Users bring their own training loop as two callbacks:

* ``train(model, epochs)`` -- or ``train(model, epochs, optimizer)`` when an ``optimizer`` factory
  is given. The model is a *new object with new parameters* after every minimize, so an optimizer
  must be built per call; with a factory, :class:`SqueezeRelease` builds a fresh one for every
  training phase (after every shape change and after every prune, whose zeros must not meet
  stale momentum).
* ``evaluate(model) -> float`` (accuracy, or any higher-is-better score).

One cycle ``k``:

1. ``train(model, epochs[k])`` -- every entry trains, the released ones included;
2. :func:`sqr_fx.prune` ``amount[k]`` of the non-zero weights (exact zeros), or as much as brings
   the prunable weights to ``target_sparsity[k]`` of the *dense* model's count (a cumulative
   schedule, as in iterative magnitude pruning; released entries count as non-zero);
3. optionally ``train(model, finetune_epochs[k])`` inside :func:`sqr_fx.prune.keep_zeros`;
4. ``minimize(model.eval(), example_inputs, portable=False)`` (exact: checked on the calibration batch;
   the sqr_fx helper forms are kept so that the next cycle can shrink them again, and the model
   ``run`` returns has them written out in torch ops: :func:`sqr_fx.portable.inline_helpers`);
5. ``evaluate`` -> one :class:`CycleRecord` of the *deployable* model: stored floats, ratio to the
   dense model, score, wall time;
6. :func:`sqr_fx.release` the zeros left inside the compacted tensors (not after the last cycle
   unless ``release_last``: the last minimized model is the deliverable).

With ``final_epochs > 0`` one more phase follows the last cycle: release the last deployable
model and train it for ``final_epochs`` without pruning (``final_train``, e.g. the loop without
its sparsity penalty; default ``train``), then minimize again. The zeros inside compacted tensors
are stored anyway, so training them costs no size; the phase is one more :class:`CycleRecord`
(``phase="final"``, ``amount=0``) and becomes the deliverable.

With ``target_ratio`` the run aims at a deployable size instead of a fixed number of cycles: in
the first cycle whose scheduled prune would take the minimized model to ``dense / target_ratio``
stored floats or fewer, the amount is bisected down to the smallest one that still gets there
(each probe prunes and minimizes a copy: :meth:`SqueezeRelease.amount_for_size`), and that
cycle is the last (the final phase, if any, follows). The deliverable then lands just under the
budget instead of overshooting it, the spare floats going to accuracy.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
>>> x = torch.randn(32, 4)
>>> sr = SqueezeRelease(lambda m, e: None, lambda m: 0.0, (x,), cycles=2, amount=0.7,
...                     progress=False)
>>> small, hist = sr.run(net)  # doctest: +SKIP
>>> hist.records[-1].stored_floats <= hist.dense_floats  # doctest: +SKIP
True
"""
from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .prune import amount_for_sparsity, keep_zeros, prunable_parameters, prune, weight_sparsity
from .release import release

__all__ = ["SqueezeRelease", "History", "CycleRecord", "squeeze_release"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class CycleRecord:
    """The deployable model after one cycle (pruned and minimized, before release)."""

    cycle: int
    amount: float
    stored_floats: int
    ratio: float
    accuracy: float
    sparsity: float  # exact zeros left inside the prunable weights (they are stored)
    input_features_dropped: int
    released: int
    release_change: float | None  # relative output change caused by release (calibration batch)
    release_agreement: float | None  # arg-max agreement before/after release
    wall_time: float  # seconds for this cycle
    total_time: float  # seconds since run() started
    nonzeros: int = 0  # non-zero prunable weights in the deployable model
    shapes: dict[str, list[int]] = field(default_factory=dict)  # prunable weights after minimize
    phase: str = "cycle"  # "cycle", or "final" (release + train without pruning, after the last cycle)


@dataclass
class History:
    """Per-cycle records plus optional baselines; saves as JSON and plots size vs accuracy.

    ``baselines`` maps a name to ``{"stored_floats": int, "accuracy": float, ...}``.
    """

    name: str
    dense_floats: int
    records: list[CycleRecord] = field(default_factory=list)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dense_floats": self.dense_floats,
                "records": [asdict(r) for r in self.records],
                "baselines": self.baselines, "config": self.config}

    def to_json(self, path: str | Path) -> Path:
        """Write the history as indented JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "History":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        """The inverse of :meth:`to_dict` (a deep copy: records are rebuilt)."""
        d = json.loads(json.dumps(d, default=str))
        return cls(d["name"], d["dense_floats"], [CycleRecord(**r) for r in d["records"]],
                   d.get("baselines", {}), d.get("config", {}))

    def best(self, min_accuracy: float) -> CycleRecord | None:
        """The smallest deployable model whose accuracy is at least ``min_accuracy``."""
        ok = [r for r in self.records if r.accuracy >= min_accuracy]
        return min(ok, key=lambda r: r.stored_floats) if ok else None

    def __str__(self) -> str:
        lines = [f"{self.name}: dense {self.dense_floats:,} stored floats",
                 f"{'cycle':>5} {'amount':>6} {'floats':>10} {'ratio':>8} {'acc':>7} {'nonzero':>8} "
                 f"{'in-drop':>7} {'rel.chg':>9} {'time s':>7}"]
        for r in self.records:
            chg = f"{r.release_change:.2e}" if r.release_change is not None else "-"
            label = f"{r.cycle}" + ("F" if r.phase == "final" else "")
            lines.append(f"{label:>5} {r.amount:>6.3f} {r.stored_floats:>10,} {r.ratio:>7.2f}x "
                         f"{r.accuracy:>7.4f} {r.nonzeros:>8,} {r.input_features_dropped:>7} "
                         f"{chg:>9} {r.total_time:>7.1f}")
        for name, b in self.baselines.items():
            lines.append(f"  baseline {name}: {b['stored_floats']:,} floats "
                         f"({self.dense_floats / b['stored_floats']:.2f}x), acc {b['accuracy']:.4f}")
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Save a PNG: accuracy vs deployable size (log scale) per cycle, with the baselines."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
        xs = [r.stored_floats for r in self.records]
        ys = [100 * r.accuracy for r in self.records]
        ax.plot(xs, ys, "o-", color="C0", label="Squeeze-Release (per cycle)")
        for r, x, y in zip(self.records, xs, ys):
            ax.annotate(str(r.cycle) + ("F" if r.phase == "final" else ""), (x, y),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        markers = iter("s^vDP*X")
        for i, (name, b) in enumerate(self.baselines.items()):
            ax.plot([b["stored_floats"]], [100 * b["accuracy"]], next(markers, "o"),
                    color=f"C{i + 1}", label=name, markersize=8)
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        sizes = xs + [b["stored_floats"] for b in self.baselines.values()]
        log = max(sizes) > 4 * min(sizes)  # a log axis only when the sizes span a real range
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        ax.set_xlabel("deployable size (stored floats" + (", log)" if log else ")"))
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        cycles = [r.cycle for r in self.records]
        bx.bar(cycles, [r.ratio for r in self.records], color="C0", alpha=0.6)
        bx.set_xlabel("cycle")
        bx.set_ylabel("compression vs dense (x)", color="C0")
        tx = bx.twinx()
        tx.plot(cycles, ys, "o-", color="C3")
        tx.set_ylabel("accuracy (%)", color="C3")
        fig.suptitle(title or self.name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _per_cycle(value: Any, cycles: int, what: str) -> list:
    if isinstance(value, (int, float)):
        return [value] * cycles
    values = list(value)
    if len(values) != cycles:
        raise ValueError(f"{what}: {len(values)} values for {cycles} cycles")
    return values


class SqueezeRelease:
    """Runs the cycle; see the module docstring. ``run(model)`` returns ``(model, History)``.

    Arguments (per-cycle ones take a number or one value per cycle):

    * ``example_inputs``: tuple of inputs for ``minimize`` (moved to the CPU for it);
    * ``amount``: fraction of the non-zero prunable weights pruned in each cycle;
    * ``target_sparsity``: instead of ``amount``, the fraction of the dense model's prunable
      weights that must be zero after each cycle's prune (cumulative; needs increasing values
      for the model to keep shrinking, since release makes the compacted tensors dense again);
    * ``epochs`` / ``finetune_epochs``: free training before pruning / masked training after;
    * ``release_scale``, ``release_reference``: the calibration of :func:`sqr_fx.release`;
    * ``calibration``: input tuple to measure release's output change and check minimize's
      exactness on (defaults to ``example_inputs``); ``verify``: do that check;
    * ``optimizer``: optional factory ``params -> Optimizer``, see the module docstring;
    * ``exclude``: parameter names never pruned or released (e.g. a classifier head);
    * ``final_epochs`` / ``final_train``: the final release-and-train phase (module docstring);
    * ``target_ratio``: stop at this compression ratio, landing just under the size budget
      (module docstring); ``None``: run every cycle as scheduled.
    """

    def __init__(self, train: Callable[..., Any], evaluate: Callable[[nn.Module], float],
                 example_inputs: tuple, *, cycles: int = 3,
                 amount: float | Sequence[float] = 0.8, scope: str = "global",
                 target_sparsity: float | Sequence[float] | None = None,
                 epochs: int | Sequence[int] = 1, finetune_epochs: int | Sequence[int] = 0,
                 release_scale: float = 0.1, release_reference: str = "energy",
                 calibration: tuple | None = None, optimizer: OptimizerFactory | None = None,
                 exclude: Sequence[str] = (), release_last: bool = False, verify: bool = True,
                 rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0, progress: bool = True,
                 name: str = "squeeze-release", final_epochs: int = 0,
                 final_train: Callable[..., Any] | None = None,
                 target_ratio: float | None = None) -> None:
        self.train_fn, self.evaluate_fn = train, evaluate
        self.example_inputs = tuple(example_inputs)
        self.calibration = tuple(calibration) if calibration is not None else self.example_inputs
        self.cycles = cycles
        self.amount = _per_cycle(amount, cycles, "amount")
        self.target_sparsity = (None if target_sparsity is None
                                else _per_cycle(target_sparsity, cycles, "target_sparsity"))
        self.epochs = _per_cycle(epochs, cycles, "epochs")
        self.finetune_epochs = _per_cycle(finetune_epochs, cycles, "finetune_epochs")
        self.scope, self.exclude = scope, tuple(exclude)
        self.release_scale, self.release_reference = release_scale, release_reference
        self.optimizer, self.release_last, self.verify = optimizer, release_last, verify
        self.rtol, self.atol = rtol, atol
        self.seed, self.progress, self.name = seed, progress, name
        self.final_epochs, self.final_train = int(final_epochs), final_train
        if target_ratio is not None and not target_ratio > 1.0:
            raise ValueError(f"target_ratio must be > 1 (a compression ratio), got {target_ratio!r}")
        self.target_ratio = target_ratio

    def config(self) -> dict[str, Any]:
        """The settings that shape the run, for the history file."""
        return {"cycles": self.cycles, "amount": self.amount, "target_sparsity": self.target_sparsity,
                "scope": self.scope,
                "epochs": self.epochs, "finetune_epochs": self.finetune_epochs,
                "release_scale": self.release_scale, "release_reference": self.release_reference,
                "exclude": list(self.exclude), "release_last": self.release_last, "seed": self.seed,
                "final_epochs": self.final_epochs, "target_ratio": self.target_ratio}

    # -- steps -------------------------------------------------------------------------------
    def _train(self, model: nn.Module, epochs: int, fn: Callable[..., Any] | None = None) -> None:
        if epochs <= 0:
            return
        fn = fn or self.train_fn
        model.train()
        if self.optimizer is None:
            fn(model, epochs)
        else:
            fn(model, epochs, self.optimizer(model.parameters()))

    def _amount(self, model: nn.Module, k: int, dense_prunable: int) -> float:
        """``amount[k]``, or the fraction of the current non-zeros that meets ``target_sparsity[k]``."""
        if self.target_sparsity is None:
            return float(self.amount[k])
        nonzero = sum(int((p != 0).sum()) for n, p in prunable_parameters(model).items()
                      if n not in self.exclude)
        return amount_for_sparsity(nonzero, self.target_sparsity[k], dense_prunable)

    def amount_for_size(self, model: nn.Module, amount: float, max_floats: int,
                        iterations: int = 12) -> tuple[float, int]:
        """The smallest prune amount in ``[0, amount]`` whose minimized model stores at most
        ``max_floats`` floats, by bisection (``iterations`` probes, each prunes and minimizes a
        copy on the CPU; ``model`` is not changed). Returns ``(amount, floats)``; ``(amount,
        floats at amount)`` unchanged when even ``amount`` leaves more than ``max_floats``.
        Cost: one probe at ``amount``, plus ``iterations`` when the budget is within reach."""
        from .minimize import minimize
        from .size import count_stored_floats

        xs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in self.example_inputs)
        base = copy.deepcopy(model).eval().cpu()  # one copy (on the model's device), then CPU copies

        def floats(a: float) -> int:
            probe = copy.deepcopy(base)
            prune(probe, a, self.scope, weights=self._weights(probe))
            return count_stored_floats(minimize(probe, xs, portable=False))

        hi, size_hi = amount, floats(amount)
        if size_hi > max_floats:
            return hi, size_hi
        lo = 0.0  # invariant: floats(hi) <= max_floats; floats(lo) > max_floats (or lo = 0)
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            size = floats(mid)
            if size <= max_floats:
                hi, size_hi = mid, size
            else:
                lo = mid
        return hi, size_hi

    def _weights(self, model: nn.Module) -> list[str]:
        return [n for n in prunable_parameters(model) if n not in self.exclude]

    def _minimize(self, model: nn.Module) -> nn.Module:
        from .minimize import minimize  # the core pass; imported late: this module loads alone

        device = next(model.parameters()).device
        cpu = lambda xs: tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in xs)  # noqa: E731
        model = model.eval().cpu()
        # portable=False: the next cycle minimizes this result again, and its rules recognize sqr_fx's
        # compensated norms and attention forms, not their torch-op inlining (docs/design.md)
        small = minimize(model, cpu(self.example_inputs), portable=False)
        if self.verify:
            from .equivalence import check_equivalence

            check_equivalence(model, small, cpu(self.calibration), rtol=self.rtol, atol=self.atol)
        return small.to(device)

    def _inputs_on(self, model: nn.Module, xs: tuple) -> tuple:
        device = next(model.parameters()).device
        return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in xs)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, model: nn.Module) -> tuple[nn.Module, History]:
        """Run all cycles on ``model`` (trained in place during cycle 1, then replaced by the
        minimized GraphModules) and return the last deployable model and the history."""
        from tqdm.auto import tqdm

        from .size import count_stored_floats

        history = History(self.name, count_stored_floats(model), config=self.config())
        dense_prunable = sum(p.numel() for n, p in prunable_parameters(model).items() if n not in self.exclude)
        gen = torch.Generator().manual_seed(self.seed)
        start = time.perf_counter()
        bar = tqdm(range(self.cycles), desc=self.name, disable=not self.progress, unit="cycle")
        for k in bar:
            t0 = time.perf_counter()
            self._train(model, self.epochs[k])
            amount = self._amount(model, k, dense_prunable)
            reached = False
            if self.target_ratio is not None:
                budget = int(history.dense_floats / self.target_ratio)
                amount, size = self.amount_for_size(model, amount, budget)
                reached = size <= budget
            last = reached or k + 1 == self.cycles
            prune(model, amount, self.scope, weights=self._weights(model))
            if self.finetune_epochs[k] > 0:
                with keep_zeros(model, self._weights(model)):
                    self._train(model, self.finetune_epochs[k])
            model = self._minimize(model)
            rec = self._record(model, history, k + 1, amount)
            if not last or self.release_last or self.final_epochs > 0:
                self._release(model, gen, rec)
            rec.wall_time = time.perf_counter() - t0
            rec.total_time = time.perf_counter() - start
            history.records.append(rec)
            bar.set_postfix(floats=rec.stored_floats, ratio=f"{rec.ratio:.1f}x", acc=f"{rec.accuracy:.4f}")
            if last:
                break
        bar.close()
        if self.target_ratio is not None and history.records[-1].ratio < self.target_ratio:
            warnings.warn(f"target_ratio {self.target_ratio:g} not reached: {history.records[-1].ratio:.2f}x "
                          f"after {len(history.records)} cycles; schedule more cycles or higher "
                          f"target_sparsity/amount", stacklevel=2)
        if self.final_epochs > 0:  # release (above) + train without pruning: zeros inside cost no size
            t0 = time.perf_counter()
            self._train(model, self.final_epochs, self.final_train)
            model = self._minimize(model)
            rec = self._record(model, history, len(history.records) + 1, 0.0, phase="final")
            rec.wall_time = time.perf_counter() - t0
            rec.total_time = time.perf_counter() - start
            history.records.append(rec)
        from .portable import inline_helpers

        inline_helpers(model)  # the deliverable: torch ops only (saves and loads without sqr_fx)
        return model, history

    def _record(self, model: nn.Module, history: History, cycle: int, amount: float,
                phase: str = "cycle") -> CycleRecord:
        from .size import count_stored_floats

        report = getattr(model, "sqr_report", None)
        size = count_stored_floats(model)
        weights = {n: p for n, p in prunable_parameters(model).items() if n not in self.exclude}
        return CycleRecord(
            cycle=cycle, amount=amount, stored_floats=size, ratio=history.dense_floats / max(size, 1),
            accuracy=float(self.evaluate_fn(model)), sparsity=weight_sparsity(model, weights),
            input_features_dropped=int(getattr(report, "input_features_dropped", 0)),
            released=0, release_change=None, release_agreement=None, wall_time=0.0, total_time=0.0,
            nonzeros=sum(int((p != 0).sum()) for p in weights.values()),
            shapes={n: list(p.shape) for n, p in weights.items()}, phase=phase)

    def _release(self, model: nn.Module, gen: torch.Generator, rec: CycleRecord) -> None:
        rel = release(model, self.release_scale, generator=gen, reference=self.release_reference,
                      weights=self._weights(model), calibration=self._inputs_on(model, self.calibration))
        rec.released, rec.release_change, rec.release_agreement = rel.released, rel.output_change, rel.agreement


def squeeze_release(model: nn.Module, train: Callable[..., Any],
                    evaluate: Callable[[nn.Module], float], example_inputs: tuple,
                    **kwargs: Any) -> tuple[nn.Module, History]:
    """Functional form: ``SqueezeRelease(train, evaluate, example_inputs, **kwargs).run(model)``.

    ``model`` is deep-copied first, so the caller's model is left as it was.
    """
    return SqueezeRelease(train, evaluate, example_inputs, **kwargs).run(copy.deepcopy(model))
