"""Grouped-query attention: the two layouts for q heads that die one by one (size and latency).

A Llama decoder from a random config (hidden 512, 8 q heads of 64 dims, 2 kv heads: each kv head read by
r = 4 q heads; 4 layers, MLP 1024, vocab 1000; float32, no downloads) gets dead q heads planted one by one
(output-projection columns zero): per layer one q head of each kv group, a different one per layer, and
in half the layers a second one of group 0. Every kv head stays live. Then

* ``minimize(..., gqa_heads="groups")``: q heads go only in whole kv groups. The uniform repeat stays,
  and no single dead head can go;
* ``minimize(..., gqa_heads="gather")`` (the default): every dead q head goes with its rows of q_proj and
  its columns of o_proj. The kept q heads read their kv heads through one ``index_select`` of the kept
  copies on the head axis, in place of the uniform repeat.

Measured: stored floats (``count_stored_floats``) and the forward's CPU time, one thread
(``time.process_time``, the median of interleaved runs of the three models in one process), at batch 1
and batch 4 with 128 tokens. Both results are checked against the original (max relative error).

    nice -n 10 python -m benchmarks.gqa_layout          # ~2 min on 2 shared CPUs

Writes ``benchmarks/results/gqa_layout.json`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

import sqr_fx

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, HEADS, KV, LAYERS = 512, 8, 2, 4
D = HIDDEN // HEADS


def build() -> tuple[torch.nn.Module, int]:
    """The planted Llama and how many q heads were planted dead."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=1000, hidden_size=HIDDEN, intermediate_size=1024, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256,
                         use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(cfg).eval()
    r, dead = HEADS // KV, 0
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            heads = [g * r + (i + g) % r for g in range(KV)] + ([(i + 1) % r] if i % 2 else [])
            for h in set(heads):
                layer.self_attn.o_proj.weight[:, h * D:(h + 1) * D] = 0
            dead += len(set(heads))
    return m, dead


def cpu_ms(models: dict, x: torch.Tensor, reps: int) -> dict:
    """Median CPU milliseconds per forward, the models run interleaved (the same load for each)."""
    times: dict = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)  # warm-up
        for _ in range(reps):
            for k, m in models.items():
                t0 = time.process_time()
                m(x)
                times[k].append(1e3 * (time.process_time() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=25)  # (the documented figures)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, dead = build()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {"original": model}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for layout in ("groups", "gather"):
            results[layout] = sqr_fx.minimize(model, (ids,), gqa_heads=layout)
    rows = []
    shapes = [(1, 128), (4, 128)]
    lat = {s: cpu_ms(results, torch.randint(0, 1000, s, generator=torch.Generator().manual_seed(1)), args.reps)
           for s in shapes}
    x = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).logits
        for k, m in results.items():
            out = m(x)
            out = out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out
            q = sum(p.shape[0] // D for n, p in m.named_parameters() if n.endswith("q_proj.weight"))
            rows.append(dict(layout=k, q_heads=q, kv_heads=KV * LAYERS,
                             floats=sqr_fx.count_stored_floats(m),
                             error=sqr_fx.max_relative_error(ref, out),
                             **{f"ms_b{b}_t{t}": lat[(b, t)][k] for b, t in shapes}))
    base = rows[0]
    lines = [f"Llama, hidden {HIDDEN}, {HEADS} q heads / {KV} kv heads, {LAYERS} layers, float32; {dead} of "
             f"{HEADS * LAYERS} q heads planted dead one by one (no kv head dead). CPU ms per forward, one thread, "
             f"median of {args.reps}.", "",
             "| layout | q heads kept | stored floats | size vs original | ms b1 t128 | ms b4 t128 | max rel. error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['q_heads']}/{HEADS * LAYERS} | {r['floats']:,} | "
                     f"{base['floats'] / r['floats']:.3f}x | {r['ms_b1_t128']:.1f} | {r['ms_b4_t128']:.1f} | "
                     f"{r['error']:.1e} |")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gqa_layout.json").write_text(json.dumps(dict(dead_planted=dead, rows=rows), indent=1))
    print(text)


if __name__ == "__main__":
    main()
