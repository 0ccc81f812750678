"""Train while serving: training speed alone vs while client threads are served.

One run measures training samples/s (a) alone, (b) while 16 client threads
send a paced, fixed open-loop load (default 1,000 requests/s in all) through
a `Predictor` fed by `PublishWeights`, (c) while the same threads call
`model.predict` on a copy of the model (the naive way, in a child process:
it can take a process down), and (d) while the threads send through the
Predictor as fast as they can (closed loop). Each case is repeated and
reported by its median (and minimum); ratios compare cases of the same
process, so they mean the same on any machine. Training alone drifts by
several percent between runs seconds apart, so every case runs between two
"alone" runs (alone, open loop, alone, closed loop, ..., alone) and is
compared with the mean of the two beside it.

CPU per answered request: `cpu_us` is the process's CPU time (every thread,
`time.process_time`) over a case, training included, per request answered
in it; `serve_cpu_us` takes off what training alone spent per sample in the
same repetitions, times the samples trained: the CPU serving added, per
answered request. Of that, `worker_cpu_us` is the Predictor's worker thread
(batching, forward passes, answering) and `client_cpu_us` the client
threads (pacing, `predict` calls, waking for answers); the rest is what the
other threads (training's among them) spent more than alone.

Training is timed from the first `on_train_batch_begin` to the last
`on_train_batch_end`, so tf.data iterator teardown (which can stall for
seconds, see docs/design.md) is never counted. Open-loop latency runs from
the moment a request was *scheduled*, so a client that falls behind shows it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_tandem.bench import _report

_now = time.perf_counter
# Requests may wait up to this long for others to share their forward pass: at
# the default rate about ten share one, and training keeps the CPU the other
# passes would take (docs/design.md, "Training while serving").
_DEFAULT_DELAY_MS = 10.0
# Table column -> row field (the JSON keeps every field under its own name).
COLUMNS = {
    "case": "case",
    "train/s": "train_sps",            # training samples/s, median of the repetitions
    "train/s min": "train_sps_min",
    "vs alone": "train_vs_alone",      # training speed / the same process's "alone"
    "served/s": "served_rps",          # answers completed while training ran
    "served": "served_fraction",       # of the offered open-loop load
    "batch": "mean_batch",             # mean requests per forward pass
    "p50 ms": "p50_ms",
    "p99 ms": "p99_ms",                # open loop: from the time a request was due
    "p99 sent": "p99_sent_ms",         # from the time the client thread sent it
    "cpu us": "cpu_us",                # process CPU per answered request, training included
    "serve cpu us": "serve_cpu_us",    # the same less training alone's CPU per sample
    "worker us": "worker_cpu_us",      # of which the Predictor's worker thread
    "client us": "client_cpu_us",      # and the client threads
    "published": "versions_published",
    "v served": "versions_served",
    "stall ms": "publish_ms_mean",     # training-thread stall per publish
    "stall": "publish_frac",           # share of training time spent publishing
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `tandem bench train-serve`."""
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"],
                        help="mlp (784-256-256-10, default) or cnn (32x32x3)")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="open-loop load, requests/s over all threads (default 1000)")
    parser.add_argument("--threads", type=int, default=16, help="client threads (default 16)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="training seconds per case (default 4; --quick 1)")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions of every case (default 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--publish-seconds", type=float, default=0.1,
                        help="publish weights every this many seconds (default 0.1)")
    parser.add_argument("--max-delay-ms", type=float, default=_DEFAULT_DELAY_MS,
                        help="the Predictor's max_delay_ms: how long a request may wait for "
                             f"others to share its forward pass (default {_DEFAULT_DELAY_MS:g})")
    parser.add_argument("--skip-naive", action="store_true",
                        help="skip the model.predict-per-thread case (child process)")
    parser.add_argument("--quick", action="store_true", help="short run, well under a minute")
    parser.add_argument("--json", metavar="PATH", help="write rows, ratios and machine here")


# ------------------------------------------------------------------ clients


