"""Peak memory of minimize on a ~1B-parameter Llama-style decoder (issue 12).

The model is written out in plain torch (FX-traceable, random init, float32): token embedding,
``L`` pre-norm blocks of ``F.rms_norm`` -> q/k/v/o attention (``scaled_dot_product_attention``, causal)
and ``F.rms_norm`` -> SwiGLU MLP, a final norm and an untied LM head. A quarter of every block's MLP
units are planted dead (``down_proj`` columns zero), so the result is smaller by a known amount.

Run in a fresh process per configuration: the RSS after building the model (``model``), the peak
RSS of the ``minimize`` call alone (Linux ``VmHWM`` reset through ``/proc/self/clear_refs`` right
before it), the result's size, and the goal ``peak <= 1.5 x (model + result)`` read as
``run peak - RSS before <= 0.5 x model + 1.5 x result`` (the model is already resident). Prints a
table and writes ``benchmarks/results/memory.json``.

    python -m benchmarks.memory [--layers 16 --hidden 2048 --mlp 5632 --vocab 32000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sqr_fx

RESULTS = Path(__file__).parent / "results" / "memory.json"


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, mlp, bias=False), nn.Linear(d, mlp, bias=False)
        self.down = nn.Linear(mlp, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = F.rms_norm(x, (d,), self.norm1, 1e-6)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = F.rms_norm(x, (d,), self.norm2, 1e-6)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, mlp: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, mlp) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(d))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(F.rms_norm(x, (x.shape[-1],), self.norm, 1e-6))


def build(layers: int, hidden: int, mlp: int, vocab: int, heads: int) -> nn.Module:
    torch.manual_seed(0)
    with torch.device("cpu"):
        m = Decoder(vocab, hidden, layers, heads, mlp)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=g)
        for blk in m.blocks:
            dead = torch.randperm(mlp, generator=g)[: mlp // 4]
            blk.down.weight[:, dead] = 0  # a quarter of the MLP units: nothing reads them
    return m.eval()


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(cfg: dict) -> None:
    torch.set_num_threads(2)
    m = build(**cfg)
    ids = torch.randint(0, cfg["vocab"], (1, 8), generator=torch.Generator().manual_seed(2))
    n = sum(p.numel() for p in m.parameters())
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    t0, c0 = time.perf_counter(), time.process_time()
    small = sqr_fx.minimize(m, (ids,), verify=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_mib("VmHWM")
    r = small.sqr_report
    model_mib = n * 4 / 2**20
    result_mib = sum(p.numel() * p.element_size() for p in small.state_dict().values()) / 2**20
    print(json.dumps({
        "config": cfg, "params": n, "params_after": r.params_after, "ratio": r.ratio,
        "model_mib": model_mib, "result_mib": result_mib, "rss_before_mib": before, "run_peak_rss_mib": peak,
        "run_extra_mib": peak - before, "goal_extra_mib": 0.5 * model_mib + 1.5 * result_mib,
        "peak_over_model_plus_result": peak / (model_mib + result_mib),
        "wall_s": wall, "cpu_s": cpu, "verify_s": r.verify_seconds,
    }))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    cfg = {"layers": args.layers, "hidden": args.hidden, "mlp": args.mlp, "vocab": args.vocab, "heads": args.heads}
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(cfg)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{row['params'] / 1e9:.2f}B params ({row['model_mib']:.0f} MiB) -> {row['params_after'] / 1e9:.2f}B "
          f"({row['result_mib']:.0f} MiB), {row['ratio']:.2f}x smaller")
    print(f"RSS before {row['rss_before_mib']:.0f} MiB, run peak {row['run_peak_rss_mib']:.0f} MiB: the run added "
          f"{row['run_extra_mib']:.0f} MiB (goal <= {row['goal_extra_mib']:.0f} MiB); peak / (model + result) = "
          f"{row['peak_over_model_plus_result']:.2f}")
    print(f"time {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} s CPU (self-check {row['verify_s']:.1f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rss": "Linux VmHWM of the minimize call (verify=True), fresh process",
                                    "sqr_fx_torch": torch.__version__, "rows": [row]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
