"""safetensors read and written without torch: an 8-byte header length, a JSON header, raw bytes.

The header is validated the way the reference implementation does (size limit, known dtypes,
shapes that fit, offsets sorted, contiguous and covering the data exactly), so a damaged file is
a clear error here rather than a crash later.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

from . import dtypes
from .byteranges import FileRange
from .errors import CorruptCheckpointError, UnsupportedError
from .refs import StorageRef, TensorRef, contiguous_stride

MAX_HEADER = 100_000_000


def read_header(path: str, base: int = 0) -> tuple[dict, dict, int]:
    """(tensors, metadata, data_start) for a safetensors file; tensors keep file order.
    ``base``: the safetensors bytes start there and run to the end of ``path`` (offsets
    returned are offsets in ``path``)."""
    size = os.path.getsize(path) - base
    with open(path, "rb") as f:
        f.seek(base)
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CorruptCheckpointError(f"{path}: safetensors header of {n} bytes exceeds the 100 MB limit")
        if 8 + n > size:
            raise CorruptCheckpointError(f"{path}: safetensors header length {n} runs past the end of the file")
        raw = f.read(n)
    dup: list = []

    def _pairs(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                dup.append(k)
            seen[k] = v
        return seen

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if dup:  # JSON would keep the last silently: which tensor the file means is ambiguous
        raise CorruptCheckpointError(f"{path}: safetensors header names {dup[0]!r} twice")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptCheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CorruptCheckpointError(f"{path}: header entry {name!r} is not an object")
        code, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        bits = dtypes.safetensors_bits(code)
        if bits is None:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has unknown dtype {code!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and o >= 0 for o in offs)):
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
        numel = 1
        for s in shape:
            numel *= s
            if numel * bits > data_len * 8:
                raise CorruptCheckpointError(f"{path}: tensor {name!r} shape {shape} overflows the file")
        if numel * bits % 8:
            raise CorruptCheckpointError(f"{path}: {code} tensor {name!r} of shape {shape} does not fill whole bytes")
        begin, end = offs
        if end < begin or end - begin != numel * bits // 8:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} data_offsets {offs} do not match shape {shape} of {code}")
        spans.append((begin, end, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            what = "overlaps another tensor" if begin < cursor else "leaves a gap before it"
            raise CorruptCheckpointError(f"{path}: tensor {name!r} {what} (offset {begin}, expected {cursor})")
        cursor = end
    if cursor != data_len:
        raise CorruptCheckpointError(
            f"{path}: header describes {cursor} data bytes but the file holds {data_len}"
            + (" (trailing bytes)" if data_len > cursor else " (truncated)"))
    return header, meta, base + 8 + n


def load_entries(path: str, base: int = 0) -> tuple[dict, dict]:
    """name -> TensorRef over the file's bytes (nothing read), plus the string metadata."""
    header, meta, start = read_header(path, base)
    out = {}
    for name, info in header.items():
        code, begin, end = info["dtype"], *info["data_offsets"]
        dt = dtypes.SAFETENSORS_TO_DTYPE.get(code)
        if dt is None:
            raise UnsupportedError(f"{path}: tensor {name!r} is {code}, a {dtypes.safetensors_bits(code)}-bit float "
                                   "that torch has no dtype for")
        per = dtypes.PACKED_PER_ELEMENT.get(dt, 1)
        if per > 1 and (not info["shape"] or info["shape"][-1] % per):
            raise UnsupportedError(f"{path}: {code} tensor {name!r} of shape {info['shape']} does not map onto "
                                   f"torch's {dt} (its last dimension must be a multiple of {per})")
        shape = torch_shape(dt, info["shape"])
        storage = StorageRef(dt, (end - begin) // dtypes.itemsize(dt),
                             FileRange(path, start + begin, end - begin, label=f"tensor {name!r}"))
        stride = contiguous_stride(shape)
        out[name] = TensorRef(storage, 0, shape, stride, dt)
    return out, meta


def torch_shape(dtype: str, shape) -> tuple:
    """A safetensors shape as torch sees it (F4: the last dimension counts pairs)."""
    per = dtypes.PACKED_PER_ELEMENT.get(dtype, 1)
    shape = tuple(shape)
    return shape[:-1] + (shape[-1] // per,) if per > 1 else shape


def file_shape(dtype: str, shape, name: str = "") -> list:
    """The inverse of :func:`torch_shape`: the shape safetensors records."""
    per = dtypes.PACKED_PER_ELEMENT.get(dtype, 1)
    shape = list(shape)
    if per > 1:
        if not shape:
            raise UnsupportedError(f"safetensors cannot store a 0-dimensional {dtype} tensor ({name!r})",
                                   hint="reshape it to (1,) or write a torch file (.pt)")
        shape[-1] *= per
    return shape


def build_header(items: Iterable[tuple[str, TensorRef]], metadata: dict | None,
                 data_start_like: int | None = None) -> tuple[bytes, list]:
    """(header bytes incl. length prefix, [(name, ref)] in data order).

    ``data_start_like``: pad the JSON with spaces (the format allows trailing whitespace) so the
    data section starts at this offset modulo 4096 -- the source's, when the data is copied from
    a file: the kernel then copies whole pages.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    order, cursor = [], 0
    for name, ref in items:
        code = dtypes.DTYPE_TO_SAFETENSORS.get(ref.dtype)
        if code is None:
            raise UnsupportedError(f"safetensors cannot store dtype {ref.dtype} (tensor {name!r})",
                                   hint="write a torch file instead (.pt)")
        header[name] = {"dtype": code, "shape": file_shape(ref.dtype, ref.shape, name),
                        "data_offsets": [cursor, cursor + ref.nbytes]}
        cursor += ref.nbytes
        order.append((name, ref))
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-(8 + len(raw))) % 8)  # data section starts 8-byte aligned
    if data_start_like is not None and data_start_like % 8 == 0:
        raw += b" " * ((data_start_like - 8 - len(raw)) % 4096)
    return struct.pack("<Q", len(raw)) + raw, order
