"""torch checkpoints: the zip format (lazy, torch-free), the legacy pickle format, the weights of
.nemo tarballs (and, handed on, of TorchScript archives: :mod:`.torchscript`; of torch.export
ones: :mod:`.export`); writing torch zips. What an unpickled graph becomes is
:mod:`ckptsurgeon.graph`'s."""

from __future__ import annotations

import json
import os

from .. import dtypes
from ..atomic import atomic_output, atomic_path, fsync_wanted
from ..byteranges import FileRange
from ..checkpoint import Checkpoint, Source
from ..errors import NotACheckpointError, UnsafePickleError, UnsupportedError
from ..graph import from_object
from ..keys import name_list
from ..pickle_io import NotFastPath, load_refs, load_refs_naming, refuse_built
from ..pickle_legacy import load_legacy_refs
from ..pickle_scan import scan_globals
from ..pickle_write import dump_refs
from ..safety import INERT, TRUST_HINT, only_nameable, torch_load, unsafe_globals, unsafe_in
from ..values import materialize
from ..zipfmt import TorchZip
from ..zipwrite import write_torch_zip
from .torchscript import is_torchscript, load_torchscript

SURGEON_RECORD = ".data/ckpt_surgeon.json"


def sniff_zip(path: str, head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04"


_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
LEGACY_MAGIC = _MAGIC.to_bytes(10, "little")  # as pickled with protocol >= 2 (LONG1)
LEGACY_MAGIC_TEXT = str(_MAGIC).encode()  # as pickled with protocol 0/1 (LONG)


def sniff_legacy(path: str, head: bytes) -> bool:
    return LEGACY_MAGIC in head[:32] or LEGACY_MAGIC_TEXT in head[:40]


def load_zip(path: str, *, key: str | None = None, trust_pickle: bool | str = False, **_) -> Checkpoint:
    z = TorchZip(path, program_ok=True)
    try:
        if not z.has("data.pkl"):  # a torch.export archive under another name than .pt2
            from .export import load_program

            return load_program(z, path, key=key, trust_pickle=trust_pickle)
        if is_torchscript(z.infos):
            return load_torchscript(z, path, key)
        return _load_zip(z, path, key, trust_pickle)
    finally:
        z.close()  # every tensor's byte range is located by now; data is read through its own fds


def sniff_nemo(path: str, head: bytes) -> bool:
    return path.endswith(".nemo") and os.path.isfile(path)


def load_nemo(path: str, *, key: str | None = None, trust_pickle: bool | str = False, **_) -> Checkpoint:
    """A NeMo 1.x ``.nemo`` file: a tar holding ``model_weights.ckpt`` (a torch zip) and
    ``model_config.yaml``. An uncompressed tar is read in place: the weights are a byte range of
    it, like a DCP chunk. (NeMo 2 saves folders; compressed .nemo files must be extracted.)"""
    members = _tar_members(path, "pass model_weights.ckpt")
    weights = [m for m in members if os.path.basename(m.name) == "model_weights.ckpt"]
    if len(weights) != 1:
        found = ", ".join(m.name for m in weights) or "none"
        raise NotACheckpointError(f"{path}: expected one model_weights.ckpt in the archive (found: {found})",
                                  hint=f"extract it (tar xf {os.path.basename(path)}) and pass the one you want")
    m = weights[0]
    z = TorchZip(path, base=m.offset_data, length=m.size)
    try:
        ck = _load_zip(z, path, key, trust_pickle, embedded=f"{m.name} inside the archive")
    finally:
        z.close()
    from dataclasses import replace

    return replace(ck, source=replace(ck.source, format="nemo"),
                   notes=ck.notes + (f"read {m.name} in place from the .nemo archive",))


def _load_zip(z: TorchZip, path: str, key, trust_pickle, embedded: str = "") -> Checkpoint:
    data = z.read("data.pkl")
    notes = []
    lazy = True

    def source(k, dtype, nbytes):
        return z.source(f"data/{k}", nbytes, label=f"storage data/{k}")

    # saved on a big-endian machine: tensor bytes read as they are would be wrong here, so
    # torch.load (which byte-swaps them) reads it
    byteorder = z.read("byteorder") if z.has("byteorder") else b"little"
    big_endian = byteorder.strip() == b"big"
    try:
        if big_endian:
            raise NotFastPath("big-endian tensor data")
        try:
            graph = load_refs(data, source)
        except UnsupportedError as e:  # raised mid-pickle (a DTensor shard), without the path
            raise UnsupportedError(f"{path}: {e.message}", hint=e.hint) from None
        if b"\nDTensor\n" in data:  # the class named by a GLOBAL; each DTensor here held its whole value
            notes.append("DTensor values (one rank or replicated: each holds the whole tensor) read as plain "
                         "tensors; the device mesh and placements are not carried")
    except NotFastPath as e:
        unsafe = unsafe_in(data) if trust_pickle is not True else []  # (read from opcodes once)
        inert = unsafe if trust_pickle == INERT and not big_endian else []
        graph = None
        if trust_pickle != INERT and not big_endian and only_nameable(unsafe):
            try:  # only named, never built (a class as a dict key): kept as names, nothing imported
                graph = load_refs_naming(data, source, unsafe)
                notes.append(_named_note(unsafe))
            except NotFastPath:
                graph = None
        if graph is not None:
            pass
        elif inert:  # --inert-pickle: record what no allowlist allows, import and run nothing
            try:
                graph = load_refs(data, source, inert=inert)
            except NotFastPath as other:
                raise UnsafePickleError(
                    f"{path}: cannot be read inert (it also uses {other}, which only torch.load rebuilds) and "
                    f"would import globals outside the weights-only allowlist: {name_list(inert, 20)}",
                    globals_=inert, hint="only if you trust where the file came from, re-run with --trust-pickle"
                ) from None
            notes.append(f"read inert (--inert-pickle): {name_list(inert, 20)} recorded as they are, nothing imported "
                         "or run; outputs in torch format carry them unchanged")
        elif embedded:  # torch.load reads whole files only
            if unsafe:
                raise UnsafePickleError(
                    f"{path} ({embedded}) would import globals outside the weights-only allowlist: "
                    f"{name_list(unsafe, 20)}; nothing was executed", globals_=unsafe, hint=TRUST_HINT)
            raise UnsupportedError(f"{path}: {embedded} uses {e}, which only torch.load rebuilds",
                                   hint="extract the archive and pass the file itself")
        else:
            # outside the torch-free subset: torch's own weights-only unpickler decides
            _check_all_crcs(z)
            graph = torch_load(path, trust_pickle=trust_pickle is True, mmap=True)
            lazy = False
            notes.append(f"read with torch.load (uses {e})")
    sized = [i for n, i in z.infos.items() if n.startswith("data/") and i.file_size]
    if not z.checksums:
        notes.append("written without CRC-32 checksums (torch.save with torch.utils.serialization.config.save."
                     "compute_crc32 = False): damage to its bytes cannot be detected; files written from it get "
                     "checksums")
    elif sized and all(i.CRC == 0 for i in sized):
        notes.append("every tensor record has CRC 0, as torch.serialization.skip_data() writes them: this file holds "
                     "shapes but no tensor values")
    transforms = ()
    if z.has(SURGEON_RECORD):
        try:
            transforms = tuple(json.loads(z.read(SURGEON_RECORD)).get("transforms", []))
        except (ValueError, AttributeError):
            notes.append("ignored an unreadable ckpt-surgeon record")
    source = Source(path=path, format="torch-zip", size=z.size, files=(path,), lazy=lazy,
                    zip_prefix=z.prefix,
                    byteorder=byteorder if lazy else b"little",  # torch.load gives native tensors
                    version=z.read("version") if z.has("version") else b"3\n", notes=tuple(notes))
    ck = from_object(graph, source, key=key, trusted=trust_pickle is True and not lazy, transforms=transforms)
    if not lazy:
        meta = [k for k, v in ck.tensor_items() if getattr(v, "is_meta", False)]
        if meta:  # a 2 KB "checkpoint" of a model that was never materialised: say so before any surgery
            ck = ck.replace(notes=ck.notes + (
                f"{dtypes.count(len(meta), 'tensor')} of the state dict ({name_list(meta, 3)}) "
                f"{'is a meta tensor' if len(meta) == 1 else 'are meta tensors'}: a shape and dtype without values "
                "(saved from a model never materialised: built on the meta device or under init_empty_weights)",))
    return ck


def _tar_members(path: str, then: str) -> list:
    """The regular files of an uncompressed tar (their data can be read in place)."""
    import tarfile

    try:
        with tarfile.open(path, "r:") as tar:
            return [m for m in tar.getmembers() if m.isfile()]
    except tarfile.ReadError:
        raise UnsupportedError(f"{path}: a compressed (or damaged) tar archive",
                               hint=f"extract it (tar xf {os.path.basename(path)}) and {then}") from None


def tar_pickles(path: str) -> dict[str, list[str]]:
    """{member/record: globals} for every pickle of every torch zip inside an uncompressed tar
    (a .nemo), read in place; what ``scan`` reports for such an archive."""
    out: dict[str, list[str]] = {}
    members = _tar_members(path, "scan the files inside")
    with open(path, "rb") as f:
        zips = [m for m in members if m.size >= 4 and os.pread(f.fileno(), 4, m.offset_data) == b"PK\x03\x04"]
    for m in zips:
        try:
            z = TorchZip(path, base=m.offset_data, length=m.size)
        except NotACheckpointError:
            continue  # a zip that is no torch file
        try:
            for name in z.infos:
                if name.endswith(".pkl"):
                    out[f"{m.name}:{z.prefix}/{name}"] = scan_globals(z.read(name))
        finally:
            z.close()
    return out


def _check_all_crcs(z: TorchZip) -> None:
    for name, info in z.infos.items():
        if name.startswith("data/") and info.file_size:
            src = z.source(name, info.file_size)
            if isinstance(src, FileRange):
                src.check_crc()


def load_legacy(path: str, *, key: str | None = None, trust_pickle: bool | str = False, **_) -> Checkpoint:
    """The pre-1.6 format. Read lazily without torch when the pickle stays within the torch-free
    subset (its storages are byte ranges of the file, like a zip's records); otherwise, like
    torch does, loaded fully with torch.load (weights-only)."""
    notes = []
    try:
        graph, _ = load_legacy_refs(path)
        lazy = True
    except NotFastPath as e:
        unsafe = unsafe_globals(path) if trust_pickle is not True else []
        inert = unsafe if trust_pickle == INERT else []
        graph = None
        if trust_pickle != INERT and only_nameable(unsafe):
            try:  # only named, never built: kept as names (see pickle_io.load_refs_naming)
                graph, _ = load_legacy_refs(path, inert=unsafe)
                refuse_built(graph, frozenset(unsafe))
                lazy = True
                notes.append(_named_note(unsafe))
            except NotFastPath:
                graph = None
        if graph is None and inert:
            try:
                graph, _ = load_legacy_refs(path, inert=inert)
                lazy = True
                notes.append(f"read inert (--inert-pickle): {name_list(inert, 20)} recorded as they are, nothing "
                             "imported or run; outputs in torch format carry them unchanged")
            except NotFastPath:
                graph = None
        if graph is None:
            graph = torch_load(path, trust_pickle=trust_pickle is True, mmap=False)
            lazy = False
            notes.append(f"legacy (non-zip) torch format, read with torch.load (uses {e}): loaded fully into "
                         "memory; re-save as .pt or .safetensors for fast, lazy access")
    source = Source(path=path, format="torch-legacy", size=os.path.getsize(path), files=(path,), lazy=lazy,
                    notes=tuple(notes))
    return from_object(graph, source, key=key, trusted=trust_pickle is True and not lazy)


def _named_note(names) -> str:
    return (f"{name_list(names, 20)}: outside the weights-only allowlist but only named, never built (a class as a "
            "value or a key: hyper-parameters like act=nn.ReLU, old Lightning callback states): kept as names, nothing "
            "imported or run; outputs in torch format carry them unchanged")


def save_torch(ck: Checkpoint, path: str, *, dry_run: bool = False, progress=None, **_) -> dict:
    obj = ck.assemble()
    notes = []
    cut: dict = {}
    try:
        pkl, storages = dump_refs(obj, report=cut)
        fast = True
        if cut:
            n, saved = cut["compacted"]["storages"], cut["compacted"]["bytes"]
            notes.append(f"{dtypes.count(n, 'storage')} cut to the parts the written tensors use ({dtypes.human_bytes(saved)} "
                         "that none of them reaches left out; torch.save would write them whole)")
    except (NotFastPath, UnsupportedError) as e:
        fast, storages = False, []
        notes.append(f"written with torch.save ({e})")
    # torch.save's path: what the tensors hold (their storages are torch's to lay out)
    total = sum(s.nbytes for s in storages) if fast else ck.summary()["bytes"]
    report = {"output": path, "format": "torch-zip", "tensors": sum(1 for _ in ck.tensor_items()),
              "storages": len(storages), "bytes": total, "notes": notes}
    if dry_run:
        return report
    extra = []
    if ck.transforms:
        extra.append((SURGEON_RECORD, json.dumps({"transforms": list(ck.transforms)}).encode()))
    if fast:
        src = ck.source  # (a big-endian file is read through torch.load: its tensors are native)
        with atomic_output(path) as fd:
            shared = write_torch_zip(fd, pkl, storages, prefix=(src.zip_prefix if src else "archive") or "archive",
                                     byteorder=src.byteorder if src else b"little",
                                     version=src.version if src else b"3\n", extra_records=extra,
                                     progress=progress, writeback=fsync_wanted())
        if shared:
            report["shared_bytes"] = shared
            notes.append(f"{dtypes.human_bytes(shared)} of tensor data on the input's own disk blocks (the filesystem "
                         "shared them, as cp --reflink does: nothing copied, no space used; checked against their "
                         "CRC-32s in the input)")
    else:
        import torch

        real = materialize(obj)
        with atomic_path(path) as tmp:
            torch.save(real, tmp)
            if extra:
                import zipfile

                with zipfile.ZipFile(tmp, "a") as zf:
                    prefix = zf.namelist()[0].split("/", 1)[0]
                    for name, data in extra:
                        zf.writestr(f"{prefix}/{name}", data)
    return report
