"""Read and write torch's ``data.pkl`` without importing torch and without executing anything.

``load_refs`` unpickles with an allowlist that is a subset of what our ``torch.load`` call
allows (torch's weights-only allowlist plus ``safety``'s plain data types): torch globals become
inert :class:`~ckptsurgeon.refs.GlobalRef` stand-ins, tensor rebuild calls become
:class:`~ckptsurgeon.refs.TensorRef`, and persistent ids become
:class:`~ckptsurgeon.refs.StorageRef`. Anything outside the subset raises :class:`NotFastPath`,
and the caller hands the file to ``torch.load(weights_only=True)``, which has the final say --
unless the user asked for ``--inert-pickle``: then globals outside every allowlist become
:class:`~ckptsurgeon.refs.InertObject` records, never imported or called.

``dump_refs`` pickles such a graph back (protocol 2, the globals and persistent ids torch writes),
numbering storages ``0..n-1`` in first-use order as ``torch.save`` does.

``scan_globals`` lists every global a pickle would import, by reading opcodes only.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import functools
import io
import os
import pickle
import re
import sys
import threading
from collections import Counter, OrderedDict
from typing import Any, Callable

from . import dtypes
from .errors import CorruptCheckpointError, OutputError, UnsupportedError
from .layout import compact_storages
from .refs import CallRef, GlobalRef, InertCall, InertObject, StorageRef, TensorRef, inert_class


class NotFastPath(Exception):
    """The pickle uses something outside the torch-free subset; use torch.load instead."""


def _latin1_encode(text, encoding="latin1"):
    # protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); nothing else is allowed
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise NotFastPath("_codecs.encode with unexpected arguments")
    return text.encode("latin1")


class PickledSet(set):
    """A set as a pickle built it, remembering the order its items were pickled in. Two strings
    whose hashes collide make a set that iterates in another order when made again from its
    own items (seen: ``{"a", "b"}`` under PYTHONHASHSEED=24), so re-pickling a plain set could
    change the bytes of an unchanged checkpoint. Unchanged, it pickles in that order; changed,
    as any set."""

    __slots__ = ("_order",)

    def __init__(self, items=()):
        items = list(items)
        super().__init__(items)
        self._order = items

    def __reduce_ex__(self, protocol):
        return set, (_order_of(self),)


class PickledFrozenset(frozenset):
    """:class:`PickledSet` for frozensets."""

    __slots__ = ("_order",)

    def __new__(cls, items=()):
        items = list(items)
        obj = super().__new__(cls, items)
        obj._order = items
        return obj

    def __reduce_ex__(self, protocol):
        return frozenset, (_order_of(self),)


def _order_of(s) -> list:
    order = s._order
    return order if len(order) == len(s) and all(x in s for x in order) else list(s)


_REAL = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): PickledSet,
    ("builtins", "frozenset"): PickledFrozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("collections", "Counter"): Counter,
    ("_codecs", "encode"): _latin1_encode,
}


#: The concrete path classes of the other operating system: a Lightning checkpoint saved on
#: Windows carries its hparams' paths as pathlib.WindowsPath, which Python cannot instantiate
#: elsewhere (torch.load fails on them on Linux). Like the pure paths they are plain data, so
#: they are read as inert records by default (never built) and written back as they were.
OTHER_OS_PATHS = frozenset(f"{m}.{c}" for m in ("pathlib", "pathlib._local")
                           for c in (("PosixPath",) if os.name == "nt" else ("WindowsPath",)))


def _data_global(module: str, name: str):
    """safety's plain data types (argparse.Namespace, pathlib paths, numpy numbers) as the real
    objects: building them runs nothing of the file's choosing (the set torch.load is allowed
    too), so timm's train checkpoints and resume files stay on the fast path. They pickle back
    the way torch.save writes them. numpy dtypes holding objects are left to torch.load, which
    refuses them."""
    from .safety import data_global  # safety imports this module

    return data_global(f"{module}.{name}")


def _objects(root):
    """Every object of an unpickled graph once: containers' items (keys too), tensors' hooks and
    metadata, recorded calls' arguments and state, other objects' attributes (an inert record)."""
    stack, seen = [root], set()
    while stack:
        o = stack.pop()
        if o is None or isinstance(o, (str, bytes, int, float, StorageRef, GlobalRef, type)) or id(o) in seen:
            continue
        seen.add(id(o))
        yield o
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, TensorRef):
            stack.extend((o.hooks, o.metadata, o.param, o.attrs))
        elif isinstance(o, (CallRef, InertCall)):
            stack.append(o.func)
            stack.extend(o.args)
            stack.append(o.state)
        elif hasattr(o, "__dict__"):
            stack.extend(vars(o).values())


def _refuse_numpy_objects(root) -> None:
    """NotFastPath if the graph holds a numpy array, scalar or dtype of objects (or numpy 2's
    variable-width strings): torch.load refuses those, and so must the fast path."""
    import numpy

    for o in _objects(root):
        dt = o if isinstance(o, numpy.dtype) else getattr(o, "dtype", None) if isinstance(
            o, (numpy.ndarray, numpy.generic)) else None
        if dt is not None and (dt.hasobject or type(dt).__name__ == "StringDType"):
            raise NotFastPath(f"numpy.dtypes.{type(dt).__name__}")


_PLAIN_TENSOR = GlobalRef("torch", "Tensor")
_KEPT = {("torch", "Size"), ("torch", "device"), ("torch.storage", "UntypedStorage"), ("torch", "Tensor"),
         ("torch._utils", "_rebuild_wrapper_subclass"), ("torch.serialization", "_get_layout")}
_KEPT |= {("torch", name) for name in dtypes.ITEMSIZE}
_KEPT |= {("torch", name) for name in dtypes.STORAGE_TO_DTYPE}


def _check_view(storage, offset, size, stride):
    if not isinstance(storage, StorageRef):
        raise NotFastPath("tensor without a storage record")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and isinstance(offset, int)):
        raise NotFastPath("tensor with unusual size/stride")
    if len(size) != len(stride) or not all(isinstance(x, int) for x in size + stride):
        raise CorruptCheckpointError("tensor size and stride do not match")


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    _check_view(storage, offset, size, stride)
    return _checked(TensorRef(storage, offset, size, stride, storage.dtype, requires_grad=bool(requires_grad),
                              hooks=hooks, metadata=metadata))


def _checked(t: TensorRef) -> TensorRef:
    """A view from the pickle, checked against its storage as it is read: a contiguous view is
    later copied as a byte range without going through torch, so one reaching past its storage
    (a damaged offset) would have been written with the next record's bytes, and a negative size
    as a negative byte count."""
    t.check_bounds()
    return t


def _rebuild_v1(storage, offset, size, stride):
    return _rebuild_v2(storage, offset, size, stride)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    _check_view(storage, offset, size, stride)
    if not isinstance(dtype, GlobalRef) or dtype.module != "torch" or dtype.name not in dtypes.ITEMSIZE:
        raise NotFastPath("tensor with unknown dtype")
    return _checked(TensorRef(storage, offset, size, stride, dtype.name, requires_grad=bool(requires_grad),
                              hooks=hooks, metadata=metadata))


def _rebuild_param(data, requires_grad, hooks, state=None):
    if not isinstance(data, TensorRef):
        raise NotFastPath("parameter around a non-plain tensor")
    data.param = (bool(requires_grad), hooks, state)
    return data


def _rebuild_param_state(data, requires_grad, hooks, state):
    return _rebuild_param(data, requires_grad, hooks, state)


#: What a DTensor (FSDP2, tensor parallel) pickles besides torch's own rebuild functions: the
#: class, its spec, the device mesh and the placements. torch.distributed.tensor registers these
#: with add_safe_globals, so torch.load(weights_only=True) reads them once that module is
#: imported; older versions kept them under torch.distributed._tensor, hence names, not paths.
#: Here they are never imported: the parts are recorded inert and the DTensor becomes its local
#: tensor when that holds the whole value (see _dtensor).
DTENSOR_NAMES = frozenset({"DTensor", "DTensorSpec", "TensorMeta", "ShardOrderEntry", "DeviceMesh", "Shard",
                           "Replicate", "Partial", "_Partial", "_StridedShard", "_MeshLayout", "_FlatLayout"})


#: What an FSDP1 SHARDED_STATE_DICT (a ShardedTensor per parameter) pickles, saved per rank with
#: torch.save: torch.distributed._shard's data classes, recorded inert the same way (the
#: ShardedTensor becomes its rank's piece; see _sharded_tensor).
SHARDED_TENSOR_NAMES = frozenset({"ShardedTensor", "ShardMetadata", "_remote_device", "ShardedTensorMetadata",
                                  "TensorProperties", "MEM_FORMAT_ENCODING", "ChunkShardingSpec",
                                  "EnumerableShardingSpec"})


def is_dtensor_global(module: str, name: str) -> bool:
    return module.startswith("torch.distributed.") and (name in DTENSOR_NAMES or name in SHARDED_TENSOR_NAMES)


def _is_sharded_tensor_class(obj) -> bool:
    return (isinstance(obj, type) and issubclass(obj, InertObject) and obj.inert_name == "ShardedTensor"
            and obj.inert_module.startswith("torch.distributed."))


class _DTensorType(GlobalRef):
    """The DTensor class as a pickle names it (marks the _rebuild_from_type_v2 call to handle)."""


def _state_dict_of(state) -> dict:
    """An object's pickled state: a dict, or (dict, slots) as copyreg writes it."""
    if isinstance(state, tuple) and len(state) == 2:
        merged = dict(state[0] or {})
        merged.update(state[1] or {})
        return merged
    return state if isinstance(state, dict) else {}


