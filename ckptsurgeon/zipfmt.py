"""torch's zip container, read and written without torch.

Reading uses :mod:`zipfile` for the central directory and reads local headers to find where
each record's bytes start. Writing reproduces the layout of torch's own writer (miniz as driven
by ``PyTorchStreamWriter``): every record's data starts on a 64-byte boundary, padded through a
``FB`` extra field; payloads are followed by a data descriptor; storages are named ``data/0..n-1``
in first-use order. That layout is what ``torch.load(mmap=True, calculate_storage_offsets=True)``
assumes, so matching it keeps that mode correct (a plain zip writer would silently break it).
"""

from __future__ import annotations

import copy
import io
import os
import struct
import lzma  # (zipfile imports it anyway)
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

from .errors import CorruptCheckpointError, NotACheckpointError, UnsupportedError
from .extents import same_bytes
from .byteranges import FileRange, MemoryBytes, crc32, crc32_combine, file_pieces, pread_chunks

ALIGN = 64
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_U32 = 0xFFFFFFFF
#: sizes and offsets from here on get zip64 fields (a test lowers it to write them for small files)
ZIP64_AT = _U32
PAGE = 4096
MAX_COMPRESSED_RECORD = 1 << 30  # a compressed (repacked) record is inflated in memory: up to this size
#: what zipfile raises on a damaged or unusual archive: bad headers, a bad deflate/LZMA stream, an
#: unknown compression method or zip version (NotImplementedError), encryption (RuntimeError)
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, OSError, EOFError,
              struct.error, ValueError, NotImplementedError, RuntimeError)
MAX_COMPRESSED_SMALL = 256 << 20  # the same for the pickle and the other small records
SMALL_RECORD = 64 << 10  # records up to this size are read and written, not kernel-copied
PENDING_MAX = 1 << 20
COPY_ALIGN = 64 << 10  # kernel copies start on this destination boundary (see copy_range)


class _Window(io.RawIOBase):
    """Bytes [base, base+length) of an open file as a file of their own (a torch.save output
    embedded in a bigger file, as torch.distributed.checkpoint writes them)."""

    def __init__(self, f, base: int, length: int):
        super().__init__()
        self._f, self._base, self._len, self._pos = f, base, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=0):
        self._pos = max(0, {0: pos, 1: self._pos + pos, 2: self._len + pos}[whence])
        return self._pos

    def readinto(self, buf):
        want = max(0, min(len(buf), self._len - self._pos))
        data = os.pread(self._f.fileno(), want, self._base + self._pos) if want else b""
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def fileno(self):
        return self._f.fileno()

    def close(self):
        self._f.close()
        super().close()


def without_crcs(infos: Iterable[zipfile.ZipInfo]) -> bool:
    """Whether an archive was written without CRC-32s: every record that holds bytes stores 0, as
    torch.save writes under ``torch.utils.serialization.config.save.compute_crc32 = False``
    (torch >= 2.6, a switch for faster saving). torch.load never checks CRCs, so such files load
    there; their bytes cannot be checked for damage here either. (``skip_data()`` also stores 0,
    for the tensor records only: data.pkl keeps its CRC, so that case stays checked.)"""
    sized = [i for i in infos if i.file_size]
    return bool(sized) and not any(i.CRC for i in sized)


def read_record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, check_crc: bool = True) -> bytes:
    """A record's bytes through zipfile; ``check_crc=False`` for an archive written without
    CRC-32s (zipfile checks a record's CRC only when its ZipInfo has one)."""
    if not check_crc:
        info = copy.copy(info)
        del info.CRC
    return zf.read(info)


def nested_zip(path: str, info: zipfile.ZipInfo) -> zipfile.ZipFile | None:
    """The zip archive a stored record of ``path`` holds (a torch.save file inside a torch.export
    archive), opened in place; None when the record is compressed or holds no zip."""
    if info.compress_type != zipfile.ZIP_STORED or info.file_size < 22:
        return None
    f = open(path, "rb")
    try:
        head = os.pread(f.fileno(), _LOCAL.size, info.header_offset)
        fields = _LOCAL.unpack(head) if len(head) == _LOCAL.size else (0,)
        if fields[0] != 0x04034B50:
            raise zipfile.BadZipFile(f"bad local header for {info.filename}")
        start = info.header_offset + _LOCAL.size + fields[-2] + fields[-1]
        if os.pread(f.fileno(), 4, start) != b"PK\x03\x04":
            f.close()
            return None
        return zipfile.ZipFile(_Window(f, start, info.file_size))
    except BaseException:
        f.close()
        raise


def refuse_inflating(path: str, info: zipfile.ZipInfo, limit: int) -> None:
    """A compressed record (torch never compresses; a repacked archive may) that declares more
    than ``limit`` bytes is refused before inflating: zipfile stops at the declared size, so the
    declaration bounds the memory (a 400 KB deflated pickle declared 400 MiB)."""
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > limit:
        raise UnsupportedError(
            f"{path}: record {info.filename} is compressed and inflates to {info.file_size:,} bytes "
            f"({info.file_size / max(info.compress_size, 1):,.0f}x its stored size): not inflated",
            hint="torch writes records uncompressed; re-save the checkpoint with torch.save")


