"""Run the benchmark suite: ``python -m benchmarks.run`` (full) or ``--quick``.

Writes ``bench.json`` and ``coverage.json`` (raw records), ``summary.md`` (the tables) and
``bench.png`` (the plot) into ``benchmarks/results/`` (``--quick``: ``benchmarks/results/tmp/quick``).
Each model runs in its own worker process (:mod:`benchmarks.worker`) under a watchdog; the
progress bar advances per (model, mask, tool) step and per coverage model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torchvision
from tqdm import tqdm

from benchmarks import workload
from benchmarks.tools import PEER_VERSIONS, TOOLS, tool_status

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 small models, the standard mask, no coverage (a few minutes)")
    p.add_argument("--models", nargs="+", help=f"benchmark models (default: {' '.join(workload.BENCH_MODELS)})")
    p.add_argument("--masks", nargs="+", choices=list(workload.MASKS), help="masks (default: all)")
    p.add_argument("--tools", nargs="+", choices=list(TOOLS), help="tools (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every worker (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed pass runs after one warm-up (default 3)")
    p.add_argument("--slow-s", type=float, default=30.0,
                   help="a warm-up pass slower than this is the only run timed (default 30 s)")
    p.add_argument("--lat-reps-bs1", type=int, default=10, help="latency rounds at batch 1 (default 10)")
    p.add_argument("--lat-reps-bs32", type=int, default=3, help="latency rounds at batch 32 (default 3)")
    p.add_argument("--no-coverage", action="store_true", help="skip the torchvision zoo coverage stage")
    p.add_argument("--no-bench", action="store_true", help="skip the side-by-side stage (coverage only)")
    p.add_argument("--coverage-models", nargs="+", help="coverage models (default: every classification model)")
    p.add_argument("--coverage-max-params", type=float, default=350e6,
                   help="coverage skips models with more parameters (0: no limit; default 350e6)")
    p.add_argument("--coverage-timeout", type=float, default=300.0, help="seconds per coverage model (default 300)")
    p.add_argument("--job-timeout", type=float, default=900.0,
                   help="seconds a bench worker may stay silent before it is killed (default 900)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results, --quick: .../tmp/quick)")
    p.add_argument("--append", action="store_true",
                   help="merge into the existing bench.json / coverage.json of --out (replacing the models rerun)")
    p.add_argument("--report-only", action="store_true", help="rebuild summary.md and bench.png from the JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.models = a.models or workload.QUICK_MODELS
        a.masks = a.masks or [workload.STANDARD_MASK]
        a.no_coverage = True
        a.out = a.out or RESULTS / "tmp" / "quick"
    a.models = a.models or workload.BENCH_MODELS
    a.masks = a.masks or list(workload.DEFAULT_MASKS)
    a.tools = a.tools or list(TOOLS)
    a.out = a.out or RESULTS
    return a


# ---------------------------------------------------------------- worker processes
def _stream(job: dict, timeout: float, log) -> Iterator[dict]:
    """Run one worker; yield its JSON records; on silence longer than ``timeout`` kill it and
    yield ``{"killed": reason}``; on a non-zero exit yield ``{"crashed": reason}``."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", f.name], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()
    err_tail: list[str] = []

    def pump_out() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def pump_err() -> None:
        for line in proc.stderr:
            log.write(line)
            err_tail.append(line.rstrip())
            del err_tail[:-20]

    threading.Thread(target=pump_out, daemon=True).start()
    t_err = threading.Thread(target=pump_err, daemon=True)
    t_err.start()
    try:
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                proc.kill()
                yield {"killed": f"no progress for {timeout:.0f} s: killed"}
                return
            if line is None:
                break
            line = line.strip()
            if line.startswith("{"):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    log.write(line + "\n")
            elif line:
                log.write(line + "\n")  # peers print to stdout (NNI does)
        proc.wait()
        t_err.join(timeout=5)
        if proc.returncode != 0:
            last = next((l for l in reversed(err_tail) if l.strip()), "")
            yield {"crashed": f"worker exited with code {proc.returncode}: {last[:300]}"}
    finally:
        if proc.poll() is None:
            proc.kill()
        os.unlink(f.name)


def _bench_jobs(a: argparse.Namespace) -> list[dict]:
    base = dict(kind="bench", standard_mask=workload.STANDARD_MASK, threads=a.threads, repeats=a.repeats,
                slow_s=a.slow_s, lat_reps_bs1=a.lat_reps_bs1, lat_reps_bs32=a.lat_reps_bs32,
                lat_skip_masked_bs32=True)
    in_proc = [t for t in a.tools if not TOOLS[t].isolated]
    jobs = []
    for m in a.models:
        if in_proc:
            jobs.append(dict(base, model=m, masks=a.masks, tools=in_proc))
        for t in a.tools:
            if TOOLS[t].isolated and workload.STANDARD_MASK in a.masks:
                # slow and isolated: the standard mask only, one timed run, latency at batch 1
                jobs.append(dict(base, model=m, masks=[workload.STANDARD_MASK], tools=[t], repeats=0,
                                 lat_reps_bs32=0))
    return jobs


def _steps(job: dict) -> int:
    if job["kind"] == "coverage":
        return len(job["models"])
    lat = int(job["lat_reps_bs1"] > 0) + int(job["lat_reps_bs32"] > 0)
    masked_only_std = int("masked" in job["tools"]) * (len(job["masks"]) - int(job["standard_mask"] in job["masks"]))
    return len(job["masks"]) * len(job["tools"]) - masked_only_std + lat


