"""Trust: hostile pickles never run, corrupt files never crash, a killed write never tears a file.

Every hostile case carries a canary (a file its payload would create) that must not appear; every
corrupt case must end in one line on stderr, exit code 2 and no output file.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch

import ckptsurgeon as cs
from ckptsurgeon.errors import CkptSurgeonError, UnsafePickleError


# --------------------------------------------------------------------------- hostile pickles
class Reduce:
    """An object that pickles as ``func(*args)`` for any importable ``func``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _g(module, name):
    """Pickle-able reference to module.name (a real object of that module)."""
    import importlib

    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _touch_cmd(canary):
    return f"touch {canary}"


def _py_touch(canary):
    return f"open({str(canary)!r}, 'w').write('pwned')"


def _raw(protocol0_text: str) -> bytes:
    return protocol0_text.encode()


HOSTILE = {
    # name: (expected global in the message, builder(canary) -> object to torch.save, or raw pickle bytes)
    "os.system": ("system", lambda c: {"w": torch.ones(1), "x": Reduce(os.system, (_touch_cmd(c),))}),
    "posix.system": ("posix.system", lambda c: Reduce(_g("posix", "system"), (_touch_cmd(c),))),
    "builtins.eval": ("builtins.eval", lambda c: Reduce(eval, (_py_touch(c),))),
    "builtins.exec": ("builtins.exec", lambda c: Reduce(exec, (_py_touch(c),))),
    "builtins.__import__ chain": ("builtins.getattr", lambda c: _raw(
        f"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'{_touch_cmd(c)}'\ntR.")),
    "builtins.getattr on __import__": ("builtins.getattr", lambda c: Reduce(getattr, (Reduce(__import__, ("os",)), "system"))),
    "subprocess.call": ("subprocess.call", lambda c: Reduce(_g("subprocess", "call"), (["touch", str(c)],))),
    "subprocess.Popen": ("subprocess.Popen", lambda c: Reduce(_g("subprocess", "Popen"), (["touch", str(c)],))),
    "subprocess.check_output": ("subprocess.check_output",
                                lambda c: Reduce(_g("subprocess", "check_output"), (["touch", str(c)],))),
    "runpy._run_code": ("runpy._run_code", lambda c: Reduce(_g("runpy", "_run_code"), (_py_touch(c), {}))),
    "pty.spawn": ("pty.spawn", lambda c: Reduce(_g("pty", "spawn"), (["touch", str(c)],))),
    "pydoc.pipepager": ("pydoc.pipepager", lambda c: Reduce(_g("pydoc", "pipepager"), ("x", _touch_cmd(c)))),
    "ctypes.CDLL": ("ctypes.CDLL", lambda c: Reduce(_g("ctypes", "CDLL"), (None,))),
    "importlib.import_module": ("importlib.import_module",
                                lambda c: Reduce(_g("importlib", "import_module"), ("os",))),
    "webbrowser.open": ("webbrowser.open", lambda c: Reduce(_g("webbrowser", "open"), (f"file://{c}",))),
    "operator.methodcaller": ("operator.methodcaller",
                              lambda c: Reduce(_g("operator", "methodcaller"), ("system", _touch_cmd(c)))),
    "functools.partial": ("functools.partial", lambda c: Reduce(_g("functools", "partial"), (os.system, _touch_cmd(c)))),
    "operator.attrgetter": ("operator.attrgetter", lambda c: Reduce(_g("operator", "attrgetter"), ("system",))),
    "shutil.rmtree": ("shutil.rmtree", lambda c: Reduce(_g("shutil", "rmtree"), (str(c) + ".dir",))),
    "cProfile.run": ("cProfile.run", lambda c: Reduce(_g("cProfile", "run"), (_py_touch(c),))),
    "timeit.timeit": ("timeit.timeit", lambda c: Reduce(_g("timeit", "timeit"), (_py_touch(c),), )),
    "pickle.loads nested": ("pickle.loads", lambda c: Reduce(pickle.loads, (pickle.dumps(Reduce(os.system, (_touch_cmd(c),))),))),
    "code.InteractiveInterpreter": ("code.InteractiveInterpreter", lambda c: Reduce(_g("code", "InteractiveInterpreter"), ())),
    "os.putenv env canary": ("putenv", lambda c: Reduce(os.putenv, ("CKPT_CANARY", "1"))),
    "torch.load recursion": ("torch.serialization.load", lambda c: Reduce(torch.load, (str(c) + ".other",))),
    "nested in containers": ("system", lambda c: {"a": [1, {"b": (Reduce(os.system, (_touch_cmd(c),)),)}]}),
    "in optimizer state": ("system", lambda c: {"model_state_dict": {"w": torch.ones(2)},
                                                 "optimizer_state_dict": {"state": {0: {"step": Reduce(os.system, (_touch_cmd(c),))}}}}),
    "inside tensor rebuild args": ("system", lambda c: {"w": Reduce(torch._utils._rebuild_tensor_v2, (
        torch.storage.TypedStorage(wrap_storage=torch.ones(4).untyped_storage(), dtype=torch.float32, _internal=True),
        0, (4,), (1,), False, OrderedDict(), Reduce(os.system, (_touch_cmd(c),))))}),
    "INST opcode": ("os.system", lambda c: _raw(f"(S'{_touch_cmd(c)}'\nios\nsystem\n.")),
    "benign unknown global": ("fractions.Fraction", lambda c: {"w": torch.ones(1), "ratio": _g("fractions", "Fraction")(1, 3)}),
}
PROTOCOLS = [0, 1, 2, 3, 4, 5]


def _write_hostile(path: Path, obj, *, legacy=False, protocol=2):
    if isinstance(obj, bytes):  # a raw pickle as data.pkl of an otherwise valid torch zip
        buf = io.BytesIO()
        torch.save({"w": torch.ones(1)}, buf)
        with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                data = obj if info.filename.endswith("/data.pkl") else src.read(info)
                dst.writestr(info.filename, data)
        return
    torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)


def _assert_refused(path, expected, canary, cli=None):
    with pytest.raises(UnsafePickleError) as e:
        cs.load(path)
    assert expected in str(e.value), str(e.value)
    assert "--trust-pickle" in e.value.one_line()
    assert e.value.globals
    assert not Path(canary).exists(), "payload ran"
    import ctypes

    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p  # putenv changes the C environment, not os.environ
    assert os.environ.get("CKPT_CANARY") is None and getenv(b"CKPT_CANARY") is None


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_zip_never_runs(tmp_path, case):
    expected, build = HOSTILE[case]
    canary = tmp_path / "canary"
    p = tmp_path / "evil.pt"
    _write_hostile(p, build(canary))
    assert not canary.exists()  # writing it ran nothing
    _assert_refused(p, expected, canary)
    rep = cs.scan(str(p))
    assert rep["unsafe"] and not canary.exists()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hostile_every_protocol(tmp_path, protocol):
    canary = tmp_path / "canary"
    p = tmp_path / "evil.pt"
    _write_hostile(p, {"w": torch.ones(2), "x": Reduce(os.system, (_touch_cmd(canary),))}, protocol=protocol)
    _assert_refused(p, "system", canary)


@pytest.mark.parametrize("protocol", [2, 4])
def test_hostile_legacy_format(tmp_path, protocol):
    canary = tmp_path / "canary"
    p = tmp_path / "evil_legacy.pt"
    _write_hostile(p, {"w": torch.ones(2), "x": Reduce(os.system, (_touch_cmd(canary),))}, legacy=True,
                   protocol=protocol)
    _assert_refused(p, "system", canary)
    assert cs.scan(str(p))["unsafe"]


def test_second_data_pkl_in_zip(tmp_path, cli):
    canary = tmp_path / "canary"
    p = tmp_path / "two.pt"
    torch.save({"w": torch.ones(3)}, p)
    with zipfile.ZipFile(p, "a") as zf:
        zf.writestr("two/extra/data.pkl", pickle.dumps(Reduce(os.system, (_touch_cmd(canary),)), protocol=2))
        zf.writestr("evil/data.pkl", pickle.dumps(Reduce(os.system, (_touch_cmd(canary),)), protocol=4))
    ck = cs.load(p)  # the pickle torch reads is benign
    assert list(ck.state) == ["w"] and not canary.exists()
    code, out, err = cli("scan", p)
    assert code == 1 and "posix.system" in out or "os.system" in out
    assert not canary.exists()


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_a_record_name_twice_is_refused_and_scan_shows_every_copy(tmp_path, cli):
    """A zip holding data.pkl twice (the first a payload, the second benign): readers differ on
    which copy they take, and scan keyed its findings by name, so the benign copy hid the
    payload ("ok", exit 0). Now scan lists both copies and the payload's global (exit 1) and
    names the duplicate; loading refuses the archive in one line; nothing runs."""
    canary = tmp_path / "canary"
    p = tmp_path / "twice.pt"
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(p, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("/data.pkl"):
                dst.writestr(info.filename, pickle.dumps(Reduce(os.system, (_touch_cmd(canary),)), protocol=2))
            dst.writestr(info.filename, src.read(info))
    code, out, err = cli("scan", p)
    assert code == 1 and "unsafe global: posix.system" in out and "(copy 2)" in out and "more than once" in out, out
    code, out, err = cli("inspect", p)
    assert code == 2 and "twice" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(cs.CkptSurgeonError):
        cs.load(p, trust_pickle="inert")
    assert not canary.exists()


def test_scan_of_a_folder_reads_every_checkpoint_below_it(tmp_path, cli, monkeypatch):
    """scan of a folder read its top level only, by name: a diffusers pipeline (weights in
    unet/, text_encoder/) or a Llama repo's original/consolidated.00.pth passed "ok" unread, and
    a LICENSE stopped it with an error. Now the tree is walked; files named like docs are passed
    over, other files are read when their bytes are a zip, a pickle, a tar or safetensors (a
    payload renamed to hide is found); a folder with nothing to scan is an error; a Hugging Face
    cache repo folder is scanned as its snapshot."""
    from safetensors.torch import save_file

    canary = tmp_path / "canary"
    top = tmp_path / "pipe"
    for sub in ("unet", "text_encoder", "original", ".git"):
        (top / sub).mkdir(parents=True)
    save_file({"w": torch.ones(2)}, top / "unet" / "diffusion_pytorch_model.safetensors")
    torch.save({"w": torch.ones(2)}, top / "text_encoder" / "pytorch_model.bin")
    torch.save({"w": Reduce(os.system, (_touch_cmd(canary),))}, top / "original" / "consolidated.00.pth")
    (top / "LICENSE").write_text("MIT License\n")
    (top / "model_index.json").write_text("{}")
    (top / ".git" / "packed").write_bytes(b"\x80\x02K\x01.")  # hidden folders are not walked
    code, out, err = cli("scan", top)
    assert code == 1 and "original/consolidated.00.pth: UNSAFE" in out and "unsafe global: posix.system" in out, out + err
    assert "unet/diffusion_pytorch_model.safetensors: ok" in out and "text_encoder/pytorch_model.bin: ok" in out
    assert "LICENSE" not in out and "model_index" not in out and ".git" not in out
    (top / "original" / "consolidated.00.pth").rename(top / "NOTICE")  # no extension: found by its bytes
    code, out, err = cli("scan", top)
    assert code == 1 and "NOTICE: UNSAFE" in out, out + err
    (top / "NOTICE").rename(tmp_path / "NOTICE.keep")
    (top / "broken.pt").write_bytes((top / "text_encoder" / "pytorch_model.bin").read_bytes()[:100])
    code, out, err = cli("scan", top)  # a damaged file: its line in the report, and the error on stderr
    assert code == 2 and "broken.pt: ERROR" in out and "unet/diffusion_pytorch_model.safetensors: ok" in out
    assert err.strip().splitlines() == [f"ckpt-surgeon: error: errors in 1 file (see the report): {top / 'broken.pt'}"], err
    (top / "broken.pt").unlink()
    (tmp_path / "NOTICE.keep").rename(top / "NOTICE")
    # a sub-folder that cannot be listed (as root permissions do not stop it: the listing fails)
    real_scandir = os.scandir

    def scandir(p="."):
        if str(p).endswith("unet"):
            raise PermissionError(13, "Permission denied", str(p))
        return real_scandir(p)

    monkeypatch.setattr(os, "scandir", scandir)
    code, out, err = cli("scan", top)
    monkeypatch.undo()
    assert code == 1 and f"{top / 'unet'}: ERROR {top / 'unet'}: cannot be read (Permission denied)" in out, out
    assert err.strip().splitlines() == [f"ckpt-surgeon: error: errors in 1 file (see the report): {top / 'unet'}"]
    empty = tmp_path / "docs"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "README.md").write_text("# hi")
    code, out, err = cli("scan", empty)
    assert code == 2 and "no checkpoint file in this folder or below it" in err, err
    repo = tmp_path / "models--org--pipe"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (top / "NOTICE").rename(repo / "blobs" / "0123abcd")  # the blob store is not scanned: the snapshot is
    os.symlink(str(top), repo / "snapshots" / "c0ffee")
    code, out, err = cli("scan", repo)
    assert code == 0 and "Hugging Face cache of org/pipe: scanned snapshot c0ffee (its only snapshot)" in err, out + err
    assert out.count(": ok") == 2 and "0123abcd" not in out
    assert not canary.exists()


