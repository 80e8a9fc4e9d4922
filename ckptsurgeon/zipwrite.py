"""torch's zip container, written without torch.

The layout of torch's own writer (miniz as driven by ``PyTorchStreamWriter``): every record's
data starts on a 64-byte boundary, padded through a ``FB`` extra field; payloads are followed by a
data descriptor; storages are named ``data/0..n-1`` in first-use order. That layout is what
``torch.load(mmap=True, calculate_storage_offsets=True)`` assumes, so matching it keeps that mode
correct (a plain zip writer would silently break it). Tensor records are copied in the kernel
(``copy_file_range``) and their CRC-32 checked against the bytes written, on a second thread.

Where records move relative to each other (an extract leaves records out), a large record is
padded further so its bytes keep their offset within a page of the input: the kernel then
copies whole pages (measured 0.29 s against 0.375 s for 1 GiB, ext4) and a filesystem that
shares blocks can share them. torch's minimal padding no longer holds then, so the file leaves
out ``.format_version`` -- the record that tells torch it may compute offsets from sizes alone
(without it torch reads each record's header, as for files from before torch 2.6).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

from .byteranges import FileRange, MemoryBytes, crc32, crc32_combine, file_pieces, pread_chunks
from .errors import CorruptCheckpointError
from .extents import same_bytes
from .kernelcopy import PENDING_MAX, SMALL_RECORD, EarlyWriteback, LazyPool, copy_range, pwrite_all
from .zipfmt import LOCAL_HEADER as _LOCAL

ALIGN = 64
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_U32 = 0xFFFFFFFF
#: sizes and offsets from here on get zip64 fields (a test lowers it to write them for small files)
ZIP64_AT = _U32
PAGE = 4096
#: records from this size keep their input's offset within a page when records move (module doc);
#: the padding that costs is under a page per record (0.4% of a 1 MiB record at most)
CONGRUENT_MIN = 1 << 20


def _placement(header_offset: int, name_len: int, size: int, page_like: int | None) -> tuple[bool, int, int]:
    """Where a record's data goes: (zip64, padding, data offset). Data starts on a 64-byte
    boundary, or at ``page_like`` modulo the page size when that is on one."""
    zip64 = size >= ZIP64_AT or header_offset >= ZIP64_AT
    base = header_offset + _LOCAL.size + name_len + (20 if zip64 else 0) + 4
    pad = (-base) % ALIGN
    if page_like is not None and page_like % ALIGN == 0:
        pad = (page_like - base) % PAGE
    return zip64, pad, base + pad


def _source_offset(pieces) -> int | None:
    """Where a kernel-copied record's bytes start in the input (None for a built record)."""
    return pieces[0][0].offset + pieces[0][1] if pieces else None


def _records_move(prefix: str, head: list[tuple[str, int]], sizes: list[int], starts: list) -> bool:
    """Whether torch's minimal padding would put a large copied record (``starts``: its offset
    in the input, or None) at another offset within a page than in its input. data/0 is placed
    freely: torch reads its offset from its header."""
    pos = 0
    records = [(name, size, None) for name, size in head]
    records += [(f"data/{key}", size, start) for key, (size, start) in enumerate(zip(sizes, starts))]
    for i, (name, size, start) in enumerate(records):
        zip64, _, data = _placement(pos, len(f"{prefix}/{name}".encode()), size,
                                    start if i == len(head) else None)
        if start is not None and size >= CONGRUENT_MIN and start % ALIGN == 0 and (data - start) % PAGE:
            return True
        pos = data + size + ((24 if zip64 else 16) if size else 0)
    return False


@dataclass
class _Entry:
    name: bytes  # full record name, archive prefix included
    size: int
    header_offset: int
    crc: int | Callable[[], int]
    descriptor: int | None  # offset of the data descriptor (None for an empty record)
    data_offset: int
    inline_crc: int | None = None  # CRC of a small record's bytes, read (not kernel-copied) here


