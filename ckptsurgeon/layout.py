"""Tensors whose bytes are made of other tensors' bytes, described without reading any.

A cast computed when written, a tensor put together from the pieces ranks saved (copied from
their files when the pieces follow each other, :func:`block_order`), and storages cut to the
parts the tensors being written use (:func:`compact_storages`). Writers copy such bytes from
files in the kernel where :func:`byteranges.file_pieces` finds them there; nothing here imports torch
(a cast's ``build`` does, when it runs).
"""

from __future__ import annotations

import bisect

from . import dtypes
from .byteranges import AssembledBytes, MemoryBytes
from .errors import CorruptCheckpointError
from .refs import StorageRef, TensorRef, check_dense_fits, contiguous_stride


def assembled_ref(shape, dtype: str, build, label: str = "", pieces=None) -> TensorRef:
    """A contiguous tensor of ``shape`` and ``dtype`` whose bytes ``build()`` makes when needed.
    ``pieces``: ``(offsets, TensorRef)`` of its blocks; when they follow each other in row-major
    order (see :func:`block_order`) the bytes are copied from them instead (:func:`concat_ref`)."""
    parts = block_order(shape, pieces) if pieces else None
    if parts is not None:
        return concat_ref(shape, dtype, parts, label)
    return _contiguous(shape, dtype, lambda nbytes: AssembledBytes(nbytes, build, label))


def cast_ref(ref: TensorRef, dtype: str, label: str = "") -> TensorRef:
    """``ref`` in another dtype, computed (with torch) only when its bytes are written."""
    def build():
        return ref.to_torch().to(dtypes.torch_dtype(dtype)).contiguous()
    check_dense_fits(ref, label)  # before anything is written
    return assembled_ref(ref.shape, dtype, build, label=label)


def concat_ref(shape, dtype: str, parts: list, label: str = "") -> TensorRef:
    """A contiguous tensor of ``shape`` whose bytes are those of ``parts`` (contiguous
    TensorRefs of ``dtype``) one after another: copied from their files, never assembled."""
    for p in parts:
        p.check_bounds()
        if p.byte_span() is None or p.dtype != dtype:
            raise CorruptCheckpointError(f"{label or 'a tensor'}: a piece is not a contiguous {dtype} tensor")
    ref = _contiguous(shape, dtype, lambda nbytes: AssembledBytes(nbytes, None, label, list(parts)))
    if sum(p.nbytes for p in parts) != ref.nbytes:
        raise CorruptCheckpointError(f"{label or 'a tensor'}: its pieces hold {sum(p.nbytes for p in parts)} "
                                     f"bytes, not {ref.nbytes}")
    return ref


def deferred_ref(shape, dtype: str, resolve, label: str = "") -> TensorRef:
    """A contiguous tensor of ``shape`` and ``dtype`` whose bytes are those of the TensorRefs
    ``resolve()`` returns when they are first needed (it must check they are what was promised)."""
    return _contiguous(shape, dtype, lambda nbytes: AssembledBytes(nbytes, None, label, resolve))


def _contiguous(shape, dtype: str, source_of) -> TensorRef:
    numel = 1
    for s in shape:
        numel *= int(s)
    source = source_of(numel * dtypes.itemsize(dtype))
    return TensorRef(StorageRef(dtype, numel, source), 0, tuple(shape), contiguous_stride(shape), dtype)


def block_order(shape, pieces) -> list | None:
    """The pieces ``(offsets, TensorRef)`` of a tensor of ``shape`` in the order whose bytes, one
    after another, are the whole tensor's in row-major order -- when there is one: each piece
    contiguous, all of them split along one dimension ``d`` only, and every dimension before ``d``
    of size 1. None otherwise (a column split, a 2-D grid of blocks)."""
    shape = tuple(shape)
    d = next((i for i, s in enumerate(shape) if s > 1), None)
    if d is None:
        return None
    live = [(tuple(o), r) for o, r in pieces if r.numel]
    for o, r in live:
        if (len(o) != len(shape) or len(r.shape) != len(shape) or r.byte_span() is None
                or any((o[i], r.shape[i]) != (0, shape[i]) for i in range(len(shape)) if i != d)):
            return None
    live.sort(key=lambda p: p[0][d])
    at = 0
    for o, r in live:
        if o[d] != at:
            return None
        at += r.shape[d]
    return [r for _, r in live] if at == shape[d] else None


