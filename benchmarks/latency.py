"""Latency of minimized models, with and without latency-aware widths (``minimize(..., align=N)``).

Per model (torchvision, random weights, no downloads; the benchmark workload: trained-looking norm
statistics, mask ``d25+m70`` by default, see ``benchmarks/workload.py``): the masked dense model, its
minimized form (``minimize``), and the aligned one (``minimize(..., align=8)``). Reported:

* **FLOP ratio**: masked dense / result (``torch.utils.flop_counter``, batch 1, 224 px);
* **speedup** at batch 1 and batch ``--batch`` (8): masked dense latency / result latency. One thread
  (``--threads``), CPU seconds of each forward (``time.process_time``: load from other processes on a
  shared machine does not count), warm-up runs first, then ``--repeats`` rounds in which every variant
  runs once (interleaved), medians;
* **size ratio**: stored floats, masked dense / result; the **alignment's cost**: stored floats of the
  aligned result over the unaligned one (and ``report.align_floats``, the pass's own one-step estimate);
* **odd widths**: weight dims (out / in channels) that are not a multiple of 8 (16);
* **ones-map corrections**: a constant channel folded into a zero-padded conv needs ``+ conv(ones, K)``
  (exact at the borders); their count, and the latency of the unaligned result with every correction
  cut out (NOT exact: it only measures what the corrections cost);
* **exactness**: max relative output error against the masked model on fresh batch-2 inputs.

Prints a table and writes ``benchmarks/results/latency.json``.

    python -m benchmarks.latency [--models resnet50 vit_b_16] [--align 8] [--batch 8] [--repeats 15]
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


def strip_corrections(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` without its ones-map corrections (``out + conv(ones, K)`` -> ``out``): not exact,
    only for timing what they cost. Returns (copy, number of corrections cut)."""
    gm = copy.deepcopy(gm)
    cut = 0
    for ones in [n for n in gm.graph.nodes if n.target is torch.ones]:
        for conv in list(ones.users):
            for add in list(conv.users):
                if add.target in (torch.add, torch.Tensor.add) and len(add.args) == 2 and add.args[1] is conv:
                    add.replace_all_uses_with(add.args[0])
                    gm.graph.erase_node(add)
                    cut += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, cut


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
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "runs": len(v)} for k, v in times.items()}


def _cpu(fn):
    gc.collect()
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def measure(name: str, mask: str, align: int, batch: int, repeats: int, warmup: int) -> dict:
    masked = masked_model(build_model(name), MASKS[mask])
    inputs = make_inputs(name)
    x1 = inputs["example"]
    t_plain, plain = _cpu(lambda: sqr_fx.minimize(masked, (x1,), verify=False))
    t_aligned, aligned = _cpu(lambda: sqr_fx.minimize(masked, (x1,), verify=False, align=align))
    variants = {"masked": masked, "minimized": plain, f"aligned{align}": aligned}
    n_corr = corrections(plain)
    if n_corr:
        variants["minimized_no_corrections"], _ = strip_corrections(plain)
    row: dict = {"model": name, "mask": mask, "align": align,
                 "pass_cpu_s": {"minimized": t_plain, f"aligned{align}": t_aligned},
                 "error": {k: output_error(masked, m, inputs["eval"]) for k, m in variants.items()
                           if k in ("minimized", f"aligned{align}")},
                 "stored_floats": {k: stored_floats(m) for k, m in variants.items() if k != "minimized_no_corrections"},
                 "align_floats_estimate": aligned.sqr_report.align_floats,
                 "flops": {k: flops(m, x1) for k, m in variants.items() if k != "minimized_no_corrections"},
                 "odd_widths": {f"{k}_mod{n}": odd_widths(m, n) for k, m in variants.items()
                                if k in ("minimized", f"aligned{align}") for n in (8, 16)},
                 "ones_map_corrections": {"minimized": n_corr, f"aligned{align}": corrections(aligned)}}
    xb = torch.randn(batch, *x1.shape[1:], generator=torch.Generator().manual_seed(7))
    row["latency"] = {"batch1": cpu_latencies(variants, x1, repeats, warmup),
                      f"batch{batch}": cpu_latencies(variants, xb, max(repeats // 3, 3), 1)}
    return row


def summarize(row: dict) -> dict:
    """The ratios the table shows (masked dense / result: above 1 is smaller / faster)."""
    a = f"aligned{row['align']}"
    f, s = row["flops"], row["stored_floats"]
    out = {"flop_ratio": f["masked"] / f["minimized"], "flop_ratio_aligned": f["masked"] / f[a],
           "size_ratio": s["masked"] / s["minimized"], "size_ratio_aligned": s["masked"] / s[a],
           "align_size_cost": s[a] / s["minimized"] - 1}
    for b, lat in row["latency"].items():
        med = {k: v["median_s"] for k, v in lat.items()}
        out[f"speedup_{b}"] = med["masked"] / med["minimized"]
        out[f"speedup_{b}_aligned"] = med["masked"] / med[a]
        if "minimized_no_corrections" in med:
            out[f"correction_cost_{b}"] = med["minimized"] / med["minimized_no_corrections"] - 1
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--mask", default=STANDARD_MASK, choices=sorted(MASKS))
    p.add_argument("--align", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds at batch 1 (a third at --batch)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    b = f"batch{args.batch}"
    print(f"{'model':<13} {'FLOP':>5} {'FLOP al':>7} {'bs1':>5} {'bs1 al':>6} {b:>6} {b + ' al':>9} "
          f"{'size':>5} {'size al':>7} {'al cost':>7} {'odd16':>9} {'corr':>5} {'corr cost bs1/' + b:>18} "
          f"{'max err':>8}", flush=True)
    for name in args.models:
        row = measure(name, args.mask, args.align, args.batch, args.repeats, args.warmup)
        row["summary"] = sm = summarize(row)
        rows.append(row)
        a = f"aligned{args.align}"
        odd = f"{row['odd_widths']['minimized_mod16']}->{row['odd_widths'][a + '_mod16']}"
        corr = row["ones_map_corrections"]
        cc = (f"{100 * sm['correction_cost_batch1']:+.1f}/{100 * sm['correction_cost_' + b]:+.1f} %"
              if "correction_cost_batch1" in sm else "-")
        print(f"{LABELS.get(name, name):<13} {sm['flop_ratio']:>5.2f} {sm['flop_ratio_aligned']:>7.2f} "
              f"{sm['speedup_batch1']:>5.2f} {sm['speedup_batch1_aligned']:>6.2f} {sm['speedup_' + b]:>6.2f} "
              f"{sm['speedup_' + b + '_aligned']:>9.2f} {sm['size_ratio']:>5.2f} {sm['size_ratio_aligned']:>7.2f} "
              f"{100 * sm['align_size_cost']:>6.1f}% {odd:>9} {corr['minimized']:>2}/{corr[a]:<2} {cc:>18} "
              f"{max(row['error'].values()):>8.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "masked dense / result ratios (above 1: smaller, faster); see benchmarks/latency.py",
        "timing": f"time.process_time per forward, {args.threads} thread(s), {args.warmup} warm-up round(s), "
                  f"{args.repeats} interleaved rounds at batch 1 and {max(args.repeats // 3, 3)} at batch "
                  f"{args.batch}, medians",
        "workload": f"torchvision, random weights, mask {args.mask}, 224 px, traced at batch 1",
        "sqr_fx": _code_version(), "torch": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
