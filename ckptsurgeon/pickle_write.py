"""Write a stand-in graph (what :mod:`ckptsurgeon.pickle_io` reads) back as torch's ``data.pkl``.

``dump_refs`` pickles it with protocol 2 and the globals and persistent ids ``torch.save``
writes, numbering storages ``0..n-1`` in first-use order as ``torch.save`` does; nothing is
imported or run for a stand-in (real torch tensors a surgery computed are written the same way).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import sys
from collections import OrderedDict
from typing import Any

from . import dtypes
from .errors import OutputError, UnsupportedError
from .layout import compact_storages
from .pickle_io import NotFastPath
from .inert import CallRef, GlobalRef, InertCall, InertObject, inert_class
from .refs import StorageRef, TensorRef

_PLAIN_TENSOR = GlobalRef("torch", "Tensor")
_V2 = GlobalRef("torch._utils", "_rebuild_tensor_v2")
_V3 = GlobalRef("torch._utils", "_rebuild_tensor_v3")
_PARAM = GlobalRef("torch._utils", "_rebuild_parameter")
_PARAM_STATE = GlobalRef("torch._utils", "_rebuild_parameter_with_state")
_FROM_TYPE = GlobalRef("torch._tensor", "_rebuild_from_type_v2")
_UNTYPED = GlobalRef("torch.storage", "UntypedStorage")
_GETATTR = GlobalRef("__builtin__", "getattr")  # as Python's protocol-2 pickler names it
_TYPED = {name: GlobalRef("torch", name) for name in dtypes.STORAGE_TO_DTYPE}
_REFS_MODULE = GlobalRef.__module__


class _RefPickler(pickle.Pickler):
    """The C pickler, protocol 2, writing stand-ins back as the globals torch writes.

    A pickler can only emit a GLOBAL for an object it can find again by importing
    ``obj.__module__`` and looking the name up. So each :class:`GlobalRef` met is registered
    in its own module under a unique, random name for the duration of the dump, and those
    GLOBAL lines are rewritten to the real ``module\\nname`` afterwards -- in protocol 2 a GLOBAL
    is newline-terminated text, so the rewrite shifts no length field or memo index. (The
    pure-Python pickler could emit raw opcodes, but took ~30 ms for a 300-tensor state dict,
    10x the C pickler.)
    """

    def __init__(self, file, remap: dict | None = None, like: "_RefPickler | None" = None):
        super().__init__(file, protocol=2)
        self.storages: list[StorageRef] = []
        self._keys: dict[int, str] = {}
        # real tensors met in the graph, wrapped once: a second pass (``like``) reuses the wraps
        self._torch_storages: dict = like._torch_storages if like else {}
        self._torch_refs: dict = like._torch_refs if like else {}
        self.token = os.urandom(8).hex()
        self.names: dict[bytes, GlobalRef] = {}
        self.remap = remap or {}  # id(TensorRef) -> the same view on a compacted storage
        # what compacting needs: per storage the views written of it, and the storages pickled
        # other than as the storage of the tensor being reduced (they are written whole)
        self.views: dict[int, tuple[StorageRef, list[TensorRef]]] = {}
        self.whole: set[int] = set()
        self._expect = None

    def persistent_id(self, obj):
        if type(obj) is not StorageRef:
            return None
        if obj is self._expect:
            self._expect = None
        else:
            self.whole.add(id(obj))
        key = self._keys.get(id(obj))
        if key is None:
            key = str(len(self.storages))
            self._keys[id(obj)] = key
            self.storages.append(obj)
        legacy = dtypes.DTYPE_TO_STORAGE.get(obj.dtype)
        # bytes read from an UntypedStorage stay one (torch writes those for float8, uint16...)
        if legacy is not None and obj.storage_type.name != "UntypedStorage":
            return ("storage", _TYPED[legacy], key, "cpu", obj.numel)
        return ("storage", _UNTYPED, key, "cpu", obj.nbytes)

    def reducer_override(self, obj):
        t = type(obj)
        if t is TensorRef:
            return self._tensor_reduce(obj)
        if t is OrderedDict and not obj and not obj.__dict__:
            # the empty hooks dict every tensor carries: the same bytes pickle's own reduce gives,
            # without its copyreg._slotnames lookup (uncacheable on a builtin type; 9 us each)
            return OrderedDict, ()
        if t is GlobalRef:
            name = f"_G{self.token}_{len(self.names)}"
            setattr(sys.modules[_REFS_MODULE], name, obj)
            self.names[name.encode()] = obj
            return name  # pickled as GLOBAL <_REFS_MODULE> <name>, rewritten in dump_refs
        if t is CallRef or t is InertCall:
            return (obj.func, tuple(obj.args)) if obj.state is None else (obj.func, tuple(obj.args), obj.state)
        if isinstance(obj, InertObject):
            return _inert_reduce(obj)
        if isinstance(obj, type) and issubclass(obj, InertObject) and "." in obj.inert_name:
            # a nested class: written as protocol-2 pickles write one, getattr(Outer, 'Inner')
            outer, _, inner = obj.inert_name.rpartition(".")
            return _GETATTR, (inert_class(obj.inert_module, outer), inner)
        if isinstance(obj, type) and issubclass(obj, InertObject):  # the class itself: its global
            name = f"_G{self.token}_{len(self.names)}"
            setattr(sys.modules[_REFS_MODULE], name, obj)
            self.names[name.encode()] = GlobalRef(obj.inert_module, obj.inert_name)
            return name
        if t.__module__.startswith("torch"):
            import torch

            if isinstance(obj, torch.Tensor):
                # a real tensor inside a stand-in graph (computed by a surgery): same wire form
                ref = self._torch_refs.get(id(obj))
                if ref is None:
                    ref = self._torch_refs[id(obj)] = TensorRef.from_torch(obj, self._torch_storages)
                return self._tensor_reduce(ref)
        return NotImplemented

    def _tensor_reduce(self, obj: TensorRef):
        obj = self.remap.get(id(obj), obj)
        self.views.setdefault(id(obj.storage), (obj.storage, []))[1].append(obj)
        self._expect = obj.storage
        hooks = obj.hooks if obj.hooks is not None else OrderedDict()
        legacy = dtypes.DTYPE_TO_STORAGE.get(obj.storage.dtype)
        if legacy is not None and obj.storage.dtype == obj.dtype:
            args = (obj.storage, obj.offset, obj.shape, obj.stride, obj.requires_grad, hooks)
            func = _V2
        else:
            # new dtypes (and dtype-reinterpreting views) use an untyped storage plus a dtype
            if obj.storage.dtype != "uint8" and legacy is not None:
                raise NotFastPath("tensor viewing a typed storage as another dtype")
            args = (obj.storage, obj.offset, obj.shape, obj.stride, obj.requires_grad, hooks,
                    GlobalRef("torch", obj.dtype))
            func = _V3
        if obj.metadata is not None:
            args = args + (obj.metadata,)
        if obj.param is None and obj.attrs is not None:
            return _FROM_TYPE, (func, _PLAIN_TENSOR, args, obj.attrs)
        if obj.param is None:
            return func, args
        rg, phooks, state = obj.param
        phooks = phooks if phooks is not None else OrderedDict()
        if state is None:
            return _PARAM, (CallRef(func, args), rg, phooks)
        return _PARAM_STATE, (CallRef(func, args), rg, phooks, state)


def _inert_reduce(obj: InertObject):
    """The reduce tuple that re-emits an inert object's opcodes: NEWOBJ or a call, then its
    appended and set items, then BUILD, as pickle's own save_reduce orders them."""
    import copyreg

    rec = obj._inert
    if rec["kwargs"]:
        raise UnsupportedError(f"{obj.inert_module}.{obj.inert_name} was built with keyword arguments "
                               "(pickle protocol 4), which torch's protocol-2 pickle cannot carry")
    items = iter(rec["items"]) if rec["items"] else None
    dictitems = iter(rec["dictitems"]) if rec["dictitems"] else None
    if rec["newobj"]:
        return copyreg.__newobj__, (type(obj),) + tuple(rec["args"]), rec["state"], items, dictitems
    return type(obj), tuple(rec["args"]), rec["state"], items, dictitems


