"""What the CLI prints is shown, never obeyed: text that comes from a checkpoint (tensor names,
wrapper keys, notes and errors quoting them) may hold terminal control characters -- an escape
sequence that recolours, hides or rewrites what a terminal shows, a carriage return, a
right-to-left override. While a command runs, stdout and stderr escape them (``\\x1b``), so a
hostile file's names print as visible text. Newlines and tabs pass; JSON output escapes them
itself. Progress bars, which move the cursor on purpose, write to the raw stream."""

from __future__ import annotations

import contextlib
import sys

_CONTROLS = [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)]
_ESCAPES = {c: f"\\x{c:02x}" for c in _CONTROLS}
# bidirectional overrides and isolates: they reorder what follows them on screen
_ESCAPES.update({c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def escape_controls(text: str) -> str:
    """``text`` with every terminal control character written as an escape (newlines and tabs kept).

    Example::

        escape_controls("a\\x1b[31mb")  # 'a\\\\x1b[31mb'
    """
    return text.translate(_ESCAPES)


_ONE_LINE = {**_ESCAPES, ord("\n"): "\\n", ord("\t"): "\\t"}


def one_line(text: str) -> str:
    """``escape_controls`` with newlines and tabs escaped too: a name as one cell of one line."""
    return text.translate(_ONE_LINE)


class SafeText:
    """A text stream that writes ``escape_controls`` of what it is given; everything else (fileno,
    isatty, encoding, buffer, flush) is the stream's own."""

    def __init__(self, stream):
        self.raw = stream

    def write(self, s):
        if isinstance(s, str):
            self.raw.write(escape_controls(s))
            return len(s)
        return self.raw.write(s)  # bytes: what the stream does with them (click probes with b"")

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self.raw, name)


def raw(stream):
    """The stream beneath a SafeText (for output that moves the cursor on purpose)."""
    return getattr(stream, "raw", stream) if isinstance(stream, SafeText) else stream


@contextlib.contextmanager
def safe_output():
    """stdout and stderr escape control characters for the duration (see the module docstring)."""
    out, err = sys.stdout, sys.stderr
    if out is not None and not isinstance(out, SafeText):
        sys.stdout = SafeText(out)
    if err is not None and not isinstance(err, SafeText):
        sys.stderr = SafeText(err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