class ZipWriter:
    """Writes records in torch's layout to an open file descriptor, front to back.

    A record's CRC may be given, computed here, or *deferred*: a callable resolved in
    :meth:`finish` (the data descriptor is patched in place), so a CRC computed on another thread
    never holds up the copy.
    """

    def __init__(self, fd: int, prefix: str):
        self.fd = fd
        self.prefix = prefix
        self.pos = 0
        self.entries: list[_Entry] = []
        self._src_fds: dict[str, int] = {}
        self._pending = bytearray()  # headers, descriptors and small records not yet written
        self._built_crc = None  # the CRC of the last large built record, computing on the pool

    def _write(self, data) -> None:
        self._pending += data
        self.pos += memoryview(data).nbytes
        if len(self._pending) >= PENDING_MAX:
            self.flush()

    def flush(self) -> None:
        """Write what is pending: one pwrite per run of small pieces, not one per header."""
        if self._pending:
            pwrite_all(self.fd, self._pending, self.pos - len(self._pending))
            self._pending = bytearray()

    def add(self, name: str, source, crc=None, page_like: int | None = None, pool=None) -> "_Entry":
        """Append a record; returns its entry.

        ``crc=None``: computed here over the bytes of a small or in-memory record; a
        kernel-copied record gets a placeholder in its descriptor, and the caller sets
        ``entry.crc`` to a callable (its read-back on another thread), resolved in :meth:`finish`.
        ``page_like``: pad (more than the 64-byte minimum) so the data lands at this offset
        modulo the page size. ``pool``: a one-thread executor that computes the CRC of a large
        built (in-memory) record while the caller builds the next.
        """
        full = f"{self.prefix}/{name}".encode("utf-8")
        if isinstance(source, (bytes, bytearray)):
            source = MemoryBytes(source)
        size = source.length
        header_offset = self.pos
        zip64, pad, _ = _placement(header_offset, len(full), size, page_like)
        z64 = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        extra = z64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        lsize = _U32 if zip64 else 0
        self._write(_LOCAL.pack(0x04034B50, 45 if zip64 else 0, 0x0808 if size else 0x0800, 0, 0, 0, 0,
                                lsize, lsize, len(full), len(extra)) + full + extra)
        if crc is None:
            crc = source.crc
        data_offset = self.pos
        inline_crc = None
        pieces = file_pieces(source, 0, size) if size else None
        if pieces is not None and size:
            if size <= SMALL_RECORD:  # a syscall pair per small tensor beats copy_file_range's setup
                data = b"".join(os.pread(self._src_fd(r.path), n, r.offset + at) for r, at, n in pieces)
                if len(data) != size:
                    raise CorruptCheckpointError("source ended early while copying (file truncated?)")
                inline_crc = crc32(data)
                self._write(data)
            else:
                self.flush()
                for r, at, n in pieces:
                    copy_range(self._src_fd(r.path), self.fd, r.offset + at, n, self.pos)
                    self.pos += n
            if crc is None:
                crc = inline_crc if inline_crc is not None else 0  # 0: placeholder, see docstring
        elif size:
            buf = source.buffer()
            if size >= PENDING_MAX:  # a built tensor: written from where it was built, not copied again
                self.flush()
                pwrite_all(self.fd, buf, self.pos)
                self.pos += size
                if crc is None and pool is not None:  # its CRC on the checking thread, while the next is built
                    if self._built_crc is not None:
                        self._built_crc.result()  # one built tensor waits for its CRC at most: memory stays flat
                    self._built_crc = pool.submit(crc32, buf)
                    crc = self._built_crc.result
            else:
                self._write(buf)
            if crc is None:
                crc = crc32(buf)
        descriptor = None
        if size:
            descriptor = self.pos
            fmt = "<IIQQ" if zip64 else "<IIII"
            self._write(struct.pack(fmt, 0x08074B50, 0 if callable(crc) else crc, size, size))
        entry = _Entry(full, size, header_offset, crc or 0, descriptor, data_offset, inline_crc)
        self.entries.append(entry)
        return entry

    def _src_fd(self, path: str) -> int:
        fd = self._src_fds.get(path)
        if fd is None:
            fd = self._src_fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _central(self, full: bytes, size: int, header_offset: int, crc: int) -> bytes:
        zip64 = size >= ZIP64_AT or header_offset >= ZIP64_AT
        fields = []
        c_size, c_off = size, header_offset
        if size >= ZIP64_AT:
            fields += [size, size]
            c_size = _U32
        if header_offset >= ZIP64_AT:
            fields.append(header_offset)
            c_off = _U32
        cextra = b""
        if fields:
            cextra = struct.pack("<HH", 1, 8 * len(fields)) + struct.pack(f"<{len(fields)}Q", *fields)
        flags = 0x0808 if size else 0x0800
        version = 45 if zip64 else 0
        return _CENTRAL.pack(0x02014B50, version, version, flags, 0, 0, 0, crc, c_size, c_size,
                             len(full), len(cextra), 0, 0, 0, 0, c_off) + full + cextra

    def finish(self) -> None:
        self.flush()
        for e in self.entries:  # resolve deferred CRCs, patching their data descriptors
            if callable(e.crc):
                e.crc = e.crc()
                pwrite_all(self.fd, struct.pack("<I", e.crc), e.descriptor + 4)
        cd_offset = self.pos
        for e in self.entries:
            self._write(self._central(e.name, e.size, e.header_offset, e.crc))
        cd_size = self.pos - cd_offset
        n = len(self.entries)
        if n >= 0xFFFF or cd_offset >= ZIP64_AT or cd_size >= ZIP64_AT:
            eocd64_offset = self.pos
            self._write(_EOCD64.pack(0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_offset))
            self._write(_LOCATOR64.pack(0x07064B50, 0, eocd64_offset, 1))
            self._write(_EOCD.pack(0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                                   _U32 if cd_size >= ZIP64_AT else cd_size,
                                   _U32 if cd_offset >= ZIP64_AT else cd_offset, 0))
        else:
            self._write(_EOCD.pack(0x06054B50, 0, 0, n, n, cd_size, cd_offset, 0))
        self.flush()
        self.close()

    def close(self) -> None:
        for fd in self._src_fds.values():
            os.close(fd)
        self._src_fds.clear()