def _placements(spec) -> list[str]:
    """Class names of a recorded DTensorSpec's placements (Shard, Replicate, Partial...)."""
    if not isinstance(spec, InertObject):
        return []
    return [type(p).inert_name if isinstance(p, InertObject) else type(p).__name__ for p in _placement_objs(spec)]


def _placement_objs(spec) -> list:
    placements = _state_dict_of(spec._inert["state"]).get("placements") or () if isinstance(spec, InertObject) else ()
    return list(placements) if isinstance(placements, (tuple, list)) else []


class DTensorShard:
    """One rank's piece of a DTensor sharded over a 1-D device mesh (or of an FSDP1 ShardedTensor),
    as a per-rank torch.save file holds it: the local tensor, the global shape, the sharded
    dimension (None: replicated) and this piece's place along it (its coordinate on the mesh; for a
    ShardedTensor, its rank among all shards' offsets). ``local`` None: this rank holds no piece
    (a ShardedTensor smaller than the world). :mod:`ckptsurgeon.formats.dtensor_ranks` puts the
    pieces of all ranks together."""

    def __init__(self, local: TensorRef, size: tuple, dim: int | None, coordinate: int):
        self.local, self.size, self.dim, self.coordinate = local, size, dim, coordinate


def _shard_of(local: TensorRef, size: tuple, spec) -> DTensorShard:
    placements = _placement_objs(spec)
    names = _placements(spec)
    if len(placements) != 1 or names[0] not in ("Shard", "Replicate"):
        raise UnsupportedError(f"a DTensor placed as {'/'.join(names) or '?'}: only one-dimensional meshes with "
                               "Shard or Replicate are put together here", hint=_DTENSOR_HINT)
    dim = None
    if names[0] == "Shard":
        dim = _state_dict_of(placements[0]._inert["state"]).get("dim")
        if not isinstance(dim, int) or not 0 <= dim < len(size):
            raise CorruptCheckpointError(f"a DTensor Shard placement names dimension {dim!r} of a {list(size)} tensor")
    mesh = _state_dict_of(spec._inert["state"]).get("mesh")
    fields = _state_dict_of(mesh._inert["state"]) if isinstance(mesh, InertObject) else {}
    coord = fields.get("_coordinate_on_dim")
    if not (isinstance(coord, (tuple, list)) and len(coord) == 1 and isinstance(coord[0], int)):
        raise UnsupportedError("a DTensor whose device mesh does not record this rank's coordinate",
                               hint=_DTENSOR_HINT)
    return DTensorShard(local, tuple(size), dim, coord[0])


