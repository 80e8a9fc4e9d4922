"""Finds and loads plugins; collects what they provide and reports conflicts.

Entry points of the ``ckptsurgeon`` group are loaded one at a time: a plugin that fails to
import or registers a hook nobody specified becomes a *problem* (a warning on stderr and a
``broken`` line in ``ckpt-surgeon plugins``), never a dead CLI. A plugin the plugin index
vouches for is imported only when something it provides is asked for (see :class:`Manager`).

Environment:
  ``CKPT_SURGEON_DISABLE_PLUGIN_AUTOLOAD=1``  load only ckpt-surgeon's own plugins
  ``CKPT_SURGEON_PLUGINS=mod_a,mod_b``        also register these modules (for trying a plugin)
  ``CKPT_SURGEON_CACHE_DIR=off``               scan installed distributions on every run
                                              (see :mod:`ckptsurgeon.entrypoints`)
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import pluggy

from . import hookspecs
from .entrypoints import EntryPoint, PluginIndex, entry_points, module_files
from .errors import CkptSurgeonError, PluginError
from .types import PluginInfo

GROUP = "ckptsurgeon"
OWN_DIST = "ckpt-surgeon"
DISABLE_ENV = "CKPT_SURGEON_DISABLE_PLUGIN_AUTOLOAD"
EXTRA_ENV = "CKPT_SURGEON_PLUGINS"
BUILTIN = ("ckptsurgeon.formats",)


# the hooks whose items carry a name, and so can be looked up one at a time
NAMED_HOOKS = ("ckptsurgeon_commands", "ckptsurgeon_formats", "ckptsurgeon_operations", "ckptsurgeon_model_transforms")


class Manager:
    """The plugins, loaded as they are needed.

    Every entry point is known from the start, but a plugin the index (:class:`PluginIndex`)
    vouches for is imported only when something it provides is asked for: a command by name, an
    operation, a model transform, or any plugin's formats. A plugin without a valid record (new,
    changed, broken, or the cache switched off) is imported at once, as before, and recorded.
    Results are the same as loading everything: hook results are ordered by registration rank
    (builtin, then entry-point order, then ``CKPT_SURGEON_PLUGINS``), whatever order the imports
    happened in, so the first registration still wins a conflict.
    """

    def __init__(self, autoload: bool = True, extra: list[str] | None = None):
        self.pm = pluggy.PluginManager("ckptsurgeon")
        self.pm.add_hookspecs(hookspecs.CkptSurgeonSpecs)
        self.infos: list[PluginInfo] = []
        self.problems: list[str] = []
        self.conflicts: list[str] = []
        self.echo = None  # set by the CLI once it has shown the start-up problems: later ones at once
        self._cache: dict[str, Any] = {}
        self._rank: dict[str, int] = {}
        self._pending: dict[str, tuple] = {}  # name -> (entry point, index record): not imported yet
        self._results: dict[tuple, Any] = {}  # (plugin, hook) -> its items, or the exception it raised
        self._eps: dict[str, EntryPoint] = {}
        self._index = PluginIndex.open(GROUP, _index_head()) if autoload else None
        for modname in BUILTIN:
            self._rank[modname] = -1
            self._register_module(modname, name=modname, status="builtin", dist=OWN_DIST)
        if autoload:
            self._load_entry_points()
        for modname in (extra if extra is not None else _env_list(EXTRA_ENV)):
            self._rank.setdefault(modname, len(self._rank))
            self._register_module(modname, name=modname, status="loaded", dist="")
        self._check_pending()
        self._save_index()

    # ---- loading
    def _load_entry_points(self) -> None:
        only_own = os.environ.get(DISABLE_ENV, "").strip() not in ("", "0", "false", "no")
        seen = set()
        for ep in entry_points(GROUP):
            dist, version = ep.dist, ep.version
            if (ep.name, ep.value) in seen:
                continue
            seen.add((ep.name, ep.value))
            self._eps.setdefault(ep.name, ep)  # (a disabled plugin's record is kept for the next run)
            if only_own and dist.lower() != OWN_DIST:
                self.infos.append(PluginInfo(ep.name, ep.value, dist, version, status="disabled"))
                continue
            if self.pm.has_plugin(ep.name) or ep.name in self._pending:
                self._note(self.conflicts, f"plugin name {ep.name!r} registered twice ({ep.value}); second ignored")
                continue
            self._rank[ep.name] = len(self._rank)
            record = self._index.valid(ep) if self._index is not None else None
            if record is not None:
                self._pending[ep.name] = (ep, record)
            else:
                self._import(ep)

    def _import(self, ep: EntryPoint) -> None:
        before = set(sys.modules)
        try:
            module = ep.load()
            self.pm.register(module, name=ep.name)
        except Exception as e:  # a broken plugin must not kill the CLI
            self._problem(f"plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}")
            self.infos.append(PluginInfo(ep.name, ep.value, ep.dist, ep.version, status="broken", error=str(e)))
            if self._index is not None:
                self._index.forget(ep)
            return
        hooks = self._hooks_of(module)
        self.infos.append(PluginInfo(ep.name, ep.value, ep.dist, ep.version, hooks))
        for hook in hooks:  # a hook already collected without this plugin is collected again
            self._cache.pop(hook, None)
        if self._index is None:
            return
        files = module_files(ep.module, before)
        provides: dict = {}
        for hook in hooks:
            if hook in NAMED_HOOKS:
                items = self._items(ep.name, hook)
                if isinstance(items, BaseException):
                    files = None  # a failing hook: imported (and reported) on every run
                    break
                provides[hook] = [str(getattr(i, "name", "")) for i in items]
        if files:
            self._index.remember(ep, files, hooks, provides)
        else:
            self._index.forget(ep)

    def _register_module(self, modname: str, name: str, status: str, dist: str) -> None:
        try:
            module = importlib.import_module(modname)
            self.pm.register(module, name=name)
            self.infos.append(PluginInfo(name, modname, dist, _version(dist), self._hooks_of(module), status=status))
        except Exception as e:
            self._problem(f"plugin {name!r} failed to load: {type(e).__name__}: {e}")
            self.infos.append(PluginInfo(name, modname, dist, status="broken", error=str(e)))

    def _check_pending(self) -> None:
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as e:
                self._drop(e.plugin, f"unknown hook: {e}")
                if e.plugin is None:  # nothing to unregister: asking again would loop
                    return

    def _drop(self, plugin, reason: str) -> None:
        name = self.pm.get_name(plugin) if plugin is not None else "?"
        if plugin is not None:
            self.pm.unregister(plugin)
        self._problem(f"plugin {name!r} disabled: {reason}")
        for info in self.infos:
            if info.name == name:
                info.status, info.error = "broken", reason
        if self._index is not None and name in self._eps:
            self._index.forget(self._eps[name])
        self._cache.clear()

    def _hooks_of(self, module) -> list[str]:
        return sorted(n for n in hookspecs.HOOK_NAMES if hasattr(module, n))

    def _load_pending(self, wanted) -> None:
        """Import the plugins not imported yet whose record satisfies ``wanted(record)``."""
        global _LAZY
        names = sorted((n for n, (_, rec) in self._pending.items() if wanted(rec)), key=self._rank.__getitem__)
        if not names or _LAZY:  # (a plugin's import asking for more plugins gets what is loaded)
            return
        _LAZY = True
        try:
            for name in names:
                ep, _ = self._pending.pop(name)
                self._import(ep)
            self._check_pending()
        finally:
            _LAZY = False
        self._save_index()

    def load_all(self) -> None:
        """Import every plugin (``ckpt-surgeon plugins`` shows them all, as they are)."""
        self._load_pending(lambda rec: True)
        self.infos.sort(key=lambda i: self._rank.get(i.name, len(self._rank)))

    def _save_index(self) -> None:
        if self._index is not None:
            self._index.save({PluginIndex.key(ep) for ep in self._eps.values()})

    def _note(self, where: list, msg: str) -> None:
        if msg not in where:
            where.append(msg)

    def _problem(self, msg: str) -> None:
        if msg not in self.problems:
            self.problems.append(msg)
            if self.echo is not None:
                self.echo(msg)

    # ---- collecting
    def _items(self, pname: str, hook: str):
        """What plugin ``pname``'s ``hook`` returns (called once), or the exception it raised."""
        key = (pname, hook)
        if key not in self._results:
            try:
                got = []
                for impl in getattr(self.pm.hook, hook).get_hookimpls():
                    if impl.plugin_name == pname:
                        got.extend(impl.function() or [])
                self._results[key] = got
            except Exception as e:
                self._results[key] = e
        return self._results[key]

    def _gather(self, hook: str, attr: str) -> dict[str, tuple[Any, str]]:
        """The items of ``hook`` from the plugins imported so far, by ``attr``; first registration wins."""
        out: dict[str, tuple[Any, str]] = {}
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        # pluggy's order (trylast, plain, tryfirst), each in registration rank, not import order
        impls = sorted(impls, key=lambda i: (0 if i.trylast else 2 if i.tryfirst else 1,
                                             self._rank.get(i.plugin_name, len(self._rank))))
        done = set()
        for impl in impls:  # plugin by plugin, so one failing plugin is isolated and attributable
            pname = impl.plugin_name
            if pname in done:
                continue
            done.add(pname)
            items = self._items(pname, hook)
            if isinstance(items, BaseException):
                self._problem(f"plugin {pname!r} failed in {hook}: {type(items).__name__}: {items}")
                continue
            for item in items:
                key = getattr(item, attr, None)
                if key is None:
                    self._problem(f"plugin {pname!r} returned an item without a {attr} from {hook}")
                    continue
                if key in out:
                    self._note(self.conflicts, f"{hook}: {key!r} provided by both {out[key][1]!r} and {pname!r}; "
                                               f"keeping {out[key][1]!r}")
                    continue
                out[key] = (item, pname)
        return out

    def _collect(self, hook: str, attr: str) -> dict[str, tuple[Any, str]]:
        if hook not in self._cache:
            self._load_pending(lambda rec: hook in rec["hooks"])
            self._cache[hook] = self._gather(hook, attr)
        return self._cache[hook]

    def _lookup(self, hook: str, name: str):
        """``(item, plugin)`` for the item ``name`` of ``hook``, importing only the plugins that
        provide it; None where no plugin does."""
        if hook in self._cache:
            return self._cache[hook].get(name)
        self._load_pending(lambda rec: name in rec["provides"].get(hook, ()))
        found = self._gather(hook, "name").get(name)
        if found is None:  # not where the index says: look everywhere
            found = self._collect(hook, "name").get(name)
        return found

    def formats(self) -> dict[str, tuple[Any, str]]:
        return self._collect("ckptsurgeon_formats", "name")

    def commands(self) -> dict[str, tuple[Any, str]]:
        return self._collect("ckptsurgeon_commands", "name")

    def operations(self) -> dict[str, tuple[Any, str]]:
        return self._collect("ckptsurgeon_operations", "name")

    def model_transforms(self) -> dict[str, tuple[Any, str]]:
        return self._collect("ckptsurgeon_model_transforms", "name")

    def command(self, name: str):
        """The click command ``name`` and its plugin, or None."""
        return self._lookup("ckptsurgeon_commands", name)

    def operation(self, name: str):
        found = self._lookup("ckptsurgeon_operations", name)
        if found is None:
            raise PluginError(f"no plugin provides the operation {name!r}")
        return found[0].func

    def transform(self, name: str):
        found = self._lookup("ckptsurgeon_model_transforms", name)
        if found is None:
            known = ", ".join(sorted(self.model_transforms())) or "none"
            raise PluginError(f"no plugin provides the model transform {name!r} (known: {known})")
        return found[0]


