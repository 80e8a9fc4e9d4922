"""The ``ckptsurgeon`` entry points, remembered between runs.

Finding entry points means importing :mod:`importlib.metadata` (which pulls in the email
package) and reading every installed distribution's metadata: ~30-40 ms, a tenth of what a whole
surgery on a small file costs. The result only changes when something is installed or removed,
and an install or removal always adds, renames or deletes a ``*.dist-info`` folder in a
``sys.path`` folder, which changes that folder's modification time. So the list is kept in a
small JSON file keyed on the interpreter and ``sys.path``, and trusted only while every
``sys.path`` entry still has the modification time it had when the list was made. A folder whose
time changed without a distribution coming or going -- the working directory, first on
``sys.path`` under ``python -m`` or a script, changes with every output written there -- is
listed again: the list stays valid while its ``*.dist-info``/``*.egg-info``/``*.egg-link``
entries are the same names with the same times (a reinstall makes a new folder); anything else
means a fresh scan. (stevedore keeps an entry-point cache on the same principle.)

Environment:
  ``CKPT_SURGEON_CACHE_DIR``  where the file lives (default ``$XDG_CACHE_HOME/ckpt-surgeon`` or
                              ``~/.cache/ckpt-surgeon``); ``off`` never reads or writes it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import zlib
from dataclasses import dataclass

CACHE_ENV = "CKPT_SURGEON_CACHE_DIR"
_OFF = ("off", "0", "no", "false", "none")
_FORMAT = 2
_DIST_SUFFIXES = (".dist-info", ".egg-info", ".egg-link")


@dataclass(frozen=True)
class EntryPoint:
    """What the manager needs of an entry point: where it points and who installed it."""

    name: str
    value: str  # "module" or "module:attr.path"
    dist: str = ""
    version: str = ""

    @property
    def module(self) -> str:
        return self.value.partition("[")[0].partition(":")[0].strip()

    def load(self):
        attrs = self.value.partition("[")[0].partition(":")[2]
        obj = importlib.import_module(self.module)
        for attr in attrs.strip().split(".") if attrs.strip() else ():
            obj = getattr(obj, attr)
        return obj


def entry_points(group: str) -> list[EntryPoint]:
    """Every entry point of ``group`` in the installed distributions (from the cache when valid)."""
    path = cache_file(group)
    if path:
        cached = _read(path)
        if cached is not None:
            return cached
        stamp = _stamp()  # before the scan: an install during it makes the next run scan again
    found = _scan(group)
    if path:
        _write(path, stamp, found)
    return found


def cache_file(group: str) -> str | None:
    folder = os.environ.get(CACHE_ENV, "").strip()
    if folder.lower() in _OFF:
        return None
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "ckpt-surgeon")
    key = json.dumps([group, sys.executable, sys.version, sys.path])
    return os.path.join(folder, f"entry-points-{zlib.crc32(key.encode()):08x}.json")


def _head() -> list:
    return [_FORMAT, sys.executable, sys.version]


def _mtime(entry: str) -> int | None:
    try:
        return os.stat(entry or ".").st_mtime_ns
    except OSError:
        return None


def _dists(entry: str) -> list | None:
    """The distribution entries of a sys.path folder, ``[[name, mtime], ...]`` sorted; None when
    it cannot be listed (a zip file, a missing folder)."""
    try:
        with os.scandir(entry or ".") as it:
            return sorted([e.name, e.stat(follow_symlinks=False).st_mtime_ns]
                          for e in it if e.name.endswith(_DIST_SUFFIXES))
    except OSError:
        return None


def _stamp() -> list:
    """The key, and per sys.path entry its modification time (None where it is missing) and its
    distribution entries."""
    return _head() + [[[e, _mtime(e), _dists(e)] for e in sys.path]]


def _valid(stamp) -> bool:
    if not isinstance(stamp, list) or len(stamp) != 4 or stamp[:3] != _head():
        return False
    rows = stamp[3]
    if not isinstance(rows, list) or [r[0] if isinstance(r, list) and r else None for r in rows] != sys.path:
        return False
    for entry, mtime, dists in rows:
        if _mtime(entry) == mtime:
            continue
        if dists is None or _dists(entry) != dists:  # a distribution came, went or was reinstalled
            return False
    return True


def _read(path: str) -> list[EntryPoint] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not _valid(data.get("stamp")):
            return None
        return [EntryPoint(*map(str, row)) for row in data["entry_points"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _write(path: str, stamp: list, eps: list[EntryPoint]) -> None:
    _write_json(path, {"stamp": stamp, "entry_points": [[e.name, e.value, e.dist, e.version] for e in eps]})


def _write_json(path: str, data) -> bool:
    """Best effort, atomically: an unwritable cache folder only means the next run scans again."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def _scan(group: str) -> list[EntryPoint]:
    from importlib.metadata import entry_points as _eps

    eps = _eps()
    selected = eps.select(group=group) if hasattr(eps, "select") else eps.get(group, [])  # < 3.10: dict
    dists: dict[int, tuple[str, str]] = {}
    return [EntryPoint(ep.name, ep.value, *_dist_of(ep, dists)) for ep in selected]


