"""Core: loading every format to CPU, lazily; writing atomically; wrapper detection; safety."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import OrderedDict

import pytest
import torch

import ckptsurgeon as cs
from ckptsurgeon.errors import (AmbiguousStateDictError, InputNotFoundError, NotACheckpointError, OutputError,
                                SelectionError, UnsafePickleError)
from ckptsurgeon.refs import TensorRef


def _equal_sd(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_import_and_help_do_not_import_torch():
    code = ("import sys, ckptsurgeon, ckptsurgeon.cli\n"
            "try:\n    ckptsurgeon.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "NO-TORCH", out.stdout + out.stderr
    assert "strip-prefix" in out.stdout  # plugin commands are listed


def test_inspect_and_strip_read_no_torch_on_zip(sample_dir, tmp_path):
    code = ("import sys, ckptsurgeon as cs\n"
            f"ck = cs.load({str(sample_dir / 'seednet_dp.pt')!r})\n"
            "new, rep = cs.strip_prefix(ck)\n"
            f"cs.save(new, {str(tmp_path / 'o.pt')!r})\n"
            f"cs.save(new, {str(tmp_path / 'o.safetensors')!r})\n"
            "from ckptsurgeon.summary import inspect\n"
            f"inspect({str(sample_dir / 'seednet_lightning.ckpt')!r})\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "NO-TORCH", out.stderr


def test_small_writes_make_no_checking_thread(tmp_path):
    """A file of small records is read and checked inline: writing it (torch zip or safetensors)
    neither starts the checking thread nor imports concurrent.futures and logging (~7 ms, a
    quarter of such a run); a large record does."""
    torch.save({"module.w": torch.randn(3, 4), "module.b": torch.randn(4)}, tmp_path / "small.pt")
    torch.save({"module.w": torch.randn(1 << 18)}, tmp_path / "large.pt")  # 1 MiB: kernel-copied
    code = ("import sys, ckptsurgeon as cs\n"
            "new, _ = cs.strip_prefix(cs.load(sys.argv[1]))\n"
            "cs.save(new, sys.argv[2] + '.pt'); cs.save(new, sys.argv[2] + '.safetensors')\n"
            "print('POOL' if 'concurrent.futures' in sys.modules else 'NO-POOL')")
    for name, want in (("small", "NO-POOL"), ("large", "POOL")):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{name}.pt"), str(tmp_path / f"o_{name}")],
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == want, (name, out.stdout, out.stderr)
        assert torch.equal(torch.load(tmp_path / f"o_{name}.pt", weights_only=True)["w"],
                           torch.load(tmp_path / f"{name}.pt", weights_only=True)["module.w"])


def test_zip_is_lazy_and_knows_shapes(sample_dir, seednet_sd):
    ck = cs.load(sample_dir / "seednet.pt")
    assert ck.source.format == "torch-zip" and ck.source.lazy
    v = ck.state["conv1.weight"]
    assert isinstance(v, TensorRef)
    assert v.shape == (16, 3, 3, 3) and v.dtype == "float32" and v.nbytes == 16 * 27 * 4
    assert ck.metadata is not None and "bn1" in ck.metadata


@pytest.mark.parametrize("name,where", [
    ("seednet.pt", ()), ("seednet_dp.pt", ()), ("seednet_resume.pt", ("model_state_dict",)),
    ("seednet_lightning.ckpt", ("state_dict",)), ("seednet_legacy.pt", ()), ("seednet.safetensors", ()),
    ("seednet_compiled.pt", ()), ("seednet_hf", ()), ("seednet_hf/model.safetensors.index.json", ()),
])
def test_every_sample_loads_with_same_tensors(sample_dir, name, where):
    ref = torch.load(sample_dir / "seednet.pt", weights_only=True)
    ck = cs.load(sample_dir / name)
    assert ck.sd_path == where
    sd = ck.torch_state_dict()
    strip = next((p for p in ("module.", "_orig_mod.", "model.") if all(k.startswith(p) for k in sd)), "")
    got = OrderedDict((k[len(strip):], v) for k, v in sd.items())
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_gpu_saved_file_loads_on_cpu(tmp_path):
    """A file whose storages say 'cuda:0' (as a GPU save writes) loads to CPU; bare torch.load does not."""
    def tagger(obj):
        return "cuda:0"

    torch.serialization.register_package(0, tagger, lambda obj, loc: None)
    try:
        torch.save({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "gpu.pt")
        torch.save({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "gpu_legacy.pt",
                   _use_new_zipfile_serialization=False)
    finally:
        torch.serialization._package_registry[:] = [
            e for e in torch.serialization._package_registry if e[1] is not tagger]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.load(tmp_path / "gpu.pt", weights_only=True)
    ck = cs.load(tmp_path / "gpu.pt")
    assert torch.equal(ck.state["w"].to_torch(), torch.arange(6.0).reshape(2, 3))
    cs.save(ck, tmp_path / "cpu.pt")
    assert torch.equal(torch.load(tmp_path / "cpu.pt", weights_only=True)["w"], torch.arange(6.0).reshape(2, 3))
    # pre-1.6 GPU saves also name the storage class torch.cuda.FloatStorage: same bytes, still lazy
    raw = (tmp_path / "gpu_legacy.pt").read_bytes()
    assert b"ctorch\nFloatStorage\n" in raw
    (tmp_path / "gpu_legacy.pt").write_bytes(raw.replace(b"ctorch\nFloatStorage\n", b"ctorch.cuda\nFloatStorage\n"))
    ck = cs.load(tmp_path / "gpu_legacy.pt")
    assert ck.source.lazy and torch.equal(ck.state["w"].to_torch(), torch.arange(6.0).reshape(2, 3))


def _odd_state():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    p = torch.nn.Parameter(torch.randn(3, 3))
    sd = OrderedDict([
        ("bf16", torch.randn(5, 3).to(torch.bfloat16)), ("fp16", torch.randn(4).half()),
        ("i8", torch.randint(-5, 5, (7,), dtype=torch.int8)), ("flag", torch.tensor([True, False])),
        ("scalar", torch.tensor(3.5)), ("empty", torch.zeros(0, 4)), ("param", p),
        ("view_row", base[2]), ("view_t", base.t()), ("base", base),
        ("tied_a", torch.ones(2, 2)), ("i64", torch.tensor([1, 2, 3])),
        ("f8", torch.randn(6).to(torch.float8_e4m3fn)), ("u16", torch.arange(5, dtype=torch.int32).to(torch.uint16)),
    ])
    sd["tied_b"] = sd["tied_a"]
    sd._metadata = OrderedDict([("", {"version": 1})])
    return sd


def _torch_load(path, mmap: bool, calculate_storage_offsets: bool):
    """torch.load(weights_only=True) with torch's offset-arithmetic shortcut switched as asked."""
    from torch.utils.serialization import config

    saved = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = calculate_storage_offsets
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    finally:
        config.load.calculate_storage_offsets = saved


def test_torch_roundtrip_odd_tensors_mmap_and_offsets(tmp_path, monkeypatch):
    sd = _odd_state()
    torch.save({"model": sd, "epoch": 4, "note": "x", "opt": {"state": {0: {"m": sd["base"] * 2}}}}, tmp_path / "a.pt")
    ck = cs.load(tmp_path / "a.pt")
    assert ck.sd_path == ("model",)
    new, _ = cs.rename(ck, [("^base$", "renamed_base")])
    cs.save(new, tmp_path / "b.pt")
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")  # torch asserts its offset arithmetic holds
    for mmap, offsets in ((False, False), (True, False), (True, True)):
        out = _torch_load(tmp_path / "b.pt", mmap=mmap, calculate_storage_offsets=offsets)
        got = out["model"]
        assert out["epoch"] == 4 and out["note"] == "x"
        assert torch.equal(out["opt"]["state"][0]["m"], sd["base"] * 2)
        assert got._metadata == sd._metadata
        for k, v in sd.items():
            k2 = "renamed_base" if k == "base" else k
            assert got[k2].dtype == v.dtype and got[k2].shape == v.shape, k
            assert torch.equal(got[k2].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else got[k2],
                               v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v), k
        assert isinstance(got["param"], torch.nn.Parameter)
        # tied tensors and views still share storage
        assert got["tied_a"].data_ptr() == got["tied_b"].data_ptr()
        assert got["view_row"].untyped_storage().data_ptr() == got["renamed_base"].untyped_storage().data_ptr()


def test_repickled_data_pkl_is_byte_identical_to_torch_save(tmp_path):
    """The writer reproduces torch.save's pickle exactly (globals, memo, storage keys), and the
    temporary names it registers to let the C pickler emit torch's globals are gone after."""
    import zipfile

    import ckptsurgeon.refs as refs
    from ckptsurgeon.pickle_write import dump_refs

    sd = _odd_state()
    objs = {
        "plain": sd,
        "resume": {"model": sd, "epoch": 3, "best": 0.5, "dtype": torch.float16, "size": torch.Size([2, 3]),
                   "device": torch.device("cpu"), "tags": {"a", "b"}, "blob": b"\x00\xff", "none": None,
                   "opt": {"state": {0: {"step": torch.tensor(7.0), "m": sd["base"] * 2}}, "param_groups": [
                       {"lr": 0.1, "params": [0]}]}},
        "params": {"w": torch.nn.Parameter(torch.ones(2, 2)), "b": torch.nn.Parameter(torch.zeros(2), requires_grad=False)},
    }
    for name, obj in objs.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with zipfile.ZipFile(tmp_path / f"{name}.pt") as z:
            original = z.read(f"{name}/data.pkl")
            records = sum(1 for n in z.namelist() if "/data/" in n)
        data, storages = dump_refs(cs.load(tmp_path / f"{name}.pt").assemble())
        assert data == original, name
        assert len(storages) == records
    assert not [k for k in vars(refs) if k.startswith("_G")]


