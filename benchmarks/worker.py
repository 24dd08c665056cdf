"""One benchmark job in its own process: ``python -m benchmarks.worker JOB.json``.

The parent (:mod:`benchmarks.run`) writes a job file and reads back JSON lines on stdout:
``{"progress": ...}`` to advance its progress bar and ``{"result": ...}`` records. A job
in its own process isolates crashes, hangs (the parent kills it) and NNI's global
torch.fx pytree registrations from the other tools.

Job kinds:

* ``bench``: one model, every mask x every in-process tool: size, output error at the
  traced and at the second resolution, pass time; at the standard mask also FLOPs and
  latency at batch 1 and 32 of dense / masked / each result, timed interleaved.
* ``coverage``: a list of models, the standard mask, sqr_fx only: traced? minimized?
  exact? size ratio? pass time and graph size. One record per model.
"""
from __future__ import annotations

import gc
import json
import re
import statistics
import sys
import time
import traceback
from typing import Any

import torch
from torch import nn

from benchmarks import measure, workload
from benchmarks.tools import TOOLS, tool_status

EXACT_RTOL = 1e-4


_T0 = time.perf_counter()


def emit(kind: str, payload: Any) -> None:
    if kind == "progress":
        payload = dict(payload, t=round(time.perf_counter() - _T0, 2))
    print(json.dumps({kind: payload}), flush=True)


def _reason(e: BaseException) -> str:
    """The error (node metadata dumps cut out) plus the innermost frame outside torch."""
    text = re.sub(r" with meta=\{.*?\}(?=\n|$)", "", str(e).strip(), flags=re.S)
    text = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    msg = f"{type(e).__name__}: {text[:450]}"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "site-packages/torch/" not in f.filename]
    if frames:
        f = frames[-1]
        msg += f" [at {f.filename.split('site-packages/')[-1].replace('/work/main/', '')}:{f.lineno}]"
    return msg[:600]


