"""Legacy (non-zip, torch < 1.6) torch files read lazily and without torch: the header pickles,
the object (through :mod:`ckptsurgeon.pickle_io`'s unpickler) and each storage's byte range."""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
from typing import Any

from .byteranges import FileRange
from .errors import CorruptCheckpointError, NotFastPath
from .pickle_guard import check_memo, no_stray_bytearray_error
from .pickle_io import _Everything, _load_with, _RefUnpickler
from .refs import StorageRef


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
        with no_stray_bytearray_error():
            return _NoGlobals(f).load()
    except NotFastPath:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError, RecursionError, MemoryError) as e:
        raise CorruptCheckpointError(f"a legacy header pickle is malformed ({type(e).__name__}: {e})") from None