def test_sets_are_written_back_in_their_pickled_order(tmp_path):
    """A set made again from its items can iterate in another order when two hashes collide
    ({"a", "b"} under PYTHONHASHSEED=24): the pickled order is kept, so the bytes are too."""
    script = """
import sys, zipfile, torch, ckptsurgeon as cs
from ckptsurgeon.pickle_write import dump_refs
assert list({"a", "b"}) != list(set(list({"a", "b"})))  # the collision this seed gives
path = sys.argv[1]
torch.save({"state_dict": {"w": torch.ones(2)}, "tags": {"a", "b"}, "frozen": frozenset({"a", "b"})}, path)
with zipfile.ZipFile(path) as z:
    original = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
ck = cs.load(path)
assert dump_refs(ck.assemble())[0] == original
ck.wrapper["tags"].add("c")  # changed: written as the set it now is
tags = ck.wrapper["tags"]
assert set(tags.__reduce_ex__(2)[1][0]) == {"a", "b", "c"}
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.pt")], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONHASHSEED="24"))
    assert out.stdout.strip() == "ok", out.stderr


def test_safetensors_output_ties_views_and_notes(tmp_path):
    sd = _odd_state()
    sd.pop("f8")
    torch.save(sd, tmp_path / "a.pt")
    ck = cs.load(tmp_path / "a.pt")
    rep = cs.save(ck, tmp_path / "a.safetensors")
    assert ["tied_b", "tied_a"] in rep["tied"]
    assert any("tied" in n for n in rep["notes"]) and any("_metadata" in n for n in rep["notes"])
    from safetensors.torch import load_file

    got = load_file(tmp_path / "a.safetensors")
    for k, v in sd.items():
        assert torch.equal(got[k], v.detach()), k
    rep2 = cs.save(ck, tmp_path / "d.safetensors", dedupe_tied=True)
    assert "tied_b" not in load_file(tmp_path / "d.safetensors")
    assert rep2["tensors"] == len(sd) - 1


def test_safetensors_to_torch_and_back(sample_dir, tmp_path):
    ck = cs.load(sample_dir / "seednet.safetensors")
    cs.save(ck, tmp_path / "x.pt")
    _equal_sd(OrderedDict(sorted(torch.load(tmp_path / "x.pt", weights_only=True).items())),
              OrderedDict(sorted(torch.load(sample_dir / "seednet.pt", weights_only=True).items())))
    cs.save(cs.load(tmp_path / "x.pt"), tmp_path / "y.safetensors")
    assert (tmp_path / "y.safetensors").read_bytes()[8:] != b""
    from safetensors.torch import load_file

    _equal_sd(OrderedDict(sorted(load_file(tmp_path / "y.safetensors").items())),
              OrderedDict(sorted(load_file(sample_dir / "seednet.safetensors").items())))


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="torch without MX dtypes")
def test_mx_dtypes_in_safetensors(tmp_path, cli):
    """F8_E8M0 and F4 (MX block scales and FP4 weights) as safetensors writes them: F4's shape
    counts 4-bit values, torch's float4_e2m1fn_x2 counts bytes (pairs)."""
    import struct

    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randint(0, 256, (3, 4), dtype=torch.uint8, generator=g).view(torch.float4_e2m1fn_x2),
         "scale": torch.tensor([0.25, 1.0, 8.0, 2.0 ** 20]).to(torch.float8_e8m0fnu)}
    save_file(a, tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert header["w"]["dtype"] == "F4" and header["w"]["shape"] == [3, 8]  # what we must read
    ck = cs.load(tmp_path / "a.safetensors")
    assert ck.state["w"].shape == (3, 4) and ck.state["w"].dtype == "float4_e2m1fn_x2"
    cs.save(ck, tmp_path / "b.pt")
    cs.save(cs.load(tmp_path / "b.pt"), tmp_path / "c.safetensors")
    for got in (torch.load(tmp_path / "b.pt", weights_only=True), load_file(tmp_path / "c.safetensors")):
        for k, v in a.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape
            assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k

    # diff decodes both without torch: E8M0 is 2^(code-127), FP4 two E2M1 values per byte
    b = {"w": a["w"].view(torch.uint8).clone(), "scale": a["scale"].view(torch.uint8).clone()}
    b["w"][0, 0] = 0x7F  # low nibble 0xF = -6.0, high nibble 0x7 = 6.0
    b["scale"][1] += 1  # 1.0 -> 2.0
    save_file({"w": b["w"].view(torch.float4_e2m1fn_x2), "scale": b["scale"].view(torch.float8_e8m0fnu)},
              tmp_path / "b.safetensors")
    rep = cs.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    changed = {c["name"]: c for c in rep["changed"]}
    assert changed["scale"]["max_abs"] == 1.0 and changed["scale"]["n_diff"] == 1
    lut = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    lut += [-x for x in lut]
    old = int(a["w"].view(torch.uint8)[0, 0])
    want = max(abs(lut[old & 15] - (-6.0)), abs(lut[old >> 4] - 6.0))
    assert changed["w"]["max_abs"] == want and changed["w"]["numel"] == 24

    # F6 (no torch dtype) and an F4 shape torch cannot hold: one clear line, not "corrupt"
    for name, dtype, shape in (("f6", "F6_E2M3", [4]), ("odd", "F4", [2, 3])):
        h = json.dumps({"x": {"dtype": dtype, "shape": shape, "data_offsets": [0, 3]}}).encode()
        h += b" " * (-len(h) % 8)
        (tmp_path / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"abc")
        code, _out, err = cli("inspect", tmp_path / f"{name}.safetensors")
        assert code == 2 and "torch" in err and "corrupt" not in err.lower() and "Traceback" not in err
        assert cli("scan", tmp_path / f"{name}.safetensors")[0] == 0  # a valid file: no pickle, nothing to run

def test_zip_crcs_are_right_whether_copied_or_computed(sample_dir, tmp_path):
    """Records copied from a zip keep their CRC (checked on the way); records copied from a
    safetensors file get theirs computed on a second thread and patched into the descriptor."""
    import zipfile

    from ckptsurgeon.byteranges import crc32

    from safetensors.torch import save_file

    # small records are read and written inline, big ones (> 64 KiB) copied by the kernel
    mixed = {"big": torch.randn(300, 300), "small": torch.randn(10), "big2": torch.arange(70_000.0)}
    save_file(mixed, tmp_path / "mixed.safetensors")
    torch.save(mixed, tmp_path / "mixed.pt")
    for src in ("seednet.safetensors", "seednet_dp.pt", tmp_path / "mixed.safetensors", tmp_path / "mixed.pt"):
        out = tmp_path / f"{os.path.basename(src)}.out.pt"
        cs.save(cs.load(sample_dir / src), out)  # (an absolute src ignores sample_dir)
        with zipfile.ZipFile(out) as zf:
            assert zf.testzip() is None  # every CRC-32 (central directory) matches the bytes
            for info in zf.infolist():
                assert crc32(zf.read(info)) == info.CRC
        torch.load(out, weights_only=True, mmap=True)
    import zlib

    data = os.urandom(100_000)
    assert crc32(data) == zlib.crc32(data) and crc32(data[50:], crc32(data[:50])) == zlib.crc32(data)


def test_copy_range_is_exact_and_starts_kernel_copies_on_64k_boundaries(tmp_path, monkeypatch):
    """copy_range splits off the head up to the next 64 KiB destination boundary (calls starting
    elsewhere measured ~30% slower on ext4); the bytes land exactly, whatever the offsets."""
    import ckptsurgeon.kernelcopy as zf

    data = os.urandom(600_000)
    (tmp_path / "src").write_bytes(data)
    calls = []
    real = os.copy_file_range

    def spy(src, dst, n, off_src, off_dst):
        calls.append((off_dst, n))
        return real(src, dst, n, off_src, off_dst)

    monkeypatch.setattr(zf.os, "copy_file_range", spy)
    for off, length, dst_off in ((0, 600_000, 0), (123, 300_000, 4096 + 64), (1, 10, 65_530), (7, 70_000, 65_536)):
        out = tmp_path / "dst"
        out.write_bytes(b"")
        calls.clear()
        src_fd, dst_fd = os.open(tmp_path / "src", os.O_RDONLY), os.open(out, os.O_RDWR)
        try:
            zf.copy_range(src_fd, dst_fd, off, length, dst_off)
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        assert out.read_bytes()[dst_off:] == data[off:off + length]
        assert all(o % (64 << 10) == 0 for o, _ in calls[1:]), calls
        assert sum(n for _, n in calls) == length


def test_early_writeback_only_when_fsyncing(tmp_path, monkeypatch):
    """With fsync on (the default) finished copies are handed to the disk early (fadvise
    DONTNEED on dirty pages); with CKPT_SURGEON_FSYNC=0 nothing is. Output is the same."""
    import ckptsurgeon.zipwrite as zf
    from safetensors.torch import load_file

    sd = OrderedDict((f"module.w{i}", torch.randn(200, 200)) for i in range(4))  # 160 KiB: kernel-copied
    torch.save(sd, tmp_path / "a.pt")
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(zf.os, "posix_fadvise", lambda fd, off, n, advice: (calls.append((off, n)), real(fd, off, n, advice))[1])
    for fsync in ("1", "0"):
        monkeypatch.setenv("CKPT_SURGEON_FSYNC", fsync)
        calls.clear()
        new, _ = cs.strip_prefix(cs.load(tmp_path / "a.pt"))
        cs.save(new, tmp_path / f"b{fsync}.pt")
        cs.save(new, tmp_path / f"b{fsync}.safetensors")
        assert bool(calls) == (fsync == "1")
        got = torch.load(tmp_path / f"b{fsync}.pt", weights_only=True)
        got_st = load_file(tmp_path / f"b{fsync}.safetensors")
        for k, v in sd.items():
            assert torch.equal(got[k[len("module."):]], v) and torch.equal(got_st[k[len("module."):]], v)
    # safetensors -> safetensors crossing a 64 MiB write-back piece boundary, fsync on
    from safetensors.torch import save_file

    monkeypatch.setenv("CKPT_SURGEON_FSYNC", "1")
    big = {"a.x": torch.arange(17_000_000, dtype=torch.float32), "a.y": torch.ones(3)}  # 68 MB
    save_file(big, tmp_path / "big.safetensors")
    cs.save(cs.rename(cs.load(tmp_path / "big.safetensors"), [("^a\\.", "b.")])[0], tmp_path / "big2.safetensors")
    got = load_file(tmp_path / "big2.safetensors")
    assert torch.equal(got["b.x"], big["a.x"]) and torch.equal(got["b.y"], big["a.y"])


def test_copied_data_keeps_its_offset_within_a_page(sample_dir, tmp_path):
    """strip-prefix output: every tensor's bytes sit at the same offset modulo 4096 as in the
    source (fast whole-page kernel copies), with torch's minimal padding after data/0 intact."""
    import struct

    from ckptsurgeon.zipfmt import TorchZip

    new, _ = cs.strip_prefix(cs.load(sample_dir / "seednet_dp.pt"))
    cs.save(new, tmp_path / "o.pt")
    a, b = TorchZip(str(sample_dir / "seednet_dp.pt")), TorchZip(str(tmp_path / "o.pt"))
    for name, info in a.infos.items():
        if name.startswith("data/"):
            assert (a.data_offset(info) - b.data_offset(b.infos[name])) % 4096 == 0, name
    got = _torch_load(tmp_path / "o.pt", mmap=True, calculate_storage_offsets=True)
    # map_location: on a GPU machine nn.DataParallel put the sample's weights on cuda:0 before saving
    ref = torch.load(sample_dir / "seednet_dp.pt", weights_only=True, map_location="cpu")
    assert all(torch.equal(ref["module." + k], v) for k, v in got.items())

    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in ref.items()}, tmp_path / "dp.safetensors")
    new, _ = cs.strip_prefix(cs.load(tmp_path / "dp.safetensors"))
    cs.save(new, tmp_path / "o.safetensors")
    heads = [8 + struct.unpack("<Q", open(p, "rb").read(8))[0]
             for p in (tmp_path / "dp.safetensors", tmp_path / "o.safetensors")]
    assert heads[0] % 4096 == heads[1] % 4096
    _equal_sd(OrderedDict(sorted(load_file(tmp_path / "o.safetensors").items())),
              OrderedDict(sorted((k[len("module."):], v) for k, v in ref.items())))


def test_extract_keeps_large_records_on_their_input_page_offsets(tmp_path, monkeypatch):
    """Records left out shift the rest: each large kept record is padded to keep its input's
    offset within a page (whole-page kernel copies), and .format_version -- torch's promise of
    minimal padding -- is left out, so torch's offset arithmetic (calculate_storage_offsets, the
    meta device) reads headers instead of computing wrong offsets. Where nothing moves (the
    first layers kept), the layout stays torch's own, .format_version included."""
    from ckptsurgeon.zipfmt import TorchZip

    g = torch.Generator().manual_seed(3)
    sd = OrderedDict((f"layer{i}.w{j}", torch.randn(300, 1001 + i + j, generator=g))  # ~1.2 MB, not page-sized
                     for i in range(4) for j in range(2))
    sd["layer0.tiny"] = torch.arange(5.0)
    torch.save(sd, tmp_path / "a.pt")
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")  # torch asserts its offset arithmetic holds

    def offsets(path):  # tensor name -> offset of its bytes, as torch places them on the meta device
        loaded = torch.load(path, map_location="meta", weights_only=True)
        return {k: v.untyped_storage()._checkpoint_offset for k, v in loaded.items()}

    before = offsets(tmp_path / "a.pt")
    for layers, moves in ((["layer1", "layer3"], True), (["layer0", "layer1"], False)):
        new, _ = cs.extract(cs.load(tmp_path / "a.pt"), layers)
        out = tmp_path / f"{'-'.join(layers)}.pt"
        cs.save(new, out)
        names = zipfile.ZipFile(out).namelist()
        assert any(n.endswith("/.format_version") for n in names) is not moves
        after = offsets(out)
        z = TorchZip(str(out))
        real = [z.data_offset(info) for n, info in z.infos.items() if n.startswith("data/")]
        assert sorted(after.values()) == sorted(real)  # the meta device's offsets are the real ones
        kept = [k for k in sd if k.split(".")[0] in layers and k != "layer0.tiny"]
        assert set(after) >= set(kept)
        for k in kept:
            assert (after[k] - before[k]) % 4096 == 0, k
        for mmap, calc in ((False, False), (True, False), (True, True)):
            got = _torch_load(out, mmap=mmap, calculate_storage_offsets=calc)
            assert set(got) == {k for k in sd if k.split(".")[0] in layers}
            assert all(torch.equal(v, sd[k]) for k, v in got.items())


def test_sharded_output_streams_shards(sample_dir, tmp_path):
    ck = cs.load(sample_dir / "seednet.pt")
    rep = cs.save(ck, tmp_path / "hf", max_shard_size="40KB")
    assert len(rep["shards"]) > 1
    back = cs.load(tmp_path / "hf")
    assert back.source.format == "hf-folder"
    _equal_sd(back.torch_state_dict(), OrderedDict((k, v) for k, v in torch.load(sample_dir / "seednet.pt", weights_only=True).items()))


def test_wrapper_detection_and_key(tmp_path):
    sd = OrderedDict(w=torch.ones(2))
    torch.save({"state_dict": sd, "state_dict_ema": OrderedDict(w=torch.zeros(2)), "epoch": 1}, tmp_path / "ema.pt")
    ck = cs.load(tmp_path / "ema.pt")
    assert ck.sd_path == ("state_dict",) and set(ck.candidates) == {"state_dict", "state_dict_ema"}
    assert torch.equal(cs.load(tmp_path / "ema.pt", key="state_dict_ema").state["w"].to_torch(), torch.zeros(2))
    torch.save({"generator": sd, "discriminator": OrderedDict(v=torch.ones(1))}, tmp_path / "gan.pt")
    with pytest.raises(AmbiguousStateDictError) as e:
        cs.load(tmp_path / "gan.pt")
    assert "generator" in str(e.value) and "discriminator" in str(e.value)
    assert list(cs.load(tmp_path / "gan.pt", key="discriminator").state) == ["v"]
    with pytest.raises(SelectionError):
        cs.load(tmp_path / "gan.pt", key="nothere")
    # names with '/' or '.' in them: the whole name is a key before it is a path
    torch.save({"gen/ema": OrderedDict(g=torch.ones(3)), "gen": {"ema": OrderedDict(n=torch.ones(2))},
                "disc.x": OrderedDict(d=torch.ones(1))}, tmp_path / "odd.pt")
    assert list(cs.load(tmp_path / "odd.pt", key="gen/ema").state) == ["g"]
    assert list(cs.load(tmp_path / "odd.pt", key="gen.ema").state) == ["n"]
    assert list(cs.load(tmp_path / "odd.pt", key="disc.x").state) == ["d"]
    sizes = {c["at"]: c["tensors"] for c in cs.inspect(tmp_path / "odd.pt")["candidate_sizes"]}
    assert sizes == {"gen/ema": 1, "gen": 1, "disc.x": 1}, sizes  # the one named with "/" counted too



