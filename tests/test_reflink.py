"""Records the filesystem shares with the input (reflink: XFS, btrfs) are not read back; the
input's bytes are checked against their CRC-32 instead.

The extent arithmetic is tested on its own everywhere; the end-to-end test needs a filesystem
that shares blocks: a directory named by CKPT_REFLINK_DIR, or (as root, with xfsprogs) a small
XFS image mounted on a loop device for the session. Without either it is skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile

import pytest
import torch

from ckptsurgeon.extents import MAX_GAP, extents, gaps, same_bytes, shared_spans


def test_shared_spans_follow_the_physical_mapping():
    # input bytes [4160, +20000) copied to output offset 8256 (congruent mod 4096): the kernel
    # copied the partial first and last blocks and shared the whole ones in between
    src = [(0, 10_000_000, 40960)]
    dst = [(8192, 77_000_000, 4096), (12288, 10_000_000 + 8192, 12288), (24576, 88_000_000, 4096)]
    spans = shared_spans(dst, src, 8256, 4160, 20000)
    assert spans == [(12288, 24576)]
    assert gaps(spans, 8256, 20000) == [(8256, 4032), (24576, 3680)]
    # the same blocks one block off: nothing shared
    assert shared_spans([(12288, 10_000_000 + 4096, 12288)], src, 8256, 4160, 20000) == []
    # the input in two extents, the output in one: both pieces found, merged
    src2 = [(0, 5_000_000, 16384), (16384, 9_000_000, 24576)]
    dst2 = [(12288, 5_000_000 + 8192, 8192), (20480, 9_000_000, 4096), (24576, 1, 4096)]
    assert shared_spans(dst2, src2, 8256, 4160, 20000) == [(12288, 24576)]
    assert gaps([], 10, 5) == [(10, 5)] and gaps([(10, 15)], 10, 5) == []


def test_a_plain_copy_is_not_taken_for_shared(tmp_path):
    """Equal bytes on other blocks (or a filesystem without FIEMAP, such as tmpfs) must be read
    back: same_bytes only answers True for the input's own blocks."""
    data = os.urandom(3 * MAX_GAP)
    (tmp_path / "a").write_bytes(data)
    shutil.copyfile(tmp_path / "a", tmp_path / "b")
    for name in ("a", "b"):
        with open(tmp_path / name, "rb+") as f:
            os.fsync(f.fileno())  # real extents, not delayed allocation
    src, dst = os.open(tmp_path / "a", os.O_RDONLY), os.open(tmp_path / "b", os.O_RDONLY)
    try:
        assert not same_bytes(src, 0, dst, 0, len(data))
        assert not same_bytes(src, 0, dst, 0, 4096)  # small enough to compare, but nothing shared
    finally:
        os.close(src)
        os.close(dst)


@pytest.fixture(scope="module")
def reflink_dir(tmp_path_factory):
    given = os.environ.get("CKPT_REFLINK_DIR")
    if given:
        yield _probed(given)
        return
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        pytest.skip("no reflink filesystem to test on: set CKPT_REFLINK_DIR, or run as root with xfsprogs "
                    "installed (an XFS image is then loop-mounted for the test)")
    base = tmp_path_factory.mktemp("xfs")
    img, mnt = base / "xfs.img", base / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(512 << 20)
    made = subprocess.run(["mkfs.xfs", "-q", "-f", str(img)], capture_output=True)
    mounted = made.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(img), str(mnt)],
                                                      capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("could not loop-mount an XFS image here (no loop devices or no permission)")
    try:
        yield _probed(str(mnt))
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # a mapping still open: detach


def _probed(d: str) -> str:
    """``d`` if copy_file_range there shares blocks (checked with the kernel's own answer, not
    with ckpt-surgeon's); skips the test otherwise."""
    a, b = os.path.join(d, "probe_a"), os.path.join(d, "probe_b")
    with open(a, "wb") as f:
        f.write(os.urandom(1 << 20))
        os.fsync(f.fileno())
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        done = 0
        while done < 1 << 20:
            done += os.copy_file_range(fa, fb, (1 << 20) - done, done, done)
        ea, eb = extents(fa, 0, 1 << 20), extents(fb, 0, 1 << 20)
    finally:
        os.close(fa)
        os.close(fb)
        os.unlink(a)
        os.unlink(b)
    if not ea or not eb or ea[0][1] != eb[0][1]:
        pytest.skip(f"{d}: copy_file_range does not share blocks there (not a reflink filesystem)")
    return d


def _record_offsets(path):
    import struct

    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            head = f.read(30)
            n, e = struct.unpack("<HH", head[26:30])
            out[info.filename.split("/", 1)[1]] = (info.header_offset + 30 + n + e, info.file_size)
    return out


