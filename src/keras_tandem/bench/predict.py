"""Predict from many threads: the Predictor against the naive ways and the ceilings.

One run measures, at each client-thread count, single-example requests
through: (a) `model.predict` in every thread, (b) `model(x)` in every thread
(both in a child process, since they can abort it), (c) a lock around
`model.predict_on_batch`, (d) the Predictor, and the hand-off ceiling (a
worker that wakes its callers and does no inference); then the Predictor
from N coroutines on one asyncio loop (`apredict`); then offline
`model.predict(X, batch_size=256)` in samples/s. Each row measured in this
process also has `cpu_us`: the process's CPU time (all its threads, from
`time.process_time`) per answered request. Ratios compare rows of the same
run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from keras_tandem.bench import _report
from keras_tandem.bench._clients import run_clients
from keras_tandem.bench._handoff import HandOff
from keras_tandem.bench._models import build_model, example_shape

COLUMNS = ["technique", "threads", "rps", "cpu_us", "p50_ms", "p99_ms", "mean_batch", "errors"]
ASYNC = "Predictor apredict (asyncio)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `tandem bench predict`."""
    parser.add_argument("--model", default="mlp",
                        help="mlp (784-256-256-10), cnn (32x32x3) or a .keras file")
    parser.add_argument("--threads", default="1,4,16,64",
                        help="comma-separated client thread counts (default 1,4,16,64)")
    parser.add_argument("--coroutines", default="64,512",
                        help="comma-separated counts of apredict coroutines on one asyncio "
                             "loop (default 64,512; the largest is async_vs_threads')")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds per measurement (default 3; --quick uses 1)")
    parser.add_argument("--quick", action="store_true", help="short run, under a minute")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-delay-ms", type=float, default=None,
                        help="the Predictor's max_delay_ms (default: its own default)")
    parser.add_argument("--skip-naive", action="store_true",
                        help="skip model.predict / model(x) per thread (slow, can crash)")
    parser.add_argument("--json", metavar="PATH", help="write rows, ratios and machine here")
    parser.add_argument("--plot", metavar="PATH.png", help="plot throughput and p99 here")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark and prints the table and ratio lines."""
    from keras_tandem import Predictor

    duration = 1.0 if args.quick else args.duration
    thread_counts = [int(t) for t in args.threads.split(",")]
    coroutine_counts = [int(c) for c in args.coroutines.split(",") if c]
    model = build_model(args.model)
    shape = example_shape(model)
    rng = np.random.default_rng(1)
    batch_inputs = [rng.random((1, *shape), dtype=np.float32) for _ in range(16)]
    inputs = [x[0] for x in batch_inputs]
    console = _report.console
    backend = _report.backend()
    console.print(f"[bold]tandem bench predict[/] backend={backend} model={args.model} "
                  f"input={shape} threads={thread_counts} {duration:g} s each")
    rows: list[dict[str, Any]] = []

    def measure(technique: str, threads: int, call, data, mean_batch=1.0, before=None,
                clients=run_clients):
        cpu = time.process_time()
        row = {"technique": technique, "threads": threads,
               **clients(call, data, threads, duration), "mean_batch": mean_batch}
        row["cpu_us"] = _cpu_us(time.process_time() - cpu, row["requests"])
        if before is not None:
            row["mean_batch"] = before()
        rows.append(row)
        console.print(f"  {technique:<28} {threads:>3} threads: {row['rps']:>10,.0f} req/s  "
                      f"p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms  "
                      f"cpu {row['cpu_us'] or 0:7.1f} us/req")
        return row

    handoff = HandOff()
    lock = threading.Lock()

    def locked(x):
        with lock:
            return model.predict_on_batch(x)

    locked(batch_inputs[0])
    kwargs = {"max_batch_size": args.max_batch_size}
    if args.max_delay_ms is not None:
        kwargs["max_delay_ms"] = args.max_delay_ms
    with Predictor(model, **kwargs) as predictor:
        call_path = predictor.stats().get("call_path")
        console.print(f"  Predictor call path: {call_path}")
        for threads in thread_counts:
            measure("hand-off ceiling", threads, handoff.call, inputs)
            measure("lock + predict_on_batch", threads, locked, batch_inputs)
            s0 = predictor.stats()

            def mean_batch(s0=s0):
                s1 = predictor.stats()
                return (s1["requests"] - s0["requests"]) / max(1, s1["batches"] - s0["batches"])

            measure("Predictor", threads, predictor.predict, inputs, before=mean_batch)
        for coroutines in coroutine_counts:
            s0 = predictor.stats()

            def mean_batch(s0=s0):
                s1 = predictor.stats()
                return (s1["requests"] - s0["requests"]) / max(1, s1["batches"] - s0["batches"])

            measure(ASYNC, coroutines, predictor.apredict, inputs, before=mean_batch,
                    clients=run_coroutines)
    handoff.close()

    offline = _offline(model, shape, 4096 if args.quick else 16384)
    rows.append({"technique": "offline predict(batch_size=256)", "threads": 1,
                 "rps": offline, "mean_batch": 256.0})
    console.print(f"  offline model.predict: {offline:,.0f} samples/s")
    if not args.skip_naive:
        rows.extend(_naive_rows(args.model, duration, thread_counts))

    ratios = _ratios(rows, thread_counts, coroutine_counts)
    _report.print_table(f"predict from threads ({args.model}, Keras backend {backend})", rows,
                        COLUMNS)
    _report.print_ratios(ratios)
    config = {"model": args.model, "threads": thread_counts, "coroutines": coroutine_counts,
              "duration_s": duration,
              **kwargs, "quick": bool(args.quick)}
    if args.json:
        _report.write_json(args.json, "predict", config, rows, ratios, call_path=call_path)
    if args.plot:
        plot(rows, args.plot, f"predict from threads ({args.model}, Keras backend {backend})")
        console.print(f"wrote {args.plot}")
    return 0


def run_coroutines(call: Any, inputs: list[Any], coroutines: int,
                   duration_s: float) -> dict[str, float]:
    """`run_clients` for asyncio: `coroutines` closed-loop callers on one new event loop.

    Args:
        call: a coroutine function: `await call(x)` is one request.
        inputs: example inputs; coroutine i sends `inputs[i % len(inputs)]`.
        coroutines: number of concurrent callers.
        duration_s: how long each keeps sending.

    Returns:
        As `run_clients`.
    """
    now = time.perf_counter
    latencies: list[list[float]] = [[] for _ in range(coroutines)]
    errors = [0] * coroutines

    async def client(i: int, end: float) -> None:
        x = inputs[i % len(inputs)]
        mine = latencies[i]
        t = now()
        while t < end:
            try:
                await call(x)
            except Exception:  # noqa: BLE001 - counted, as in run_clients
                errors[i] += 1
            t2 = now()
            mine.append(t2 - t)
            t = t2

    async def main() -> float:
        began = now()
        await asyncio.gather(*(client(i, began + duration_s) for i in range(coroutines)))
        return now() - began

    wall = asyncio.run(main())
    lat = np.concatenate([np.asarray(v) for v in latencies]) if any(latencies) else np.zeros(0)
    done = len(lat) - sum(errors)
    p50, p99 = (np.percentile(lat, [50, 99]) * 1e3) if len(lat) else (float("nan"),) * 2
    return {"requests": int(done), "rps": done / wall, "p50_ms": float(p50),
            "p99_ms": float(p99), "errors": int(sum(errors))}


def _cpu_us(cpu_s: float, requests: int) -> float | None:
    return cpu_s / requests * 1e6 if requests else None


def _offline(model: Any, shape: tuple[int, ...], n: int) -> float:
    x = np.random.default_rng(2).random((n, *shape), dtype=np.float32)
    model.predict(x[:512], batch_size=256, verbose=0)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        model.predict(x, batch_size=256, verbose=0)
        best = min(best, time.perf_counter() - t)
    return n / best


def _naive_rows(model_name: str, duration: float, thread_counts: list[int]) -> list[dict]:
    cmd = [sys.executable, "-m", "keras_tandem.bench._naive", model_name, str(duration),
           *map(str, thread_counts)]
    _report.console.print("  naive threads (child process) ...")
    rows = []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=120 + 20 * duration * len(thread_counts))
        out, code, err = proc.stdout, proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        out, code, err = e.stdout or "", "timeout", ""
        out = out.decode() if isinstance(out, bytes) else out
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            row["mean_batch"] = 1.0
            rows.append(row)
            failed = (f"  {row['errors']:,} failed, e.g. {row['first_error'][:120]}"
                      if row.get("first_error") else "")
            _report.console.print(f"  {row['technique']:<28} {row['threads']:>3} threads: "
                                  f"{row['rps']:>10,.1f} req/s  p99 {row['p99_ms']:8.1f} ms"
                                  f"{failed}", markup=False)
    if code != 0:
        tail = err.strip().splitlines()[-1:] if err else []
        _report.console.print(f"  [red]naive child process ended with {code}[/] {tail}")
        rows.append({"technique": "model.predict (crashed)", "threads": None,
                     "errors": str(code)})
    return rows


def _find(rows: list[dict], technique: str, threads: int | None) -> dict | None:
    for r in rows:
        if r["technique"] == technique and (threads is None or r["threads"] == threads):
            return r
    return None


def _ratios(rows: list[dict], thread_counts: list[int],
            coroutine_counts: list[int] | None = None) -> dict[str, float | None]:
    top = max(thread_counts)
    low = min(thread_counts)
    pred, hand = _find(rows, "Predictor", top), _find(rows, "hand-off ceiling", top)
    offline = _find(rows, "offline predict(batch_size=256)", None)
    pred1, locked1 = _find(rows, "Predictor", low), _find(rows, "lock + predict_on_batch", low)
    naive, locked = _find(rows, "model.predict", top), _find(rows, "lock + predict_on_batch", top)

    def ratio(a, b, key):
        if not a or not b or not b.get(key):
            return None
        return a[key] / b[key]

    return {
        "throughput_vs_handoff": ratio(pred, hand, "rps"),
        "throughput_vs_offline": ratio(pred, offline, "rps"),
        "latency_vs_direct": ratio(pred1, locked1, "p50_ms"),
        "throughput_vs_locked": ratio(pred, locked, "rps"),
        "throughput_vs_naive": ratio(pred, naive, "rps"),
        # asyncio at the most coroutines against threads at 64 (else the most threads)
        "async_vs_threads": ratio(
            _find(rows, ASYNC, max(coroutine_counts)) if coroutine_counts else None,
            _find(rows, "Predictor", 64 if 64 in thread_counts else top), "rps"),
    }


def plot(rows: list[dict], path: str, title: str) -> None:
    """Plots throughput and p99 latency against client threads (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(12, 4.5))
    techniques = [t for t in dict.fromkeys(r["technique"] for r in rows)
                  if not t.startswith("offline") and "crashed" not in t]
    for t in techniques:
        pts = sorted((r["threads"], r["rps"], r["p99_ms"]) for r in rows
                     if r["technique"] == t and r.get("rps"))
        if not pts:
            continue
        x, rps, p99 = zip(*pts)
        style = "--" if t == "hand-off ceiling" else "-"
        ax_rps.plot(x, rps, style, marker="o", label=t)
        ax_p99.plot(x, p99, style, marker="o", label=t)
    offline = _find(rows, "offline predict(batch_size=256)", None)
    if offline:
        ax_rps.axhline(offline["rps"], color="gray", linestyle=":",
                       label="offline predict (samples/s)")
    for ax, label in ((ax_rps, "requests/s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("clients (threads; coroutines for apredict)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_rps.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
