"""torch.export program archives (``torch.export.save``, ``.pt2``), read for their weights.

Since torch 2.6 the archive keeps each model's weights as raw storage records,
``data/weights/weight_N``, described by ``data/weights/<model>_weights_config.json``: for every
state-dict name, the record (several names may share one: ties and views keep their aliasing),
dtype (torch.export's ScalarType number), sizes, strides and storage offset. So the weights are
byte ranges of the file, read like a torch zip's records, without torch and without the program.
Older archives keep the state dict as a torch.save file inside (``data/weights/<model>.pt``),
read in place like a ``.nemo``'s. Weights a subclass holds (``use_pickle``: torch.save of a
tensor subclass, which ``torch.export.load`` unpickles with ``weights_only=False``) are refused,
as is an AOTInductor package (compiled weights). Read-only: outputs are plain state dicts.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from .. import dtypes
from ..checkpoint import Source
from ..errors import CorruptCheckpointError, NotACheckpointError, UnsupportedError
from ..refs import StorageRef, TensorRef
from ..zipfmt import TorchZip

# torch._export.serde.schema.ScalarType (numbers are part of the serialized format)
SCALAR_TYPES = {
    1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32", 8: "float64",
    9: "complex32", 10: "complex64", 11: "complex128", 12: "bool", 13: "bfloat16", 28: "uint16",
    29: "float8_e4m3fn", 30: "float8_e5m2", 31: "float8_e4m3fnuz", 32: "float8_e5m2fnuz", 33: "float8_e8m0fnu",
    34: "uint32", 35: "uint64",
}
STRIDED = 7  # schema.Layout.Strided
WEIGHTS = "data/weights/"
MAX_CONFIG = 256 << 20  # a config JSON larger than this is not a real archive's (~700 B per weight)


def sniff(path: str, head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" and path.lower().endswith(".pt2")


def load(path: str, *, key: str | None = None, trust_pickle=False, **_):
    """A ``.pt2``; a torch.save file named so is read as what it is (torchfile.load_zip, which
    also sends an export archive under another name here)."""
    from .torchfile import load_zip

    return load_zip(path, key=key, trust_pickle=trust_pickle)


def load_program(z: TorchZip, path: str, *, key=None, trust_pickle=False):
    from ..graph import from_object
    from .torchfile import _load_zip

    models = sorted(n[len("models/"):-len(".json")] for n in z.infos if n.startswith("models/") and n.endswith(".json"))
    hint = _AOTI_HINT if any(n.startswith("data/aotinductor/") for n in z.infos) else None  # (for the errors)
    if not models:
        raise NotACheckpointError(f"{path}: a torch.export archive (.pt2) with no exported program in it", hint=hint)
    states, notes = OrderedDict(), []
    for model in models:
        config = f"{WEIGHTS}{model}_weights_config.json"
        legacy = f"{WEIGHTS}{model}.pt"
        if z.has(config):
            states[model] = _weights(z, path, config)
        elif z.has(legacy):  # torch 2.5's layout: a torch.save file inside the archive, read in place
            info = z.infos[legacy]
            if info.compress_type != 0:
                raise UnsupportedError(f"{path}: {legacy} is compressed inside the archive",
                                       hint="extract it and pass the file itself")
            inner = TorchZip(path, base=z.data_offset(info), length=info.file_size)
            try:
                ck = _load_zip(inner, path, None, trust_pickle, embedded=f"{legacy} inside the archive")
            finally:
                inner.close()
            states[model] = ck.state
        else:
            raise NotACheckpointError(f"{path}: the torch.export archive holds no weights for model {model!r}",
                                      hint=hint)
    notes.append(f"torch.export archive (.pt2): the weights of {', '.join(models)} read from the archive's own "
                 "records, the program itself not; outputs are plain state dicts")
    source = Source(path=path, format="torch-export", size=z.size, files=(path,), lazy=True,
                    zip_prefix=z.prefix, notes=tuple(notes), program="torch.export")
    obj = states[models[0]] if len(models) == 1 else states  # several programs: --key names one
    return from_object(obj, source, key=key)


_AOTI_HINT = ("an AOTInductor package keeps its weights compiled into the model; take them from the program "
              "before compiling it (torch.export.save, or its state_dict)")


def _ints(values, what: str, where: str) -> list[int]:
    if not isinstance(values, list):
        raise CorruptCheckpointError(f"{where}: {what} is not a list")
    out = []
    for v in values:
        n = v.get("as_int") if isinstance(v, dict) else None
        if type(n) is not int:
            raise UnsupportedError(f"{where}: a symbolic or missing {what} ({v!r})")
        out.append(n)
    return out


def _weights(z: TorchZip, path: str, config_name: str) -> "OrderedDict[str, TensorRef]":
    try:
        config = json.loads(z.read(config_name, MAX_CONFIG))["config"]
        if not isinstance(config, dict):
            raise TypeError("config is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable {config_name} ({type(e).__name__}: {e})") from None
    storages: dict = {}  # record -> StorageRef: names sharing a record share a storage (ties, views)
    out: "OrderedDict[str, TensorRef]" = OrderedDict()
    for name, meta in config.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("tensor_meta"), dict):
            raise CorruptCheckpointError(f"{path}: weight {name!r} has no tensor description in {config_name}")
        if meta.get("use_pickle"):
            raise UnsupportedError(
                f"{path}: weight {name!r} is a tensor subclass pickled whole inside the archive (torch.export.load "
                "unpickles it with weights_only=False)", hint="convert it to a plain tensor before torch.export.save")
        tm = meta["tensor_meta"]
        dtype = SCALAR_TYPES.get(tm.get("dtype"))
        if dtype is None or dtype not in dtypes.ITEMSIZE:
            raise UnsupportedError(f"{path}: weight {name!r} has dtype number {tm.get('dtype')!r}, not one "
                                   "ckpt-surgeon knows")
        if tm.get("layout", STRIDED) != STRIDED:
            raise UnsupportedError(f"{path}: weight {name!r} is not a strided (dense) tensor")
        where = f"{path}: weight {name!r}"
        shape = _ints(tm.get("sizes"), "size", where)
        stride = _ints(tm.get("strides"), "stride", where)
        offset = _ints([tm.get("storage_offset")], "storage offset", where)[0]
        if len(shape) != len(stride):
            raise CorruptCheckpointError(f"{path}: weight {name!r} has {len(shape)} sizes and {len(stride)} strides")
        record = f"{WEIGHTS}{meta.get('path_name')}"
        if not isinstance(meta.get("path_name"), str) or "/" in meta["path_name"] or not z.has(record):
            raise CorruptCheckpointError(f"{path}: weight {name!r} names a record the archive lacks "
                                         f"({meta.get('path_name')!r})")
        storage = storages.get(record)
        if storage is None:
            size = z.infos[record].file_size
            if size % dtypes.itemsize(dtype):
                raise CorruptCheckpointError(f"{path}: record {record} holds {size} bytes, not a whole number of "
                                             f"{dtype} elements")
            storage = storages[record] = StorageRef(dtype, size // dtypes.itemsize(dtype),
                                                    z.source(record, size, label=f"weight record {record}"),
                                                    key=record)
        elif storage.dtype != dtype:
            raise UnsupportedError(f"{path}: weight {name!r} views record {record} as {dtype}, another as "
                                   f"{storage.dtype}")
        t = TensorRef(storage, offset, shape, stride, dtype)
        try:
            t.check_bounds()
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{path}: weight {name!r}: {e.message}") from None
        out[str(name)] = t
    return out
