"""Shared test setup: TensorFlow quiet, the Keras TensorFlow backend, small models."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