def _library_layouts():
    """(name, what the library's script saves, where the model's state dict is; None: ambiguous)."""
    import argparse

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    sd = m.state_dict()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    osd = opt.state_dict()
    sched = torch.optim.lr_scheduler.StepLR(opt, 3).state_dict()
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    ns = argparse.Namespace(lr=0.1)

    def pre(p, d):
        return OrderedDict((p + k, v) for k, v in d.items())

    return [
        ("torchvision references", {"model": sd, "optimizer": osd, "lr_scheduler": sched, "epoch": 3, "args": ns,
                                    "scaler": scaler, "model_ema": pre("module.", sd)}, ("model",)),
        ("timm train.py", {"epoch": 3, "arch": "x", "state_dict": sd, "optimizer": osd, "version": 2, "args": ns,
                           "metric": 0.5, "state_dict_ema": sd}, ("state_dict",)),
        ("Lightning", {"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.4.0",
                       "state_dict": pre("model.", sd), "loops": {"fit_loop": {"state_dict": {}}},
                       "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_k_models": {"/a/e0.ckpt": torch.tensor(0.5)}}},
                       "optimizer_states": [osd], "lr_schedulers": [sched], "hyper_parameters": {"lr": 0.1}}, ("state_dict",)),
        ("mmengine", {"meta": {"epoch": 3, "dataset_meta": {"classes": ("a", "b")}}, "state_dict": sd,
                      "optimizer": osd, "param_schedulers": [sched]}, ("state_dict",)),
        ("detectron2", {"model": sd, "optimizer": osd, "scheduler": sched, "iteration": 99}, ("model",)),
        ("fairseq", {"args": None, "model": sd, "optimizer_history": [{"num_updates": 5}],
                     "extra_state": {"epoch": 2}, "last_optimizer_state": osd}, ("model",)),
        ("DeepSpeed model states", {"module": sd, "buffer_names": ["1.running_mean"], "optimizer": None,
                                    "param_shapes": [OrderedDict((k, v.shape) for k, v in sd.items())],
                                    "global_steps": 10, "dp_world_size": 1, "ds_version": "0.14"}, ("module",)),
        ("Megatron", {"args": ns, "iteration": 10, "model": {"language_model": {
            "embedding": {"word_embeddings": {"weight": torch.randn(8, 4)}},
            "encoder": {"layers.0.w": torch.randn(4, 4), "final_layernorm.weight": torch.ones(4)}}},
            "rng_state": [{"torch_rng_state": torch.get_rng_state()}]}, ("model",)),
        ("nanoGPT", {"model": pre("_orig_mod.", sd), "optimizer": osd, "model_args": {"n_layer": 2}, "iter_num": 5,
                     "best_val_loss": torch.tensor(1.5), "config": {"lr": 1e-3}}, ("model",)),
        ("Whisper", {"dims": {"n_mels": 80}, "model_state_dict": sd}, ("model_state_dict",)),
        ("a resume file with RNG tensors", {"model_state_dict": sd, "optimizer_state_dict": osd, "epoch": 3,
                                            "rng_state": torch.get_rng_state(), "cuda_rng_state": [torch.get_rng_state()]},
         ("model_state_dict",)),
        ("a model and a step tensor", {"model": sd, "step": torch.tensor(7)}, ("model",)),
        ("a script's own names", {"my_net": sd, "optim": osd, "epoch": 1}, ("my_net",)),
        ("ema_pytorch", {"ema": pre("ema_model.", sd) | {"initted": torch.tensor(True)}, "model": sd}, ("model",)),
        ("SAC", {"actor": sd, "critic": sd, "log_alpha": torch.zeros(1)}, None),
        ("DINO", {"student": pre("module.", sd), "teacher": sd, "optimizer": osd, "epoch": 3}, None),
        ("a bare state dict with an epoch", dict(sd, epoch=3), ()),
    ]


@pytest.mark.parametrize("name,saved,where", _library_layouts(), ids=[c[0] for c in _library_layouts()])
def test_state_dict_located_in_library_layouts(name, saved, where, tmp_path):
    """What training libraries' scripts save, key for key: the model's state dict is found where
    they put it, or the file is called ambiguous (two models side by side) -- never an
    optimizer's per-parameter state, an RNG tensor or a one-tensor view of a wrapper."""
    torch.save(saved, tmp_path / "c.pt")
    if where is None:
        with pytest.raises(AmbiguousStateDictError) as e:
            cs.load(tmp_path / "c.pt")
        assert "state/" not in str(e.value)  # the models are named, not the optimizer's states
    else:
        ck = cs.load(tmp_path / "c.pt")
        assert ck.sd_path == where
        assert len(list(ck.tensor_items())) >= 3


def test_a_wrapper_with_as_many_own_tensors_as_other_entries(tmp_path, cli):
    """{"state_dict": sd, "rng_state": torch.get_rng_state()}: half its values are tensors, so it
    passed for a state dict holding one uint8 tensor (and the model's weights as a non-tensor
    entry). A state dict under a name training scripts give one makes it a wrapper; a plain
    state dict with a few other values stays one."""
    sd = OrderedDict([("module.conv.weight", torch.randn(2, 3)), ("module.conv.bias", torch.randn(2))])
    for extra in ({"rng_state": torch.get_rng_state()}, {"mask": torch.ones(3, dtype=torch.bool)},
                  {"rng_state": torch.get_rng_state(), "model_ema": sd}):
        for name in ("state_dict", "model", "model_state_dict"):
            path = tmp_path / f"{name}.pt"
            torch.save({name: sd, **extra}, path)
            ck = cs.load(path)
            assert ck.sd_path == (name,) and list(ck.state) == list(sd), (name, extra)
            code, _, err = cli("strip-prefix", path, "-o", tmp_path / "s.pt")
            assert code == 0, err
            back = torch.load(tmp_path / "s.pt", weights_only=True)
            assert list(back[name]) == ["conv.weight", "conv.bias"] and torch.equal(back[name]["conv.bias"], sd["module.conv.bias"])
            assert all(torch.equal(back[k], v) for k, v in extra.items() if torch.is_tensor(v))
    t = torch.ones(2)
    layouts = [  # (saved, where the state dict is)
        ({"a.weight": t, "epoch": 3}, ()),  # a state dict with a few other values stays one
        ({"checkpoint": {"state_dict": sd, "rng": t}, "epoch": 1}, ("checkpoint", "state_dict")),  # one level down
        ({"state": {"model": sd, "optimizer": {}}, "rng": t}, ("state", "model")),  # two levels down
        ({"generator": sd, "step": torch.tensor(5)}, ("generator",)),  # more tensors below than its own
        ({"w1": t, "w2": t, "w3": t, "aux": {"x": t}}, ()),  # fewer below than its own
        ({"weight": t, "_extra_state": {"a": t, "b": t}}, ()),  # a module's extra state is part of it
    ]
    for saved, where in layouts:
        torch.save(saved, tmp_path / "x.pt")
        assert cs.load(tmp_path / "x.pt").sd_path == where, saved

