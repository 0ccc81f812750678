"""TensorFlow SavedModels as servable Keras models.

Owns:
- recognising a SavedModel directory (`saved_model.pb`) and fingerprinting
  its files, so the watcher can tell when one has stopped changing;
- `signature_models`: one functional Keras model per serving signature,
  wrapping the signature's function in a `keras.layers.TFSMLayer`, so the
  batching `Predictor` serves it as any Keras model (inputs by name, outputs
  a dict keyed by the signature's output names);
- `signature_def_doc`: the SavedModel's own `signature_def` map as TF
  Serving's metadata JSON.

Which version serves, and swapping, stay in `_repository`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SAVED_MODEL_FILE = "saved_model.pb"
DEFAULT_SIGNATURE = "serving_default"


def is_saved_model_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a `saved_model.pb`."""
    return (Path(path) / SAVED_MODEL_FILE).is_file()


def dir_signature(path: Path) -> tuple[int, int] | None:
    """`(total size, newest mtime_ns)` of every file under `path`; None if unreadable."""
    size, mtime = 0, 0
    try:
        for root, _, files in os.walk(path):
            for f in files:
                st = os.stat(os.path.join(root, f))
                size += st.st_size
                mtime = max(mtime, st.st_mtime_ns)
    except OSError:
        return None
    return size, mtime


def _signature_layer_class() -> type:
    import keras

    class SignatureCall(keras.layers.TFSMLayer):
        """Calls one signature of a SavedModel with its inputs by name."""

        def __init__(self, filepath: str, call_endpoint: str, **kwargs: Any):
            super().__init__(filepath, call_endpoint=call_endpoint, **kwargs)
            # TFSMLayer prefers an attribute of that name (`model.export()`'s `serve`
            # is a positional tf.function); a signature takes its inputs by name.
            self.call_endpoint_fn = self._reloaded_obj.signatures[call_endpoint]

        def call(self, inputs: dict[str, Any], training: bool = False) -> Any:
            return self.call_endpoint_fn(**inputs)

    return SignatureCall


def signature_models(path: str | os.PathLike) -> dict[str, Any]:
    """One functional Keras model per serving signature of a SavedModel.

    The weights stay in the SavedModel's variables, captured by its
    functions: a Predictor built on such a model cannot take new weights, so
    a new version is a new Predictor.

    Args:
        path: the SavedModel directory.

    Returns:
        `{signature name: keras.Model}`; the model's inputs are named as the
        signature's inputs, its output is a dict keyed by the signature's
        output names (the tensor alone for a signature with one output).

    Raises:
        ValueError: the SavedModel has no signatures, or a signature input
            has no batch dimension of unknown size.
    """
    import keras

    path = str(path)
    # Names from the proto: each TFSMLayer loads the SavedModel itself.
    names = [n for n in signature_def_doc(path) if not n.startswith("__")]
    if not names:
        raise ValueError(f"The SavedModel at {path} has no signatures to serve; export it with "
                         "`model.export(path)` or `tf.saved_model.save(..., signatures=...)`.")
    layer_class = _signature_layer_class()
    models = {}
    for name in names:
        layer = layer_class(path, call_endpoint=name, trainable=False)
        specs = layer.call_endpoint_fn.structured_input_signature[1]
        inputs = {}
        for key, spec in sorted(specs.items()):
            shape = spec.shape
            if shape.rank is None or shape.rank == 0 or shape[0] is not None:
                raise ValueError(
                    f"Signature {name!r} of the SavedModel at {path}: input {key!r} has shape "
                    f"{shape}, without a batch dimension of unknown size (-1) first. Only "
                    "batched signatures can be served; export the model with a leading "
                    "None dimension.")
            inputs[key] = keras.Input(tuple(shape[1:]), dtype=spec.dtype.name, name=key)
        outputs = layer(inputs)
        if len(outputs) == 1:
            # TF Serving leaves out the name of a lone output: answers are plain lists.
            outputs = next(iter(outputs.values()))
        models[name] = keras.Model(inputs, outputs, name=f"savedmodel_{name}")
    return models


def signature_def_doc(path: str | os.PathLike) -> dict[str, Any]:
    """The SavedModel's `signature_def` map, as TF Serving's metadata writes it.

    Args:
        path: the SavedModel directory.

    Returns:
        `{signature name: {"inputs", "outputs", "method_name"}}` with tensor
        names such as `x:0`, dtypes such as `DT_FLOAT` and shapes as `dim`
        lists (`"-1"` for an unknown size).
    """
    from google.protobuf.json_format import MessageToDict
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    file = Path(path) / SAVED_MODEL_FILE
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(file.read_bytes())
    except DecodeError as e:
        raise ValueError(f"{file} is not a valid SavedModel ({e}); write it with "
                         "`model.export(path)` or `tf.saved_model.save`.") from None
    if not proto.meta_graphs:
        raise ValueError(f"{file} is not a valid SavedModel (it holds no meta graph); write "
                         "it with `model.export(path)` or `tf.saved_model.save`.")
    meta_graph = proto.meta_graphs[0]
    doc = {}
    for name, sig in sorted(meta_graph.signature_def.items()):
        entry = MessageToDict(sig, preserving_proto_field_name=True,
                              always_print_fields_with_no_presence=True)
        if not entry.get("defaults"):
            entry.pop("defaults", None)  # a newer field TF Serving's answers do not carry
        doc[name] = entry
    return doc
