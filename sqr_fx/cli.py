"""Command line: ``python -m sqr_fx minimize in.pt2 -o out.pt2``, ``python -m sqr_fx squeeze-release
--recipe mnist-fc`` and ``python -m sqr_fx demo``.

``minimize`` reads a saved ``torch.export`` program (or, with ``--module``, a ``torch.save``d
``nn.Module`` driven by ``--input-shape``), minimizes and verifies it, prints the per-layer report
and writes the smaller program with ``torch.export.save`` (loadable without sqr_fx); ``--onnx``
also writes ONNX. Exit status 0 on success, 1 with a one-line reason on failure.

``squeeze-release`` runs a recipe end to end (see :mod:`sqr_fx.recipes`) and writes
``<out>/<recipe>.json`` (the per-cycle history) and ``<out>/<recipe>.png`` (size vs accuracy).

>>> main(["squeeze-release", "--recipe", "digits-fc", "--out", "/tmp/sqr", "--no-progress"])  # doctest: +SKIP
0
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def _ratio(text: str) -> float:
    value = float(text)
    if not value > 1.0:
        raise argparse.ArgumentTypeError(f"a compression ratio above 1 (e.g. 39), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with the ``squeeze-release`` and ``demo`` subcommands."""
    from .recipes import RECIPES

    parser = argparse.ArgumentParser(prog="python -m sqr_fx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sr = sub.add_parser("squeeze-release", help="run a Squeeze-Release recipe end to end")
    sr.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    sr.add_argument("--out", default="sqr_results", help="output folder (default: %(default)s)")
    sr.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    sr.add_argument("--cycles", type=int, help="number of cycles (schedules cut or extended)")
    sr.add_argument("--epochs", type=int, help="free-training epochs per cycle (overrides the schedule)")
    sr.add_argument("--finetune-epochs", type=int, help="masked fine-tuning epochs per cycle")
    sr.add_argument("--amount", type=float,
                    help="prune this fraction of the non-zeros every cycle (replaces the sparsity schedule)")
    sr.add_argument("--scope", choices=("global", "layer"))
    sr.add_argument("--release-scale", type=float, help="release noise scale (see sqr_fx.release)")
    sr.add_argument("--release-reference", choices=("energy", "threshold", "rms"),
                    help="release calibration (default: energy)")
    sr.add_argument("--group-lasso", type=float, help="row/column group-lasso weight in the training loop")
    sr.add_argument("--target-sparsity", type=lambda v: [float(c) for c in v.split(",") if c],
                    help="cumulative sparsity schedule, one value per cycle (e.g. 0.7,0.85,0.95)")
    sr.add_argument("--final-epochs", type=int, help="epochs of the final release-and-train phase")
    sr.add_argument("--target-ratio", type=_ratio,
                    help="stop at this compression ratio, pruning just enough in the last cycle to reach it")
    sr.add_argument("--seed", type=int)
    sr.add_argument("--arch", choices=("small", "tiny"), help="fashion-convnext: ConvNeXt size")
    sr.add_argument("--limit-train", type=int, help="use only the first N training samples")
    sr.add_argument("--baselines", action="store_true",
                    help="also train the dense and iterative-magnitude-pruning baselines")
    sr.add_argument("--threads", type=int, help="torch.set_num_threads")
    sr.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("demo", help="minimize a pruned model and print the report")
    mz = sub.add_parser("minimize", help="minimize a saved torch.export program (.pt2) or torch.save'd module")
    mz.add_argument("input", help="a torch.export.save'd program (.pt2), or a torch.save'd nn.Module with --module")
    mz.add_argument("-o", "--output", required=True, help="where to torch.export.save the smaller program")
    mz.add_argument("--onnx", help="also write the smaller program as ONNX here (needs the onnx package)")
    mz.add_argument("--module", action="store_true", help="the input is a torch.save'd nn.Module (needs --input-shape)")
    mz.add_argument("--input-shape", action="append", type=lambda v: tuple(int(c) for c in v.split(",")),
                    help="example input shape for --module, e.g. 1,3,224,224 (repeat for several inputs)")
    mz.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16"),
                    help="dtype of the --input-shape examples (default: %(default)s)")
    mz.add_argument("--strict", action="store_true", help="fail on an op without a rule instead of keeping it")
    mz.add_argument("--no-verify", action="store_true", help="skip the self-check against the input")
    mz.add_argument("--align", type=_positive, metavar="N",
                    help="latency-aware widths: keep every reduced width a multiple of N (e.g. 8 or 16) "
                         "by keeping the cheapest removable channels")
    mz.add_argument("--gqa-heads", choices=("gather", "groups"), default="gather",
                    help="grouped-query attention: q heads go one by one, their kv heads gathered "
                         "(default), or only in whole kv groups")
    mz.add_argument("--quiet", action="store_true", help="no per-layer report")
    return parser


