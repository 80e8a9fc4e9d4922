"""ckpt-surgeon: PyTorch checkpoint surgery.

Importing this package does not import torch. Surgeries provided by plugins are reachable as
attributes (``ckptsurgeon.strip_prefix``, ``ckptsurgeon.diff`` ...), resolved through the plugin
manager on first use.

Example::

    import ckptsurgeon as cs
    ck = cs.load("model_dp.pt")
    new, report = cs.strip_prefix(ck)
    cs.save(new, "model.safetensors")
    cs.inspect("model.safetensors")["tensors"]
"""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint import Checkpoint
from .errors import CkptSurgeonError
from .hookspecs import hookimpl
from .loading import load
from .saving import save

__all__ = ["Checkpoint", "CkptSurgeonError", "hookimpl", "load", "save", "__version__"]


def __getattr__(name: str):
    # A submodule (``ckptsurgeon.summary``, ``ckptsurgeon.plugins``) is imported on first use, so
    # ``cs.summary.inspect(...)`` works after ``import ckptsurgeon as cs``; that is also what
    # ``from ckptsurgeon import cliutil`` asks before importing it. Answering such names through the
    # plugin manager built a manager while one was being built (every plugin's import asked again:
    # 10 nested managers, ~0.1 s, on the first ``ckptsurgeon.load``).
    import importlib
    import importlib.util

    if name.startswith("_"):
        raise AttributeError(name)
    if name == "inspect":  # the core's own reader, beside the plugins' operations: cs.inspect(path)
        from .summary import inspect

        return inspect
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    from . import manager

    if not manager.building():
        ops = manager.get_manager().operations()
        if name in ops:
            return ops[name][0].func
    raise AttributeError(f"module 'ckptsurgeon' has no attribute {name!r}")


def __dir__():
    from .manager import get_manager

    return sorted(set(globals()) | set(get_manager().operations()) | {"inspect"})
