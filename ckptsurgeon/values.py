"""A checkpoint's values beyond its tensors' bytes: stand-ins made real torch objects
(``materialize``), or turned into plain Python that two loads of one file give alike, for
comparing (``plain``, within a ``Walk`` budget).
"""

from __future__ import annotations

import copy
import io
import re
from collections import OrderedDict
from typing import Any, Mapping

from .checkpoint import tensor_info
from .inert import CallRef, GlobalRef, InertCall, InertObject
from .refs import TensorRef, is_tensor_like


def materialize(obj: Any, memo: dict | None = None) -> Any:
    """Replace stand-ins (TensorRef, GlobalRef, CallRef) by real torch objects, recursively."""
    memo = {} if memo is None else memo
    oid = id(obj)
    if oid in memo:
        return memo[oid]
    if isinstance(obj, TensorRef):
        out = obj.to_torch()
    elif isinstance(obj, GlobalRef):
        out = obj.resolve()
    elif isinstance(obj, CallRef):
        func = obj.func.resolve()
        out = func(*[materialize(a, memo) for a in obj.args])
        if obj.state is not None:
            state = materialize(obj.state, memo)
            if hasattr(out, "__setstate__"):
                out.__setstate__(state)
            else:
                out.__dict__.update(state)
    elif isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else copy.copy(obj)
        memo[oid] = out
        for k, v in obj.items():
            out[k] = materialize(v, memo)
        if getattr(obj, "__dict__", None):
            for k, v in vars(obj).items():
                setattr(out, k, materialize(v, memo))
        return out
    elif isinstance(obj, list):
        out = []
        memo[oid] = out
        out.extend(materialize(v, memo) for v in obj)
        return out
    elif isinstance(obj, tuple):
        out = tuple(materialize(v, memo) for v in obj)
    elif isinstance(obj, (set, frozenset)):
        out = type(obj)(materialize(v, memo) for v in obj)
    else:
        out = obj
    memo[oid] = out
    return out


class Walk:
    """State of one :func:`plain` traversal: the containers on the current path (a container met
    again inside itself -- pickles can hold cycles -- becomes "<cycle>") and a budget of nodes.

    The budget counts items visited, not distinct objects: a pickle can share one list between two slots
    of another, sixty levels deep, and a tree walk of those 2^60 paths would never end (a 2 KB
    "billion laughs" file); and 100,000 nested lists would exhaust Python's recursion limit. Past
    ``limit`` nodes or ``MAX_DEPTH`` levels the rest becomes "<truncated>" and ``truncated`` says
    so."""

    LIMIT = 200_000
    MAX_DEPTH = 100  # containers inside containers; real checkpoints nest a handful deep

    def __init__(self, limit: int = LIMIT):
        self.active: set = set()
        self.left = limit
        self.truncated = False

    def enter(self, obj) -> str | None:
        """None to go on into ``obj``, or the marker to put in its place."""
        if id(obj) in self.active:
            return "<cycle>"
        if self.left <= 0 or len(self.active) >= self.MAX_DEPTH:
            self.truncated = True
            return "<truncated>"
        try:  # the container and each of its items: what the caller is about to go through
            self.left -= 1 + len(obj)
        except TypeError:
            self.left -= 1
        self.active.add(id(obj))
        return None


def plain(obj: Any, walk: Walk | None = None) -> Any:
    """A JSON-able / deepdiff-able view of non-tensor content: tensors become summaries, cycles
    "<cycle>", and anything past the walk's node budget "<truncated>" (see :class:`Walk`)."""
    walk = Walk() if walk is None else walk
    if not isinstance(obj, (Mapping, list, tuple, set, frozenset, InertObject, InertCall, CallRef)):
        return _plain(obj, walk)
    marker = walk.enter(obj)
    if marker is not None:
        return marker
    try:
        return _plain(obj, walk)
    finally:
        walk.active.discard(id(obj))


def _plain(obj: Any, active: Walk) -> Any:
    if isinstance(obj, TensorRef) or is_tensor_like(obj):
        i = tensor_info(obj)
        return {"<tensor>": f"{i['dtype']}{i['shape']}"}
    if isinstance(obj, GlobalRef):
        return f"<{obj.qualname}>"
    if isinstance(obj, CallRef):
        return f"<{obj.func.qualname}{tuple(plain(a, active) for a in obj.args)!r}>"
    if isinstance(obj, Mapping):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): plain(v, active) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, active) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((plain(v, active) for v in obj), key=repr)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return _plain_bytes(obj)
    if isinstance(obj, io.BytesIO):  # Transformer Engine's extra state: compared by content, not address
        return {"<BytesIO>": _plain_bytes(obj.getbuffer())}
    if isinstance(obj, InertObject):  # compared by how the pickle builds it
        rec = obj._inert
        out = {f"<inert {obj.inert_module}.{obj.inert_name}>": plain(list(rec["args"]), active)}
        out.update({k: plain(rec[k], active) for k in ("kwargs", "state", "items", "dictitems") if rec[k]})
        return out
    if isinstance(obj, InertCall):
        return {"<inert call>": plain(obj.func, active), "args": plain(list(obj.args), active), "state": plain(obj.state, active)}
    if isinstance(obj, type) and issubclass(obj, InertObject):
        return f"<{obj.inert_module}.{obj.inert_name}>"
    if type(obj).__module__ == "numpy" and hasattr(obj, "dtype") and hasattr(obj, "tobytes"):
        if obj.size <= 16:  # small arrays and scalars: their values
            return obj.tolist()
        import hashlib

        data = obj.tobytes()  # a large array: dtype, shape and a hash of its bytes
        return {"<ndarray>": f"{obj.dtype}{list(obj.shape)}", "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}
    cls = type(obj)
    if cls.__repr__ is object.__repr__ and isinstance(getattr(obj, "__dict__", None), dict):
        # (a trusted load's plain object) its class and attributes: its repr is just its address
        return {f"<object {cls.__module__}.{cls.__qualname__}>": plain(obj.__dict__, active)}
    return _ADDRESS.sub("", repr(obj))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # "<Foo object at 0x7f..>": differs between two loads of one file


def _plain_bytes(data) -> Any:
    if len(data) <= 32:
        return f"<bytes {bytes(data).hex()}>"
    import hashlib

    return {"<bytes>": len(data), "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}
