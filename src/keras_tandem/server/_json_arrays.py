"""Decoding one large numeric JSON array in pieces, straight into a NumPy array.

Owns: finding the array that is the value of a top-level key of a JSON
object (`"instances"`, `"inputs"`) without decoding the rest, checking with
NumPy that it holds only numbers, brackets and commas, cutting it at
top-level commas into pieces of about `chunk_bytes`, and decoding each piece
with orjson (the standard library for a piece with `NaN`/`Infinity` tokens)
into an array cast to the input's dtype. Peak memory is the body, the
result, and one piece's Python objects; decoding the whole body at once
would hold a Python float (32 bytes and more) per number.

Every function answers None when it is unsure (strings, objects, ragged or
malformed arrays, dtypes it would not cast): the caller then decodes the
body the generic way, which gives every error message. Pure NumPy: no HTTP,
no model.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import orjson

_COMMA, _OPEN, _CLOSE = ord(","), ord("["), ord("]")
_WHITESPACE = b" \t\r\n"
# Bytes a numeric array may hold: numbers, NaN/Infinity tokens, separators.
_ALLOWED_BYTES = b"0123456789+-.eE,[] \t\r\nNaInfity"
# The value put in place of the array when the rest of the document is decoded:
# a string no client sends (a NUL character), so it cannot be taken for one.
SENTINEL = "\x00keras-tandem-array"
_SENTINEL_JSON = orjson.dumps(SENTINEL)


class ArraySpan:
    """Where a top-level key's array lies in a body, and how it divides.

    Attributes:
        key: the key (`instances` or `inputs`).
        start: index of the array's `[`.
        end: index just past its matching `]`.
        cuts: indices of the top-level commas it is cut at, in order.
    """

    def __init__(self, key: str, start: int, end: int, cuts: list[int]):
        self.key, self.start, self.end, self.cuts = key, start, end, cuts


def find_array(body: bytes | bytearray, keys: tuple[str, ...],
               chunk_bytes: int) -> ArraySpan | None:
    """Finds the numeric array that follows the first of `keys` found in `body`.

    Args:
        body: the request body.
        keys: the keys to look for, in order.
        chunk_bytes: the rough size of a piece, and of each NumPy scan.

    Returns:
        The `ArraySpan`, or None when no key is followed by a non-empty array
        of numbers only.
    """
    for key in keys:
        at = body.find(b'"%s"' % key.encode())
        if at >= 0:
            break
    else:
        return None
    i = _skip_whitespace(body, at + len(key) + 2)
    if i >= len(body) or body[i] != ord(":"):
        return None
    start = _skip_whitespace(body, i + 1)
    if start >= len(body) or body[start] != _OPEN:
        return None
    view = memoryview(body)
    depth, cuts, pos, end = 0, [], start, None
    while end is None and pos < len(body):
        stop = min(len(body), pos + chunk_bytes)
        chars = np.frombuffer(view[pos:stop], np.uint8)
        brackets = np.flatnonzero((chars == _OPEN) | (chars == _CLOSE))
        depths = np.cumsum(np.where(chars[brackets] == _OPEN, 1, -1)) + depth
        closed = np.flatnonzero(depths <= 0)
        if len(closed):
            last = int(closed[0])
            end = pos + int(brackets[last]) + 1
            brackets, depths = brackets[:last + 1], depths[:last + 1]
        if bytes(view[pos:end or stop]).translate(None, _ALLOWED_BYTES):
            return None
        cut = _last_top_level_comma(body, pos, end or stop, brackets, depths, depth)
        if cut is not None:
            cuts.append(cut)
        depth = int(depths[-1]) if len(depths) else depth
        pos = stop
    if end is None or _next_char(body, start + 1) == _CLOSE:  # unterminated, or empty
        return None
    if cuts and cuts[-1] > end - 1 - chunk_bytes // 4:
        cuts.pop()  # no tiny last piece
    del view
    return ArraySpan(key, start, end, cuts)


def _last_top_level_comma(body: bytes | bytearray, pos: int, stop: int, brackets: np.ndarray,
                          depths: np.ndarray, depth: int) -> int | None:
    """The last comma at depth 1 in `body[pos:stop]`, given its brackets and their depths."""
    # Depth 1 holds between a bracket that leaves depth 1 and the next bracket;
    # also from `pos` to the first bracket when the scan starts at depth 1.
    starts = [pos + int(b) + 1 for b in brackets[depths == 1]]
    if depth == 1:
        starts.insert(0, pos)
    for left in reversed(starts[-3:]):  # the comma is in one of the last few gaps
        after = int(np.searchsorted(brackets, left - pos))
        right = pos + int(brackets[after]) if after < len(brackets) else stop
        at = body.rfind(b",", left, right)
        if at >= 0:
            return at
    return None


def rest_of_document(body: bytes | bytearray, span: ArraySpan) -> Any:
    """Decodes the body with the array replaced by `SENTINEL`; None if malformed."""
    try:
        return orjson.loads(bytes(body[:span.start]) + _SENTINEL_JSON + bytes(body[span.end:]))
    except orjson.JSONDecodeError:
        return None


def decode_pieces(body: bytes | bytearray, span: ArraySpan, dtype: np.dtype,
                  castable: Any) -> tuple[np.ndarray, np.dtype] | None:
    """Decodes the array of `span`, piece by piece, into one array of `dtype`.

    Args:
        body: the request body (a `bytearray` is decoded in place: the byte
            before and after each piece is overwritten with a bracket).
        span: from `find_array`.
        dtype: the dtype to cast each piece into.
        castable: `castable(source, target)`, the dtype table of the Predictor.

    Returns:
        `(array, decoded_dtype)`, where `decoded_dtype` is what NumPy made of
        the numbers before the cast; or None when a piece is malformed,
        ragged, not numeric, not castable to `dtype`, or shaped unlike the
        others.
    """
    bounds = [span.start, *span.cuts, span.end - 1]
    arrays, decoded, inner = [], None, None
    for left, right in itertools.pairwise(bounds):
        arr = _decode_piece(body, left, right)
        if arr is None or arr.dtype.kind not in "biuf":
            return None
        if inner is None:
            inner = arr.shape[1:]
        if arr.shape[1:] != inner:
            return None
        decoded = arr.dtype if decoded is None else np.promote_types(decoded, arr.dtype)
        if arr.dtype != dtype:
            if not castable(arr.dtype, dtype):
                return None
            with np.errstate(over="ignore"):  # too large for the dtype: +/-Infinity, as TF Serving
                arr = arr.astype(dtype)
        arrays.append(arr)
    out = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return out, decoded


def _decode_piece(body: bytes | bytearray, left: int, right: int) -> np.ndarray | None:
    """Decodes the elements between the separators at `left` and `right`."""
    if isinstance(body, bytearray):
        saved = body[left], body[right]
        body[left], body[right] = _OPEN, _CLOSE
        try:
            with memoryview(body) as view:
                return _to_array(view[left:right + 1])
        finally:
            body[left], body[right] = saved
    return _to_array(b"[" + body[left + 1:right] + b"]")


def _to_array(text: Any) -> np.ndarray | None:
    try:
        items = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:  # NaN/Infinity tokens, or numbers too large for a double
            items = json.loads(bytes(text))
        except ValueError:
            return None
    try:
        return np.asarray(items)
    except (ValueError, TypeError):  # ragged
        return None


def _skip_whitespace(body: bytes | bytearray, i: int) -> int:
    while i < len(body) and body[i] in _WHITESPACE:
        i += 1
    return i


def _next_char(body: bytes | bytearray, i: int) -> int | None:
    i = _skip_whitespace(body, i)
    return body[i] if i < len(body) else None
