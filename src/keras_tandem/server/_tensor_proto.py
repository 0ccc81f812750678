"""NumPy arrays <-> TensorFlow's `TensorProto`, as TF Serving reads and writes them.

Owns the conversion of one tensor in a gRPC request or answer, with no
TensorFlow Python API (no `tf.make_ndarray`, `tf.make_tensor_proto`): only
NumPy and the message classes of `tensorflow.core.framework`, so a request
costs no eager op and no TensorFlow dispatch.

Reading follows TensorFlow's `Tensor::FromProto`: `tensor_content` (raw
little-endian bytes) when present, else the typed repeated field of the
dtype (`float_val`, `int_val`, `int64_val`, `string_val`, ...), where fewer
values than the shape holds are padded with the last one (a single value
fills the tensor) and none at all means zeros. Writing follows
`Tensor::AsProtoField`, what TF Serving's Predict answers with: the typed
field, never `tensor_content`, since its example clients read `float_val`.
Which tensors a request must carry, and their dtypes, is checked in `_grpc`.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

_STRING = np.dtype(object)


def _bfloat16() -> np.dtype | None:
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes comes with TensorFlow and Keras
        return None
    return np.dtype(ml_dtypes.bfloat16)


# DataType enum -> (NumPy dtype, typed field). Half-precision values travel as
# their 16-bit patterns in `half_val` (an int32 field), as TensorFlow writes them.
_BY_ENUM: dict[int, tuple[np.dtype, str]] = {
    types_pb2.DT_FLOAT: (np.dtype(np.float32), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype(np.float64), "double_val"),
    types_pb2.DT_INT32: (np.dtype(np.int32), "int_val"),
    types_pb2.DT_INT16: (np.dtype(np.int16), "int_val"),
    types_pb2.DT_INT8: (np.dtype(np.int8), "int_val"),
    types_pb2.DT_UINT8: (np.dtype(np.uint8), "int_val"),
    types_pb2.DT_UINT16: (np.dtype(np.uint16), "int_val"),
    types_pb2.DT_INT64: (np.dtype(np.int64), "int64_val"),
    types_pb2.DT_UINT32: (np.dtype(np.uint32), "uint32_val"),
    types_pb2.DT_UINT64: (np.dtype(np.uint64), "uint64_val"),
    types_pb2.DT_BOOL: (np.dtype(np.bool_), "bool_val"),
    types_pb2.DT_HALF: (np.dtype(np.float16), "half_val"),
    types_pb2.DT_STRING: (_STRING, "string_val"),
    types_pb2.DT_COMPLEX64: (np.dtype(np.complex64), "scomplex_val"),
    types_pb2.DT_COMPLEX128: (np.dtype(np.complex128), "dcomplex_val"),
}
if (_bf16 := _bfloat16()) is not None:
    _BY_ENUM[types_pb2.DT_BFLOAT16] = (_bf16, "half_val")
_BY_DTYPE: dict[np.dtype, int] = {dt: enum for enum, (dt, _) in _BY_ENUM.items()}
# tensor_content is little-endian: read as is on little-endian hosts, byte-swapped elsewhere.
_CONTENT_DTYPE = {enum: dt if sys.byteorder == "little" else dt.newbyteorder("<")
                  for enum, (dt, _) in _BY_ENUM.items()}


class TensorError(ValueError):
    """A `TensorProto` that cannot become an array (gRPC INVALID_ARGUMENT)."""


def dtype_name(enum: int) -> str:
    """`DT_FLOAT`, ... for a DataType enum value (`DT_<n>` if unknown)."""
    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return f"DT_{enum}"


def enum_of(dtype: Any) -> int:
    """The DataType enum value of a NumPy dtype (`DT_INVALID` if none)."""
    return _BY_DTYPE.get(np.dtype(dtype), types_pb2.DT_INVALID)


def to_array(proto: tensor_pb2.TensorProto, what: str = "tensor") -> np.ndarray:
    """The array a `TensorProto` holds (strings as an object array of `bytes`).

    Args:
        proto: the tensor.
        what: how to name it in errors, e.g. `input 'x'`.

    Returns:
        A NumPy array of the proto's shape and dtype.

    Raises:
        TensorError: an unsupported dtype, an unknown rank or a negative
            dimension, or values that do not fit the shape.
    """
    found = _BY_ENUM.get(proto.dtype)
    if found is None:
        raise TensorError(f"{what} has dtype {dtype_name(proto.dtype)}, which this server does "
                          "not read; send DT_FLOAT, DT_DOUBLE, DT_INT32, DT_INT64, DT_BOOL, "
                          "DT_STRING or another numeric dtype.")
    dtype, field = found
    if proto.tensor_shape.unknown_rank:
        raise TensorError(f"{what} has an unknown rank: set tensor_shape.dim.")
    shape = tuple([d.size for d in proto.tensor_shape.dim])
    if any(d < 0 for d in shape):
        raise TensorError(f"{what} has shape {list(shape)}: every dimension must be known "
                          "(>= 0).")
    n = math.prod(shape)
    if proto.tensor_content:
        if dtype is _STRING:
            raise TensorError(f"{what}: DT_STRING tensors travel in string_val, not "
                              "tensor_content.")
        content = proto.tensor_content
        if len(content) != n * dtype.itemsize:
            raise TensorError(f"{what} has {len(content)} bytes of tensor_content, but shape "
                              f"{list(shape)} of {dtype_name(proto.dtype)} needs "
                              f"{n * dtype.itemsize}.")
        return np.frombuffer(content, _CONTENT_DTYPE[proto.dtype]).astype(dtype, copy=False) \
            .reshape(shape)
    values = getattr(proto, field)
    got = len(values)
    if got > n:
        raise TensorError(f"{what} has {got} values in {field} for shape {list(shape)}, which "
                          f"holds {n}.")
    if dtype is _STRING:
        flat = np.empty(n, dtype=object)
        if got:
            flat[:got] = list(values)
            flat[got:] = values[-1]
        else:
            flat[:] = b""
        return flat.reshape(shape)
    if field == "half_val":
        flat = np.asarray(values, dtype=np.uint16).view(dtype)
    elif field in ("scomplex_val", "dcomplex_val"):
        flat = np.asarray(values, dtype=dtype.type(0).real.dtype).view(dtype)
        got = len(flat)
    else:
        flat = np.asarray(values, dtype=dtype)
    if got == n:
        return flat.reshape(shape)
    out = np.zeros(n, dtype) if not got else np.full(n, flat[-1], dtype)
    out[:got] = flat
    return out.reshape(shape)


def from_array(array: Any, proto: tensor_pb2.TensorProto | None = None,
               ) -> tensor_pb2.TensorProto:
    """Writes an array into a `TensorProto`: dtype, shape and the typed value field.

    Args:
        array: the array (`str` elements of a string array are UTF-8 encoded).
        proto: the message to fill (e.g. `response.outputs["y"]`); a new one if None.

    Returns:
        The filled proto.

    Raises:
        TensorError: a dtype with no TensorFlow equivalent.
    """
    a = np.asarray(array)
    if a.dtype.kind in "US":
        a = a.astype(object)
    enum = enum_of(a.dtype)
    if enum == types_pb2.DT_INVALID:
        raise TensorError(f"an output of dtype {a.dtype} has no TensorFlow dtype.")
    _, field = _BY_ENUM[enum]
    if proto is None:
        proto = tensor_pb2.TensorProto()
    proto.dtype = enum
    dims = proto.tensor_shape.dim
    del dims[:]
    for d in a.shape:
        dims.add(size=d)
    flat = a.ravel()
    values = getattr(proto, field)
    if enum == types_pb2.DT_STRING:
        values.extend(v if isinstance(v, bytes) else str(v).encode() for v in flat)
    elif field == "half_val":
        values.extend(flat.view(np.uint16).tolist())
    elif field in ("scomplex_val", "dcomplex_val"):
        values.extend(flat.view(flat.real.dtype).tolist())
    else:
        values.extend(flat.tolist())
    return proto