class _Load:
    """Client threads calling `call(x)`: paced at `rate` requests/s in all, or closed loop.

    Every answer is recorded as (scheduled at, answered at, version, sent at):
    an open-loop request is sent when it is due or, if its thread is still
    waiting for the previous answer then, when that answer comes (or later,
    if the thread itself wakes late).
    """

    def __init__(self, call: Callable[[Any], Any], inputs: list[np.ndarray], threads: int,
                 rate: float | None):
        self._call, self._inputs, self.rate = call, inputs, rate
        self._stop = threading.Event()
        self.records: list[list[tuple[float, float, Any, float]]] = [[] for _ in range(threads)]
        self.errors = [0] * threads
        self.cpu_s = [0.0] * threads  # each client thread's CPU time, set when it ends
        self._threads = [threading.Thread(target=self._client, args=(i, threads), daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        self._t0 = _now() + 0.01
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._stopped = _now()
        for t in self._threads:
            t.join(60)

    def _slots(self, t0: float, t1: float) -> list[tuple[int, float]]:
        """(client, due time) of every request the open-loop schedule put in [t0, t1]."""
        threads = len(self.records)
        period = threads / self.rate
        slots = []
        for i in range(threads):
            offset = i / threads  # the same arithmetic as `_client`, so times compare equal
            k = max(0, math.ceil((t0 - self._t0) / period - offset))
            while (due := self._t0 + (k + offset) * period) <= t1:
                if due >= t0:
                    slots.append((i, due))
                k += 1
        return slots

    def _client(self, i: int, threads: int) -> None:
        cpu = time.thread_time()
        try:
            self._send(i, threads)
        finally:
            self.cpu_s[i] = time.thread_time() - cpu

    def _send(self, i: int, threads: int) -> None:
        x, call, mine, stop = self._inputs[i % len(self._inputs)], self._call, self.records[i], \
            self._stop
        period = threads / self.rate if self.rate else 0.0
        k = 0
        while not stop.is_set():
            if period:
                # Open loop: request k of this thread is due at a fixed time, whether or
                # not earlier answers came back late (threads are staggered).
                scheduled = self._t0 + (k + i / threads) * period
                k += 1
                delay = scheduled - _now()
                if delay > 0:
                    time.sleep(delay)
                    if stop.is_set():
                        break
                sent = _now()
            else:
                scheduled = sent = _now()
            try:
                version = call(x)
            except Exception:  # noqa: BLE001 - counted; the naive way does fail
                self.errors[i] += 1
                continue
            mine.append((scheduled, _now(), version, sent))

    def _sent_waits(self, t0: float, t1: float) -> list[float]:
        """Open loop: seconds from sending to the answer, of the requests due in [t0, t1].

        A thread's request still unanswered when the load stopped was sent
        at its due time or at the thread's last answer, whichever is later,
        and counts the time it had waited; later ones were never sent. If
        that moment falls after the load stopped (the thread's last answer
        came late, during `stop()`), the thread saw the stop and sent
        nothing more.
        """
        due_by_client: list[list[float]] = [[] for _ in self.records]
        for i, due in self._slots(t0, t1):
            due_by_client[i].append(due)
        waits = []
        for mine, dues in zip(self.records, due_by_client):
            waits.extend(at - sent for due, at, _, sent in mine if t0 <= due <= t1)
            last_due, last_at = (mine[-1][0], mine[-1][1]) if mine else (-math.inf, self._t0)
            pending = [due for due in dues if due > last_due]
            if pending and (sent := max(pending[0], last_at)) < self._stopped:
                waits.append(self._stopped - sent)
        return waits

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        """What the clients got while training ran, in the window [t0, t1].

        Returns:
            `served_rps`: answers completed in the window, per second;
            `served_fraction` (open loop): of the requests due in the window,
            those answered (one never sent, its client still busy with
            earlier ones, counts as not served);
            `p50_ms`/`p99_ms`: latency of the requests due (open loop) or
            sent (closed loop) in the window, from that time to the answer;
            an open-loop request never answered counts the time it had
            waited when the load stopped;
            `p99_sent_ms` (open loop): the same from the time each request
            was sent, over the requests sent (one still waiting when the
            load stopped counts the time it had waited): what the Predictor
            took, without a client thread's own lateness in sending;
            `versions_served` and `errors`.
        """
        records = [r for mine in self.records for r in mine]
        done = [r for r in records if t0 <= r[1] <= t1]
        versions = {r[2] for r in done if r[2] is not None}
        if self.rate:
            # Every request due while training ran, answered or not: one never
            # answered (its client stuck behind earlier ones) counts with the
            # time it had waited when the load stopped, a lower bound.
            answered = [{due: at for due, at, *_ in mine} for mine in self.records]
            slots = self._slots(t0, t1)
            waits = [answered[i].get(due, self._stopped) - due for i, due in slots]
            served = sum(1 for i, due in slots if due in answered[i])
            lat = np.array(waits) * 1e3
            sent_lat = np.array(self._sent_waits(t0, t1)) * 1e3
        else:
            lat = np.array([r[1] - r[0] for r in records if t0 <= r[0] <= t1]) * 1e3
            sent_lat = lat
        return {
            "offered_rps": self.rate,
            "served_rps": len(done) / (t1 - t0),
            "served_fraction": served / len(slots) if self.rate and slots else None,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "p99_sent_ms": float(np.percentile(sent_lat, 99)) if len(sent_lat) else None,
            "versions_served": len(versions) or None,
            "errors": sum(self.errors),
        }


# ---------------------------------------------------------------- training


def _timer(limit_s: float | None = None) -> Any:
    import keras

    class Timer(keras.callbacks.Callback):
        """First batch begin to last batch end: iterator teardown is never counted.

        Stops training after `limit_s` seconds (a case slowed down many times
        over is measured on the batches it did).
        """

        first: float | None = None
        last: float | None = None
        batches = 0

        def on_train_batch_begin(self, batch, logs=None):
            if self.first is None:
                self.first = _now()

        def on_train_batch_end(self, batch, logs=None):
            self.last = _now()
            self.batches += 1
            if limit_s is not None and self.last - self.first > limit_s:
                self.model.stop_training = True

    return Timer()


class _Trainer:
    """The model under training, its data, and one timed training run per call."""

    def __init__(self, model_name: str, batch_size: int, seconds: float):
        import keras

        from keras_tandem.bench._models import build_model, example_shape

        self.model = build_model(model_name)
        self.model.compile(keras.optimizers.SGD(0.01),
                           keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        self.shape = example_shape(self.model)
        self.batch_size = batch_size
        rng = np.random.default_rng(0)
        self._x = rng.random((batch_size * 64, *self.shape), dtype=np.float32)
        self._y = rng.integers(0, 10, len(self._x)).astype("int32")
        self.steps = 64
        self.limit_s = 3 * seconds
        self.train(steps=8)  # traces the train step
        timer = self.train(steps=32)
        step_s = (timer.last - timer.first) / max(1, timer.batches)
        self.steps = max(30, int(seconds / step_s))
        reps = -(-self.steps // 64)
        self._x = np.concatenate([self._x] * reps)[: self.steps * batch_size]
        self._y = np.concatenate([self._y] * reps)[: self.steps * batch_size]

    def train(self, steps: int | None = None, callbacks: tuple = ()) -> Any:
        """One epoch of `steps` batches (default: the calibrated count); returns the timer."""
        from keras_tandem import train_in_background

        n = (steps or self.steps) * self.batch_size
        timer = _timer(self.limit_s)
        run = train_in_background(self.model, (self._x[:n], self._y[:n]), epochs=1,
                                  batch_size=self.batch_size, shuffle=False,
                                  callbacks=[timer, *callbacks])
        run.join()
        return timer


def _case(trainer: _Trainer, load: _Load | None, publisher: Any = None,
          predictor: Any = None) -> dict[str, Any]:
    before = predictor.stats() if predictor is not None else None
    cpu = time.process_time()
    if load is not None:
        load.start()
        time.sleep(0.2)  # the clients reach their pace before training starts
    try:
        timer = trainer.train(callbacks=(publisher,) if publisher is not None else ())
    finally:
        if load is not None:
            load.stop()
    cpu = time.process_time() - cpu
    t0, t1 = timer.first, timer.last
    samples = timer.batches * trainer.batch_size
    row = {"train_sps": samples / (t1 - t0), "train_s": t1 - t0, "cpu_s": cpu,
           "train_samples": samples}
    if load is not None:
        row.update(load.summary(t0, t1))
        answered = sum(len(mine) for mine in load.records)  # over the whole case, as cpu_s
        row["answered"] = answered
        row["cpu_us"] = cpu / answered * 1e6 if answered else None
        row["client_cpu_us"] = sum(load.cpu_s) / answered * 1e6 if answered else None
    if before is not None:
        after = predictor.stats()
        batches = after["batches"] - before["batches"]
        row["mean_batch"] = (after["requests"] - before["requests"]) / batches if batches else None
        if row.get("answered") and after.get("worker_cpu_s") is not None \
                and before.get("worker_cpu_s") is not None:
            worker = after["worker_cpu_s"] - before["worker_cpu_s"]
            row["worker_cpu_us"] = worker / row["answered"] * 1e6
    if publisher is not None:
        row.update(versions_published=publisher.published,
                   publish_ms_mean=publisher.publish_seconds_mean * 1e3,
                   publish_ms_max=publisher.publish_seconds_max * 1e3,
                   publish_frac=publisher.publish_seconds_total / (t1 - t0))
    return row


def _inputs(shape: tuple[int, ...], n: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.random(shape, dtype=np.float32) for _ in range(n)]


def _predictor_cases(args: argparse.Namespace, reps: int, seconds: float) -> list[dict]:
    from keras_tandem import Predictor, PublishWeights

    trainer = _Trainer(args.model, args.batch_size, seconds)
    inputs = _inputs(trainer.shape)
    reps_rows: list[dict] = []
    with Predictor(trainer.model, max_delay_ms=args.max_delay_ms) as predictor:
        predictor.predict(inputs[0])
        call_path = predictor.stats().get("call_path")
        _report.console.print(f"  Predictor call path: {call_path}")

        def call(x):
            return predictor.predict(x, return_version=True)[1]

        def publisher():
            return PublishWeights(predictor, every_seconds=args.publish_seconds)

        cases = (("alone", None), ("Predictor, open loop", args.rate), ("alone", None),
                 ("Predictor, closed loop", None))
        for rep, (case, rate) in _sequence(cases, reps):
            if case == "alone":
                row = _case(trainer, None)
            else:
                row = _case(trainer, _Load(call, inputs, args.threads, rate), publisher(),
                            predictor)
                row["call_path"] = call_path
            row.update(case=case, rep=rep)
            reps_rows.append(row)
            _progress(row)
    return reps_rows


def _sequence(cases: tuple, reps: int) -> list[tuple[int, tuple]]:
    """`(rep, case)` in run order: the cases `reps` times, then one more "alone" run.

    Every case then has an "alone" run right before and right after it.
    """
    return [(rep, case) for rep in range(reps) for case in cases] + [(reps - 1, cases[0])]


def _progress(row: dict) -> None:
    served = ""
    if row.get("served_rps") is not None and row.get("p99_ms") is not None:
        served = f"  served {row['served_rps']:,.0f} req/s  p99 {row['p99_ms']:.1f} ms"
        if row.get("p99_sent_ms") is not None:  # None: no request was sent before the stop
            served += f" ({row['p99_sent_ms']:.1f} ms from sending)"
    _report.console.print(f"  {row['case']:<26} rep {row['rep']}: train "
                          f"{row['train_sps']:,.0f} samples/s{served}")


def _naive_cases(args: argparse.Namespace, reps: int, seconds: float) -> list[dict]:
    """Runs `alone` and `model.predict, open loop` in a child process (it can crash)."""
    cmd = [sys.executable, "-m", "keras_tandem.bench.train_serve", "--child-naive",
           json.dumps({"model": args.model, "batch_size": args.batch_size, "rate": args.rate,
                       "threads": args.threads, "reps": reps, "seconds": seconds,
                       "publish_seconds": args.publish_seconds})]
    _report.console.print("  naive model.predict case (child process) ...")
    rows: list[dict] = []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=120 + reps * (seconds * 20 + 30),
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        out, code, err = proc.stdout, proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        code, err = "timeout", ""
    for line in out.splitlines():
        if line.startswith("TANDEM_ROW "):
            row = json.loads(line[len("TANDEM_ROW "):])
            rows.append(row)
            _progress(row)
    if code != 0:
        tail = err.strip().splitlines()[-1:] if err else []
        _report.console.print(f"  [red]naive child process ended with {code}[/] {tail}")
        rows.append({"case": "model.predict (crashed)", "rep": 0, "errors": str(code)})
    return rows


def _child_naive(config: dict[str, Any]) -> None:
    import keras

    trainer = _Trainer(config["model"], config["batch_size"], config["seconds"])
    copy = keras.models.clone_model(trainer.model)
    copy.set_weights(trainer.model.get_weights())
    inputs = [x[None] for x in _inputs(trainer.shape)]
    copy.predict(inputs[0], verbose=0)

    class CopyWeights(keras.callbacks.Callback):
        """The naive way to publish: set_weights on the serving copy, every n seconds."""

        published, total = 0, 0.0
        seconds_between = config["publish_seconds"]
        publish_seconds_max = 0.0

        def on_train_begin(self, logs=None):
            self._last = _now()

        def on_train_batch_end(self, batch, logs=None):
            t = _now()
            if t - self._last >= self.seconds_between:
                copy.set_weights(self.model.get_weights())
                self.published += 1
                elapsed = _now() - t
                self.total += elapsed
                self.publish_seconds_max = max(self.publish_seconds_max, elapsed)
                self._last = _now()

        @property
        def publish_seconds_total(self):
            return self.total

        @property
        def publish_seconds_mean(self):
            return self.total / self.published if self.published else 0.0

    def call(x):
        copy.predict(x, verbose=0)

    for rep, case in _sequence(("alone", "model.predict, open loop"), config["reps"]):
        if case == "alone":
            row = _case(trainer, None)
        else:
            row = _case(trainer, _Load(call, inputs, config["threads"], config["rate"]),
                        CopyWeights())
        row.update(case=case, rep=rep)
        print("TANDEM_ROW " + json.dumps(row), flush=True)


# ---------------------------------------------------------------- report


def _combine(rows: list[dict]) -> list[dict]:
    """One row per case: medians over repetitions (and the minimum training speed)."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        reps = [r for r in rows if r["case"] == case]
        row: dict[str, Any] = {"case": case, "reps": len(reps)}
        for key in set().union(*reps) - {"case", "rep"}:
            values = [r[key] for r in reps if isinstance(r.get(key), (int, float))]
            if values:
                row[key] = statistics.median(values)
            elif reps[0].get(key) is not None:
                row[key] = reps[0][key]
        speeds = [r["train_sps"] for r in reps if "train_sps" in r]
        if speeds:
            row["train_sps_min"] = min(speeds)
        out.append(row)
    return out


_NAIVE_PROCESS = ("alone (naive process)", "model.predict, open loop")


def _pair_with_alone(raw: list[dict]) -> None:
    """Sets each case's `train_vs_alone` against the "alone" runs beside it in its process.

    `raw` is in run order. A case is compared with the mean training speed
    of the "alone" run right before it and the one right after it (either
    alone where only one ran), so a drift of training speed over the run
    cancels out. Also `serve_cpu_us`, where the CPU was measured: the case's
    CPU less those runs' mean CPU per training sample times the samples
    trained, per answered request.
    """
    for process in (True, False):
        rows = [r for r in raw if (r["case"] in _NAIVE_PROCESS) == process]
        for i, r in enumerate(rows):
            if r["case"].startswith("alone") or not r.get("train_sps"):
                continue
            before = next((a for a in reversed(rows[:i]) if _measured_alone(a)), None)
            after = next((a for a in rows[i + 1:] if _measured_alone(a)), None)
            beside = [a for a in (before, after) if a is not None]
            if not beside:
                continue
            r["train_vs_alone"] = r["train_sps"] / statistics.fmean(
                a["train_sps"] for a in beside)
            if r.get("answered") and all(a.get("cpu_s") and a.get("train_samples")
                                         for a in beside):
                per_sample = statistics.fmean(a["cpu_s"] / a["train_samples"] for a in beside)
                training = per_sample * r["train_samples"]
                r["serve_cpu_us"] = (r["cpu_s"] - training) / r["answered"] * 1e6


def _measured_alone(row: dict) -> bool:
    return row["case"].startswith("alone") and bool(row.get("train_sps"))


def _ratios(rows: list[dict]) -> dict[str, float | None]:
    by = {r["case"]: r for r in rows}
    open_, closed = by.get("Predictor, open loop", {}), by.get("Predictor, closed loop", {})
    naive = by.get("model.predict, open loop", {})
    return {
        "train_vs_alone": open_.get("train_vs_alone"),
        "train_vs_alone_naive": naive.get("train_vs_alone"),
        "train_vs_alone_closed": closed.get("train_vs_alone"),
        "served_fraction": open_.get("served_fraction"),
        "p99_ms": open_.get("p99_ms"),
        "p99_sent_ms": open_.get("p99_sent_ms"),
        "served_fraction_naive": naive.get("served_fraction"),
        "p99_ms_naive": naive.get("p99_ms"),
        "served_rps_closed": closed.get("served_rps"),
        "p99_ms_closed": closed.get("p99_ms"),
        "publish_frac": open_.get("publish_frac"),
        "mean_batch": open_.get("mean_batch"),
        "cpu_us": open_.get("cpu_us"),
        "serve_cpu_us": open_.get("serve_cpu_us"),
        "worker_cpu_us": open_.get("worker_cpu_us"),
        "client_cpu_us": open_.get("client_cpu_us"),
    }


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark and prints the table and ratio lines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    reps = args.reps or 5  # a median of five paired ratios: two odd runs cannot move it
    if args.rate <= 0 or args.threads < 1 or reps < 1 or seconds <= 0:
        _report.console.print("--rate, --threads, --reps and --seconds must be positive")
        return 2
    backend = _report.backend()
    _report.console.print(
        f"[bold]tandem bench train-serve[/] backend={backend} model={args.model} "
        f"{args.threads} client threads, "
        f"open loop {args.rate:,.0f} req/s, ~{seconds:g} s of training per case, {reps} reps")
    raw = _predictor_cases(args, reps, seconds)
    if not args.skip_naive:
        # Its slowdown is many-fold, not a few percent: one repetition shows it in --quick.
        for row in _naive_cases(args, 1 if args.quick else reps, seconds):
            if row["case"] == "alone":
                row["case"] = "alone (naive process)"
            raw.append(row)
    _pair_with_alone(raw)
    rows = _combine(raw)
    ratios = _ratios(rows)
    _report.print_table(
        f"train while serving ({args.model}, Keras backend {backend}, {args.threads} client "
        f"threads, open loop {args.rate:,.0f} req/s)",
        [{col: r.get(key) for col, key in COLUMNS.items()} for r in rows], list(COLUMNS))
    _report.print_ratios(ratios)
    if args.json:
        config = {"model": args.model, "rate": args.rate, "threads": args.threads,
                  "max_delay_ms": args.max_delay_ms,
                  "seconds": seconds, "reps": reps, "batch_size": args.batch_size,
                  "publish_seconds": args.publish_seconds, "quick": bool(args.quick)}
        _report.write_json(args.json, "train-serve", config, rows, ratios, repetitions=raw)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child-naive":
        _child_naive(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python -m keras_tandem.bench.train_serve --child-naive CONFIG_JSON")
