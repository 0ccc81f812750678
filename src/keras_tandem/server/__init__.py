"""Serve a model over HTTP with TensorFlow Serving's REST API.

A thin layer over `Predictor`: `serve()` (in `_serve`) runs an aiohttp
server on a background thread; `_app` maps TF Serving's endpoints and error
statuses onto the Predictor's API; `_protocol` owns the JSON formats;
`_repository` decides which Predictor answers and loads new versions from a
base directory; `_metrics` exposes Prometheus metrics; `cli` is
`tandem serve`. All batching and prediction logic stays in `Predictor`.
"""

from keras_tandem.server._serve import DEFAULT_MAX_BODY_BYTES, ServerHandle, serve

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerHandle", "serve"]
