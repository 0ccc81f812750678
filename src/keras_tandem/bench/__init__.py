"""`tandem bench` scenarios: each technique side by side with its baselines.

Each scenario module exposes `add_arguments(parser)` and `run(args) -> int`;
`_report` prints the table and the named ratio lines and writes `--json` and
`--plot` output the same way for all of them.
`run_clients` (the closed-loop client harness) is named here for `tandem check`.
"""

from keras_tandem.bench._clients import run_clients

__all__ = ["run_clients"]
