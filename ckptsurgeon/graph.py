"""From an unpickled object graph to a :class:`~ckptsurgeon.checkpoint.Checkpoint`, whichever
format it came from: a whole pickled module (real, or read inert) replaced by its state dict,
numpy arrays where a state dict holds tensors read as tensors, DeepSpeed ZeRO-3 placeholders
refused, a nested state dict held flat, and the state dict located (see :mod:`ckptsurgeon.locate`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

from . import dtypes
from .byteranges import MemoryBytes
from .checkpoint import Checkpoint, Source, flatten
from .errors import AmbiguousStateDictError, CorruptCheckpointError, NoStateDictError
from .locate import choose_state_dict, nests_tensors, path_str
from .inert import InertObject
from .refs import StorageRef, TensorRef, contiguous_stride

#: numpy (kind, itemsize) -> torch dtype name: the arrays read as tensors
_NUMPY_DTYPES = {("f", 2): "float16", ("f", 4): "float32", ("f", 8): "float64", ("i", 1): "int8", ("i", 2): "int16",
                 ("i", 4): "int32", ("i", 8): "int64", ("u", 1): "uint8", ("u", 2): "uint16", ("u", 4): "uint32",
                 ("u", 8): "uint64", ("b", 1): "bool", ("c", 8): "complex64", ("c", 16): "complex128"}


def from_object(obj: Any, source: Source, *, key=None, trusted=False, transforms=()) -> Checkpoint:
    notes = list(source.notes)
    if trusted:
        obj, converted = _modules_to_state_dicts(obj)
        if converted:
            notes.append(f"whole-model pickle: took the state dict of {', '.join(converted)}")
    else:  # modules read with --inert-pickle: their state dicts, from the recorded attributes
        obj, converted = _modules_to_state_dicts(obj, is_module=_is_inert_module, state_dict=_inert_state_dict)
        if converted:
            notes.append(f"whole-model pickle read inert: took the state dict of {', '.join(converted)} "
                         "(parameters and persistent buffers, in torch's order)")
    try:
        try:
            path, candidates = choose_state_dict(obj, key)
        except NoStateDictError:
            arrays = _arrays_as_tensors(obj)
            if arrays is None:
                raise
            obj, n = arrays
            notes.append(f"{dtypes.count(n, 'numpy array')} where a state dict holds tensors: read as torch tensors of the same "
                         "dtype and shape (outputs hold them as tensors)")
            path, candidates = choose_state_dict(obj, key)
        _refuse_zero3_placeholders(obj, path)
    except (AmbiguousStateDictError, NoStateDictError) as e:
        e.overview = Checkpoint(state=OrderedDict(), wrapper=obj, source=source, candidates=tuple(getattr(e, "candidates", ())),
                                transforms=tuple(transforms), notes=tuple(notes))
        raise
    sd = obj
    for p in path:
        sd = sd[p]
    nested = ()
    if nests_tensors(sd):
        flat, nested = flatten(sd)
        notes.append(f"nested state dict at {path_str(path)}: {len(nested) - 1} nested mappings, held with "
                     "\".\"-joined names; torch outputs nest them again")
        sd = flat
    return Checkpoint(
        state=OrderedDict(sd.items()), wrapper=obj if path else None, sd_path=path,
        metadata=None if nested else getattr(sd, "_metadata", None), source=source,
        candidates=tuple(path_str(c) for c in candidates), transforms=tuple(transforms), notes=tuple(notes),
        plain_dict=type(sd) is dict, nested=nested)


def _is_array(v) -> bool:
    return type(v).__module__ == "numpy" and numeric_array(v)


def _arrays_as_tensors(obj: Any, depth: int = 3, seen: set | None = None) -> tuple[Any, int] | None:
    """``obj`` with each mapping of names to mostly numpy arrays (weights saved as numpy: a
    converted Caffe/TensorFlow/JAX model) holding torch tensors in their place, and how many were
    converted; None when there is no such mapping. Only the mappings on the way are copied. A
    mapping the pickle puts in many places is looked at once (a 99 KB file of 2,000 keys each
    pointing at one 2,000-key mapping, three deep, was 8 * 10^9 steps)."""
    seen = set() if seen is None else seen
    if not isinstance(obj, Mapping) or not obj or depth <= 0 or id(obj) in seen:
        return None
    seen.add(id(obj))
    if not all(isinstance(k, str) for k in obj):
        return None
    n_arrays = sum(1 for v in obj.values() if _is_array(v))
    if n_arrays and n_arrays * 2 >= len(obj):
        new = type(obj)() if type(obj) in (dict, OrderedDict) else OrderedDict()
        for k, v in obj.items():
            new[k] = array_ref(v) if _is_array(v) else v
        return new, sum(1 for v in new.values() if isinstance(v, TensorRef))
    new, total = None, 0
    for k, v in obj.items():
        got = _arrays_as_tensors(v, depth - 1, seen)
        if got is not None:
            if new is None:
                new = type(obj)() if type(obj) in (dict, OrderedDict) else OrderedDict()
                new.update(obj)
            new[k], n = got
            total += n
    return (new, total) if new is not None else None


class ZeRO3Placeholders(NoStateDictError):
    """DeepSpeed ZeRO-3 model states: the weights are in the folder's optimizer-state files."""


