"""Whether a copied byte range now sits on the very disk blocks of its source (a reflink).

On filesystems that share blocks between files (XFS with reflink, the default since xfsprogs
5.1; btrfs), ``copy_file_range`` between page-congruent offsets shares the source's blocks
instead of copying them: a 2 GiB copy takes milliseconds and no disk space, which is what ``cp``
does there. Reading such a record back to check its CRC-32 then reads the output's blocks from
disk (its page cache is empty), and checks no copy: the blocks *are* the input's.

So the zip writer asks here, with the ``FS_IOC_FIEMAP`` ioctl (read-only, no sync), which bytes
of the output record map to the same physical blocks as the corresponding bytes of the input.
Those are the input's bytes by construction. The few bytes the kernel copied instead (the
record's first and last partial blocks, up to ``MAX_GAP``) are compared with the input's
directly. The writer then checks the record's CRC-32 on the input, usually still in the page
cache. Anything else -- an extent still delayed-allocated (ext4, any fresh copy), compressed,
inline, or a filesystem without FIEMAP -- answers False and the record is read back as before.
"""

from __future__ import annotations

import os
import struct

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, reserved64[2], flags, reserved[3]
_LAST = 0x1
# unknown location, delayed allocation, encoded (compressed), encrypted, not block-aligned,
# inline, tail-packed, unwritten (preallocated): not a plain block that two files can share
_NOT_PLAIN = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800
_BATCH = 256
MAX_GAP = 256 << 10  # bytes compared directly (a record's unshared head and tail)


def extents(fd: int, start: int, length: int) -> list[tuple[int, int, int]] | None:
    """(logical, physical, length) of the plain extents of ``fd`` over [start, start+length);
    None where the filesystem cannot say (no FIEMAP)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    out: list[tuple[int, int, int]] = []
    end = start + length
    while start < end:
        buf = bytearray(_HEAD.size + _BATCH * _EXTENT.size)
        _HEAD.pack_into(buf, 0, start, end - start, 0, 0, _BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError:
            return None
        mapped = _HEAD.unpack_from(buf, 0)[3]
        if not mapped:
            break  # a hole
        last, before = False, start
        for i in range(mapped):
            logical, physical, n, _r1, _r2, flags, *_ = _EXTENT.unpack_from(buf, _HEAD.size + i * _EXTENT.size)
            if not flags & _NOT_PLAIN and physical:
                out.append((logical, physical, n))
            start = max(start, logical + n)
            last = bool(flags & _LAST)
        if last or start <= before:  # the end, or an answer that does not move on
            break
    return out


def shared_spans(dst: list, src: list, dst_off: int, src_off: int, length: int) -> list[tuple[int, int]]:
    """The parts [a, b) of the output range [dst_off, dst_off+length) whose physical blocks are the
    ones under the corresponding input bytes (input offset = output offset - dst_off + src_off)."""
    spans = []
    shift = src_off - dst_off
    for dl, dp, dn in dst:
        lo, hi = max(dl, dst_off), min(dl + dn, dst_off + length)
        if lo >= hi:
            continue
        for sl, sp, sn in src:
            a, b = max(lo + shift, sl), min(hi + shift, sl + sn)  # in input offsets
            if a < b and dp + (a - shift - dl) == sp + (a - sl):
                spans.append((a - shift, b - shift))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def gaps(spans: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """[start, start+length) less the spans, as (offset, length) pieces."""
    out, pos = [], start
    for a, b in spans:
        if a > pos:
            out.append((pos, a - pos))
        pos = max(pos, b)
    if pos < start + length:
        out.append((pos, start + length - pos))
    return out


def same_bytes(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> bool:
    """True when the output bytes [dst_off, +length) are provably the input's [src_off, +length):
    shared blocks, and the rest (at most MAX_GAP bytes) compared directly. False whenever
    that cannot be shown cheaply: the caller then reads the record back."""
    if length <= 0:
        return False
    dst = extents(dst_fd, dst_off, length)
    if not dst:
        return False
    src = extents(src_fd, src_off, length)
    if not src:
        return False
    spans = shared_spans(dst, src, dst_off, src_off, length)
    rest = gaps(spans, dst_off, length)
    if not spans or sum(n for _, n in rest) > MAX_GAP:
        return False
    for at, n in rest:
        if os.pread(dst_fd, n, at) != os.pread(src_fd, n, at - dst_off + src_off):
            return False
    return True
