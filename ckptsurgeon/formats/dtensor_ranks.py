"""A folder of per-rank torch.save files holding DTensors (FSDP2 / tensor-parallel scripts that
``torch.save(model.state_dict(), f"rank{rank}.pt")`` on every rank), or FSDP1's ShardedTensors
(SHARDED_STATE_DICT saved the same way), put back together.

Each file is read on the fast path (nothing imported, the DTensor's spec and mesh recorded
inert); a DTensor holding one rank's piece becomes a :class:`~ckptsurgeon.pickle_dist.DTensorShard`
(local tensor, global shape, sharded dimension, the rank's coordinate on the mesh). The files
must have the same structure; each sharded tensor is then assembled from its pieces in
coordinate order along its sharded dimension (checked at once from the pieces' shapes, put
together only when its bytes are needed, one tensor at a time, as DCP's sharded tensors are), and
everything else is taken from the first rank's file (lazily). One-dimensional meshes with Shard
or Replicate placements only: 2-D meshes, strided shards and partial sums are refused with the
way out (a full state dict, or a DCP save).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ..checkpoint import Source
from ..dtypes import count
from ..errors import CorruptCheckpointError, NotACheckpointError, UnsafePickleError, UnsupportedError
from ..keys import name_list
from ..layout import assembled_ref
from ..pickle_dist import DTensorShard
from ..pickle_io import NotFastPath, load_refs
from ..safety import INERT, TRUST_HINT, unsafe_in
from ..zipfmt import TorchZip

EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")
_MARKS = (b"\nDTensor\n", b"\nShardedTensor\n")  # the classes as GLOBAL lines name them


def _marked(data: bytes) -> bool:
    return any(m in data for m in _MARKS)


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.endswith(EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def _pickle_of(path: str) -> bytes | None:
    try:
        z = TorchZip(path)
    except Exception:
        return None
    try:
        return z.read("data.pkl")
    except Exception:
        return None
    finally:
        z.close()


def sniff(path: str, head: bytes) -> bool:
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, ".metadata")):
        return False
    files = _files(path)
    if len(files) < 2:
        return False
    data = _pickle_of(files[0])
    return data is not None and _marked(data)


def load(path: str, *, key=None, trust_pickle=False, **_):
    from ..graph import from_object

    files = _files(path)
    graphs = []
    for f in files:
        z = TorchZip(f)
        try:
            data = z.read("data.pkl")
            if z.has("byteorder") and z.read("byteorder").strip() == b"big":
                raise UnsupportedError(f"{f}: written on a big-endian machine", hint="pass the files one by one")
            if not _marked(data):
                raise NotACheckpointError(f"{f}: holds no DTensor or ShardedTensor, unlike "
                                          f"{os.path.basename(files[0])} (a folder of per-rank files of sharded "
                                          "tensors is read as one checkpoint)",
                                          hint="move the other files out, or pass one file")

            def source(k, dtype, nbytes, z=z):
                return z.source(f"data/{k}", nbytes, label=f"storage data/{k}")

            try:
                try:
                    graphs.append(load_refs(data, source, dtensor_shards=True))
                except NotFastPath as e:  # the opcodes are scanned only now, as for a single file
                    unsafe = unsafe_in(data)
                    if not unsafe:
                        raise UnsupportedError(f"uses {e}, which only torch.load rebuilds; per-rank files are "
                                               "put together from the torch-free reader only") from None
                    if trust_pickle != INERT:
                        raise UnsafePickleError(f"{f} would import globals outside the weights-only allowlist: "
                                                f"{name_list(unsafe, 20)}; nothing was executed", globals_=unsafe,
                                                hint=TRUST_HINT) from None
                    try:  # --inert-pickle: what no allowlist allows is recorded
                        graphs.append(load_refs(data, source, inert=unsafe, dtensor_shards=True))
                    except NotFastPath as other:
                        raise UnsupportedError(f"uses {other}, which only torch.load rebuilds") from None
            except UnsupportedError as e:
                raise UnsupportedError(f"{f}: {e.message}", hint=e.hint) from None
        finally:
            z.close()
    assembled: list[str] = []
    try:
        obj = _merge(graphs, (), assembled, {})
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{path}: {e.message}", hint=e.hint) from None
    notes = [f"per-rank DTensor/ShardedTensor files: {len(files)} ranks; {count(len(assembled), 'sharded tensor')}, "
             "put together when read, one at a time"
             + (f" (e.g. {assembled[0]})" if assembled else "") + "; everything else from "
             + os.path.basename(files[0])]
    size = sum(os.path.getsize(f) for f in files)
    source = Source(path=path, format="dtensor-ranks", size=size, files=tuple(files), lazy=True,
                    notes=tuple(notes))
    return from_object(obj, source, key=key)


def _where(path: tuple) -> str:
    return "/".join(map(str, path)) or "<top level>"


def _merge(nodes: list, path: tuple, assembled: list, memo: dict) -> Any:
    first = nodes[0]
    if id(first) in memo:  # shared (or cyclic) in the pickle: merged once
        return memo[id(first)]
    if isinstance(first, DTensorShard):
        out = _assemble(nodes, path)
        assembled.append(_where(path))
        memo[id(first)] = out
        return out
    if any(isinstance(n, DTensorShard) for n in nodes):
        raise CorruptCheckpointError(f"{_where(path)} is a DTensor piece in some rank files and not in others")
    if isinstance(first, Mapping):
        if any(not isinstance(n, Mapping) or list(n.keys()) != list(first.keys()) for n in nodes):
            raise CorruptCheckpointError(f"the rank files differ at {_where(path)} (not one checkpoint's ranks?)")
        out = type(first)() if type(first) in (dict, OrderedDict) else OrderedDict()
        memo[id(first)] = out
        if getattr(first, "_metadata", None) is not None:
            out._metadata = first._metadata
        for k in first:
            out[k] = _merge([n[k] for n in nodes], path + (k,), assembled, memo)
        return out
    if type(first) in (list, tuple):
        if any(type(n) is not type(first) or len(n) != len(first) for n in nodes):
            raise CorruptCheckpointError(f"the rank files differ at {_where(path)} (not one checkpoint's ranks?)")
        out = []
        if type(first) is list:
            memo[id(first)] = out  # before its items: a list may hold itself
        out.extend(_merge([n[i] for n in nodes], path + (i,), assembled, memo) for i in range(len(first)))
        if type(first) is tuple:
            out = tuple(out)
            memo[id(first)] = out
        return out
    return first


def _assemble(shards: list, path: tuple):
    """The pieces of one DTensor, to be concatenated in coordinate order along the sharded
    dimension: checked now from their shapes, put together when read."""
    size, dim = tuple(shards[0].size), shards[0].dim
    if any(tuple(s.size) != size or s.dim != dim for s in shards):
        raise CorruptCheckpointError(f"the ranks disagree on the shape or placement of {_where(path)}")
    if not isinstance(dim, int) or not 0 <= dim < len(size):
        raise CorruptCheckpointError(f"{_where(path)}: a piece of a {list(size)} tensor sharded on dimension {dim!r}")
    held = [s for s in shards if s.local is not None]  # (a rank may hold no piece of a small ShardedTensor)
    coords = sorted(s.coordinate for s in held)
    if not held or coords != list(range(len(held))):
        raise CorruptCheckpointError(f"{_where(path)}: rank coordinates {coords} are not 0..{len(held) - 1} "
                                     "(a rank's file missing, or files of two runs?)")
    pieces = [s.local for s in sorted(held, key=lambda s: s.coordinate)]
    dtype = pieces[0].dtype
    made = list(size)
    made[dim] = sum(p.shape[dim] if len(p.shape) == len(size) else -1 for p in pieces)
    if any(len(p.shape) != len(size) or p.dtype != dtype
           or any(a != b for i, (a, b) in enumerate(zip(p.shape, size)) if i != dim) for p in pieces) \
            or made[dim] != size[dim]:
        shapes = ", ".join(f"{p.dtype}{list(p.shape)}" for p in pieces)
        raise CorruptCheckpointError(f"the pieces of {_where(path)} ({shapes}) do not make a {list(size)} tensor")

    def build():
        import torch

        return torch.cat([p.to_torch() for p in pieces], dim=dim)

    offsets, at = [], 0
    for p in pieces:
        offsets.append(tuple(at if i == dim else 0 for i in range(len(size))))
        at += p.shape[dim]
    return assembled_ref(size, dtype, build, label=_where(path), pieces=list(zip(offsets, pieces)))
