"""Read and write torch's ``data.pkl`` without importing torch and without executing anything.

``load_refs`` unpickles with an allowlist that is a subset of what our ``torch.load`` call
allows (torch's weights-only allowlist plus ``safety``'s plain data types): torch globals become
inert :class:`~ckptsurgeon.refs.GlobalRef` stand-ins, tensor rebuild calls become
:class:`~ckptsurgeon.refs.TensorRef`, and persistent ids become
:class:`~ckptsurgeon.refs.StorageRef`. Anything outside the subset raises :class:`NotFastPath`,
and the caller hands the file to ``torch.load(weights_only=True)``, which has the final say --
unless the user asked for ``--inert-pickle``: then globals outside every allowlist become
:class:`~ckptsurgeon.refs.InertObject` records, never imported or called.

:mod:`ckptsurgeon.pickle_write` pickles such a graph back (``dump_refs``); :mod:`ckptsurgeon.pickle_scan`
lists every global a pickle would import, by reading opcodes only (``scan_globals``).
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import functools
import io
import os
import pickle
import sys
import threading
from collections import Counter, OrderedDict
from typing import Any, Callable

from . import dtypes
from .errors import CorruptCheckpointError, NotFastPath
from .pickle_dist import DTensorType, dtensor, is_dtensor_global, is_sharded_tensor_class, sharded_tensor
from .refs import CallRef, GlobalRef, InertCall, InertObject, StorageRef, TensorRef, inert_class


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
    from .byteranges import FileRange

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