def _env_list(var: str) -> list[str]:
    return [m.strip() for m in os.environ.get(var, "").split(",") if m.strip()]


def _version(dist: str) -> str:
    if not dist:
        return ""
    if dist == OWN_DIST:
        from . import __version__

        return __version__
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return ""


def _index_head() -> list:
    """What every record of the plugin index depends on besides its own files: this version of
    ckpt-surgeon and its hook specifications."""
    from . import __version__

    try:
        specs = os.stat(hookspecs.__file__).st_mtime_ns
    except (OSError, TypeError):
        specs = 0
    return [__version__, specs]


_MANAGER: Manager | None = None
_BUILDING = False
_LAZY = False  # a plugin is being imported on demand


def get_manager() -> Manager:
    global _MANAGER, _BUILDING
    if _MANAGER is None:
        if _BUILDING:  # a plugin's import asked for an operation: there is none to give yet
            raise PluginError("the plugin manager was asked for while it was being built")
        _BUILDING = True
        try:
            _MANAGER = Manager()
        finally:
            _BUILDING = False
    return _MANAGER


def building() -> bool:
    """True while the shared manager is loading plugins."""
    return _BUILDING or _LAZY


def reset_manager(manager: Manager | None = None) -> None:
    """Drop the cached manager (tests, or after installing a plugin in-process)."""
    global _MANAGER
    _MANAGER = manager


def report_problems(stream=None) -> None:
    m = get_manager()
    stream = stream or sys.stderr
    for p in m.problems:
        print(f"ckpt-surgeon: warning: {p}", file=stream)


__all__ = ["Manager", "get_manager", "reset_manager", "CkptSurgeonError"]