def _dtensor(args, state, collect: bool = False):
    """A pickled DTensor -> its local tensor, when that is the whole value: the global shape equals
    the local one (one rank, or replicated) and no placement is a pending partial sum. Anything
    else is one rank's piece of a sharded tensor, which this file alone cannot rebuild."""
    fields = _state_dict_of(state)
    local = fields.get("_local_tensor")
    if not isinstance(local, TensorRef):
        raise NotFastPath("DTensor without a plain local tensor")
    size = args[2] if isinstance(args, tuple) and len(args) > 2 else None
    if isinstance(size, CallRef):  # torch.Size(...)
        size = size.args[0] if size.args else None
    kinds = _placements(fields.get("_spec"))
    partial = [k for k in kinds if "Partial" in k]
    if partial:
        raise UnsupportedError(f"a DTensor with a {partial[0]} placement holds one rank's partial sum, not "
                               "the value", hint=_DTENSOR_HINT)
    if collect and isinstance(size, (tuple, list)) and tuple(size) != tuple(local.shape):
        return _shard_of(local, tuple(size), fields.get("_spec"))
    if not isinstance(size, (tuple, list)) or tuple(size) != tuple(local.shape):
        raise UnsupportedError(f"a DTensor sharded across ranks ({'/'.join(kinds) or 'sharded'}): this file "
                               f"holds one rank's piece {list(local.shape)} of a {list(size or ())} tensor",
                               hint=_DTENSOR_HINT)
    if len(args) > 7 and isinstance(args[7], bool):
        local.requires_grad = args[7]
    return local


_DTENSOR_HINT = ("save a full state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict with "
                 "StateDictOptions(full_state_dict=True, cpu_offload=True)), or save with "
                 "torch.distributed.checkpoint and pass that folder")


def _sharded_tensor(args, state, collect: bool = False):
    """A pickled ShardedTensor (torch.distributed._shard; FSDP1's SHARDED_STATE_DICT) -> its one
    local shard when that is the whole tensor; with ``collect``, a :class:`DTensorShard` (the
    sharded dimension and this shard's place among all shards' offsets, both read from the
    metadata every rank's file holds); else one rank's piece, which this file alone cannot rebuild."""
    size = args[2] if isinstance(args, tuple) and len(args) > 2 else None
    if isinstance(size, CallRef):  # torch.Size(...)
        size = size.args[0] if size.args else None
    shards = state[0] if isinstance(state, tuple) and state else None
    meta = state[1] if isinstance(state, tuple) and len(state) > 1 else None
    if not isinstance(size, (tuple, list)) or not isinstance(shards, list) or not isinstance(meta, InertObject):
        raise NotFastPath("a ShardedTensor of an unknown layout")
    size = tuple(size)
    if len(shards) > 1 or not all(isinstance(x, InertObject) for x in shards):
        raise UnsupportedError(f"a ShardedTensor with {len(shards)} local shards on one rank: only one shard per "
                               "rank is put together here", hint=_DTENSOR_HINT)
    if not all(isinstance(n, int) and n >= 0 for n in size):
        raise CorruptCheckpointError(f"a ShardedTensor of shape {size!r}")

    def offsets_of(m) -> tuple:
        got = _state_dict_of(m._inert["state"]).get("shard_offsets")
        if not (isinstance(got, (list, tuple)) and len(got) == len(size)
                and all(isinstance(n, int) and 0 <= n <= s for n, s in zip(got, size))):
            raise CorruptCheckpointError(f"a ShardedTensor shard at offsets {got!r} of a {list(size)} tensor")
        return tuple(got)

    listed = _state_dict_of(meta._inert["state"]).get("shards_metadata")
    everyone = [offsets_of(m) for m in listed if isinstance(m, InertObject)] if isinstance(listed, list) else []
    dims = {i for o in everyone for i, v in enumerate(o) if v}
    local = mine = None
    if shards:
        fields = _state_dict_of(shards[0]._inert["state"])
        local, own = fields.get("tensor"), fields.get("metadata")
        if not isinstance(local, TensorRef) or not isinstance(own, InertObject):
            raise NotFastPath("a ShardedTensor shard without a plain tensor")
        mine = offsets_of(own)
        if not collect and tuple(local.shape) == size and len(everyone) <= 1:
            return local  # one rank's file that holds the whole tensor (a world of one)
    if not collect or len(dims) > 1 or (mine is not None and mine not in everyone):
        piece = f"one rank's piece {list(local.shape)}" if local is not None else "no piece"
        raise UnsupportedError(f"a ShardedTensor (FSDP1 SHARDED_STATE_DICT) sharded across ranks: this file holds "
                               f"{piece} of a {list(size)} tensor",
                               hint="pass the folder of every rank's file, or " + _DTENSOR_HINT)
    dim = min(dims) if dims else 0
    if local is None:  # a rank left without rows (a parameter smaller than the world): nothing to add
        return DTensorShard(None, size, dim, None)
    return DTensorShard(local, size, dim, sorted(everyone, key=lambda o: o[dim]).index(mine))


