"""A DCP folder's parts put back together: a tensor sharded over ranks from its chunks (checked
against their shapes, no bytes read until needed), and the nested structure from the planner's
key paths. :mod:`ckptsurgeon.formats.dcp` reads the folder."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

from .. import dtypes
from ..errors import CorruptCheckpointError, UnsupportedError
from ..layout import assembled_ref


def assemble(fqn, shape, dtype, pieces):
    """A tensor sharded over ranks: checked now against the chunks' shapes (no bytes read),
    put together chunk by chunk only when its bytes are needed, and not kept (see
    :class:`~ckptsurgeon.byteranges.AssembledBytes`)."""
    covered = 0
    total = 1
    for d in shape:
        total *= d
    for offsets, ref in pieces:
        if len(offsets) != len(shape) or any(o < 0 or o + s > d for o, s, d in zip(offsets, ref.shape, shape)):
            raise CorruptCheckpointError(f"DCP chunk of {fqn!r} at {list(offsets)} does not fit {list(shape)}")
        if ref.dtype != dtype:
            raise CorruptCheckpointError(f"DCP chunk of {fqn!r} is {ref.dtype}, the metadata says {dtype}")
        covered += ref.numel
    if covered != total:
        raise CorruptCheckpointError(f"DCP tensor {fqn!r}: its chunks cover {covered} of {total} elements "
                                     "(a rank's file missing from the folder?)")
    check_disjoint(fqn, pieces)  # the right total from overlapping chunks would leave a gap unwritten

    def build():
        import torch

        out = torch.empty(shape, dtype=dtypes.torch_dtype(dtype))
        for offsets, ref in pieces:
            out[tuple(slice(o, o + s) for o, s in zip(offsets, ref.shape))] = ref.to_torch()
        return out

    return assembled_ref(shape, dtype, build, label=f"DCP tensor {fqn!r}", pieces=pieces)


def check_disjoint(fqn, pieces) -> None:
    """No two chunks overlap. Sharding lays chunks out as a grid: along every dimension the
    chunks' intervals partition it, and each cell of the grid is one chunk -- checked in
    O(n log n). Anything else (no layout torch writes) is compared pair by pair, with a
    sort-and-break sweep along the first dimension, for up to _PAIRWISE chunks."""
    boxes = [(tuple(o), tuple(o[i] + n for i, n in enumerate(ref.shape))) for o, ref in pieces if ref.numel]
    if not boxes or not boxes[0][0]:
        if len(boxes) > 1:  # 0-d: one chunk at most
            raise CorruptCheckpointError(f"DCP tensor {fqn!r}: {len(boxes)} chunks of a scalar")
        return
    ndim = len(boxes[0][0])
    axes = [sorted({(lo[d], hi[d]) for lo, hi in boxes}) for d in range(ndim)]
    tiles = all(a[1] == b[0] for ax in axes for a, b in zip(ax, ax[1:]))
    cells = 1
    for ax in axes:
        cells *= len(ax)
    if tiles and cells == len(boxes) and len(set(boxes)) == len(boxes):
        return  # a grid (the coverage count was checked by the caller)
    if len(boxes) > _PAIRWISE:
        raise UnsupportedError(f"DCP tensor {fqn!r}: {len(boxes)} chunks that do not form a grid")
    boxes.sort()
    for i, (lo, hi) in enumerate(boxes):
        for lo2, hi2 in boxes[i + 1:]:
            if lo2[0] >= hi[0]:
                break
            if all(a2 < b and a < b2 for a, b, a2, b2 in zip(lo, hi, lo2, hi2)):
                raise CorruptCheckpointError(f"DCP tensor {fqn!r}: chunks at {list(lo)} and {list(lo2)} overlap")


_PAIRWISE = 4096


def unflatten(flat: dict, mapping) -> Any:
    """DCP's nested structure back from the planner's key paths (ints index lists)."""
    if not isinstance(mapping, Mapping) or not mapping:
        return OrderedDict(flat)
    root: dict = {}
    for fqn, value in flat.items():
        path = mapping.get(fqn, (fqn,))
        if not isinstance(path, tuple) or not path:
            path = (fqn,)
        node = root
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            node = _child(node, part, list if isinstance(nxt, int) else dict)
        _set(node, path[-1], value)
    return root


def _child(node, part, kind):
    if isinstance(node, list):
        while len(node) <= part:
            node.append(None)
        if node[part] is None:
            node[part] = kind()
        return node[part]
    if part not in node:
        node[part] = kind()
    return node[part]


def _set(node, part, value):
    if isinstance(node, list):
        while len(node) <= part:
            node.append(None)
        node[part] = value
    else:
        node[part] = value
