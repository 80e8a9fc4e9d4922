"""safetensors: lazy read from the header, zero-copy write (header + byte-range copies)."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

from ..atomic import atomic_output, fsync_wanted
from ..byteranges import FileRange, crc32, file_pieces
from ..checkpoint import Checkpoint, Source
from ..dtypes import count
from ..errors import UnsupportedError
from ..keys import name_list
from ..locate import refuse_key
from ..refs import TensorRef, as_ref, check_dense_fits, holds_tensors, is_tensor_like, plain_form, special_kind, tie_key
from ..stfmt import build_header, load_entries
from ..kernelcopy import PENDING_MAX, SMALL_RECORD, EarlyWriteback, LazyPool, copy_range, pwrite_all

TRANSFORMS_KEY = "ckpt_surgeon.transforms"


def sniff(path: str, head: bytes) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= 100_000_000 and head[8:9] == b"{"


def load(path: str, *, key=None, **_) -> Checkpoint:
    refuse_key(key, path, "a safetensors file")
    entries, meta = load_entries(path)
    transforms = ()
    if TRANSFORMS_KEY in meta:
        try:
            transforms = tuple(json.loads(meta[TRANSFORMS_KEY]))
        except ValueError:
            pass
    meta = {k: v for k, v in meta.items() if k != TRANSFORMS_KEY}
    return Checkpoint(state=OrderedDict(entries), source=Source(path, "safetensors", os.path.getsize(path), (path,)),
                      st_metadata=meta, transforms=transforms)


def plan(ck: Checkpoint, *, dedupe_tied: bool = False):
    """(items, notes, tied) for writing ``ck`` as safetensors."""
    items, notes, tied, dropped = [], [], [], []
    seen: dict[tuple, str] = {}
    storages: dict = {}
    for name, v in ck.state.items():
        if not is_tensor_like(v):
            if holds_tensors(v):  # weights, not bookkeeping: never dropped with a note
                raise UnsupportedError(f"safetensors cannot store {name!r}: a {type(v).__name__} holding tensors "
                                       "(a quantized module's packed weights, a nested container)",
                                       hint="write a torch file (.pt) instead")
            dropped.append(name)
            continue
        kind = special_kind(v) if not isinstance(v, TensorRef) else None
        if kind:
            raise UnsupportedError(f"safetensors cannot store {name!r}: a {kind} tensor (it holds flat arrays only)",
                                   hint=f"write a torch file (.pt) instead, or store {plain_form(kind)} in its place")
        ref = as_ref(v, storages)
        sig = tie_key(ref)
        if sig in seen:
            tied.append([name, seen[sig]])
            if dedupe_tied:
                continue
        else:
            seen[sig] = name
        if not ref.is_contiguous():
            check_dense_fits(ref, name)
            ref = TensorRef.from_torch(ref.to_torch().contiguous())
        items.append((name, ref))
    if dropped:
        notes.append(f"non-tensor state-dict entries not carried ({len(dropped)}): {name_list(dropped)}")
    if tied:
        how = "kept once (dropped aliases)" if dedupe_tied else "written as separate copies"
        notes.append(f"{count(len(tied), 'tied tensor')} {how}: " + ", ".join(f"{a} = {b}" for a, b in tied[:8])
                     + (f" ... and {len(tied) - 8} more" if len(tied) > 8 else "")
                     + ("" if dedupe_tied else " (--dedupe-tied keeps one, as save_pretrained does)"))
    other = ck.wrapper_keys()
    if other:
        notes.append(f"safetensors holds only tensors: wrapper content not carried: {name_list(other, 12)}")
    if ck.metadata is not None:
        notes.append("state_dict._metadata (module versions) not carried: safetensors has no place for it")
    return items, notes, tied


def save(ck: Checkpoint, path: str, *, dry_run: bool = False, dedupe_tied: bool = False, progress=None, **_) -> dict:
    items, notes, tied = plan(ck, dedupe_tied=dedupe_tied)
    meta = {"format": "pt"}
    meta.update(ck.st_metadata or {})
    if ck.transforms:
        meta[TRANSFORMS_KEY] = json.dumps(list(ck.transforms))
    header, order = build_header(items, meta, data_start_like=first_file_offset(items))
    total = sum(r.nbytes for _, r in order)
    report = {"output": path, "format": "safetensors", "tensors": len(order), "bytes": total,
              "tied": tied, "notes": notes}
    if dry_run:
        return report
    with atomic_output(path) as fd:
        write_data(fd, header, order, progress=progress, writeback=fsync_wanted())
    return report


RUN_MAX = 1 << 30  # one copy call per GiB at most, so progress still moves
WRITEBACK_RUN = 64 << 20  # with early write-back: hand the disk 64 MiB at a time


def first_file_offset(items: list) -> int | None:
    """Where the first tensor's bytes sit in its source file (for page-congruent copies)."""
    if not items:
        return None
    ref = items[0][1]
    span = ref.byte_span() if isinstance(ref, TensorRef) else None
    pieces = file_pieces(ref.storage.source, *span) if span is not None and span[1] else None
    if pieces:
        r, at, _ = pieces[0]
        return r.offset + at
    return None


