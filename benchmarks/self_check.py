"""What exactness-by-construction costs: minimize's CPU time with and without the self-check.

Per model (torchvision, random weights, the standard mask ``d25+m70``, traced at batch 1 and 224 px,
one thread): CPU seconds of ``minimize(..., verify=False)`` and ``minimize(..., verify=True)`` (median
of ``--repeats``, interleaved in one process), the self-check's own CPU time
(``report.verify_seconds``), the input variants it compared, and one plain forward of the original
at the example size for scale. Prints a table and writes ``benchmarks/results/self_check.json``.

    python -m benchmarks.self_check [--models resnet50 vit_b_16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import sqr_fx
from benchmarks.workload import MASKS, STANDARD_MASK, build_model, make_inputs, masked_model

RESULTS = Path(__file__).parent / "results" / "self_check.json"


def _cpu(fn) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def measure(name: str, repeats: int) -> dict:
    model = masked_model(build_model(name), MASKS[STANDARD_MASK])
    x = make_inputs(name)["example"]
    with torch.no_grad():
        forward, _ = _cpu(lambda: model(x))
    plain, checked, verify = [], [], []
    report = None
    for _ in range(repeats):  # interleaved: machine load hits both sides alike
        t, _ = _cpu(lambda: sqr_fx.minimize(model, (x,), verify=False))
        plain.append(t)
        t, small = _cpu(lambda: sqr_fx.minimize(model, (x,), verify=True))
        checked.append(t)
        verify.append(small.sqr_report.verify_seconds)
        report = small.sqr_report
    row = {
        "model": name, "mask": STANDARD_MASK, "forward_s": forward,
        "minimize_s": statistics.median(plain), "minimize_verified_s": statistics.median(checked),
        "verify_s": statistics.median(verify), "verified_on": report.verified_on,
        "fixed_shapes": report.fixed_shapes, "ratio": report.ratio, "frontend": report.frontend,
    }
    row["overhead"] = row["minimize_verified_s"] / row["minimize_s"]
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'model':<12} {'forward':>8} {'minimize':>9} {'+verify':>9} {'verify':>8} {'overhead':>8}  checked on")
    for name in args.models:
        r = measure(name, args.repeats)
        rows.append(r)
        print(f"{name:<12} {r['forward_s']:>7.2f}s {r['minimize_s']:>8.2f}s {r['minimize_verified_s']:>8.2f}s "
              f"{r['verify_s']:>7.2f}s {r['overhead']:>7.2f}x  {'; '.join(r['verified_on'])}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu_seconds": "time.process_time, one thread", "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