class TorchZip:
    """An open torch zip checkpoint: its records, their byte ranges and CRCs.

    ``base``/``length``: the archive is that byte range of ``path`` (offsets reported stay
    offsets in ``path``). ``program_ok``: a torch.export archive (no data.pkl) is opened too,
    for formats.export, instead of refused."""

    def __init__(self, path: str, base: int = 0, length: int | None = None, program_ok: bool = False):
        self.path = path
        self.base = base
        self.size = os.path.getsize(path) - base if length is None else length
        self._window = None
        try:
            if length is not None:
                self._window = _Window(open(path, "rb"), base, length)
            zf = zipfile.ZipFile(self._window or path)
            infos = zf.infolist()
        except ZIP_ERRORS as e:
            if self._window is not None:
                self._window.close()
            raise CorruptCheckpointError(f"{path}: damaged zip container ({e})",
                                         hint="the file is truncated or not a torch checkpoint") from None
        self._zf = zf
        #: False for an archive written without CRC-32s (see without_crcs): nothing to check
        self.checksums = not without_crcs(infos)
        if not infos:
            self.close()
            raise CorruptCheckpointError(f"{path}: empty zip archive, not a torch checkpoint")
        self.prefix = infos[0].filename.split("/", 1)[0]
        self.infos = {}
        for info in infos:
            head, _, rest = info.filename.partition("/")
            if head == self.prefix and rest in self.infos:
                # torch never writes a name twice; readers differ on which copy they take (a
                # scanner may see one data.pkl and a loader the other): refused, not guessed
                self.close()
                raise CorruptCheckpointError(f"{path}: the archive holds record {info.filename} twice",
                                             hint="not written by torch.save; re-save the checkpoint from a "
                                                  "trusted copy")
            if head == self.prefix and rest:
                self.infos[rest] = info
        if "data.pkl" not in self.infos:
            program = "archive_format" in self.infos or any(n.startswith("models/") for n in self.infos)
            if program and program_ok:  # formats.export reads it
                return
            self.close()
            if program:
                raise NotACheckpointError(
                    f"{path}: a torch.export program archive (.pt2), not a checkpoint",
                    hint="take its weights with torch.export.load(path).state_dict and torch.save them")
            if "model.json" in self.infos or any(n.startswith("code/") for n in self.infos):
                raise NotACheckpointError(
                    f"{path}: a TorchScript archive in an early torch release's format (model.json, no data.pkl)",
                    hint="load it with torch.jit.load and torch.save its state_dict(), then run ckpt-surgeon on that")
            what = "a numpy .npz archive" if path.lower().endswith(".npz") else "a zip archive"
            raise NotACheckpointError(f"{path}: {what} with no data.pkl record, not a torch checkpoint")

    def read(self, name: str, limit: int = MAX_COMPRESSED_SMALL) -> bytes:
        """A record's bytes (CRC checked by zipfile, where the archive has CRCs); a compressed
        one declaring more than ``limit`` is refused (see refuse_inflating)."""
        try:
            info = self.infos[name]
            refuse_inflating(self.path, info, limit)
            return read_record(self._zf, info, self.checksums)
        except KeyError:
            raise CorruptCheckpointError(f"{self.path}: missing record {self.prefix}/{name}") from None
        except ZIP_ERRORS as e:
            raise CorruptCheckpointError(f"{self.path}: record {name} is damaged ({e})") from None

    def has(self, name: str) -> bool:
        return name in self.infos

    def source(self, name: str, nbytes: int, label: str = ""):
        """Where record ``name``'s first ``nbytes`` bytes live, without reading them."""
        info = self.infos.get(name)
        if info is None:
            raise CorruptCheckpointError(f"{self.path}: storage record {self.prefix}/{name} is missing")
        if info.file_size < nbytes:
            raise CorruptCheckpointError(
                f"{self.path}: record {name} holds {info.file_size} bytes, the pickle expects {nbytes}")
        if info.compress_type != zipfile.ZIP_STORED:
            # torch never compresses records; a repacked archive may. Inflating needs memory for
            # the whole record, so a huge one (or a zip bomb declaring one) is refused, not read.
            data = bytearray(self.read(name, MAX_COMPRESSED_RECORD))  # writable: torch.frombuffer wants it
            return MemoryBytes(memoryview(data)[:nbytes], label=label or name)
        offset = self.data_offset(info)
        if offset + info.file_size > self.base + self.size:
            raise CorruptCheckpointError(f"{self.path}: record {name} runs past the end of the file (truncated?)")
        crc = info.CRC if nbytes == info.file_size and self.checksums else None
        return FileRange(self.path, offset, nbytes, crc=crc, label=label or f"record {name}")

    def data_offset(self, info: zipfile.ZipInfo) -> int:
        fp = getattr(self._zf, "fp", None)
        start = self.base + info.header_offset
        if fp is not None:  # the archive's own open file: no open() per record
            head = os.pread(fp.fileno(), _LOCAL.size, start)
        else:
            with open(self.path, "rb") as f:
                f.seek(start)
                head = f.read(_LOCAL.size)
        if len(head) != _LOCAL.size:
            raise CorruptCheckpointError(f"{self.path}: local header of {info.filename} is truncated")
        sig, *_rest, name_len, extra_len = _LOCAL.unpack(head)
        if sig != 0x04034B50:
            raise CorruptCheckpointError(f"{self.path}: bad local header for {info.filename}")
        return start + _LOCAL.size + name_len + extra_len

    def close(self):
        self._zf.close()
        if self._window is not None:  # zipfile leaves a file object it was given open
            self._window.close()


