"""TensorFlow Serving's REST JSON formats, and nothing else.

Owns: turning a predict request body (row format `"instances"` or columnar
format `"inputs"`) into what `Predictor.submit` takes; turning answers into
`"predictions"` / `"outputs"`; the JSON documents of model status, metadata
and errors; describing a model's outputs (`OutputSpec`). Pure Python and
NumPy: no HTTP, no TensorFlow, no threads.

Large numeric bodies are decoded in pieces straight into an array of the
input's dtype (`_decode_numeric_array`), so a request never holds a Python
float object per number; anything the piecewise decoder is unsure of goes
through the generic decoder, which gives every error message. TF Serving's
JSON conformance applies both ways: `NaN`, `Infinity` and `-Infinity` are
accepted in requests and written in answers, and a value too large for the
input's dtype becomes +/-Infinity.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from keras_tandem.errors import InvalidInputError
from keras_tandem.server._json_arrays import (
    SENTINEL,
    decode_pieces,
    find_array,
    rest_of_document,
)
from keras_tandem.serving.specs import ArraySpec, castable

ROW = "row"
COLUMNAR = "columnar"
# Appended to the format when the request left out an input's trailing
# size-1 dimensions (TF Serving feeds `[1.0, 2.0]` to an `x` declared
# `[-1, 1]`); the answer leaves them out as well.
SQUEEZED = "+squeezed"
# Large bodies are decoded in pieces of about this size: big enough that the
# per-piece cost vanishes, small enough that one piece's Python objects stay
# a small share of the body.
CHUNK_BYTES = 1 << 20

_TF_DTYPES = {
    "float32": "DT_FLOAT", "float64": "DT_DOUBLE", "float16": "DT_HALF",
    "bfloat16": "DT_BFLOAT16", "int8": "DT_INT8", "int16": "DT_INT16", "int32": "DT_INT32",
    "int64": "DT_INT64", "uint8": "DT_UINT8", "uint16": "DT_UINT16", "uint32": "DT_UINT32",
    "uint64": "DT_UINT64", "bool": "DT_BOOL", "object": "DT_STRING", "bytes": "DT_STRING",
    "str": "DT_STRING",
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
    """Encodes a JSON document; NumPy arrays are written in their own precision.

    Non-finite floats are written as `NaN`, `Infinity` and `-Infinity`, as
    TF Serving writes them (plain JSON has no such values; orjson alone
    would write `null`).
    """
    try:
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # a dtype orjson does not take (bfloat16, ...), or a strided view
        return json.dumps(doc, default=lambda o: np.asarray(o).tolist()).encode()


# TF Serving writes an output whose name ends in this as {"b64": ...}.
_BINARY_SUFFIX = "_bytes"

_TOKENS = {"nan": orjson.Fragment(b"NaN"), "inf": orjson.Fragment(b"Infinity"),
           "-inf": orjson.Fragment(b"-Infinity")}


def json_safe(value: Any, binary: bool = False) -> Any:
    """`value`, or nested lists with `NaN`/`Infinity` tokens if it is a float array with any.

    Finite arrays are returned as they are (orjson writes them fast and in
    their own precision); only an array holding a non-finite value pays for
    the element-wise conversion.

    Args:
        value: an output.
        binary: write strings as `{"b64": ...}` (TF Serving does so for an
            output whose name ends in `_bytes`); otherwise as text when they
            are UTF-8.
    """
    if isinstance(value, (bytes, np.bytes_)) or (isinstance(value, np.ndarray)
                                                  and value.dtype.kind in "OSU"):
        return _strings(value, binary)
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.size == 0:
        return value
    if np.isfinite(value).all():
        return value
    if value.dtype not in (np.float16, np.float32, np.float64):  # bfloat16 and the like
        value = value.astype(np.float32)
    return _with_tokens(value)


def _strings(a: Any, binary: bool = False) -> Any:
    """String outputs as JSON strings (UTF-8), or `{"b64": ...}` for bytes that are not text.

    With `binary`, every string is written as `{"b64": ...}`.
    """
    if isinstance(a, np.ndarray):
        return [_strings(v, binary) for v in a] if a.ndim else _strings(a[()], binary)
    if isinstance(a, str):
        if not binary:
            return a
        a = a.encode("utf-8")
    if isinstance(a, (bytes, np.bytes_)):
        if not binary:
            try:
                return bytes(a).decode("utf-8")
            except UnicodeDecodeError:
                pass
        return {"b64": base64.b64encode(bytes(a)).decode("ascii")}
    return str(a)


def _with_tokens(a: np.ndarray) -> Any:
    if a.ndim == 0:
        return _token(a[()])
    if a.ndim == 1:
        return [_token(v) for v in a]
    return [_with_tokens(row) for row in a]


def _token(v: Any) -> Any:
    return v if np.isfinite(v) else _TOKENS[str(float(v))]


# ------------------------------------------------------------------ requests


def parse_predict_body(body: bytes | bytearray, fields: Sequence[ArraySpec], *,
                       chunk_bytes: int = CHUNK_BYTES,
                       signature: str = "serving_default",
                       signature_names: Sequence[str] = ("serving_default",)
                       ) -> tuple[Any, str]:
    """Parses a `:predict` request body.

    Args:
        body: the raw JSON body. A `bytearray` larger than `chunk_bytes` may
            be modified (a few bytes are overwritten while decoding in pieces).
        fields: the model's inputs (`Predictor.inputs`), in the model's order.
        chunk_bytes: bodies larger than this, holding one numeric tensor,
            are decoded in pieces of about this size.
        signature: the signature `fields` belong to; the body's
            `signature_name` must name it (or be absent or empty for
            `serving_default`).
        signature_names: every signature of the model, for the error message.

    Returns:
        `(x, format)`: the input to hand to `Predictor.submit` (an array, or a
        dict keyed by input name) and `"row"` or `"columnar"`.

    Raises:
        InvalidInputError: malformed JSON, both or neither of
            `"instances"`/`"inputs"`, or instances that are not a list of
            examples. Shape and dtype checks are left to the Predictor.
    """
    if len(body) > chunk_bytes:
        parsed = _decode_numeric_array(body, fields, chunk_bytes)
        if parsed is not None:
            return parsed
    doc = _loads(body)
    _check_document(doc, signature, signature_names)
    if b'"b64"' in body:  # TF Serving's binary strings: {"b64": "..."} is those bytes
        key = "instances" if "instances" in doc else "inputs"
        doc[key] = _decode_b64(doc[key])
    if "instances" in doc:
        x, squeezed = _rows_to_input(doc["instances"], fields)
        return x, ROW + squeezed
    x, squeezed = _columns_to_input(doc["inputs"], fields)
    return x, COLUMNAR + squeezed


def _decode_b64(value: Any) -> Any:
    """`value` with every `{"b64": "..."}` object replaced by the bytes it encodes."""
    if isinstance(value, list):
        return [_decode_b64(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and "b64" in value:
            text = value["b64"]
            if not isinstance(text, str):
                raise InvalidInputError(f'"b64" must hold a base64 string; got {text!r}.')
            try:
                return base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as e:
                raise InvalidInputError(f"Unable to base64 decode {text[:40]!r}: {e}") from None
        return {k: _decode_b64(v) for k, v in value.items()}
    return value


def _loads(body: Any) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        if b"NaN" in body or b"Infinity" in body or "infinity" in str(e):
            # TF Serving's JSON takes NaN/Infinity tokens and out-of-range numbers (as
            # +/-Infinity); orjson refuses both, the standard library takes both.
            try:
                return json.loads(body)
            except ValueError:
                pass
        raise InvalidInputError(f"Malformed JSON in the request body: {e}") from None


def signature_name_of(body: bytes | bytearray) -> str | None:
    """The `signature_name` of a `:predict` body (None if absent or not a JSON object)."""
    doc = _loads(body)
    name = doc.get("signature_name") if isinstance(doc, dict) else None
    return name if isinstance(name, str) else None


def _check_document(doc: Any, signature: str = "serving_default",
                    signature_names: Sequence[str] = ("serving_default",)) -> None:
    if not isinstance(doc, dict):
        raise InvalidInputError(
            'The request body must be a JSON object with "instances" (row format) or '
            f'"inputs" (columnar format); got a JSON {type(doc).__name__}.'
        )
    if not isinstance(doc.get("signature_name", ""), str):
        raise InvalidInputError(  # TF Serving's words
            f"JSON Value: {doc['signature_name']!r} not formatted correctly. 'signature_name' key "
            "must be a string value.")
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
    signature_name = doc.get("signature_name") or "serving_default"
    if signature_name != signature:
        names = ", ".join(repr(n) for n in signature_names)
        raise InvalidInputError(
            f"Unknown signature_name {signature_name!r}: this model has only {names}."
            if signature_name not in signature_names else
            f"signature_name {signature_name!r} does not match the inputs parsed for "
            f"{signature!r}."
        )


def _decode_numeric_array(body: bytes | bytearray, fields: Sequence[ArraySpec],
                          chunk_bytes: int) -> tuple[Any, str] | None:
    """The piecewise decoder's answer for one numeric input, or None to decode generically."""
    if len(fields) != 1 or fields[0].dtype.kind not in "biuf":
        return None
    field = fields[0]
    span = find_array(body, ("instances", "inputs"), chunk_bytes)
    if span is None:
        return None
    doc = rest_of_document(body, span)
    if doc is None:
        return None
    _check_document(doc)  # both or neither key, another signature: the usual errors
    if doc.get(span.key) != SENTINEL:
        return None
    decoded = decode_pieces(body, span, field.dtype, castable)
    if decoded is None:
        return None
    arr, source_dtype = decoded
    if span.key == "inputs":
        arr, squeezed = _unsqueeze(arr, field, batched=True)
        return arr, COLUMNAR + squeezed
    arr, squeezed = _unsqueeze(arr, field, batched=True)
    # The row check and its message, as the generic path gives them, from a
    # zero-size stand-in with the decoded dtype (the cast array's would differ).
    _check_rows(np.broadcast_to(np.zeros((), source_dtype), arr.shape), len(arr), field)
    return arr, ROW + squeezed


