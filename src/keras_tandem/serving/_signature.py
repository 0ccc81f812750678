"""What a model takes as input, and checking a request against it.

Separation of concerns:
- `ArraySpec` describes one tensor a model takes or returns: name,
  per-example shape, NumPy dtype (`Predictor.inputs` and `Predictor.outputs`).
- `castable` is the one table of which dtypes a model input accepts by casting
  (the server's JSON parsing asks it too).
- String inputs and outputs have the NumPy dtype `object` (holding `str` or
  `bytes`), which is what TensorFlow hands back for its `string` tensors.
- `InputSignature` owns the model's inputs and the structure (one tensor, a
  list or a dict) the model is called with; `InputSignature.parse` turns one
  request (an array, nested lists, a list or dict of those) into flat arrays
  of the right dtype, or raises `InvalidInputError` in the caller's thread.

Pure NumPy: no TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_tandem.errors import InvalidInputError

# Which NumPy dtype kinds can be cast sensibly into a model input of each kind,
# the way Keras accepts them: integers and booleans into floats, booleans into
# integers; str, bytes and objects into a string input (object dtype), whose
# elements `InputSignature.parse` then checks one by one. Strings into numbers,
# complex numbers and floats into integers are not. Kinds not listed take only
# their own kind.
_CASTABLE_KINDS = {"f": "fiub", "i": "iub", "u": "iub", "b": "b", "O": "USO"}
_STRING_TYPES = (str, bytes)
STRING_DTYPE = np.dtype(object)


def castable(source: Any, target: Any) -> bool:
    """Whether values of dtype `source` may be cast into a model input of dtype `target`.

    Args:
        source: the dtype of the values given (anything `np.dtype` takes).
        target: the model input's dtype.

    Returns:
        True for the same kind, integers and booleans into floats, booleans
        into integers, str, bytes and objects into a string input (object
        dtype); False for floats into integers, strings or objects into
        numbers, complex numbers and the like.
    """
    kind = np.dtype(target).kind
    return np.dtype(source).kind in _CASTABLE_KINDS.get(kind, kind)


@dataclass(frozen=True)
class ArraySpec:
    """One tensor a model takes or returns, as NumPy sees one example of it.

    Args:
        name: the input's name (or the output's: a dict key, the model's
            output name, or `output_0`, `output_1`, ...).
        shape: the shape of one example, without the batch axis (`None`
            where an output's size is known only at run time).
        dtype: the NumPy dtype; `object` for strings (elements `str` or
            `bytes`; answers hold `bytes`).
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    def describe(self) -> str:
        """Says what this input accepts, for error messages."""
        batch = "(" + ", ".join(["n", *map(str, self.shape)]) + ("" if self.shape else ",") + ")"
        dtype = "strings (str or bytes)" if self.is_string else str(self.dtype)
        return f"one example of shape {self.shape} or a batch of shape {batch}, {dtype}"

    @property
    def is_string(self) -> bool:
        """Whether this is a string tensor (NumPy dtype `object`)."""
        return self.dtype.kind == "O"


def to_numpy_dtype(dtype: Any) -> np.dtype:
    """The NumPy dtype of a Keras, TensorFlow or NumPy dtype (or its name).

    Strings (`"string"`, `tf.string`) become `object`, the dtype NumPy holds
    `str` and `bytes` in.
    """
    name = getattr(dtype, "name", dtype)
    if name == "string":
        return STRING_DTYPE
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and friends live in ml_dtypes
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, str(name)))


def pack_inputs(structure: str, specs: Sequence[Any], flat: Sequence[Any]) -> Any:
    """Arranges flat per-input values in a model's input structure.

    Args:
        structure: "single" (the one value), "dict" (keyed by input name) or
            "list".
        specs: one spec per input, each with a `name`, in the order of `flat`.
        flat: one value per input.
    """
    if structure == "single":
        return flat[0]
    if structure == "dict":
        return {s.name: v for s, v in zip(specs, flat)}
    return list(flat)