def test_optimizer_states_beside_a_model_are_not_candidates(tmp_path, cli):
    """An optimizer's per-parameter states (exp_avg, exp_avg_sq by name) look like state dicts:
    beside a model's state dict under a name of the script's own they made the file ambiguous
    ("my_net, optim/state/0, optim/state/1"). The model's is chosen; two models still need --key,
    named without the optimizer's states; an optimizer alone is still described as one."""
    m = torch.nn.Linear(3, 3)
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    torch.save({"my_net": m.state_dict(), "optim": opt.state_dict(), "epoch": 1}, tmp_path / "custom.pt")
    ck = cs.load(tmp_path / "custom.pt")
    assert ck.sd_path == ("my_net",) and list(ck.state) == ["weight", "bias"]
    assert "optim/state/0" in ck.candidates  # still there for --key
    assert cs.load(tmp_path / "custom.pt", key="optim/state/0").sd_path == ("optim", "state", 0)
    torch.save({"student": m.state_dict(), "teacher": m.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "dino.pt")
    code, _, err = cli("strip-prefix", tmp_path / "dino.pt", "-o", tmp_path / "x.pt")
    assert code == 2 and "several state dicts in the checkpoint: student, teacher (" in err, err
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    code, out, err = cli("inspect", tmp_path / "opt.pt")
    assert "an optimizer's state dict" in out + err, out + err


def test_state_dict_inside_a_top_level_tuple_or_list(tmp_path, cli):
    """torch.save((model.state_dict(), extra)) and torch.save([sd]): found, written back as the
    same tuple/list, the rest compared by diff."""
    net = torch.nn.Linear(3, 2)
    torch.save((net.state_dict(), {"epoch": 1}), tmp_path / "t.pt")
    torch.save([net.state_dict()], tmp_path / "l.pt")
    ck = cs.load(tmp_path / "t.pt")
    assert ck.sd_path == (0,) and list(ck.state) == ["weight", "bias"]
    code, _, err = cli("add-prefix", tmp_path / "t.pt", "--prefix", "module.", "-o", tmp_path / "t2.pt")
    assert code == 0, err
    back = torch.load(tmp_path / "t2.pt", weights_only=True)
    assert type(back) is tuple and list(back[0]) == ["module.weight", "module.bias"] and back[1] == {"epoch": 1}
    assert cs.load(tmp_path / "l.pt").sd_path == (0,)
    torch.save((net.state_dict(), {"epoch": 2}), tmp_path / "t3.pt")
    rep = cs.diff(tmp_path / "t.pt", tmp_path / "t3.pt")
    assert rep["equal"] == 2 and rep["metadata"] and rep["differences"]


def _megatron_like():
    """Megatron-LM's legacy layout: the model's state dict nested by module, beside args/iteration."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    model = {"language_model": {"embedding": {"word_embeddings": {"weight": t(8, 4)},
                                              "position_embeddings": {"weight": t(6, 4)}},
                                "encoder": OrderedDict([("layers.0.attention.dense.weight", t(4, 4)),
                                                        ("layers.0.mlp.dense_h_to_4h.weight", t(16, 4)),
                                                        ("final_layernorm.weight", t(4))])},
             "word_embeddings_for_head": {"weight": t(8, 4)}}
    return {"model": model, "iteration": 100, "checkpoint_version": 3.0}


def test_state_dict_with_a_module_saved_as_a_mapping(tmp_path, cli):
    """A flat state dict with one module's weights saved as a mapping of their own ({"encoder.w":
    ..., "decoder": {"w": ...}}): the mapping's tensors are the state dict's too ("decoder.w"), for
    inspect, extract and the prefix surgeries, and torch outputs nest them again. A mapping of
    other things (a config) or one whose joined names would clash stays an opaque value."""
    sd = {"encoder.w": torch.ones(2), "encoder.b": torch.ones(2), "head.w": torch.ones(2),
          "decoder": {"w": torch.zeros(2), "b": torch.zeros(2), "c": torch.full((2,), 3.0)}}
    torch.save(sd, tmp_path / "m.pt")
    ck = cs.load(tmp_path / "m.pt")
    assert ck.sd_path == () and list(ck.state) == ["encoder.w", "encoder.b", "head.w", "decoder.w", "decoder.b", "decoder.c"]
    code, out, err = cli("inspect", tmp_path / "m.pt")
    assert code == 0 and "tensors: 6" in out and "non-tensor" not in out, out + err
    new, rep = cs.extract(ck, ["decoder"])
    cs.save(new, tmp_path / "dec.pt")
    got = torch.load(tmp_path / "dec.pt", weights_only=True)
    assert list(got) == ["decoder"] and torch.equal(got["decoder"]["c"], sd["decoder"]["c"])
    # a rename moves the mapping with its names
    new, _ = cs.rename(ck, [(r"^decoder\.", "head2.")])
    cs.save(new, tmp_path / "ren.pt")
    ren = torch.load(tmp_path / "ren.pt", weights_only=True)
    assert list(ren) == ["encoder.w", "encoder.b", "head.w", "head2"] and torch.equal(ren["head2"]["c"], sd["decoder"]["c"])
    # add-prefix: DataParallel's names, flat ({"module": {...}} would read back as a wrapper
    # around the whole, dropping the prefix); strip-prefix takes it back name for name
    new, _ = cs.add_prefix(ck, "module.")
    cs.save(new, tmp_path / "dp.pt")
    dp = torch.load(tmp_path / "dp.pt", weights_only=True)
    assert list(dp) == [f"module.{k}" for k in ck.state] and list(cs.load(tmp_path / "dp.pt").state) == list(dp)
    back, _ = cs.strip_prefix(cs.load(tmp_path / "dp.pt"))
    cs.save(back, tmp_path / "back.pt")
    again = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(again) == list(ck.state) and torch.equal(again["decoder.c"], sd["decoder"]["c"])
    cs.save(ck, tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "m.safetensors")) == sorted(ck.state)
    # the same for a bare tensor tree: its add-prefix names read back as written (inside a
    # "module" mapping they read back as a wrapper's state dict, without the prefix)
    torch.save({"emb": {"weight": torch.ones(2)}, "enc": {"layers.0.w": torch.ones(3)}}, tmp_path / "tree.pt")
    tree = cs.load(tmp_path / "tree.pt", key="<bare>")  # (two parts: which one, or both, is asked)
    assert tree.sd_path == () and list(tree.state) == ["emb.weight", "enc.layers.0.w"]
    new, _ = cs.add_prefix(tree, "module.")
    cs.save(new, tmp_path / "tree2.pt")
    assert list(cs.load(tmp_path / "tree2.pt").state) == ["module.emb.weight", "module.enc.layers.0.w"]
    # a config mapping, or joined names that would clash, leave the mapping opaque (as before)
    for odd in ({"encoder.w": torch.ones(2), "head.w": torch.ones(2), "config": {"lr": 0.1}},
                {"decoder.w": torch.ones(2), "head.w": torch.ones(2), "decoder": {"w": torch.zeros(2)}}):
        torch.save(odd, tmp_path / "odd.pt")
        ck = cs.load(tmp_path / "odd.pt")
        assert list(ck.state) == list(odd) and not ck.nested
        cs.save(cs.strip_prefix(cs.add_prefix(ck, "module.")[0])[0], tmp_path / "odd2.pt")
        assert list(torch.load(tmp_path / "odd2.pt", weights_only=True)) == list(odd)


def test_nested_state_dict_is_one_flat_state_dict(tmp_path, cli):
    """A nested state dict is one candidate (before: the only flat part within reach, the encoder,
    was chosen silently and a safetensors output lost the embeddings). It is held flat with
    "."-joined names and written back nested; renamed names go where their new name says."""
    obj = _megatron_like()
    torch.save(obj, tmp_path / "mg.pt")
    ck = cs.load(tmp_path / "mg.pt")
    assert ck.sd_path == ("model",) and any("nested" in n for n in ck.notes)
    assert list(ck.state) == ["language_model.embedding.word_embeddings.weight",
                              "language_model.embedding.position_embeddings.weight",
                              "language_model.encoder.layers.0.attention.dense.weight",
                              "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight",
                              "language_model.encoder.final_layernorm.weight", "word_embeddings_for_head.weight"]

    # unchanged: the same nesting, types and pickle bytes
    cs.save(ck, tmp_path / "same.pt")
    pickles = []
    for name in ("mg.pt", "same.pt"):
        with zipfile.ZipFile(tmp_path / name) as z:
            pickles.append(z.read(next(n for n in z.namelist() if n.endswith("/data.pkl"))))
    assert pickles[0] == pickles[1]
    back = torch.load(tmp_path / "same.pt", weights_only=True)
    assert type(back["model"]["language_model"]["encoder"]) is OrderedDict
    assert torch.equal(back["model"]["language_model"]["embedding"]["word_embeddings"]["weight"],
                       obj["model"]["language_model"]["embedding"]["word_embeddings"]["weight"])

    # safetensors: flat names, nothing left behind
    code, _, err = cli("convert", tmp_path / "mg.pt", "-o", tmp_path / "mg.safetensors")
    assert code == 0, err
    from safetensors.torch import load_file

    flat = load_file(tmp_path / "mg.safetensors")
    assert set(flat) == set(ck.state) and torch.equal(flat["language_model.encoder.final_layernorm.weight"],
                                                      obj["model"]["language_model"]["encoder"]["final_layernorm.weight"])

    # extract the encoder: it stays nested where it was; re-rooted, its names start with no nested
    # path any more and are written flat
    code, _, err = cli("extract", tmp_path / "mg.pt", "--layers", "language_model.encoder", "-o", tmp_path / "enc.pt")
    assert code == 0, err
    enc = torch.load(tmp_path / "enc.pt", weights_only=True)["model"]
    assert list(enc) == ["language_model"] and list(enc["language_model"]) == ["encoder"]
    assert list(enc["language_model"]["encoder"]) == list(obj["model"]["language_model"]["encoder"])
    code, _, err = cli("extract", tmp_path / "mg.pt", "--layers", "language_model.encoder", "--reroot",
                       "language_model.encoder.", "-o", tmp_path / "enc2.pt")
    assert code == 0, err
    assert list(torch.load(tmp_path / "enc2.pt", weights_only=True)["model"]) == list(
        obj["model"]["language_model"]["encoder"])
    # a rename into another nested module's path lands there (a mapping moved whole: still a mapping)
    code, _, err = cli("rename", tmp_path / "mg.pt", "--map", r"^word_embeddings_for_head\.=>language_model.embedding.head.",
                       "-o", tmp_path / "r.pt")
    assert code == 0, err
    emb = torch.load(tmp_path / "r.pt", weights_only=True)["model"]["language_model"]["embedding"]
    assert list(emb) == ["word_embeddings", "position_embeddings", "head"] and list(emb["head"]) == ["weight"]
    # a mapping whose names all move together moves with them (before: written flat, as
    # "decoder.layers.0..." inside language_model, a tree Megatron cannot load)
    enc_names = list(obj["model"]["language_model"]["encoder"])
    for args, where in ((["rename", "--map", r"\.encoder\.=>.decoder."], ("language_model", "decoder")),
                        (["add-prefix", "--prefix", "module."], ("module", "language_model", "encoder")),
                        (["strip-prefix", "--prefix", "language_model.", "--partial"], ("encoder",))):
        code, _, err = cli(args[0], tmp_path / "mg.pt", *args[1:], "-o", tmp_path / "moved.pt")
        assert code == 0, (args, err)
        node = torch.load(tmp_path / "moved.pt", weights_only=True)["model"]
        for part in where:
            node = node[part]
        assert list(node) == enc_names and type(node) is OrderedDict, (args, list(node))
        moved = cs.load(tmp_path / "moved.pt")
        assert len(moved.state) == 6 and all(torch.equal(moved.state[k].to_torch(), v.to_torch())
                                             for k, v in zip(moved.state, ck.state.values()))
    top = torch.load(tmp_path / "moved.pt", weights_only=True)["model"]  # (the strip-prefix one)
    assert list(top) == ["embedding", "encoder", "word_embeddings_for_head"], list(top)
    # names at the top move too (add-prefix: the whole tree under "module"); a top whose mapping
    # holds at least as many tensors as its own (un-dotted) ones would read back as a wrapper
    # around that mapping (locate._wraps_weights): written flat instead, every name read back
    torch.save({"model": {"enc": {"a": torch.ones(1)}, "dec": {"w": torch.ones(2)}, "scale": torch.ones(3)}},
               tmp_path / "mix.pt")
    new, _ = cs.add_prefix(cs.load(tmp_path / "mix.pt"), "module.")
    cs.save(new, tmp_path / "mix2.pt")
    assert list(torch.load(tmp_path / "mix2.pt", weights_only=True)["model"]) == ["module"]
    assert list(cs.load(tmp_path / "mix2.pt").state) == ["module.enc.a", "module.dec.w", "module.scale"]
    torch.save({"model": {"b": {"enc": {"a": torch.ones(1), "w": torch.ones(2)}, "v": torch.ones(3)}}}, tmp_path / "mix3.pt")
    new, _ = cs.strip_prefix(cs.load(tmp_path / "mix3.pt"), prefix="b.")
    cs.save(new, tmp_path / "mix4.pt")
    assert sorted(cs.load(tmp_path / "mix4.pt").state) == ["enc.a", "enc.w", "v"]
    # a name that would be both a tensor and a mapping's path ("b.dec" beside "b.enc.a" renamed to
    # "b.dec.a"): nesting would drop one, so the whole is written flat
    torch.save({"model": {"b": {"enc": {"a": torch.ones(1)}, "dec": torch.ones(2)}}}, tmp_path / "col.pt")
    new, _ = cs.rename(cs.load(tmp_path / "col.pt"), [(r"\benc\b", "dec")])
    cs.save(new, tmp_path / "col2.pt")
    back = cs.load(tmp_path / "col2.pt").state
    assert sorted(back) == ["b.dec", "b.dec.a"] and back["b.dec"].shape == (2,) and back["b.dec.a"].shape == (1,)

    # one part of it still by --key; side-by-side models stay ambiguous
    assert len(cs.load(tmp_path / "mg.pt", key="model/language_model/encoder").state) == 3
    torch.save({"encoder": OrderedDict(w=torch.ones(1)), "decoder": OrderedDict(w=torch.ones(2))}, tmp_path / "ed.pt")
    with pytest.raises(AmbiguousStateDictError):
        cs.load(tmp_path / "ed.pt")
    assert list(cs.load(tmp_path / "ed.pt", key="<bare>").state) == ["encoder.w", "decoder.w"]
    # a nested candidate beside another: inspect counts all its tensors (said "0 tensors, 0 B")
    torch.save({"mg": obj["model"], "other": OrderedDict(w=torch.ones(3))}, tmp_path / "two.pt")
    code, text, err = cli("inspect", tmp_path / "two.pt", "--json")
    sizes = {c["at"]: (c["tensors"], c["bytes"]) for c in json.loads(text)["candidate_sizes"]}
    assert code == 0 and sizes == {"mg": (6, 4 * (32 + 24 + 16 + 64 + 4 + 32)), "other": (1, 12)}, (text, err)

def test_transformer_engine_extra_state_counts_as_module_state(tmp_path, cli):
    """Transformer Engine saves one ``_extra_state`` per layer (a BytesIO, or None): a Megatron
    layer without biases holds almost as many of them as tensors, and an extract of one layer
    fewer. Before, such a part was not recognised as a state dict once tensors were under half
    its entries; and diff compared the BytesIO by its address, so a file differed from itself."""
    import io

    def extra(payload):
        buf = io.BytesIO()
        torch.save(payload, buf)
        buf.seek(0)
        return buf

    enc = OrderedDict([("layers.0.self_attention.linear_qkv.weight", torch.randn(6, 4)),
                       ("layers.0.self_attention.linear_qkv._extra_state", extra({"scale": 1.0})),
                       ("layers.0.self_attention.core_attention._extra_state", None),
                       ("layers.0.mlp.linear_fc1._extra_state", extra({"scale": 2.0}))])
    obj = {"model": {"language_model": {"encoder": enc}}, "iteration": 5}
    torch.save(obj, tmp_path / "te.pt")
    ck = cs.load(tmp_path / "te.pt")
    assert ck.sd_path == ("model",)
    assert list(ck.state) == [f"language_model.encoder.{k}" for k in enc]
    torch.save({"layers.0.w": torch.ones(2), "layers.0._extra_state": None, "layers.1._extra_state": None}, tmp_path / "flat.pt")
    assert list(cs.load(tmp_path / "flat.pt").state) == ["layers.0.w", "layers.0._extra_state", "layers.1._extra_state"]
    code, out, _ = cli("inspect", tmp_path / "te.pt")  # counted, not listed one by one (hundreds in a real model)
    assert code == 0 and "non-tensor entries (3): 3 module _extra_state entries" in out
    code, out, _ = cli("convert", tmp_path / "te.pt", "-o", tmp_path / "te.safetensors")
    assert code == 0 and "non-tensor state-dict entries not carried (3): 3 module _extra_state entries" in out

    # a file is identical to itself; extra state of other bytes, or other bytes of one length, differ
    rep = cs.diff(tmp_path / "te.pt", tmp_path / "te.pt")
    assert rep["identical"], rep["verdict"]
    enc2 = OrderedDict(enc)
    enc2["layers.0.mlp.linear_fc1._extra_state"] = extra({"scale": 3.0})
    torch.save({"model": {"language_model": {"encoder": enc2}}, "iteration": 5}, tmp_path / "te2.pt")
    rep = cs.diff(tmp_path / "te.pt", tmp_path / "te2.pt")
    assert not rep["identical"] and rep["equal"] == 1 and "linear_fc1._extra_state" in json.dumps(rep["metadata"])
    code, out, _ = cli("diff", tmp_path / "te.pt", tmp_path / "te2.pt")
    assert code == 1 and "linear_fc1._extra_state" in out
    torch.save({"w": torch.ones(2), "blob": b"a" * 100}, tmp_path / "b1.pt")
    torch.save({"w": torch.ones(2), "blob": b"b" * 100}, tmp_path / "b2.pt")
    assert not cs.diff(tmp_path / "b1.pt", tmp_path / "b2.pt")["identical"]
    assert cs.diff(tmp_path / "b1.pt", tmp_path / "b1.pt")["identical"]


def test_weights_saved_as_numpy_arrays_are_read_as_tensors(tmp_path, cli):
    """A converted Caffe/TensorFlow/JAX model saved with its weights as numpy arrays: read as
    tensors of the same dtype, shape and values, with a note (it was "no state dict found")."""
    import numpy as np

    w = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # not contiguous
    torch.save({"model": {"conv1.weight": w, "fc.bias": np.ones(3, dtype=np.float16),
                          "fc.idx": np.arange(2), "fc.n": 3, "fc.be": np.arange(3, dtype=">f4")}, "epoch": 7},
               tmp_path / "np.pt")
    ck = cs.load(tmp_path / "np.pt")
    assert ck.sd_path == ("model",) and any("numpy array" in n for n in ck.notes)
    code, _, err = cli("convert", tmp_path / "np.pt", "-o", tmp_path / "np.safetensors")
    assert code == 0, err
    from safetensors.torch import load_file

    out = load_file(tmp_path / "np.safetensors")
    assert torch.equal(out["conv1.weight"], torch.from_numpy(np.ascontiguousarray(w)))
    assert out["fc.bias"].dtype == torch.float16 and out["fc.idx"].dtype == torch.int64
    assert torch.equal(out["fc.be"], torch.arange(3.0))  # a big-endian array: byte order fixed
    code, _, err = cli("strip-prefix", tmp_path / "np.pt", "--prefix", "fc.", "--partial", "-o", tmp_path / "s.pt")
    assert code == 0, err
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert back["epoch"] == 7 and set(back["model"]) == {"conv1.weight", "bias", "idx", "n", "be"}
    # arrays that are not weights (an RNG state beside a state dict) stay arrays
    torch.save({"sd": {"w": torch.ones(2)}, "rng": np.arange(3, dtype=np.uint32)}, tmp_path / "rng.pt")
    ck = cs.load(tmp_path / "rng.pt")
    assert ck.sd_path == ("sd",) and type(ck.wrapper["rng"]).__name__ == "ndarray"


@pytest.mark.parametrize("threshold", [64, 1 << 12])
def test_zip64_records_are_read_by_torch(tmp_path, cli, monkeypatch, threshold):
    """Outputs past 4 GiB get zip64 fields (sizes, offsets, the end records); checked once by hand
    on a 4.3 GB file (torch.load with and without mmap read it). Here the writer's threshold is
    lowered so that small files carry them: every path that writes records (kernel-copied, built
    in memory, from safetensors) must still give a file torch and zipfile read."""
    from safetensors.torch import save_file

    from ckptsurgeon import zipwrite

    sd = OrderedDict((f"module.l{i}.weight", torch.randn(40, 30, generator=torch.Generator().manual_seed(i)))
                     for i in range(6))
    torch.save(sd, tmp_path / "in.pt")
    save_file({k: v for k, v in sd.items()}, tmp_path / "in.safetensors")
    monkeypatch.setattr(zipwrite, "ZIP64_AT", threshold)
    runs = {"strip.pt": ("strip-prefix", tmp_path / "in.pt"), "st.pt": ("strip-prefix", tmp_path / "in.safetensors"),
            "cast.pt": ("cast", tmp_path / "in.pt", "--dtype", "float64")}
    for out, (cmd, *args) in runs.items():
        code, _, err = cli(cmd, *args, "-o", tmp_path / out)
        assert code == 0, err
        assert b"PK\x06\x06" in (tmp_path / out).read_bytes()  # the zip64 end record: the format is in use
        with zipfile.ZipFile(tmp_path / out) as z:
            assert z.testzip() is None
        for mmap in (False, True):
            back = torch.load(tmp_path / out, weights_only=True, mmap=mmap)
            assert list(back) == [k[len("module."):] for k in sd] or list(back) == list(sd)
            assert all(torch.equal(b.float(), v) for b, v in zip(back.values(), sd.values())), out
        assert cs.diff(tmp_path / "in.pt", tmp_path / out)["equal"] == (0 if out == "cast.pt" else 6)


class _Config:  # an object with the default repr, which is just its address
    def __init__(self, lr):
        self.lr = lr


def test_plain_objects_compare_by_attributes_not_address():
    from ckptsurgeon.values import plain

    assert plain(_Config(1)) == plain(_Config(1)) != plain(_Config(2))
    assert "0x" not in json.dumps(plain({"f": _Config(1), "g": (lambda: 0)}))



def test_optimizer_states_by_key_and_inspect_without_a_choice(tmp_path, cli):
    """Optimizer states are keyed by int parameter ids (and Lightning keeps them in a list):
    --key reaches them, writing back keeps the ints, and inspect of a file with many equal
    candidates summarises it instead of failing."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    osd = opt.state_dict()
    torch.save(osd, tmp_path / "optim.pt")
    torch.save({"state_dict": net.state_dict(), "optimizer_states": [osd]}, tmp_path / "light.ckpt")

    ck = cs.load(tmp_path / "optim.pt", key="state/2")
    assert ck.sd_path == ("state", 2) and set(ck.state) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(ck.state["exp_avg"].to_torch(), osd["state"][2]["exp_avg"])
    ck = cs.load(tmp_path / "light.ckpt", key="optimizer_states/0/state/1")
    assert torch.equal(ck.state["exp_avg_sq"].to_torch(), osd["state"][1]["exp_avg_sq"])

    code, _, err = cli("rename", tmp_path / "optim.pt", "--key", "state/0", "--map", "exp_avg=>m1",
                       "-o", tmp_path / "renamed.pt")
    assert code == 0, err
    back = torch.load(tmp_path / "renamed.pt", weights_only=True)
    assert set(back["state"]) == {0, 1, 2, 3} and back["param_groups"] == osd["param_groups"]
    assert "m1" in back["state"][0] and "exp_avg" in back["state"][1]
    assert torch.equal(back["state"][0]["m1"], osd["state"][0]["exp_avg"])

    code, _, err = cli("convert", tmp_path / "optim.pt", "-o", tmp_path / "o.safetensors")
    assert code == 2 and "optimizer's state dict" in err and "--key state/0" in err

    code, text, err = cli("inspect", tmp_path / "optim.pt", "--json")
    assert code == 0, err
    info = json.loads(text)
    assert info["state_dict_at"] is None and info["tensors"] == 0
    sizes = {c["at"]: c for c in info["candidate_sizes"]}
    assert sizes["state/0"]["tensors"] == 3 and sizes["state/0"]["bytes"] == 4 + 2 * 4 * 12
    code, text, _ = cli("inspect", tmp_path / "optim.pt")
    assert code == 0 and "pick one with --key" in text and "state/3: 3 tensors" in text
    # said "4 state dicts and none is clearly the model's": it says what the file is
    assert "an optimizer's state dict" in text and "4 parameter states (step, exp_avg, exp_avg_sq)" in text, text
    assert "1 param group (lr 0.001)" in text
    code, _, err = cli("strip-prefix", tmp_path / "optim.pt", "-o", tmp_path / "x.pt")
    assert code == 2 and "optimizer's state dict" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("inspect", tmp_path / "optim.pt", "--key", "state/9")
    assert code == 2 and "is not in the checkpoint" in err