def write_data(fd: int, header: bytes, order, *, progress=None, start: int = 0, writeback: bool = False) -> int:
    """Header then each tensor's bytes; file-backed ranges go through copy_file_range, ranges
    that follow each other in both files (a rename) as one call (fewer syscalls; speed was the
    same as per-tensor calls once the offsets are page-congruent, see build_header).

    A small tensor that is a whole zip record (never adjacent to the next record: a local header
    sits between) is read through the file's mapping, checked against its CRC-32 as it is read,
    and written with its small neighbours in one pwrite, as the zip writer does: 50,000 tiny
    copy_file_range calls, and as many checks handed to the checking thread, cost seconds.
    The CRCs of the other file-backed records are checked on a second thread while they copy."""
    pwrite_all(fd, header, start)
    pos = start + len(header)
    src_fds: dict[str, int] = {}
    where = []  # per tensor, the file pieces of its bytes (None: not in a file, written from memory)
    checks = {}
    for _name, ref in order:
        span = ref.byte_span()
        pieces = file_pieces(ref.storage.source, *span) if span is not None else None
        if pieces is not None and _small_record(pieces, ref.nbytes):
            pieces = _SmallRecord(pieces[0][0])
        else:
            checks.update((id(r), r) for r, _, _ in pieces or () if r.crc is not None)
        where.append(pieces)
    try:
        with LazyPool() as pool:
            pending = pool.submit(_check_all, list(checks.values())) if checks else None
            run = None  # [source fd, source offset, output offset, length] of a pending copy
            small = bytearray()  # small records read here, written at small_at in one go
            small_at = pos
            early = EarlyWriteback(fd, writeback)

            def flush():
                sfd, s_off, d_off, n = run
                done = 0
                while done < n:  # with write-back: pieces end on multiples of WRITEBACK_RUN in the output
                    piece = min(n - done, WRITEBACK_RUN - (d_off + done) % WRITEBACK_RUN) if early.enabled else n
                    copy_range(sfd, fd, s_off + done, piece, d_off + done)
                    early.written(d_off + done, piece)
                    done += piece
                if progress:
                    progress(n)

            def flush_small():
                if small:
                    pwrite_all(fd, small, small_at)
                    early.written(small_at, len(small))
                    if progress:
                        progress(len(small))
                    small.clear()

            for (_name, ref), pieces in zip(order, where):
                n = ref.nbytes
                if n and isinstance(pieces, _SmallRecord):  # read and checked here
                    if run:
                        flush()
                        run = None
                    if not small:
                        small_at = pos
                    src = pieces.source
                    data = src.raw()
                    src.verify_crc_value(crc32(data))
                    small += data
                    if len(small) >= PENDING_MAX:
                        flush_small()
                elif n and pieces is not None:
                    flush_small()
                    at = pos
                    for src, start, k in pieces:
                        sfd = src_fds.get(src.path)
                        if sfd is None:
                            sfd = src_fds[src.path] = os.open(src.path, os.O_RDONLY)
                        s_off = src.offset + start
                        if (run and run[0] == sfd and run[1] + run[3] == s_off and run[2] + run[3] == at
                                and run[3] < RUN_MAX):
                            run[3] += k
                        else:
                            if run:
                                flush()
                            run = [sfd, s_off, at, k]
                        at += k
                elif n:
                    flush_small()
                    pwrite_all(fd, ref.read_bytes(), pos)
                    if progress:
                        progress(n)
                pos += n
            if run:
                flush()
            flush_small()
            if pending is not None:
                pending.result()  # raises CorruptCheckpointError for a damaged record
    finally:
        for sfd in src_fds.values():
            os.close(sfd)
    return pos


class _SmallRecord:
    """A small whole zip record, read through the mapping (see write_data)."""

    __slots__ = ("source",)

    def __init__(self, source: FileRange):
        self.source = source


def _small_record(pieces, nbytes: int) -> bool:
    if nbytes > SMALL_RECORD or len(pieces) != 1:
        return False
    src, at, k = pieces[0]
    return isinstance(src, FileRange) and src.crc is not None and at == 0 and k == src.length


def _check_all(sources) -> None:
    """Every source's CRC-32, one after another (on the checking thread: one task, not one each)."""
    for src in sources:
        src.check_crc()
