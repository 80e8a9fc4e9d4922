"""torch.distributed.checkpoint (DCP) folders, read safely and lazily, without a process group.

FSDP, torchtitan and Lightning's sharded strategies save a folder: ``.metadata`` (a pickle of
DCP's dataclasses: every entry's dtype, shape and chunks, and where each chunk's bytes are)
plus ``__<rank>_<n>.distcp`` files holding each chunk as a complete ``torch.save`` archive at a
byte offset, and each non-tensor value as the ``torch.save`` bytes of that value.

torch's own reader ``pickle.load``\\ s ``.metadata`` (anything in it runs). Here its globals are
checked against DCP's own classes first and then unpickled inert (:class:`~ckptsurgeon.inert.InertObject`):
nothing in the file is imported or called. A tensor saved in one chunk stays on disk (a lazy
:class:`~ckptsurgeon.refs.TensorRef` into the ``.distcp`` file, copied zero-copy by the
writers); a tensor sharded over ranks is checked against its chunks' shapes and assembled
from them with torch when its bytes are needed, one tensor at a time. The nested
structure (``{"model": ..., "optim": ...}``) is rebuilt from the planner's key paths, so the
model's state dict is found as in any wrapper. DCP is read-only here: write .pt, .safetensors or
a Hugging Face folder.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from .. import dtypes
from ..checkpoint import Source
from ..errors import (CkptSurgeonError, CorruptCheckpointError, NotACheckpointError, UnsafePickleError,
                      UnsupportedError)
from ..keys import name_list
from ..layout import deferred_ref
from ..pickle_io import INERT_ALL, NotFastPath, load_refs
from ..pickle_scan import scan_globals
from ..inert import CallRef, GlobalRef, InertObject
from ..refs import TensorRef
from ..zipfmt import TorchZip
from .dcp_chunks import assemble, unflatten

METADATA = ".metadata"
LIGHTNING_META = "meta.pt"
_DCP_MODULE = "torch.distributed.checkpoint."
#: what DCP's .metadata pickles besides its own classes (checked before anything is unpickled)
_OTHER_GLOBALS = {"torch.Size", "torch.serialization._get_layout", "collections.OrderedDict",
                  "pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.WindowsPath", "pathlib.PureWindowsPath",
                  "pathlib._local.PosixPath", "builtins.set", "builtins.frozenset"}


def sniff(path: str, head: bytes) -> bool:
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, METADATA))
    return os.path.basename(path) == METADATA


def load(path: str, *, key=None, trust_pickle=False, **_):
    from ..graph import from_object

    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    meta_path = os.path.join(folder, METADATA)
    meta = _fields(_read_metadata(meta_path))
    entries = meta.get("state_dict_metadata")
    storage = meta.get("storage_data")
    if not isinstance(entries, Mapping) or not isinstance(storage, Mapping):
        raise CorruptCheckpointError(f"{meta_path}: not DCP metadata (no state_dict_metadata / storage_data)")
    where: dict[str, list] = {}
    for index, info in storage.items():
        fqn = _fields(index).get("fqn")
        where.setdefault(fqn, []).append((_fields(index), _fields(info)))

    files: dict[str, int] = {}  # data file -> size
    st_cache: dict = {}  # safetensors-format data files: their entries, read once
    flat: dict[str, Any] = {}
    assembled = []
    for fqn, entry in entries.items():
        kind = getattr(type(entry), "inert_name", "")
        chunks = where.get(fqn, [])
        if kind == "BytesStorageMetadata":
            if len(chunks) != 1:
                raise CorruptCheckpointError(f"{meta_path}: {fqn!r} has {len(chunks)} storage entries, expected one")
            flat[fqn] = _read_bytes_item(folder, fqn, chunks[0][1], files, trust_pickle)
        elif kind == "TensorStorageMetadata":
            value, whole = _read_tensor(folder, fqn, _fields(entry), chunks, files, st_cache)
            flat[fqn] = value
            if not whole:
                assembled.append(fqn)
        else:
            raise UnsupportedError(f"{meta_path}: entry {fqn!r} is a {kind or type(entry).__name__}, "
                                   "which this DCP reader does not know")
    obj = unflatten(flat, meta.get("planner_data"))
    notes = []
    extra = os.path.join(folder, LIGHTNING_META)
    if os.path.isfile(extra) and isinstance(obj, dict):
        # Lightning's sharded strategies save the trainer state (epoch, loops, callbacks...) beside
        # the DCP files; Lightning's own consolidation merges it in the same way
        try:
            trainer = _top_level(extra, trust_pickle)
        except CkptSurgeonError as e:
            notes.append(f"left out {LIGHTNING_META}: {e.one_line()}")
            trainer = None
        if isinstance(trainer, Mapping):
            obj.update((k, v) for k, v in trainer.items() if k not in obj)
            files[extra] = os.path.getsize(extra)
            notes.append(f"merged Lightning's {LIGHTNING_META} (trainer state: {', '.join(map(str, list(trainer)[:6]))})")
            if "model" in obj and "state_dict" not in obj:
                obj = _lightning_layout(obj)
                notes.append("laid out as a Lightning checkpoint, as Lightning's consolidate_checkpoint does: "
                             "model -> state_dict, optimizer_N -> optimizer_states")
    if assembled:
        notes.append(f"{dtypes.count(len(assembled), 'tensor')} sharded over ranks, put together when read, one at a time "
                     f"(e.g. {assembled[0]})")
    size = sum(files.values()) + os.path.getsize(meta_path)
    source = Source(path=folder, format="dcp", size=size, files=tuple(sorted(set(files) | {meta_path})),
                    lazy=True, notes=tuple(notes))
    return from_object(obj, source, key=key)


def _lightning_layout(obj: dict) -> dict:
    """A Lightning sharded folder's content in the layout of a Lightning .ckpt file (what
    Trainer.fit(ckpt_path=...) and load_from_checkpoint read): 'model' becomes 'state_dict' and
    'optimizer_0', 'optimizer_1'... one 'optimizer_states' list, each where the first one was."""
    optimizers = sorted((k for k in obj if isinstance(k, str) and re.fullmatch(r"optimizer_\d+", k)),
                        key=lambda k: int(k.rsplit("_", 1)[1]))
    if [int(k.rsplit("_", 1)[1]) for k in optimizers] != list(range(len(optimizers))):
        optimizers = []  # not numbered 0..n-1: not Lightning's, left as they are
    out: dict = {}
    for k, v in obj.items():
        if k == "model":
            out["state_dict"] = v
        elif k in optimizers:
            if k == optimizers[0]:
                out["optimizer_states"] = [obj[o] for o in optimizers]
        else:
            out[k] = v
    return out


def scan_folder(folder: str, allowed: set) -> list[dict]:
    """scan's entries for a DCP folder: the metadata's globals (DCP's own classes are expected
    there: it is read inert) and the globals of every torch.save archive the metadata points to
    (a .distcp file is many archives end to end; zipfile alone would see only the last one)."""
    meta_path = os.path.join(folder, METADATA)
    with open(meta_path, "rb") as f:
        data = f.read()
    names = scan_globals(data)
    foreign = _foreign(set(names))
    entries = [{"file": meta_path, "format": "dcp-metadata", "pickles": {METADATA: names}, "unsafe": foreign,
                "error": None}]
    if foreign:
        entries[0]["error"] = "unsafe DCP metadata: its data files were not scanned"
        return entries
    meta = _fields(_read_metadata(meta_path, data))
    per_file: dict[str, dict] = {}
    sizes: dict[str, int] = {}
    for _index, info in (meta.get("storage_data") or {}).items():
        path, offset, length = _data_file(folder, _fields(info), sizes)
        entry = per_file.setdefault(path, {"file": path, "format": "dcp-data", "pickles": {}, "unsafe": [],
                                           "error": None})
        with open(path, "rb") as f:
            if os.pread(f.fileno(), 4, offset) != b"PK\x03\x04":
                continue  # raw tensor bytes: no pickle
        z = TorchZip(path, base=offset, length=length)
        try:
            for name in z.infos:
                if name.endswith(".pkl"):
                    found = scan_globals(z.read(name))
                    entry["pickles"][f"@{offset}/{name}"] = found
                    entry["unsafe"] += [n for n in found if n not in allowed and n not in entry["unsafe"]]
        finally:
            z.close()
    return entries + [per_file[p] for p in sorted(per_file)]


def _foreign(names: set) -> list[str]:
    return sorted(n for n in names if not n.startswith(_DCP_MODULE) and n not in _OTHER_GLOBALS
                  and not _is_torch_dtype(n))


def _top_level(path: str, trust_pickle):
    """A torch file's whole top-level object, with or without a state dict in it."""
    from ..errors import AmbiguousStateDictError, NoStateDictError
    from ..loading import load_file

    try:
        ck = load_file(path, trust_pickle=trust_pickle)
    except (AmbiguousStateDictError, NoStateDictError) as e:
        return e.overview.wrapper if e.overview is not None else None
    return ck.wrapper if ck.sd_path else ck.state