class _Scripted(torch.nn.Module):
    """A buffer before a parameter, a non-persistent buffer, containers, BatchNorm, attention,
    one module under two names, typed List[int] attributes (Conv2d.kernel_size)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(3))
        self.lin = torch.nn.Linear(3, 3)
        self.w = torch.nn.Parameter(torch.randn(3))
        self.register_buffer("tmp", torch.zeros(2), persistent=False)
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
                                           for _ in range(2)])
        self.heads = torch.nn.ModuleDict({"a": torch.nn.LayerNorm(3), "b": torch.nn.Embedding(5, 3)})
        self.mha = torch.nn.MultiheadAttention(3, 1)
        self.shared = self.lin
        self.plain = torch.ones(3)  # a plain tensor attribute: no parameter, no buffer, not in the state dict

    def forward(self, x):
        return self.lin(x) * self.scale + self.w + self.heads["a"](x) + self.plain


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))


def test_torchscript_archives_are_read_without_running_them(tmp_path, cli):
    """A torch.jit.save archive (OpenAI's CLIP weights are one) pickles the compiled module tree
    under __torch__ classes that no Python module stands behind. Read inert, its attributes give
    exactly torch.jit.load(path).state_dict() -- names, order, dtypes, ties -- with nothing
    imported, compiled or run; outputs are plain state dicts. Archives whose weights only torch
    rebuilds (quantized packed params) or that hold none (frozen) are one-line errors."""
    torch.manual_seed(0)
    archives = {
        "scripted": torch.jit.script(_Scripted()),
        "traced": torch.jit.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                                      torch.nn.Flatten(), torch.nn.Linear(144, 2)).eval(),
                                  torch.randn(1, 3, 8, 8)),
        "tied": torch.jit.trace(_Tied(), torch.tensor([[1, 2]])),
        "encoder": torch.jit.script(torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16), 2)),
        "half": torch.jit.script(torch.nn.Linear(4, 4).half()),
    }
    for name, module in archives.items():
        module.save(str(tmp_path / f"{name}.pt"))
        ref = torch.jit.load(tmp_path / f"{name}.pt").state_dict()
        ck = cs.load(tmp_path / f"{name}.pt")
        got = ck.torch_state_dict()
        assert list(got) == list(ref), name
        assert all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref), name
        assert ck.source.lazy and ck.source.program == "torchscript" and any("TorchScript archive" in n for n in ck.notes)
    assert not any(m.startswith("__torch__") for m in sys.modules)
    scripted = list(cs.load(tmp_path / "scripted.pt").state)
    assert "plain" not in scripted and scripted.index("w") < scripted.index("scale")  # parameters, then buffers
    from safetensors.torch import load_file

    code, out, err = cli("inspect", tmp_path / "scripted.pt")
    assert code == 0 and out.startswith(f"{tmp_path / 'scripted.pt'}  torch-zip (a TorchScript archive: its weights)")
    code, out, err = cli("add-prefix", tmp_path / "scripted.pt", "--prefix", "module.", "-o", tmp_path / "dp.pt")
    assert code == 0 and "TorchScript archive" in err, err
    code, _, err = cli("strip-prefix", tmp_path / "dp.pt", "-o", tmp_path / "sd.pt")
    assert code == 0, err
    ref = torch.jit.load(tmp_path / "scripted.pt").state_dict()
    back = torch.load(tmp_path / "sd.pt", weights_only=True, mmap=True)
    assert list(back) == list(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
    code, out, err = cli("diff", tmp_path / "scripted.pt", tmp_path / "sd.pt")
    assert code == 0 and "identical" in out, out + err
    code, _, err = cli("convert", tmp_path / "tied.pt", "-o", tmp_path / "tied_sd.pt")
    tied = torch.load(tmp_path / "tied_sd.pt", weights_only=True)
    assert code == 0 and tied["emb.weight"].data_ptr() == tied["head.weight"].data_ptr(), err
    code, _, err = cli("extract", tmp_path / "traced.pt", "--layers", "1", "-o", tmp_path / "bn.safetensors")
    assert code == 0 and list(load_file(tmp_path / "bn.safetensors")) == [
        "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"], err
    code, out, err = cli("scan", tmp_path / "traced.pt")
    assert code == 1 and "a TorchScript archive (torch.jit.save)" in out, out + err

    # the archives are read (and re-written) without importing torch, like any torch zip
    code = ("import sys, ckptsurgeon as cs\n"
            f"for name in ('scripted.pt', 'traced.pt', 'half.pt'):\n"
            f"    cs.save(cs.add_prefix(cs.load({str(tmp_path)!r} + '/' + name), 'm.')[0], "
            f"{str(tmp_path)!r} + '/nt_' + name)\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "NO-TORCH", run.stdout + run.stderr

    torch.jit.freeze(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 4)).eval())).save(
        str(tmp_path / "frozen.pt"))
    with pytest.raises(NotACheckpointError, match="frozen module"):
        cs.load(tmp_path / "frozen.pt")
    quantized = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                                       {torch.nn.Linear}, dtype=torch.qint8)
    torch.jit.script(quantized).save(str(tmp_path / "quantized.pt"))
    for bad, says in (("frozen.pt", "torch.jit.freeze"), ("quantized.pt", "__torch__.torch.classes.quantized")):
        code, _, err = cli("inspect", tmp_path / bad)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    code, out, _ = cli("scan", tmp_path / "quantized.pt")
    assert code == 1 and "TorchScript archive (torch.jit.save)" not in out
    with zipfile.ZipFile(tmp_path / "early.pt", "w") as z:  # torch 1.0's layout: model.json, tensors/
        z.writestr("early/model.json", "{}")
        z.writestr("early/code/early.py", "op_version_set = 0")
        z.writestr("early/tensors/0", b"\0" * 16)
    code, _, err = cli("inspect", tmp_path / "early.pt")
    assert code == 2 and "an early torch release's format (model.json" in err and len(err.strip().splitlines()) == 1
    # a file made to look like one: its pickle calls os.system; refused, nothing run, whatever the flags
    with zipfile.ZipFile(tmp_path / "tied.pt") as src, zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        for n in src.namelist():
            z.writestr(n, f"cos\nsystem\n(S'touch {tmp_path}/PWNED'\ntR.".encode() if n.endswith("/data.pkl")
                       else src.read(n))
    for flags in ((), ("--trust-pickle",), ("--inert-pickle",)):
        code, _, err = cli("inspect", *flags, tmp_path / "evil.pt")
        assert code == 2 and "os.system; nothing was executed" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "PWNED").exists()
    cyclic = b"\x80\x02c__torch__\nM\n)\x81q\x00}(X\x08\x00\x00\x00trainingq\x01\x88X\x01\x00\x00\x00xh\x00ub."
    with zipfile.ZipFile(tmp_path / "tied.pt") as src, zipfile.ZipFile(tmp_path / "cyclic.pt", "w") as z:
        for n in src.namelist():
            z.writestr(n, cyclic if n.endswith("/data.pkl") else src.read(n))
    code, _, err = cli("inspect", tmp_path / "cyclic.pt")
    assert code == 2 and "the scripted module x contains itself" in err, err


class _Exported(torch.nn.Module):
    """Tied weights, buffers that are views of one storage (a row, a transpose), bfloat16, a
    non-persistent buffer (a constant of the program, not in its state dict)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight
        self.bn = torch.nn.BatchNorm1d(4)
        base = torch.arange(12.0).reshape(3, 4)
        self.register_buffer("whole", base)
        self.register_buffer("row", base[1])
        self.register_buffer("tcol", base.t())
        self.h = torch.nn.Linear(4, 4).to(torch.bfloat16)
        self.register_buffer("c", torch.ones(2), persistent=False)

    def forward(self, x):
        e = self.bn(self.emb(x).mean(1))
        return (self.head(e) + self.row.sum() + self.whole.sum() + self.tcol.sum() + self.c.sum()
                + self.h(e.bfloat16()).float().sum())


def test_torch_export_archives_are_read_for_their_weights(tmp_path, cli):
    """torch.export.save keeps the weights as raw records described by a JSON config: read as
    byte ranges of the .pt2 (no torch, no program), they are torch.export.load(path).state_dict
    -- names, order, dtypes, strides, ties and views. Outputs are plain state dicts; a .pt2
    output is refused; damaged configs are one-line errors."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    ep = torch.export.export(_Exported().eval(), (torch.tensor([[1, 2]]),))
    torch.export.save(ep, str(tmp_path / "prog.pt2"))
    ref = torch.export.load(str(tmp_path / "prog.pt2")).state_dict
    ck = cs.load(tmp_path / "prog.pt2")
    assert ck.source.format == "torch-export" and ck.source.lazy and "torch.export archive" in ck.notes[-1]
    assert ck.source.program == "torch.export" and cs.inspect(tmp_path / "prog.pt2")["program"] == "torch.export"
    got = ck.torch_state_dict()
    assert list(got) == list(ref) and "c" not in got
    for k in ref:
        assert torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype and got[k].stride() == ref[k].stride()
    assert got["emb.weight"].data_ptr() == got["head.weight"].data_ptr()
    assert got["row"].untyped_storage().data_ptr() == got["whole"].untyped_storage().data_ptr()

    code = ("import sys, ckptsurgeon as cs\n"  # read and re-written without importing torch
            f"cs.save(cs.add_prefix(cs.load({str(tmp_path / 'prog.pt2')!r}), 'm.')[0], {str(tmp_path / 'nt.pt')!r})\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "NO-TORCH", run.stdout + run.stderr
    shutil.copy(tmp_path / "prog.pt2", tmp_path / "prog.pt")  # renamed: still read as what it is
    assert cs.load(tmp_path / "prog.pt").source.format == "torch-export"
    code, _, err = cli("add-prefix", tmp_path / "prog.pt2", "--prefix", "module.", "-o", tmp_path / "dp.pt")
    assert code == 0 and "torch.export archive" in err, err
    code, _, err = cli("strip-prefix", tmp_path / "dp.pt", "-o", tmp_path / "sd.pt")
    back = torch.load(tmp_path / "sd.pt", weights_only=True, mmap=True)
    assert code == 0 and list(back) == list(ref) and all(torch.equal(back[k], ref[k]) for k in ref), err
    code, out, err = cli("diff", tmp_path / "prog.pt2", tmp_path / "sd.pt")
    assert code == 0 and "identical" in out, out + err
    code, _, err = cli("extract", tmp_path / "prog.pt2", "--layers", "bn", "-o", tmp_path / "bn.safetensors")
    assert code == 0 and list(load_file(tmp_path / "bn.safetensors")) == [k for k in ref if k.startswith("bn.")], err
    code, _, err = cli("convert", tmp_path / "prog.pt2", "-o", tmp_path / "again.pt2")
    assert code == 2 and "cannot write torch-export (.pt2)" in err and not (tmp_path / "again.pt2").exists(), err

    # several programs in one archive (package_pt2): one state dict each, chosen with --key
    from torch.export.pt2_archive._package import package_pt2

    lin = torch.export.export(torch.nn.Linear(3, 4), (torch.randn(2, 3),))
    package_pt2(str(tmp_path / "multi.pt2"), exported_programs={"enc": lin, "dec": ep})
    with pytest.raises(AmbiguousStateDictError, match="dec, enc"):
        cs.load(tmp_path / "multi.pt2")
    enc = cs.load(tmp_path / "multi.pt2", key="enc").torch_state_dict()
    assert list(enc) == ["weight", "bias"] and torch.equal(enc["weight"], lin.state_dict["weight"])

    # torch 2.5's layout: the state dict as a torch.save file inside the archive
    sd = OrderedDict([("w", torch.randn(3, 2)), ("b", torch.randn(3))])
    buf = io.BytesIO()
    torch.save(sd, buf)
    with zipfile.ZipFile(tmp_path / "old.pt2", "w") as z:
        z.writestr("old/archive_format", "pt2")
        z.writestr("old/models/model.json", "{}")
        z.writestr("old/data/weights/model.pt", buf.getvalue())
    old = cs.load(tmp_path / "old.pt2").torch_state_dict()
    assert list(old) == ["w", "b"] and all(torch.equal(old[k], sd[k]) for k in sd)

    def damaged(edit, says):
        with zipfile.ZipFile(tmp_path / "prog.pt2") as src, zipfile.ZipFile(tmp_path / "bad.pt2", "w") as z:
            for n in src.namelist():
                data = src.read(n)
                if n.endswith("model_weights_config.json"):
                    config = json.loads(data)
                    edit(config["config"]["bn.weight"])
                    data = json.dumps(config).encode()
                z.writestr(n, data)
        code, _, err = cli("inspect", tmp_path / "bad.pt2")
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err

    damaged(lambda m: m.update(path_name="../../etc/passwd"), "names a record the archive lacks")
    damaged(lambda m: m["tensor_meta"].update(dtype=99), "dtype number 99")
    damaged(lambda m: m["tensor_meta"]["sizes"][0].update(as_int=10 ** 6), "reaches past its storage")
    damaged(lambda m: m["tensor_meta"].update(sizes=[{"as_int": 0}, {"as_int": 10 ** 30}],
                                               strides=[{"as_int": 1}, {"as_int": 1}]), "past torch's 64-bit range")
    damaged(lambda m: m["tensor_meta"].update(sizes=[{"as_expr": {"expr_str": "s0"}}]), "symbolic or missing size")
    damaged(lambda m: m.update(use_pickle=True), "tensor subclass pickled whole")

    # torch.export.load unpickles pickled weights, constants and custom objects with
    # weights_only=False: scan reads those pickles too (a torch.save file inside the archive)
    evil = b"cos\nsystem\n(S'touch PWNED'\ntR."
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("archive/data.pkl", evil)
    with zipfile.ZipFile(tmp_path / "prog.pt2") as src, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as z:
        for n in src.namelist():
            z.writestr(n, inner.getvalue() if n.endswith("weights/weight_2") else src.read(n))
        z.writestr("prog/data/constants/opaque_obj_0", evil)
    code, out, err = cli("scan", tmp_path / "evil.pt2")
    assert code == 1 and "prog/data/weights/weight_2!archive/data.pkl: 1 global" in out, out + err
    assert "prog/data/constants/opaque_obj_0: 1 global" in out and "unsafe global: os.system" in out, out
    code, out, _ = cli("scan", tmp_path / "prog.pt2")
    assert code == 0 and "data/sample_inputs/model.pt!archive/data.pkl" in out, out


def test_empty_state_dict_is_a_state_dict(tmp_path, cli):
    """A module without parameters saves an empty state dict: it loads, inspects and converts."""
    from safetensors.torch import load_file

    torch.save(torch.nn.ReLU().state_dict(), tmp_path / "empty.pt")
    ck = cs.load(tmp_path / "empty.pt")
    assert ck.sd_path == () and len(ck.state) == 0
    code, text, err = cli("inspect", tmp_path / "empty.pt", "--json")
    assert code == 0, err
    assert json.loads(text)["tensors"] == 0
    code, _, err = cli("convert", tmp_path / "empty.pt", "-o", tmp_path / "empty.safetensors")
    assert code == 0, err
    assert load_file(tmp_path / "empty.safetensors") == {}
    code, _, err = cli("convert", tmp_path / "empty.safetensors", "-o", tmp_path / "back.pt")
    assert code == 0, err
    assert len(torch.load(tmp_path / "back.pt", weights_only=True)) == 0
    torch.save({"epoch": 1, "note": "no tensors"}, tmp_path / "none.pt")
    code, out, err = cli("inspect", tmp_path / "none.pt")  # shown, but it is not a state dict
    assert code == 0 and "state dict at: none" in out and "epoch: 1" in out, err
    code, _, err = cli("convert", tmp_path / "none.pt", "-o", tmp_path / "none.safetensors")
    assert code == 2 and "no state dict" in err
    # the same empty state dict inside a wrapper (was "no state dict found"), found or named by --key
    torch.save({"state_dict": torch.nn.ReLU().state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    for key in (None, "state_dict"):
        ck = cs.load(tmp_path / "wrapped.pt", key=key)
        assert ck.sd_path == ("state_dict",) and len(ck.state) == 0 and ck.wrapper["epoch"] == 3
    code, _, err = cli("add-prefix", tmp_path / "wrapped.pt", "--prefix", "module.", "-o", tmp_path / "w2.pt")
    assert code == 0 and torch.load(tmp_path / "w2.pt", weights_only=True) == {"state_dict": {}, "epoch": 3}, err


def test_whole_model_pickle_needs_trust(tmp_path, models):
    net = models.seednet()
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(UnsafePickleError) as e:
        cs.load(tmp_path / "whole.pt")
    assert "SeedNet" in str(e.value) or "ckpt_samples_models" in str(e.value)
    ck = cs.load(tmp_path / "whole.pt", trust_pickle=True)
    assert set(ck.state) == set(net.state_dict())


def test_never_overwrites_input_and_leaves_no_temp(sample_dir, tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes((sample_dir / "seednet.pt").read_bytes())
    before = src.read_bytes()
    ck = cs.load(src)
    with pytest.raises(OutputError):
        cs.save(ck, src)
    cs.save(ck, src, in_place=True)  # allowed explicitly, replaced atomically
    assert torch.load(src, weights_only=True).keys() == torch.load(sample_dir / "seednet.pt", weights_only=True).keys()
    assert before  # input content read before
    assert [p.name for p in tmp_path.iterdir()] == ["in.pt"]
    with pytest.raises(OutputError, match="missing_dir does not exist"):
        cs.save(ck, tmp_path / "missing_dir" / "x.pt")
    with pytest.raises(OutputError, match="in.pt is a file, not a directory"):
        cs.save(ck, src / "x.pt")


def test_loading_pauses_the_garbage_collector_and_restores_it(sample_dir, tmp_path):
    import gc

    assert gc.isenabled()
    cs.load(sample_dir / "seednet_resume.pt")
    assert gc.isenabled()
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(cs.CkptSurgeonError):
        cs.load(tmp_path / "bad.pt")
    assert gc.isenabled()  # also after a failed read
    gc.disable()
    try:
        cs.load(sample_dir / "seednet.pt")
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


def test_missing_and_non_checkpoints(tmp_path):
    with pytest.raises(InputNotFoundError):
        cs.load(tmp_path / "nope.pt")
    (tmp_path / "img.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(NotACheckpointError, match="PNG"):
        cs.load(tmp_path / "img.pt")
    os.mkdir(tmp_path / "emptydir")
    with pytest.raises(NotACheckpointError):
        cs.load(tmp_path / "emptydir")


def test_metadata_preserved_in_torch_output(sample_dir, tmp_path):
    ck = cs.load(sample_dir / "seednet_resume.pt")
    cs.save(ck, tmp_path / "same.pt")
    a = torch.load(sample_dir / "seednet_resume.pt", weights_only=True)
    b = torch.load(tmp_path / "same.pt", weights_only=True)
    assert a.keys() == b.keys() and a["epoch"] == b["epoch"]
    assert a["model_state_dict"]._metadata == b["model_state_dict"]._metadata
    assert a["scheduler_state_dict"] == b["scheduler_state_dict"]
    assert a["optimizer_state_dict"]["param_groups"] == b["optimizer_state_dict"]["param_groups"]
    for i, st in a["optimizer_state_dict"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer_state_dict"]["state"][i][k])


def test_inspect_reports(sample_dir):
    from ckptsurgeon.summary import inspect

    info = inspect(sample_dir / "seednet_dp.pt")
    assert info["prefix"] == "module." and info["tensors"] == 28
    kinds = {n["module"]: n["kind"] for n in info["norm_layers"]}
    assert kinds["module.bn1"] == "BatchNorm" and kinds["module.in2"] == "InstanceNorm"
    assert kinds["module.gn3"] == "GroupNorm" and kinds["module.ln"] == "LayerNorm"
    from ckptsurgeon.norms import detect_norms

    llama = {"model.layers.0.input_layernorm.weight": (32,), "model.norm.weight": (32,),
             "encoder.final_rms_norm.weight": (8,), "ln_f.weight": (16,), "ln_f.bias": (16,)}
    kinds = {n["module"]: n["kind"] for n in detect_norms(llama)}
    assert kinds == {"model.layers.0.input_layernorm": "RMSNorm-or-LayerNorm", "model.norm": "RMSNorm-or-LayerNorm",
                     "encoder.final_rms_norm": "RMSNorm", "ln_f": "LayerNorm"}
    # "norm1" beside convolutions (a diffusers ResNet block: GroupNorm) says less than beside linears
    unet = {"conv_in.weight": (8, 3, 3, 3), "conv_norm_out.weight": (8,), "conv_norm_out.bias": (8,),
            "down.0.resnets.0.norm1.weight": (8,), "down.0.resnets.0.norm1.bias": (8,),
            "down.0.resnets.0.conv1.weight": (8, 8, 3, 3), "down.0.resnets.0.time_emb_proj.weight": (8, 32),
            "down.0.attn.group_norm.weight": (8,), "down.0.attn.group_norm.bias": (8,),
            "down.0.attn.to_q.weight": (8, 8),
            "blocks.0.norm1.weight": (16,), "blocks.0.norm1.bias": (16,), "blocks.0.attn.qkv.weight": (48, 16),
            "blocks.0.mlp.fc1.weight": (64, 16), "norm.weight": (16,), "norm.bias": (16,)}
    kinds = {n["module"]: n["kind"] for n in detect_norms(unet)}
    assert kinds == {"conv_norm_out": "GroupNorm-or-LayerNorm", "down.0.resnets.0.norm1": "GroupNorm-or-LayerNorm",
                     "down.0.attn.group_norm": "GroupNorm", "blocks.0.norm1": "LayerNorm",
                     "norm": "GroupNorm-or-LayerNorm"}
    info = inspect(sample_dir / "seednet_resume.pt")
    assert info["state_dict_at"] == "model_state_dict" and "optimizer_state_dict" in info["wrapper"]
    assert info["bytes_by_dtype"]["float32"] > 0


def test_nonfinite_reported(tmp_path):
    from ckptsurgeon.summary import inspect

    torch.save({"ok": torch.ones(3), "bad": torch.tensor([1.0, float("nan"), float("inf")])}, tmp_path / "nf.pt")
    info = inspect(tmp_path / "nf.pt", values=True)
    assert info["nonfinite"] == [{"tensor": "bad", "nan": 1, "inf": 1, "numel": 3}]


def test_legacy_resume_dict_converts_with_wrapper(sample_dir, tmp_path, cli):
    """The legacy (pre-1.6) format is read lazily without torch (storages are byte ranges of the
    file) and feeds the same writer: wrapper and optimizer kept. A legacy file that needs torch's
    own rebuilding (a sparse tensor) falls back to a full torch.load, and the CLI says so."""
    resume = torch.load(sample_dir / "seednet_resume.pt", weights_only=True)
    torch.save(resume, tmp_path / "legacy_resume.pt", _use_new_zipfile_serialization=False)
    ck = cs.load(tmp_path / "legacy_resume.pt")
    assert ck.source.format == "torch-legacy" and ck.source.lazy and not ck.notes
    code, out, err = cli("strip-prefix", tmp_path / "legacy_resume.pt", "--prefix", "conv", "--partial",
                         "-o", tmp_path / "new.pt")
    assert code == 0, err
    got = torch.load(tmp_path / "new.pt", weights_only=True)
    assert got["epoch"] == resume["epoch"] and got["scheduler_state_dict"] == resume["scheduler_state_dict"]
    assert torch.equal(got["model_state_dict"]["1.weight"], resume["model_state_dict"]["conv1.weight"])
    for i, st in resume["optimizer_state_dict"]["state"].items():
        assert torch.equal(got["optimizer_state_dict"]["state"][i]["exp_avg"], st["exp_avg"])
    code, out, err = cli("convert", tmp_path / "legacy_resume.pt", "-o", tmp_path / "x.safetensors")
    assert code == 0 and not cs.diff(tmp_path / "legacy_resume.pt", tmp_path / "new.pt", align=False)["shape_changed"]

    resume["sparse"] = torch.eye(3).to_sparse()
    torch.save(resume, tmp_path / "legacy_sparse.pt", _use_new_zipfile_serialization=False)
    code, out, err = cli("strip-prefix", tmp_path / "legacy_sparse.pt", "--prefix", "conv", "--partial",
                         "-o", tmp_path / "new2.pt")
    assert code == 0 and "legacy" in err and "loaded fully" in err, err
    assert torch.equal(torch.load(tmp_path / "new2.pt", weights_only=True)["sparse"].to_dense(), torch.eye(3))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["sparse_coo", "nested", "quantized", "packed"])
def test_special_tensors_pass_through_torch_output_and_fail_cleanly_elsewhere(tmp_path, cli, kind):
    """Sparse, nested and quantized tensors survive a key surgery into a torch file and diff
    compares them (across the prefix); where they have no flat bytes (safetensors) the CLI says
    so in one line, exit 2. "packed": a dynamically quantized Linear's own state dict, whose
    weights sit in a ``_packed_params`` tuple (not a tensor entry): safetensors once dropped it
    with a note and wrote the scale and zero point alone."""
    if kind == "packed":
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 3)), {torch.nn.Linear})
        torch.save(torch.nn.DataParallel(q).state_dict(), tmp_path / "a.pt")  # _metadata: packing versions
        code, _, err = cli("strip-prefix", tmp_path / "a.pt", "-o", tmp_path / "b.pt")
        assert code == 0, err
        fresh = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 3)), {torch.nn.Linear})
        fresh.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=False))
        x = torch.randn(2, 4)
        assert torch.equal(fresh(x), q(x))
        code, _, err = cli("convert", tmp_path / "a.pt", "-o", tmp_path / "c.safetensors")
        lines = [x for x in err.splitlines() if "error" in x]
        assert code == 2 and len(lines) == 1 and "_packed_params" in lines[0] and "tuple" in lines[0], err
        assert not (tmp_path / "c.safetensors").exists()
        return
    if kind == "sparse_coo":
        special = torch.randn(4, 4).to_sparse()
    elif kind == "nested":
        special = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    else:
        special = torch.quantize_per_tensor(torch.randn(3, 3), 0.1, 0, torch.qint8)
    lin = torch.nn.Linear(4, 3)
    sd = {f"module.{k}": v for k, v in lin.state_dict().items()}
    sd["module.special"] = special
    torch.save(sd, tmp_path / "a.pt")
    code, out, err = cli("inspect", tmp_path / "a.pt", "--json")
    assert code == 0, err
    code, out, err = cli("strip-prefix", tmp_path / "a.pt", "-o", tmp_path / "b.pt", "--json")
    assert code == 0, err
    import json

    written = json.loads(out)["save"]  # torch.save's path counts what the tensors hold (said 0 B)
    assert written["bytes"] >= lin.weight.nbytes + lin.bias.nbytes, written
    got = torch.load(tmp_path / "b.pt", weights_only=True)
    assert torch.equal(got["weight"], lin.weight.detach())
    if kind == "nested":
        assert all(torch.equal(x, y) for x, y in zip(got["special"].unbind(), special.unbind()))
    elif kind == "quantized":
        assert torch.equal(got["special"].int_repr(), special.int_repr()) and got["special"].q_scale() == 0.1
    else:
        assert torch.equal(got["special"].to_dense(), special.to_dense())
    code, out, err = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt")  # diff compares what they hold
    assert code == 0 and "identical" in out, out + err
    code, _, err = cli("convert", tmp_path / "a.pt", "-o", tmp_path / "c.safetensors")
    lines = [x for x in err.splitlines() if "error" in x]
    assert code == 2 and len(lines) == 1 and kind in lines[0] and "internal" not in lines[0], err
    assert not (tmp_path / "c.safetensors").exists()


def test_inspect_shows_a_file_without_a_state_dict(tmp_path, cli):
    """An RNG-state file (HF Trainer's rng_state.pth) holds tensors but no state dict: inspect
    shows what it holds (exit 0, state_dict_at null); surgeries stop with one line."""
    import json
    import random

    import numpy as np

    p = tmp_path / "rng_state.pth"
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}, p)
    code, out, err = cli("inspect", p)
    assert code == 0, err
    assert "cpu: tensor uint8" in out and "state dict at: none" in out and "random-number-generator states" in out
    code, out, _ = cli("inspect", "--json", p)
    info = json.loads(out)
    assert code == 0 and info["state_dict_at"] is None and info["candidates"] == [] and info["tensors"] == 0
    code, _, err = cli("strip-prefix", p, "-o", tmp_path / "out.pt")
    assert code == 2 and "no state dict" in err and len(err.strip().splitlines()) == 1


def test_key_takes_a_state_dict_whose_other_values_outnumber_its_tensors(tmp_path, cli):
    """``sd["epoch"] = 3`` and friends on a small model's state dict: more other values than
    tensors, so it is not taken on its own; the error says how, and --key '<bare>' takes it
    (an explicit --key once refused it as "does not hold a state dict")."""
    sd = OrderedDict([("module.a.weight", torch.ones(2)), ("module.a.bias", torch.zeros(2)),
                      ("module.scale", 2.0), ("module.tag", "v1"), ("module.n", None)])
    torch.save(sd, tmp_path / "nt.pt")
    code, _, err = cli("strip-prefix", tmp_path / "nt.pt", "-o", tmp_path / "o.pt")
    assert code == 2 and "--key '<bare>'" in err and "2 tensors are outnumbered by the 3" in err, err
    code, _, err = cli("strip-prefix", tmp_path / "nt.pt", "--key", "<bare>", "-o", tmp_path / "o.pt")
    assert code == 0, err
    back = torch.load(tmp_path / "o.pt", weights_only=True)
    assert list(back) == ["a.weight", "a.bias", "scale", "tag", "n"] and back["scale"] == 2.0
    code, _, err = cli("inspect", tmp_path / "nt.pt", "--key", "x")
    assert code == 2 and "is not in the checkpoint" in err


def test_inspect_names_a_resume_folders_other_files(tmp_path, cli):
    """A training run's other files hold no model weights: inspect says what each is (it said
    "no state dict found; top level: [...]") -- a scheduler's, a GradScaler's, accelerate's RNG states."""
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    opt.step()
    sched.step()
    torch.save(sched.state_dict(), tmp_path / "scheduler.pt")
    torch.save(torch.amp.GradScaler("cpu").state_dict(), tmp_path / "scaler.pt")
    import random

    import numpy as np

    torch.save({"step": 0, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state()}, tmp_path / "random_states_0.pkl")
    expected = {"scheduler.pt": "a learning-rate scheduler's state (torch.optim.lr_scheduler: last_epoch 1, lr 0.05)",
                "scaler.pt": "a GradScaler's state (mixed-precision loss scale 65536)",
                "random_states_0.pkl": "random-number-generator states (accelerate's"}
    for name, says in expected.items():
        code, out, err = cli("inspect", tmp_path / name)
        assert code == 0 and says in out and "not model weights" in out, out + err
        code, _, err = cli("strip-prefix", tmp_path / name, "-o", tmp_path / "o.pt")  # the surgeries say it too
        assert code == 2 and f"no state dict here: {says}" in err and err.count("\n") == 1, err


def _deepspeed_states(module_sd, stage):
    return {"module": module_sd, "buffer_names": [], "optimizer": None,
            "param_shapes": [OrderedDict((k, torch.Size([2, 2])) for k in module_sd)],
            "ds_config": {"zero_optimization": {"stage": stage}}, "ds_version": "0.14.0", "global_steps": 5}


def test_deepspeed_folder_and_zero3_placeholders(tmp_path, cli):
    """A DeepSpeed checkpoint folder is read through its 'latest' tag; ZeRO-3 model states,
    whose tensors are empty placeholders, are shown by inspect but refused by surgeries with the
    way out (zero_to_fp32.py) instead of writing empty weights."""
    sd = OrderedDict((f"module.l{i}.weight", torch.randn(2, 2)) for i in range(3))
    ds = tmp_path / "ds"
    (ds / "global_step5").mkdir(parents=True)
    (ds / "latest").write_text("global_step5\n")
    torch.save(_deepspeed_states(sd, 2), ds / "global_step5" / "mp_rank_00_model_states.pt")
    (ds / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")
    ck = cs.load(ds)
    assert ck.sd_path == ("module",) and any("DeepSpeed folder" in n for n in ck.notes)
    code, _, err = cli("strip-prefix", ds, "-o", tmp_path / "model.pt")
    assert code == 0, err
    assert list(torch.load(tmp_path / "model.pt", weights_only=True)["module"]) == ["l0.weight", "l1.weight", "l2.weight"]

    z3 = tmp_path / "z3.pt"
    torch.save(_deepspeed_states(OrderedDict((k, torch.empty(0)) for k in sd), 3), z3)
    code, out, err = cli("inspect", z3)
    assert code == 0 and "ZeRO-3" in out and "zero_to_fp32.py" in out, err
    code, _, err = cli("convert", z3, "-o", tmp_path / "z3.safetensors")
    assert code == 2 and "ZeRO-3" in err and "zero_to_fp32.py" in err
    assert not (tmp_path / "z3.safetensors").exists()


def test_repacked_zip_with_compressed_records(tmp_path, cli, monkeypatch):
    """torch writes records uncompressed; an archive re-zipped with deflate still reads (each
    record inflated in memory), and a record too big to inflate (a zip bomb's claim) is refused."""
    import pickle
    import zipfile

    from ckptsurgeon import zipfmt

    sd = OrderedDict((f"l{i}.weight", torch.randn(64, 64)) for i in range(3))
    torch.save(sd, tmp_path / "orig.pt")
    with zipfile.ZipFile(tmp_path / "orig.pt") as src, \
            zipfile.ZipFile(tmp_path / "deflated.pt", "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    ck = cs.load(tmp_path / "deflated.pt")
    got = ck.torch_state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    code, _, err = cli("convert", tmp_path / "deflated.pt", "-o", tmp_path / "plain.pt")
    assert code == 0 and "warning" not in err, err
    assert all(torch.equal(torch.load(tmp_path / "plain.pt", weights_only=True)[k], v) for k, v in sd.items())

    monkeypatch.setattr(zipfmt, "MAX_COMPRESSED_RECORD", 1000)
    code, _, err = cli("convert", tmp_path / "deflated.pt", "-o", tmp_path / "again.pt")
    assert code == 2 and "compressed" in err and len(err.strip().splitlines()) == 1

    # a deflate bomb in the pickle itself: ~300 KB on disk, 300 MiB inflated; refused unread
    with zipfile.ZipFile(tmp_path / "orig.pt") as src, zipfile.ZipFile(tmp_path / "bomb.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps({"w": "x" * (300 << 20)}, protocol=2)
                dst.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, data)
    assert (tmp_path / "bomb.pt").stat().st_size < 1 << 20
    code, _, err = cli("inspect", tmp_path / "bomb.pt")
    assert code == 2 and "data.pkl is compressed and inflates to" in err and len(err.strip().splitlines()) == 1, err


def test_big_endian_checkpoint_reads_byte_swapped(tmp_path, cli):
    """A file saved on a big-endian machine (byteorder record 'big', storages big-endian):
    read through torch.load, which swaps the bytes, so values, conversions and diff are right
    (reading the bytes as they are would give garbage)."""
    import io
    import zipfile

    import numpy as np

    sd = OrderedDict([("w", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
                      ("i", torch.tensor([1, 2, 3])), ("h", torch.tensor([1.5], dtype=torch.float16))])
    buf = io.BytesIO()
    torch.save(sd, buf)
    torch.save(sd, tmp_path / "little.pt")
    itemsize = {"0": 4, "1": 8, "2": 2}  # storages in first-use order
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(tmp_path / "big.pt", "w") as dst:
        for info in src.infolist():
            data, short = src.read(info), info.filename.split("/", 1)[1]
            if short == "byteorder":
                data = b"big"
            elif short.startswith("data/"):
                n = itemsize[short.split("/")[1]]
                data = np.frombuffer(data, dtype=f"<u{n}").astype(f">u{n}").tobytes()
            dst.writestr(info, data)
    got = cs.load(tmp_path / "big.pt").torch_state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    code, _, err = cli("convert", tmp_path / "big.pt", "-o", tmp_path / "big.safetensors")
    assert code == 0, err
    from safetensors.torch import load_file

    assert all(torch.equal(load_file(tmp_path / "big.safetensors")[k], v) for k, v in sd.items())
    code, out, err = cli("diff", tmp_path / "big.pt", tmp_path / "little.pt")
    assert code == 0 and "identical" in out, out + err
    code, _, err = cli("convert", tmp_path / "big.pt", "-o", tmp_path / "native.pt")  # written little-endian
    assert code == 0, err
    back = torch.load(tmp_path / "native.pt", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    with zipfile.ZipFile(tmp_path / "native.pt") as z:
        assert z.read(next(n for n in z.namelist() if n.endswith("/byteorder"))) == b"little"


@pytest.mark.parametrize("head,says", [(b"\x89HDF\r\n\x1a\n", "HDF5"), (b"GGUF\x03\x00\x00\x00", "GGUF"),
                                       (b"x".ljust(257, b"\0") + b"ustar\x0000", "tar archive"),
                                       (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\n"
                                        b"size 440473133\n", "Git LFS pointer to a 420.1 MiB file"),
                                       (b"\n  <!DOCTYPE html>\n<html><body>Sign in", "HTML page")])
def test_other_model_formats_are_named(tmp_path, cli, head, says):
    """Other formats, and the two usual wrong downloads: a clone without git-lfs keeps a pointer
    file in place of the weights; a download of a page (login, error) saves HTML."""
    p = tmp_path / "model.pt"
    p.write_bytes(head + (b"" if head.isascii() else b"\0" * 600))
    code, _, err = cli("inspect", p)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_folder_of_model_folders_names_them(tmp_path, cli):
    """A diffusers pipeline (or a Trainer output dir) keeps its models in sub-folders: the error
    names them instead of only saying that no weights were found."""
    from safetensors.torch import save_file

    for part in ("unet", "vae"):
        (tmp_path / "pipe" / part).mkdir(parents=True)
        save_file({"w": torch.ones(2)}, tmp_path / "pipe" / part / "diffusion_pytorch_model.safetensors")
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    code, _, err = cli("inspect", tmp_path / "pipe")
    assert code == 2 and "unet, vae" in err and "scheduler" not in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("inspect", tmp_path / "pipe" / "unet")
    assert code == 0, err


def test_sharded_folder_without_its_index(tmp_path, cli):
    """Shards copied without their *.index.json (model-0000i-of-0000n.*): read in order; a
    missing shard leaves the folder unreadable with the usual one-line error."""
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    folder.mkdir()
    sd = OrderedDict((f"layers.{i}.weight", torch.full((2, 2), float(i))) for i in range(6))
    names = list(sd)
    for i in range(3):
        save_file({k: sd[k] for k in names[2 * i:2 * i + 2]}, folder / f"model-{i + 1:05d}-of-00003.safetensors")
    ck = cs.load(folder)
    assert list(ck.state) == names and any("no index file" in n for n in ck.notes)
    assert all(torch.equal(ck.torch_state_dict()[k], v) for k, v in sd.items())
    code, _, err = cli("convert", folder, "-o", tmp_path / "one.safetensors")
    assert code == 0, err
    (folder / "model-00002-of-00003.safetensors").unlink()
    code, _, err = cli("inspect", folder)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "1 of the 3 shards of model.safetensors missing (model-00002-of-00003.safetensors)" in err
    # one shard left of a set is no whole model: read alone, it passed for one and convert wrote a third of it
    (folder / "model-00003-of-00003.safetensors").unlink()
    code, _, err = cli("convert", folder, "-o", tmp_path / "part.safetensors")
    assert code == 2 and "2 of the 3 shards of model.safetensors missing" in err, err
    assert not (tmp_path / "part.safetensors").exists()
    code, out, err = cli("inspect", folder / "model-00001-of-00003.safetensors")  # asked for by name: read, said
    assert code == 0 and "this is shard 1 of 3 of a sharded model: only its tensors were read" in out, err


def test_nemo_archive_read_in_place(tmp_path, cli):
    """A NeMo 1.x .nemo is a tar of model_weights.ckpt + model_config.yaml: the torch zip inside
    is read where it lies (lazily); a compressed archive or one whose pickle needs torch.load is
    refused in one line with the way out (extract it)."""
    import tarfile

    sd = OrderedDict((f"encoder.layers.{i}.weight", torch.randn(4, 4)) for i in range(3))
    torch.save(sd, tmp_path / "model_weights.ckpt")
    (tmp_path / "model_config.yaml").write_text("target: nemo.collections.asr.models.EncDecCTCModel\n")
    with tarfile.open(tmp_path / "asr.nemo", "w:") as tar:
        tar.add(tmp_path / "model_config.yaml", arcname="./model_config.yaml")
        tar.add(tmp_path / "model_weights.ckpt", arcname="./model_weights.ckpt")
    ck = cs.load(tmp_path / "asr.nemo")
    assert ck.source.format == "nemo" and ck.source.lazy and list(ck.state) == list(sd)
    assert all(torch.equal(ck.torch_state_dict()[k], v) for k, v in sd.items())
    code, _, err = cli("strip-prefix", tmp_path / "asr.nemo", "-o", tmp_path / "enc.pt", "--prefix", "encoder.")
    assert code == 0, err
    assert list(torch.load(tmp_path / "enc.pt", weights_only=True)) == [k[len("encoder."):] for k in sd]

    with tarfile.open(tmp_path / "gz.nemo", "w:gz") as tar:
        tar.add(tmp_path / "model_weights.ckpt", arcname="./model_weights.ckpt")
    code, _, err = cli("inspect", tmp_path / "gz.nemo")
    assert code == 2 and "tar xf" in err and len(err.strip().splitlines()) == 1

    canary = tmp_path / "canary"
    _evil = {"w": torch.ones(1), "x": _Touch(canary)}
    torch.save(_evil, tmp_path / "model_weights.ckpt")
    with tarfile.open(tmp_path / "evil.nemo", "w:") as tar:
        tar.add(tmp_path / "model_weights.ckpt", arcname="./model_weights.ckpt")
    code, _, err = cli("inspect", tmp_path / "evil.nemo")
    assert code == 2 and "system" in err and "nothing was executed" in err and not canary.exists()
    code, out, err = cli("inspect", "--inert-pickle", tmp_path / "evil.nemo")
    assert code == 0 and not canary.exists(), err
    assert cs.scan(str(tmp_path / "evil.nemo"))["unsafe"] == ["posix.system"]  # scan looks inside the tar
    assert cs.scan(str(tmp_path / "asr.nemo"))["unsafe"] == []


class _Touch:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("name,data,says", [
    ("model.onnx", b"\x08\x07\x12\x07pytorch", "ONNX"), ("flax_model.msgpack", b"\x85\xa5model", "Flax"),
    ("weights.npy", b"\x93NUMPY\x01\x00v\x00", "numpy .npy"), ("arrays.npz", None, "numpy .npz")])
def test_other_files_are_named_by_extension_or_magic(tmp_path, cli, name, data, says):
    import numpy as np

    p = tmp_path / name
    if data is None:
        np.savez(p, x=np.ones(3))
    else:
        p.write_bytes(data + b"\0" * 100)
    code, _, err = cli("inspect", p)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(os.name == "nt", reason="the other OS's path class is PosixPath there")
def test_windows_paths_in_hparams_read_on_linux(tmp_path, cli):
    """A Lightning checkpoint saved on Windows pickles its hparams' paths as pathlib.WindowsPath,
    which Python cannot build on Linux (torch.load fails there, even unsafe). Read as an inert
    record, written back as it was; scan counts it as plain data."""
    import pathlib
    import zipfile

    torch.save({"state_dict": {"model.w": torch.ones(2)},
                "hyper_parameters": {"data_dir": pathlib.PureWindowsPath("C:/data/imgs"), "lr": 0.1}},
               tmp_path / "pure.ckpt")
    with zipfile.ZipFile(tmp_path / "pure.ckpt") as z:
        records = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in records if n.endswith("/data.pkl"))
    records[pkl] = records[pkl].replace(b"\nPureWindowsPath\n", b"\nWindowsPath\n")  # as Windows writes it
    with zipfile.ZipFile(tmp_path / "win.ckpt", "w") as z:
        for n, data in records.items():
            z.writestr(n, data)
    with pytest.raises(NotImplementedError):
        torch.load(tmp_path / "win.ckpt", weights_only=False)
    ck = cs.load(tmp_path / "win.ckpt")
    assert ck.source.lazy and ck.wrapper["hyper_parameters"]["lr"] == 0.1
    code, _, err = cli("strip-prefix", tmp_path / "win.ckpt", "-o", tmp_path / "out.ckpt")
    assert code == 0, err
    with zipfile.ZipFile(tmp_path / "out.ckpt") as z:
        out_pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    assert b"pathlib\nWindowsPath\n" in out_pkl and b"C:" in out_pkl
    assert cli("scan", tmp_path / "win.ckpt")[0] == 0


def test_plain_tensor_with_python_attributes_stays_on_the_fast_path(tmp_path):
    """A tensor with attributes set on it (DeepSpeed's ds_id on its flat fp32 groups) is pickled
    by torch through _rebuild_from_type_v2(..., torch.Tensor, ..., state): read without torch,
    the attributes written back and set again by to_torch, as torch.load does."""
    import zipfile

    t = torch.arange(6.0)
    t.ds_id = "0_5"
    t.info = {"a": 1}
    torch.save({"module.w": t, "module.v": t[2:], "module.u": torch.ones(2)}, tmp_path / "a.pt")
    ck = cs.load(tmp_path / "a.pt")
    assert ck.source.lazy and ck.state["module.w"].attrs == {"ds_id": "0_5", "info": {"a": 1}}
    assert ck.state["module.v"].attrs is None and ck.torch_state_dict()["module.w"].ds_id == "0_5"
    new, _ = cs.strip_prefix(ck)
    cs.save(new, tmp_path / "b.pt")
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert back["w"].ds_id == "0_5" and back["w"].info == {"a": 1} and torch.equal(back["w"], t)
    assert back["v"].data_ptr() == back["w"].data_ptr() + 8  # still a view of the same storage
    cs.save(ck, tmp_path / "same.pt")

    def pkl(p):
        with zipfile.ZipFile(p) as z:
            return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))

    assert pkl(tmp_path / "same.pt") == pkl(tmp_path / "a.pt")


def test_many_small_records_to_safetensors_are_checked_and_batched(tmp_path, cli, flip_byte):
    """Small whole zip records are read through the mapping, CRC-checked as read and written in
    batches; large ones are kernel-copied and checked on the other thread. Both land exactly,
    and a damaged small record stops the write with one line and no output."""
    from safetensors.torch import load_file

    from ckptsurgeon.byteranges import FileRange

    g = torch.Generator().manual_seed(1)
    sd = OrderedDict((f"moe.{i // 8}.expert{i % 8}.w", torch.randn(3, 5, generator=g)) for i in range(2000))
    sd["embed.weight"] = torch.randn(300, 300, generator=g)  # 360 KB: kernel-copied
    sd["moe.3.expert0.w"] = torch.randn(40, 40, generator=g)
    torch.save(sd, tmp_path / "m.pt")
    code, _, err = cli("convert", tmp_path / "m.pt", "-o", tmp_path / "m.safetensors")
    assert code == 0, err
    back = load_file(tmp_path / "m.safetensors")
    assert list(back) == list(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    ref = cs.load(tmp_path / "m.pt").state["moe.100.expert3.w"]
    assert isinstance(ref.storage.source, FileRange)
    flip_byte(tmp_path / "m.pt", ref.storage.source.offset + 7)
    code, _, err = cli("convert", tmp_path / "m.pt", "-o", tmp_path / "bad.safetensors")
    assert code == 2 and "CRC-32 mismatch" in err and "Traceback" not in err
    assert not (tmp_path / "bad.safetensors").exists() and not list(tmp_path.glob("*.tmp*"))


def test_plain_pickle_of_numpy_arrays_reads_as_tensors(tmp_path, cli):
    """Detectron2's model-zoo .pkl: a plain pickle (not torch.save) of numpy arrays. torch.load
    cannot read it; here the arrays become tensors (byte order fixed, non-contiguous ones laid
    out), the wrapper is kept, and the usual writers apply."""
    import pickle

    import numpy as np
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    model = {"backbone.res2.0.conv1.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
             "backbone.res2.0.conv1.norm.running_var": rng.random(8),  # float64
             "roi_heads.box_predictor.cls_score.bias": rng.standard_normal(5).astype(">f4"),  # big-endian
             "proposal_generator.anchor_generator.cell_anchors.0": np.arange(12, dtype=np.int64).reshape(3, 4).T,
             "mask": np.array([True, False, True])}
    with open(tmp_path / "model_final.pkl", "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True,
                     "classes": ["cat", "dog"]}, f, protocol=4)
    with pytest.raises(Exception):
        torch.load(tmp_path / "model_final.pkl", weights_only=True)
    ck = cs.load(tmp_path / "model_final.pkl")
    assert ck.source.format == "pickle" and ck.sd_path == ("model",) and len(ck.state) == 5
    code, out, err = cli("convert", tmp_path / "model_final.pkl", "-o", tmp_path / "m.safetensors")
    assert code == 0, err
    got = load_file(tmp_path / "m.safetensors")
    for k, v in model.items():
        assert np.array_equal(got[k].numpy(), v) and got[k].dtype == torch.from_numpy(v.astype(v.dtype.newbyteorder("="))).dtype, k
    code, _, err = cli("convert", tmp_path / "model_final.pkl", "-o", tmp_path / "m.pt")
    assert code == 0, err
    back = torch.load(tmp_path / "m.pt", weights_only=True)
    assert back["__author__"] == "Detectron2 Model Zoo" and set(back["model"]) == set(model)
    assert torch.equal(back["model"]["mask"], torch.tensor([True, False, True]))
    code, out, _ = cli("strip-prefix", tmp_path / "model_final.pkl", "--prefix", "backbone.", "--partial",
                       "-o", tmp_path / "s.safetensors")
    assert code == 0 and "res2.0.conv1.weight" in load_file(tmp_path / "s.safetensors")


def test_output_without_a_known_extension_keeps_the_input_format(tmp_path, cli):
    """`-o model.st` (or no extension) from a safetensors file stays safetensors, with a note;
    torch's extensions and .safetensors still choose; a legacy input with no extension becomes a
    torch zip (legacy is never written), also noted."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    st = tmp_path / "in.safetensors"
    save_file({"module.a": torch.arange(4.0), "module.b": torch.ones(2, 2)}, str(st))
    for name in ("out.st", "out"):
        out = tmp_path / name
        code, stdout, _ = cli("strip-prefix", st, "-o", out)
        assert code == 0, stdout
        assert "written as safetensors like the input" in stdout
        with safe_open(str(out), "pt") as f:
            assert sorted(f.keys()) == ["a", "b"]
            assert torch.equal(f.get_tensor("a"), torch.arange(4.0))
    code, stdout, _ = cli("strip-prefix", st, "-o", tmp_path / "out.pth")
    assert code == 0 and "note: written as" not in stdout
    assert torch.equal(torch.load(tmp_path / "out.pth", weights_only=True)["a"], torch.arange(4.0))
    code, stdout, _ = cli("convert", st, "-o", tmp_path / "forced", "--format", "torch-zip")
    assert code == 0 and "note: written as" not in stdout and zipfile.is_zipfile(tmp_path / "forced")

    legacy = tmp_path / "legacy.pt"
    torch.save({"module.w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    code, stdout, _ = cli("strip-prefix", legacy, "-o", tmp_path / "plain")
    assert code == 0 and "written as torch-zip: it has no extension" in stdout
    assert torch.equal(torch.load(tmp_path / "plain", weights_only=True)["w"], torch.ones(3))
    rep = cs.save(cs.load(st), tmp_path / "api.weights")
    assert rep["format"] == "safetensors"

    # a sharded folder (no config.json) in, no extension out: a sharded folder, as the input was
    sharded = tmp_path / "sharded"
    cs.save(cs.load(st), sharded, max_shard_size=16)
    assert cs.load(sharded).source.format == "hf-folder"
    code, stdout, err = cli("strip-prefix", sharded, "-o", tmp_path / "sharded2")
    assert code == 0, err
    assert (tmp_path / "sharded2").is_dir() and sorted(cs.load(tmp_path / "sharded2").state) == ["a", "b"]


def test_format_that_contradicts_the_name_is_noted(tmp_path, cli):
    """Found by fuzzing CLI options: `--format torch-zip -o x.safetensors` wrote a file that
    torch.load itself cannot read (it takes every *.safetensors path for safetensors) without a
    word. The user asked for it, so it is written, with a note; the other way round too."""
    src = tmp_path / "in.pt"
    torch.save({"module.a": torch.arange(4.0)}, src)
    code, stdout, err = cli("strip-prefix", src, "-o", tmp_path / "x.safetensors", "--format", "torch-zip")
    assert code == 0 and zipfile.is_zipfile(tmp_path / "x.safetensors"), err
    assert "written as torch-zip under a name that says safetensors (.safetensors)" in stdout
    assert "torch.load takes every *.safetensors path" in stdout
    code, stdout, err = cli("strip-prefix", src, "-o", tmp_path / "x.pt", "--format", "safetensors")
    assert code == 0 and "written as safetensors under a name that says torch-zip (.pt)" in stdout, err
    code, stdout, err = cli("strip-prefix", src, "-o", tmp_path / "y.pt", "--format", "torch-zip")
    assert code == 0 and "note:" not in stdout, stdout
    code, stdout, err = cli("strip-prefix", src, "-o", tmp_path / "z.safetensors", "-q", "--format", "torch-zip")
    assert code == 0 and "note:" not in stdout, stdout  # --quiet silences notes


def test_tensorflow_checkpoints_are_named(tmp_path, cli):
    """tf.train.Checkpoint files (model.ckpt.index + model.ckpt.data-00000-of-00001, often
    beside a PyTorch `.ckpt` in the same runs folder) and a SavedModel folder: named as
    TensorFlow's, not 'unrecognised bytes' or 'a directory without weights'."""
    tf = tmp_path / "tf"
    tf.mkdir()
    (tf / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    (tf / "model.ckpt.index").write_bytes(os.urandom(300))
    (tf / "model.ckpt.data-00000-of-00001").write_bytes(os.urandom(3000))
    for p in (tf / "model.ckpt.index", tf / "model.ckpt.data-00000-of-00001"):
        code, _, err = cli("inspect", p)
        assert code == 2 and "part of a TensorFlow checkpoint" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("inspect", tf)
    assert code == 2 and "TensorFlow or Flax weights only (model.ckpt.data-00000-of-00001)" in err, err
    (tmp_path / "sm" / "variables").mkdir(parents=True)
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"\x08\x01")
    code, _, err = cli("inspect", tmp_path / "sm")
    assert code == 2 and "TensorFlow or Flax weights only (saved_model.pb)" in err, err
    (tmp_path / "x.index").write_bytes(os.urandom(300))  # an .index alone is not taken for TensorFlow's
    code, _, err = cli("inspect", tmp_path / "x.index")
    assert code == 2 and "TensorFlow" not in err, err
