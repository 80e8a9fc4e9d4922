"""Plain dataclasses passed to and from hooks (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class FormatSpec:
    """A checkpoint format a plugin can read and/or write.

    ``sniff(path, head)`` gets the path and its first 64 bytes (``b""`` for a directory) and says
    whether this format claims it; ``load(path, **options)`` returns a Checkpoint;
    ``save(checkpoint, path, **options)`` writes it and returns a report dict. ``extensions``
    pick the writer from the output name. Higher ``priority`` wins when several formats claim a file.
    """

    name: str
    extensions: tuple = ()
    sniff: Callable[[str, bytes], bool] | None = None
    load: Callable[..., Any] | None = None
    save: Callable[..., dict] | None = None
    priority: int = 0
    description: str = ""


@dataclass(frozen=True)
class ModelTransform:
    """Rebuilds a model after an architecture-changing surgery.

    Surgeries record ``{"name": ..., "params": {...}}`` in the checkpoint they write; ``verify``
    looks the name up among all plugins' transforms and calls ``apply(model, params)``, which
    returns the transformed model (it may modify ``model`` in place).
    """

    name: str
    apply: Callable[[Any, dict], Any]
    description: str = ""
    #: modules whose own output changes by design (e.g. a conv that absorbed a BN); verify
    #: compares them but does not count them as divergent
    affected: Callable[[dict], list] | None = None


@dataclass(frozen=True)
class Operation:
    """A surgery exposed in the Python API as ``ckptsurgeon.<name>``."""

    name: str
    func: Callable[..., Any]
    description: str = ""


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str = ""
    version: str = ""
    hooks: list = field(default_factory=list)
    status: str = "loaded"  # loaded | broken | disabled | builtin
    error: str = ""