# --------------------------------------------------------------------------- metadata
def _read_metadata(meta_path: str, data: bytes | None = None):
    if data is None:
        try:
            with open(meta_path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise NotACheckpointError(f"{meta_path}: cannot read DCP metadata ({e.strerror})") from None

    def no_storages(*_):
        raise CorruptCheckpointError(f"{meta_path}: DCP metadata with tensor storages")

    names: set[str] = set()
    try:  # every global recorded inert: nothing in the file is imported or runs, whatever it names
        meta = load_refs(data, no_storages, inert=INERT_ALL, seen=names)
    except NotFastPath as e:
        raise CorruptCheckpointError(f"{meta_path}: unexpected DCP metadata ({e})") from None
    foreign = _foreign(names)
    if foreign:  # then refused all the same: what else would such a file be for
        raise UnsafePickleError(f"{meta_path}: DCP metadata that would import {name_list(foreign, 20)}; "
                                "nothing was executed", globals_=foreign,
                                hint="a DCP .metadata holds only torch.distributed.checkpoint's own classes")
    return meta


def _is_torch_dtype(name: str) -> bool:
    from .. import dtypes

    module, _, attr = name.rpartition(".")
    return module == "torch" and attr in dtypes.ITEMSIZE


def _fields(obj) -> dict:
    """A dataclass instance's attributes from its inert record (BUILD state; dataclasses with
    slots pickle (None, slots) or (dict, slots))."""
    if not isinstance(obj, InertObject):
        return {}
    state = obj._inert["state"]
    if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
        out = dict(state[0] or {})
        out.update(state[1] or {})
        return out
    return dict(state) if isinstance(state, dict) else {}


def _size(v) -> tuple:
    """torch.Size(...) as recorded (a CallRef of torch.Size) or a plain sequence -> tuple of ints."""
    if isinstance(v, CallRef) and v.func == GlobalRef("torch", "Size"):
        v = v.args[0] if v.args else ()
    try:
        return tuple(int(x) for x in v)
    except (TypeError, ValueError):
        raise CorruptCheckpointError(f"DCP metadata: {v!r} is not a tensor size") from None


def _dtype_of(properties) -> str:
    props = properties
    state = props._inert["state"] if isinstance(props, InertObject) else None
    dtype = state[0] if isinstance(state, tuple) and state else _fields(props).get("dtype")
    if not isinstance(dtype, GlobalRef) or dtype.module != "torch":
        raise CorruptCheckpointError(f"DCP metadata: unknown tensor dtype {dtype!r}")
    return dtype.name


# --------------------------------------------------------------------------- data
def _data_file(folder: str, info: dict, files: dict) -> tuple[str, int, int]:
    """(path, offset, length) of a storage entry, checked; ``files`` maps each data file met to
    its size (one stat per file, not per chunk)."""
    rel = info.get("relative_path")
    offset, length = info.get("offset"), info.get("length")
    if not isinstance(rel, str) or not isinstance(offset, int) or not isinstance(length, int) or offset < 0 \
            or length < 0:
        raise CorruptCheckpointError(f"DCP metadata: bad storage entry {info!r}")
    if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise CorruptCheckpointError(f"DCP metadata points outside its folder: {rel!r}")
    if info.get("transform_descriptors"):
        raise UnsupportedError(f"DCP data stored with transforms {info['transform_descriptors']!r} "
                               "(compression or another extension) is not supported")
    path = os.path.join(folder, rel)
    size = files.get(path)
    if size is None:
        if not os.path.isfile(path):
            raise CorruptCheckpointError(f"{path}: DCP data file is missing")
        size = files[path] = os.path.getsize(path)
    if offset + length > size:
        raise CorruptCheckpointError(f"{path}: DCP data file is truncated")
    return path, offset, length


def _embedded(path: str, offset: int, length: int):
    """The object a torch.save archive at [offset, offset+length) of ``path`` holds, lazily."""
    z = TorchZip(path, base=offset, length=length)
    try:
        return load_refs(z.read("data.pkl"), lambda k, dtype, n: z.source(f"data/{k}", n, label=f"{path}@{offset}"))
    finally:
        z.close()


def _embedded_tensor(path: str, offset: int, length: int, fqn: str, shape: tuple | None, dtype: str) -> TensorRef:
    """A tensor chunk's torch.save archive. With its shape known from the metadata, the archive
    is parsed only when the chunk's bytes are first needed (and checked then against what the
    metadata promised): reading a folder of many chunks for their shapes opens none of them."""
    def resolve():
        t = _embedded(path, offset, length)
        if not isinstance(t, TensorRef):
            raise CorruptCheckpointError(f"{path}: chunk of {fqn!r} is not a tensor")
        if (shape is not None and tuple(t.shape) != shape) or t.dtype != dtype:
            raise CorruptCheckpointError(f"{path}: chunk of {fqn!r} is {t.dtype}{list(t.shape)}, the metadata "
                                         f"says {dtype}{list(shape or t.shape)}")
        return [t]

    if shape is None:  # nothing to promise: read it now
        return resolve()[0]
    return deferred_ref(shape, dtype, resolve, label=f"DCP chunk of {fqn!r}")


def _read_bytes_item(folder, fqn, info, files, trust_pickle):
    """A non-tensor value: the torch.save archive holding it, read with the torch-free
    unpickler; what needs more goes to torch.load, after the allowlist check torch_load does."""
    from ..safety import INERT, TRUST_HINT, torch_load_buffer, unsafe_in

    path, offset, length = _data_file(folder, info, files)
    z = TorchZip(path, base=offset, length=length)
    try:
        data = z.read("data.pkl")

        def source(k, dtype, n):
            return z.source(f"data/{k}", n, label=f"{path}@{offset}")

        try:
            return load_refs(data, source)
        except NotFastPath:
            pass
        unsafe = unsafe_in(data) if trust_pickle is not True else []
        if unsafe and trust_pickle == INERT:
            try:
                return load_refs(data, source, inert=unsafe)
            except NotFastPath:
                pass
    finally:
        z.close()
    if unsafe:
        raise UnsafePickleError(f"{path}: the value {fqn!r} would import globals outside the weights-only "
                                f"allowlist: {name_list(unsafe, 20)}; nothing was executed", globals_=unsafe,
                                hint=TRUST_HINT)
    import io

    with open(path, "rb") as f:
        raw = os.pread(f.fileno(), length, offset)
    return torch_load_buffer(io.BytesIO(raw), f"{path} ({fqn})", trust_pickle=trust_pickle is True)


def _read_tensor(folder, fqn, entry, chunks, files, st_cache):
    shape = _size(entry.get("size"))
    dtype = _dtype_of(entry.get("properties"))
    if not chunks:
        raise CorruptCheckpointError(f"DCP metadata: tensor {fqn!r} has no stored chunks")
    pieces = []
    sizes = _sizes_by_offset(entry)
    for index, info in chunks:
        path, offset, length = _data_file(folder, info, files)
        with open(path, "rb") as f:
            head = os.pread(f.fileno(), 4, offset)
        if head == b"PK\x03\x04":
            want = _chunk_sizes(sizes, index)
            if want is None and len(chunks) == 1 and not any(index.get("offset") or ()):
                want = shape
            t = _embedded_tensor(path, offset, length, fqn, _size(want) if want is not None else None, dtype)
        else:  # SerializationFormat.SAFETENSORS: the file is one safetensors file, tensors by name
            t = _safetensors_chunk(path, offset, fqn, st_cache)
            want = _chunk_sizes(sizes, index)
            if want is not None and tuple(t.shape) != _size(want):
                raise CorruptCheckpointError(f"{path}: chunk of {fqn!r} is {list(t.shape)}, the metadata says "
                                             f"{list(_size(want))}")
        pieces.append((_size(index.get("offset")) if index.get("offset") is not None else (0,) * len(shape), t))
    if len(pieces) == 1 and tuple(pieces[0][1].shape) == shape and not any(pieces[0][0]):
        t = pieces[0][1]
        if t.dtype != dtype:
            raise CorruptCheckpointError(f"DCP chunk of {fqn!r} is {t.dtype}, the metadata says {dtype}")
        return t, True
    return assemble(fqn, shape, dtype, pieces), False


def _safetensors_chunk(path: str, offset: int, fqn: str, cache: dict) -> TensorRef:
    """A tensor of a data file written with SerializationFormat.SAFETENSORS: the non-tensor
    values' archives first, then one safetensors blob to the end of the file, starting where
    the metadata says each of its tensors is."""
    from .. import stfmt
    from .safetensors import sniff as st_sniff

    with open(path, "rb") as f:
        head = os.pread(f.fileno(), 16, offset)
    if not st_sniff(path, head):
        raise UnsupportedError(f"{path}: DCP data that is neither torch.save archives nor safetensors")
    entries = cache.get((path, offset))
    if entries is None:
        entries = cache[(path, offset)] = stfmt.load_entries(path, offset)[0]
    if fqn not in entries:
        raise CorruptCheckpointError(f"{path}: no tensor {fqn!r} in this DCP safetensors file")
    return entries[fqn]


def _chunk_sizes(sizes: dict, index: dict):
    """The metadata's size of the chunk at ``index``'s offsets (``sizes``: :func:`_sizes_by_offset`)."""
    want = index.get("offset")
    return sizes.get(_size(want)) if want is not None else None


def _sizes_by_offset(entry: dict) -> dict:
    out = {}
    for chunk in entry.get("chunks") or ():
        f = _fields(chunk)
        out.setdefault(_size(f.get("offsets")), f.get("sizes"))
    return out