def _rebuild_from_type(func, new_type, args, state, collect: bool = False):
    if isinstance(new_type, _DTensorType):
        return _dtensor(args, state, collect)
    if _is_sharded_tensor_class(new_type):
        return _sharded_tensor(args, state, collect)
    if new_type == _PLAIN_TENSOR and callable(func) and isinstance(args, tuple):
        # a plain tensor with Python attributes (torch pickles its __dict__ this way): the tensor,
        # the attributes kept to be written back -- and set by to_torch, as torch.load does
        t = func(*args)
        if not isinstance(t, TensorRef) or t.param is not None or not isinstance(state, (dict, tuple)):
            raise NotFastPath("torch._tensor._rebuild_from_type_v2 of an unusual tensor")
        t.attrs = state if state else None
        return t
    raise NotFastPath("torch._tensor._rebuild_from_type_v2")  # a tensor subclass


_BUILDERS: dict[tuple[str, str], Callable] = {
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_v1,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_param,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_param_state,
}


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, file, storage_source: Callable[[str, str, int], Any], inert: frozenset = frozenset()):
        super().__init__(file)
        self._source = storage_source
        self._storages: dict[str, StorageRef] = {}
        self.numpy_seen = False
        self._inert = inert
        self.inert_seen: set[str] = set()
        self.legacy = False
        self.collect_shards = False  # DTensor shards become DTensorShard records instead of an error

    def find_class(self, module, name):
        key = as_written = (module, name)
        if key in _compat_pickle.NAME_MAPPING:  # protocol-2 pickles name Python 2's builtins
            key = module, name = _compat_pickle.NAME_MAPPING[key]
        elif module in _compat_pickle.IMPORT_MAPPING:
            key = module, name = _compat_pickle.IMPORT_MAPPING[module], name
        if key in _REAL:
            return _REAL[key]
        if key in _BUILDERS:
            if self.collect_shards and key == ("torch._tensor", "_rebuild_from_type_v2"):
                return functools.partial(_rebuild_from_type, collect=True)
            return _BUILDERS[key]
        if key in _KEPT:
            return GlobalRef(module, name)
        if module == "torch.cuda" and name in dtypes.STORAGE_TO_DTYPE:  # old GPU saves name the CUDA class;
            return GlobalRef("torch", name)  # the bytes are the same, and outputs are CPU files
        if is_dtensor_global(module, name):
            return _DTensorType(module, name) if name == "DTensor" else inert_class(*as_written)
        data = _data_global(module, name)
        if data is not None:
            self.numpy_seen |= module.startswith("numpy")
            return data
        if f"{module}.{name}" in OTHER_OS_PATHS:
            return inert_class(*as_written)
        if key == ("builtins", "getattr"):  # a nested class of an inert class: never a lookup
            return self._nested_class_or_call(as_written, record=f"{module}.{name}" in self._inert)
        if f"{module}.{name}" in self._inert:  # --inert-pickle: record it (as written), import nothing
            self.inert_seen.add(f"{module}.{name}")
            return inert_class(*as_written)
        raise NotFastPath(f"{module}.{name}")

    def _nested_class_or_call(self, as_written, record: bool):
        """``getattr`` as a protocol-2 pickle uses it for a nested class (``Outer.Inner`` is written
        ``getattr(Outer, 'Inner')``, then NEWOBJ of it, which wants a type): on an inert class, the
        inert class of the nested name -- nothing looked up, nothing imported (so also outside
        --inert-pickle, for the classes read inert by default: ``ShardedTensor.ProcessGroupState``).
        Any other use is recorded as the call it is with ``record`` (--inert-pickle), else refused."""
        def getattr_(owner, attr):
            if isinstance(owner, type) and issubclass(owner, InertObject) and isinstance(attr, str) \
                    and attr.isidentifier():
                if record:
                    self.inert_seen.add(f"{owner.inert_module}.{owner.inert_name}.{attr}")
                return inert_class(owner.inert_module, f"{owner.inert_name}.{attr}")
            if not record:
                raise NotFastPath("builtins.getattr")
            self.inert_seen.add("builtins.getattr")
            return inert_class(*as_written)(owner, attr)
        return getattr_

    def persistent_load(self, pid):
        if self.legacy and isinstance(pid, tuple) and len(pid) == 6:
            # legacy format: ('storage', type, key, location, numel, view_metadata)
            if pid[5] is not None:
                raise NotFastPath("legacy storage view")
            pid = pid[:5]
        elif self.legacy and isinstance(pid, tuple) and len(pid) == 4 and pid[0] in ("module", b"module"):
            return pid[1]  # a pickled module's class, with its source for torch to compare: the class
        if not isinstance(pid, tuple) or len(pid) != 5:
            raise NotFastPath("unusual persistent id")
        typename, stype, key, location, numel = pid
        if isinstance(typename, bytes):
            typename = typename.decode("ascii", "replace")
        if typename != "storage" or not isinstance(stype, GlobalRef) or not isinstance(key, str):
            raise NotFastPath("unusual persistent id")
        if not isinstance(numel, int) or numel < 0:
            raise CorruptCheckpointError(f"storage {key!r} has an invalid size {numel!r}")
        if stype.name == "UntypedStorage":
            dtype = "uint8"
        else:
            dtype = dtypes.STORAGE_TO_DTYPE.get(stype.name)
            if dtype is None:
                raise NotFastPath(f"storage type {stype.qualname}")
        ref = self._storages.get(key)
        if ref is None:
            nbytes = numel * dtypes.itemsize(dtype)
            ref = StorageRef(dtype, numel, self._source(key, dtype, nbytes), storage_type=stype,
                             location=str(location), key=key)
            self._storages[key] = ref
        return ref


class _Everything:
    def __contains__(self, name):
        return True


#: ``inert=INERT_ALL``: every global outside the allowlists is recorded inert (pass ``seen`` to learn which)
INERT_ALL = _Everything()


