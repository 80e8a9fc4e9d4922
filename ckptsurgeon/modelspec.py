"""Build a model from ``package.module:callable`` or ``path/to/file.py:callable``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from .errors import ModelError


def resolve(spec: str):
    """The callable named by ``spec`` (imported, not called)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelError(f"model {spec!r} is not MODULE:CALLABLE", hint="e.g. mypkg.models:resnet18 or models.py:build")
    try:
        if target.endswith(".py") or os.sep in target:
            path = os.path.abspath(target)
            if not os.path.isfile(path):
                raise ModelError(f"model file {target} does not exist")
            name = "ckptsurgeon_user_" + os.path.splitext(os.path.basename(path))[0]
            module = sys.modules.get(name)
            if module is None or getattr(module, "__file__", None) != path:
                mspec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mspec)
                sys.modules[name] = module
                mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"cannot import {target}: {type(e).__name__}: {e}") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelError(f"{target} has no attribute {attr!r}")
    if not callable(obj):
        raise ModelError(f"{spec} is not callable")
    return obj


def build_model(spec: str, kwargs: dict | None = None):
    """Call the factory and check it returned an ``nn.Module``."""
    import torch

    factory = resolve(spec)
    try:
        model = factory(**(kwargs or {}))
    except Exception as e:
        raise ModelError(f"model factory {spec} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model factory {spec} returned {type(model).__name__}, not an nn.Module")
    return model