COMPACT_MIN_UNUSED = 1 << 20  # bytes a storage must waste before it is cut (and 1/8 of it)
_COMPACT_ALIGN = 64  # kept parts start and end on this (every itemsize divides it)


def compact_storages(views: dict, whole: set) -> tuple[dict, dict]:
    """Which storages to write as only the parts their tensors use, and the views moved there.

    ``views``: id(storage) -> (StorageRef, [TensorRef views of it being written]); ``whole``:
    ids of storages written other than through a view (a bare storage), never cut. A storage is
    cut where the bytes no view reaches come to at least :data:`COMPACT_MIN_UNUSED` and an
    eighth of it, so a whole state dict keeps its records byte for byte. The kept parts (each
    view's first to last byte, widened to 64-byte boundaries, overlaps merged) follow each other
    in the new storage, copied from the old one's file (:func:`file_pieces`); each view keeps
    its shape and strides and gets the offset of the same element there, so views that shared
    or overlapped still do. Returns ``({id(old view): new view}, {"storages": n, "bytes": saved})``.
    """
    remap: dict = {}
    saved = {"storages": 0, "bytes": 0}
    for sid, (storage, refs) in views.items():
        total = storage.nbytes
        if total < COMPACT_MIN_UNUSED or sid in whole:  # (most storages: too small to waste enough)
            continue
        spans = []
        for r in {id(r): r for r in refs}.values():
            if r.numel:
                r.check_bounds()
                last = r.offset + sum((s - 1) * st for s, st in zip(r.shape, r.stride))
                spans.append((r.offset * r.itemsize, (last + 1) * r.itemsize))
        kept: list[list[int]] = []
        for lo, hi in sorted(spans):
            lo = lo // _COMPACT_ALIGN * _COMPACT_ALIGN
            hi = min(-(-hi // _COMPACT_ALIGN) * _COMPACT_ALIGN, total)
            if kept and lo <= kept[-1][1]:
                kept[-1][1] = max(kept[-1][1], hi)
            else:
                kept.append([lo, hi])
        used = sum(hi - lo for lo, hi in kept)
        if total - used < max(COMPACT_MIN_UNUSED, total // 8):
            continue
        isz = dtypes.itemsize(storage.dtype)
        parts, bases, at = [], [], 0
        for lo, hi in kept:
            parts.append(TensorRef(storage, lo // isz, ((hi - lo) // isz,), (1,), storage.dtype))
            bases.append(at - lo)  # a kept byte's new position: its old one plus this
            at += hi - lo
        los = [lo for lo, _ in kept]
        label = f"storage {storage.key}" if storage.key is not None else "a storage"
        source = AssembledBytes(used, None, f"{label} (the parts still used)", parts) if parts else MemoryBytes(b"")
        new = StorageRef(storage.dtype, used // isz, source, storage_type=storage.storage_type,
                         location=storage.location, key=storage.key)
        for r in refs:
            if id(r) in remap:
                continue
            offset = 0
            if r.numel:
                byte = r.offset * r.itemsize
                offset = (byte + bases[bisect.bisect_right(los, byte) - 1]) // r.itemsize
            remap[id(r)] = TensorRef(new, offset, r.shape, r.stride, r.dtype, requires_grad=r.requires_grad,
                                     hooks=r.hooks, metadata=r.metadata, param=r.param, attrs=r.attrs)
        saved["storages"] += 1
        saved["bytes"] += total - used
    return remap, saved