class InertPrefix(_Everything):
    """``inert=InertPrefix("deepspeed.")``: the globals of one library recorded inert, no others."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __contains__(self, name):
        return isinstance(name, str) and name.startswith(self.prefix)


# Each opcode's argument, for walking a pickle without building anything (pickletools' table,
# protocols 0-5): a fixed number of bytes, a length prefix of 1/4/8 bytes, or newline-ended lines.
_ARG: list = [None] * 256
for _n, _codes in ((0, b"\x97\x98N\x88\x89]ael)t\x85\x86\x87}dsu\x8f\x90\x9102(1\x94\x93Rbo\x81\x92.Q"),
                   (1, b"Khq\x82\x80"), (2, b"M\x83"), (4, b"Jjr\x84"), (8, b"G\x95")):
    for _c in _codes:
        _ARG[_c] = (0, _n)
for _n, _codes in ((1, b"\x8aUC\x8c"), (4, b"\x8bTBX"), (8, b"\x8e\x96\x8d")):
    for _c in _codes:
        _ARG[_c] = (1, _n)
for _c in b"ILSVFgpP":
    _ARG[_c] = (2, 1)
for _c in b"ci":
    _ARG[_c] = (2, 2)
_SIGNED_LENGTH = b"\x8bT"  # LONG4, BINSTRING: a negative length is an error


def check_memo(data, start: int = 0, limit: int | None = None) -> int:
    """Walk the opcodes of the pickle at ``data[start:]`` (bytes or an mmap) up to its STOP,
    building nothing, and return where it ends; CorruptCheckpointError when a memo index
    (LONG_BINPUT, PUT) is beyond ``limit`` (default: the data's length, which no real pickle's
    memo reaches: one entry per object) or the stream breaks off. CPython's C unpickler sizes its
    memo table by the largest index it is given: a 1 KB file asking for index 2^31 made it
    allocate and zero 32 GB (gh-115952, fixed in CPython only in 2025). ~0.35 us per opcode."""
    n = len(data)
    limit = n if limit is None else limit
    arg, frb, i = _ARG, int.from_bytes, start
    try:
        while True:
            op = data[i]
            kind = arg[op]
            if kind is None:
                raise CorruptCheckpointError(f"not a pickle: unknown opcode {op:#04x} at byte {i}")
            how, m = kind
            if op == 0x72:  # LONG_BINPUT
                if frb(data[i + 1:i + 5], "little") > limit:
                    raise CorruptCheckpointError(f"pickle memo index {frb(data[i + 1:i + 5], 'little'):,} at byte {i} "
                                                 "is beyond anything the pickle could hold (a damaged or hostile file)")
                i += 5
            elif how == 0:
                if op == 0x2E:  # STOP
                    return i + 1
                i += 1 + m
            elif how == 1:
                length = frb(data[i + 1:i + 1 + m], "little", signed=op in _SIGNED_LENGTH)
                if length < 0:
                    raise CorruptCheckpointError(f"pickle: negative length at byte {i}")
                i += 1 + m + length
            else:
                j = i + 1
                for _ in range(m):
                    j = data.find(b"\n", j) + 1
                    if not j:
                        raise IndexError
                if op == 0x70 and int(data[i + 1:j - 1] or b"0") > limit:  # PUT
                    raise CorruptCheckpointError(f"pickle memo index at byte {i} is beyond anything the pickle "
                                                 "could hold (a damaged or hostile file)")
                i = j
            if i > n:
                raise IndexError
    except (IndexError, ValueError):  # an argument or line past the end, a PUT that is no number
        raise CorruptCheckpointError("the pickle breaks off before its end (truncated or damaged)") from None


def load_refs(data: bytes, storage_source: Callable[[str, str, int], Any], *, inert=frozenset(),
              seen: set | None = None, dtensor_shards: bool = False) -> Any:
    """Unpickle ``data`` into a graph of stand-ins. Raises NotFastPath or CorruptCheckpointError.

    ``inert``: names of globals (outside every allowlist) to record as :class:`InertObject`
    stand-ins instead of refusing them, or INERT_ALL; nothing of theirs is imported or run.
    ``seen`` receives the names recorded inert. ``dtensor_shards``: a DTensor holding one
    rank's piece becomes a :class:`DTensorShard` (else: an error)."""
    check_memo(data)
    unpickler = _RefUnpickler(io.BytesIO(data), storage_source,
                              inert if isinstance(inert, _Everything) else frozenset(inert))
    unpickler.collect_shards = dtensor_shards
    return _load_with(unpickler, inert, seen)


def load_refs_naming(data: bytes, storage_source: Callable[[str, str, int], Any], names) -> Any:
    """Like :func:`load_refs`, with the globals ``names`` (outside every allowlist) recorded as
    names when the pickle only names them -- a class as a dict key, as Lightning < 1.5 keyed its
    callbacks' states (``{ModelCheckpoint: {...}}``, in the original Stable Diffusion
    checkpoints). Nothing is imported or run either way; NotFastPath when one of them is built
    or called (an object of that class, or a function's result: what ``--inert-pickle`` is for)."""
    names = frozenset(names)
    check_memo(data)
    graph = _load_with(_RefUnpickler(io.BytesIO(data), storage_source, names))
    refuse_built(graph, names)
    return graph


def refuse_built(root: Any, names) -> None:
    """NotFastPath if the graph holds an object that one of the inert globals ``names`` built
    (an instance of such a class, the result of such a function), or a numpy array of objects
    (as without ``names``); classes merely named pass."""
    if "numpy" in sys.modules:
        _refuse_numpy_objects(root)
    for o in _objects(root):
        if isinstance(o, InertObject):
            name = f"{o.inert_module}.{o.inert_name}"
            if name in names or any(name.startswith(f"{n}.") for n in names):  # (or a nested name of one)
                raise NotFastPath(f"{name} (built, not only named)")


_HOOK_LOCK = threading.Lock()
_HOOK_DEPTH = 0
_HOOK_PREVIOUS = None


def _quiet_excepthook(kind, value, tb):
    if kind is SystemError and str(value) == "deallocated bytearray object has exported buffers":
        return
    (_HOOK_PREVIOUS or sys.__excepthook__)(kind, value, tb)


