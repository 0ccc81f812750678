"""TensorFlow SavedModels as servable Keras models.

Owns:
- recognising a SavedModel directory (`saved_model.pb`) and fingerprinting
  its files, so the watcher can tell when one has stopped changing;
- loading a SavedModel once for all its signatures: a TF2 one (an object
  graph, as `model.export()` writes) with `tf.saved_model.load`; a TF1 one
  (TF Serving's own test models) by importing its graph in a
  `tf.compat.v1.wrap_function`, restoring its variables, running its init
  op, and pruning one function per signature from its input to its output
  tensors *by name*, with the shapes and dtypes the graph really has, as TF
  Serving's session loader runs it (TF2's loader trusts the declared ones,
  which old exports get wrong);
- `signature_models`: one functional Keras model per serving signature, a
  layer calling that signature's function, so the batching `Predictor`
  serves it as any Keras model (inputs by name, outputs a dict keyed by the
  signature's output names);
- `signature_def_doc`: the SavedModel's own `signature_def` map as TF
  Serving's metadata JSON.

Which version serves, and swapping, stay in `_repository`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SAVED_MODEL_FILE = "saved_model.pb"
DEFAULT_SIGNATURE = "serving_default"
SERVE_TAG = "serve"

logger = logging.getLogger("keras_tandem.server")


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


def _read_saved_model(path: str | os.PathLike) -> Any:
    """The `SavedModel` proto of a SavedModel directory."""
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
    return proto


def _serving_meta_graph(proto: Any) -> Any:
    """The meta graph TF Serving loads: tagged `serve`, else the only one."""
    for meta_graph in proto.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    return proto.meta_graphs[0]


def _is_tf1(meta_graph: Any) -> bool:
    # TF2's tf.saved_model.save (and so model.export()) always writes an object graph.
    return not meta_graph.object_graph_def.nodes


class _GraphSignature:
    """One signature of a loaded SavedModel: `call(**inputs) -> {output name: tensor}`.

    `specs` are `{input key: (per-example shape, dtype name)}`; `filler` is a
    serialized `tf.train.Example` the signature's graph parses without error
    (None if it parses none), which stands in for empty strings.
    """

    def __init__(self, call: Callable[..., dict[str, Any]], specs: dict[str, tuple],
                 filler: bytes | None = None):
        self.call = call
        self.specs = specs
        self.filler = filler


def _tf2_signatures(path: str, names: list[str]) -> dict[str, _GraphSignature]:
    """Signatures of a TF2 SavedModel, from one `tf.saved_model.load` shared by all."""
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    out = {}
    for name in names:
        fn = loaded.signatures[name]
        specs = {key: (spec.shape, spec.dtype.name)
                 for key, spec in fn.structured_input_signature[1].items()}
        # Bound to the loaded object so its variables live as long as the function.
        out[name] = _GraphSignature(functools.partial(_call_signature, fn, loaded), specs,
                                    _example_filler(fn.graph.as_graph_def()))
    return out


def _call_signature(fn: Any, _owner: Any, **inputs: Any) -> dict[str, Any]:
    return fn(**inputs)


def _tf1_signatures(path: str, meta_graph: Any, names: list[str]) -> dict[str, _GraphSignature]:
    """Signatures run by tensor name, as TF Serving's session loader runs them.

    For TF1 SavedModels, and TF2 ones declaring a fixed batch size.

    TF2's `tf.saved_model.load` builds its signature functions with the
    shapes and dtypes the `signature_def` *declares*; TF1 exports often
    declare them loosely (`half_plus_three` declares a float scalar for a
    string input), and TF Serving ignores them, feeding tensors by name.
    Here TF1's own loader (a `Session`) loads the SavedModel, which restores
    its variables and runs its init op; the graph is frozen (variables
    become constants: a version's weights never change) and imported into a
    `tf.compat.v1.wrap_function`, and each signature is that graph pruned
    from its input to its output tensors, with the shapes and dtypes the
    graph really has.
    """
    import tensorflow as tf

    tags = list(meta_graph.meta_info_def.tags) or [SERVE_TAG]
    sigs = {name: meta_graph.signature_def[name] for name in names}
    keep = sorted({info.name.split(":")[0].lstrip("^") for sig in sigs.values()
                   for info in [*sig.inputs.values(), *sig.outputs.values()]})
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        tf.compat.v1.saved_model.loader.load(session, tags, path)
        frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
            session, graph.as_graph_def(add_shapes=True), keep)
    tables = sorted({n.op for n in frozen.node if "Table" in n.op})
    if tables:
        raise ValueError(f"The TF1 SavedModel at {path} uses lookup tables ({tables}), which "
                         "cannot be served yet; export it with TF2's `tf.saved_model.save`.")
    frozen = _with_unique_function_names(_with_legacy_shapes(frozen))
    batch_of_one = _batch_of_one_placeholders(frozen, sigs)
    relaxed = {}

    def import_graph():
        for tensor_name, (dtype, shape) in batch_of_one.items():
            relaxed[tensor_name] = tf.compat.v1.placeholder(dtype, shape)
        tf.compat.v1.import_graph_def(frozen, input_map=dict(relaxed), name="")

    wrapped = tf.compat.v1.wrap_function(import_graph, [])
    imported = wrapped.graph
    filler = _example_filler(frozen)
    out = {}
    for name, sig in sigs.items():
        keys = sorted(sig.inputs)
        feeds = [relaxed[_tensor_name(sig.inputs[k].name)]
                 if _tensor_name(sig.inputs[k].name) in relaxed
                 else imported.as_graph_element(sig.inputs[k].name) for k in keys]
        fetches = {k: imported.as_graph_element(info.name) for k, info in sig.outputs.items()}
        fn = wrapped.prune(feeds=feeds, fetches=fetches)
        specs = {k: (_tf1_shape(sig.inputs[k], feed), feed.dtype.name)
                 for k, feed in zip(keys, feeds)}
        out[name] = _GraphSignature(functools.partial(_call_pruned, fn, keys, wrapped), specs,
                                    filler)
    return out


def _example_filler(graph_def: Any) -> bytes | None:
    """A serialized `tf.train.Example` holding every dense feature the graph parses, as zeros.

    The Predictor pads batches (and warms up) with empty strings, which a
    graph that parses required features refuses; this example stands in for
    them. None when the graph parses no `tf.train.Example`, or its feature
    keys are not constants.
    """
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    found = False
    for nodes in [graph_def.node, *[f.node_def for f in graph_def.library.function]]:
        by_name = {n.name: n for n in nodes}
        for node in nodes:
            if node.op not in ("ParseExample", "ParseExampleV2"):
                continue
            keys = _dense_keys(node, by_name)
            if keys is None:
                return None
            for key, dtype, shape in zip(keys, node.attr["Tdense"].list.type,
                                         node.attr["dense_shapes"].list.shape):
                size = int(np.prod([max(d.size, 1) for d in shape.dim], dtype=np.int64))
                if key in example.features.feature:  # parsed by several ops: once is enough
                    continue
                feature = example.features.feature[key]
                if dtype in (1, 2, 19):  # DT_FLOAT, DT_DOUBLE, DT_HALF
                    feature.float_list.value.extend([0.0] * size)
                elif dtype == 7:  # DT_STRING
                    feature.bytes_list.value.extend([b""] * size)
                else:
                    feature.int64_list.value.extend([0] * size)
                found = True
    return example.SerializeToString() if found else None


def _dense_keys(node: Any, by_name: dict[str, Any]) -> list[str] | None:
    """The dense feature keys of a ParseExample(V2) node, if its key inputs are constants."""
    import tensorflow as tf

    if node.op == "ParseExample":
        n_sparse, n_dense = node.attr["Nsparse"].i, node.attr["Ndense"].i
        key_inputs = node.input[2 + n_sparse:2 + n_sparse + n_dense]
    else:
        key_inputs = node.input[3:4]
    keys = []
    for name in key_inputs:
        const = by_name.get(name.lstrip("^").split(":")[0])
        if const is None or const.op != "Const":
            return None
        value = tf.make_ndarray(const.attr["value"].tensor)
        keys.extend(v.decode() if isinstance(v, bytes) else str(v)
                    for v in np.atleast_1d(value).tolist())
    return keys


def _with_legacy_shapes(graph_def: Any) -> Any:
    """`graph_def`, its old-style placeholder shapes made explicit (unknown rank).

    Old TF1 exports (half_plus_three's `tf_example`) wrote an unknown
    placeholder shape as an empty one, which today's rules read as a scalar
    when a graph is pruned; the node's recorded `_output_shapes` tell which
    was meant.
    """
    for node in graph_def.node:
        if node.op not in ("Placeholder", "PlaceholderV2") or "shape" not in node.attr:
            continue
        shape = node.attr["shape"].shape
        recorded = node.attr["_output_shapes"].list.shape if "_output_shapes" in node.attr else []
        if not shape.dim and not shape.unknown_rank and recorded and recorded[0].unknown_rank:
            shape.unknown_rank = True
    return graph_def


_IMPORTS = itertools.count()


def _with_unique_function_names(graph_def: Any) -> Any:
    """`graph_def` with its library functions renamed for this import.

    Freezing rewrites a TF2 graph's functions (variables become constants)
    under their old names; TensorFlow refuses a second, different function
    of a name this process already knows (the same SavedModel loaded
    before, or saved here).
    """
    suffix = f"_tandem{next(_IMPORTS)}"
    names = {f.signature.name: f.signature.name + suffix for f in graph_def.library.function}
    if not names:
        return graph_def

    def rename(nodes: Any) -> None:
        for node in nodes:
            for value in node.attr.values():
                if value.HasField("func") and value.func.name in names:
                    value.func.name = names[value.func.name]
                for func in value.list.func:
                    if func.name in names:
                        func.name = names[func.name]

    rename(graph_def.node)
    for function in graph_def.library.function:
        function.signature.name = names[function.signature.name]
        rename(function.node_def)
    for gradient in graph_def.library.gradient:
        gradient.function_name = names.get(gradient.function_name, gradient.function_name)
        gradient.gradient_func = names.get(gradient.gradient_func, gradient.gradient_func)
    return graph_def


def _tensor_name(name: str) -> str:
    return name if ":" in name else f"{name}:0"


def _batch_of_one_placeholders(graph_def: Any, sigs: dict[str, Any]) -> dict[str, tuple]:
    """`{tensor name: (dtype, shape)}`: signature inputs to feed with a batch of any size.

    A placeholder declared with a batch of exactly one (TF Serving's TF2
    `half_plus_two` takes `x` of shape `[1]`) is fed any batch by TF Serving,
    which ignores declared shapes, as its batching does; here it is re-fed
    through a placeholder of unknown batch size. Other fixed sizes stay
    (and are refused as unbatched).
    """
    import tensorflow as tf

    nodes = {n.name: n for n in graph_def.node}
    found = {}
    for sig in sigs.values():
        for info in sig.inputs.values():
            name = _tensor_name(info.name)
            node = nodes.get(name.split(":")[0])
            if node is None or node.op not in ("Placeholder", "PlaceholderWithDefault"):
                continue
            shape = tf.TensorShape(node.attr["shape"].shape)
            if shape.rank and shape[0] == 1:
                found[name] = (tf.dtypes.as_dtype(node.attr["dtype"].type), [None, *shape[1:]])
    return found


def _call_pruned(fn: Any, keys: list[str], _owner: Any, **inputs: Any) -> dict[str, Any]:
    return fn(*[inputs[k] for k in keys])


def _tf1_shape(info: Any, tensor: Any) -> Any:
    """The shape to serve a TF1 signature input with: as declared, else as the graph has it."""
    import tensorflow as tf

    if info.HasField("tensor_shape") and not info.tensor_shape.unknown_rank:
        declared = tf.TensorShape(info.tensor_shape)
        if declared.rank and declared[0] is None and declared.is_compatible_with(tensor.shape):
            return declared
    if tensor.shape.rank is None:
        # Nothing says more: a batch of scalars (a vector of serialized
        # tf.Example protos, the usual case, is one).
        return tf.TensorShape([None])
    return tensor.shape


def _graph_signatures(path: str) -> dict[str, _GraphSignature]:
    proto = _read_saved_model(path)
    meta_graph = _serving_meta_graph(proto)
    names = sorted(n for n in meta_graph.signature_def if not n.startswith("__"))
    if not names:
        raise ValueError(f"The SavedModel at {path} has no signatures to serve; export it with "
                         "`model.export(path)` or `tf.saved_model.save(..., signatures=...)`.")
    if _is_tf1(meta_graph) or _declares_fixed_batch(meta_graph, names):
        return _tf1_signatures(path, meta_graph, names)
    return _tf2_signatures(path, names)


def _declares_fixed_batch(meta_graph: Any, names: list[str]) -> bool:
    """Whether a signature declares an input whose first dimension has a fixed size."""
    for name in names:
        for info in meta_graph.signature_def[name].inputs.values():
            shape = info.tensor_shape
            if not shape.unknown_rank and shape.dim and shape.dim[0].size != -1:
                return True
    return False


def _signature_layer_class() -> type:
    import keras

    class SignatureCall(keras.layers.Layer):
        """Calls one signature of a loaded SavedModel with its inputs by name."""

        def __init__(self, signature: _GraphSignature, **kwargs: Any):
            super().__init__(**kwargs)
            self.signature = signature

        def call(self, inputs: dict[str, Any], training: bool = False) -> Any:
            filler = self.signature.filler
            if filler is not None:
                import tensorflow as tf

                # Padding rows (and warm-up rows) are empty strings; a graph that
                # parses required features fails on them, failing the whole batch.
                inputs = {k: tf.where(tf.equal(v, b""), filler, v) if v.dtype == tf.string
                          else v for k, v in inputs.items()}
            return self.signature.call(**inputs)

    return SignatureCall


def signature_models(path: str | os.PathLike) -> dict[str, Any]:
    """One functional Keras model per serving signature of a SavedModel.

    The SavedModel is loaded once and its signatures share its variables. A
    TF1 SavedModel (no object graph, as TF Serving's own test models) runs
    each signature by tensor name, with the shapes and dtypes its graph
    really has, as TF Serving's session loader does; a TF2 one (such as
    `model.export()` output) runs its signature functions.

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
        ValueError: the SavedModel has no signatures, or none that batches
            (an input declared with a fixed first dimension other than 1;
            such signatures are otherwise left out, with a warning), or it
            is a TF1 SavedModel using lookup tables.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"{path} is a SavedModel: SavedModels run on Keras' TensorFlow backend only, and "
            f"this process runs KERAS_BACKEND={keras.backend.backend()}. Serve a .keras file "
            "(`model.save('model.keras')`), or run with KERAS_BACKEND=tensorflow.")
    path = str(path)
    layer_class = _signature_layer_class()
    models, unbatched = {}, []
    for name, signature in _graph_signatures(path).items():
        inputs = {}
        for key, (shape, dtype) in sorted(signature.specs.items()):
            if shape.rank is None or shape.rank == 0 or shape[0] is not None:
                unbatched.append(f"signature {name!r}: input {key!r} has shape {shape}")
                break
            inputs[key] = keras.Input(tuple(shape[1:]), dtype=dtype, name=key)
        else:
            models[name] = _signature_model(keras, layer_class, name, signature, inputs)
    if unbatched:
        message = (f"The SavedModel at {path}: {'; '.join(unbatched)}, without a batch "
                   "dimension of unknown size (-1) first. Only batched signatures can be "
                   "served; export the model with a leading None dimension.")
        if not models:
            raise ValueError(message)
        logger.warning("%s Serving its other signatures %s.", message, sorted(models))
    return models


def _signature_model(keras: Any, layer_class: type, name: str, signature: _GraphSignature,
                     inputs: dict[str, Any]) -> Any:
    outputs = layer_class(signature, name=f"signature_{_layer_name(name)}",
                          trainable=False)(inputs)
    if len(outputs) == 1:
        # TF Serving leaves out the name of a lone output: answers are plain lists.
        outputs = next(iter(outputs.values()))
    return keras.Model(inputs, outputs, name=f"savedmodel_{_layer_name(name)}")


def _layer_name(signature_name: str) -> str:
    # Signature keys may hold "/" (half_plus_three's "tensorflow/serving/regress").
    return "".join(c if c.isalnum() or c == "_" else "_" for c in signature_name)


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

    proto = _read_saved_model(path)
    meta_graph = _serving_meta_graph(proto)
    doc = {}
    for name, sig in sorted(meta_graph.signature_def.items()):
        entry = MessageToDict(sig, preserving_proto_field_name=True,
                              always_print_fields_with_no_presence=True)
        entry.setdefault("defaults", {})  # TF Serving writes it, empty or not
        doc[name] = entry
    return doc