def run_bench(a: argparse.Namespace, bar: tqdm, log) -> dict:
    rows, lat = [], []
    for job in _bench_jobs(a):
        done = 0
        bar.set_postfix_str(f"{job['model']} ({', '.join(job['tools'])})")
        for rec in _stream(job, a.job_timeout, log):
            if "progress" in rec:
                log.write(f"[progress] {json.dumps(rec['progress'])}\n")
                bar.update(1)
                done += 1
            elif "result" in rec:
                rows.append(rec["result"])
            elif "latency" in rec:
                lat.append(rec["latency"])
            else:  # killed / crashed: record every step it did not reach
                reason = rec.get("killed") or rec.get("crashed")
                seen = {(r["mask"], r["tool"]) for r in rows if r["model"] == job["model"]}
                for mask in job["masks"]:
                    for tool in job["tools"]:
                        if (mask, tool) not in seen and (tool != "masked" or mask == job["standard_mask"]):
                            rows.append(dict(model=job["model"], mask=mask, tool=tool, status="failed",
                                             reason=reason, standard=mask == job["standard_mask"]))
        bar.update(max(0, _steps(job) - done))
    return {"rows": rows, "latency": lat}


def run_coverage(a: argparse.Namespace, bar: tqdm, log) -> list[dict]:
    names = a.coverage_models or workload.classification_models()
    records, todo = [], list(names)
    job = dict(kind="coverage", standard_mask=workload.STANDARD_MASK, threads=a.threads,
               max_params=a.coverage_max_params)
    skipped = []
    if a.coverage_max_params:
        big = {n: p for n in todo if (p := workload.count_params_meta(n)) > a.coverage_max_params}
        skipped = [dict(model=n, params=p, stage="not run",
                        reason=f"{p / 1e6:.0f}M parameters > --coverage-max-params {a.coverage_max_params / 1e6:.0f}M")
                   for n, p in big.items()]
        todo = [n for n in todo if n not in big]
        bar.update(len(skipped))
    while todo:
        current = None
        for rec in _stream(dict(job, models=todo), a.coverage_timeout, log):
            if "progress" in rec:
                log.write(f"[progress] {json.dumps(rec['progress'])}\n")
                current = rec["progress"]["start"]
                bar.set_postfix_str(f"coverage {current}")
            elif "result" in rec:
                records.append(rec["result"])
                todo.remove(rec["result"]["model"])
                bar.update(1)
            elif current is not None and current in todo:
                records.append(dict(model=current, stage="minimize", traced=None,
                                    reason=rec.get("killed") or rec.get("crashed")))
                todo.remove(current)
                bar.update(1)
        if todo and (current is None or current not in names):
            break  # the worker failed before starting any model: do not loop
    order = {n: i for i, n in enumerate(names)}
    return sorted(records + skipped, key=lambda r: order.get(r["model"], 0))


def meta(a: argparse.Namespace) -> dict[str, Any]:
    peers = {t.name: tool_status(t)[1] for t in TOOLS.values() if t.dist}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": a.threads, "loadavg_start": os.getloadavg(),
        "peers": peers, "peer_versions_benchmarked": PEER_VERSIONS,
        "masks": {k: workload.MASKS[k].as_dict() for k in a.masks}, "standard_mask": workload.STANDARD_MASK,
        "trace_res": workload.TRACE_RES, "second_res": workload.SECOND_RES, "seed": workload.SEED,
        "repeats": a.repeats, "slow_s": a.slow_s, "lat_reps_bs1": a.lat_reps_bs1,
        "lat_reps_bs32": a.lat_reps_bs32, "exact_rtol": 1e-4,
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
    }


def _save(path: Path, data: dict, append: bool) -> None:
    """Write ``data``; with ``append``, merge into the file there: records of the models run
    now replace theirs, and ``meta["runs"]`` lists every run that contributed."""
    if append and path.exists():
        old = json.loads(path.read_text())
        models = {r["model"] for r in data["rows"]}
        for key in ("rows", "latency"):
            if key in data:
                data[key] = [r for r in old.get(key, []) if r["model"] not in models] + data[key]
        runs = old["meta"].get("runs") or [_run_entry(old["meta"])]
        data["meta"] = dict(old["meta"], runs=runs + [_run_entry(data["meta"])])
    path.write_text(json.dumps(data, indent=1))


def _run_entry(m: dict) -> dict:
    keys = ("command", "date", "loadavg_start", "bench_wall_s", "coverage_wall_s")
    return {k: m[k] for k in keys if k in m}


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    from benchmarks import report

    if not a.report_only:
        for t in a.tools:
            ok, why = tool_status(TOOLS[t])
            if not ok:
                print(f"{t}: {why}; its rows will say so", file=sys.stderr)
        total = 0 if a.no_bench else sum(_steps(j) for j in _bench_jobs(a))
        cov_names = [] if a.no_coverage else (a.coverage_models or workload.classification_models())
        total += len(cov_names)
        logdir = RESULTS / "tmp"
        logdir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(logdir / "worker-stderr.log", "w") as log, tqdm(total=total, unit="step", dynamic_ncols=True) as bar:
            m = meta(a)
            if not a.no_bench:
                bench = run_bench(a, bar, log)
                m["bench_wall_s"] = time.time() - t0
                _save(a.out / "bench.json", {"meta": m, **bench}, a.append)
            if cov_names:
                t1 = time.time()
                cov = run_coverage(a, bar, log)
                m = dict(m, coverage_wall_s=time.time() - t1)
                _save(a.out / "coverage.json", {"meta": m, "rows": cov}, a.append)
        print(f"done in {time.time() - t0:.0f} s", file=sys.stderr)
    md = report.write(a.out)
    print(md)


if __name__ == "__main__":
    main()
