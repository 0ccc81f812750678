"""TensorFlow Serving's REST JSON formats, and nothing else.

Owns: turning a predict request body (row format `"instances"` or columnar
format `"inputs"`) into what `Predictor.submit` takes; turning answers into
`"predictions"` / `"outputs"`; the JSON documents of model status, metadata
and errors; describing a model's outputs (`OutputSpec`). Pure Python and
NumPy: no HTTP, no TensorFlow, no threads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from keras_tandem.errors import InvalidInputError
from keras_tandem.serving.specs import ArraySpec, castable

ROW = "row"
COLUMNAR = "columnar"

_TF_DTYPES = {
    "float32": "DT_FLOAT", "float64": "DT_DOUBLE", "float16": "DT_HALF",
    "bfloat16": "DT_BFLOAT16", "int8": "DT_INT8", "int16": "DT_INT16", "int32": "DT_INT32",
    "int64": "DT_INT64", "uint8": "DT_UINT8", "uint16": "DT_UINT16", "uint32": "DT_UINT32",
    "uint64": "DT_UINT64", "bool": "DT_BOOL",
}


def tf_dtype_name(dtype: Any) -> str:
    """TensorFlow's enum name (`DT_FLOAT`, ...) for a NumPy dtype."""
    return _TF_DTYPES.get(np.dtype(dtype).name, "DT_INVALID")


@dataclass(frozen=True)
class OutputSpec:
    """What a model returns for one example.

    Args:
        structure: `"single"`, `"list"` or `"dict"`, as the Predictor returns it.
        names: one name per output (dict keys, the model's output names, or
            `output_0`, `output_1`, ...).
        shapes: per-example shape of each output (no batch axis).
        dtypes: NumPy dtype of each output.
    """

    structure: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def from_specs(cls, answer: Any, specs: Sequence[Any],
                   names: Sequence[str] | None = None) -> OutputSpec:
        """Describes a model's outputs.

        Args:
            answer: the Predictor's answer for one example (an array, a
                list/tuple or a dict of arrays): its structure is the one
                responses are built from.
            specs: `Predictor.outputs` (`name`, `shape`, `dtype` each), in
                the order the model returns them.
            names: names that replace the specs' for a single output or a
                list (a dict's outputs keep their keys).

        Returns:
            The `OutputSpec`.
        """
        if isinstance(answer, Mapping):
            structure = "dict"
        else:
            structure = "list" if isinstance(answer, (list, tuple)) else "single"
        keys = [s.name for s in specs]
        if structure != "dict":
            given = list(names or [])
            keys = [given[i] if i < len(given) and given[i] else k for i, k in enumerate(keys)]
        return cls(structure, tuple(keys), tuple(tuple(s.shape) for s in specs),
                   tuple(np.dtype(s.dtype) for s in specs))

    def flatten(self, outputs: Any) -> list[Any]:
        """The outputs as a flat list in the order of `names`."""
        if self.structure == "single":
            return [outputs]
        if self.structure == "dict":
            return [outputs[k] for k in self.names]
        return list(outputs)


def error_body(message: str) -> bytes:
    """The JSON body TF Serving sends with an error status."""
    return orjson.dumps({"error": message})


def dumps(doc: Any) -> bytes:
    """Encodes a JSON document; NumPy arrays are written in their own precision."""
    try:
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # a dtype orjson does not take (bfloat16, ...), or a strided view
        return json.dumps(doc, default=lambda o: np.asarray(o).tolist()).encode()


# ------------------------------------------------------------------ requests


