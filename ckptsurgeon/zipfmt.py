"""torch's zip container, read without torch.

:mod:`zipfile` reads the central directory; local headers are read to find where each record's
bytes start, so tensors stay byte ranges of the file. Writing is :mod:`ckptsurgeon.zipwrite`'s.
"""

from __future__ import annotations

import copy
import io
import os
import struct
import lzma  # (zipfile imports it anyway)
import zipfile
import zlib
from typing import Iterable

from .byteranges import FileRange, MemoryBytes
from .errors import CorruptCheckpointError, NotACheckpointError, UnsupportedError

#: a local file header (signature ... name length, extra length); writers use it too
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
MAX_COMPRESSED_RECORD = 1 << 30  # a compressed (repacked) record is inflated in memory: up to this size
#: what zipfile raises on a damaged or unusual archive: bad headers, a bad deflate/LZMA stream, an
#: unknown compression method or zip version (NotImplementedError), encryption (RuntimeError)
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, OSError, EOFError,
              struct.error, ValueError, NotImplementedError, RuntimeError)
MAX_COMPRESSED_SMALL = 256 << 20  # the same for the pickle and the other small records


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
        head = os.pread(f.fileno(), LOCAL_HEADER.size, info.header_offset)
        fields = LOCAL_HEADER.unpack(head) if len(head) == LOCAL_HEADER.size else (0,)
        if fields[0] != 0x04034B50:
            raise zipfile.BadZipFile(f"bad local header for {info.filename}")
        start = info.header_offset + LOCAL_HEADER.size + fields[-2] + fields[-1]
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
            head = os.pread(fp.fileno(), LOCAL_HEADER.size, start)
        else:
            with open(self.path, "rb") as f:
                f.seek(start)
                head = f.read(LOCAL_HEADER.size)
        if len(head) != LOCAL_HEADER.size:
            raise CorruptCheckpointError(f"{self.path}: local header of {info.filename} is truncated")
        sig, *_rest, name_len, extra_len = LOCAL_HEADER.unpack(head)
        if sig != 0x04034B50:
            raise CorruptCheckpointError(f"{self.path}: bad local header for {info.filename}")
        return start + LOCAL_HEADER.size + name_len + extra_len

    def close(self):
        self._zf.close()
        if self._window is not None:  # zipfile leaves a file object it was given open
            self._window.close()