def _errors(ref: nn.Module, cand: nn.Module, inputs: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, x in (("err", inputs["eval"]), ("err2", inputs["eval2"])):
        if x is None:
            out[key], out[key + "_note"] = None, "fixed-size model: no second resolution"
            continue
        try:
            out[key] = measure.output_error(ref, cand, x)
        except Exception as e:  # noqa: BLE001 - a wrong model is a result, not a crash
            out[key], out[key + "_note"] = None, _reason(e)
    return out


def _run_tool(tool_name: str, masked: nn.Module, inputs: dict, repeats: int, slow_s: float) -> tuple[dict, nn.Module | None]:
    tool = TOOLS[tool_name]
    ok, version = tool_status(tool)
    row: dict[str, Any] = {"tool": tool_name, "version": version}
    if not ok:
        row.update(status="not installed", reason=version)
        return row, None
    x = inputs["example"]
    try:
        times, result = measure.timed_runs(lambda: tool.run(masked, x), repeats, slow_s)
    except Exception as e:  # noqa: BLE001
        row.update(status="failed", reason=_reason(e))
        return row, None
    result.eval()
    row.update(status="ok", pass_s=statistics.median(times), pass_runs=len(times), pass_times=times,
               size_after=measure.stored_floats(result))
    row.update(_errors(masked, result, inputs))
    report = getattr(result, "sqr_report", None)
    if report is not None:
        row.update(frontend=report.frontend, rounds=report.rounds, frozen_ops=list(report.frozen_ops)[:20])
    return row, result


def _latency(variants: dict[str, nn.Module], name: str, job: dict) -> dict[str, dict]:
    """Latency (s) at batch 1 and batch 32 for every variant, interleaved with ``dense``."""
    out: dict[str, dict] = {k: {} for k in variants}
    g = torch.Generator().manual_seed(workload.SEED + 4)
    for bs, reps in ((1, job["lat_reps_bs1"]), (32, job["lat_reps_bs32"])):
        if reps <= 0:
            continue
        x = torch.randn(bs, 3, workload.TRACE_RES, workload.TRACE_RES, generator=g)
        usable = {}
        for k, m in variants.items():
            try:
                with torch.inference_mode():
                    m(x[:1])
                usable[k] = m
            except Exception as e:  # noqa: BLE001
                out[k][f"bs{bs}_note"] = _reason(e)
        # batch 32 is expensive: no warm-up round (each model already ran once above and
        # the median of the rounds absorbs a slow first call)
        lat = measure.latencies(usable, x, reps, warmup=bs == 1)
        for k, (median, fastest) in lat.items():
            out[k][f"bs{bs}_s"] = median
            out[k][f"bs{bs}_min_s"] = fastest
        emit("progress", {"step": f"{name} latency bs{bs}"})
    return out


def run_bench(job: dict) -> None:
    name = job["model"]
    torch.set_num_threads(job["threads"])
    dense = workload.build_model(name)
    inputs = workload.make_inputs(name)
    nodes = measure.graph_nodes(dense)
    size_dense = measure.stored_floats(dense)
    flops_dense = measure.flops(dense, inputs["example"])
    kept: dict[str, nn.Module] = {}
    for mask_name in job["masks"]:
        spec = workload.MASKS[mask_name]
        masked = workload.masked_model(dense, spec)
        standard = mask_name == job["standard_mask"]
        for tool_name in job["tools"]:
            if tool_name == "masked" and not standard:
                continue  # the masked model is the reference: size = dense, error 0 at every mask
            reps = job["repeats"] if standard else 0
            row, result = _run_tool(tool_name, masked, inputs, reps, job["slow_s"])
            row.update(model=name, mask=mask_name, nodes=nodes, size_before=size_dense)
            if result is not None and standard:
                try:
                    row["flops"] = measure.flops(result, inputs["example"])
                    row["flop_ratio"] = row["flops"] / flops_dense
                except Exception as e:  # noqa: BLE001
                    row["flops_note"] = _reason(e)
                kept[tool_name] = result
            row["standard"] = standard
            emit("result", row)
            emit("progress", {"step": f"{name} {mask_name} {tool_name}"})
            del result
            gc.collect()
    if kept and (job["lat_reps_bs1"] > 0 or job["lat_reps_bs32"] > 0):
        variants = {"dense": dense, **kept}
        lat = _latency_split(variants, name, job)
        emit("latency", {"model": name, "flops_dense": flops_dense, "size_dense": size_dense,
                         "nodes": nodes, "threads": job["threads"], "latency": lat})


def _latency_split(variants: dict[str, nn.Module], name: str, job: dict) -> dict[str, dict]:
    if not job["lat_skip_masked_bs32"] or "masked" not in variants:
        return _latency(variants, name, job)
    lat = _latency(variants, name, {**job, "lat_reps_bs32": 0})
    big = _latency({k: v for k, v in variants.items() if k != "masked"}, name, {**job, "lat_reps_bs1": 0})
    for k, v in big.items():
        lat[k].update(v)
    lat["masked"]["bs32_note"] = "same architecture and weights shape as dense: not re-timed at batch 32"
    return lat


def run_coverage(job: dict) -> None:
    torch.set_num_threads(job["threads"])
    spec = workload.MASKS[job["standard_mask"]]
    for name in job["models"]:
        emit("progress", {"start": name})
        rec: dict[str, Any] = {"model": name}
        try:
            dense = workload.build_model(name)
            rec["params"] = sum(p.numel() for p in dense.parameters())
            inputs = workload.make_inputs(name)
            masked = workload.masked_model(dense, spec)
            del dense
            rec["size_before"] = measure.stored_floats(masked)
            rec["nodes"] = measure.graph_nodes(masked)
        except Exception as e:  # noqa: BLE001
            rec.update(stage="setup", reason=_reason(e))
            emit("result", rec)
            continue
        try:
            from sqr_fx import minimize

            t0 = time.perf_counter()
            small = minimize(masked, (inputs["example"],))
            rec["pass_s"] = time.perf_counter() - t0
            rec["traced"] = True
            rec["frontend"] = small.sqr_report.frontend
            rec["rounds"] = small.sqr_report.rounds
            rec["frozen_ops"] = list(small.sqr_report.frozen_ops)[:20]
            rec["minimized_nodes"] = len(small.graph.nodes)
        except Exception as e:  # noqa: BLE001
            rec.update(stage="minimize", reason=_reason(e), traced=_traces(masked, inputs))
            emit("result", rec)
            continue
        rec["minimized"] = True
        rec["size_after"] = measure.stored_floats(small)
        rec.update(_errors(masked, small, inputs))
        errs = [rec[k] for k in ("err", "err2") if rec.get(k) is not None]
        failed_eval = [rec[k + "_note"] for k in ("err", "err2")
                       if rec.get(k) is None and "fixed-size" not in rec.get(k + "_note", "")]
        rec["exact"] = bool(errs) and not failed_eval and max(errs) <= EXACT_RTOL
        emit("result", rec)
        del masked, small
        gc.collect()


def _traces(model: nn.Module, inputs: dict) -> bool:
    try:
        from sqr_fx.trace import to_graph

        to_graph(model, (inputs["example"],))
        return True
    except Exception:  # noqa: BLE001
        return False


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    {"bench": run_bench, "coverage": run_coverage}[job["kind"]](job)


if __name__ == "__main__":
    main()
