"""Finds and loads plugins; collects what they provide and reports conflicts.

Entry points of the ``ckptsurgeon`` group are loaded one at a time: a plugin that fails to
import or registers a hook nobody specified becomes a *problem* (a warning on stderr and a
``broken`` line in ``ckpt-surgeon plugins``), never a dead CLI.

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
from .entrypoints import entry_points
from .errors import CkptSurgeonError, PluginError
from .types import PluginInfo

GROUP = "ckptsurgeon"
OWN_DIST = "ckpt-surgeon"
DISABLE_ENV = "CKPT_SURGEON_DISABLE_PLUGIN_AUTOLOAD"
EXTRA_ENV = "CKPT_SURGEON_PLUGINS"
BUILTIN = ("ckptsurgeon.formats",)


class Manager:
    def __init__(self, autoload: bool = True, extra: list[str] | None = None):
        self.pm = pluggy.PluginManager("ckptsurgeon")
        self.pm.add_hookspecs(hookspecs.CkptSurgeonSpecs)
        self.infos: list[PluginInfo] = []
        self.problems: list[str] = []
        self.conflicts: list[str] = []
        self._cache: dict[str, Any] = {}
        for modname in BUILTIN:
            self._register_module(modname, name=modname, status="builtin", dist=OWN_DIST)
        if autoload:
            self._load_entry_points()
        for modname in (extra if extra is not None else _env_list(EXTRA_ENV)):
            self._register_module(modname, name=modname, status="loaded", dist="")
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            self._drop(e.plugin, f"unknown hook: {e}")

    # ---- loading
    def _load_entry_points(self) -> None:
        only_own = os.environ.get(DISABLE_ENV, "").strip() not in ("", "0", "false", "no")
        seen = set()
        for ep in entry_points(GROUP):
            dist, version = ep.dist, ep.version
            if (ep.name, ep.value) in seen:
                continue
            seen.add((ep.name, ep.value))
            if only_own and dist.lower() != OWN_DIST:
                self.infos.append(PluginInfo(ep.name, ep.value, dist, version, status="disabled"))
                continue
            if self.pm.has_plugin(ep.name):
                self.conflicts.append(f"plugin name {ep.name!r} registered twice ({ep.value}); second ignored")
                continue
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
                self.infos.append(PluginInfo(ep.name, ep.value, dist, version, self._hooks_of(module)))
            except Exception as e:  # a broken plugin must not kill the CLI
                msg = f"plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}"
                self.problems.append(msg)
                self.infos.append(PluginInfo(ep.name, ep.value, dist, version, status="broken", error=str(e)))

    def _register_module(self, modname: str, name: str, status: str, dist: str) -> None:
        try:
            module = importlib.import_module(modname)
            self.pm.register(module, name=name)
            self.infos.append(PluginInfo(name, modname, dist, _version(dist), self._hooks_of(module), status=status))
        except Exception as e:
            self.problems.append(f"plugin {name!r} failed to load: {type(e).__name__}: {e}")
            self.infos.append(PluginInfo(name, modname, dist, status="broken", error=str(e)))

    def _drop(self, plugin, reason: str) -> None:
        name = self.pm.get_name(plugin) if plugin is not None else "?"
        if plugin is not None:
            self.pm.unregister(plugin)
        self.problems.append(f"plugin {name!r} disabled: {reason}")
        for info in self.infos:
            if info.name == name:
                info.status, info.error = "broken", reason

    def _hooks_of(self, module) -> list[str]:
        return sorted(n for n in hookspecs.HOOK_NAMES if hasattr(module, n))

    # ---- collecting
    def _collect(self, hook: str, attr: str) -> dict[str, tuple[Any, str]]:
        if hook in self._cache:
            return self._cache[hook]
        out: dict[str, tuple[Any, str]] = {}
        caller = getattr(self.pm.hook, hook)
        # call plugin by plugin so one failing plugin is isolated and attributable
        for impl in caller.get_hookimpls():  # registration order
            pname = impl.plugin_name
            try:
                items = impl.function() or []
            except Exception as e:
                self.problems.append(f"plugin {pname!r} failed in {hook}: {type(e).__name__}: {e}")
                continue
            for item in items:
                key = getattr(item, attr, None)
                if key is None:
                    self.problems.append(f"plugin {pname!r} returned an item without a {attr} from {hook}")
                    continue
                if key in out:
                    self.conflicts.append(
                        f"{hook}: {key!r} provided by both {out[key][1]!r} and {pname!r}; keeping {out[key][1]!r}")
                    continue
                out[key] = (item, pname)
        self._cache[hook] = out
        return out

    def formats(self) -> dict[str, tuple[Any, str]]:
        return self._collect("ckptsurgeon_formats", "name")

    def commands(self) -> dict[str, tuple[Any, str]]:
        return self._collect("ckptsurgeon_commands", "name")

    def operations(self) -> dict[str, tuple[Any, str]]:
        return self._collect("ckptsurgeon_operations", "name")

    def model_transforms(self) -> dict[str, tuple[Any, str]]:
        return self._collect("ckptsurgeon_model_transforms", "name")

    def operation(self, name: str):
        try:
            return self.operations()[name][0].func
        except KeyError:
            raise PluginError(f"no plugin provides the operation {name!r}") from None

    def transform(self, name: str):
        try:
            return self.model_transforms()[name][0]
        except KeyError:
            known = ", ".join(sorted(self.model_transforms())) or "none"
            raise PluginError(f"no plugin provides the model transform {name!r} (known: {known})") from None


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


_MANAGER: Manager | None = None
_BUILDING = False


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
    return _BUILDING


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