def _dist_of(ep, cache: dict) -> tuple[str, str]:
    """(name, version) of the distribution behind an entry point. Each ``.name``/``.version``
    access parses the METADATA file again (email parser, ~1.5 ms): once per distribution here."""
    d = getattr(ep, "dist", None)
    if d is None:
        return "", ""
    got = cache.get(id(d))
    if got is None:
        try:
            md = d.metadata
            got = (md["Name"] or "", md["Version"] or "")
        except Exception:
            got = ("", "")
        cache[id(d)] = got
    return got


# --------------------------------------------------------------------------- the plugin index
_INDEX_FORMAT = 1


class PluginIndex:
    """What each entry point's plugin implements and provides (hook names; command, format,
    operation and model-transform names), remembered so that a run imports only the plugins it
    needs: ``strip-prefix`` imports the plugin that provides it, not all twelve (~25 ms of a
    ~0.12 s run here), and a third-party plugin that imports torch at module level costs
    nothing to the commands that are not its own.

    A plugin's record holds every file its import brought in from its own top-level package
    (path, modification time, size), and is trusted only while each of them is unchanged: an
    upgrade, a reinstall or an edit of an editable install makes the next run import the plugin
    again and record it anew. The entry points themselves are checked as before (see the module
    docstring), and a record is keyed on the entry point, its distribution and version.
    """

    def __init__(self, path: str, head: list):
        self.path, self.head = path, head
        self.records: dict[str, dict] = {}
        self.dirty = False
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("head") == head and isinstance(data.get("plugins"), dict):
                self.records = data["plugins"]
        except (OSError, ValueError, TypeError, AttributeError):
            pass

    @classmethod
    def open(cls, group: str, head: list) -> "PluginIndex | None":
        path = cache_file(group)
        if not path:
            return None
        folder, name = os.path.split(path)
        return cls(os.path.join(folder, name.replace("entry-points-", "plugins-", 1)), [_INDEX_FORMAT] + head)

    @staticmethod
    def key(ep: EntryPoint) -> str:
        return "\0".join((ep.name, ep.value, ep.dist, ep.version))

    def valid(self, ep: EntryPoint) -> dict | None:
        """The record of ``ep`` if every file it names is as it was, else None."""
        rec = self.records.get(self.key(ep))
        try:
            if not rec or not rec["files"]:
                return None
            for path, mtime, size in rec["files"]:
                st = os.stat(path)
                if st.st_mtime_ns != mtime or st.st_size != size:
                    return None
            hooks, provides = rec["hooks"], rec["provides"]
            if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks) \
                    or not isinstance(provides, dict):
                return None
            for names in provides.values():  # a hand-edited or damaged file is ignored, never fatal
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    return None
        except (OSError, TypeError, ValueError, KeyError):
            return None
        return rec

    def remember(self, ep: EntryPoint, files: list[str], hooks: list[str], provides: dict) -> None:
        rows = []
        for path in sorted(set(files)):
            try:
                st = os.stat(path)
            except OSError:
                return self.forget(ep)  # a file that cannot be checked: no record
            rows.append([path, st.st_mtime_ns, st.st_size])
        rec = {"files": rows, "hooks": sorted(hooks), "provides": provides}
        if rows and self.records.get(self.key(ep)) != rec:
            self.records[self.key(ep)] = rec
            self.dirty = True

    def forget(self, ep: EntryPoint) -> None:
        if self.records.pop(self.key(ep), None) is not None:
            self.dirty = True

    def save(self, keep: set[str]) -> None:
        """Write the records of the entry points in ``keep`` (best effort, atomically)."""
        stale = set(self.records) - keep
        if not self.dirty and not stale:
            return
        for k in stale:
            del self.records[k]
        if _write_json(self.path, {"head": self.head, "plugins": self.records}):
            self.dirty = False


def module_files(modname: str, before: set[str]) -> list[str] | None:
    """The source files behind plugin module ``modname``: its own, and those of every module of
    its top-level package that its import brought in (``before``: ``sys.modules`` before it).
    None when the module has no file to check (a namespace package, a built-in)."""
    own = sys.modules.get(modname)
    path = getattr(own, "__file__", None)
    if not path:
        return None
    top = modname.split(".")[0]
    files = [path]
    for name in set(sys.modules) - before:
        if name == top or name.startswith(top + "."):
            f = getattr(sys.modules.get(name), "__file__", None)
            if f:
                files.append(f)
    return files