def dump_refs(obj: Any, *, compact: bool = True, report: dict | None = None) -> tuple[bytes, list[StorageRef]]:
    """Pickle a stand-in graph; returns the bytes and the storages in key order.

    ``compact``: a storage whose tensors being written leave a large part of it unused (a
    DeepSpeed or Megatron state dict's parameters are views of one flat buffer; ``extract``
    keeps some of them) is written as only the parts still used, the views moved to match
    (:func:`layout.compact_storages`); torch.save would write the whole buffer with every subset.
    The graph is pickled once more then (the pickle is small). ``report`` (a dict) gets
    ``compacted``: how many storages and bytes were left out."""
    pickler, data = _dump(obj, None)
    if compact:
        remap, saved = compact_storages(pickler.views, pickler.whole)
        if remap:
            pickler, data = _dump(obj, remap, like=pickler)
            if report is not None:
                report["compacted"] = saved
    return data, pickler.storages


def _dump(obj: Any, remap: dict | None, like: "_RefPickler | None" = None) -> tuple["_RefPickler", bytes]:
    buf = io.BytesIO()
    p = _RefPickler(buf, remap=remap, like=like)
    try:
        p.dump(obj)
    except RecursionError:
        # not UnsupportedError: that sends the writer to torch.save, which recurses the same way
        raise OutputError("the checkpoint's non-tensor content is nested too deeply to pickle again "
                          "(torch.save could not write it either)",
                          hint="write safetensors (.safetensors): the state dict's tensors only") from None
    finally:
        module = sys.modules[_REFS_MODULE]
        for name in p.names:
            delattr(module, name.decode())
    placeholder = re.compile(b"c" + re.escape(_REFS_MODULE.encode()) + b"\n(_G" + p.token.encode() + b"_[0-9]+)\n")

    def real(m):
        g = p.names[m.group(1)]
        return b"c" + g.module.encode("utf-8") + b"\n" + g.name.encode("utf-8") + b"\n"

    data, n = placeholder.subn(real, buf.getvalue())
    if n != len(p.names):  # every registered global is written exactly once (then memoized)
        raise RuntimeError(f"pickle rewrite found {n} of {len(p.names)} globals")
    return p, data
