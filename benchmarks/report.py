"""Turn ``bench.json`` / ``coverage.json`` into ``summary.md`` (tables) and ``bench.png`` (plot)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["write", "load", "markdown", "plot"]

EXACT = 1e-4
TOOL_ORDER = ["sqr_fx", "torch-simplify", "torch-pruning", "nni", "masked"]


def load(folder: Path) -> tuple[dict | None, dict | None]:
    def read(name: str) -> dict | None:
        p = folder / name
        return json.loads(p.read_text()) if p.exists() else None

    return read("bench.json"), read("coverage.json")


# ------------------------------------------------------------------ formatting
def _x(before: Any, after: Any) -> str:
    return f"{before / after:.2f}x" if before and after else "-"


def _e(v: Any) -> str:
    if v is None:
        return "-"
    if v == float("inf"):
        return "inf"
    return f"{v:.0e}" if v < 1e-3 else f"{v:.3g}"


def _short(reason: str | None, n: int = 70) -> str:
    reason = (reason or "").replace("|", "/").replace("\n", " ")
    return reason if len(reason) <= n else reason[: n - 3] + "..."


def _cell_err(row: dict, key: str) -> str:
    if row.get(key) is not None:
        mark = "" if row[key] <= EXACT else " ✗"
        return _e(row[key]) + mark
    note = row.get(key + "_note") or ""
    return "n/a" if "fixed-size" in note else f"fails ({_short(note, 40)})"


def _tools_present(rows: list[dict]) -> list[str]:
    seen = {r["tool"] for r in rows}
    return [t for t in TOOL_ORDER if t in seen] + sorted(seen - set(TOOL_ORDER))


def _rows_by(rows: list[dict], **kw) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def _models(rows: list[dict]) -> list[str]:
    out: list[str] = []
    for r in rows:
        if r["model"] not in out:
            out.append(r["model"])
    return out


# ------------------------------------------------------------------ tables
def _headline(bench: dict) -> list[str]:
    rows, m = bench["rows"], bench["meta"]
    std = m["standard_mask"]
    tools = _tools_present(rows)
    r1, r2 = m["trace_res"], m["second_res"]
    out = [f"### Standard mask `{std}`: size, exactness, pass time", "",
           f"Size: stored floats of the dense model / of the result (higher is smaller). Error: max relative "
           f"output error vs the masked model at {r1}px (traced) / {r2}px (unseen); ✗ marks > {EXACT:g}. "
           f"Pass: median wall time of the pass (warm-up excluded; `n=1`: single run).", "",
           "| model | nodes | tool | size | err " + f"{r1} | err {r2} | pass (s) | status |",
           "|---|---:|---|---:|---:|---:|---:|---|"]
    for model in _models(rows):
        for tool in tools:
            for r in _rows_by(rows, model=model, tool=tool, mask=std):
                if r.get("status") != "ok":
                    out.append(f"| {model} | {r.get('nodes') or ''} | {tool} | - | - | - | - | "
                               f"{r.get('status')}: {_short(r.get('reason'))} |")
                    continue
                runs = "" if r.get("pass_runs", 1) > 1 else " (n=1)"
                out.append(f"| {model} | {r.get('nodes') or ''} | {tool} | {_x(r['size_before'], r['size_after'])} | "
                           f"{_cell_err(r, 'err')} | {_cell_err(r, 'err2')} | {r['pass_s']:.2f}{runs} | ok |")
    return out


def _sweep(bench: dict) -> list[str]:
    rows, m = bench["rows"], bench["meta"]
    masks = list(m["masks"])
    tools = [t for t in _tools_present(rows) if t != "masked"]
    out = ["### Mask sweep: size reduction (x) and exactness at both resolutions", "",
           "Masks: " + "; ".join(f"`{k}` = {v['dead']:.0%} dead units + global magnitude {v['sparsity']:.0%}"
                                 for k, v in m["masks"].items()) + ". "
           "`✓` exact (≤ 1e-4 at both resolutions), `✗` not, `fail` the tool failed.", "",
           "| model | mask | " + " | ".join(tools) + " |", "|---|---|" + "---:|" * len(tools)]
    for model in _models(rows):
        for mask in masks:
            cells = []
            for tool in tools:
                rs = _rows_by(rows, model=model, tool=tool, mask=mask)
                if not rs:
                    cells.append("")
                    continue
                r = rs[0]
                if r.get("status") != "ok":
                    cells.append("fail" if r.get("status") == "failed" else r.get("status", ""))
                    continue
                errs = [r.get("err"), r.get("err2")]
                fixed = "fixed-size" in (r.get("err2_note") or "")
                exact = r.get("err") is not None and r["err"] <= EXACT and (
                    fixed or (r.get("err2") is not None and r["err2"] <= EXACT))
                cells.append(f"{_x(r['size_before'], r['size_after'])} {'✓' if exact else '✗'}")
                del errs
            out.append(f"| {model} | {mask} | " + " | ".join(cells) + " |")
    return out


def _latency(bench: dict) -> list[str]:
    lat, rows = bench.get("latency", []), bench["rows"]
    std = bench["meta"]["standard_mask"]
    if not lat:
        return []
    out = ["### Inference latency at the standard mask (CPU, "
           f"{bench['meta']['threads']} thread(s), median)", "",
           "Ratio = result / dense original, timed interleaved in one process. FLOP ratio "
           "(FlopCounterMode, batch 1) is the physical limit of what removal can buy.", "",
           "| model | tool | FLOP ratio | latency ratio bs1 | latency ratio bs32 | dense bs1 (ms) | dense bs32 (s) |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for entry in lat:
        model, L = entry["model"], entry["latency"]
        d = L.get("dense", {})
        for tool in [t for t in TOOL_ORDER if t in L] + sorted(set(L) - set(TOOL_ORDER) - {"dense"}):
            v = L[tool]
            r = (_rows_by(rows, model=model, tool=tool, mask=std) or [{}])[0]
            fr = f"{r['flop_ratio']:.3f}" if r.get("flop_ratio") is not None else "-"
            b1 = f"{v['bs1_s'] / d['bs1_s']:.3f}" if "bs1_s" in v and "bs1_s" in d else _short(v.get("bs1_note"), 30) or "-"
            b32 = (f"{v['bs32_s'] / d['bs32_s']:.3f}" if "bs32_s" in v and "bs32_s" in d
                   else ("= dense" if tool == "masked" else _short(v.get("bs32_note"), 30) or "-"))
            d1 = f"{d['bs1_s'] * 1e3:.1f}" if "bs1_s" in d else "-"
            d32 = f"{d['bs32_s']:.2f}" if "bs32_s" in d else "-"
            out.append(f"| {model} | {tool} | {fr} | {b1} | {b32} | {d1} | {d32} |")
    return out


def _scaling_points(bench: dict | None, cov: dict | None) -> list[tuple[str, int, float]]:
    pts: dict[str, tuple[int, float]] = {}
    if cov:
        for r in cov["rows"]:
            if r.get("pass_s") is not None and r.get("nodes"):
                pts[r["model"]] = (r["nodes"], r["pass_s"])
    if bench:  # medians of several runs win over coverage's single run
        for r in bench["rows"]:
            if r["tool"] == "sqr_fx" and r.get("standard") and r.get("status") == "ok" and r.get("nodes"):
                pts[r["model"]] = (r["nodes"], r["pass_s"])
    return sorted(((k, n, s) for k, (n, s) in pts.items()), key=lambda t: t[1])


def _params(bench: dict | None, cov: dict | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in (cov or {}).get("rows", []):
        if r.get("size_before"):
            out[r["model"]] = r["size_before"]
    for r in (bench or {}).get("rows", []):
        if r.get("size_before"):
            out[r["model"]] = r["size_before"]
    return out


def _scaling(bench: dict | None, cov: dict | None) -> list[str]:
    pts = _scaling_points(bench, cov)
    if not pts:
        return []
    per100 = [100 * s / n for _, n, s in pts]
    floats = _params(bench, cov)
    out = ["### Scaling: sqr_fx pass time against graph size", "",
           f"{len(pts)} graphs; seconds per 100 nodes: median {statistics.median(per100):.2f}, "
           f"max {max(per100):.2f}. Nodes: `torch.fx.symbolic_trace` of the model; stored floats of the "
           "dense model (the pass also scales with the weights it reads). Benchmark models: median of "
           "several runs; the others: coverage's single run.", "",
           "| model | nodes | stored floats (M) | pass (s) | s / 100 nodes |", "|---|---:|---:|---:|---:|"]
    keep = {"resnet50", "maxvit_t", "vit_b_16", "alexnet"}
    shown = pts if len(pts) <= 18 else [
        p for i, p in enumerate(pts)
        if p[0] in keep or i in {round(j * (len(pts) - 1) / 13) for j in range(14)}]
    for k, n, s in shown:
        f = f"{floats[k] / 1e6:.1f}" if k in floats else "-"
        out.append(f"| {k} | {n} | {f} | {s:.2f} | {100 * s / n:.2f} |")
    return out


def coverage_counts(cov: dict) -> dict[str, int]:
    rows = cov["rows"]
    return {
        "models": len(rows),
        "run": sum(r.get("stage") != "not run" for r in rows),
        "traced": sum(bool(r.get("traced")) for r in rows),
        "minimized": sum(bool(r.get("minimized")) for r in rows),
        "exact": sum(bool(r.get("exact")) for r in rows),
    }


def _coverage(cov: dict) -> list[str]:
    c = coverage_counts(cov)
    rows = cov["rows"]
    out = ["### Coverage: every classification model in `torchvision.models`", "",
           f"{c['models']} models listed by `torchvision.models.list_models`; {c['run']} run; "
           f"traced {c['traced']}, minimized {c['minimized']}, exact at both resolutions {c['exact']} "
           f"(standard mask `{cov['meta']['standard_mask']}`).", "",
           "| model | nodes | traced | minimized | exact | size | err 224 | err 160 | pass (s) | note |",
           "|---|---:|:-:|:-:|:-:|---:|---:|---:|---:|---|"]
    yn = lambda v: "✓" if v else ("?" if v is None else "✗")  # noqa: E731
    for r in rows:
        note = r.get("reason") or (f"frozen: {', '.join(r['frozen_ops'][:3])}" if r.get("frozen_ops") else "")
        if r.get("stage") and r.get("stage") != "not run":
            note = f"{r['stage']}: {note}"
        ps = f"{r['pass_s']:.2f}" if r.get("pass_s") is not None else "-"
        out.append(f"| {r['model']} | {r.get('nodes') or '-'} | {yn(r.get('traced')) if r.get('stage') != 'not run' else '-'} | "
                   f"{yn(r.get('minimized'))} | {yn(r.get('exact'))} | {_x(r.get('size_before'), r.get('size_after'))} | "
                   f"{_cell_err(r, 'err') if r.get('minimized') else '-'} | "
                   f"{_cell_err(r, 'err2') if r.get('minimized') else '-'} | {ps} | {_short(note, 90)} |")
    return out


def markdown(bench: dict | None, cov: dict | None) -> str:
    m = (bench or cov or {}).get("meta", {})
    runs = []
    for src in (bench, cov):
        for r in (src or {}).get("meta", {}).get("runs", []):
            if r not in runs:
                runs.append(r)
    lines = ["# sqr_fx benchmark results", "",
             f"Generated by `{m.get('command', 'python -m benchmarks.run')}` on {m.get('date', '?')}: "
             f"torch {m.get('torch')}, torchvision {m.get('torchvision')}, {m.get('cpu_count')} CPU(s), "
             f"load average at start {', '.join(f'{x:.1f}' for x in m.get('loadavg_start', []))}. "
             f"Peers: " + ", ".join(f"{k} {v}" for k, v in m.get("peers", {}).items()) + ".", ""]
    if runs:
        lines += ["Merged from these runs (`--append`):", ""] + [
            f"* `{r.get('command')}` on {r.get('date')}, load average "
            f"{', '.join(f'{x:.1f}' for x in r.get('loadavg_start', []))}" for r in runs] + [""]
    if bench:
        if bench["meta"].get("bench_wall_s"):
            lines.append(f"Side-by-side stage: {bench['meta']['bench_wall_s']:.0f} s wall.")
        lines += [""] + _headline(bench) + [""] + _sweep(bench) + [""] + _latency(bench) + [""]
    lines += _scaling(bench, cov) + [""]
    if cov:
        if cov["meta"].get("coverage_wall_s"):
            lines.append(f"Coverage stage: {cov['meta']['coverage_wall_s']:.0f} s wall.")
        lines += [""] + _coverage(cov) + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------ plot
def plot(bench: dict | None, cov: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    colors = {"sqr_fx": "tab:green", "torch-simplify": "tab:orange", "torch-pruning": "tab:blue",
              "nni": "tab:purple", "masked": "tab:gray"}
    if bench:
        rows, std = bench["rows"], bench["meta"]["standard_mask"]
        models = _models(rows)
        tools = [t for t in _tools_present(rows) if t != "masked"]
        w = 0.8 / max(len(tools), 1)
        ax = axes[0, 0]
        for i, tool in enumerate(tools):
            vals, errs = [], []
            for model in models:
                r = (_rows_by(rows, model=model, tool=tool, mask=std) or [{}])[0]
                ok = r.get("status") == "ok"
                vals.append(r["size_before"] / r["size_after"] if ok else 0)
                exact = ok and r.get("err") is not None and r["err"] <= EXACT and (
                    r.get("err2") is not None and r["err2"] <= EXACT or "fixed-size" in (r.get("err2_note") or ""))
                errs.append(exact)
            xs = [j + (i - (len(tools) - 1) / 2) * w for j in range(len(models))]
            bars = ax.bar(xs, vals, w, label=tool, color=colors.get(tool))
            for b, ex, v in zip(bars, errs, vals):
                if v and not ex:
                    b.set_hatch("//")
                    b.set_alpha(0.5)
        ax.axhline(1, color="k", lw=0.5)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_ylabel("size reduction (dense / result stored floats)")
        ax.set_title(f"Size at mask {std} (hatched: output error > 1e-4)")
        ax.legend()

        ax = axes[0, 1]
        for i, tool in enumerate(tools):
            for key, marker in (("err", "o"), ("err2", "^")):
                xs, ys, fx = [], [], []
                for j, model in enumerate(models):
                    r = (_rows_by(rows, model=model, tool=tool, mask=std) or [{}])[0]
                    xj = j + (i - (len(tools) - 1) / 2) * w
                    if r.get(key) is not None:
                        xs.append(xj)
                        ys.append(min(max(r[key], 1e-9), 3.0))
                    elif r.get("status") == "ok" and "fixed-size" not in (r.get(key + "_note") or ""):
                        fx.append(xj)  # the result does not run on these inputs
                ax.scatter(xs, ys, marker=marker, color=colors.get(tool),
                           label=f"{tool} @{bench['meta']['trace_res' if key == 'err' else 'second_res']}px")
                ax.scatter(fx, [5.0] * len(fx), marker="x", color=colors.get(tool))
        ax.axhline(EXACT, color="r", ls="--", lw=1, label="1e-4")
        ax.set_yscale("log")
        ax.set_ylim(5e-10, 10)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_ylabel("max relative output error (floor 1e-9)")
        ax.set_title("Exactness: traced (o) and unseen (^) resolution; x: result fails to run")
        ax.legend(fontsize=7, ncol=2)

        ax = axes[1, 0]
        for entry in bench.get("latency", []):
            L, d = entry["latency"], entry["latency"].get("dense", {})
            for tool, v in L.items():
                r = (_rows_by(rows, model=entry["model"], tool=tool, mask=std) or [{}])[0]
                if tool in ("dense", "masked") or r.get("flop_ratio") is None:
                    continue
                for bs, marker in (("bs1", "o"), ("bs32", "s")):
                    if f"{bs}_s" in v and f"{bs}_s" in d:
                        ax.scatter(r["flop_ratio"], v[f"{bs}_s"] / d[f"{bs}_s"], color=colors.get(tool), marker=marker)
                        if tool == "sqr_fx" and bs == "bs32":
                            ax.annotate(entry["model"], (r["flop_ratio"], v[f"{bs}_s"] / d[f"{bs}_s"]), fontsize=7)
        ax.plot([0, 1.1], [0, 1.1], "k--", lw=0.8, label="latency = FLOPs")
        ax.fill_between([0, 1.1], [0, 0.99], [0, 1.21], color="k", alpha=0.07, label="within 10%")
        for tool in tools:
            ax.scatter([], [], color=colors.get(tool), label=tool)
        ax.scatter([], [], color="k", marker="o", label="batch 1")
        ax.scatter([], [], color="k", marker="s", label="batch 32")
        ax.set_xlabel("FLOP ratio (result / dense)")
        ax.set_ylabel("latency ratio (result / dense)")
        ax.set_title("CPU latency vs FLOPs at the standard mask")
        ax.legend(fontsize=7)

    ax = axes[1, 1]
    pts = _scaling_points(bench, cov)
    if pts:
        ax.scatter([n for _, n, _ in pts], [s for _, _, s in pts], color="tab:green", s=14)
        for k, n, s in pts:
            if k in ("maxvit_t", "resnet50", "vit_b_16", "densenet121", "convnext_tiny", "resnet18") or n > 1200:
                ax.annotate(k, (n, s), fontsize=7)
        ns = sorted(n for _, n, _ in pts)
        ax.plot(ns, [n / 100 for n in ns], "r--", lw=0.8, label="1 s per 100 nodes")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("graph nodes (torch.fx)")
    ax.set_ylabel("sqr_fx pass time (s)")
    ax.set_title("Pass time vs graph size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(folder: Path) -> str:
    bench, cov = load(folder)
    md = markdown(bench, cov)
    (folder / "summary.md").write_text(md)
    plot(bench, cov, folder / "bench.png")
    return md