# --------------------------------------------------------------------------- writing
def copy_range(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int) -> None:
    """Copy bytes in the kernel (copy_file_range), falling back to pread/pwrite.

    A call whose destination does not start on a 64 KiB boundary made the whole call slow on
    ext4 (2 GiB in 300 record-sized calls: 1.23-1.37 s, against 0.92-0.97 s for the same calls
    with the first bytes up to the boundary split off, and 0.9-1.0 s for cp's one call): so the
    head up to that boundary is copied by a call of its own.
    """
    done = 0
    try:
        head = min(length, (-dst_offset) % COPY_ALIGN)
        while done < length:
            want = (head - done) if done < head else (length - done)
            n = os.copy_file_range(src_fd, dst_fd, want, offset + done, dst_offset + done)
            if n == 0:
                raise CorruptCheckpointError("source ended early while copying (file truncated?)")
            done += n
        return
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
            raise
    # copy_file_range unsupported here (old kernel, cross-device): plain reads and writes
    while done < length:
        chunk = os.pread(src_fd, min(16 << 20, length - done), offset + done)
        if not chunk:
            raise CorruptCheckpointError("source ended early while copying (file truncated?)")
        pwrite_all(dst_fd, chunk, dst_offset + done)
        done += len(chunk)


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class EarlyWriteback:
    """When the output will be fsynced anyway, start writing finished regions to disk while the
    copy goes on, so the final fsync finds little left to do: POSIX_FADV_DONTNEED on dirty pages
    starts asynchronous write-back (and drops nothing: only clean pages are dropped). A region
    is handed over only once ``ready`` (the thread reading it back for its CRC) is done.
    Measured: 2 GiB copy + fsync 4.1-4.4 s -> 3.5-3.6 s (cp + sync: 3.9-4.5 s)."""

    def __init__(self, fd: int, enabled: bool):
        self.fd = fd
        self.enabled = enabled and hasattr(os, "posix_fadvise")
        self._queue: list = []

    def written(self, offset: int, length: int, ready=None) -> None:
        if not self.enabled or length <= 0:
            return
        self._queue.append((offset, length, ready))
        while self._queue and (self._queue[0][2] is None or self._queue[0][2].done()):
            off, n, _ = self._queue.pop(0)
            try:
                os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_DONTNEED)
            except OSError:
                self.enabled = False
                return


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
        zip64 = size >= ZIP64_AT or header_offset >= ZIP64_AT
        z64 = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        base = header_offset + _LOCAL.size + len(full) + len(z64) + 4
        pad = (-base) % ALIGN
        if page_like is not None and page_like % ALIGN == 0:
            pad = (page_like - base) % PAGE
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
    w.add("data.pkl", MemoryBytes(pickle_bytes))
    w.add(".format_version", MemoryBytes(b"1"))
    w.add(".storage_alignment", MemoryBytes(str(ALIGN).encode()))
    w.add("byteorder", MemoryBytes(byteorder))
    pool = None
    shared, shared_srcs = 0, []
    try:
        checks = []
        for key, storage in enumerate(storages):
            src = storage.source
            pieces = file_pieces(src, 0, src.length) if src.length else None
            copied = bool(pieces)
            stored = getattr(src, "crc", None)
            # data/0 lands at its source's offset within a page. torch pads every later record
            # minimally (torch.load(calculate_storage_offsets=True) relies on it), so records
            # that follow as in the source stay page-congruent with it too: the kernel then
            # copies whole pages, measured ~20% faster than shifted copies (ext4, 2 GiB).
            first = key == 0 and copied
            if pool is None and (copied or src.length >= PENDING_MAX):
                from concurrent.futures import ThreadPoolExecutor  # the checking thread

                pool = ThreadPoolExecutor(max_workers=1)
            entry = w.add(f"data/{key}", src, crc=stored,
                          page_like=pieces[0][0].offset + pieces[0][1] if first else None, pool=pool)
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
        if pool is not None:
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