@contextlib.contextmanager
def _no_stray_bytearray_error():
    """A damaged BYTEARRAY8 length (terabytes) makes CPython < 3.12 fail the allocation and then
    free a half-built bytearray whose export count was never set: it prints a SystemError through
    sys.excepthook beside the MemoryError we report (two lines on stderr where one belongs). That
    one message is dropped while a pickle loads; any other goes to the hook that was there."""
    global _HOOK_DEPTH, _HOOK_PREVIOUS
    with _HOOK_LOCK:
        if _HOOK_DEPTH == 0:
            _HOOK_PREVIOUS, sys.excepthook = sys.excepthook, _quiet_excepthook
        _HOOK_DEPTH += 1
    try:
        yield
    finally:
        with _HOOK_LOCK:
            _HOOK_DEPTH -= 1
            if _HOOK_DEPTH == 0:
                if sys.excepthook is _quiet_excepthook:
                    sys.excepthook = _HOOK_PREVIOUS
                _HOOK_PREVIOUS = None


def _load_with(unpickler: _RefUnpickler, inert=frozenset(), seen: set | None = None) -> Any:
    try:
        with _no_stray_bytearray_error():
            obj = unpickler.load()
        if seen is not None:
            seen |= unpickler.inert_seen
        if unpickler.numpy_seen and not inert:
            _refuse_numpy_objects(obj)
        return obj
    except (NotFastPath, CorruptCheckpointError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, OverflowError) as e:
        raise CorruptCheckpointError(f"the pickle is malformed ({type(e).__name__}: {e})") from None
    except (RecursionError, MemoryError) as e:
        raise CorruptCheckpointError(f"the pickle is too deeply nested or too large ({type(e).__name__})") from None


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise NotFastPath(f"{module}.{name}")


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def load_legacy_refs(path: str, *, inert=frozenset()) -> tuple[Any, list[StorageRef]]:
    """A legacy (non-zip, torch < 1.6) torch file read lazily and without torch: its pickles
    (magic number, protocol, system info, the object, the storage keys) then each storage as an
    int64 element count and its raw bytes, in key order. Each StorageRef gets a FileRange over
    its bytes (the format has no checksums). NotFastPath for anything unusual (big-endian, views)."""
    from .refs import FileRange

    import mmap

    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else contextlib.nullcontext(b"") as mm:
        def checked(f):  # each pickle's memo checked before the C unpickler sizes its table by it
            check_memo(mm, f.tell(), size)
            return f

        if _plain_load(checked(f)) != _LEGACY_MAGIC or _plain_load(checked(f)) != _LEGACY_PROTOCOL:
            raise NotFastPath("not a legacy torch file")
        info = _plain_load(checked(f))
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise NotFastPath("legacy file written on a big-endian machine")
        unpickler = _RefUnpickler(_Bounded(checked(f), size), lambda key, dtype, nbytes: None,
                                  inert if isinstance(inert, _Everything) else frozenset(inert))
        unpickler.legacy = True
        obj = _load_with(unpickler, inert)
        keys = _plain_load(_Bounded(checked(f), size))
        offset = f.tell()
    storages = unpickler._storages
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise CorruptCheckpointError(f"{path}: the storage list does not match the storages the pickle uses")
    ordered = []
    with open(path, "rb") as f:
        for key in keys:
            ref = storages[key]
            head = os.pread(f.fileno(), 8, offset)
            if len(head) != 8:
                raise CorruptCheckpointError(f"{path}: storage {key} is truncated (the file ended early)")
            numel = int.from_bytes(head, "little", signed=True)
            if numel != ref.numel:
                raise CorruptCheckpointError(f"{path}: storage {key} holds {numel} elements, the pickle expects {ref.numel}")
            if offset + 8 + ref.nbytes > size:
                raise CorruptCheckpointError(f"{path}: storage {key} is truncated (the file ended early)")
            ref.source = FileRange(path, offset + 8, ref.nbytes, label=f"storage {key}")
            ordered.append(ref)
            offset += 8 + ref.nbytes
    return obj, ordered


class _Bounded:
    """A file as the unpickler reads it, never asked for more than the file holds: a damaged
    length (BINBYTES8, BYTEARRAY8) of terabytes otherwise made the buffered reader try to allocate
    it (a MemoryError, or gigabytes of address space); now the pickle just ends early. Small reads
    (every opcode's argument) go straight through."""

    _SMALL = 1 << 20

    def __init__(self, f, size: int):
        self._f, self._size = f, size
        self.readline = f.readline  # a line ends at a newline or the end of the file
        self.peek = f.peek  # the unpickler prefetches through it: one read per buffer, not per opcode

    def _left(self, n) -> int:
        left = max(0, self._size - self._f.tell())
        return left if n is None or n < 0 else min(n, left)

    def read(self, n=-1) -> bytes:
        return self._f.read(n if 0 <= n <= self._SMALL else self._left(n))

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        return self._f.readinto(view if len(view) <= self._SMALL else view[:self._left(len(view))])


def _plain_load(f) -> Any:
    """One small pickle of a legacy file (numbers, a dict, a list): no globals allowed."""
    try:
        with _no_stray_bytearray_error():
            return _NoGlobals(f).load()
    except NotFastPath:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError, RecursionError, MemoryError) as e:
        raise CorruptCheckpointError(f"a legacy header pickle is malformed ({type(e).__name__}: {e})") from None


_V2 = GlobalRef("torch._utils", "_rebuild_tensor_v2")
_V3 = GlobalRef("torch._utils", "_rebuild_tensor_v3")
_PARAM = GlobalRef("torch._utils", "_rebuild_parameter")
_PARAM_STATE = GlobalRef("torch._utils", "_rebuild_parameter_with_state")
_FROM_TYPE = GlobalRef("torch._tensor", "_rebuild_from_type_v2")
_UNTYPED = GlobalRef("torch.storage", "UntypedStorage")
_GETATTR = GlobalRef("__builtin__", "getattr")  # as Python's protocol-2 pickler names it
_TYPED = {name: GlobalRef("torch", name) for name in dtypes.STORAGE_TO_DTYPE}
_REFS_MODULE = GlobalRef.__module__


