"""The built-in training job that `tandem worker` runs on each worker of a local cluster.

Run as `python -m keras_tandem.cluster.job [options]` with TF_CONFIG set (by
`tandem worker`, or by hand on real machines). Owns only the wiring:
`choose_strategy` first, a small CNN on scikit-learn's bundled 8x8 digits
(or synthetic data) built under the strategy, `train_in_background`, and one
line per epoch. With `--serve`, the chief also serves the model with a
`Predictor` that training publishes to, and checks it at the end. With
`--report DIR`, each worker writes `DIR/worker_<i>.json` (losses, start
epoch, steps, epoch times) and `DIR/worker_<i>.npz` (final weights) for tests and benches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of the job to `parser` (also used by `tandem worker`)."""
    parser.add_argument("--epochs", type=int, default=2, help="epochs to train (default 2)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="batch per worker (global batch = this x workers; default 32)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="backup folder: a restarted cluster resumes from the last epoch")
    parser.add_argument("--data", choices=("digits", "synthetic"), default="digits",
                        help="scikit-learn's 8x8 digits (default) or synthetic data")
    parser.add_argument("--rows", type=int, default=None,
                        help="training rows (default: all digits, 4096 synthetic)")
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn",
                        help="a small CNN (default) or a small MLP")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--validation-split", type=float, default=0.0,
                        help="validate on this last fraction of the rows at each epoch end")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="global steps per epoch (default: one pass over the rows)")
    parser.add_argument("--step-delay", type=float, default=0.0,
                        help="sleep after each step, seconds (to watch or to kill mid-run)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="keep the rows in order (to compare with a single-process run)")
    parser.add_argument("--serve", action="store_true",
                        help="the chief serves the model with a Predictor while it trains")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="write worker_<i>.json and worker_<i>.npz here")


def make_data(kind: str, rows: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training arrays: digits as (n, 8, 8, 1) floats in [0, 1], or synthetic data alike."""
    if kind == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype("float32")[..., None]
        y = digits.target.astype("int32")
    else:
        rng = np.random.default_rng(seed)
        n = rows or 4096
        y = rng.integers(0, 10, n).astype("int32")
        centers = rng.normal(size=(10, 8, 8, 1)).astype("float32")
        x = centers[y] + rng.normal(scale=1.0, size=(n, 8, 8, 1)).astype("float32")
    if rows:
        x, y = x[:rows], y[:rows]
    return x, y


def build_model(kind: str, lr: float, seed: int) -> Any:
    """A compiled small CNN or MLP for 8x8x1 inputs and 10 classes (build it in the scope)."""
    import keras

    keras.utils.set_random_seed(seed)
    body = [keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(), keras.layers.Flatten()] if kind == "cnn" else \
        [keras.layers.Flatten(), keras.layers.Dense(64, activation="relu")]
    model = keras.Sequential([keras.Input((8, 8, 1)), *body,
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def run(args: argparse.Namespace) -> int:
    """Trains on this worker (all workers run it alike); returns the exit code."""
    from keras_tandem import choose_strategy, cluster_position
    from keras_tandem.cluster.strategy import describe_strategy

    strategy = choose_strategy()  # first: before TensorFlow's runtime starts
    import keras
    import tensorflow as tf

    from keras_tandem import WorkerLost, train_in_background

    multi = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    index, workers, is_chief = cluster_position(strategy)
    say = print
    say(f"{describe_strategy(strategy)}; {'chief' if is_chief else 'worker'} {index} of {workers}")
    x, y = make_data(args.data, args.rows, args.seed)
    with strategy.scope():
        model = build_model(args.model, args.lr, args.seed)
    predictor = None
    if args.serve and is_chief:
        from keras_tandem import Predictor

        predictor = Predictor(model)

    class EpochLines(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.first: int | None = None
            self.steps = 0
            self.epoch_s: list[float] = []
            self.t0 = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            if self.first is None:
                self.first = epoch
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if args.step_delay:
                time.sleep(args.step_delay)

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_s.append(time.perf_counter() - self.t0)
            shown = "  ".join(f"{k} {v:.4f}" for k, v in (logs or {}).items())
            say(f"epoch {epoch + 1}/{args.epochs}  {shown}  "
                f"({time.perf_counter() - self.t0:.2f} s)")

    lines = EpochLines()
    run_ = train_in_background(
        model, (x, y), epochs=args.epochs, batch_size=args.batch_size,
        shuffle=not args.no_shuffle, **({"seed": args.seed} if multi else {}),
        steps_per_epoch=args.steps_per_epoch, checkpoint_dir=args.checkpoint_dir,
        validation_split=args.validation_split,
        callbacks=[lines], publish_to=predictor)
    try:
        history = run_.join()
    except WorkerLost as e:
        say(f"stopped: {e}")
        return 3
    if predictor is not None:
        probs = predictor.predict(x[:256])
        acc = float(np.mean(np.argmax(probs, axis=-1) == y[:256]))
        say(f"served version {predictor.version}: accuracy {acc:.3f} on 256 training rows")
        predictor.close()
    weights = model.get_weights()
    if args.report:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / f"worker_{index}.npz", *weights)
        (out / f"worker_{index}.json").write_text(json.dumps({
            "index": index, "workers": workers, "chief": is_chief,
            "start_epoch": lines.first, "steps": lines.steps, "epoch_s": lines.epoch_s,
            "global_batch": args.batch_size * workers,
            "steps_per_epoch": run_.progress.steps_per_epoch,
            "loss": [float(v) for v in (history.history.get("loss") if history else [])],
            "history": {k: [float(v) for v in vs]
                        for k, vs in (history.history.items() if history else [])},
        }))
    checksum = float(sum(np.abs(w).sum() for w in weights))
    say(f"done: weights checksum {checksum:.6f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m keras_tandem.cluster.job`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(prog="python -m keras_tandem.cluster.job",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
