"""Latency of minimized models, with and without latency-aware widths (``minimize(..., align=N)``).

Per model (torchvision, random weights, no downloads; the benchmark workload: trained-looking norm
statistics, mask ``d25+m70`` by default, see ``benchmarks/workload.py``): the masked dense model, its
minimized form (``minimize``), and the aligned ones (``minimize(..., align=N)``, N in ``--align``: 8 and
16). Reported:

* **FLOP ratio**: masked dense / result (``torch.utils.flop_counter``, batch 1, 224 px);
* **speedup** at batch 1 and batch ``--batch`` (16): masked dense latency / result latency. One thread
  (``--threads``; with one thread and a batch under 16, torch runs unstrided 1x1 convs with its own GEMM
  path, not oneDNN: batch 16 shows the oneDNN kernels), CPU seconds of each forward (``time.process_time``:
  load from other processes on a shared machine does not count), warm-up runs first, then ``--repeats``
  rounds in which every variant runs once (interleaved); the speedup is the median over the rounds of
  each round's ratio (paired, so a load change between rounds cancels; the ratio of the medians is kept
  in the JSON too);
* **size ratio**: stored floats, masked dense / result; the **alignment's cost**: stored floats of the
  aligned result over the unaligned one (and ``report.align_floats``, the pass's own one-step estimate);
* **odd widths**: weight dims (out / in channels) that are not a multiple of 8 (16);
* **ones-map corrections**: a constant channel folded into a zero-padded conv needs ``+ conv(ones, K)``
  (exact at the borders); their count, and the CPU time of the corrections alone (each ``ones -> conv ->
  add`` at its traced shapes) as a share of the minimized forward;
* **folded-bias adds**: a constant folded into a layer without bias is added after the restored module
  (``sqr_fx_<layer>_folded_bias``), one more pass over its output: their count and CPU time alone, as a
  share of the minimized forward;
* **exactness**: max relative output error against the masked model on fresh batch-2 inputs.

Prints a table and writes ``benchmarks/results/latency.json``.

    python -m benchmarks.latency [--models resnet50 vit_b_16] [--align 8 16] [--batch 16] [--repeats 15]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import fx, nn

import sqr_fx
from benchmarks.measure import flops, output_error, stored_floats
from benchmarks.pass_speed import _code_version
from benchmarks.workload import MASKS, STANDARD_MASK, build_model, make_inputs, masked_model

RESULTS = Path(__file__).parent / "results" / "latency.json"
MODELS = ["resnet50", "mobilenet_v2", "convnext_tiny", "vit_b_16"]
LABELS = {"resnet50": "ResNet-50", "mobilenet_v2": "MobileNet v2", "convnext_tiny": "ConvNeXt-T",
          "vit_b_16": "ViT-B/16"}


def corrections(gm: fx.GraphModule) -> int:
    return sum(len(u.users) for n in gm.graph.nodes if n.target is torch.ones for u in n.users)


def odd_widths(model: nn.Module, n: int) -> int:
    """Weight dims (output channels, input channels; a grouped conv's per-group input excluded) that are
    not a multiple of ``n``."""
    odd = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or isinstance(mod, (nn.Embedding,)):
            continue
        odd += w.shape[0] % n != 0
        if getattr(mod, "groups", 1) == 1:
            odd += w.shape[1] % n != 0
    for name, w in model.named_parameters():  # nn.MultiheadAttention's in_proj (a bare parameter)
        if name.endswith("in_proj_weight"):
            odd += w.shape[0] % n != 0
    return odd


@torch.inference_mode()
def cpu_latencies(models: dict[str, Callable], x: torch.Tensor, repeats: int, warmup: int) -> dict[str, dict]:
    """Per model: median and min CPU seconds of one forward on ``x``, interleaved rounds."""
    for _ in range(warmup):
        for m in models.values():
            m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.process_time()
            m(x)
            times[k].append(time.process_time() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "runs_s": v} for k, v in times.items()}


def _cpu(fn):
    gc.collect()
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def correction_seconds(gm: fx.GraphModule, x: torch.Tensor, repeats: int) -> tuple[float, int]:
    """CPU seconds of ``gm``'s ones-map corrections alone on ``x`` (each ``out + conv(ones, K)`` at its traced
    shapes, ``out`` a stand-in tensor), median of ``repeats`` after one warm-up; and their count."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = copy.deepcopy(gm)
    with torch.inference_mode():
        ShapeProp(gm).propagate(x)
    items = []
    for ones in [n for n in gm.graph.nodes if n.target is torch.ones]:
        for conv in ones.users:
            for add in conv.users:
                if add.target is torch.add and add.args[1] is conv:
                    kern = gm.get_buffer(conv.args[1].target)
                    items.append((tuple(ones.meta["tensor_meta"].shape), conv.target, kern, conv.args[3:7],
                                  torch.randn(add.args[0].meta["tensor_meta"].shape)))

    @torch.inference_mode()
    def run() -> None:
        for shape, fn, kern, rest, out in items:
            torch.add(out, fn(torch.ones(shape), kern, None, *rest))

    return _median_cpu(run, repeats), len(items)