class _RefPickler(pickle.Pickler):
    """The C pickler, protocol 2, writing stand-ins back as the globals torch writes.

    A pickler can only emit a GLOBAL for an object it can find again by importing
    ``obj.__module__`` and looking the name up. So each :class:`GlobalRef` met is registered
    in its own module under a unique, random name for the duration of the dump, and those
    GLOBAL lines are rewritten to the real ``module\\nname`` afterwards -- in protocol 2 a GLOBAL
    is newline-terminated text, so the rewrite shifts no length field or memo index. (The
    pure-Python pickler could emit raw opcodes, but took ~30 ms for a 300-tensor state dict,
    10x the C pickler.)
    """

    def __init__(self, file, remap: dict | None = None, like: "_RefPickler | None" = None):
        super().__init__(file, protocol=2)
        self.storages: list[StorageRef] = []
        self._keys: dict[int, str] = {}
        # real tensors met in the graph, wrapped once: a second pass (``like``) reuses the wraps
        self._torch_storages: dict = like._torch_storages if like else {}
        self._torch_refs: dict = like._torch_refs if like else {}
        self.token = os.urandom(8).hex()
        self.names: dict[bytes, GlobalRef] = {}
        self.remap = remap or {}  # id(TensorRef) -> the same view on a compacted storage
        # what compacting needs: per storage the views written of it, and the storages pickled
        # other than as the storage of the tensor being reduced (they are written whole)
        self.views: dict[int, tuple[StorageRef, list[TensorRef]]] = {}
        self.whole: set[int] = set()
        self._expect = None

    def persistent_id(self, obj):
        if type(obj) is not StorageRef:
            return None
        if obj is self._expect:
            self._expect = None
        else:
            self.whole.add(id(obj))
        key = self._keys.get(id(obj))
        if key is None:
            key = str(len(self.storages))
            self._keys[id(obj)] = key
            self.storages.append(obj)
        legacy = dtypes.DTYPE_TO_STORAGE.get(obj.dtype)
        # bytes read from an UntypedStorage stay one (torch writes those for float8, uint16...)
        if legacy is not None and obj.storage_type.name != "UntypedStorage":
            return ("storage", _TYPED[legacy], key, "cpu", obj.numel)
        return ("storage", _UNTYPED, key, "cpu", obj.nbytes)

    def reducer_override(self, obj):
        t = type(obj)
        if t is TensorRef:
            return self._tensor_reduce(obj)
        if t is OrderedDict and not obj and not obj.__dict__:
            # the empty hooks dict every tensor carries: the same bytes pickle's own reduce gives,
            # without its copyreg._slotnames lookup (uncacheable on a builtin type; 9 us each)
            return OrderedDict, ()
        if t is GlobalRef:
            name = f"_G{self.token}_{len(self.names)}"
            setattr(sys.modules[_REFS_MODULE], name, obj)
            self.names[name.encode()] = obj
            return name  # pickled as GLOBAL <_REFS_MODULE> <name>, rewritten in dump_refs
        if t is CallRef or t is InertCall:
            return (obj.func, tuple(obj.args)) if obj.state is None else (obj.func, tuple(obj.args), obj.state)
        if isinstance(obj, InertObject):
            return _inert_reduce(obj)
        if isinstance(obj, type) and issubclass(obj, InertObject) and "." in obj.inert_name:
            # a nested class: written as protocol-2 pickles write one, getattr(Outer, 'Inner')
            outer, _, inner = obj.inert_name.rpartition(".")
            return _GETATTR, (inert_class(obj.inert_module, outer), inner)
        if isinstance(obj, type) and issubclass(obj, InertObject):  # the class itself: its global
            name = f"_G{self.token}_{len(self.names)}"
            setattr(sys.modules[_REFS_MODULE], name, obj)
            self.names[name.encode()] = GlobalRef(obj.inert_module, obj.inert_name)
            return name
        if t.__module__.startswith("torch"):
            import torch

            if isinstance(obj, torch.Tensor):
                # a real tensor inside a stand-in graph (computed by a surgery): same wire form
                ref = self._torch_refs.get(id(obj))
                if ref is None:
                    ref = self._torch_refs[id(obj)] = TensorRef.from_torch(obj, self._torch_storages)
                return self._tensor_reduce(ref)
        return NotImplemented

    def _tensor_reduce(self, obj: TensorRef):
        obj = self.remap.get(id(obj), obj)
        self.views.setdefault(id(obj.storage), (obj.storage, []))[1].append(obj)
        self._expect = obj.storage
        hooks = obj.hooks if obj.hooks is not None else OrderedDict()
        legacy = dtypes.DTYPE_TO_STORAGE.get(obj.storage.dtype)
        if legacy is not None and obj.storage.dtype == obj.dtype:
            args = (obj.storage, obj.offset, obj.shape, obj.stride, obj.requires_grad, hooks)
            func = _V2
        else:
            # new dtypes (and dtype-reinterpreting views) use an untyped storage plus a dtype
            if obj.storage.dtype != "uint8" and legacy is not None:
                raise NotFastPath("tensor viewing a typed storage as another dtype")
            args = (obj.storage, obj.offset, obj.shape, obj.stride, obj.requires_grad, hooks,
                    GlobalRef("torch", obj.dtype))
            func = _V3
        if obj.metadata is not None:
            args = args + (obj.metadata,)
        if obj.param is None and obj.attrs is not None:
            return _FROM_TYPE, (func, _PLAIN_TENSOR, args, obj.attrs)
        if obj.param is None:
            return func, args
        rg, phooks, state = obj.param
        phooks = phooks if phooks is not None else OrderedDict()
        if state is None:
            return _PARAM, (CallRef(func, args), rg, phooks)
        return _PARAM_STATE, (CallRef(func, args), rg, phooks, state)


