"""Build a model from ``package.module:callable`` or ``path/to/file.py:callable``, or from the
``config.json`` of a Hugging Face or timm folder."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from .errors import ModelError, SelectionError
from .keys import name_list


class NoModelSource(SelectionError):
    """Nothing beside a checkpoint says what its model is (no --model, no config.json)."""


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


def build_from_config(ck, command: str = "this command"):
    """The model the ``config.json`` beside a checkpoint describes, with random weights: a
    timm Hub folder's (see :func:`_from_timm_config`), a diffusers model folder's (see
    :func:`_from_diffusers_config`), else transformers' (the class its
    ``architectures`` names, if a PreTrainedModel; else AutoModel). ``command`` names the caller
    in the error raised where there is no config.json.

    Example::

        model = build_from_config(load("bert-folder/"), "verify")
    """
    src = ck.source.path if ck.source else ""
    folder = src if os.path.isdir(src) else os.path.dirname(src)
    cfg = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg):
        raise NoModelSource(f"{command} needs --model (or a Hugging Face or timm folder with config.json)")
    for builder in (_from_timm_config, _from_diffusers_config):
        model = builder(cfg)
        if model is not None:
            return model
    try:
        import transformers
    except ImportError:
        raise SelectionError("building from config.json needs transformers", hint="pip install transformers, or pass --model") from None
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            cls = None  # the config names something else of transformers' (a function...): never call it
        if cls is None:
            return transformers.AutoModel.from_config(config)
        return cls(config)
    except ImportError as e:  # a config that needs another library (timm's hub configs: TimmWrapper)
        raise SelectionError(f"building the model from {cfg} needs a library that is not installed: "
                             f"{' '.join(str(e).split())[:200]}", hint="install it, or pass --model") from None
    except Exception as e:  # noqa: BLE001 - a config transformers does not know, or cannot build
        raise SelectionError(f"transformers cannot build a model from {cfg}: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}", hint="pass --model") from None


def _from_diffusers_config(cfg: str):
    """The model a diffusers model folder describes (config.json with ``_class_name`` and
    ``_diffusers_version``, as ModelMixin.save_pretrained writes), built with the class's
    ``from_config`` -- only a ModelMixin subclass of diffusers itself is ever called. None for
    other configs."""
    from .formats.hf import is_diffusers_config, read_config

    conf = read_config(os.path.dirname(cfg))
    if not is_diffusers_config(conf) or "model_type" in conf:
        return None
    name = conf["_class_name"]
    try:
        import diffusers
    except ImportError as e:
        raise SelectionError(f"{cfg} describes a diffusers model ({name}): building it needs diffusers "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:120]})",
                             hint="pip install diffusers, or pass --model") from None
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise SelectionError(f"{cfg} names {name!r}, which is not a diffusers model class", hint="pass --model")
    try:
        return cls.from_config(conf)
    except Exception as e:  # noqa: BLE001 - a config this diffusers cannot build
        raise SelectionError(f"diffusers cannot build {name} from {cfg}: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}", hint="pass --model") from None


def _from_timm_config(cfg: str):
    """The model a timm Hugging Face Hub folder describes (its config.json names an
    ``architecture`` and no transformers ``model_type``), built by timm as its own hub loader
    does -- ``create_model(architecture, num_classes=..., **model_args)``, random weights, no
    download -- so the folder's weights load under their own names. None for other configs."""
    from .formats.hf import read_config

    conf = read_config(os.path.dirname(cfg))
    if conf is None or "model_type" in conf or not isinstance(conf.get("architecture"), str):
        return None
    try:
        import timm
    except ImportError as e:
        raise SelectionError(f"{cfg} describes a timm model ({conf['architecture']}): building it needs timm "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:120]})",
                             hint="pip install timm, or pass --model") from None
    pretrained = conf.get("pretrained_cfg") if isinstance(conf.get("pretrained_cfg"), dict) else conf
    kwargs = dict(conf["model_args"]) if isinstance(conf.get("model_args"), dict) else {}
    num_classes = conf.get("num_classes", pretrained.get("num_classes"))
    if isinstance(num_classes, int):
        kwargs.setdefault("num_classes", num_classes)
    try:
        return timm.create_model(conf["architecture"], pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - an architecture this timm does not have, bad model_args
        raise SelectionError(f"timm cannot build {conf['architecture']!r} from {cfg}: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}", hint="pass --model") from None


EXAMPLE_INPUTS = "_ckpt_surgeon_example_inputs"  # set on a model built from a .pt2: its example inputs, or None


def build_from_archive(ck, trust_pickle=False):
    """The model a checkpoint that is itself a program holds, or None: a TorchScript archive
    (``torch.jit.load``: its TorchScript code is compiled and run, never Python's pickle beyond
    torch's allowlist) or a torch.export archive (``torch.export.load(path).module()``, with the
    program's example inputs kept on the model as ``EXAMPLE_INPUTS``). torch.export.load
    unpickles the archive's pickled constants and inputs with ``weights_only=False``, so a .pt2
    whose pickles name a global outside the allowlist is refused unless ``trust_pickle`` is True.

    Example::

        model = build_from_archive(load("scripted.pt"))   # then load another checkpoint into it
    """
    src = ck.source
    if src is None or not src.program or not os.path.isfile(src.path):
        return None
    import torch

    if src.program == "torchscript":
        try:
            return torch.jit.load(src.path, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - an archive this torch cannot compile
            raise ModelError(f"torch.jit.load cannot build the model in {src.path}: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}", hint="pass --model") from None
    from .errors import UnsafePickleError
    from .safety import unsafe_globals

    unsafe = unsafe_globals(src.path) if trust_pickle is not True else []
    if unsafe:
        raise UnsafePickleError(
            f"building the model from {src.path} would have torch.export.load unpickle globals outside the "
            f"weights-only allowlist: {name_list(unsafe, 20)}", globals_=unsafe,
            hint="pass --model, or --trust-pickle only if you trust where the file came from")
    try:
        program = torch.export.load(src.path)
        model = program.module()
    except Exception as e:  # noqa: BLE001 - a program this torch cannot load
        raise ModelError(f"torch.export.load cannot build the model in {src.path}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}", hint="pass --model") from None
    setattr(model, EXAMPLE_INPUTS, program.example_inputs)  # (also marks the model as a program's)
    return model