def _field(name: str, shape: Sequence[Any], dtype: Any) -> ArraySpec:
    per_example = tuple(shape)[1:]
    if any(d is None for d in per_example):
        raise ValueError(
            f"Input '{name}' has shape {tuple(shape)}: the Predictor batches requests together, "
            "so every dimension but the batch one must be known. Build the model with a fixed "
            "input shape, or pass `input_signature=keras.Input(shape=...)`."
        )
    return ArraySpec(name, tuple(int(d) for d in per_example), to_numpy_dtype(dtype))


class InputSignature:
    """The inputs of a model and the structure it is called with.

    Args:
        fields: one `ArraySpec` per model input, in the model's order.
        structure: `"single"`, `"list"` or `"dict"`: how the model takes them.
    """

    def __init__(self, fields: Sequence[ArraySpec], structure: str):
        if structure == "single" and len(fields) != 1:
            raise ValueError("a single-input signature needs exactly one field")
        self.fields = tuple(fields)
        self.structure = structure
        self._names = {f.name: i for i, f in enumerate(self.fields)}

    @classmethod
    def from_model(cls, model: Any, input_signature: Any = None) -> InputSignature:
        """Reads the signature from `input_signature`, or else from the model.

        Args:
            model: a built Keras model (functional, Sequential or subclassed).
            input_signature: optional `keras.Input` tensor(s) or `tf.TensorSpec`(s)
                (with the batch dimension), as one, a list or a dict; needed only
                for a subclassed model that was never called.

        Returns:
            The `InputSignature`.
        """
        spec = input_signature
        if spec is None:
            try:
                spec = model.input  # functional and Sequential: KerasTensors
            except (AttributeError, ValueError):
                spec = None
        if spec is None:
            spec = cls._from_build_shapes(model)
        return cls._from_structure(spec)

    @staticmethod
    def _from_build_shapes(model: Any) -> Any:
        # A subclassed model remembers the shapes it was built with; this is
        # the only place Keras keeps them.
        shapes = getattr(model, "_build_shapes_dict", None)
        if not shapes or len(shapes) != 1:
            raise ValueError(
                f"Cannot tell the input shape of {type(model).__name__}: call the model once "
                "on example data, or pass `input_signature=keras.Input(shape=...)`."
            )
        (shape,) = shapes.values()
        dtype = getattr(model, "input_dtype", None) or "float32"

        def to_spec(s):
            if isinstance(s, Mapping):
                return {k: to_spec(v) for k, v in s.items()}
            if isinstance(s, (list, tuple)) and s and isinstance(s[0], (list, tuple)):
                return [to_spec(v) for v in s]
            return _ShapeDtype((None, *tuple(s)[1:]), dtype)

        return to_spec(shape)

    @classmethod
    def _from_structure(cls, spec: Any) -> InputSignature:
        if isinstance(spec, Mapping):
            fields = [_field(str(k), v.shape, v.dtype) for k, v in spec.items()]
            return cls(fields, "dict")
        if isinstance(spec, (list, tuple)):
            fields = [
                _field(_name_of(v, f"input_{i}"), v.shape, v.dtype) for i, v in enumerate(spec)
            ]
            if len(fields) == 1 and not isinstance(spec, list):
                return cls(fields, "single")
            return cls(fields, "list")
        return cls([_field(_name_of(spec, "input"), spec.shape, spec.dtype)], "single")

    def pack(self, flat: Sequence[Any]) -> Any:
        """Arranges flat per-input values in the structure the model is called with."""
        return pack_inputs(self.structure, self.fields, flat)

    def parse(self, x: Any) -> tuple[tuple[np.ndarray, ...], int, bool]:
        """Checks one request and converts it to the model's dtypes.

        Args:
            x: one example or a batch: an array or nested lists for a
                single-input model; a list or dict of those for several inputs.

        Returns:
            `(arrays, rows, single)`: one array per input, the number of rows,
            and whether `x` was one example (answers then drop the batch axis).

        Raises:
            InvalidInputError: on any mismatch, naming the input and the problem.
        """
        values = self._split_inputs(x)
        rows: int | None = None
        single: bool | None = None
        arrays = []
        for field, value in zip(self.fields, values):
            arr, n, one = self._parse_field(field, value)
            if rows is not None and (n != rows or one != single):
                raise InvalidInputError(
                    f"Inputs disagree on the batch: input '{field.name}' has "
                    f"{'one example' if one else f'{n} rows'}, while earlier inputs have "
                    f"{'one example' if single else f'{rows} rows'}. Give every input the "
                    "same number of rows."
                )
            rows, single = n, one
            arrays.append(arr)
        return tuple(arrays), rows, single

    def _split_inputs(self, x: Any) -> list[Any]:
        names = [f.name for f in self.fields]
        if isinstance(x, Mapping):
            unknown = [k for k in x if k not in self._names]
            if unknown:
                raise InvalidInputError(
                    f"Unknown input name(s) {unknown}: the model's inputs are {names}."
                )
            missing = [n for n in names if n not in x]
            if missing:
                raise InvalidInputError(
                    f"Missing input(s) {missing}: the model's inputs are {names}; "
                    f"got {sorted(map(str, x))}."
                )
            return [x[n] for n in names]
        if len(self.fields) == 1:
            if isinstance(x, (list, tuple)) and len(x) == 1 and self.structure != "single":
                return [x[0]]
            return [x]
        if self.structure == "dict":
            raise InvalidInputError(
                f"This model takes named inputs {names}: pass a dict, got {type(x).__name__}."
            )
        if not isinstance(x, (list, tuple)) or len(x) != len(self.fields):
            got = f"{type(x).__name__} of length {len(x)}" if isinstance(x, (list, tuple)) \
                else type(x).__name__
            raise InvalidInputError(
                f"This model takes {len(self.fields)} inputs {names}: pass a list of "
                f"{len(self.fields)} arrays or a dict keyed by input name; got {got}."
            )
        return list(x)

    @staticmethod
    def _parse_field(field: ArraySpec, value: Any) -> tuple[np.ndarray, int, bool]:
        if value is None:
            raise InvalidInputError(
                f"Input '{field.name}' is None: expected {field.describe()}."
            )
        try:
            if field.is_string and not isinstance(value, (np.ndarray, np.generic)):
                # As objects: NumPy would turn bytes among str into "b'...'" text.
                arr = np.asarray(value, dtype=object)
            else:
                arr = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise InvalidInputError(
                f"Input '{field.name}' is not a rectangular array (ragged nested lists?): "
                f"expected {field.describe()}. NumPy said: {e}"
            ) from None
        if not castable(arr.dtype, field.dtype):
            kind = arr.dtype.kind
            what = {"U": "strings", "S": "bytes", "O": "Python objects (ragged lists or None?)",
                    "c": "complex numbers", "V": "raw records", "M": "datetimes",
                    "m": "timedeltas"}.get(kind, f"{arr.dtype} values")
            raise InvalidInputError(
                f"Input '{field.name}' got {what} (dtype {arr.dtype}, shape {arr.shape}), which "
                f"cannot be cast to the model's dtype "
                f"{'string' if field.is_string else field.dtype}: expected {field.describe()}."
            )
        shape = arr.shape
        if shape == field.shape:
            one, rows = True, 1
        elif len(shape) == len(field.shape) + 1 and shape[1:] == field.shape and shape[0] >= 1:
            one, rows = False, shape[0]
        else:
            hint = "an empty batch" if shape[:1] == (0,) else f"shape {shape}"
            raise InvalidInputError(
                f"Input '{field.name}' got {hint} ({arr.dtype}): expected {field.describe()}."
            )
        if field.is_string:
            if arr.dtype.kind == "O":
                _check_strings(field, arr)
            else:
                arr = arr.astype(object)  # str_ and bytes_ become str and bytes
        elif arr.dtype != field.dtype:
            arr = arr.astype(field.dtype)
        return arr, rows, one


def _check_strings(field: ArraySpec, arr: np.ndarray) -> None:
    for k, v in enumerate(arr.flat):
        if not isinstance(v, _STRING_TYPES):
            where = f" at flat position {k} of shape {arr.shape}" if arr.ndim else ""
            raise InvalidInputError(
                f"Input '{field.name}' got {type(v).__name__} {v!r:.40}{where}: expected "
                f"{field.describe()}."
            )


def _name_of(spec: Any, default: str) -> str:
    name = getattr(spec, "name", None) or default
    return default if name.startswith("keras_tensor") else name


@dataclass(frozen=True)
class _ShapeDtype:
    shape: tuple
    dtype: Any
    name: str | None = None
