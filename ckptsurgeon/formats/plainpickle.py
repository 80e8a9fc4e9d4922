"""Plain pickles of weights, not written by torch.save: Detectron2's model-zoo ``.pkl`` files
(``{"model": {name: numpy array}, "__author__": ...}``) and old code that ``pickle.dump``-ed a
dict of numpy arrays. torch.load cannot read them (no torch magic number, no zip).

They are read with the same allowlist-only unpickler as torch files (numpy arrays, scalars and
dtypes are on the list; anything else is refused with its name, or recorded inert with
``--inert-pickle``), and every numeric numpy array becomes a tensor over its bytes (in memory:
a pickle holds its data inline), so the usual surgeries and writers apply. A pickle of torch
tensors (``pickle.dump(model.state_dict())``) hides each storage as an embedded torch.save call
(``torch.storage._load_from_bytes``): it reads only with ``--trust-pickle``.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from typing import Any

from ..checkpoint import Source
from ..dtypes import count
from ..errors import CkptSurgeonError, CorruptCheckpointError, UnsafePickleError
from ..graph import array_ref, from_object
from ..keys import name_list
from ..pickle_io import NotFastPath, load_refs
from ..safety import INERT, TRUST_HINT, unsafe_in
from .torchfile import sniff_legacy

MAX_BYTES = 8 << 30  # the whole pickle is read into memory
_TORCH_STORAGE = "torch.storage._load_from_bytes"


def sniff(path: str, head: bytes) -> bool:
    """A pickle of protocol 2-5 that is not a legacy torch file (which starts the same way)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and not sniff_legacy(path, head)


def load(path: str, *, key=None, trust_pickle=False, **_):
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise CorruptCheckpointError(f"{path}: a plain pickle of {size:,} bytes is more than this reader holds in memory",
                                     hint="load it with pickle and save it with torch.save or safetensors")
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _read(path, data, trust_pickle)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{path}: {e}") from None
    except CkptSurgeonError:
        raise
    except Exception as e:  # a damaged pickle: truncated, bad opcode, wrong arguments
        raise CorruptCheckpointError(f"{path}: damaged pickle ({type(e).__name__}: {e})") from None
    obj, arrays = _arrays_to_tensors(obj)
    how = (f"{count(arrays, 'numpy array')} read as tensors" if arrays else "read with --trust-pickle" if trust_pickle is True
           else "no numpy arrays in it")
    note = (f"a plain pickle (not torch.save): {how}, held in memory; write it as .pt or .safetensors to work on "
            "it lazily")
    source = Source(path=path, format="pickle", size=size, files=(path,), lazy=False, notes=(note,))
    return from_object(obj, source, key=key, trusted=trust_pickle is True)


def _read(path: str, data: bytes, trust_pickle):
    """The allowlist-only read; the globals outside it are looked up (which imports torch, for its
    allowlist) only when the pickle needs one."""
    try:
        return load_refs(data, _no_storage)
    except NotFastPath as e:
        unsafe = unsafe_in(data)
        if trust_pickle == INERT and unsafe:
            return load_refs(data, _no_storage, inert=unsafe)
        if trust_pickle is True:
            return _trusted_load(path, data)
        if unsafe == [_TORCH_STORAGE]:
            raise UnsafePickleError(
                f"{path} is a plain pickle of torch tensors (pickle.dump of a state dict): each storage is an "
                f"embedded torch.save call ({_TORCH_STORAGE}); nothing was executed", globals_=unsafe,
                hint="only if you trust where the file came from, re-run with --trust-pickle, and keep the "
                     "result as .safetensors or .pt") from None
        if unsafe:
            raise UnsafePickleError(
                f"{path} would import globals outside the weights-only allowlist: {name_list(unsafe, 20)}; "
                "nothing was executed", globals_=unsafe, hint=TRUST_HINT) from None
        raise CorruptCheckpointError(f"a pickle this reader does not take ({e})") from None


def _no_storage(key, dtype, nbytes):
    raise NotFastPath("a persistent id in a plain pickle")


def _trusted_load(path: str, data: bytes):
    """``--trust-pickle``: Python's own unpickler (runs what the file says; the user trusts it)."""
    try:
        __import__("torch")  # a pickle of torch tensors rebuilds them through torch
        return pickle.loads(data)
    except Exception as e:
        raise CorruptCheckpointError(f"{path}: cannot be unpickled even with --trust-pickle "
                                     f"({type(e).__name__}: {e})") from None


def _arrays_to_tensors(root: Any) -> tuple[Any, int]:
    """The object graph with every numeric numpy array replaced by a tensor over its bytes
    (little-endian, contiguous); containers rebuilt only where something inside changed."""
    try:
        import numpy
    except ImportError:  # no numpy: no arrays could have been built either
        return root, 0
    memo: dict[int, Any] = {}
    count = 0

    def convert(o):
        nonlocal count
        if isinstance(o, numpy.ndarray):
            got = memo.get(id(o))
            if got is None:
                got = memo[id(o)] = array_ref(o)
                count += got is not o
            return got
        if isinstance(o, dict):
            if id(o) in memo:
                return memo[id(o)]
            memo[id(o)] = o  # a container that holds itself stays as it is
            items = [(k, convert(v)) for k, v in o.items()]
            if all(v is o[k] for k, v in items):
                return o
            new = OrderedDict(items) if isinstance(o, OrderedDict) else dict(items)
            if hasattr(o, "_metadata"):
                new._metadata = o._metadata
            memo[id(o)] = new
            return new
        if isinstance(o, (list, tuple)):
            if id(o) in memo:
                return memo[id(o)]
            memo[id(o)] = o
            items = [convert(v) for v in o]
            if all(a is b for a, b in zip(items, o)):
                return o
            new = items if isinstance(o, list) else tuple(items)
            memo[id(o)] = new
            return new
        return o

    return convert(root), count
