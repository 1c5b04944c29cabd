"""Tensors on the wire: datatype names, JSON ``data`` lists, ``.npy`` and ``ETNS`` frames.

Arrays decoded from binary payloads (``.npy``, ``ETNS``) are zero-copy, read-only views
of the payload when their bytes are aligned for their dtype; otherwise (and for
big-endian or Fortran-order ``.npy``) they are copied. Callers must not write to them.

Non-finite floats in JSON ``data`` are written as the strings ``"NaN"``, ``"Infinity"``
and ``"-Infinity"`` (the proto3 JSON convention), since JSON has no literal for them;
the decoders read those strings back, as well as Python's ``NaN``/``Infinity`` literals.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import BadRequest

try:  # orjson writes numpy arrays natively; plain json is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency of the agent extra
    _orjson = None  # type: ignore[assignment]

Array = npt.NDArray[Any]

#: Datatype name -> little-endian numpy dtype.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "UINT16": np.dtype("<u2"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES: dict[tuple[str, int], str] = {(dt.kind, dt.itemsize): n for n, dt in DATATYPES.items()}
#: Unsigned types the protocol lacks, widened losslessly when an output has them.
_WIDEN: dict[tuple[str, int], str] = {("u", 4): "INT64"}
MAX_DIMS = 32
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@dataclass(frozen=True, slots=True)
class WireTensor:
    """One named (or, for a single input, unnamed) tensor of a request or response."""

    name: str | None
    array: Array


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The protocol datatype name of a numpy dtype (``float32`` -> ``FP32``).

    Raises:
        ValueError: the protocol has no datatype for it (strings, complex, uint32...).
    """
    name = _NAMES.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise ValueError(f"numpy dtype {dtype} has no protocol datatype")
    return name


def dtype_of(datatype: object) -> np.dtype[Any]:
    """The numpy dtype of a protocol datatype name (``FP32`` -> ``float32``).

    Raises:
        BadRequest: not one of the protocol's datatype names.
    """
    dt = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dt is None:
        raise BadRequest(f"unknown datatype {str(datatype)[:40]!r}")
    return dt


def wire_array(array: Array) -> tuple[str, Array]:
    """``(datatype, array)`` ready to send: little-endian, C-contiguous, a protocol dtype.

    ``uint32`` is widened to ``INT64``; ``uint64`` too when every value fits.

    Raises:
        ValueError: the dtype cannot be carried (strings, complex, objects, huge uint64).
    """
    key = (array.dtype.kind, array.dtype.itemsize)
    name = _NAMES.get(key) or _WIDEN.get(key)
    if name is None and key == ("u", 8) and (array.size == 0 or int(array.max()) < 2**63):
        name = "INT64"
    if name is None:
        raise ValueError(f"numpy dtype {array.dtype} has no protocol datatype")
    return name, array.astype(DATATYPES[name], order="C", copy=False)


def check_shape(shape: object, what: str) -> tuple[int, ...]:
    """A validated shape: a list of at most 32 non-negative integers.

    Raises:
        BadRequest: not a list of non-negative ints.
    """
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise BadRequest(f"{what}: 'shape' must be a list of at most {MAX_DIMS} integers")
    for d in shape:
        if type(d) is not int or d < 0:
            raise BadRequest(f"{what}: 'shape' must hold non-negative integers")
    return tuple(shape)


def _replace_non_finite(data: object, what: str) -> object:
    """``data`` with the strings ``NaN``/``Infinity``/``-Infinity`` made floats (slow path)."""
    if isinstance(data, list):
        return [_replace_non_finite(v, what) for v in data]
    if isinstance(data, str):
        if data in _NON_FINITE:
            return _NON_FINITE[data]
        raise BadRequest(f"{what}: 'data' holds a string that is not NaN/Infinity/-Infinity")
    return data


