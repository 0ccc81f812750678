"""The `tandem` command: argument parsing only; the work lives in the modules.

Subcommands:
- `tandem bench SCENARIO`: benchmarks, one module each in `keras_tandem.bench`.
- `tandem demo`: train in the background while threads predict (see `demo.py`).
- `tandem serve`, `tandem worker` (a local multi-worker cluster, `cluster/launcher.py`),
  `tandem data-service dispatcher|worker` (`data/service.py`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Scenario name -> module in keras_tandem.bench exposing add_arguments() and run().
BENCHES = {
    "predict": "keras_tandem.bench.predict",
    "http": "keras_tandem.bench.http",
    "train-serve": "keras_tandem.bench.train_serve",
    "pipeline": "keras_tandem.bench.pipeline",
    "scale": "keras_tandem.bench.scale",
}

# Other subcommands -> module exposing add_arguments() and run().
COMMANDS = {
    "demo": ("keras_tandem.demo", "train a model in the background while threads predict"),
    "serve": ("keras_tandem.server.cli", "serve a model over HTTP (TF Serving's REST API)"),
    "worker": ("keras_tandem.cluster.launcher",
               "train on a local multi-worker cluster (127.0.0.1)"),
    "data-service": ("keras_tandem.data.service",
                     "run a tf.data service dispatcher or worker"),
}


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