def _squeeze_release(args: argparse.Namespace) -> int:
    import torch

    from .recipes import get_recipe, run_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    overrides = {"cycles": args.cycles, "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
                 "amount": args.amount, "scope": args.scope, "release_scale": args.release_scale,
                 "release_reference": args.release_reference, "group_lasso": args.group_lasso,
                 "seed": args.seed, "target_ratio": args.target_ratio,
                 "target_sparsity": args.target_sparsity, "final_epochs": args.final_epochs}
    if args.target_sparsity and args.cycles is None:  # one cycle per schedule value
        overrides["cycles"] = len(args.target_sparsity)
    if args.recipe == "fashion-convnext":
        overrides.update(arch=args.arch or "small", limit_train=args.limit_train)
    elif args.arch or args.limit_train:
        print("error: --arch/--limit-train apply to fashion-convnext only", file=sys.stderr)
        return 2
    recipe = get_recipe(args.recipe, **{k: v for k, v in overrides.items() if v is not None})
    _, history = run_recipe(recipe, args.out, device=args.device, progress=not args.no_progress,
                            baselines=("dense", "imp") if args.baselines else ())
    print(history)
    print(f"wrote {args.out}/{recipe.name}.json and {args.out}/{recipe.name}.png")
    return 0


def _step(text: str) -> None:
    print(f"[sqr_fx] {text}", file=sys.stderr, flush=True)


def _minimize(args: argparse.Namespace) -> int:
    import torch

    from . import minimize
    from .errors import SqrFxError

    try:
        if not os.path.exists(args.input):
            raise OSError(f"no such file: {args.input}")
        if args.module:
            if not args.input_shape:
                raise SqrFxError("--module needs --input-shape (e.g. --input-shape 1,3,224,224)")
            _step(f"loading module {args.input}")
            model = torch.load(args.input, weights_only=False, map_location="cpu")
            if not isinstance(model, torch.nn.Module):
                raise SqrFxError(f"{args.input} holds a {type(model).__name__}, not an nn.Module")
            dtype = getattr(torch, args.dtype)
            inputs = tuple(torch.randn(s, dtype=dtype) for s in args.input_shape)
            model = model.eval()
        else:
            _step(f"loading program {args.input}")
            model, inputs = torch.export.load(args.input), None
        _step("minimizing" + ("" if args.no_verify else " and verifying"))
        small = minimize(model, inputs, strict=args.strict, verify=not args.no_verify, align=args.align,
                         gqa_heads=args.gqa_heads)
        report = small.sqr_report
        if args.module:
            _step("exporting the result")
            auto = torch.export.Dim.AUTO
            small = torch.export.export(small, inputs, dynamic_shapes=tuple({d: auto for d in range(x.dim())}
                                                                            for x in inputs))
        _step(f"saving {args.output}")
        torch.export.save(small, args.output)
        if args.onnx:
            _step(f"writing ONNX {args.onnx}")
            torch.onnx.export(small, (), args.onnx, dynamo=True)
    except (SqrFxError, OSError, RuntimeError, ImportError, ValueError) as e:
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(report)
    print(f"{args.input} -> {args.output}: stored floats {report.floats_before:,} -> {report.floats_after:,} "
          f"({report.ratio:.2f}x smaller)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sqr_fx`` and the ``sqr-fx`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from . import demo  # written with the core; imported only when asked for

        result = demo.main()
        return int(result) if isinstance(result, int) else 0
    if args.command == "minimize":
        return _minimize(args)
    return _squeeze_release(args)