def array_from_data(data: object, shape: tuple[int, ...], datatype: str, what: str) -> Array:
    """Build the array of one JSON input from its ``data`` list (flat or nested, row-major).

    Integer datatypes take JSON integers only, in the datatype's range; ``BOOL`` takes
    ``true``/``false``; float datatypes take numbers and the non-finite strings.

    Raises:
        BadRequest: not a list, wrong element types, ragged nesting, values out of range, or an
            element count that is not the product of ``shape``.
    """
    dtype = DATATYPES[datatype]
    if not isinstance(data, list):
        raise BadRequest(f"{what}: 'data' must be a list")
    try:
        raw = np.asarray(data)
        if raw.dtype.kind in "UO" and dtype.kind == "f":
            raw = np.asarray(_replace_non_finite(data, what))
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise BadRequest(f"{what}: 'data' is not a rectangular list of values") from exc
    size = math.prod(shape)
    if raw.size != size:
        raise BadRequest(f"{what}: shape {list(shape)} needs {size} values, 'data' has {raw.size}")
    if size == 0:
        return np.empty(shape, dtype)
    kind = raw.dtype.kind
    if dtype.kind == "b":
        if kind != "b":
            raise BadRequest(f"{what}: BOOL data must be true/false")
        return raw.reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if kind not in "iu" or int(raw.min()) < info.min or int(raw.max()) > info.max:
            raise BadRequest(
                f"{what}: {datatype} data must be integers in [{info.min}, {info.max}]"
            )
        return raw.astype(dtype, copy=False).reshape(shape)
    if kind not in "iuf":
        raise BadRequest(f"{what}: {datatype} data must be numbers")
    if raw.dtype == dtype:
        return raw.reshape(shape)
    with np.errstate(over="raise"):
        try:
            return raw.astype(dtype).reshape(shape)
        except FloatingPointError as exc:
            raise BadRequest(f"{what}: a value is out of range for {datatype}") from exc


