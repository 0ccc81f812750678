"""Data: input pipelines for training.

Owns `make_pipeline` (tuned `tf.data` from arrays, files or generators,
`pipeline.py`), `probe_input` (does training wait for its input?,
`probe.py`) and the tf.data service servers behind `tandem data-service`
(`service.py`).

Must not import: `serving`, `training`, `server`, `bench`. Imports
TensorFlow at module level: load it lazily.
"""
