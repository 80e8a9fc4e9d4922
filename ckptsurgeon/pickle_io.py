"""Read and write torch's ``data.pkl`` without importing torch and without executing anything.

``load_refs`` unpickles with an allowlist that is a subset of what our ``torch.load`` call
allows (torch's weights-only allowlist plus ``safety``'s plain data types): torch globals become
inert :class:`~ckptsurgeon.inert.GlobalRef` stand-ins, tensor rebuild calls become
:class:`~ckptsurgeon.refs.TensorRef`, and persistent ids become
:class:`~ckptsurgeon.refs.StorageRef`. Anything outside the subset raises :class:`NotFastPath`,
and the caller hands the file to ``torch.load(weights_only=True)``, which has the final say --
unless the user asked for ``--inert-pickle``: then globals outside every allowlist become
:class:`~ckptsurgeon.inert.InertObject` records, never imported or called.

:mod:`ckptsurgeon.pickle_write` pickles such a graph back (``dump_refs``); :mod:`ckptsurgeon.pickle_scan`
lists every global a pickle would import, by reading opcodes only (``scan_globals``);
:mod:`ckptsurgeon.pickle_guard` checks a pickle before the C unpickler reads it;
:mod:`ckptsurgeon.pickle_legacy` reads legacy (non-zip) torch files with this unpickler.
"""

from __future__ import annotations

import _compat_pickle
import functools
import io
import os
import pickle
import sys
from collections import Counter, OrderedDict
from typing import Any, Callable

from . import dtypes
from .errors import CorruptCheckpointError, NotFastPath
from .pickle_dist import DTensorType, dtensor, is_dtensor_global, is_sharded_tensor_class, sharded_tensor
from .pickle_guard import check_memo, no_stray_bytearray_error
from .inert import CallRef, GlobalRef, InertCall, InertObject, inert_class
from .refs import StorageRef, TensorRef


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


def _rebuild_from_type(func, new_type, args, state, collect: bool = False):
    if isinstance(new_type, DTensorType):
        return dtensor(args, state, collect)
    if is_sharded_tensor_class(new_type):
        return sharded_tensor(args, state, collect)
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
            return DTensorType(module, name) if name == "DTensor" else inert_class(*as_written)
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


def _load_with(unpickler: _RefUnpickler, inert=frozenset(), seen: set | None = None) -> Any:
    try:
        with no_stray_bytearray_error():
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
