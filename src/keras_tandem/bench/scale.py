"""Scaling out: one worker vs two local workers, and a pipeline local vs on a tf.data service.

Training: the built-in job (`keras_tandem.cluster.job`, a small CNN on
synthetic 8x8 images) runs as (a) one process (plain Keras `fit`), (b) two
workers under `MultiWorkerMirroredStrategy` at the same global batch (half
each), and (c) two workers at the same batch per worker (twice the global
batch). All on this machine's cores, so (b) and (c) cannot reach 2x: the
figures say what synchronous data parallelism costs per step (the all-reduce
of the gradients, the cross-worker reduction of the logs and stop flag).
Each run is a `LocalCluster` of fresh processes; the first epoch (tracing)
is left out and samples/s comes from the median of the other epochs.

Input: a CPU-heavy preprocess (blur passes over 32x32x3 images, per
element) through `make_pipeline` in this process vs through a tf.data
service (a dispatcher and two workers, each its own `tandem data-service`
process) with DYNAMIC sharding. The second pass of each is timed; its
samples/s counts from the first batch on (a service job's start, about a
second of the client finding its workers, is shown apart as first_batch_s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from keras_tandem.bench import _report

TRAIN_COLUMNS = ["case", "workers", "global_batch", "steps_per_epoch", "step_ms",
                 "samples_per_s", "vs_one"]
INPUT_COLUMNS = ["case", "batches", "samples", "seconds", "first_batch_s", "samples_per_s",
                 "vs_local"]
SHAPE = (32, 32, 3)
BATCH = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `tandem bench scale`."""
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per training run, the first untimed (default 4; --quick 3)")
    parser.add_argument("--rows", type=int, default=None,
                        help="training rows (default 16384; --quick 4096)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="the one worker's batch (default 64)")
    parser.add_argument("--input-batches", type=int, default=None,
                        help="batches of 64 per input pass (default 96; --quick 32)")
    parser.add_argument("--blur", type=int, default=8,
                        help="blur passes of the CPU-heavy preprocess (default 8)")
    parser.add_argument("--skip-input", action="store_true", help="training only")
    parser.add_argument("--json", metavar="PATH", help="write rows, ratios and machine here")


def _train(workers: int, batch: int, epochs: int, rows: int, folder: Path) -> dict[str, Any]:
    from keras_tandem.cluster.launcher import LocalCluster, describe_exit

    report = folder / f"w{workers}_b{batch}"
    command = [sys.executable, "-m", "keras_tandem.cluster.job", "--data", "synthetic",
               "--rows", str(rows), "--epochs", str(epochs), "--batch-size", str(batch),
               "--report", str(report)]
    cluster = LocalCluster(command, workers, out=None)
    failed, code = cluster.wait(600)
    if (failed, code) != (-1, 0):
        raise RuntimeError(f"worker {failed} failed ({describe_exit(code)}): "
                           + "\n".join(cluster.lines[max(failed, 0)][-10:]))
    chief = json.loads((report / "worker_0.json").read_text())
    steps = chief["steps_per_epoch"]
    epoch_s = statistics.median(chief["epoch_s"][1:] or chief["epoch_s"])
    return {"workers": workers, "global_batch": chief["global_batch"],
            "steps_per_epoch": steps, "step_ms": epoch_s / steps * 1e3,
            "samples_per_s": steps * chief["global_batch"] / epoch_s}


def _service_processes(port: int, folder: Path) -> list[subprocess.Popen]:
    base = [sys.executable, "-m", "keras_tandem.cli", "data-service"]
    procs = [subprocess.Popen([*base, "dispatcher", "--port", str(port), "--work-dir",
                               str(folder / "dispatcher")], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs += [subprocess.Popen([*base, "worker", "--dispatcher", f"127.0.0.1:{port}"],
                               start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL) for _ in range(2)]
    return procs


def _pass_seconds(dataset: Any) -> dict[str, Any]:
    """One pass: batches, samples, seconds, and seconds to the first batch."""
    t0 = time.perf_counter()
    batches = samples = first_samples = 0
    first = 0.0
    for x, _ in dataset:
        if not batches:
            first, first_samples = time.perf_counter() - t0, int(x.shape[0])
        batches += 1
        samples += int(x.shape[0])
    seconds = time.perf_counter() - t0
    # Throughput after the first batch: a service job's start (the client finding
    # its workers, about a second) is paid once per pass, not per batch.
    steady = (samples - first_samples) / max(seconds - first, 1e-9)
    return {"batches": batches, "samples": samples, "seconds": seconds,
            "first_batch_s": first, "samples_per_s": steady}


def _input(batches: int, blur: int, folder: Path) -> list[dict[str, Any]]:
    import os
    import signal

    from keras_tandem.bench.pipeline import cpu_preprocess
    from keras_tandem.cluster.launcher import free_ports
    from keras_tandem.data.pipeline import make_pipeline

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batches * BATCH, *SHAPE), dtype=np.uint8)
    y = rng.integers(0, 10, batches * BATCH).astype(np.int64)
    preprocess = cpu_preprocess(blur)
    rows = []
    local = make_pipeline((x, y), batch_size=BATCH, preprocess=preprocess)
    _pass_seconds(local)  # warm-up pass
    rows.append({"case": "local make_pipeline", **_pass_seconds(local)})
    port = free_ports(1)[0]
    procs = _service_processes(port, folder)
    try:
        service = make_pipeline((x, y), batch_size=BATCH, preprocess=preprocess,
                                service=f"grpc://127.0.0.1:{port}")
        _pass_seconds(service)  # waits for the servers, then a warm-up pass
        # Each service worker batches its own share (DYNAMIC sharding): up to
        # one partial batch per worker, so samples, not batches, are compared.
        rows.append({"case": "tf.data service, 2 workers", **_pass_seconds(service)})
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    for r in rows:
        r["vs_local"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    return rows


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark and prints the tables and ratio lines."""
    if _report.requires_tensorflow("scale", "multi-worker training and the tf.data service"):
        return 2
    epochs = args.epochs or (3 if args.quick else 4)
    rows_n = args.rows or (4096 if args.quick else 16384)
    batches = args.input_batches or (32 if args.quick else 96)
    b = args.batch_size
    console = _report.console
    console.print(f"[bold]tandem bench scale[/] {rows_n} synthetic 8x8 images, small CNN, "
                  f"{epochs} epochs per run (first untimed); input: {batches} batches of "
                  f"{BATCH} x {SHAPE}, blur={args.blur}")
    with tempfile.TemporaryDirectory(prefix="tandem-scale-") as tmp:
        folder = Path(tmp)
        train = [dict(_train(1, b, epochs, rows_n, folder), case="one worker (Keras fit)"),
                 dict(_train(2, b // 2, epochs, rows_n, folder),
                      case="two workers, same global batch"),
                 dict(_train(2, b, epochs, rows_n, folder),
                      case="two workers, same batch per worker")]
        for r in train:
            r["vs_one"] = r["samples_per_s"] / train[0]["samples_per_s"]
        inputs = [] if args.skip_input else _input(batches, args.blur, folder)
    _report.print_table("training samples/s, one vs two local workers", train, TRAIN_COLUMNS)
    if inputs:
        _report.print_table("CPU-heavy input pipeline, local vs tf.data service", inputs,
                            INPUT_COLUMNS)
    ratios: dict[str, float | None] = {
        "two_workers_vs_one": train[2]["vs_one"],
        "two_workers_same_global_batch_vs_one": train[1]["vs_one"],
        "step_overhead_ms_same_global_batch": train[1]["step_ms"] - train[0]["step_ms"],
        "service_vs_local": inputs[1]["vs_local"] if inputs else None,
    }
    _report.print_ratios(ratios)
    if args.json:
        config = {"epochs": epochs, "rows": rows_n, "batch_size": b, "input_batches": batches,
                  "blur": args.blur, "quick": args.quick}
        _report.write_json(args.json, "scale", config, [*train, *inputs], ratios)
    return 0