def _as_array(value: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
        if arr.dtype.kind == "S":  # decoded b64: NumPy's bytes dtype drops trailing NULs
            arr = np.array(value, dtype=object)
        return arr
    except (ValueError, TypeError) as e:
        raise InvalidInputError(
            f"{what} is not a rectangular array (ragged nested lists?). NumPy said: {e}"
        ) from None


def _cast(arr: np.ndarray, field: ArraySpec) -> np.ndarray:
    # Casts only what the Predictor would cast itself (ints and bools into
    # floats, ...), so it takes its fast path; anything else it checks and names.
    if arr.dtype != field.dtype and castable(arr.dtype, field.dtype):
        with np.errstate(over="ignore"):  # too large for float32: +/-Infinity, as TF Serving
            return arr.astype(field.dtype)
    return arr


def _unsqueeze(arr: np.ndarray, field: ArraySpec, batched: bool) -> tuple[np.ndarray, str]:
    """`arr` with the field's trailing size-1 dimensions added if it left them out."""
    short = len(field.shape) + (1 if batched else 0) - arr.ndim
    if (short > 0 and arr.ndim >= (1 if batched else 0)
            and all(d == 1 for d in field.shape[len(field.shape) - short:])):
        return arr.reshape(arr.shape + (1,) * short), SQUEEZED
    return arr, ""


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
        arr, squeezed = _unsqueeze(_as_array(instances, '"instances"'), fields[0], batched=True)
        _check_rows(arr, rows, fields[0])
        return _cast(arr, fields[0]), squeezed
    keys = list(first)
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict) or (i and inst.keys() != first.keys()):
            got = sorted(inst) if isinstance(inst, dict) else type(inst).__name__
            raise InvalidInputError(
                f"Row format: instance {i} has inputs {got} but instance 0 has {sorted(keys)}: "
                "every instance must name the same inputs."
            )
    by_name = {f.name: f for f in fields}
    columns, squeezed = {}, ""
    for k in keys:
        arr = _as_array([inst[k] for inst in instances], f"Input '{k}'")
        if k in by_name:
            arr, short = _unsqueeze(arr, by_name[k], batched=True)
            squeezed = squeezed or short
            _check_rows(arr, rows, by_name[k])
            arr = _cast(arr, by_name[k])
        columns[k] = arr  # unknown or missing names: the Predictor names them
    return columns, squeezed


