"""The naive ways, run in a child process: they can take the process down.

Each client thread calls `model.predict(x, verbose=0)` or `model(x)` itself;
once, 64 such threads aborted the whole process ("Mutex corrupt"), so
`tandem bench predict` runs them here and reads one JSON line per row.

Usage: python -m keras_tandem.bench._naive MODEL DURATION THREADS...
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from keras_tandem.bench._clients import run_clients
    from keras_tandem.bench._models import build_model, example_shape

    model_name, duration = argv[0], float(argv[1])
    model = build_model(model_name)
    shape = example_shape(model)
    rng = np.random.default_rng(1)
    inputs = [rng.random((1, *shape), dtype=np.float32) for _ in range(16)]
    model.predict(inputs[0], verbose=0)
    model(inputs[0], training=False)
    techniques = {
        "model.predict": lambda x: model.predict(x, verbose=0),
        "model(x)": lambda x: model(x, training=False),
    }
    for threads in map(int, argv[2:]):
        for name, call in techniques.items():
            row = run_clients(call, inputs, threads, duration)
            print(json.dumps({"technique": name, "threads": threads, **row}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
