"""Where a tensor's bytes are, and reading them: a range of a file (``FileRange``, its zip
CRC-32 checked on first read), bytes in memory (``MemoryBytes``), bytes made of pieces of other
sources (``AssembledBytes``); positional reads in chunks of one reused buffer; CRC-32 (ISA-L where
installed). No torch.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from .errors import CorruptCheckpointError, InputNotFoundError

try:  # ISA-L's CRC-32 (same polynomial as zlib/zip) runs ~3x faster than zlib's here
    from isal.isal_zlib import crc32 as _crc32
    from isal.isal_zlib import crc32_combine as _crc32_combine
except ImportError:  # pragma: no cover - platforms without an isal wheel
    from zlib import crc32 as _crc32

    _crc32_combine = None

CHUNK = 1 << 20  # pread chunk, one reused buffer. 128 KiB was tried: faster for a lone read of an
# idle file here, but slower for diff (1.1-1.25 s vs 0.95 s, 2x2 GiB) and for the CRC read-back
# running beside a copy (3-4.8 s vs 1.1 s): the machine's cache behaviour, not a rule


def crc32(data, value: int = 0) -> int:
    """zip's CRC-32 of ``data`` continuing from ``value`` (unsigned)."""
    return _crc32(data, value) & 0xFFFFFFFF


def _combine(crc_a: int, crc_b: int, length_b: int) -> int:
    return _crc32_combine(crc_a, crc_b, length_b) & 0xFFFFFFFF


#: CRC-32 of A+B from CRC(A), CRC(B) and len(B) (None without ISA-L: zlib's is not exposed)
crc32_combine = _combine if _crc32_combine is not None else None


SMALL_READ = 64 << 10  # ranges up to this size are read through the file's mapping (MAPS), not pread


def pread_chunks(fd: int, offset: int, length: int, size: int = CHUNK, what: str = "data"):
    """Yield bytes [offset, offset+length) of ``fd`` as views of ONE reused buffer.

    A caller must consume each chunk before asking for the next one. Reusing the buffer keeps
    memory flat and avoids faulting in a fresh allocation per chunk (pread into new bytes
    objects halves the throughput of a checksum pass on this kind of machine).
    """
    if length <= 0:
        return
    buf = memoryview(bytearray(min(size, length)))
    done = 0
    while done < length:
        want = min(len(buf), length - done)
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [buf[:want]], offset + done)
            chunk = buf[:n]
        else:  # pragma: no cover - Windows
            chunk = os.pread(fd, want, offset + done)
            n = len(chunk)
        if n == 0:
            raise CorruptCheckpointError(f"{what} is truncated (the file ended early)")
        yield chunk
        done += n