def _columns_to_input(inputs: Any, fields: Sequence[ArraySpec]) -> Any:
    if inputs is None:
        raise InvalidInputError('"inputs" is null: expected the input tensor(s).')
    if isinstance(inputs, dict):  # unknown or missing names: the Predictor names them
        by_name = {f.name: f for f in fields}
        columns, squeezed = {}, ""
        for k, v in inputs.items():
            arr = _as_array(v, f"Input '{k}'")
            if k in by_name and arr.ndim:
                arr, short = _unsqueeze(arr, by_name[k], batched=True)
                squeezed = squeezed or short
            columns[k] = arr
        return columns, squeezed
    if len(fields) == 1:
        arr = _as_array(inputs, '"inputs"')
        squeezed = ""
        if arr.ndim:
            arr, squeezed = _unsqueeze(arr, fields[0], batched=True)
        return _cast(arr, fields[0]), squeezed
    return inputs, ""  # a list of tensors; the Predictor checks it


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
    if fmt.endswith(SQUEEZED):
        fmt = fmt.removesuffix(SQUEEZED)
        if spec.structure == "single":
            outputs = _squeeze_answer(outputs)
        else:
            flat = [_squeeze_answer(o) for o in spec.flatten(outputs)]
            outputs = dict(zip(spec.names, flat)) if spec.structure == "dict" else flat
    if spec.structure == "single":
        key = "predictions" if fmt == ROW else "outputs"
        if isinstance(outputs, np.ndarray) and outputs.dtype.kind in "biuf":
            # The common answer: orjson writes it as it is. Only a non-finite
            # float makes orjson write `null` (no other number does), and then
            # the array takes the way through `json_safe` for its tokens.
            try:
                payload = orjson.dumps({key: outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
            except TypeError:  # a dtype orjson does not take (bfloat16, ...), a strided view
                pass
            else:
                if outputs.dtype.kind != "f" or b"null" not in payload:
                    return payload
        binary = bool(spec.names) and spec.names[0].endswith(_BINARY_SUFFIX)
        return dumps({key: json_safe(outputs, binary)})
    flat = [json_safe(np.asarray(o), name.endswith(_BINARY_SUFFIX))
            for name, o in zip(spec.names, spec.flatten(outputs), strict=True)]
    if fmt == ROW:
        preds = [{name: col[i] for name, col in zip(spec.names, flat, strict=True)}
                 for i in range(len(flat[0]))]
        return dumps({"predictions": preds})
    return dumps({"outputs": dict(zip(spec.names, flat, strict=True))})


def _squeeze_answer(output: Any) -> Any:
    """An output without its trailing size-1 dimensions (the batch axis stays)."""
    arr = np.asarray(output)
    while arr.ndim > 1 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


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
                 outputs: OutputSpec,
                 signature_def: dict[str, Any] | None = None) -> dict[str, Any]:
    """TF Serving's `GET /v1/models/{name}/metadata` document.

    Args:
        name: the served model's name.
        version: the version now served.
        fields: the model's inputs (`Predictor.inputs`).
        outputs: the model's `OutputSpec`.
        signature_def: a SavedModel's own `signature_def` map, in TF Serving's
            JSON shape (tensor names such as `x:0`, `DT_FLOAT`, `dim` lists);
            when given, it is the document's map as it stands.

    Returns:
        `{"model_spec": ..., "metadata": {"signature_def": ...}}` with the
        inputs and outputs of the `serving_default` signature (batch axis -1),
        or the SavedModel's signatures.
    """
    if signature_def is not None:
        return {
            "model_spec": {"name": name, "signature_name": "", "version": str(version)},
            "metadata": {"signature_def": {"signature_def": signature_def}},
        }
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