def jsonable(doc: object) -> object:
    """``doc`` with non-finite floats made strings and numpy values made Python ones (slow)."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else _non_finite_name(doc)
    if isinstance(doc, dict):
        return {k: jsonable(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [jsonable(v) for v in doc]
    if isinstance(doc, np.ndarray | np.generic):
        return jsonable(doc.tolist())
    return doc


def _non_finite_name(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    return "Infinity" if v > 0 else "-Infinity"


def array_from_bytes(buf: memoryview, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array:
    """A read-only view of ``buf`` as an array (copied only when misaligned).

    Raises:
        BadRequest: ``BOOL`` bytes other than 0 and 1.
    """
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    if not arr.flags.aligned:
        arr = arr.copy()
    if dtype.kind == "b" and arr.size and int(arr.view(np.uint8).max()) > 1:
        raise BadRequest("BOOL tensor bytes must be 0 or 1")
    return arr


def read_npy(payload: memoryview) -> Array:
    """Decode one ``.npy`` array (format 1.0, 2.0 or 3.0); object arrays are refused.

    Raises:
        BadRequest: a malformed header, a dtype the protocol lacks, or a byte count
            that does not match the header exactly.
    """
    fp = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:  # numpy's header parser raises several types on bad input
        raise BadRequest(f"malformed .npy payload: {str(exc)[:120]}") from exc
    name = _NAMES.get((dtype.kind, dtype.itemsize))
    if name is None or dtype.fields is not None or dtype.subdtype is not None:
        raise BadRequest(f".npy dtype {str(dtype)[:40]} is not a protocol datatype")
    offset = fp.tell()
    expected = math.prod(shape) * dtype.itemsize
    if len(payload) - offset != expected:
        raise BadRequest(
            f".npy payload holds {len(payload) - offset} data bytes, header says {expected}"
        )
    order_shape = shape[::-1] if fortran else shape
    arr = array_from_bytes(payload[offset:], order_shape, dtype)
    if fortran:
        arr = arr.T.copy(order="C")
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


ETNS_MAGIC = b"ETNS"


def read_etns(payload: memoryview) -> tuple[dict[str, Any], memoryview]:
    """Split an ``ETNS`` frame into its JSON header (an object) and the raw bytes after it.

    Raises:
        BadRequest: no magic, a header length past the end, or a header that is not a
            JSON object.
    """
    if len(payload) < 8 or bytes(payload[:4]) != ETNS_MAGIC:
        raise BadRequest("binary tensors payload is shorter than its 8-byte preamble")
    n = int.from_bytes(payload[4:8], "big")
    if n > len(payload) - 8:
        raise BadRequest(f"binary tensors header length {n} runs past the payload")
    header = load_json_object(payload[8 : 8 + n], "binary tensors header")
    return header, payload[8 + n :]


def split_tensors(
    body: memoryview, specs: Sequence[tuple[str | None, tuple[int, ...], str]]
) -> list[WireTensor]:
    """Cut the raw bytes of an ``ETNS`` frame into one array per ``(name, shape, datatype)``.

    Raises:
        BadRequest: the bytes are too short or too long for the declared tensors.
    """
    sizes = [math.prod(shape) * DATATYPES[dt].itemsize for _, shape, dt in specs]
    if sum(sizes) != len(body):
        raise BadRequest(f"binary tensors: header declares {sum(sizes)} bytes, got {len(body)}")
    tensors, offset = [], 0
    for (name, shape, dt), size in zip(specs, sizes, strict=True):
        arr = array_from_bytes(body[offset : offset + size], shape, DATATYPES[dt])
        tensors.append(WireTensor(name, arr))
        offset += size
    return tensors


def write_etns(header: dict[str, Any], arrays: Sequence[Array]) -> bytes:
    """An ``ETNS`` frame: magic, header length, the JSON header, then each array's bytes.

    The header is padded with spaces so that the first tensor starts 8-byte aligned.
    ``arrays`` must already be little-endian and C-contiguous (see :func:`wire_array`).
    """
    head = dumps(header)
    head += b" " * (-(8 + len(head)) % 8)
    parts: list[bytes | memoryview] = [ETNS_MAGIC, len(head).to_bytes(4, "big"), head]
    parts.extend(a.data.cast("B") for a in arrays if a.size)
    return b"".join(parts)


def _numpy_default(obj: object) -> object:
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(doc: object) -> bytes:
    """Compact, always valid JSON as UTF-8 bytes (see :func:`jsonable` for NaN and numpy).

    Raises:
        TypeError: ``doc`` holds something that is not JSON-like.
    """
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False, default=_numpy_default)
    except ValueError:  # a non-finite float somewhere: the slow path, only then
        text = json.dumps(jsonable(doc), separators=(",", ":"), allow_nan=False)
    return text.encode()


def json_data(array: Array) -> object:
    """The ``data`` of one output for :func:`dumps_fast`: the flat array itself (orjson
    writes numpy arrays natively, ~20x faster than ``tolist`` + json), or a list with
    NaN/Inf as strings when the array holds any (the rare, slow path)."""
    flat = array.reshape(-1)
    if _orjson is None or flat.dtype.kind == "b":
        return jsonable(flat.tolist())
    if flat.dtype.kind == "f":
        if flat.dtype == np.float16:
            flat = flat.astype(np.float32)
        if not math.isfinite(float(flat.sum(dtype=np.float64))):
            return jsonable(flat.tolist())
    return np.ascontiguousarray(flat)


def dumps_fast(doc: object) -> bytes:
    """:func:`dumps` for a document whose arrays came from :func:`json_data` (orjson when
    installed). Float32 values are written in their shortest float32 form, which reads
    back to the same float32."""
    if _orjson is None:
        return dumps(doc)
    try:
        out: bytes = _orjson.dumps(doc, default=_numpy_default, option=_orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:
        return dumps(doc)
    return out


def load_json_object(payload: bytes | memoryview, what: str) -> dict[str, Any]:
    """Parse a UTF-8 JSON object.

    Raises:
        BadRequest: not valid JSON, or not an object.
    """
    try:
        doc = json.loads(bytes(payload) if isinstance(payload, memoryview) else payload)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BadRequest(f"{what} is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return doc