# --------------------------------------------------------------------------- byte sources
class _MapCache:
    """One private (copy-on-write) mapping per file, shared by every range read from it."""

    def __init__(self):
        self._maps: dict[tuple, mmap.mmap] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> mmap.mmap:
        try:
            st = os.stat(path)
        except OSError as e:
            raise InputNotFoundError(f"cannot read {path}: {e.strerror}") from None
        key = (path, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            m = self._maps.get(key)
            if m is None:
                with open(path, "rb") as f:
                    # ACCESS_COPY: writable for torch.frombuffer, never written back to the file.
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if st.st_size else None
                self._maps[key] = m
            return m


MAPS = _MapCache()


@dataclass(eq=False)
class FileRange:
    """``length`` bytes at ``offset`` of ``path``; ``crc`` (zip CRC-32) is checked on first read."""

    path: str
    offset: int
    length: int
    crc: int | None = None
    label: str = ""
    _checked: bool = field(default=False, repr=False)

    def raw(self) -> memoryview:
        """The bytes, unchecked."""
        if self.length == 0:
            return memoryview(bytearray(0))
        m = MAPS.get(self.path)
        if m is None or self.offset + self.length > len(m):
            raise CorruptCheckpointError(
                f"{self.path}: {self.label or 'tensor data'} runs past the end of the file (truncated?)"
            )
        return memoryview(m)[self.offset:self.offset + self.length]

    def chunks(self, start: int = 0, length: int | None = None, size: int = CHUNK):
        """Yield the bytes [start, start+length) of this range read with pread, as views of one
        reused buffer (consume each before the next)."""
        length = self.length - start if length is None else length
        if length <= SMALL_READ:  # a few pages: the shared mapping beats an open/pread/close each
            if length > 0:
                yield self.raw()[start:start + length]
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            yield from pread_chunks(fd, self.offset + start, length, size,
                                    what=f"{self.path}: {self.label or 'tensor data'}")
        finally:
            os.close(fd)

    def buffer(self) -> memoryview:
        view = self.raw()
        if self.crc is not None and not self._checked:
            self.check_crc(view)
        return view

    def check_crc(self, view: memoryview | None = None) -> None:
        """Verify the stored CRC-32. Without ``view`` the bytes are streamed with pread in
        chunks (constant memory, no mapping: copy paths stay flat in RSS)."""
        if self.crc is None or self._checked:
            return
        if view is not None:
            got = crc32(view)
        else:
            got = 0
            for chunk in self.chunks():
                got = crc32(chunk, got)
        self.verify_crc_value(got)

    def verify_crc_value(self, got: int) -> None:
        """Compare a CRC-32 computed elsewhere over this whole range with the stored one."""
        if self.crc is None or self._checked:
            return
        if got != self.crc:
            if self.crc == 0:  # what torch.serialization.skip_data() writes for every record
                raise CorruptCheckpointError(
                    f"{self.path}: {self.label or 'a data record'} has no CRC-32 (stored 00000000, computed "
                    f"{got:08x}): a file saved under torch.serialization.skip_data() holds no tensor values",
                    hint="torch.load would return zeros or leftovers; save the checkpoint again without skip_data()")
            raise CorruptCheckpointError(
                f"{self.path}: CRC-32 mismatch in {self.label or 'a data record'} "
                f"(stored {self.crc:08x}, computed {got:08x}): the tensor bytes are damaged",
                hint="torch.load would silently return wrong values; restore the file from a good copy",
            )
        self._checked = True


@dataclass(eq=False)
class MemoryBytes:
    """Bytes already in memory (a re-pickled record, or a tensor computed by a surgery)."""

    data: Any  # bytes, bytearray, memoryview or anything exporting the buffer protocol
    crc: int | None = None
    label: str = ""

    @property
    def length(self) -> int:
        return memoryview(self.data).nbytes

    def buffer(self) -> memoryview:
        return memoryview(self.data).cast("B")


#: built bytes between two calls of malloc_trim (see give_back_freed_memory)
TRIM_EVERY = 64 << 20
_built_since_trim = 0
_malloc_trim = None


def give_back_freed_memory(nbytes: int) -> None:
    """Count ``nbytes`` about to be built; every TRIM_EVERY bytes, hand what malloc keeps to the OS.

    glibc keeps large freed blocks in the process rather than returning them, and a writer that
    builds tensor after tensor (a cast, a LoRA merge, FSDP pieces put together) kept all of them:
    casting a 1 GiB float32 model to bfloat16 grew the anonymous memory by the whole 512 MiB
    written, a LoRA merge of it by 3 GiB (its temporaries), though each tensor was freed once
    written. ``malloc_trim(0)`` now and then returns them: both stay within a few tensors' size.
    (A fixed ``M_MMAP_THRESHOLD`` does it too, but faults in fresh pages for every tensor: twice as
    slow here.) Elsewhere than glibc this does nothing."""
    global _built_since_trim, _malloc_trim
    _built_since_trim += nbytes
    if _built_since_trim < TRIM_EVERY:
        return
    _built_since_trim = 0
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


class AssembledBytes:
    """Bytes of a tensor put together from pieces (a tensor sharded over ranks), made on each use
    and not kept here: a writer that goes tensor by tensor holds one assembled tensor at a time,
    and reading a checkpoint for its shapes (``inspect``) reads none of them.

    ``parts``: when the whole tensor's bytes are the pieces' bytes one after another (pieces
    split along the first dimension, the usual FSDP sharding), the pieces in that order; writers
    then copy each piece's file range in the kernel (:func:`file_pieces`) and nothing is
    assembled in memory. Otherwise ``build()`` returns the whole tensor (torch). ``parts`` may
    also be a function returning them, called once, when they are first needed (a DCP chunk:
    its archive is parsed only when its bytes are wanted)."""

    crc = None

    def __init__(self, length: int, build=None, label: str = "", parts=None):
        self._length = int(length)
        self._build = build
        self.label = label
        self._parts = parts

    @property
    def parts(self) -> list | None:
        if callable(self._parts):
            self._parts = list(self._parts())
        return self._parts

    @property
    def length(self) -> int:
        return self._length

    def buffer(self) -> memoryview:
        parts = self.parts
        if parts is not None and len(parts) == 1:
            view = parts[0].read_bytes()  # one piece (a whole DCP chunk): zero-copy over its mapping
        elif parts is not None:
            give_back_freed_memory(self._length)  # what the tensors built before this one left behind
            out = bytearray(self._length)
            pos = 0
            for p in parts:
                b = p.read_bytes()
                out[pos:pos + b.nbytes] = b
                pos += b.nbytes
            view = memoryview(out)[:pos]
        else:
            from .refs import tensor_bytes

            give_back_freed_memory(self._length)  # what the tensors built before this one left behind
            view = tensor_bytes(self._build())
        if view.nbytes != self._length:
            raise CorruptCheckpointError(f"{self.label or 'an assembled tensor'}: its pieces make {view.nbytes} "
                                         f"bytes, not {self._length}")
        return view


def file_pieces(source, start: int, length: int) -> list[tuple[FileRange, int, int]] | None:
    """Where bytes ``[start, start+length)`` of a storage source lie in files, as
    ``(file range, start within it, length)`` pieces in order; None when some are not in a file."""
    if isinstance(source, FileRange):
        return [(source, start, length)] if length else []
    parts = getattr(source, "parts", None)
    if parts is None:
        return None
    out: list = []
    pos = 0
    for p in parts:
        span = p.byte_span()
        if span is None:
            return None
        lo, hi = max(start, pos), min(start + length, pos + span[1])
        if lo < hi:
            sub = file_pieces(p.storage.source, span[0] + lo - pos, hi - lo)
            if sub is None:
                return None
            out += sub
        pos += span[1]
    return out