def write_torch_zip(fd: int, pickle_bytes: bytes, storages: list, *, prefix: str = "archive",
                    byteorder: bytes = b"little", version: bytes = b"3\n",
                    serialization_id: bytes | None = None,
                    extra_records: Iterable[tuple[str, bytes]] = (),
                    progress: Callable[[int], None] | None = None, writeback: bool = False) -> None:
    """Write a complete torch checkpoint: ``data.pkl`` + one record per storage (in key order).

    Copied records are checked on a second thread against the source's stored CRC-32 *as
    written*: the checker reads the output's just-written (page-cached) bytes, so a damaged input
    or a bad copy aborts the write, and the source is read only once (by the kernel's copy) --
    which matters when it does not fit in the page cache. Records copied from a range without a
    stored CRC (a safetensors source) get theirs computed the same way, patched in at the end.
    Records of at most SMALL_RECORD bytes are read and written with the headers around them
    instead, and checked as they are read (300 tiny copy_file_range calls cost ~10 ms).
    ``writeback``: the caller will fsync; start write-back early (:class:`EarlyWriteback`).

    On a filesystem that shares blocks (XFS, btrfs), a record the kernel reflinked -- its bytes
    provably on the input's own blocks (:mod:`ckptsurgeon.extents`) -- is not read back: no copy
    was made to check. Its stored CRC-32 is checked by reading the input's record instead (its
    page cache, when warm, rather than the output's blocks from disk), so a damaged input still
    aborts the write. Returns the bytes so shared.
    """
    w = ZipWriter(fd, prefix)
    early = EarlyWriteback(fd, writeback)
    all_pieces = [file_pieces(s.source, 0, s.source.length) if s.source.length else None for s in storages]
    starts = [_source_offset(p) for p in all_pieces]
    head = [("data.pkl", len(pickle_bytes)), (".format_version", 1), (".storage_alignment", len(str(ALIGN))),
            ("byteorder", len(byteorder))]
    # data/0 lands at its source's offset within a page. torch pads every later record minimally
    # (torch.load(calculate_storage_offsets=True) relies on it), so records that follow as in the
    # source stay page-congruent with it too. Where they would not (records left out), large
    # records are padded to stay so, and .format_version is left out (module doc).
    move = _records_move(prefix, head, [s.source.length for s in storages], starts)
    w.add("data.pkl", MemoryBytes(pickle_bytes))
    if not move:
        w.add(".format_version", MemoryBytes(b"1"))
    w.add(".storage_alignment", MemoryBytes(str(ALIGN).encode()))
    w.add("byteorder", MemoryBytes(byteorder))
    pool = LazyPool()
    shared, shared_srcs = 0, []
    try:
        checks = []
        for key, storage in enumerate(storages):
            src = storage.source
            pieces = all_pieces[key]
            copied = bool(pieces)
            stored = getattr(src, "crc", None)
            place = copied and (key == 0 or move and src.length >= CONGRUENT_MIN)
            entry = w.add(f"data/{key}", src, crc=stored, page_like=starts[key] if place else None, pool=pool)
            whole = isinstance(src, FileRange)
            if copied and entry.inline_crc is not None:  # small: read (not kernel-copied) and checked here
                if whole:
                    src.verify_crc_value(entry.inline_crc)
                else:  # pieces of other records: each checked against its own CRC
                    checks.extend((None, pool.submit(r.check_crc)) for r in _with_crc(pieces))
            elif copied and not whole and crc32_combine is None:  # no combine: check pieces, then read back
                checks.extend((None, pool.submit(r.check_crc)) for r in _with_crc(pieces))
                fut = pool.submit(_crc_of_written, fd, entry.data_offset, entry.size)
                early.written(entry.data_offset, entry.size, ready=fut)
                entry.crc = fut.result
            elif copied and whole and stored is not None and same_bytes(
                    w._src_fd(src.path), src.offset, fd, entry.data_offset, entry.size):
                shared += entry.size  # the input's own blocks (a reflink): no copy to check, but the
                shared_srcs.append(src)  # input's bytes are, read from the input (below)
            elif copied:
                if whole:
                    fut = pool.submit(_crc_of_written, fd, entry.data_offset, entry.size)
                else:  # a tensor sharded over ranks: its pieces read back and checked, CRCs combined
                    fut = pool.submit(_crc_of_written_pieces, fd, entry.data_offset, pieces)
                early.written(entry.data_offset, entry.size, ready=fut)
                if stored is not None:
                    checks.append((src, fut))
                else:
                    entry.crc = fut.result  # resolved (and patched in) when the zip is finished
            if progress:
                progress(storage.nbytes)
        # records on the input's own blocks: nothing was copied, so this thread is free to check
        # half of them while the checking thread does the other half (a read of the input each)
        checks += [(None, pool.submit(r.check_crc)) for r in shared_srcs[1::2]]
        for r in shared_srcs[::2]:
            r.check_crc()
        for src, fut in checks:
            got = fut.result()  # a piece's own check raises CorruptCheckpointError on a mismatch
            if src is not None:
                src.verify_crc_value(got)  # raises CorruptCheckpointError on a mismatch
        w.add("version", MemoryBytes(version))
        for name, data in extra_records:
            w.add(name, MemoryBytes(data))
        # 20 random decimal digits, as torch writes them (from os.urandom: uuid's import costs ~3 ms)
        sid = serialization_id or str(int.from_bytes(os.urandom(16), "big")).encode()[:20].rjust(20, b"0")
        w.add(".data/serialization_id", MemoryBytes(sid))
        w.finish()
    finally:
        w.close()
        pool.shutdown(wait=True, cancel_futures=True)
    return shared


def _with_crc(pieces) -> list:
    return list({id(r): r for r, _, _ in pieces if r.crc is not None}.values())


def _crc_of_written_pieces(fd: int, offset: int, pieces) -> int:
    """CRC-32 of a record written from pieces of other records, read back piece by piece: a
    piece that is a whole source record is checked against that record's CRC on the way (the
    copy and the source in one pass); part of a record is checked from its source."""
    total = 0
    for r, at, n in pieces:
        got = _crc_of_written(fd, offset, n)
        if at == 0 and n == r.length:
            r.verify_crc_value(got)
        else:
            r.check_crc()
        total = crc32_combine(total, got, n)
        offset += n
    return total


def _crc_of_written(fd: int, offset: int, length: int) -> int:
    """CRC-32 of bytes just written, read back through the page cache in chunks. (Mapping the
    output instead was slower while the copy was still writing: 2 GiB strip 1.55 s against
    1.13 s, although a mapping reads an idle cached file ~2x faster.)"""
    crc = 0
    for chunk in pread_chunks(fd, offset, length, what="output"):
        crc = crc32(chunk, crc)
    return crc
