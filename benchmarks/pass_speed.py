"""The pass's own speed: minimize's CPU time against the FX floor every pass pays (issue 12).

The floor is what any torch.fx pass over the model costs at least: ``symbolic_trace``, one shape
propagation forward at the example size, a copy of the graph and a recompile. Per model
(torchvision, random weights, the standard mask ``d25+m70``, batch 1, 224 px, one thread): the
floor's and ``minimize(..., verify=False)``'s CPU seconds (medians of ``--repeats``, interleaved in
one process) and their ratio; the self-check's seconds (``report.verify_seconds`` of one
``verify=True`` run) separately; the peak RSS of one ``verify=False`` run in a fresh process
(``resource.getrusage``, with the RSS after building the model for scale); the pass's CPU seconds by phase
(``report.phase_seconds`` of the last run). Then a depth series: a
Linear/ReLU chain of 64 ... 512 blocks (width 64, a quarter of the units planted dead).
Prints a table and writes ``benchmarks/results/pass_speed.json``.

    python -m benchmarks.pass_speed [--models resnet50 vit_b_16] [--depths 64 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import sqr_fx
from benchmarks.workload import MASKS, STANDARD_MASK, build_model, make_inputs, masked_model
from sqr_fx.masking import plant_dead_units

RESULTS = Path(__file__).parent / "results" / "pass_speed.json"
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "convnext_tiny", "vit_b_16"]
DEPTHS = [64, 128, 256, 512]


def floor(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """What every FX pass pays: trace, one shape propagation forward, graph copy, recompile."""
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, g)  # the constructor recompiles


def chain(depth: int, width: int = 64) -> nn.Module:
    """``depth`` Linear/ReLU blocks with a quarter of the units dead (zero row and bias, or zero column)."""
    torch.manual_seed(0)
    layers = [m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())]
    model = nn.Sequential(*layers).eval()
    return plant_dead_units(model, 0.25, torch.Generator().manual_seed(1),
                            exclude_rows=[f"{2 * depth - 2}"], exclude_columns=["0"]).eval()


def workload(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name.startswith("chain"):
        return chain(int(name[5:])), torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    return masked_model(build_model(name), MASKS[STANDARD_MASK]), make_inputs(name)["example"]


def _cpu(fn) -> tuple[float, object]:
    gc.collect()  # the last run's garbage is not collected on this run's clock
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def measure(name: str, repeats: int, self_check: bool) -> dict:
    model, x = workload(name)
    floors, passes = [], []
    small = None
    for _ in range(repeats):  # interleaved: machine load hits both sides alike
        t, _ = _cpu(lambda: floor(model, x))
        floors.append(t)
        t, small = _cpu(lambda: sqr_fx.minimize(model, (x,), verify=False))
        passes.append(t)
    row = {"model": name, "floor_s": statistics.median(floors), "minimize_s": statistics.median(passes),
           "floor_runs": floors, "minimize_runs": passes, "size_ratio": small.sqr_report.ratio,
           "rounds": small.sqr_report.rounds, "phases_s": dict(small.sqr_report.phase_seconds)}
    row["ratio"] = row["minimize_s"] / row["floor_s"]
    if self_check:
        checked = sqr_fx.minimize(model, (x,), verify=True)
        row["verify_s"] = checked.sqr_report.verify_seconds
    return row


def peak_rss(name: str) -> dict:
    """Peak RSS (MiB) of one ``verify=False`` run, in a fresh process (ru_maxrss never goes down, and a
    child starts from its parent's: call this before the parent grows)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.pass_speed", "--rss-child", name],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_child(name: str) -> None:
    """The RSS before the run, the run's own peak (Linux: the high-water mark reset through
    ``/proc/self/clear_refs`` right before it) and the process peak (``getrusage``: imports and model
    building included)."""
    torch.set_num_threads(1)
    model, x = workload(name)
    before = _status_mib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    except OSError:
        pass
    sqr_fx.minimize(model, (x,), verify=False)
    print(json.dumps({"model_rss_mib": before, "run_peak_rss_mib": _status_mib("VmHWM"),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _code_version() -> str | None:
    """The measured sqr_fx's git commit, ``+changes`` when its tree differs from it."""
    root = Path(sqr_fx.__file__).parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "sqr_fx"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--depths", nargs="*", type=int, default=DEPTHS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS runs (one process each)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        return _rss_child(args.rss_child)
    torch.set_num_threads(1)
    rows = []
    print(f"{'model':<14} {'floor':>7} {'minimize':>9} {'ratio':>6} {'verify':>7} {'RSS before':>10} {'run peak':>9}", flush=True)
    names = args.models + [f"chain{d}" for d in args.depths]
    rss = {} if args.no_rss else {name: peak_rss(name) for name in names}  # first: children start small
    for name in names:
        r = measure(name, args.repeats, self_check=not name.startswith("chain"))
        r.update(rss.get(name, {}))
        rows.append(r)
        v = f"{r['verify_s']:>6.2f}s" if "verify_s" in r else f"{'-':>7}"
        mem = f"{r['model_rss_mib']:>6.0f} MiB {r['run_peak_rss_mib']:>5.0f} MiB" if rss else ""
        print(f"{name:<14} {r['floor_s']:>6.3f}s {r['minimize_s']:>8.3f}s {r['ratio']:>5.1f}x {v} {mem}")
        print(f"{'':<14} CPU s by phase (last run): " + ", ".join(f"{k} {t:.3f}" for k, t in r["phases_s"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "cpu_seconds": "time.process_time, one thread, medians of interleaved runs in one process",
        "floor": "fx.symbolic_trace + one ShapeProp forward + graph copy + GraphModule (recompile)",
        "workload": f"torchvision models: mask {STANDARD_MASK}, batch 1, 224 px; chainN: N Linear(64)/ReLU "
                    "blocks, a quarter of the units dead, batch 8",
        "sqr_fx": _code_version(), "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