def test_hostile_hf_shard(tmp_path):
    canary = tmp_path / "canary"
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"a": torch.ones(2)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.ones(2), "x": Reduce(os.system, (_touch_cmd(canary),))},
               folder / "pytorch_model-00002-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    _assert_refused(folder, "system", canary)


def test_env_var_cannot_flip_weights_only(tmp_path):
    canary = tmp_path / "canary"
    p = tmp_path / "evil.pt"
    _write_hostile(p, {"w": torch.ones(2), "x": Reduce(os.system, (_touch_cmd(canary),))})
    exe = Path(sys.executable).with_name("ckpt-surgeon")
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    for args in (["inspect", p], ["strip-prefix", p, "--prefix", "w", "-o", tmp_path / "o.pt"], ["diff", p, p]):
        res = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 2 and "unsafe" in res.stderr.lower() or "allowlist" in res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not canary.exists() and not (tmp_path / "o.pt").exists()


def test_absurd_lengths_in_a_pickle_end_in_one_line(tmp_path, monkeypatch):
    """A damaged length (BYTEARRAY8 of ~5 EB, BINBYTES8 of 4 EB) in data.pkl or in a legacy
    file's pickle: one line naming the file, exit 2 -- CPython < 3.12 also printed a stray
    "SystemError: deallocated bytearray object has exported buffers" when the allocation failed."""
    huge = struct.pack("<Q", 5405527917387122801)
    payloads = {"bytearray8": b"\x80\x05\x96" + huge + b"abc.", "binbytes8": b"\x80\x04\x8e" + huge + b"abc."}
    exe = Path(sys.executable).with_name("ckpt-surgeon")
    for name, pkl in payloads.items():
        zipped = tmp_path / f"{name}.pt"
        _write_hostile(zipped, pkl)
        legacy = tmp_path / f"{name}_legacy.pt"
        torch.save({"w": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
        blob = legacy.read_bytes()
        # the legacy layout: magic, protocol and system-info pickles, then the object's pickle
        f = io.BytesIO(blob)
        for _ in range(3):
            pickle.load(f)
        legacy.write_bytes(blob[:f.tell()] + pkl + blob[f.tell():])
        for path in (zipped, legacy):
            res = subprocess.run([str(exe), "inspect", str(path)], capture_output=True, text=True, timeout=120)
            assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
            assert str(path) in res.stderr and "Traceback" not in res.stderr, res.stderr
    # the filter drops that one message only; anything else reaches the hook that was set
    from ckptsurgeon import pickle_guard

    got = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: got.append(a[1]))
    with pickle_guard.no_stray_bytearray_error():
        sys.excepthook(SystemError, SystemError("deallocated bytearray object has exported buffers"), None)
        sys.excepthook(ValueError, ValueError("other"), None)
    assert [str(e) for e in got] == ["other"] and sys.excepthook is not pickle_guard._quiet_excepthook


def test_a_huge_memo_index_is_refused_before_unpickling(tmp_path, cli):
    """CPython's C unpickler sizes its memo table by the largest index a pickle gives
    (gh-115952): a 1 KB file with LONG_BINPUT 1,175,087,203 made it allocate and zero 19 GB
    (88 s here, or the OOM killer), found by fuzzing a checkpoint's pickle. Each pickle's memo
    is now checked before it is unpickled: one line, at once, in a torch zip, a legacy file and
    a plain pickle; a memory limit on the process shows nothing large is allocated."""
    payloads = {"long_binput": b"\x80\x02}r\x63\x6e\x0a\x46.",  # EMPTY_DICT, LONG_BINPUT 0x460a6e63
                "put": b"\x80\x02(dp2147483000\n."}  # MARK, DICT, PUT 2147483000 (a protocol-0 opcode)
    paths = []
    for name, pkl in payloads.items():
        _write_hostile(tmp_path / f"{name}.pt", pkl)
        legacy = tmp_path / f"{name}_legacy.pt"
        torch.save({"w": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
        blob = legacy.read_bytes()
        f = io.BytesIO(blob)
        for _ in range(3):  # magic, protocol, system info: then the object's pickle
            pickle.load(f)
        legacy.write_bytes(blob[:f.tell()] + pkl + blob[f.tell():])
        (tmp_path / f"{name}.pkl").write_bytes(pkl)
        paths += [tmp_path / f"{name}.pt", legacy, tmp_path / f"{name}.pkl"]
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
              "from ckptsurgeon.cli import main; sys.argv = ['ckpt-surgeon', 'inspect', sys.argv[1]]; main()")
    for path in paths:
        res = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "memo index" in res.stderr and res.stderr.count("\n") == 1, (path, res.stderr)
    # a real pickle's memo passes, whatever its size (every index is below the pickle's length)
    from ckptsurgeon.pickle_guard import check_memo

    big = pickle.dumps([[i, str(i)] for i in range(100_000)], protocol=2)
    assert check_memo(big) == len(big) and check_memo(pickle.dumps({"a": [1.5]}, protocol=0)) > 0


def test_trust_pickle_is_explicit(tmp_path):
    p = tmp_path / "frac.pt"
    import fractions

    torch.save({"w": torch.ones(1), "ratio": fractions.Fraction(1, 3)}, p)
    with pytest.raises(UnsafePickleError, match="fractions.Fraction"):
        cs.load(p)
    ck = cs.load(p, trust_pickle=True)
    assert ck.wrapper is None or True
    assert torch.equal(ck.state["w"].to_torch() if hasattr(ck.state["w"], "to_torch") else ck.state["w"], torch.ones(1))


def test_hostile_corpus_size():
    assert len(HOSTILE) + len(PROTOCOLS) + 2 + 3 >= 30


# --------------------------------------------------------------------------- corrupt inputs
def _valid_zip(tmp_path, side: int = 64) -> bytes:
    p = tmp_path / "valid.pt"
    torch.manual_seed(0)
    torch.save(OrderedDict((f"layer{i}.weight", torch.randn(side, side)) for i in range(6)), p)
    return p.read_bytes()


def _st(header: dict, data: bytes = b"", raw_len: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", raw_len if raw_len is not None else len(h)) + h + data


def _zip_edit(blob: bytes, fn) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = fn(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data)
    return out.getvalue()


def _patch_record(blob: bytes, suffix: str, central: dict, local: dict | None = None) -> bytes:
    """Overwrite little-endian 16-bit fields of the record named ``...suffix``: ``{offset: value}``
    in its central directory entry and in its local header."""
    out = bytearray(blob)
    pos = 0
    while (pos := blob.find(b"PK\x01\x02", pos)) >= 0:
        n = struct.unpack_from("<H", blob, pos + 28)[0]
        if blob[pos + 46:pos + 46 + n].decode().endswith(suffix):
            for off, value in central.items():
                struct.pack_into("<H", out, pos + off, value)
            header = struct.unpack_from("<I", blob, pos + 42)[0]
            for off, value in (local or {}).items():
                struct.pack_into("<H", out, header + off, value)
        pos += 4
    return bytes(out)


def _corrupt_cases(tmp_path):
    z = _valid_zip(tmp_path)
    cases = {
        "empty": b"",
        "random 1 KiB": random.Random(1).randbytes(1024),
        "random 64 KiB": random.Random(2).randbytes(65536),
        "random with zip magic": b"PK\x03\x04" + random.Random(3).randbytes(4000),
        "random with pickle magic": b"\x80\x02" + random.Random(4).randbytes(4000),
        "PNG named .pt": b"\x89PNG\r\n\x1a\n" + b"\0" * 200,
        "text named .pt": b"this is not a checkpoint\n" * 10,
        "gzip": b"\x1f\x8b\x08\x00" + b"\0" * 100,
        "HDF5 (Keras) named .pt": b"\x89HDF\r\n\x1a\n" + b"\0" * 300,
        "GGUF named .pt": b"GGUF\x03\x00\x00\x00" + b"\0" * 300,
        "tar named .pt": b"model_weights.ckpt".ljust(257, b"\0") + b"ustar\x0000" + b"\0" * 300,
        "bad central directory": z[:-60] + b"\xff" * 38 + z[-22:],
        "central directory signature damaged": z.replace(b"PK\x01\x02", b"XY\x01\x02", 1),
        "end of central directory missing": z[:-22],
        "data.pkl garbage": _zip_edit(z, lambda n, d: b"\x80\x02garbage" if n.endswith("data.pkl") else d),
        "data.pkl truncated": _zip_edit(z, lambda n, d: d[: len(d) // 2] if n.endswith("data.pkl") else d),
        "missing storage record": _zip_edit(z, lambda n, d: None if n.endswith("data/3") else d),
        "storage record too short": _zip_edit(z, lambda n, d: d[:100] if n.endswith("data/2") else d),
        "zip without data.pkl": _zip_edit(z, lambda n, d: None if n.endswith("data.pkl") else d),
        "legacy truncated": None,  # filled below
        "legacy garbage after magic": None,
        "st header past EOF": _st({}, raw_len=10_000),
        "st header > 100 MB": struct.pack("<Q", 200_000_000) + b"{" + b" " * 64,
        "st invalid JSON": struct.pack("<Q", 12) + b"{not json!!}",
        "st header is a list": _st([1, 2]),  # type: ignore[arg-type]
        "st overlapping offsets": _st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
        "st out-of-range offsets": _st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
        "st gap": _st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
        "st unknown dtype": _st({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "st shape overflow": _st({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, b"\0" * 4),
        "st negative shape": _st({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "st offsets disagree with shape": _st({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4),
        "st trailing bytes": _st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9),
        "st truncated data": _st({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 7),
        "st metadata not strings": _st({"__metadata__": {"a": 1}}),
        "st entry not an object": _st({"a": 5}),
        "st duplicate name": (lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 16)(
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'),
    }
    buf = io.BytesIO()
    torch.save({"w": torch.randn(100)}, buf, _use_new_zipfile_serialization=False)
    leg = buf.getvalue()
    cases["legacy truncated"] = leg[: len(leg) // 2]
    cases["legacy magic only"] = leg[:16]
    cases["st zero-length header"] = struct.pack("<Q", 0) + b"\0" * 32
    fourth = [i for i in range(len(z)) if z.startswith(b"PK\x03\x04", i)][5]
    cases["local header of a storage damaged"] = z[:fourth] + b"XXXX" + z[fourth + 4:]
    cases["legacy garbage after magic"] = leg[:40] + random.Random(5).randbytes(300)
    for frac in (0.05, 0.3, 0.5, 0.7, 0.95):
        cases[f"zip truncated at {int(frac * 100)}%"] = z[: int(len(z) * frac)]
    cases["zip minus last byte"] = z[:-1]
    # what zipfile refuses in its own ways: NotImplementedError, RuntimeError
    cases["zip version 17.0 needed"] = _patch_record(z, "data.pkl", {6: 170})
    cases["data.pkl encrypted"] = _patch_record(z, "data.pkl", {8: 0x0809}, {6: 0x0809})
    cases["data.pkl compression method 99"] = _patch_record(z, "data.pkl", {10: 99}, {8: 99})
    cases["storage record compression method 99"] = _patch_record(z, "data/2", {10: 99}, {8: 99})
    # views that reach outside their storage: a contiguous one is copied as a byte range, so an
    # offset one element too far once wrote the next zip structure's bytes as the tensor's (exit 0)
    def view_edit(old, new):
        return _zip_edit(z, lambda n, d: d.replace(old, new, 1) if n.endswith("data.pkl") else d)

    cases["tensor offset one element past its storage"] = view_edit(b"K\x00K@K@\x86", b"K\x01K@K@\x86")
    cases["tensor of negative size"] = view_edit(b"K\x00K@K@\x86", b"K\x00J\xc0\xff\xff\xffK@\x86")
    cases["tensor stride past its storage"] = view_edit(b"K@K\x01\x86", b"K@K\x02\x86")
    cases["data.pkl length of exabytes"] = _zip_edit(
        z, lambda n, d: b"\x80\x05\x96" + struct.pack("<Q", 5 << 60) + b"abc." if n.endswith("data.pkl") else d)
    # the usual wrong downloads: a clone without git-lfs, a saved login or error page
    cases["Git LFS pointer"] = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 440473133\n"
    cases["HTML page"] = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n"
    return cases


def _one_line_error(code, out, err):
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt-surgeon: error:"), err
    assert "Traceback" not in err and "internal error" not in err, err


_SCANNED = ("zip truncated", "zip minus", "zip version", "data.pkl")  # damaged zips scan also reads


def test_corrupt_inputs_clean_errors(tmp_path, cli):
    cases = _corrupt_cases(tmp_path)
    ext = {True: ".safetensors", False: ".pt"}
    n = 0
    for name, blob in cases.items():
        p = tmp_path / ("bad" + ext[name.startswith("st ")])
        p.write_bytes(blob)
        for cmd in (["convert", p, "-o", tmp_path / "out.pt"], ["strip-prefix", p, "--prefix", "x", "-o", tmp_path / "o2.safetensors"],
                    ["diff", p, p]) + ((["scan", p],) if name.startswith(_SCANNED) else ()):
            code, out, err = cli(*cmd)
            assert code == 2, (name, cmd[0], out)
            _one_line_error(code, out, err)
            n += 1
        assert not (tmp_path / "out.pt").exists() and not (tmp_path / "o2.safetensors").exists(), name
        assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".")) == [], name
    assert len(cases) >= 40



def _deeply_nested(tmp_path, depth: int) -> Path:
    """A valid torch zip whose wrapper holds `depth` nested lists (pickle builds them without
    recursion; torch.load reads it)."""
    torch.save({"state_dict": {"w": torch.ones(2)}, "deep": 0}, tmp_path / "base.pt")
    with zipfile.ZipFile(tmp_path / "base.pt") as z:
        records = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in records if n.endswith("/data.pkl"))
    pkl = records[name]
    at = pkl.index(b"X\x04\x00\x00\x00deep") + 9
    memo_put = 2 if pkl[at:at + 1] == b"q" else 0
    value = at + memo_put
    assert pkl[value:value + 2] == b"K\x00"
    records[name] = pkl[:value] + b"]" * depth + b"a" * (depth - 1) + pkl[value + 2:]
    out = tmp_path / f"deep{depth}.pt"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for n, data in records.items():
            z.writestr(n, data)
    return out


def test_shared_and_deep_pickles_stay_bounded(tmp_path, cli):
    """A 2 KB pickle can share one list between both slots of another, sixty levels deep (2^60
    paths for a tree walk), share one dict under 1000 keys per level, or nest 100,000 lists:
    loading and diff stay bounded (diff says where it stopped); writing back a pickle nested
    past Python's recursion limit is one clear line."""
    x = [1]
    for _ in range(60):
        x = [x, x]
    torch.save({"state_dict": {"w": torch.ones(2)}, "bomb": x}, tmp_path / "laughs.pt")
    rep = cs.diff(tmp_path / "laughs.pt", tmp_path / "laughs.pt")  # unbounded, this never returned
    assert len(rep["notes"]) == 2 and "200,000 items" in rep["notes"][0]
    # wide instead of deep: one dict under 1000 keys of another, 8 levels (1000^8 paths); the
    # state-dict search and diff both meet it
    d = {"w": torch.ones(1)}
    for _ in range(8):
        d = {f"k{j}": d for j in range(1000)}
    torch.save({"state_dict": {"w": torch.ones(2)}, "wide": d}, tmp_path / "wide.pt")
    assert cli("inspect", tmp_path / "wide.pt")[0] == 0
    assert cs.diff(tmp_path / "wide.pt", tmp_path / "wide.pt")["notes"]

    deep = _deeply_nested(tmp_path, 100_000)
    assert isinstance(torch.load(deep, weights_only=True)["deep"], list)
    for cmd in (["inspect", deep], ["inspect", deep, "--json"], ["scan", deep],
                ["convert", deep, "-o", tmp_path / "ok.safetensors"]):
        code, _out, err = cli(*cmd)
        assert code == 0, (cmd, err)
    code, out, err = cli("diff", deep, deep, "--json")
    assert code == 0 and "100 levels" in json.loads(out)["notes"][0]
    code, out, err = cli("convert", deep, "-o", tmp_path / "no.pt")
    _one_line_error(code, out, err)
    assert "nested too deeply" in err and not (tmp_path / "no.pt").exists()
    # a modest nesting is content like any other: compared in full, written back as it was
    shallow = _deeply_nested(tmp_path, 50)
    assert cli("convert", shallow, "-o", tmp_path / "s.pt")[0] == 0
    got = torch.load(tmp_path / "s.pt", weights_only=True)["deep"]
    for _ in range(49):
        got = got[0]
    assert got == []
    assert cs.diff(shallow, tmp_path / "s.pt")["notes"] == []

def test_shared_containers_in_every_place_stay_bounded(tmp_path):
    """One container shared under thousands of keys, three deep, in each place a checkpoint holds
    things: the top level (no state dict), the wrapper, a state dict's non-tensor entry, the
    candidates themselves (one 2,000-tensor mapping under 2,000 names), a list. Files of 14-99 KB;
    before, three of these took 8 * 10^9 steps (numpy-weights lookup, safetensors' check of
    non-tensor entries, inspect's candidate sizes). Every command ends, with a result or one line."""
    inner = {f"k{i}": 1 for i in range(2000)}
    mid = {f"m{i}": inner for i in range(2000)}
    top = {f"t{i}": mid for i in range(2000)}
    lst = [[[1] * 2000] * 2000] * 2000
    t = torch.ones(2)
    tensors = {f"k{i}": t for i in range(2000)}
    files = {"top.pt": top, "wrapper.pt": {"state_dict": {"w": torch.ones(2)}, "meta": top},
             "entry.pt": {"state_dict": {"w": torch.ones(2), "x": lst}, "hist": lst},
             "candidates.pt": {"model": {f"m{i}": tensors for i in range(2000)}}}
    exe = str(Path(sys.executable).with_name("ckpt-surgeon"))
    for name, obj in files.items():
        path = tmp_path / name
        torch.save(obj, path)
        for cmd in (["inspect", path], ["convert", path, "-o", tmp_path / "o.safetensors"],
                    ["convert", path, "-o", tmp_path / "o.pt"], ["extract", path, "--layers", "re:.", "-o", tmp_path / "e.pt"],
                    ["cast", path, "--dtype", "bfloat16", "-o", tmp_path / "c.pt"], ["diff", path, path]):
            res = subprocess.run([exe, *map(str, cmd)], capture_output=True, text=True, timeout=120)
            assert res.returncode in (0, 1, 2) and "Traceback" not in res.stderr, (name, cmd, res.stderr)
            if res.returncode == 2:
                assert res.stderr.count("\n") == 1, (name, cmd, res.stderr)


@pytest.mark.parametrize("side", [64, 256])  # 16 KiB records are read and checked inline, 256 KiB kernel-copied
def test_flipped_tensor_byte_is_caught(tmp_path, cli, side):
    z = bytearray(_valid_zip(tmp_path, side))
    with zipfile.ZipFile(io.BytesIO(bytes(z))) as zf:
        info = zf.getinfo("valid/data/2")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    hdr = struct.unpack("<IHHHHHIIIHH", bytes(z[info.header_offset:info.header_offset + 30]))
    start = info.header_offset + 30 + hdr[9] + hdr[10]
    z[start + 100] ^= 0x40
    p = tmp_path / "flip.pt"
    p.write_bytes(bytes(z))
    for cmd in (["convert", p, "-o", tmp_path / "o.pt"], ["convert", p, "-o", tmp_path / "o.safetensors"],
                ["strip-prefix", p, "--prefix", "layer", "--partial", "-o", tmp_path / "o3.pt"]):
        code, out, err = cli(*cmd)
        _one_line_error(code, out, err)
        assert "CRC" in err
    code, out, err = cli("diff", p, tmp_path / "valid.pt")
    _one_line_error(code, out, err)
    assert not list(tmp_path.glob("o*"))


def test_sharded_index_errors(tmp_path, cli):
    folder = tmp_path / "hf"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, folder / "s1.safetensors")
    secret = tmp_path / "secret.safetensors"
    save_file({"b": torch.ones(2)}, secret)
    cases = {
        "missing shard": {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}},
        "outside the folder": {"weight_map": {"a": "s1.safetensors", "b": "../secret.safetensors"}},
        "absolute path": {"weight_map": {"b": str(secret)}},
        "no weight_map": {"metadata": {}},
        "tensor not in shard": {"weight_map": {"zz": "s1.safetensors"}},
    }
    for name, index in cases.items():
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        code, out, err = cli("convert", folder, "-o", tmp_path / "o.pt")
        _one_line_error(code, out, err)
    (folder / "model.safetensors.index.json").write_text("{oops")
    _one_line_error(*cli("inspect", folder))
    with open(folder / "model.safetensors.index.json", "wb") as f:  # 600 MB (sparse): refused unread
        f.truncate(600 << 20)
    code, out, err = cli("inspect", folder)
    _one_line_error(code, out, err)
    assert "more than any real index holds" in err
    assert not (tmp_path / "o.pt").exists()


def test_path_and_output_errors(tmp_path, sample_dir, cli, monkeypatch):
    good = sample_dir / "seednet.pt"
    _one_line_error(*cli("inspect", tmp_path / "missing.pt"))
    (tmp_path / "d").mkdir()
    _one_line_error(*cli("inspect", tmp_path / "d"))  # a directory without weights
    (tmp_path / "tf").mkdir()  # a transformers folder with TensorFlow weights only: said so
    (tmp_path / "tf" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "tf" / "tf_model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    code, out, err = cli("inspect", tmp_path / "tf")
    _one_line_error(code, out, err)
    assert "TensorFlow or Flax weights only (tf_model.h5)" in err and "from_tf=True" in err, err
    _one_line_error(*cli("convert", good, "-o", tmp_path / "no" / "such" / "dir.pt"))
    (tmp_path / "afile").write_text("x")
    _one_line_error(*cli("convert", good, "-o", tmp_path / "afile" / "x.pt"))
    (tmp_path / "dir.pt").mkdir()
    _one_line_error(*cli("convert", good, "-o", tmp_path / "dir.pt"))  # output is a directory
    _one_line_error(*cli("convert", good, "-o", good))  # the input itself
    for size in ("0", "0MB", "-5GB", "abc"):
        code, out, err = cli("convert", good, "-o", tmp_path / "shards", "--max-shard-size", size)
        _one_line_error(code, out, err)
        assert "size" in err and not (tmp_path / "shards").exists()
    code, out, err = cli("convert", good, "-o", "-")  # stdout: never a file named "-"
    _one_line_error(code, out, err)
    assert "standard output" in err and not os.path.exists("-")
    _one_line_error(*cli("extract", good, "--layers", "nothere", "-o", tmp_path / "e.pt"))
    _one_line_error(*cli("rename", good, "--map", "zzz=>y", "-o", tmp_path / "e.pt"))
    _one_line_error(*cli("rename", good, "--map", r"\.weight$=>.bias", "-o", tmp_path / "e.pt"))  # collision
    assert not (tmp_path / "e.pt").exists()


def test_output_through_links_and_never_over_special_files(tmp_path, sample_dir, cli):
    """-o through a symbolic link writes the link's target (as torch.save and cp do) and keeps
    the link; an output that is a FIFO or a device is refused, never renamed over (as root a
    rename replaced /dev/full with a regular file)."""
    import stat

    import ckptsurgeon as cs

    good = sample_dir / "seednet.pt"
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "model.pt"
    target.write_bytes(b"old")
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    code, out, err = cli("convert", good, "-o", link)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    a, b = torch.load(good, weights_only=True), torch.load(target, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["model.pt"]  # no temp left
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "real" / "new.safetensors")
    cs.save(cs.load(good), dangling)
    assert dangling.is_symlink() and (tmp_path / "real" / "new.safetensors").stat().st_size > 0

    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    _one_line_error(*cli("convert", good, "-o", fifo))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(cs.CkptSurgeonError, match="not a regular file"):
        cs.save(cs.load(good), fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    # a pipe as input (`inspect <(cat x.pt)`): one line naming it, never "damaged zip container"
    code, out, err = cli("inspect", fifo)
    _one_line_error(code, out, err)
    assert "is a pipe" in err and "damaged" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.safetensors", "link.pt", "pipe.pt", "real"]


def test_disk_full_leaves_nothing(tmp_path, sample_dir, cli, monkeypatch):
    """A writer that runs out of space mid-file: a clean error, no output, no temp file."""
    import ckptsurgeon.zipwrite as zf

    real_write, real_copy = os.pwrite, os.copy_file_range
    written = {"n": 0}

    def count(nbytes):  # the "disk" fills up after 64 KiB
        written["n"] += nbytes
        if written["n"] > 64 << 10:
            raise OSError(28, "No space left on device")

    def full_write(fd, data, offset):
        count(memoryview(data).nbytes)
        return real_write(fd, data, offset)

    def full_copy(src, dst, n, offset_src=None, offset_dst=None):
        count(n)
        return real_copy(src, dst, n, offset_src, offset_dst)

    monkeypatch.setattr(zf.os, "pwrite", full_write)
    monkeypatch.setattr(zf.os, "copy_file_range", full_copy)
    for out in ("o.pt", "o.safetensors"):
        written["n"] = 0
        code, o, err = cli("convert", sample_dir / "seednet_resume.pt", "-o", tmp_path / out)
        _one_line_error(code, o, err)
        assert "space" in err
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_traceback(tmp_path, cli):
    code, out, err = cli("--debug", "inspect", tmp_path / "missing.pt")
    assert code == 2 and "Traceback" in err


def test_a_platform_without_positional_io_is_one_line(sample_dir, monkeypatch, cli):
    """Windows' Python has no os.pread/os.pwrite, which every reader and writer uses: one line
    that says so, not an AttributeError from deep inside a reader."""
    monkeypatch.delattr(os, "pread")
    code, out, err = cli("inspect", sample_dir / "seednet_dp.pt")
    assert code == 2 and "positional file I/O" in err and "Linux or macOS" in err and len(err.splitlines()) == 1, err


# --------------------------------------------------------------------------- killed writes
def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigkill_never_tears_output(tmp_path):
    big = tmp_path / "big_dp.pt"
    g = torch.Generator().manual_seed(0)
    torch.save(OrderedDict((f"module.layer{i}.weight", torch.randn(128, 256, generator=g)) for i in range(600)), big)
    src_hash = _sha(big)
    exe = Path(sys.executable).with_name("ckpt-surgeon")
    out = tmp_path / "out.pt"

    def run_once(kill_after=None):
        proc = subprocess.Popen([str(exe), "-q", "strip-prefix", str(big), "-o", str(out), "--in-place"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill_after is None:
            return proc.wait(timeout=120)
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=60)

    t0 = time.perf_counter()
    assert run_once() == 0
    duration = time.perf_counter() - t0
    expected = 600
    assert len(torch.load(out, weights_only=True, mmap=True)) == expected
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # a normal run leaves no temp
    rng = random.Random(1234)
    trials = torn = 0
    for trial in range(50):
        if trial < 25 and out.exists():
            out.unlink()  # first half: no previous output; second half: -o onto an existing file
        previous = _sha(out) if out.exists() else None
        run_once(rng.uniform(0, duration * 1.1))
        trials += 1
        if out.exists():
            try:
                sd = torch.load(out, weights_only=True, mmap=True)
                assert len(sd) == expected and all(k.startswith("layer") for k in sd)
            except Exception:
                torn += 1
            if previous is not None and _sha(out) != previous:
                # replaced: must be a complete file (checked above)
                pass
        assert _sha(big) == src_hash
        for tmp in tmp_path.glob(".out.pt.*.tmp"):
            tmp.unlink()  # leftovers of a killed process are never at the output path
    assert trials == 50 and torn == 0


# --------------------------------------------------------------------------- fuzzing
FUZZ_EXAMPLES = int(os.environ.get("CKPT_FUZZ_EXAMPLES", "150"))


def _seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzseeds")
    torch.manual_seed(0)
    sd = OrderedDict([("a.weight", torch.randn(4, 3)), ("a.bias", torch.randn(4)), ("n", torch.tensor(3))])
    torch.save({"model": sd, "epoch": 1}, d / "z.pt")
    from safetensors.torch import save_file

    save_file(dict(sd), d / "s.safetensors")
    torch.save(sd, d / "l.pt", _use_new_zipfile_serialization=False)
    import fractions
    import functools

    torch.save({"model": sd, "ratio": fractions.Fraction(1, 3), "fn": functools.partial(max, 2), "tags": {1, 2}},
               d / "i.pt")
    import pickle

    with open(d / "p.pkl", "wb") as f:  # a plain pickle of numpy arrays (Detectron2's .pkl)
        pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "fuzz"}, f, protocol=4)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    torch.jit.script(net).save(str(d / "j.pt"))  # program archives: read for their weights
    torch.export.save(torch.export.export(net, (torch.randn(2, 3),)), str(d / "e.pt2"))
    return {k: (d / f).read_bytes() for k, f in (("zip", "z.pt"), ("st", "s.safetensors"), ("legacy", "l.pt"),
                                                 ("inert", "i.pt"), ("pkl", "p.pkl"), ("jit", "j.pt"),
                                                 ("pt2", "e.pt2"))}


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory):
    return _seeds(tmp_path_factory)


@pytest.mark.parametrize("kind", ["zip", "st", "legacy", "inert", "pkl", "jit", "pt2"])
def test_fuzz_loaders_raise_only_our_errors(kind, fuzz_seeds, tmp_path_factory):
    """Byte flips and truncations: only ckpt-surgeon's own errors escape, reading, writing a
    safetensors copy and diffing against the undamaged file. "inert" loads a file with foreign
    globals with --inert-pickle (flipped names become inert records too) and writes what it read
    back out, through the inert writer."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    seed = fuzz_seeds[kind]
    work = tmp_path_factory.mktemp(f"fuzz_{kind}")
    ext = {"st": ".safetensors", "pkl": ".pkl", "pt2": ".pt2"}.get(kind, ".pt")
    path, original = work / f"f{ext}", work / f"seed{ext}"
    original.write_bytes(seed)

    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), min_size=1, max_size=8),
           st.one_of(st.none(), st.integers(1, len(seed))))
    def check(flips, cut):
        blob = bytearray(seed)
        for pos, val in flips:
            blob[pos] = val
        if cut is not None:
            blob = blob[:cut]
        path.write_bytes(bytes(blob))
        try:
            ck = cs.load(path, trust_pickle="inert" if kind == "inert" else False)
            for _name, v in ck.tensor_items():
                t = v.to_torch() if hasattr(v, "to_torch") else v
                t.sum()
            if kind == "inert":
                cs.save(ck, work / "out.pt")
                cs.load(work / "out.pt", trust_pickle="inert")
            else:  # the writers and the diff read the damaged bytes their own ways (mapped, pread, copied)
                cs.save(ck, work / "out.safetensors", in_place=True)
                cs.diff(ck, cs.load(original))
        except CkptSurgeonError:
            pass

    check()


# (offset, size) of the fields of each zip structure: local header, central directory entry,
# end of central directory, zip64 end record and locator, data descriptor
_ZIP_FIELDS = {b"PK\x03\x04": [(4, 2), (6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
               b"PK\x01\x02": [(6, 2), (8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2),
                               (34, 2), (42, 4)],
               b"PK\x05\x06": [(4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
               b"PK\x06\x06": [(24, 8), (32, 8), (40, 8), (48, 8)],
               b"PK\x06\x07": [(8, 8), (16, 4)],
               b"PK\x07\x08": [(4, 4), (8, 4), (12, 4)]}


def _zip_fields(blob: bytes):
    at = blob.find(b"PK")
    while at >= 0:
        for off, size in _ZIP_FIELDS.get(blob[at:at + 4], ()):
            if at + off + size <= len(blob):
                yield at + off, size
        at = blob.find(b"PK", at + 2)


def test_damaged_zip_headers_never_give_other_tensors(tmp_path):
    """Every field of every zip structure (sizes, offsets, name and extra lengths, CRCs, counts,
    flags, versions) set to edge values: a load ends in our own error, or reads exactly the
    tensors of the undamaged file (headers torch's reader refuses but whose data is intact), and
    so does a copy written from it (kernel-copied records, CRC-checked). A zip64 file (writer
    threshold lowered) carries the zip64 records too."""
    from ckptsurgeon import zipwrite

    torch.manual_seed(0)
    sd = OrderedDict((f"l{i}.weight", torch.randn(6 + i, 3)) for i in range(3))
    sd["tied"] = sd["l0.weight"]
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    z64 = tmp_path / "z64.pt"
    old = zipwrite.ZIP64_AT
    zipwrite.ZIP64_AT = 0
    try:
        cs.save(cs.load(plain), z64)
    finally:
        zipwrite.ZIP64_AT = old
    want = {k: v.clone() for k, v in sd.items()}
    damaged, out = tmp_path / "d.pt", tmp_path / "o.pt"
    outcomes = {"error": 0, "same": 0}
    for src in (plain, z64):
        blob = src.read_bytes()
        fields = list(_zip_fields(blob))
        assert len(fields) > 40
        for at, size in fields:
            cur = int.from_bytes(blob[at:at + size], "little")
            top = (1 << (8 * size)) - 1
            for new in {0, top, cur + 1, len(blob)} - {cur}:
                bad = bytearray(blob)
                bad[at:at + size] = (new & top).to_bytes(size, "little")
                damaged.write_bytes(bytes(bad))
                try:
                    ck = cs.load(damaged)
                    got = {k: v.to_torch() for k, v in ck.tensor_items()}
                    cs.save(ck, out, in_place=True)
                    back = torch.load(out, weights_only=True, mmap=True)
                except CkptSurgeonError:
                    outcomes["error"] += 1
                    continue
                where = f"{src.name}: field at {at} ({size} B) {cur} -> {new}"
                assert got.keys() == want.keys() and back.keys() == want.keys(), where
                assert all(torch.equal(got[k], want[k]) and torch.equal(back[k], want[k]) for k in want), where
                outcomes["same"] += 1
    assert outcomes["error"] > 100 and outcomes["same"] > 100, outcomes


def test_safe_globals_env_allows_named_data_types(tmp_path, monkeypatch):
    import fractions

    p = tmp_path / "frac.pt"
    torch.save({"model": {"w": torch.ones(1)}, "ratio": fractions.Fraction(1, 3)}, p)
    with pytest.raises(UnsafePickleError) as e:
        cs.load(p)
    assert "CKPT_SURGEON_SAFE_GLOBALS" in e.value.one_line()
    monkeypatch.setenv("CKPT_SURGEON_SAFE_GLOBALS", "fractions.Fraction")
    ck = cs.load(p)
    assert ck.wrapper["ratio"] == fractions.Fraction(1, 3)
    assert cs.scan(str(p))["unsafe"] == []
    # other globals stay refused, and nothing runs
    canary = tmp_path / "canary"
    _write_hostile(tmp_path / "evil.pt", {"w": torch.ones(1), "x": Reduce(os.system, (_touch_cmd(canary),))})
    _assert_refused(tmp_path / "evil.pt", "system", canary)


def test_plain_data_types_of_training_scripts_load_by_default(tmp_path, cli):
    """timm's train.py saves argparse args beside the weights, configs carry paths: read by
    default (nothing of the file's choosing runs), kept when written back; other globals in the
    same file are still refused and never run."""
    import argparse
    import pathlib

    sd = OrderedDict((f"module.l{i}.weight", torch.randn(2, 2)) for i in range(3))
    p = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"epoch": 3, "state_dict": sd, "state_dict_ema": sd, "metric": 0.5,
                "args": argparse.Namespace(lr=0.1, model="resnet50", out=pathlib.PurePosixPath("/runs/a"))}, p)
    ck = cs.load(p)
    assert ck.sd_path == ("state_dict",) and ck.wrapper["args"].model == "resnet50"
    assert ck.source.lazy  # the torch-free fast path, not torch.load
    assert cs.scan(str(p))["unsafe"] == []
    code = ("import sys, ckptsurgeon as cs\n"
            f"new, _ = cs.strip_prefix(cs.load({str(p)!r}))\n"
            f"cs.save(new, {str(tmp_path / 'fast.pth.tar')!r})\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "NO-TORCH", out.stderr
    code, _, err = cli("strip-prefix", p, "-o", tmp_path / "stripped.pth.tar")
    assert code == 0, err
    back = torch.load(tmp_path / "stripped.pth.tar", weights_only=False)
    assert back["args"] == argparse.Namespace(lr=0.1, model="resnet50", out=pathlib.PurePosixPath("/runs/a"))
    assert list(back["state_dict"]) == ["l0.weight", "l1.weight", "l2.weight"]
    assert torch.equal(back["state_dict"]["l1.weight"], sd["module.l1.weight"])

    canary = tmp_path / "canary"
    _write_hostile(tmp_path / "evil.pt", {"w": torch.ones(1), "args": argparse.Namespace(lr=0.1),
                                          "x": Reduce(os.system, (_touch_cmd(canary),))})
    _assert_refused(tmp_path / "evil.pt", "system", canary)


@pytest.mark.parametrize("legacy", [False, True])
def test_timestamps_decimals_deques_and_uuids_load_by_default(tmp_path, cli, legacy):
    """What a training loop records beside the weights -- when it saved (datetime, with a fixed
    UTC offset too), how long it ran (timedelta), a Decimal, a metrics window (deque), a run id
    (UUID) -- torch.load(weights_only=True) refuses; they are read by default (torch-free for a
    zip), kept when written back, and compared by diff. A tzinfo of another class (zoneinfo, which
    reads the system's tz database) stays refused."""
    import collections
    import datetime
    import decimal
    import uuid

    offset = datetime.timezone(datetime.timedelta(hours=-5))
    extra = {"saved": datetime.datetime(2026, 11, 28, 9, 30, 5, 120), "utc": datetime.datetime(2026, 1, 1, tzinfo=offset),
             "day": datetime.date(2026, 1, 2), "at": datetime.time(3, 4, 5), "ran": datetime.timedelta(hours=7, seconds=3),
             "lr": decimal.Decimal("0.0003"), "window": collections.deque([0.5, 0.25], maxlen=20),
             "run": uuid.UUID(int=0x1234)}
    sd = OrderedDict([("module.l.weight", torch.randn(2, 2))])
    p = tmp_path / "resume.pt"
    torch.save({"state_dict": sd, "meta": extra}, p, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(Exception):
        torch.load(p, weights_only=True)
    ck = cs.load(p)
    assert ck.wrapper["meta"] == extra and ck.wrapper["meta"]["window"].maxlen == 20
    assert ck.source.lazy  # the torch-free reader, legacy files too
    assert cs.scan(str(p))["unsafe"] == []
    code, _, err = cli("strip-prefix", p, "-o", tmp_path / "s.pt")
    assert code == 0, err
    back = torch.load(tmp_path / "s.pt", weights_only=False)
    assert back["meta"] == extra and list(back["state_dict"]) == ["l.weight"]
    code, out, err = cli("diff", p, tmp_path / "s.pt")
    assert code == 0 and "identical" in out, out + err
    changed = dict(extra, saved=datetime.datetime(2026, 11, 29))
    torch.save({"state_dict": sd, "meta": changed}, tmp_path / "later.pt")
    code, out, err = cli("diff", p, tmp_path / "later.pt")
    assert code == 1 and "saved" in out, out + err

    import zoneinfo

    try:
        zone = zoneinfo.ZoneInfo("UTC")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no tz database here")
    torch.save({"w": torch.ones(1), "t": datetime.datetime(2026, 1, 1, tzinfo=zone)}, tmp_path / "zone.pt")
    code, _, err = cli("inspect", tmp_path / "zone.pt")
    assert code == 2 and "zoneinfo.ZoneInfo" in err


def test_builtin_containers_stay_on_the_fast_path(tmp_path):
    """Protocol-2 pickles (torch.save's) name builtins the Python 2 way (``__builtin__ set``): the
    torch-free unpickler maps them as pickle does, so sets, Counters, bytearrays, complex numbers
    and slices in a wrapper keep the lazy path, round-trip, and torch.load reads the result."""
    import collections

    p = tmp_path / "containers.pt"
    extra = {"s": {1, 2}, "fs": frozenset([3]), "c": collections.Counter(a=2), "ba": bytearray(b"xy"),
             "z": 1 + 2j, "sl": slice(1, 8, 2)}
    torch.save({"state_dict": {"module.w": torch.arange(3.0)}, **extra}, p)
    ck = cs.load(p)
    assert ck.source.lazy and {k: ck.wrapper[k] for k in extra} == extra
    new, _ = cs.strip_prefix(ck)
    cs.save(new, tmp_path / "out.pt")
    back = torch.load(tmp_path / "out.pt", weights_only=False)
    assert {k: back[k] for k in extra} == extra and torch.equal(back["state_dict"]["w"], torch.arange(3.0))
    assert cs.load(tmp_path / "out.pt").source.lazy


def test_transformer_engine_extra_state_buffers_load_by_default(tmp_path, cli):
    """Transformer Engine (Megatron, NeMo) saves each layer's ``_extra_state`` inside the state
    dict as an io.BytesIO: read by default on the fast path, carried through a surgery intact."""
    import io

    buf = io.BytesIO(b"fp8 scaling state")
    buf.seek(3)
    p = tmp_path / "te.pt"
    torch.save(OrderedDict([("module.l.weight", torch.ones(2)), ("module.l._extra_state", buf)]), p)
    ck = cs.load(p)
    assert ck.source.lazy and ck.state["module.l._extra_state"].getvalue() == b"fp8 scaling state"
    assert cs.scan(str(p))["unsafe"] == []
    code, _, err = cli("strip-prefix", p, "-o", tmp_path / "out.pt")
    assert code == 0, err
    back = torch.load(tmp_path / "out.pt", weights_only=False)
    assert back["l._extra_state"].getvalue() == b"fp8 scaling state" and back["l._extra_state"].tell() == 3


def test_numpy_numbers_load_by_default_object_arrays_do_not(tmp_path, cli, monkeypatch):
    """Resume checkpoints carry numpy numbers: np.random.get_state() (a uint32 array), metrics
    and epochs as numpy scalars, structured arrays. They load by default (numpy.dtype('f8') is
    rebuilt as numpy.dtypes.Float64DType, a class no GLOBAL names, so those classes are allowed
    too), scan calls them safe, and strip-prefix carries them through. An object array (arbitrary
    elements) stays refused: the static scan names numpy.dtypes.ObjectDType, and if a scan ever
    missed such a class, torch's own refusal is reported as an unsafe pickle naming it."""
    import numpy as np

    from ckptsurgeon import pickle_scan

    sd = OrderedDict((f"module.l{i}.weight", torch.randn(2, 2)) for i in range(2))
    rng = np.random.RandomState(0).get_state()
    p = tmp_path / "resume.pt"
    torch.save({"state_dict": sd, "epoch": np.int64(7), "best_acc": np.float64(0.93), "lr": np.float32(0.5),
                "np_rng": rng, "ids": np.arange(3), "rec": np.zeros(2, dtype=[("x", "f4"), ("y", "i2")]),
                "flag": np.bool_(True), "when": np.datetime64("2026-11-27"), "kind": np.dtype("float16"),
                "cls": np.dtype}, p)
    ck = cs.load(p)
    assert ck.sd_path == ("state_dict",) and ck.source.lazy  # torch-free fast path
    assert ck.wrapper["epoch"] == 7 and float(ck.wrapper["best_acc"]) == 0.93
    assert np.array_equal(ck.wrapper["np_rng"][1], rng[1]) and ck.wrapper["np_rng"][1].dtype == np.uint32
    assert cs.scan(str(p))["unsafe"] == []
    from ckptsurgeon.summary import inspect

    summary = inspect(p)
    assert summary["wrapper"]["epoch"] == "7" and summary["wrapper"]["best_acc"] == "0.93"
    assert summary["wrapper"]["ids"] == "ndarray int64[3]"
    code, _, err = cli("strip-prefix", p, "-o", tmp_path / "out.pt")
    assert code == 0, err
    back = torch.load(tmp_path / "out.pt", weights_only=False)
    assert list(back["state_dict"]) == ["l0.weight", "l1.weight"]
    assert torch.equal(back["state_dict"]["l1.weight"], sd["module.l1.weight"])
    assert type(back["epoch"]) is np.int64 and back["rec"].dtype.names == ("x", "y")
    assert np.array_equal(back["np_rng"][1], rng[1]) and back["when"] == np.datetime64("2026-11-27")
    assert back["kind"] == np.float16 and back["cls"] is np.dtype

    # numpy < 2 writes the same functions as numpy.core.multiarray.*
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}, "best": np.float64(0.5), "ids": np.arange(2)}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(tmp_path / "numpy1.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
                assert b"numpy.core.multiarray" in data
            dst.writestr(info.filename, data)
    ck = cs.load(tmp_path / "numpy1.pt")
    assert float(ck.wrapper["best"]) == 0.5 and list(ck.wrapper["ids"]) == [0, 1]

    obj = tmp_path / "objects.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": np.array([{"a": 1}, None], dtype=object)}, obj)
    with pytest.raises(UnsafePickleError) as e:
        cs.load(obj)
    assert "numpy.dtypes.ObjectDType" in e.value.one_line() and "nothing was executed" in e.value.one_line()
    assert cs.scan(str(obj))["unsafe"] == ["numpy.dtypes.ObjectDType"]
    code, _, err = cli("inspect", obj)
    assert code != 0 and "ObjectDType" in err and "Traceback" not in err

    monkeypatch.setattr(pickle_scan, "_numpy_dtype_class", lambda code: None)  # a scan that misses it
    with pytest.raises(UnsafePickleError) as e:
        cs.load(obj)
    assert "numpy.dtypes.ObjectDType" in e.value.one_line() and "refuses" in e.value.one_line()


_FOREIGN = '''
import dataclasses, enum
class HistoryBuffer:
    def __init__(self, vals):
        self._log = list(vals)
        self.max_length = 10
class Mode(enum.Enum):
    TRAIN = "train"
@dataclasses.dataclass
class Cfg:
    lr: float
    layers: list
class Tags(list):
    pass
class Meta(dict):
    pass
class Slotted:
    __slots__ = ("a", "b")
    def __init__(self, a):
        self.a, self.b = a, [2]
class Runner:
    class State:  # a nested class: protocol 2 pickles it as getattr(Runner, 'State')
        def __init__(self, step):
            self.step = step
'''


def _foreign_module(tmp_path, monkeypatch, name="foreignlib"):
    """A library the checkpoint was written with, importable only while the test writes files."""
    import importlib

    (tmp_path / f"{name}.py").write_text(_FOREIGN)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(name)
    monkeypatch.delitem(sys.modules, name)
    sys.path.remove(str(tmp_path))  # gone (monkeypatch restores sys.path): nothing can import it now
    return mod


def _foreign_checkpoint(lib, path, loss=(1.0, 2.0)):
    sd = OrderedDict((f"model.l{i}.weight", torch.randn(3, 3, generator=torch.Generator().manual_seed(i)))
                     for i in range(3))
    sys.modules[lib.__name__] = lib  # importable while torch.save writes, as on the training machine
    try:
        _save_foreign(lib, sd, path, loss)
    finally:
        del sys.modules[lib.__name__]
    return sd


def _save_foreign(lib, sd, path, loss):
    import functools

    torch.save({"state_dict": sd, "epoch": 2,
                "hyper_parameters": {"cfg": lib.Cfg(0.1, [1, 2]), "mode": lib.Mode.TRAIN},
                "message_hub": {"loss": lib.HistoryBuffer(loss), "tags": lib.Tags(["a", "b"]),
                                "meta": lib.Meta(seed=3), "slots": lib.Slotted(1), "state": lib.Runner.State(7)},
                "fn": functools.partial(max, 3), "cls": lib.Cfg,
                "buffered": lib.HistoryBuffer([torch.ones(2)])}, path)


def _data_pkl(path):
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def test_inert_pickle_reads_foreign_objects_without_importing_them(tmp_path, monkeypatch, cli):
    """Checkpoints of mmengine, Hydra/omegaconf Lightning runs and the like pickle their own
    classes beside the weights; without the library even --trust-pickle cannot read them.
    --inert-pickle records every global outside the allowlists instead of importing it: the file
    reads lazily, surgeries work, and a torch-format output carries those objects unchanged (the
    re-written data.pkl of an unchanged checkpoint is byte-identical). Safe loading stays the
    default: without the flag the file is refused."""
    lib = _foreign_module(tmp_path, monkeypatch)
    p = tmp_path / "run.ckpt"
    sd = _foreign_checkpoint(lib, p)

    code, _, err = cli("inspect", p)
    assert code == 2 and "--inert-pickle" in err and "foreignlib.HistoryBuffer" in err
    with pytest.raises(UnsafePickleError):
        cs.load(p)

    ck = cs.load(p, trust_pickle="inert")
    assert "foreignlib" not in sys.modules  # recorded, never imported
    assert ck.source.lazy and ck.sd_path == ("state_dict",) and len(ck.state) == 3
    assert any("read inert" in n and "foreignlib.Cfg" in n for n in ck.notes)
    code, out, err = cli("inspect", "--inert-pickle", p)
    assert code == 0, err
    assert "foreignlib.HistoryBuffer (inert)" in out and "foreignlib.Cfg (class, inert)" in out

    code, _, err = cli("convert", "--inert-pickle", p, "-o", tmp_path / "same.ckpt")
    assert code == 0, err
    assert _data_pkl(tmp_path / "same.ckpt") == _data_pkl(p)
    code, _, err = cli("strip-prefix", "--inert-pickle", p, "-o", tmp_path / "out.ckpt")
    assert code == 0, err
    assert "foreignlib" not in sys.modules

    monkeypatch.setitem(sys.modules, "foreignlib", lib)  # a machine with the library, to check the output
    orig = torch.load(p, weights_only=False)
    back = torch.load(tmp_path / "out.ckpt", weights_only=False)
    assert list(back["state_dict"]) == ["l0.weight", "l1.weight", "l2.weight"]
    assert all(torch.equal(back["state_dict"][k[len("model."):]], v) for k, v in sd.items())
    assert back["hyper_parameters"] == orig["hyper_parameters"] and back["hyper_parameters"]["mode"] is lib.Mode.TRAIN
    hub = back["message_hub"]
    assert vars(hub["loss"]) == {"_log": [1.0, 2.0], "max_length": 10}
    assert type(hub["tags"]) is lib.Tags and hub["tags"] == ["a", "b"]
    assert type(hub["meta"]) is lib.Meta and hub["meta"] == {"seed": 3}
    assert (hub["slots"].a, hub["slots"].b) == (1, [2])
    assert type(hub["state"]) is lib.Runner.State and hub["state"].step == 7  # before: "malformed" pickle
    assert back["fn"](1) == 3 and back["cls"] is lib.Cfg
    assert torch.equal(back["buffered"]._log[0], torch.ones(2))
    monkeypatch.delitem(sys.modules, "foreignlib")

    # diff compares inert objects by their records
    _foreign_checkpoint(lib, tmp_path / "later.ckpt", loss=(1.0, 3.0))
    code, out, err = cli("diff", "--inert-pickle", p, tmp_path / "same.ckpt")
    assert code == 0, out + err
    code, out, err = cli("diff", "--inert-pickle", p, tmp_path / "later.ckpt")
    assert code == 1 and "message_hub" in out and "loss" in out, out


def test_classes_only_named_are_kept_as_names_by_default(tmp_path, monkeypatch, cli):
    """Lightning < 1.5 keyed its callbacks' states by class (``{ModelCheckpoint: {...}}``): the
    original Stable Diffusion checkpoints name pytorch_lightning's ModelCheckpoint that way, and
    torch.load(weights_only=True) refuses them. A class that the pickle only names, never builds,
    runs nothing: it is kept as a name, with a note, and written back as it was. Anything built
    (an instance, a call, a nested attribute called), and any name of a module pickle payloads use
    (posix.system, even unused), is still refused; legacy files the same."""
    lib = _foreign_module(tmp_path, monkeypatch)
    sd = {"model.diffusion_model.w": torch.randn(3), "first_stage_model.v": torch.randn(2)}
    sys.modules["foreignlib"] = lib
    try:
        torch.save({"state_dict": sd, "global_step": 470000, "callbacks": {lib.Cfg: {"best_model_path": ""}}},
                   tmp_path / "sd.ckpt")
        torch.save({"state_dict": sd, "callbacks": {lib.Cfg: {"k": 1}}}, tmp_path / "legacy.ckpt",
                   _use_new_zipfile_serialization=False)
        torch.save({"state_dict": sd, "callbacks": {"mc": lib.Cfg(0.1, [1])}}, tmp_path / "built.ckpt")
        torch.save({"state_dict": sd, "state": lib.Runner.State(3)}, tmp_path / "nested.ckpt")
        torch.save({"state_dict": sd, "fn": os.system, "cls": lib.Cfg}, tmp_path / "fn.ckpt")
    finally:
        del sys.modules["foreignlib"]

    torch.save({"state_dict": sd, "hyper_parameters": {"act": torch.nn.ReLU}}, tmp_path / "hp.ckpt")  # a class as a value
    for name in ("sd.ckpt", "legacy.ckpt", "hp.ckpt"):
        ck = cs.load(tmp_path / name)
        assert ck.sd_path == ("state_dict",) and any("only named, never built" in n for n in ck.notes), name
        assert ck.source.lazy and "foreignlib" not in sys.modules
    code, out, err = cli("inspect", tmp_path / "sd.ckpt")
    assert code == 0 and "foreignlib.Cfg: outside the weights-only allowlist but only named" in out, err
    code, _, err = cli("extract", tmp_path / "sd.ckpt", "--layers", "model.diffusion_model", "-o", tmp_path / "unet.pt")
    assert code == 0, err
    assert _data_pkl(tmp_path / "unet.pt").count(b"foreignlib") == 1  # the class name, written back as it was
    monkeypatch.setitem(sys.modules, "foreignlib", lib)
    back = torch.load(tmp_path / "unet.pt", weights_only=False)
    assert back["callbacks"] == {lib.Cfg: {"best_model_path": ""}} and list(back["state_dict"]) == ["model.diffusion_model.w"]
    monkeypatch.delitem(sys.modules, "foreignlib")

    for name, says in (("built.ckpt", "foreignlib.Cfg"), ("nested.ckpt", "foreignlib.Runner"),
                       ("fn.ckpt", "posix.system")):
        code, _, err = cli("inspect", tmp_path / name)
        assert code == 2 and says in err and "--inert-pickle" in err and len(err.strip().splitlines()) == 1, name
        with pytest.raises(UnsafePickleError):
            cs.load(tmp_path / name)
    # scan gives torch's verdict (exit 1) and says which files ckpt-surgeon reads anyway
    code, out, _ = cli("scan", tmp_path / "sd.ckpt", tmp_path / "legacy.ckpt", tmp_path / "built.ckpt")
    assert code == 1 and out.count("only named, never built") == 2, out
    flags = {Path(f["file"]).name: f["only_named"] for f in cs.scan(str(tmp_path))["files"]}
    assert flags["sd.ckpt"] and flags["hp.ckpt"] and flags["legacy.ckpt"], flags
    assert not flags["built.ckpt"] and not flags["nested.ckpt"] and not flags["fn.ckpt"], flags
    assert "foreignlib" not in sys.modules


def test_inert_pickle_never_runs_a_payload(tmp_path, cli):
    """A hostile file read with --inert-pickle: the payload is recorded, not called, shown for
    what it is; an output keeps it (scan still calls that output unsafe), in the zip and the
    legacy format alike. Files that need torch's own rebuilding besides are still refused in one
    line."""
    canary = tmp_path / "canary"
    sd = OrderedDict((f"module.l{i}.weight", torch.randn(2, 2)) for i in range(2))
    _write_hostile(tmp_path / "evil.pt", {"state_dict": sd, "x": Reduce(os.system, (_touch_cmd(canary),))})
    code, out, err = cli("inspect", "--inert-pickle", tmp_path / "evil.pt")
    assert code == 0 and "posix.system (inert)" in out, err
    code, _, err = cli("strip-prefix", "--inert-pickle", tmp_path / "evil.pt", "-o", tmp_path / "out.pt")
    assert code == 0, err
    assert not canary.exists()
    assert cs.scan(str(tmp_path / "out.pt"))["unsafe"] == ["posix.system"]
    assert list(cs.load(tmp_path / "out.pt", trust_pickle="inert").state) == ["l0.weight", "l1.weight"]
    assert not canary.exists()

    _write_hostile(tmp_path / "evil_legacy.pt", {"w": torch.ones(1), "x": Reduce(os.system, (_touch_cmd(canary),))},
                   legacy=True)
    code, out, err = cli("inspect", "--inert-pickle", tmp_path / "evil_legacy.pt")
    assert code == 0 and "read inert (--inert-pickle): posix.system" in out, err
    legacy = cs.load(tmp_path / "evil_legacy.pt", trust_pickle="inert")
    assert legacy.source.lazy and repr(legacy.state["x"]) == "<inert posix.system>"
    code, _, err = cli("inspect", tmp_path / "evil_legacy.pt")
    assert code == 2 and "system" in err and len(err.strip().splitlines()) == 1
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    _write_hostile(tmp_path / "evil_q.pt", {"w": q, "x": Reduce(os.system, (_touch_cmd(canary),))})
    code, _, err = cli("inspect", "--inert-pickle", tmp_path / "evil_q.pt")
    assert code == 2 and "cannot be read inert" in err and "Traceback" not in err
    assert not canary.exists()


_FOREIGN_MODEL = '''
import torch, torch.nn as nn
class Conv(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()
        self.register_buffer("anchors", torch.arange(4.0), persistent=False)
class DetectionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(Conv(3, 8), Conv(8, 16), nn.ModuleList([nn.Linear(16, 4), nn.Identity()]))
        self.stride = torch.tensor([8.0, 16.0])  # an attribute, not a buffer: not in the state dict
        self.scale = nn.Parameter(torch.ones(1))
        self.names = {0: "person"}
'''


def test_inert_whole_model_pickle_gives_its_state_dict(tmp_path, monkeypatch, cli):
    """Ultralytics-style files pickle the whole model (its own classes) under 'model'. Read
    inert, the module's recorded attributes give exactly what model.state_dict() returns (order,
    dtypes, persistent buffers only), without the library; the output is then a plain, safe file."""
    import importlib

    (tmp_path / "detlib.py").write_text(_FOREIGN_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    lib = importlib.import_module("detlib")
    torch.manual_seed(0)
    model = lib.DetectionModel()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_()
            m.num_batches_tracked += 5
    model = model.half()
    torch.save({"epoch": -1, "model": model, "ema": None, "optimizer": None, "train_args": {"imgsz": 640},
                "version": "8.3.0"}, tmp_path / "best.pt")
    torch.save(model, tmp_path / "old.pth", _use_new_zipfile_serialization=False)  # a pre-1.6 whole-model file
    ref = model.state_dict()
    monkeypatch.delitem(sys.modules, "detlib")
    sys.path.remove(str(tmp_path))

    ck = cs.load(tmp_path / "best.pt", trust_pickle="inert")
    assert "detlib" not in sys.modules
    assert ck.sd_path == ("model",) and list(ck.state) == list(ref)
    assert any("whole-model pickle read inert" in n for n in ck.notes)
    code, _, err = cli("extract", "--inert-pickle", tmp_path / "best.pt", "-o", tmp_path / "backbone.pt",
                       "--layers", "model.0,model.1")
    assert code == 0, err
    out = torch.load(tmp_path / "backbone.pt", weights_only=True)  # nothing foreign left
    assert out["train_args"] == {"imgsz": 640}
    assert list(out["model"]) == [k for k in ref if k.startswith(("model.0.", "model.1."))]
    for k, v in out["model"].items():
        assert torch.equal(v, ref[k]) and v.dtype == ref[k].dtype and not v.requires_grad
    code, _, err = cli("convert", "--inert-pickle", tmp_path / "best.pt", "-o", tmp_path / "m.safetensors")
    assert code == 0, err
    from safetensors.torch import load_file

    st = load_file(tmp_path / "m.safetensors")
    assert list(st) == list(ref) and all(torch.equal(st[k], ref[k]) for k in ref)
    old = cs.load(tmp_path / "old.pth", trust_pickle="inert")
    assert old.source.format == "torch-legacy" and old.source.lazy and "detlib" not in sys.modules
    got = old.torch_state_dict()
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_inert_model_sharing_submodules_without_end_is_refused(tmp_path, cli):
    """One module registered under 1000 names, three levels deep, is 10^9 state-dict entries:
    read inert it is refused with one line instead of walked."""
    leaf = torch.nn.Linear(1, 1)
    for _ in range(3):
        parent = torch.nn.Module()
        for j in range(1000):
            parent.add_module(f"c{j}", leaf)
        leaf = parent
    torch.save({"model": leaf}, tmp_path / "shared.pt")
    code, out, err = cli("convert", "--inert-pickle", tmp_path / "shared.pt", "-o", tmp_path / "o.safetensors")
    _one_line_error(code, out, err)
    assert "submodules" in err


def test_a_skip_data_file_is_named(tmp_path, cli):
    """torch.serialization.skip_data() writes every record with CRC 0 and no values: named as
    such when the bytes are read, not passed off as a damaged download."""
    if not hasattr(torch.serialization, "skip_data"):
        pytest.skip("torch without skip_data")
    with torch.serialization.skip_data():
        torch.save({"w": torch.randn(100, 100)}, tmp_path / "s.pt")
    code, _, err = cli("convert", tmp_path / "s.pt", "-o", tmp_path / "s.safetensors")
    errors = [line for line in err.splitlines() if line.startswith("ckpt-surgeon: error:")]
    assert code == 2 and len(errors) == 1 and "skip_data()" in errors[0] and "Traceback" not in err, err
    code, out, err = cli("inspect", tmp_path / "s.pt")  # from the zip directory alone
    assert code == 0 and "skip_data()" in out and "no tensor values" in out, out + err
    torch.save({"w": torch.randn(3)}, tmp_path / "real.pt")
    assert "has CRC 0" not in cli("inspect", tmp_path / "real.pt")[1]


def test_a_file_saved_without_crcs_is_read_and_written_with_them(tmp_path, cli):
    """torch.save under ``torch.utils.serialization.config.save.compute_crc32 = False`` (torch >=
    2.6: faster saving) stores 0 as every record's CRC-32; torch.load never checks them. Such a
    file was refused as "record data.pkl is damaged" by every command. Now it is read (with a
    note that damage cannot be detected), and what is written from it carries real CRCs."""
    try:
        from torch.utils.serialization import config as serialization_config
        config = serialization_config.save
    except ImportError:
        config = None
    if config is None or not hasattr(config, "compute_crc32"):
        pytest.skip("torch without save.compute_crc32")
    sd = {"module.w": torch.randn(64, 64), "module.b": torch.arange(5), "module.h": torch.randn(3).half()}
    config.compute_crc32 = False
    try:
        torch.save({"state_dict": sd, "epoch": 2}, tmp_path / "nocrc.pt")
    finally:
        config.compute_crc32 = True
    with zipfile.ZipFile(tmp_path / "nocrc.pt") as zf:
        assert {i.CRC for i in zf.infolist()} == {0}  # what this test is about
    code, out, err = cli("inspect", tmp_path / "nocrc.pt")
    assert code == 0 and "without CRC-32 checksums" in out and "compute_crc32" in out, out + err
    assert "tensors: 3" in out
    code, out, err = cli("scan", tmp_path / "nocrc.pt")
    assert code == 0 and ": ok" in out, out + err
    for name in ("o.pt", "o.safetensors"):
        code, out, err = cli("strip-prefix", tmp_path / "nocrc.pt", "-o", tmp_path / name)
        assert code == 0 and "error" not in err, out + err
    with zipfile.ZipFile(tmp_path / "o.pt") as zf:
        assert zf.testzip() is None and all(i.CRC for i in zf.infolist() if i.file_size)
    for kw in ({}, {"mmap": True}):
        got = torch.load(tmp_path / "o.pt", weights_only=True, **kw)["state_dict"]
        assert list(got) == ["w", "b", "h"] and all(torch.equal(got[k], sd["module." + k]) for k in got)
    st = safetensors.torch.load_file(tmp_path / "o.safetensors")
    assert all(torch.equal(st[k], sd["module." + k]) for k in st) and len(st) == 3
    code, out, err = cli("diff", tmp_path / "nocrc.pt", tmp_path / "o.pt")
    assert code == 0 and "identical" in out, out + err
    # the same bytes with CRCs: no note (and skip_data's case, CRC 0 on tensor records only, stays an error)
    torch.save({"state_dict": sd, "epoch": 2}, tmp_path / "crc.pt")
    assert "CRC" not in cli("inspect", tmp_path / "crc.pt")[1]


def test_many_foreign_globals_are_named_in_a_bounded_line(tmp_path, cli, monkeypatch):
    """A pickle naming thousands of foreign globals (hostile, or a huge config) made a 36 KB
    note or error line. The line names 20 and counts the rest; the error keeps them all
    (``globals_``), and ``scan`` still lists every one."""
    import types

    classes = []
    for i in range(60):
        mod = types.ModuleType(f"farlib{i}")
        cls = type(f"Cfg{i}", (), {})
        cls.__module__ = mod.__name__
        setattr(mod, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        classes.append(cls)
    torch.save({"w": torch.ones(2), "cfg": classes}, tmp_path / "named.pt")  # classes as values: named only
    torch.save({"w": torch.ones(2), "cfg": [c() for c in classes]}, tmp_path / "built.pt")  # instances: unsafe
    code, out, err = cli("inspect", tmp_path / "named.pt")
    note = [line for line in out.splitlines() if "farlib0.Cfg0" in line]
    assert code == 0 and len(note) == 1 and "... and 40 more" in note[0] and len(note[0]) < 1000, out + err
    code, _, err = cli("convert", tmp_path / "built.pt", "-o", tmp_path / "o.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "... and 40 more" in err and len(err) < 1500, err
    with pytest.raises(UnsafePickleError) as e:
        cs.load(tmp_path / "built.pt")
    assert len(e.value.globals) == 60
    code, out, _ = cli("scan", tmp_path / "built.pt")
    assert code == 1 and all(f"farlib{i}.Cfg{i}" in out for i in range(60))


def test_meta_tensors_are_named_as_holding_no_values(tmp_path, cli):
    """A state dict saved from a model never materialised (meta device, init_empty_weights) is a
    file of shapes: every command says so; a torch output keeps them, safetensors refuses in one line."""
    with torch.device("meta"):
        lin = torch.nn.Linear(4, 4)
    torch.save({"model": {"module." + k: v for k, v in lin.state_dict().items()}, "epoch": 1}, tmp_path / "m.pt")
    code, out, err = cli("inspect", tmp_path / "m.pt")
    assert code == 0 and "2 tensors of the state dict (module.weight, module.bias) are meta tensors" in out, out + err
    code, out, err = cli("strip-prefix", tmp_path / "m.pt", "-o", tmp_path / "s.pt")
    assert code == 0 and "meta tensors" in err, out + err
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert back["model"]["weight"].is_meta and back["model"]["weight"].shape == (4, 4) and back["epoch"] == 1
    code, _, err = cli("convert", tmp_path / "m.pt", "-o", tmp_path / "m.safetensors")
    errors = [line for line in err.splitlines() if line.startswith("ckpt-surgeon: error:")]
    assert code == 2 and len(errors) == 1 and "meta tensor" in errors[0] and "Traceback" not in err, err
    torch.save({"w": torch.randn(3)}, tmp_path / "real.pt")
    assert "meta tensor" not in cli("inspect", tmp_path / "real.pt")[1]


def test_inert_whole_compiled_model_gives_its_state_dict(tmp_path, cli):
    """torch.save(torch.compile(model)) pickles OptimizedModule(model, dynamo_ctx) -- a call,
    with no module attributes of its own. Read inert, it gives what the compiled model's
    state_dict() gives (the model's under _orig_mod.), also for a compiled submodule."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.add_module("enc", torch.compile(torch.nn.Linear(4, 2)))
    whole = torch.compile(model)
    torch.save(whole, tmp_path / "compiled.pt")
    ref = whole.state_dict()
    assert list(ref)[0] == "_orig_mod.0.weight" and "_orig_mod.enc._orig_mod.weight" in ref
    code, _, err = cli("inspect", tmp_path / "compiled.pt")
    assert code == 2 and "OptimizedModule" in err  # by default: refused, as torch.load(weights_only) does
    ck = cs.load(tmp_path / "compiled.pt", trust_pickle="inert")
    assert list(ck.state) == list(ref) and any("whole-model pickle read inert" in n for n in ck.notes)
    code, _, err = cli("strip-prefix", "--inert-pickle", tmp_path / "compiled.pt", "-o", tmp_path / "m.safetensors")
    assert code == 0, err
    out = load_file(tmp_path / "m.safetensors")
    # the compiled submodule's inner _orig_mod goes too: the names the plain model has
    bare = {k: k[len("_orig_mod."):].replace("._orig_mod.", ".") for k in ref}
    assert list(out) == list(bare.values()) and "enc.weight" in out
    assert all(torch.equal(out[bare[k]], v) for k, v in ref.items())


def test_plain_pickles_are_read_allowlist_only(tmp_path, cli):
    """A plain pickle (not torch.save) goes through the same allowlist: a payload is refused by
    name and never run (also with --inert-pickle, which records it); a pickle.dump of torch
    tensors is named as such and reads only with --trust-pickle."""
    import pickle

    canary = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(1).numpy()}, "x": Payload()}, f, protocol=4)
    code, _, err = cli("inspect", tmp_path / "evil.pkl")
    assert code == 2 and "system" in err and "nothing was executed" in err
    code, out, err = cli("convert", tmp_path / "evil.pkl", "--inert-pickle", "-o", tmp_path / "w.safetensors")
    assert code == 0, err
    assert not canary.exists()
    sd = {"w": torch.randn(3, 2), "b": torch.arange(4)}
    with open(tmp_path / "tensors.pkl", "wb") as f:
        pickle.dump(sd, f)
    code, _, err = cli("inspect", tmp_path / "tensors.pkl")
    assert code == 2 and "plain pickle of torch tensors" in err and "--trust-pickle" in err
    code, _, err = cli("convert", tmp_path / "tensors.pkl", "--trust-pickle", "-o", tmp_path / "t.safetensors")
    assert code == 0, err
    from safetensors.torch import load_file

    back = load_file(tmp_path / "t.safetensors")
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_a_defaultdict_metrics_history_loads_by_default(tmp_path, cli):
    """history = defaultdict(list) saved beside the weights pickles defaultdict and its factory
    by name; both are plain data (the factory makes an empty list), so the file reads without
    --trust-pickle and comes back the same. Another factory (a function) stays refused."""
    import collections

    hist = collections.defaultdict(list)
    hist["loss"] += [0.5, 0.25]
    torch.save({"model": {"module.w": torch.ones(2)}, "history": hist, "counts": collections.defaultdict(int)},
               tmp_path / "h.pt")
    code, out, err = cli("strip-prefix", tmp_path / "h.pt", "-o", tmp_path / "h2.pt")
    assert code == 0, err
    back = torch.load(tmp_path / "h2.pt", weights_only=False)
    assert back["history"] == {"loss": [0.5, 0.25]} and back["history"].default_factory is list
    assert back["counts"].default_factory is int and list(back["model"]) == ["w"]
    torch.save({"model": {"w": torch.ones(2)}, "h": collections.defaultdict(os.getcwd)}, tmp_path / "bad.pt")
    code, out, err = cli("inspect", tmp_path / "bad.pt")
    assert code == 2 and "getcwd" in err, err


def test_sizes_past_64_bits_are_one_line(tmp_path, cli):
    """A pickle can give a tensor a size torch cannot hold (10**30 beside a 0: no bytes, so no
    bounds to break): every command said "internal error: ... Overflow when unpacking long long".
    Now the reader refuses it in one line, as it does a view past its storage."""
    import io
    import pickle
    import torch._utils

    class Storage:
        pass

    class Huge:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (Storage(), 0, (0, 10**30), (1, 1), False, OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, Storage) else None

    pkl = io.BytesIO()
    Pickler(pkl, protocol=2).dump({"w": Huge(), "b": torch.zeros(2)})
    torch.save({"b": torch.ones(4)}, tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(tmp_path / "huge.pt", "w") as z:
        for n in src.namelist():
            z.writestr(n, pkl.getvalue() if n.endswith("data.pkl") else src.read(n))
    for args in (("inspect",), ("convert", "-o", tmp_path / "o.safetensors"), ("strip-prefix", "--prefix", "x",
                                                                             "--partial", "-o", tmp_path / "s.pt")):
        code, _, err = cli(args[0], tmp_path / "huge.pt", *args[1:])
        assert code == 2 and "past torch's 64-bit range" in err and len(err.strip().splitlines()) == 1, (args, err)


def test_a_tiny_file_holding_a_huge_broadcast_view(tmp_path, cli):
    """A 2 KB file can hold ``torch.ones(1).expand(2**29, 2**29)``: 4 bytes of storage, an exbibyte
    dense. inspect says so; a torch zip output keeps the view (nothing made dense); safetensors,
    a cast and diff need it dense and refuse in one line naming the tensor (they asked torch for
    the whole of it: an internal error, or on a smaller view the kernel's OOM killer); an
    allocation refused elsewhere (average computes in float64) is an out-of-memory error, not a
    bug report. No output is left behind."""
    src = tmp_path / "ex.pt"
    torch.save({"w": torch.ones(1).expand(2**29, 2**29), "b": torch.zeros(2)}, src)
    other = tmp_path / "ex2.pt"
    torch.save({"w": torch.ones(1).expand(2**29, 2**29), "b": torch.ones(2)}, other)
    assert src.stat().st_size < 4096
    code, out, err = cli("inspect", src)
    assert code == 0 and "broadcast views: 1 tensor is 1.0 EiB dense over 4 B of storage (expand, stride 0: w)" in out
    info = cs.inspect(src)
    assert info["broadcast_views"] == [{"name": "w", "dense_bytes": 1 << 60, "storage_bytes": 4}]

    code, out, err = cli("convert", src, "-o", tmp_path / "kept.pt")
    assert code == 0, err
    w = torch.load(tmp_path / "kept.pt", weights_only=True)["w"]
    assert w.shape == (2**29, 2**29) and w.stride() == (0, 0) and w[123, 456].item() == 1.0

    for args in (("convert", src, "-o", tmp_path / "o.safetensors"),
                 ("cast", src, "--dtype", "bfloat16", "-o", tmp_path / "c.pt"),
                 ("diff", src, other)):
        code, out, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)
        assert "w" in err and "a tensor of shape [536870912, 536870912] (strides [0, 0]) views 4 B of storage but is " \
               "1.0 EiB dense, more than the" in err, err
    code, out, err = cli("average", src, other, "-o", tmp_path / "avg.pt")
    assert code == 2 and err.startswith("ckpt-surgeon: error: out of memory: ") and "internal" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex.pt", "ex2.pt", "kept.pt"]


def test_names_from_a_file_are_printed_as_text_never_obeyed(tmp_path, cli):
    """A hostile file's tensor names or wrapper keys holding a terminal escape sequence, a carriage
    return, a right-to-left override or rich markup: every command prints them escaped (\\x1b) and
    as written, never as control codes or markup (a name 'a[/]b' was an internal error in inspect)."""
    exe = str(Path(sys.executable).with_name("ckpt-surgeon"))

    def run_cli(*args):  # the installed entry point: the streams a terminal would get
        return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120)

    esc, markup = "module.c\x1b[2J\x1b]0;pwned\x07d", "module.a[/]b"
    sd = {esc: torch.ones(2), markup: torch.ones(2), "module.r\rr": torch.ones(1), "module.x\u202ey": torch.ones(1),
          "module.[bold]z": torch.ones(1), "module.e\nf": torch.ones(3)}
    torch.save({"state_dict": sd, "\x1b[31mkey": 1}, tmp_path / "h.pt")
    other = dict(sd)
    other[esc] = torch.zeros(2)
    other["module.e\nf"] = torch.zeros(3)
    torch.save({"state_dict": other, "\x1b[31mkey": 2}, tmp_path / "h2.pt")
    runs = [("inspect", tmp_path / "h.pt"), ("inspect", tmp_path / "h.pt", "--tensors"),
            ("rename", tmp_path / "h.pt", "--map", "^module\\.=>m.", "-o", tmp_path / "r.pt"),
            ("extract", tmp_path / "h.pt", "--layers", "re:.", "-o", tmp_path / "e.pt"),
            ("diff", tmp_path / "h.pt", tmp_path / "h2.pt"), ("strip-prefix", tmp_path / "h.pt", "--prefix", "nope.",
                                                               "-o", tmp_path / "n.pt")]
    for args in runs:
        for code, out, err in (cli(*args), (lambda p: (p.returncode, p.stdout, p.stderr))(run_cli(*args))):
            assert code in (0, 1, 2) and "internal error" not in err, (args, out, err)
            for text in (out, err):
                assert not any(c in text for c in "\x1b\x07\r\u202e"), (args, text)
            if args[0] == "inspect":
                assert "c\\x1b[2J\\x1b]0;pwned" in out and "a[/]b" in out and "[bold]z" in out, out
            if args[0] in ("inspect", "rename", "diff"):  # a newline in a name: escaped, the line kept whole
                assert "e\\nf" in out, (args, out)
    assert torch.load(tmp_path / "r.pt", weights_only=True)["state_dict"].keys() == {"m." + k[7:] for k in sd}
