"""Training: fit in the background, publish weights to Predictors, train on many workers.

Owns `train_in_background` and its `TrainingRun` handle (`background.py`),
the `PublishWeights` callback (`publish.py`), the training loop used under
`MultiWorkerMirroredStrategy` (`_multiworker.py`), and turning what a user
passes as data into datasets (`_inputs.py`, shared by both loops).

May import `serving` (a Predictor is what weights are published to, through
its public API only) and `cluster` (the place of this process in a cluster,
the collective timeout `choose_strategy` was given).
Must not import: `server`, `bench`, `data` (tf.data pipelines are passed in
as datasets). Imports Keras at module level (load it lazily); TensorFlow only
on Keras' TensorFlow backend (`_inputs`, `_multiworker` and the traced weight
read), so JAX and PyTorch users never load it.
"""
