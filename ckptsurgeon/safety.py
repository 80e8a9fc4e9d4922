"""Safe loading with torch: weights-only always passed explicitly, never an automatic unsafe retry.

``pickle_globals`` lists what a file's pickles would import (opcodes only, nothing executed);
``unsafe_globals`` keeps those outside torch's weights-only allowlist (plus anything the user
registered with ``torch.serialization.add_safe_globals``).
"""

from __future__ import annotations

import functools
import os

from .errors import CorruptCheckpointError, NotACheckpointError, UnsafePickleError
from .keys import name_list
from .pickle_dist import is_dtensor_global
from .pickle_io import OTHER_OS_PATHS
from .pickle_scan import scan_globals

TRUST_HINT = ("allow just these globals with CKPT_SURGEON_SAFE_GLOBALS=module.Name,... if they are harmless data "
              "types; or read them as inert records with --inert-pickle (nothing imported or run); "
              "or, only if you trust where the file came from, re-run with --trust-pickle (API: trust_pickle=True)")
#: ``trust_pickle=INERT`` (``--inert-pickle``): globals outside the allowlists are recorded, not built.
INERT = "inert"
SAFE_GLOBALS_ENV = "CKPT_SURGEON_SAFE_GLOBALS"


#: Plain data types that training scripts put next to the weights and that torch's weights-only
#: allowlist lacks: timm's train.py saves its argparse ``args``, configs carry paths. Building one
#: runs no code of the file's choosing (``Namespace`` gets attributes set, a pure or POSIX path
#: object is made from strings without touching the filesystem), so they are allowed by default.
#: (``pathlib._local`` is where Python 3.13 pickles them from.) frozenset and slice are builtins
#: that torch's list happens to lack. ``io.BytesIO`` is how Transformer Engine saves each layer's
#: ``_extra_state`` (Megatron, NeMo): a buffer made from bytes and a position. A
#: ``collections.defaultdict`` (a metrics history: ``defaultdict(list)``) pickles its default
#: factory by name: the builtin container and number types are allowed as such (calling one makes
#: an empty list/dict/set or a 0), so such a history loads; any other factory stays refused.
#: Timestamps and durations a training loop records (``datetime`` from bytes or numbers; a fixed
#: ``timezone`` from a timedelta: any other tzinfo class stays refused), ``decimal.Decimal`` from
#: a string, ``collections.deque`` (a metrics window) from items and a length, ``uuid.UUID`` (a
#: run id) from an integer: each is built from plain values by its own constructor.
DATA_GLOBALS = ("argparse.Namespace", "pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
                "pathlib._local.PosixPath", "pathlib._local.PurePosixPath", "pathlib._local.PureWindowsPath",
                "builtins.frozenset", "builtins.slice", "_io.BytesIO",
                "collections.defaultdict", "builtins.list", "builtins.dict", "builtins.set", "builtins.int",
                "builtins.float", "datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta",
                "datetime.timezone", "decimal.Decimal", "collections.deque", "uuid.UUID")