def _inert_reduce(obj: InertObject):
    """The reduce tuple that re-emits an inert object's opcodes: NEWOBJ or a call, then its
    appended and set items, then BUILD, as pickle's own save_reduce orders them."""
    import copyreg

    rec = obj._inert
    if rec["kwargs"]:
        raise UnsupportedError(f"{obj.inert_module}.{obj.inert_name} was built with keyword arguments "
                               "(pickle protocol 4), which torch's protocol-2 pickle cannot carry")
    items = iter(rec["items"]) if rec["items"] else None
    dictitems = iter(rec["dictitems"]) if rec["dictitems"] else None
    if rec["newobj"]:
        return copyreg.__newobj__, (type(obj),) + tuple(rec["args"]), rec["state"], items, dictitems
    return type(obj), tuple(rec["args"]), rec["state"], items, dictitems


def dump_refs(obj: Any, *, compact: bool = True, report: dict | None = None) -> tuple[bytes, list[StorageRef]]:
    """Pickle a stand-in graph; returns the bytes and the storages in key order.

    ``compact``: a storage whose tensors being written leave a large part of it unused (a
    DeepSpeed or Megatron state dict's parameters are views of one flat buffer; ``extract``
    keeps some of them) is written as only the parts still used, the views moved to match
    (:func:`layout.compact_storages`); torch.save would write the whole buffer with every subset.
    The graph is pickled once more then (the pickle is small). ``report`` (a dict) gets
    ``compacted``: how many storages and bytes were left out."""
    pickler, data = _dump(obj, None)
    if compact:
        remap, saved = compact_storages(pickler.views, pickler.whole)
        if remap:
            pickler, data = _dump(obj, remap, like=pickler)
            if report is not None:
                report["compacted"] = saved
    return data, pickler.storages


def _dump(obj: Any, remap: dict | None, like: "_RefPickler | None" = None) -> tuple["_RefPickler", bytes]:
    buf = io.BytesIO()
    p = _RefPickler(buf, remap=remap, like=like)
    try:
        p.dump(obj)
    except RecursionError:
        # not UnsupportedError: that sends the writer to torch.save, which recurses the same way
        raise OutputError("the checkpoint's non-tensor content is nested too deeply to pickle again "
                          "(torch.save could not write it either)",
                          hint="write safetensors (.safetensors): the state dict's tensors only") from None
    finally:
        module = sys.modules[_REFS_MODULE]
        for name in p.names:
            delattr(module, name.decode())
    placeholder = re.compile(b"c" + re.escape(_REFS_MODULE.encode()) + b"\n(_G" + p.token.encode() + b"_[0-9]+)\n")

    def real(m):
        g = p.names[m.group(1)]
        return b"c" + g.module.encode("utf-8") + b"\n" + g.name.encode("utf-8") + b"\n"

    data, n = placeholder.subn(real, buf.getvalue())
    if n != len(p.names):  # every registered global is written exactly once (then memoized)
        raise RuntimeError(f"pickle rewrite found {n} of {len(p.names)} globals")
    return p, data


# --------------------------------------------------------------------------- static scan
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}


def _py3_name(module: str, name: str) -> str:
    """The global an unpickler really imports (protocol < 3 pickles use Python 2 names)."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


_DTYPE = object()  # scan marker: the value on the stack is the numpy.dtype global


def _numpy_dtype_class(code) -> str | None:
    """numpy.dtype('f8') is rebuilt as numpy.dtypes.Float64DType, a class torch's weights-only
    loader also wants allowed although no GLOBAL names it: name it, without running the pickle
    (numpy parses the type code string; nothing else). None without numpy or for odd codes."""
    if not isinstance(code, str) or len(code) > 16:
        return None
    try:
        import numpy

        cls = type(numpy.dtype(code))
    except Exception:
        return None
    if cls is numpy.dtype:  # numpy < 1.25: no per-type classes
        return None
    return f"{cls.__module__}.{cls.__name__}"


def scan_globals(data: bytes) -> list[str]:
    """Every ``module.name`` the pickle would import, in order, without executing it.

    Python 2 names in old-protocol pickles (``__builtin__.eval``) are reported as the Python 3
    global they resolve to (``builtins.eval``). Raises CorruptCheckpointError when the opcode
    stream cannot be parsed.
    """
    import pickletools  # only scans need it (~2 ms of import on every surgery otherwise)

    found: list[str] = []
    memo: dict[int, Any] = {}
    recent: list[Any] = []
    dtype_next = False
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if dtype_next and name in _STRING_OPS | {"BINGET", "LONG_BINGET", "GET"}:
                dtype_next = False
                code = arg if name in _STRING_OPS else memo.get(int(arg))
                cls = _numpy_dtype_class(code)
                if cls and cls not in found:
                    found.append(cls)
            if name in _STRING_OPS:
                recent.append(arg if isinstance(arg, str) else str(arg))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                if recent:
                    memo[int(arg)] = recent[-1]
            elif name == "MEMOIZE":
                if recent:
                    memo[len(memo)] = recent[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(arg)))
                dtype_next = recent[-1] is _DTYPE
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append(_py3_name(module, attr))
                dtype_next = found[-1] == "numpy.dtype"
                recent.append(_DTYPE if dtype_next else None)
            elif name == "STACK_GLOBAL":
                if len(recent) >= 2 and isinstance(recent[-1], str) and isinstance(recent[-2], str):
                    found.append(_py3_name(recent[-2], recent[-1]))
                    dtype_next = found[-1] == "numpy.dtype"
                    if dtype_next:
                        recent.append(_DTYPE)
                        continue
                else:
                    found.append("<unresolved STACK_GLOBAL>")
                recent.append(None)
            elif name == "STOP":
                break
            else:
                recent.append(None)
            if len(recent) > 64:
                del recent[:-8]
    except Exception as e:  # genops raises ValueError and friends on garbage
        raise CorruptCheckpointError(f"the pickle cannot be parsed ({e})") from None
    return found
