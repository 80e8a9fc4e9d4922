"""List the globals a pickle would import by reading its opcodes: nothing is unpickled or run.

``scan_globals`` is what ``scan`` reports and what the loaders check against torch's
weights-only allowlist before anything else reads a pickle.
"""

from __future__ import annotations

from typing import Any

from .errors import CorruptCheckpointError

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}


def _py3_name(module: str, name: str) -> str:
    """The global an unpickler really imports (protocol < 3 pickles use Python 2 names)."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


_DTYPE = object()  # scan marker: the value on the stack is the numpy.dtype global


def _numpy_dtype_class(code) -> str | None:
    """numpy.dtype('f8') is rebuilt as numpy.dtypes.Float64DType, a class torch's weights-only
    loader also wants allowed although no GLOBAL names it: name it, without running the pickle
    (numpy parses the type code string; nothing else). None without numpy or for odd codes."""
    if not isinstance(code, str) or len(code) > 16:
        return None
    try:
        import numpy

        cls = type(numpy.dtype(code))
    except Exception:
        return None
    if cls is numpy.dtype:  # numpy < 1.25: no per-type classes
        return None
    return f"{cls.__module__}.{cls.__name__}"


def scan_globals(data: bytes) -> list[str]:
    """Every ``module.name`` the pickle would import, in order, without executing it.

    Python 2 names in old-protocol pickles (``__builtin__.eval``) are reported as the Python 3
    global they resolve to (``builtins.eval``). Raises CorruptCheckpointError when the opcode
    stream cannot be parsed.
    """
    import pickletools  # only scans need it (~2 ms of import on every surgery otherwise)

    found: list[str] = []
    memo: dict[int, Any] = {}
    recent: list[Any] = []
    dtype_next = False
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if dtype_next and name in _STRING_OPS | {"BINGET", "LONG_BINGET", "GET"}:
                dtype_next = False
                code = arg if name in _STRING_OPS else memo.get(int(arg))
                cls = _numpy_dtype_class(code)
                if cls and cls not in found:
                    found.append(cls)
            if name in _STRING_OPS:
                recent.append(arg if isinstance(arg, str) else str(arg))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                if recent:
                    memo[int(arg)] = recent[-1]
            elif name == "MEMOIZE":
                if recent:
                    memo[len(memo)] = recent[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(arg)))
                dtype_next = recent[-1] is _DTYPE
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append(_py3_name(module, attr))
                dtype_next = found[-1] == "numpy.dtype"
                recent.append(_DTYPE if dtype_next else None)
            elif name == "STACK_GLOBAL":
                if len(recent) >= 2 and isinstance(recent[-1], str) and isinstance(recent[-2], str):
                    found.append(_py3_name(recent[-2], recent[-1]))
                    dtype_next = found[-1] == "numpy.dtype"
                    if dtype_next:
                        recent.append(_DTYPE)
                        continue
                else:
                    found.append("<unresolved STACK_GLOBAL>")
                recent.append(None)
            elif name == "STOP":
                break
            else:
                recent.append(None)
            if len(recent) > 64:
                del recent[:-8]
    except Exception as e:  # genops raises ValueError and friends on garbage
        raise CorruptCheckpointError(f"the pickle cannot be parsed ({e})") from None
    return found
