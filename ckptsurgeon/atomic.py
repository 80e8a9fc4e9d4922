"""Atomic output: a temp file in the target directory, fsync, ``os.replace``.

A crash at any moment leaves either the previous file (or none) or the complete new one; the
temp file is removed on any error. The same-directory temp is what makes ``os.replace`` atomic.
The data is fsynced before the rename so that a power loss cannot leave an empty file behind
the new name; ``CKPT_SURGEON_FSYNC=0`` skips that (a process crash is still safe without it).
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Iterator

from .errors import OutputError


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_path(path: str, inputs: tuple = (), in_place: bool = False) -> str:
    path = os.fspath(path)
    if not path:
        raise OutputError("no output path given", hint="use -o/--output")
    for inp in inputs:
        if inp and os.path.exists(path) and same_file(path, inp) and not in_place:
            raise OutputError(f"refusing to overwrite the input {path}",
                              hint="choose another -o, or pass --in-place")
    if os.path.isdir(path):
        raise OutputError(f"output {path} is a directory")
    _refuse_special(path)
    parent = os.path.dirname(final_path(path))
    if not os.path.isdir(parent):
        if os.path.exists(parent):
            raise OutputError(f"output directory {parent} is a file, not a directory")
        raise OutputError(f"output directory {parent} does not exist")
    return path


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"))


def special_kind(path: str) -> str | None:
    """'a pipe', 'a character device'... for an existing path that is not a regular file or a
    folder (following links); None otherwise."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((kind for test, kind in _KINDS if test(mode)), None)


def _refuse_special(path: str) -> None:
    """An existing output that is not a regular file (``-o /dev/null``, a FIFO) would be
    replaced by the rename -- as root even a device node. Writers need a seekable file anyway."""
    kind = special_kind(path)
    if kind:
        raise OutputError(f"output {path} is {kind}, not a regular file; refusing to replace it",
                          hint="write to a file path")


def final_path(path: str) -> str:
    """Where the output lands: through a symbolic link (as ``torch.save`` or ``cp`` write),
    not over the link itself; the temp file goes beside that target so the rename stays atomic."""
    path = os.path.abspath(path)
    return os.path.realpath(path) if os.path.islink(path) else path


@contextlib.contextmanager
def atomic_output(path: str, label: str | None = None) -> Iterator[int]:
    """Yield a writable fd; on success the data appears at ``path`` atomically. ``label``: the
    name errors give (a shard written under an interim name first: the name the user will see)."""
    with _atomic(path, label) as (fd, _tmp):
        yield fd


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Like :func:`atomic_output` for writers that want a path (torch.save): the temp file's."""
    with _atomic(path) as (_fd, tmp):
        yield tmp


@contextlib.contextmanager
def _atomic(path: str, label: str | None = None) -> Iterator[tuple[int, str]]:
    import tempfile  # not for reading (inspect)

    path = final_path(path)
    label = label or path
    _refuse_special(path)
    parent = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except FileNotFoundError as e:
        if os.path.isdir(parent or "."):  # (a pseudo-filesystem such as /proc answers ENOENT)
            raise OutputError(f"cannot create a file in {parent}: {e.strerror}") from None
        raise OutputError(f"output directory {parent} does not exist") from None
    except OSError as e:
        raise OutputError(f"cannot create a file in {parent}: {e.strerror}") from None
    try:
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        yield fd, tmp
        if fsync_wanted():
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        tmp = None
        if fsync_wanted():
            _fsync_dir(parent)
    except OSError as e:
        if e.errno == 28:
            raise OutputError(f"no space left on device while writing {label}") from None
        if isinstance(e, PermissionError):
            raise OutputError(f"permission denied writing {label}") from None
        raise OutputError(f"cannot write {label}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def fsync_wanted() -> bool:
    """Whether outputs are fsynced before the rename (CKPT_SURGEON_FSYNC, default yes)."""
    return os.environ.get("CKPT_SURGEON_FSYNC", "1").strip().lower() not in ("0", "false", "no")


def _fsync_dir(path: str) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
