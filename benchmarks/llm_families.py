"""Hugging Face decoder families: how much of the planted structure ``sqr_fx.minimize`` removes, exactly.

The families of ``sqr_fx/testing/hf_families.py`` (Gemma, Gemma 2, Phi-3, GPT-NeoX, Falcon, OPT, Qwen3,
OLMo 2, StableLM; hidden 64, 2 layers, 4 heads of 16 dims, 2 kv heads where the family has grouped kv
heads; random weights, no downloads), each with planted dead heads (MHA) or dead kv groups with their q
heads (GQA), 3 dead MLP units and 3 dead residual-stream channels per layer, plus MHA builds of the GQA
families with single dead heads (OLMo 2's dead heads have zero q and k rows too: its q_norm and
k_norm span every head; one more row shows them kept with live q/k rows), and GQA builds with single
dead q heads in live kv groups (head 1; heads 0 and 3: their kv heads stay). Measured per model: removed / planted of q heads, kv heads, MLP units
and stream channels (summed over the layers, read off the minimized weights), the size ratio, the max
relative output error in float64 at the traced shape (2, 10) and at (1, 5) and (3, 13), and the pass time.

    nice -n 10 python -m benchmarks.llm_families          # ~1 min on 2 shared CPUs

Writes ``llm_families.json`` and ``llm_families.md`` into ``benchmarks/results/`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import sqr_fx
from sqr_fx.testing.hf_families import C, FAMILIES, H, J, SHAPES, UNITS, build, dead_heads, dead_kv, token_ids, widths

RESULTS = Path(__file__).resolve().parent / "results"
MHA_VARIANTS = [name for name, fam in FAMILIES.items() if fam.kv < H]


def measure(name: str, label: str = "", **changes) -> dict:
    m, fam = build(name, **changes)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = sqr_fx.minimize(m, (token_ids(*SHAPES[0]),))
    seconds = time.perf_counter() - t0
    err = 0.0
    with torch.no_grad():
        for b, t in SHAPES:
            x = token_ids(b, t, seed=t)
            err = max(err, sqr_fx.max_relative_error(m(x).logits, s(x).logits))
    row = dict(model=name + label, error=err, rtol=fam.rtol, ratio=s.sqr_report.ratio,
               seconds=seconds)
    dead = dead_heads(fam)
    for key, planted, kept_full in (("heads", sum(map(len, dead)), H), ("units", 2 * len(UNITS), 64),
                                    ("stream", len(J), C)):
        kept = [widths(s, fam, i)[key] for i in range(2)]
        removed = min(kept_full - k for k in kept) if key == "stream" else sum(kept_full - k for k in kept)
        row[key] = (removed, planted)
    kv_planted = sum(dead_kv(fam, h) for h in dead)
    row["kv"] = (sum(fam.kv - widths(s, fam, i)["kv"] for i in range(2)), kv_planted)
    return row


def table(rows: list[dict]) -> str:
    out = ["| model | q heads | kv heads | MLP units | stream channels | size ratio | max rel. error (3 shapes) | "
           "pass s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k][0]}/{r[k][1]}" for k in ("heads", "kv", "units", "stream")]
        exact = "exact" if r["error"] <= r["rtol"] else "NOT EXACT"
        out.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['ratio']:.2f}x | {r['error']:.1e} ({exact} at "
                   f"{r['rtol']:g}) | {r['seconds']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = ([measure(name) for name in FAMILIES] + [measure(name, " (MHA)", kv=H) for name in MHA_VARIANTS]
            + [measure("olmo2", " (MHA, dead heads' q/k rows live)", kv=H, qk_rows=False)]
            + [measure(name, " (GQA, single dead q heads)", single_q=True) for name in MHA_VARIANTS])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llm_families.json").write_text(json.dumps(rows, indent=1))
    md = ("Removed / planted, summed over 2 layers (stream channels: per model). Errors in float64; the "
          "RMSNorm families normalize in float32 inside the float64 model (full-width norms keep them bit-exact; "
          "checked at float32 rounding, 1e-6), the LayerNorm families at 1e-9.\n\n" + table(rows) + "\n")
    (args.out / "llm_families.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
