"""Cluster: where this process trains, and starting workers.

Owns `choose_strategy` (`strategy.py`), the one parser of `TF_CONFIG` and
`cluster_position` (`tf_config.py`), the local launcher behind `tandem
worker` (`launcher.py`) and the built-in training job it runs (`job.py`).

`strategy.py`, `tf_config.py` and `launcher.py` must not import `serving`,
`training`, `data`, `server` or `bench`; `job.py` is a program built on the
public API and may import `training` and `serving`.
"""