def _median_cpu(run, repeats: int) -> float:
    """Median CPU seconds of ``run()`` over ``repeats`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        run()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def folded_bias_seconds(gm: fx.GraphModule, x: torch.Tensor, repeats: int) -> tuple[float, int]:
    """CPU seconds of ``gm``'s folded-bias adds alone on ``x``: a constant folded into a layer that had no
    bias and is not a restored Linear/Conv (those take it as their ``bias`` buffer now) is a buffer
    ``sqr_fx_<layer>_folded_bias`` added after the module (``sqr_fx.portable``), one more pass over the
    layer's output; median of ``repeats`` after one warm-up; and their count (0 on the CNNs measured since
    the folds became conv biases)."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = copy.deepcopy(gm)
    with torch.inference_mode():
        ShapeProp(gm).propagate(x)
    items = [(torch.randn(n.args[0].meta["tensor_meta"].shape), gm.get_buffer(n.args[1].target))
             for n in gm.graph.nodes if n.target is torch.add and len(n.args) == 2
             and getattr(n.args[1], "op", None) == "get_attr" and "folded_bias" in n.args[1].target]

    @torch.inference_mode()
    def run() -> None:
        for out, bias in items:
            torch.add(out, bias)

    return _median_cpu(run, repeats), len(items)


def measure(name: str, mask: str, aligns: list[int], batch: int, repeats: int, warmup: int) -> dict:
    masked = masked_model(build_model(name), MASKS[mask])
    inputs = make_inputs(name)
    x1 = inputs["example"]
    xb = torch.randn(batch, *x1.shape[1:], generator=torch.Generator().manual_seed(7))
    pass_s, results = {}, {}
    pass_s["minimized"], results["minimized"] = _cpu(lambda: sqr_fx.minimize(masked, (x1,), verify=False))
    for n in aligns:
        pass_s[f"aligned{n}"], results[f"aligned{n}"] = _cpu(
            lambda: sqr_fx.minimize(masked, (x1,), verify=False, align=n))
    variants = {"masked": masked, **results}
    row: dict = {"model": name, "mask": mask, "aligns": aligns, "pass_cpu_s": pass_s,
                 "error": {k: output_error(masked, m, inputs["eval"]) for k, m in results.items()},
                 "stored_floats": {k: stored_floats(m) for k, m in variants.items()},
                 "align_floats_estimate": {k: m.sqr_report.align_floats for k, m in results.items()
                                           if k != "minimized"},
                 "flops": {k: flops(m, x1) for k, m in variants.items()},
                 "odd_widths": {k: {f"mod{n}": odd_widths(m, n) for n in (8, 16)} for k, m in variants.items()},
                 "ones_map_corrections": {k: corrections(m) for k, m in results.items()}}
    row["latency"] = {"batch1": cpu_latencies(variants, x1, repeats, warmup),
                      f"batch{batch}": cpu_latencies(variants, xb, max(repeats // 2, 3), 1)}
    if row["ones_map_corrections"]["minimized"]:
        row["correction_cpu_s"] = {b: correction_seconds(results["minimized"], xx, repeats)[0]
                                   for b, xx in (("batch1", x1), (f"batch{batch}", xb))}
    row["folded_bias_adds"] = folded_bias_seconds(results["minimized"], x1, 1)[1]
    if row["folded_bias_adds"]:
        row["folded_bias_cpu_s"] = {b: folded_bias_seconds(results["minimized"], xx, repeats)[0]
                                    for b, xx in (("batch1", x1), (f"batch{batch}", xb))}
    return row


def summarize(row: dict) -> dict:
    """Per result: the ratios the table shows (masked dense / result: above 1 is smaller / faster)."""
    f, s = row["flops"], row["stored_floats"]
    out = {}
    for k in row["error"]:
        out[k] = {"flop_ratio": f["masked"] / f[k], "size_ratio": s["masked"] / s[k],
                  "size_cost": s[k] / s["minimized"] - 1}
        for b, lat in row["latency"].items():
            # paired: the ratio within each round (both ran back to back), median over the rounds
            out[k][f"speedup_{b}"] = statistics.median(
                m / r for m, r in zip(lat["masked"]["runs_s"], lat[k]["runs_s"]))
            out[k][f"speedup_{b}_of_medians"] = lat["masked"]["median_s"] / lat[k]["median_s"]
    for b, t in row.get("correction_cpu_s", {}).items():  # the corrections' share of the minimized forward
        out["minimized"][f"correction_share_{b}"] = t / row["latency"][b]["minimized"]["median_s"]
    for b, t in row.get("folded_bias_cpu_s", {}).items():  # the folded-bias adds' share
        out["minimized"][f"folded_bias_share_{b}"] = t / row["latency"][b]["minimized"]["median_s"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--mask", default=STANDARD_MASK, choices=sorted(MASKS))
    p.add_argument("--align", type=int, nargs="+", default=[8, 16])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds at batch 1 (half at --batch)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    b = f"batch{args.batch}"
    print(f"{'model':<13} {'result':<10} {'FLOPs':>6} {'bs1':>6} {b:>7} {'size':>6} {'size cost':>9} "
          f"{'odd 8/16':>8} {'ones-map':>8} {'max err':>8}", flush=True)
    for name in args.models:
        row = measure(name, args.mask, args.align, args.batch, args.repeats, args.warmup)
        row["summary"] = sm = summarize(row)
        rows.append(row)
        for k, v in sm.items():
            odd = row["odd_widths"][k]
            print(f"{LABELS.get(name, name):<13} {k:<10} {v['flop_ratio']:>5.2f}x {v['speedup_batch1']:>5.2f}x "
                  f"{v['speedup_' + b]:>6.2f}x {v['size_ratio']:>5.2f}x {100 * v['size_cost']:>+8.1f}% "
                  f"{odd['mod8']:>3}/{odd['mod16']:<4} {row['ones_map_corrections'][k]:>8} "
                  f"{row['error'][k]:>8.1e}", flush=True)
        m = sm["minimized"]
        if "correction_share_batch1" in m:
            print(f"{'':<13} ones-map corrections: {100 * m['correction_share_batch1']:.2f} % of the minimized "
                  f"forward at batch 1, {100 * m['correction_share_' + b]:.2f} % at {b}", flush=True)
        if "folded_bias_share_batch1" in m:
            print(f"{'':<13} {row['folded_bias_adds']} folded-bias adds: {100 * m['folded_bias_share_batch1']:.2f} % "
                  f"of the minimized forward at batch 1, {100 * m['folded_bias_share_' + b]:.2f} % at {b}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "masked dense / result ratios (above 1: smaller, faster); see benchmarks/latency.py",
        "timing": f"time.process_time per forward, {args.threads} thread(s), {args.warmup} warm-up round(s), "
                  f"{args.repeats} interleaved rounds at batch 1 and {max(args.repeats // 2, 3)} at batch "
                  f"{args.batch}; speedups: median over rounds of the per-round ratio",
        "workload": f"torchvision, random weights, mask {args.mask}, 224 px, traced at batch 1",
        "sqr_fx": _code_version(), "torch": torch.__version__, "threads": args.threads,
        "mkldnn": torch.backends.mkldnn.is_available(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
