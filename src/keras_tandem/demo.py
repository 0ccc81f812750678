"""`tandem demo`: train a small CNN in the background while threads predict with it.

Separation of concerns:
- `run` wires the pieces: the digits data, the model, a `Predictor`,
  `train_in_background` with a `PublishWeights`, the client threads, the live
  view, the summary table and the plot.
- `_Clients` owns the client threads and what they record (time, latency,
  correct or not, version of every answer).
- `_Timeline` turns those records and the training progress into samples
  (one per tick) for the live view and the plot.

Everything ships with the packages: scikit-learn's bundled 8x8 digits, nothing
is downloaded. It runs on any Keras backend (NumPy arrays in, no tf.data) and
says which. Heavy imports (Keras and its backend, scikit-learn, matplotlib)
happen inside `run`, so `tandem --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import threading
import time
from typing import Any

import numpy as np

_now = time.perf_counter
TICK_S = 0.1  # sampling period of the timeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `tandem demo` to `parser`."""
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default 20, or 6 with --quick)")
    parser.add_argument("--threads", type=int, default=32,
                        help="client threads predicting continuously (default 32)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (under 30 s): 6 epochs")
    parser.add_argument("--out", default="tandem-demo.png",
                        help="where to write the plot (default tandem-demo.png)")
    parser.add_argument("--publish-every", type=int, default=5, metavar="N",
                        help="publish the weights every N training batches (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


class _Clients:
    """Client threads that predict held-out digits as fast as answers come back."""

    def __init__(self, predictor: Any, x: np.ndarray, y: np.ndarray, threads: int, seed: int):
        self._predictor = predictor
        self._x, self._y = x, y
        self._stop = threading.Event()
        # One record list per thread: (answered at, latency s, correct, version).
        self.records: list[list[tuple[float, float, bool, int]]] = [[] for _ in range(threads)]
        self.errors = [0] * threads
        self._threads = [threading.Thread(target=self._client, args=(i, seed + i),
                                          name=f"demo-client-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _client(self, i: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        x, y, mine, predict = self._x, self._y, self.records[i], self._predictor.predict
        while not self._stop.is_set():
            k = int(rng.integers(len(x)))
            t0 = _now()
            try:
                probs, version = predict(x[k], return_version=True)
            except Exception:  # noqa: BLE001 - counted and shown; a client keeps going
                self.errors[i] += 1
                time.sleep(0.01)
                continue
            t1 = _now()
            mine.append((t1, t1 - t0, int(np.argmax(probs)) == y[k], version))


@dataclasses.dataclass
class _Sample:
    t: float  # seconds since the clients started
    answers: int
    served_rps: float
    p99_ms: float | None
    served_acc: float | None  # accuracy of the answers served during the tick
    version: int  # newest version served during the tick
    train_acc: float | None
    train_loss: float | None
    epoch: int
    step: int


class _Timeline:
    """Samples of served and training figures, one per tick."""

    def __init__(self, clients: _Clients, start: float):
        self._clients = clients
        self._start = start
        self._seen = [0] * len(clients.records)
        self._last = start
        self.samples: list[_Sample] = []
        self.latencies: list[np.ndarray] = []
        self.answers = 0
        self.correct = 0
        self.max_version = 0

    def tick(self, progress: Any) -> _Sample:
        now = _now()
        fresh = []
        for i, records in enumerate(self._clients.records):
            n = len(records)  # appended by one thread only: slicing up to n is safe
            fresh.extend(records[self._seen[i]:n])
            self._seen[i] = n
        lat = np.fromiter((r[1] for r in fresh), float, len(fresh))
        correct = sum(r[2] for r in fresh)
        self.latencies.append(lat)
        self.answers += len(fresh)
        self.correct += correct
        if fresh:
            self.max_version = max(self.max_version, max(r[3] for r in fresh))
        logs = progress.logs
        sample = _Sample(
            t=now - self._start,
            answers=len(fresh),
            served_rps=len(fresh) / max(now - self._last, 1e-9),
            p99_ms=float(np.percentile(lat, 99) * 1e3) if len(lat) else None,
            served_acc=correct / len(fresh) if fresh else None,
            version=self.max_version,
            train_acc=logs.get("accuracy"), train_loss=logs.get("loss"),
            epoch=progress.epoch, step=progress.step,
        )
        self._last = now
        self.samples.append(sample)
        return sample

    def p_ms(self, q: float) -> float | None:
        lat = np.concatenate(self.latencies) if self.latencies else np.zeros(0)
        return float(np.percentile(lat, q) * 1e3) if len(lat) else None


def _load_digits(seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    return tuple(train_test_split(x, digits.target.astype("int32"), test_size=0.2,
                                  random_state=seed, stratify=digits.target))


def _set_seed(seed: int) -> None:
    """Seeds as `keras.utils.set_random_seed`, which imports TensorFlow whenever installed."""
    import random

    import keras

    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)  # Keras' global seed generator starts from Python's
    np.random.seed(seed)
    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(seed)


def _build_model(seed: int) -> Any:
    import keras

    _set_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ], name="digits_cnn")
    # A modest learning rate, so that accuracy climbs over several versions.
    model.compile(keras.optimizers.Adam(3e-4), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def _fmt(v: float | None, spec: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def _live_table(sample: _Sample, epochs: int, publisher: Any) -> Any:
    from rich.table import Table

    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("training", f"epoch {sample.epoch + 1}/{epochs}  step {sample.step}",
                  f"loss {_fmt(sample.train_loss, '.3f')}",
                  f"accuracy {_fmt(sample.train_acc, '.1%')}")
    table.add_row("serving", f"{sample.served_rps:,.0f} requests/s",
                  f"p99 {_fmt(sample.p99_ms, '.1f', ' ms')}",
                  f"served accuracy {_fmt(sample.served_acc, '.1%')}")
    table.add_row("weights", f"version {sample.version} served",
                  f"{publisher.published} published",
                  f"publish stall {publisher.publish_seconds_mean * 1e3:.1f} ms mean")
    return table


def _plot(samples: list[_Sample], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    # A tick with only a few answers (the last, cut short) says little about accuracy.
    served = [(s.t, s.served_acc) for s in samples if s.answers >= 20]
    trained = [(s.t, s.train_acc) for s in samples if s.train_acc is not None]
    if served:
        ax.plot(*zip(*served, strict=True), color="tab:blue", lw=1.6,
                label="served accuracy (held-out digits)")
    if trained:
        ax.plot(*zip(*trained, strict=True), color="tab:orange", lw=1.2,
                label="training accuracy (running, per epoch)")
    ax.set_xlabel("seconds since serving started (after the first training batch)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    versions = ax.twinx()
    versions.step(t, [s.version for s in samples], where="post", color="tab:gray", lw=1,
                  alpha=0.7, label="weight version served")
    versions.set_ylabel("weight version served")
    changes = [s.t for a, s in itertools.pairwise(samples) if s.version != a.version]
    for x in changes:  # each new version, marked on the time axis
        ax.axvline(x, color="tab:gray", alpha=0.12, lw=0.8)
    lines = ax.get_legend_handles_labels()
    more = versions.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Runs the demo; returns the exit code (0 on success)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from keras_tandem import Predictor, PublishWeights, train_in_background

    console = Console(highlight=False)
    epochs = args.epochs or (6 if args.quick else 20)
    if epochs < 1 or args.threads < 1 or args.publish_every < 1 or args.batch_size < 1:
        console.print("epochs, threads, publish-every and batch-size must be >= 1")
        return 2
    began = _now()
    x_train, x_test, y_train, y_test = _load_digits(args.seed)
    model = _build_model(args.seed)
    import keras

    console.print(f"[bold]keras-tandem demo[/] (Keras backend {keras.backend.backend()}): "
                  f"training a CNN on {len(x_train)} 8x8 digits "
                  f"for {epochs} epochs while {args.threads} threads predict "
                  f"{len(x_test)} held-out digits")
    with Predictor(model, max_batch_size=256) as predictor:
        before = float(np.mean(np.argmax(predictor.predict(x_test), 1) == y_test))
        clients = _Clients(predictor, x_test, y_test, args.threads, args.seed)
        publisher = PublishWeights(predictor, every_n_batches=args.publish_every)
        train_start = _now()
        training = train_in_background(model, (x_train, y_train), epochs=epochs,
                                       batch_size=args.batch_size, callbacks=[publisher])
        # The first batch traces the training step: seconds of pure Python, which
        # would crawl with 32 threads contending for the GIL. Serving starts after it.
        with console.status("tracing the training step ..."):
            while training.progress.total_steps == 0 and not training.done:
                time.sleep(0.01)
        clients.start()
        start = _now()
        timeline = _Timeline(clients, start)
        steps = -(-len(x_train) // args.batch_size)
        bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("batches"), console=console)
        task = bar.add_task("train", total=epochs * steps)
        last_epoch = -1
        error: BaseException | None = None
        try:
            with Live(console=console, refresh_per_second=8, transient=False) as live:
                while True:
                    time.sleep(TICK_S)
                    progress = training.progress
                    sample = timeline.tick(progress)
                    bar.update(task, completed=progress.total_steps)
                    live.update(Group(bar, _live_table(sample, epochs, publisher)))
                    if not console.is_terminal and progress.epoch != last_epoch:
                        last_epoch = progress.epoch  # piped output: one line per epoch
                        console.print(f"epoch {progress.epoch + 1}/{epochs}: served "
                                      f"{sample.served_rps:,.0f} req/s, served accuracy "
                                      f"{_fmt(sample.served_acc, '.1%')}, version "
                                      f"{sample.version}")
                    if progress.done:
                        break
            if not console.is_terminal:
                console.line()  # the last frame of the live view ends without one
            try:
                training.join()
            except Exception as e:  # noqa: BLE001 - reported below; the demo closes cleanly
                error = e
            timeline.tick(training.progress)  # the answers of the last tick
        finally:
            training.stop()
            clients.stop()
        trained_s = _now() - train_start
        served_s = _now() - start
        final, final_version = predictor.predict(x_test, return_version=True)
        after = float(np.mean(np.argmax(final, 1) == y_test))
        stats = predictor.stats()

    if error is not None:
        console.print(f"[red]training failed:[/] {type(error).__name__}: {error}")
        return 1
    summary = Table(title="keras-tandem demo: summary")
    summary.add_column("", justify="left")
    summary.add_column("value", justify="right")
    answered = timeline.answers
    rows = [
        ("epochs trained", f"{epochs} ({training.progress.total_steps} batches)"),
        ("training time", f"{trained_s:.1f} s"),
        ("final training accuracy", _fmt(training.progress.epoch_logs.get("accuracy"), ".1%")),
        ("held-out accuracy, version 0 -> final", f"{before:.1%} -> {after:.1%} "
                                                   f"(version {final_version})"),
        ("served answers", f"{answered:,} ({answered / served_s:,.0f}/s, "
                           f"{args.threads} threads)"),
        ("accuracy of all served answers", _fmt(timeline.correct / max(answered, 1), ".1%")),
        ("latency p50 / p99", f"{_fmt(timeline.p_ms(50), '.2f')} / "
                              f"{_fmt(timeline.p_ms(99), '.2f', ' ms')}"),
        ("mean batch size", f"{stats['mean_batch_size']:.1f}"),
        ("versions published / served", f"{publisher.published} / "
                                        f"{len({r[3] for c in clients.records for r in c})}"),
        ("publish stall mean / max", f"{publisher.publish_seconds_mean * 1e3:.2f} / "
                                     f"{publisher.publish_seconds_max * 1e3:.2f} ms"),
        ("client errors", f"{sum(clients.errors)}"),
    ]
    for name, value in rows:
        summary.add_row(name, value)
    console.print(summary)
    _plot(timeline.samples, args.out,
          f"keras-tandem demo: {args.threads} threads predicting while a CNN trains "
          f"({publisher.published} weight versions published)")
    console.print(f"held-out accuracy {before:.1%} -> {after:.1%} over {final_version} "
                  "weight versions, served while training")
    console.print(f"plot written to {os.path.abspath(args.out)}")
    console.print(f"done in {_now() - began:.1f} s")
    return 0