def _refuse_zero3_placeholders(obj, path) -> None:
    """DeepSpeed ZeRO-3 model states hold empty placeholders: the weights are partitioned into
    the optimizer-state files. Writing them out would be silently empty; say so instead."""
    if not path or not isinstance(obj, Mapping) or "ds_version" not in obj:
        return
    sd = obj
    for p in path:
        sd = sd[p]
    sizes = [v.numel for v in sd.values() if isinstance(v, TensorRef)]
    empty = sum(1 for n in sizes if n == 0)
    if sizes and empty * 2 >= len(sizes):
        raise ZeRO3Placeholders(
            f"DeepSpeed ZeRO-3 model states: {empty} of {len(sizes)} tensors under {'/'.join(map(str, path))!r} "
            "are empty placeholders (the weights are partitioned into the *optim_states.pt files)",
            hint="pass the checkpoint folder (the one with 'latest', or the tag folder) instead: its ranks' "
                 "partitions are put together as zero_to_fp32.py does")


def _modules_to_state_dicts(obj, is_module=None, state_dict=None):
    """A whole pickled module (or modules as wrapper values) replaced by its state dict."""
    if is_module is None:
        import torch

        def is_module(v):
            return isinstance(v, torch.nn.Module)

        def state_dict(v):
            return v.state_dict()

    def name(v):
        return getattr(type(v), "inert_name", type(v).__name__)

    if is_module(obj):
        return state_dict(obj), [name(obj)]
    if isinstance(obj, Mapping):
        converted, out = [], type(obj)() if type(obj) in (dict, OrderedDict) else dict()
        for k, v in obj.items():
            if is_module(v):
                out[k] = state_dict(v)
                converted.append(f"{k} ({name(v)})")
            else:
                out[k] = v
        return (out, converted) if converted else (obj, [])
    return obj, []


_MODULE_ATTRS = ("_parameters", "_buffers", "_modules")


def _is_inert_module(v) -> bool:
    """An nn.Module read inert: its recorded state is the module's __dict__ (or it is
    torch.compile's wrapper around one, see :func:`_compiled_inner`)."""
    if not isinstance(v, InertObject):
        return False
    if _compiled_inner(v) is not None:
        return True
    state = v._inert["state"]
    return isinstance(state, Mapping) and all(isinstance(state.get(a), Mapping) for a in _MODULE_ATTRS)


_COMPILED = ("torch._dynamo.eval_frame", "OptimizedModule")


def _compiled_inner(v):
    """``torch.save(torch.compile(model))``: the wrapper pickles as a call
    ``OptimizedModule(model, dynamo_ctx)``; the model is the first argument. Its state dict, as
    the wrapper's own ``state_dict()`` gives it, is the model's under ``_orig_mod.``."""
    if (getattr(type(v), "inert_module", None), getattr(type(v), "inert_name", None)) != _COMPILED:
        return None
    args = v._inert["args"]
    return args[0] if args and _is_inert_module(args[0]) else None


_MAX_MODULE_VISITS = 100_000  # big LLMs have ~10^3-10^4 modules


def module_visit(visits: list | None, what: str) -> list:
    """One more module walked (``visits``: the walk's counter, [0] to start); a model sharing its
    modules without end is refused rather than walked."""
    visits = [0] if visits is None else visits
    visits[0] += 1
    if visits[0] > _MAX_MODULE_VISITS:
        raise CorruptCheckpointError(f"the {what} model names over {_MAX_MODULE_VISITS:,} submodules "
                                     "(shared without end?)")
    return visits


def _inert_state_dict(module, prefix: str = "", out=None, visits=None) -> "OrderedDict[str, Any]":
    """What module.state_dict() returns, from an inert module's recorded attributes: each
    module's parameters, then its persistent buffers, then its children, depth first. (A module
    shared under two names appears under both, as in torch; a file sharing them without end --
    one module under 1000 names, 3 levels: 10^9 entries -- is refused rather than walked.)"""
    out = OrderedDict() if out is None else out
    visits = module_visit(visits, "pickled")
    inner = _compiled_inner(module)
    if inner is not None:
        return _inert_state_dict(inner, f"{prefix}_orig_mod.", out, visits)
    state = module._inert["state"]
    skip = state.get("_non_persistent_buffers_set") or ()
    for kind in ("_parameters", "_buffers"):
        for name, t in state[kind].items():
            if t is not None and not (kind == "_buffers" and name in skip):
                out[prefix + name] = detached(t)
    for name, child in state["_modules"].items():
        if _is_inert_module(child):
            _inert_state_dict(child, f"{prefix}{name}.", out, visits)
    return out


def detached(t):
    if isinstance(t, TensorRef) and (t.param is not None or t.requires_grad):
        return TensorRef(t.storage, t.offset, t.shape, t.stride, t.dtype, hooks=None, metadata=t.metadata)
    return t


def numeric_array(arr) -> bool:
    """A numpy array of a dtype torch has (not strings, dates, objects): what array_ref makes a tensor."""
    return type(arr).__name__ == "ndarray" and (arr.dtype.kind, arr.dtype.itemsize) in _NUMPY_DTYPES


def array_ref(arr) -> Any:
    """A TensorRef over a numeric numpy array's bytes (little-endian, contiguous); the array
    itself when it holds no numbers (strings, dates, objects)."""
    import numpy

    return _tensor(numpy, arr)


def _tensor(numpy, arr):
    name = _NUMPY_DTYPES.get((arr.dtype.kind, arr.dtype.itemsize))
    if name is None:  # strings, dates, objects: not weights
        return arr
    arr = numpy.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    shape = tuple(int(s) for s in arr.shape)
    storage = StorageRef(name, arr.size, MemoryBytes(arr))
    return TensorRef(storage, 0, shape, contiguous_stride(shape), name)
