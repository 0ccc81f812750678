"""Serve models over HTTP (and gRPC) with TensorFlow Serving's APIs.

A thin layer over `Predictor`: `serve()` (in `_serve`) runs an aiohttp
server (and, with `grpc_port`, `_grpc`'s gRPC server) on background
threads; `_app` maps TF Serving's endpoints and error statuses onto the
Predictor's API; `_protocol` owns the JSON formats; `_registry` holds the
served models by name and is the `ModelLookup` (`_lookup`) both front ends
resolve requests through; `_model_config` reads and watches TF Serving's
`--model-config-file`; `_repository` holds a model's loaded versions, labels
and version policy, and loads versions from a base directory; `_savedmodel`
turns a SavedModel's signatures into Keras models and its `signature_def`
into metadata; `_examples` owns classify/regress (tf.Example inputs,
`results`); `_warmup` replays SavedModel warm-up records;
`_metrics` exposes Prometheus metrics; `_connections`
(the socket, the connection cap, HTTP parse errors as JSON), `_limits`
(memory and descriptor limits, the byte budget, rate-limited logs) and
`_json_arrays` (large numeric bodies decoded in pieces) keep abusive clients
from taking the process down; `cli` is `tandem serve`. All batching and
prediction logic stays in `Predictor`.
`locate_model` and `load_keras_model` are how the server finds and loads a
model, named here for `tandem check`; `parse_predict_body`, how it parses a
`:predict` body, for the HTTP ceiling of `tandem bench http`.
"""

from keras_tandem.server._protocol import parse_predict_body
from keras_tandem.server._repository import load_keras_model, locate_model
from keras_tandem.server._serve import DEFAULT_MAX_BODY_BYTES, ServerHandle, serve

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerHandle", "load_keras_model", "locate_model",
           "parse_predict_body", "serve"]
