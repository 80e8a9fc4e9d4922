"""ckpt-surgeon: PyTorch checkpoint surgery.

Importing this package does not import torch. Surgeries provided by plugins are reachable as
attributes (``ckptsurgeon.strip_prefix``, ``ckptsurgeon.diff`` ...), resolved through the plugin
manager on first use.

Example::

    import ckptsurgeon as cs
    ck = cs.load("model_dp.pt")
    new, report = cs.strip_prefix(ck)
    cs.save(new, "model.safetensors")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint import Checkpoint
from .errors import CkptSurgeonError
from .hookspecs import hookimpl
from .loading import load
from .saving import save

__all__ = ["Checkpoint", "CkptSurgeonError", "hookimpl", "load", "save", "__version__"]


def _is_submodule(name: str) -> bool:
    import os

    return any(os.path.isfile(os.path.join(d, name + ".py")) or os.path.isfile(os.path.join(d, name, "__init__.py"))
               for d in __path__)


def __getattr__(name: str):
    # ``from ckptsurgeon import cliutil`` asks for the attribute before importing the submodule:
    # answering that through the plugin manager built a manager while one was being built (each
    # plugin's import asked again: 10 nested managers, ~0.1 s, on the first ``ckptsurgeon.load``).
    from . import manager

    if name.startswith("_") or manager.building() or _is_submodule(name):
        raise AttributeError(f"module 'ckptsurgeon' has no attribute {name!r}")
    ops = manager.get_manager().operations()
    if name in ops:
        return ops[name][0].func
    raise AttributeError(f"module 'ckptsurgeon' has no attribute {name!r}")


def __dir__():
    from .manager import get_manager

    return sorted(set(globals()) | set(get_manager().operations()))