def test_strip_prefix_shares_the_inputs_blocks(reflink_dir, cli):
    d = reflink_dir
    src = os.path.join(d, "in.pt")
    torch.manual_seed(0)
    sd = {f"module.layer{i}.weight": torch.randn(256, 1024 + i) for i in range(6)}
    sd["module.small"] = torch.arange(10.0)
    torch.save(sd, src)
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    out = os.path.join(d, "out.pt")
    code, stdout, err = cli("strip-prefix", src, "-o", out)
    assert code == 0 and "on the input's own disk blocks" in stdout, stdout + err
    back = torch.load(out, weights_only=True, mmap=True)
    assert sorted(back) == sorted(k[len("module."):] for k in sd)
    assert all(torch.equal(back[k[len("module."):]], v) for k, v in sd.items())
    del back  # its mapping would keep the test filesystem busy
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # the carried CRCs are the data's
    # every large record is on the input's own blocks
    a, b = _record_offsets(src), _record_offsets(out)
    fa, fb = os.open(src, os.O_RDONLY), os.open(out, os.O_RDONLY)
    try:
        big = [k for k, (_o, n) in a.items() if k.startswith("data/") and n > MAX_GAP]
        assert len(big) == 6
        for k in big:
            assert same_bytes(fa, a[k][0], fb, b[k][0], a[k][1]), k
            assert extents(fb, b[k][0], b[k][1])
    finally:
        os.close(fa)
        os.close(fb)


def test_a_damaged_input_is_refused_though_nothing_is_copied(reflink_dir, flip_byte, cli):
    """A shared record is not read back (no copy was made), but its CRC-32 is still checked by
    reading the input: bit rot in the input stops the write in one line, as on other
    filesystems, and leaves no output."""
    d = reflink_dir
    src = os.path.join(d, "rot.pt")
    sd = {"module.w": torch.randn(512, 1024), "module.b": torch.zeros(4)}
    torch.save(sd, src)
    offsets = _record_offsets(src)
    flip_byte(src, offsets["data/0"][0] + 100_000)
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    out = os.path.join(d, "rot_out.pt")
    code, stdout, err = cli("strip-prefix", src, "-o", out)
    assert code == 2 and "CRC-32 mismatch in storage data/0" in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out) and not [f for f in os.listdir(d) if f.endswith(".tmp")]
    sd.pop("module.w")
    torch.save(sd, src)  # the same file undamaged: written, its records shared
    code, stdout, err = cli("strip-prefix", src, "-o", out)
    assert code == 0 and torch.equal(torch.load(out, weights_only=True)["b"], torch.zeros(4)), err


def test_diff_of_tensors_on_the_same_blocks_reads_one_side(reflink_dir, cli, monkeypatch):
    """diff of an input and its reflinked output: pairs on the same disk blocks are equal
    without hashing either side; their CRC-32s are checked with one read of A. A pair that no
    longer shares its blocks (B rewritten) is hashed and found to differ, as anywhere else."""
    import ckptsurgeon.compare as compare

    d = reflink_dir
    src, out = os.path.join(d, "d_in.pt"), os.path.join(d, "d_out.pt")
    torch.manual_seed(0)
    sd = {f"module.layer{i}.weight": torch.randn(512, 1024) for i in range(4)}
    sd["module.small"] = torch.arange(10.0)
    torch.save(sd, src)
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    code, _, err = cli("strip-prefix", src, "-o", out)
    assert code == 0, err
    hashed = []
    real = compare.digest
    monkeypatch.setattr(compare, "digest", lambda v: hashed.append(v) or real(v))
    code, stdout, err = cli("diff", src, out)
    assert code == 0 and "identical" in stdout, stdout + err
    assert len(hashed) == 2  # the small pair only (A and B); the four large pairs by their blocks
    changed = dict(torch.load(out, weights_only=True))
    changed["layer2.weight"] = changed["layer2.weight"] + 1
    torch.save(changed, out)
    hashed.clear()
    code, stdout, err = cli("diff", src, out)
    assert code == 1 and "layer2.weight" in stdout, stdout + err


def test_extract_shares_the_inputs_blocks_though_records_move(reflink_dir, cli):
    """An extract leaves records out, so the kept ones move; padded to keep their offset within a
    page, their whole blocks can still be the input's own."""
    d = reflink_dir
    src, out = os.path.join(d, "in_x.pt"), os.path.join(d, "out_x.pt")
    torch.manual_seed(1)
    sd = {f"layer{i}.weight": torch.randn(256, 1100 + 3 * i) for i in range(6)}  # > 1 MiB, not page-sized
    torch.save(sd, src)
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    code, stdout, err = cli("extract", src, "--layers", "layer1,layer3,layer5", "-o", out)
    assert code == 0 and "on the input's own disk blocks" in stdout, stdout + err

    def offsets(path):  # tensor name -> (offset of its bytes, size), as torch finds them
        loaded = torch.load(path, map_location="meta", weights_only=True)
        return {k: (v.untyped_storage()._checkpoint_offset, v.untyped_storage().nbytes()) for k, v in loaded.items()}

    a, b = offsets(src), offsets(out)
    assert sorted(b) == ["layer1.weight", "layer3.weight", "layer5.weight"]
    back = torch.load(out, weights_only=True, mmap=True)
    assert all(torch.equal(v, sd[k]) for k, v in back.items())
    del back
    fa, fb = os.open(src, os.O_RDONLY), os.open(out, os.O_RDONLY)
    try:
        for k, (at, n) in b.items():
            assert (at - a[k][0]) % 4096 == 0, k
            assert same_bytes(fa, a[k][0], fb, at, n), k
    finally:
        os.close(fa)
        os.close(fb)
    os.unlink(src)
    os.unlink(out)
