"""What a pickle is checked for before and while CPython's C unpickler reads it: memo indexes
that would make it allocate gigabytes (``check_memo``), and the stray SystemError a damaged
bytearray length prints on CPython < 3.12 (``no_stray_bytearray_error``)."""

from __future__ import annotations

import contextlib
import sys
import threading

from .errors import CorruptCheckpointError

_ARG: list = [None] * 256
for _n, _codes in ((0, b"\x97\x98N\x88\x89]ael)t\x85\x86\x87}dsu\x8f\x90\x9102(1\x94\x93Rbo\x81\x92.Q"),
                   (1, b"Khq\x82\x80"), (2, b"M\x83"), (4, b"Jjr\x84"), (8, b"G\x95")):
    for _c in _codes:
        _ARG[_c] = (0, _n)
for _n, _codes in ((1, b"\x8aUC\x8c"), (4, b"\x8bTBX"), (8, b"\x8e\x96\x8d")):
    for _c in _codes:
        _ARG[_c] = (1, _n)
for _c in b"ILSVFgpP":
    _ARG[_c] = (2, 1)
for _c in b"ci":
    _ARG[_c] = (2, 2)
_SIGNED_LENGTH = b"\x8bT"  # LONG4, BINSTRING: a negative length is an error


def check_memo(data, start: int = 0, limit: int | None = None) -> int:
    """Walk the opcodes of the pickle at ``data[start:]`` (bytes or an mmap) up to its STOP,
    building nothing, and return where it ends; CorruptCheckpointError when a memo index
    (LONG_BINPUT, PUT) is beyond ``limit`` (default: the data's length, which no real pickle's
    memo reaches: one entry per object) or the stream breaks off. CPython's C unpickler sizes its
    memo table by the largest index it is given: a 1 KB file asking for index 2^31 made it
    allocate and zero 32 GB (gh-115952, fixed in CPython only in 2025). ~0.35 us per opcode."""
    n = len(data)
    limit = n if limit is None else limit
    arg, frb, i = _ARG, int.from_bytes, start
    try:
        while True:
            op = data[i]
            kind = arg[op]
            if kind is None:
                raise CorruptCheckpointError(f"not a pickle: unknown opcode {op:#04x} at byte {i}")
            how, m = kind
            if op == 0x72:  # LONG_BINPUT
                if frb(data[i + 1:i + 5], "little") > limit:
                    raise CorruptCheckpointError(f"pickle memo index {frb(data[i + 1:i + 5], 'little'):,} at byte {i} "
                                                 "is beyond anything the pickle could hold (a damaged or hostile file)")
                i += 5
            elif how == 0:
                if op == 0x2E:  # STOP
                    return i + 1
                i += 1 + m
            elif how == 1:
                length = frb(data[i + 1:i + 1 + m], "little", signed=op in _SIGNED_LENGTH)
                if length < 0:
                    raise CorruptCheckpointError(f"pickle: negative length at byte {i}")
                i += 1 + m + length
            else:
                j = i + 1
                for _ in range(m):
                    j = data.find(b"\n", j) + 1
                    if not j:
                        raise IndexError
                if op == 0x70 and int(data[i + 1:j - 1] or b"0") > limit:  # PUT
                    raise CorruptCheckpointError(f"pickle memo index at byte {i} is beyond anything the pickle "
                                                 "could hold (a damaged or hostile file)")
                i = j
            if i > n:
                raise IndexError
    except (IndexError, ValueError):  # an argument or line past the end, a PUT that is no number
        raise CorruptCheckpointError("the pickle breaks off before its end (truncated or damaged)") from None


_HOOK_LOCK = threading.Lock()
_HOOK_DEPTH = 0
_HOOK_PREVIOUS = None


def _quiet_excepthook(kind, value, tb):
    if kind is SystemError and str(value) == "deallocated bytearray object has exported buffers":
        return
    (_HOOK_PREVIOUS or sys.__excepthook__)(kind, value, tb)


@contextlib.contextmanager
def no_stray_bytearray_error():
    """A damaged BYTEARRAY8 length (terabytes) makes CPython < 3.12 fail the allocation and then
    free a half-built bytearray whose export count was never set: it prints a SystemError through
    sys.excepthook beside the MemoryError we report (two lines on stderr where one belongs). That
    one message is dropped while a pickle loads; any other goes to the hook that was there."""
    global _HOOK_DEPTH, _HOOK_PREVIOUS
    with _HOOK_LOCK:
        if _HOOK_DEPTH == 0:
            _HOOK_PREVIOUS, sys.excepthook = sys.excepthook, _quiet_excepthook
        _HOOK_DEPTH += 1
    try:
        yield
    finally:
        with _HOOK_LOCK:
            _HOOK_DEPTH -= 1
            if _HOOK_DEPTH == 0:
                if sys.excepthook is _quiet_excepthook:
                    sys.excepthook = _HOOK_PREVIOUS
                _HOOK_PREVIOUS = None
