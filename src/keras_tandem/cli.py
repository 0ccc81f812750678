"""The `tandem` command: argument parsing only; the work lives in the modules.

Subcommands:
- `tandem bench SCENARIO`: benchmarks, one module each in `keras_tandem.bench`.
- `tandem demo`: train in the background while threads predict (see `demo.py`).
- `tandem check MODEL`: will a model serve, with model.predict's answers (`check.py`).
- `tandem serve`, `tandem worker` (a local multi-worker cluster, `cluster/launcher.py`),
  `tandem data-service dispatcher|worker` (`data/service.py`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
import warnings

# Scenario name -> module in keras_tandem.bench exposing add_arguments() and run().
BENCHES = {
    "predict": "keras_tandem.bench.predict",
    "http": "keras_tandem.bench.http",
    "train-serve": "keras_tandem.bench.train_serve",
    "pipeline": "keras_tandem.bench.pipeline",
    "scale": "keras_tandem.bench.scale",
    "memory": "keras_tandem.bench.memory",
}

# Other subcommands -> module exposing add_arguments() and run().
COMMANDS = {
    "check": ("keras_tandem.check",
              "check a model before serving: Predictor vs model.predict, speed"),
    "demo": ("keras_tandem.demo", "train a model in the background while threads predict"),
    "serve": ("keras_tandem.server.cli", "serve a model over HTTP (TF Serving's REST API)"),
    "worker": ("keras_tandem.cluster.launcher",
               "train on a local multi-worker cluster (127.0.0.1)"),
    "data-service": ("keras_tandem.data.service",
                     "run a tf.data service dispatcher or worker"),
}


# Commands whose own process never imports TensorFlow (`tandem worker` only starts
# processes, and drops their start-up lines as it forwards their output). Under
# another Keras backend no command imports it up front.
_WITHOUT_TENSORFLOW = {"worker"}
# The prefix of an Abseil log line: severity, date, time, thread id.
_ABSL_PREFIX = re.compile(rb"^[IWEF]\d{4} [\d:.]+\s+\d+ ")
_ABSL_BEFORE_INIT = b"WARNING: All log messages before absl::InitializeLog()"


# On a machine with no NVIDIA driver, TensorFlow's CUDA build says so twice,
# once as an ERROR; it runs on the CPU as intended, so `tandem` drops both.
_NVIDIA_DRIVER = "/proc/driver/nvidia/version"
_NO_GPU_LINES = (b"Could not find cuda drivers", b"failed call to cuInit")


def _keras_backend() -> str:
    """The backend Keras will choose, read as Keras reads it, without importing Keras.

    `KERAS_BACKEND`, else `backend` in Keras' `keras.json`, else `tensorflow`.
    """
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(os.path.expanduser(home), "keras.json")) as f:
            return str(json.load(f).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_tensorflow_once_logged() -> None:
    """Imports TensorFlow with each of its start-up log lines printed once.

    TensorFlow 2.21 logs its start-up lines (oneDNN, CUDA factories) before
    Abseil logging is initialised, so `TF_CPP_MIN_LOG_LEVEL` does not apply to
    them, and two of its shared libraries each carry a copy of the code that
    logs them: every line comes twice. So during the import, file descriptor
    2 goes through a pipe to a forked filter that drops repeats. A process,
    not a thread: the import holds the GIL, and if it aborts (a CPU without
    the instructions the build needs), the filter still prints why.
    """
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return  # already imported, or not installed (another Keras backend)
    if not hasattr(os, "fork"):
        importlib.import_module("tensorflow")
        return
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    with warnings.catch_warnings():
        # Python 3.12+ warns when forking with native threads alive (NumPy's
        # BLAS pool): the child only copies bytes between two descriptors.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    no_driver = not os.path.exists(_NVIDIA_DRIVER)
    if pid == 0:  # the filter: never returns
        code = 1
        try:
            os.close(write_end)
            _drop_repeated_lines(read_end, saved, _NO_GPU_LINES if no_driver else ())
            code = 0
        finally:
            os._exit(code)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        tf = importlib.import_module("tensorflow")
        look_for_gpus = getattr(getattr(tf, "config", None), "list_physical_devices", None)
        if no_driver and look_for_gpus is not None:
            # The CUDA build logs an ERROR line when it first looks for a GPU and
            # finds no driver: look now, through the filter, which drops it.
            look_for_gpus("GPU")
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the filter sees the end of its input, prints the rest and exits
        os.close(saved)
        os.waitpid(pid, 0)


def _drop_repeated_lines(read_fd: int, out_fd: int, drop: tuple[bytes, ...] = ()) -> None:
    """Copies `read_fd` to `out_fd` line by line, each Abseil log line only once.

    Abseil's notice that logging is not initialised yet is dropped: it says
    nothing to a user of `tandem`; so are lines containing any of `drop`.
    """
    seen: set[bytes] = set()
    pending = b""
    while chunk := os.read(read_fd, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.startswith(_ABSL_BEFORE_INIT) or any(d in line for d in drop):
                continue  # says only that the lines after it ignore TF_CPP_MIN_LOG_LEVEL
            if _ABSL_PREFIX.match(line):
                key = _ABSL_PREFIX.sub(b"", line)
                if key in seen:
                    continue
                seen.add(key)
            _write_all(out_fd, line + b"\n")
    if pending:
        _write_all(out_fd, pending)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _available(modules: dict[str, str]) -> dict[str, object]:
    found = {}
    for name, module in modules.items():
        try:
            found[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return found


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `tandem`, with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Train a Keras model and predict with it from many threads at once.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="measure each technique against its baselines")
    scenarios = bench.add_subparsers(dest="scenario", required=True)
    for name, module in _available(BENCHES).items():
        p = scenarios.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    for name, module in _available({k: v[0] for k, v in COMMANDS.items()}).items():
        p = sub.add_parser(name, help=COMMANDS[name][1])
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `tandem` with `argv` (default: the command line) and returns its exit code."""
    _quiet_tensorflow()
    args = build_parser().parse_args(argv)
    if args.command not in _WITHOUT_TENSORFLOW and _keras_backend() == "tensorflow":
        # Another backend never imports TensorFlow for the features it runs; the
        # TensorFlow-only ones (SavedModels, tf.data) import it when they need it.
        _import_tensorflow_once_logged()
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