def parse_predict_body(body: bytes, fields: Sequence[ArraySpec]) -> tuple[Any, str]:
    """Parses a `:predict` request body.

    Args:
        body: the raw JSON body.
        fields: the model's inputs (`Predictor.inputs`), in the model's order.

    Returns:
        `(x, format)`: the input to hand to `Predictor.submit` (an array, or a
        dict keyed by input name) and `"row"` or `"columnar"`.

    Raises:
        InvalidInputError: malformed JSON, both or neither of
            `"instances"`/`"inputs"`, or instances that are not a list of
            examples. Shape and dtype checks are left to the Predictor.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInputError(f"Malformed JSON in the request body: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInputError(
            'The request body must be a JSON object with "instances" (row format) or '
            f'"inputs" (columnar format); got a JSON {type(doc).__name__}.'
        )
    has_rows, has_cols = "instances" in doc, "inputs" in doc
    if has_rows and has_cols:
        raise InvalidInputError(
            'The request has both "instances" (row format) and "inputs" (columnar format): '
            "send exactly one of them."
        )
    if not (has_rows or has_cols):
        raise InvalidInputError(
            'The request has neither "instances" (row format) nor "inputs" (columnar format). '
            f"Keys given: {sorted(doc)}."
        )
    signature_name = doc.get("signature_name", "serving_default")
    if signature_name not in ("serving_default", "", None):
        raise InvalidInputError(
            f"Unknown signature_name {signature_name!r}: this model has only "
            "'serving_default'."
        )
    if has_rows:
        return _rows_to_input(doc["instances"], fields), ROW
    return _columns_to_input(doc["inputs"], fields), COLUMNAR


def _as_array(value: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InvalidInputError(
            f"{what} is not a rectangular array (ragged nested lists?). NumPy said: {e}"
        ) from None


def _cast(arr: np.ndarray, field: ArraySpec) -> np.ndarray:
    # Casts only what the Predictor would cast itself (ints and bools into
    # floats, ...), so it takes its fast path; anything else it checks and names.
    if arr.dtype != field.dtype and castable(arr.dtype, field.dtype):
        return arr.astype(field.dtype)
    return arr


def _check_rows(arr: np.ndarray, rows: int, field: ArraySpec) -> None:
    if arr.ndim != len(field.shape) + 1 or arr.shape[0] != rows:
        per_example = "a scalar" if arr.ndim == 1 else f"shape {arr.shape[1:]}"
        raise InvalidInputError(
            f'Row format: "instances" must be a list of examples, each of shape '
            f"{field.shape} for input '{field.name}'; got {rows} instance(s) of "
            f"{per_example} ({arr.dtype}). Expected {field.describe()}."
        )


def _rows_to_input(instances: Any, fields: Sequence[ArraySpec]) -> Any:
    if not isinstance(instances, list) or not instances:
        raise InvalidInputError(
            '"instances" must be a non-empty JSON list with one entry per example; got '
            f"{'an empty list' if isinstance(instances, list) else type(instances).__name__}."
        )
    rows = len(instances)
    first = instances[0]
    if not isinstance(first, dict):
        if len(fields) != 1:
            names = [f.name for f in fields]
            raise InvalidInputError(
                f"This model takes {len(fields)} named inputs {names}: in row format each "
                'instance must be a JSON object keyed by input name, e.g. {"'
                f'{names[0]}": ...}}.'
            )
        arr = _as_array(instances, '"instances"')
        _check_rows(arr, rows, fields[0])
        return _cast(arr, fields[0])
    keys = list(first)
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict) or (i and inst.keys() != first.keys()):
            got = sorted(inst) if isinstance(inst, dict) else type(inst).__name__
            raise InvalidInputError(
                f"Row format: instance {i} has inputs {got} but instance 0 has {sorted(keys)}: "
                "every instance must name the same inputs."
            )
    by_name = {f.name: f for f in fields}
    columns = {}
    for k in keys:
        arr = _as_array([inst[k] for inst in instances], f"Input '{k}'")
        if k in by_name:
            _check_rows(arr, rows, by_name[k])
            arr = _cast(arr, by_name[k])
        columns[k] = arr  # unknown or missing names: the Predictor names them
    return columns


def _columns_to_input(inputs: Any, fields: Sequence[ArraySpec]) -> Any:
    if inputs is None:
        raise InvalidInputError('"inputs" is null: expected the input tensor(s).')
    if isinstance(inputs, dict):  # unknown or missing names: the Predictor names them
        return {k: _as_array(v, f"Input '{k}'") for k, v in inputs.items()}
    if len(fields) == 1:
        return _as_array(inputs, '"inputs"')
    return inputs  # a list of tensors; the Predictor checks it


# ----------------------------------------------------------------- responses


def format_predictions(outputs: Any, spec: OutputSpec, fmt: str) -> bytes:
    """The JSON body of a successful `:predict`.

    Args:
        outputs: what the Predictor answered (with a batch axis for row format).
        spec: the model's `OutputSpec`.
        fmt: `"row"` (gives `"predictions"`) or `"columnar"` (gives `"outputs"`).

    Returns:
        The encoded JSON body.
    """
    if spec.structure == "single":
        return dumps({"predictions" if fmt == ROW else "outputs": outputs})
    flat = [np.asarray(o) for o in spec.flatten(outputs)]
    if fmt == ROW:
        preds = [{name: col[i] for name, col in zip(spec.names, flat, strict=True)}
                 for i in range(len(flat[0]))]
        return dumps({"predictions": preds})
    return dumps({"outputs": dict(zip(spec.names, flat, strict=True))})


def version_status(version: int | str, state: str, error_code: str = "OK",
                   error_message: str = "") -> dict[str, Any]:
    """One entry of TF Serving's `model_version_status` list."""
    return {"version": str(version), "state": state,
            "status": {"error_code": error_code, "error_message": error_message}}


def _tensor_info(name: str, shape: Sequence[int], dtype: Any) -> dict[str, Any]:
    dims = [{"size": "-1" if d is None else str(d), "name": ""} for d in (None, *shape)]
    return {"dtype": tf_dtype_name(dtype), "tensor_shape": {"dim": dims, "unknown_rank": False},
            "name": name}


def metadata_doc(name: str, version: int | str, fields: Sequence[ArraySpec],
                 outputs: OutputSpec) -> dict[str, Any]:
    """TF Serving's `GET /v1/models/{name}/metadata` document.

    Args:
        name: the served model's name.
        version: the version now served.
        fields: the model's inputs (`Predictor.inputs`).
        outputs: the model's `OutputSpec`.

    Returns:
        `{"model_spec": ..., "metadata": {"signature_def": ...}}` with the
        inputs and outputs of the `serving_default` signature (batch axis -1).
    """
    signature = {
        "inputs": {f.name: _tensor_info(f.name, f.shape, f.dtype) for f in fields},
        "outputs": {n: _tensor_info(n, s, d)
                    for n, s, d in zip(outputs.names, outputs.shapes, outputs.dtypes, strict=True)},
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": name, "signature_name": "", "version": str(version)},
        "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
    }
