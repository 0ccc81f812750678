"""Serve a model over HTTP with TensorFlow Serving's REST API.

A thin layer over `Predictor`: `serve()` (in `_serve`) runs an aiohttp
server on a background thread; `_app` maps TF Serving's endpoints and error
statuses onto the Predictor's API; `_protocol` owns the JSON formats;
`_repository` decides which Predictor answers and loads new versions from a
base directory; `_savedmodel` turns a SavedModel's signatures into Keras
models and its `signature_def` into metadata; `_metrics` exposes Prometheus metrics; `_connections`
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
