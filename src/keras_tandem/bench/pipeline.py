"""Input pipelines: a small CNN's epoch fed by a sequential map, make_pipeline, and memory.

For each preprocess, a CPU-heavy one (blur passes and standardisation of
32x32x3 images) and an I/O-like one (a sleep of 1 ms per example in
`tf.py_function`, like reading one file each, in turn), one epoch of a
small CNN is timed fed by: (a) a sequential `Dataset.map` (no parallel map,
no prefetch), (b) `make_pipeline` as we recommend it: the preprocess
vectorised (`vectorized=True`: one call per batch, so one `tf.py_function`
call reads a batch's files), with `io_threads` for the I/O one, (b1) the
same per example (a call per example: each `tf.py_function` call has a
fixed CPU cost, which on a busy CPU no parallelism hides), (b') as (b) with
`cache=True, cache_preprocessed=True` (the preprocess then runs in the
warm-up epoch only), and (c) the preprocessed batches held in memory
(compute only). Then `probe_input` judges (b), and its verdict is checked
against the measurement: input-bound means (b) takes over 1.1x as long as
(c).

Epochs are timed by a callback from the first `on_train_batch_begin` to the
last `on_train_batch_end`, never around `fit`: destroying a used tf.data
iterator with autotune on can stall until the autotune thread's next wake-up
(up to seconds), and that teardown is not training time. `fit` runs on a
thread that is left to finish that teardown on its own. The first epoch of
each run warms up (tracing, autotune ramp-up), and a run's time is the
faster of the two epochs after it. Every technique but (a) runs once per
round, `--repeats` rounds, so a drift of the host's speed touches all
alike; `vs_compute` (and the `*_vs_compute_*` ratios) is the median over
rounds of each run's time over the compute-only run of the same round.
(a), many times slower, runs once with two timed epochs. The table gives
the minimum and median epoch time of each; below 1 means faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import threading
import time
from typing import Any

import numpy as np

from keras_tandem.bench import _report

COLUMNS = ["preprocess", "technique", "min_s", "median_s", "samples_per_s", "vs_compute"]
BATCH = 64
SHAPE = (32, 32, 3)
# Tolerance of the target (b) <= 1.1 x (c); also where "input-bound" starts.
TOLERANCE = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `tandem bench pipeline`."""
    parser.add_argument("--quick", action="store_true", help="short run, well under a minute")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds: timed epochs of each technique, each after a "
                             "warm-up epoch (default 5; --quick 3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="batches of 64 per epoch (default 96; --quick 24)")
    parser.add_argument("--blur", type=int, default=4,
                        help="blur passes of the CPU-heavy preprocess (default 4)")
    parser.add_argument("--io-ms", type=float, default=1.0,
                        help="sleep per example of the I/O-like preprocess (default 1 ms)")
    parser.add_argument("--io-threads", type=int, default=32,
                        help="make_pipeline's io_threads for the I/O-like preprocess")
    parser.add_argument("--json", metavar="PATH", help="write rows, ratios and machine here")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark and prints the table and ratio lines."""
    if _report.requires_tensorflow("pipeline", "make_pipeline and probe_input build tf.data "
                                               "pipelines"):
        return 2
    from keras_tandem.data.pipeline import make_pipeline
    from keras_tandem.data.probe import probe_input

    repeats = args.repeats or (3 if args.quick else 5)
    steps = args.steps or (24 if args.quick else 96)
    console = _report.console
    console.print(f"[bold]tandem bench pipeline[/] {steps} batches of {BATCH} x {SHAPE} per "
                  f"epoch, {repeats} rounds, blur={args.blur}, "
                  f"io={args.io_ms:g} ms/example, io_threads={args.io_threads}")
    rng = np.random.default_rng(0)
    n = steps * BATCH
    x = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    model = _cnn()
    cases = {
        "cpu": (cpu_preprocess(args.blur), {}),
        "io": (_io_preprocess(args.io_ms / 1e3), {"io_threads": args.io_threads}),
    }
    rows: list[dict[str, Any]] = []
    probes: dict[str, Any] = {}
    for case, (preprocess, tuned) in cases.items():
        feeds = {
            "(a) sequential map": _sequential(x, y, preprocess),
            "(b) make_pipeline": make_pipeline((x, y), preprocess=preprocess, batch_size=BATCH,
                                               shuffle=True, repeat=True, vectorized=True,
                                               **tuned),
            "(b1) make_pipeline, per example": make_pipeline(
                (x, y), preprocess=preprocess, batch_size=BATCH, shuffle=True, repeat=True,
                **tuned),
            "(b') make_pipeline, cached": make_pipeline(
                (x, y), preprocess=preprocess, batch_size=BATCH, shuffle=True, repeat=True,
                vectorized=True, cache=True, cache_preprocessed=True, **tuned),
            "(c) cached (compute only)": _in_memory(x, y, preprocess, steps),
        }
        # The sequential map once (it is many times slower: no threshold is near),
        # then the others in rounds, each round running every technique once, so
        # a drift of the host's speed touches them alike; ratios pair each
        # technique with the compute-only epoch of its own round. Compute-only
        # goes first: the first run of all also traces the train step.
        paired = [t for t in reversed(list(feeds)) if not t.startswith("(a)")]
        times: dict[str, list[float]] = {t: [] for t in paired}
        for _ in range(repeats):
            for technique in paired:
                # The faster of two epochs after the warm-up one: autotune may still
                # be raising the parallelism in the first.
                times[technique].append(min(_timed_epochs(model, feeds[technique], steps, 2)))
        times["(a) sequential map"] = _timed_epochs(model, feeds["(a) sequential map"], steps,
                                                    min(repeats, 2))
        compute = times["(c) cached (compute only)"]
        for technique in feeds:
            t = times[technique]
            row = {"preprocess": case, "technique": technique, "min_s": min(t),
                   "median_s": statistics.median(t), "samples_per_s": n / min(t),
                   "vs_compute": _vs_compute(t, compute, paired=technique in paired)}
            rows.append(row)
            console.print(f"  {case:<4} {technique:<31} min {row['min_s']:.3f} s  "
                          f"median {row['median_s']:.3f} s  vs compute {row['vs_compute']:.2f}")
        probe = probe_input(feeds["(b) make_pipeline"], model, batches=min(steps, 24),
                            max_seconds=3.0, tolerance=TOLERANCE)
        probes[case] = probe
        console.print(f"  {case:<4} probe: {probe.verdict}")

    ratios = _ratios(rows, probes)
    _report.print_table("one epoch of a small CNN, by input pipeline", rows, COLUMNS)
    _report.print_ratios(ratios)
    config = {"batch_size": BATCH, "image": list(SHAPE), "steps": steps, "repeats": repeats,
              "blur": args.blur, "io_ms": args.io_ms, "io_threads": args.io_threads,
              "quick": bool(args.quick)}
    if args.json:
        _report.write_json(args.json, "pipeline", config, rows, ratios,
                           probes={k: dataclasses.asdict(p) for k, p in probes.items()})
    return 0


def _vs_compute(times: list[float], compute: list[float], paired: bool) -> float:
    """Epoch time over compute-only: the median of per-round ratios, or of the minima."""
    if paired:
        return statistics.median(t / c for t, c in zip(times, compute))
    return min(times) / min(compute)


def _ratios(rows: list[dict], probes: dict[str, Any]) -> dict[str, float | None]:
    def row_of(case, prefix):
        return next(r for r in rows
                    if r["preprocess"] == case and r["technique"].startswith(prefix))

    ratios: dict[str, float | None] = {}
    agree = []
    for case in probes:
        ratios[f"pipeline_vs_compute_{case}"] = row_of(case, "(b)")["vs_compute"]
    for case in probes:
        ratios[f"pipeline_vs_sequential_{case}"] = \
            row_of(case, "(b)")["min_s"] / row_of(case, "(a)")["min_s"]
    for case in probes:
        ratios[f"pipeline_per_example_vs_compute_{case}"] = row_of(case, "(b1)")["vs_compute"]
    for case in probes:
        ratios[f"pipeline_cached_vs_compute_{case}"] = row_of(case, "(b')")["vs_compute"]
    for case, probe in probes.items():
        measured = ratios[f"pipeline_vs_compute_{case}"] > 1 + TOLERANCE
        agree.append(probe.input_bound == measured)
        ratios[f"probe_agrees_{case}"] = float(agree[-1])
    ratios["probe_agrees"] = float(all(agree))
    return ratios


def _cnn() -> Any:
    import keras

    from keras_tandem.bench._models import build_model

    model = build_model("cnn", seed=0)  # the same (32, 32, 3) CNN as `bench predict`
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def cpu_preprocess(blur: int):
    """Scale, blur `blur` times, standardise: works on one image or a batch."""
    import tensorflow as tf

    g = np.array([1.0, 2.0, 1.0], np.float32)
    kernel = tf.constant(np.tile((np.outer(g, g) / 16)[:, :, None, None], (1, 1, SHAPE[2], 1)))

    def preprocess(x, y):
        img = tf.cast(x, tf.float32) / 255.0
        single = img.shape.rank == 3
        if single:
            img = img[None]
        for _ in range(blur):
            img = tf.nn.depthwise_conv2d(img, kernel, [1, 1, 1, 1], "SAME")
        img = tf.image.per_image_standardization(img)
        return (img[0] if single else img), y

    return preprocess


def _io_preprocess(seconds: float):
    """Waits `seconds` per example in Python (like reading one file each, in turn), then scales.

    Works on one image or a batch: a batch waits `seconds` for each of its images.
    """
    import tensorflow as tf

    def read(x):
        time.sleep(seconds * (x.shape[0] if len(x.shape) == len(SHAPE) + 1 else 1))
        return x

    def preprocess(x, y):
        loaded = tf.py_function(read, [x], tf.uint8)
        loaded.set_shape(x.shape)
        return tf.cast(loaded, tf.float32) / 255.0, y

    return preprocess


def _sequential(x: np.ndarray, y: np.ndarray, preprocess) -> Any:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).map(preprocess).batch(BATCH).repeat()
    options = tf.data.Options()
    # Without these, tf.data would parallelise a stateless map and add a prefetch.
    options.experimental_optimization.map_parallelization = False
    options.experimental_optimization.inject_prefetch = False
    return ds.with_options(options)


def _in_memory(x: np.ndarray, y: np.ndarray, preprocess, steps: int) -> Any:
    import tensorflow as tf

    xs, ys = [], []
    for i in range(steps):
        xb, yb = preprocess(tf.constant(x[i * BATCH:(i + 1) * BATCH]),
                            tf.constant(y[i * BATCH:(i + 1) * BATCH]))
        xs.append(xb)
        ys.append(yb)
    return tf.data.Dataset.from_tensor_slices((tf.stack(xs), tf.stack(ys))).repeat()


def _timed_epochs(model: Any, dataset: Any, steps: int, repeats: int) -> list[float]:
    """Epoch times after one warm-up epoch, timed inside `fit` by a callback."""
    import keras

    done = threading.Event()
    times: list[float] = []
    failure: list[BaseException] = []

    class Timer(keras.callbacks.Callback):
        start = 0.0
        end = 0.0

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if epoch > 0:
                times.append(self.end - self.start)

        def on_train_end(self, logs=None):
            done.set()

    def fit():
        try:
            model.fit(dataset, steps_per_epoch=steps, epochs=repeats + 1, verbose=0,
                      shuffle=False, callbacks=[Timer()])
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            failure.append(e)
            done.set()

    # The fit thread may then sit in the iterator's teardown stall; nobody waits for it.
    threading.Thread(target=fit, name="bench-pipeline-fit", daemon=True).start()
    done.wait()
    if failure:
        raise failure[0]
    return times