#: numpy numbers, which resume checkpoints are full of: ``np.random.get_state()`` (a uint32
#: array), metrics and epochs as numpy scalars. An array is rebuilt from a shape, a dtype and raw
#: bytes, a scalar from a dtype and bytes, a dtype from a type-code string: no code of the file's
#: choosing runs (accelerate allows arrays by default for the same reason). Object dtype stays
#: refused (its elements are arbitrary objects), as does everything else under numpy. numpy 2
#: moved ``numpy.core`` to ``numpy._core``; files from either name the one they were written with.
NUMPY_GLOBALS = ("numpy.ndarray", "numpy.dtype",
                 "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                 "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
_NUMPY_REFUSED_DTYPES = ("ObjectDType", "StringDType")


@functools.lru_cache(maxsize=1)
def _numpy_globals() -> tuple[tuple[object, str], ...]:
    """NUMPY_GLOBALS and numpy's per-type dtype classes (which torch's loader checks when it
    BUILDs a dtype), as (object, name) pairs; () without numpy. torch imports numpy already."""
    try:
        import numpy
    except ImportError:
        return ()
    core = getattr(numpy, "_core", None) or numpy.core
    multiarray = core.multiarray
    objs = {"numpy.ndarray": numpy.ndarray, "numpy.dtype": numpy.dtype}
    for sub in ("core", "_core"):
        objs[f"numpy.{sub}.multiarray._reconstruct"] = multiarray._reconstruct
        objs[f"numpy.{sub}.multiarray.scalar"] = multiarray.scalar
    classes = getattr(numpy, "dtypes", None)
    if classes is not None:  # numpy >= 1.25: numpy.dtypes.Float64DType, ...
        for name in dir(classes):
            cls = getattr(classes, name)
            if name.endswith("DType") and isinstance(cls, type) and name not in _NUMPY_REFUSED_DTYPES:
                objs[f"{cls.__module__}.{name}"] = cls
    else:  # older numpy: the classes are numpy.dtype[float64], ... with no importable name
        for code in numpy.typecodes["All"]:
            if code != "O":
                cls = type(numpy.dtype(code))
                if cls is not numpy.dtype:
                    objs[f"numpy.{cls.__name__}"] = cls
    return tuple((obj, name) for name, obj in objs.items())


def extra_safe_globals() -> list[str]:
    """Globals the user allowlisted by name (``CKPT_SURGEON_SAFE_GLOBALS``), like torch's add_safe_globals."""
    return [g.strip() for g in os.environ.get(SAFE_GLOBALS_ENV, "").split(",") if g.strip()]


def _import_global(name: str):
    import importlib

    module, _, attr = name.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def data_global(qualname: str):
    """The real object for one of DATA_GLOBALS / NUMPY_GLOBALS (which the torch-free unpickler
    may call too), or None for any other name. numpy is imported only for numpy's names."""
    if qualname in DATA_GLOBALS:
        try:
            return _import_global(qualname)
        except (ImportError, AttributeError, ValueError):
            return None
    if qualname in NUMPY_GLOBALS:
        return _numpy_by_name().get(qualname)
    return None


@functools.lru_cache(maxsize=1)
def _numpy_by_name() -> dict:
    return {name: obj for obj, name in _numpy_globals()}


def _resolve_safe_globals() -> list:
    """DATA_GLOBALS (those this Python has), numpy's numbers and the user's CKPT_SURGEON_SAFE_GLOBALS, as
    torch.serialization.safe_globals takes them: (object, the name the pickle uses)."""
    from .errors import SelectionError

    objs = []
    for name in DATA_GLOBALS:
        try:
            objs.append((_import_global(name), name))
        except (ImportError, AttributeError, ValueError):
            continue
    objs += list(_numpy_globals())
    for name in extra_safe_globals():
        try:
            objs.append((_import_global(name), name))
        except (ImportError, AttributeError, ValueError):
            raise SelectionError(f"{SAFE_GLOBALS_ENV}: cannot import {name!r}") from None
    return objs


def _legacy_pickles(data: bytes, max_pickles: int = 5) -> list[bytes]:
    """The leading pickles of a legacy torch file (magic, protocol, sys info, object, keys)."""
    import pickletools

    out, pos = [], 0
    for _ in range(max_pickles):
        if pos >= len(data):
            break
        end = None
        try:
            for op, _arg, p in pickletools.genops(data[pos:]):
                if op.name == "STOP":
                    end = pos + p + 1
                    break
        except Exception:
            out.append(data[pos:])
            break
        if end is None:
            out.append(data[pos:])
            break
        out.append(data[pos:end])
        pos = end
    return out


_PICKLED_OBJECTS = ("custom_obj_", "opaque_obj_")  # torch.export archive constants, pickled as they are


def pickle_globals(path: str) -> dict[str, list[str]]:
    """{pickle name: [module.name, ...]} for every pickle stream in a torch file. In a zip: every
    ``.pkl`` record, the ``.pkl`` records of a torch.save file stored inside it (``outer!inner``:
    a torch.export archive's pickled weights, constants and sample inputs, which
    ``torch.export.load`` unpickles with ``weights_only=False``), and its pickled custom objects."""
    with open(path, "rb") as f:
        head = f.read(4)
    result: dict[str, list[str]] = {}
    if head == b"PK\x03\x04":
        import zipfile

        from .zipfmt import MAX_COMPRESSED_SMALL, ZIP_ERRORS, nested_zip, read_record, refuse_inflating, without_crcs

        def add(name: str, data: bytes) -> None:
            key, n = name, 1
            while key in result:  # a second record of one name: each scanned, each listed
                n += 1
                key = f"{name} (copy {n})"
            result[key] = scan_globals(data)

        try:
            with zipfile.ZipFile(path) as zf:
                checked = not without_crcs(zf.infolist())
                for info in zf.infolist():
                    base = info.filename.rsplit("/", 1)[-1]
                    if info.filename.endswith(".pkl") or base.startswith(_PICKLED_OBJECTS):
                        refuse_inflating(path, info, MAX_COMPRESSED_SMALL)
                        add(info.filename, read_record(zf, info, checked))
                    elif not base.isdigit():  # (a torch.save file's tensor records are never unpickled)
                        inner = nested_zip(path, info)
                        if inner is None:
                            continue
                        with inner:
                            inner_checked = not without_crcs(inner.infolist())
                            for i2 in inner.infolist():
                                if i2.filename.endswith(".pkl"):
                                    refuse_inflating(path, i2, MAX_COMPRESSED_SMALL)
                                    add(f"{info.filename}!{i2.filename}", read_record(inner, i2, inner_checked))
        except ZIP_ERRORS as e:
            raise CorruptCheckpointError(f"{path}: damaged zip container ({e})") from None
        return result
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(min(size, 512 << 20))
    import pickletools

    try:
        next(pickletools.genops(data))
    except Exception:
        data = b""
    if data:
        for i, chunk in enumerate(_legacy_pickles(data)):
            result[f"pickle#{i}"] = scan_globals(chunk)
        return result
    raise NotACheckpointError(f"{path} is not a pickle-based torch file")


def allowed_globals() -> set[str]:
    """torch's weights-only allowlist (this torch version) plus user-registered safe globals."""
    from torch import _weights_only_unpickler as wou

    names = set(wou._get_allowed_globals().keys())
    try:
        names |= set(wou._get_user_allowed_globals().keys())
    except Exception:
        pass
    return _Allowed(names | set(DATA_GLOBALS) | {name for _, name in _numpy_globals()} | set(extra_safe_globals())
                    | OTHER_OS_PATHS)


class _Allowed(set):
    """A set of allowed qualnames that also contains DTensor's parts under any of the module paths
    torch versions pickle them from (torch allows them once torch.distributed.tensor is imported;
    the torch-free reader records them inert)."""

    def __contains__(self, qualname) -> bool:
        if super().__contains__(qualname):
            return True
        module, _, name = str(qualname).rpartition(".")
        return is_dtensor_global(module, name)


#: modules whose globals are never taken for a mere name, even unused (torch blocks these even
#: when allowlisted; the rest is what pickle payloads reach for)
_NEVER_NAMED = {"os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "runpy", "pty", "ctypes",
                "importlib", "pickle", "_pickle", "shutil", "socket", "webbrowser", "code", "codeop", "pdb",
                "commands", "platform", "multiprocessing", "asyncio", "operator", "functools", "marshal",
                "types", "io", "_io", "tempfile", "cProfile", "profile", "pydoc", "timeit", "trace", "_posixsubprocess",
                "signal", "threading", "_thread", "copyreg", "inspect"}


def only_nameable(names) -> bool:
    """Whether the pickle's globals ``names`` may be kept as mere names when the pickle never
    builds anything with them (see pickle_io.load_refs_naming): classes by their names (a
    capitalised last part), of no module that pickle payloads use."""
    return bool(names) and all(
        n.rsplit(".", 1)[-1][:1].isupper() and n.split(".", 1)[0] not in _NEVER_NAMED for n in names)


def unsafe_in(pickle_bytes: bytes) -> list[str]:
    """The globals one pickle names that no allowlist allows (read from opcodes)."""
    allowed = allowed_globals()
    return [n for n in dict.fromkeys(scan_globals(pickle_bytes)) if n not in allowed]


def unsafe_globals(path: str) -> list[str]:
    allowed = allowed_globals()
    found: list[str] = []
    for names in pickle_globals(path).values():
        for n in names:
            if n not in allowed and n not in found:
                found.append(n)
    return found


def torch_load(path: str, *, trust_pickle: bool = False, mmap: bool = True):
    """torch.load to CPU, weights-only; unsafe files fail with the offending globals named."""
    import torch

    trust_pickle = trust_pickle is True  # INERT is not trust: torch.load never runs unsafe globals for it
    try:
        return _load(torch, path, True, mmap)
    except Exception as first:
        unsafe = unsafe_globals(path)
        if unsafe:
            if not trust_pickle:
                raise UnsafePickleError(
                    f"{path} would import globals outside the weights-only allowlist: {name_list(unsafe, 20)}; "
                    "nothing was executed", globals_=unsafe, hint=TRUST_HINT) from None
            try:
                return _load(torch, path, False, mmap)
            except Exception as e:
                raise CorruptCheckpointError(f"{path}: torch.load failed even with --trust-pickle: {_first_line(e)}") from None
        if trust_pickle and "weights only" in str(first).lower():
            try:
                return _load(torch, path, False, mmap)
            except Exception as e:
                raise CorruptCheckpointError(f"{path}: torch.load failed: {_first_line(e)}") from None
        refused = _refused_by_torch(first)
        if refused:
            raise UnsafePickleError(
                f"{path}: torch's weights-only loader refuses {', '.join(refused)} (a type the pickle "
                "builds, not one it imports by name); nothing was executed", globals_=refused,
                hint=TRUST_HINT) from None
        raise CorruptCheckpointError(f"{path}: torch cannot read it: {_first_line(first)}") from None


def torch_load_buffer(buf, label: str, *, trust_pickle: bool = False):
    """torch.load of an in-memory torch.save output (one value of a DCP folder), weights-only
    unless the user trusts the file; refusals name what torch refused."""
    import torch

    try:
        return _load(torch, buf, trust_pickle is not True, False)
    except Exception as e:
        refused = _refused_by_torch(e)
        if refused:
            raise UnsafePickleError(f"{label}: would import {', '.join(refused)}; nothing was executed",
                                    globals_=refused, hint=TRUST_HINT) from None
        raise CorruptCheckpointError(f"{label}: torch cannot read it: {_first_line(e)}") from None


def _load(torch, path, weights_only, mmap):
    import warnings

    with warnings.catch_warnings():
        # raised by torch's own loader (quantized tensors go through typed storages), not by the file
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
        return _load_inner(torch, path, weights_only, mmap)


def _load_inner(torch, path, weights_only, mmap):
    try:
        if weights_only and hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
            with torch.serialization.safe_globals(_resolve_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e).lower():
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=False)
        raise


def _refused_by_torch(e: BaseException) -> list[str]:
    """The types torch's weights-only unpickler names as refused (e.g. numpy's Float64DType,
    which a pickle builds from numpy.dtype without a GLOBAL of its own)."""
    import re

    text = str(e)
    found = re.findall(r"but got <class '([\w.]+)'>", text) + re.findall(r"Unsupported global: GLOBAL ([\w.]+)", text)
    return list(dict.fromkeys(found))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
