"""Running a model: its inputs (seeded random tensors of a given shape, or a tensor file) and the
tensors of what it returns."""

from __future__ import annotations

from .errors import SelectionError


def parse_shape(text: str | None):
    if text is None:
        return None
    try:
        shape = tuple(int(x) for x in str(text).replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise SelectionError(f"cannot read the input shape {text!r}", hint="e.g. 3,224,224 or 8,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise SelectionError(f"invalid input shape {text!r}")
    return shape


def infer_sample_shape(model):
    """A per-sample input shape: the one the model declares (timm's ``pretrained_cfg["input_size"]``,
    a transformers vision config's ``num_channels`` x ``image_size``), else a plausible one from the
    first conv / linear layer (32 per spatial side: a model fixed to another size needs
    ``--input-shape``)."""
    from torch import nn

    declared = _declared_sample_shape(model)
    if declared:
        return declared
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):  # a conv or transposed conv, subclasses (Conv2dSame) too
            return (m.in_channels,) + (32,) * len(m.kernel_size)
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        shape = _scripted_sample_shape(m)
        if shape:
            return shape
    raise SelectionError("cannot infer the model's input shape", hint="pass --input-shape (e.g. 3,224,224)")


def _scripted_sample_shape(m) -> tuple | None:
    """The same from a TorchScript submodule, which is no nn.Conv/nn.Linear instance: its
    ``original_name`` says what it was, its weight's shape the channels (groups where kept)."""
    import torch

    kind = getattr(m, "original_name", None) if isinstance(m, torch.jit.ScriptModule) else None
    weight = getattr(m, "weight", None) if isinstance(kind, str) else None
    if weight is None or not hasattr(weight, "shape"):
        return None
    if kind.startswith("ConvTranspose") and weight.dim() >= 3:
        return (int(weight.shape[0]),) + (32,) * (weight.dim() - 2)
    if kind.startswith("Conv") and weight.dim() >= 3:
        groups = getattr(m, "groups", 1)
        return (int(weight.shape[1]) * (groups if isinstance(groups, int) and groups > 0 else 1),) + \
            (32,) * (weight.dim() - 2)
    if kind == "Linear" and weight.dim() == 2:
        return (int(weight.shape[1]),)
    return None


def _declared_sample_shape(model) -> tuple | None:
    cfg = getattr(model, "pretrained_cfg", None)  # timm: set on every model create_model builds
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (list, tuple)) and len(size) >= 2 and all(isinstance(v, int) and v > 0 for v in size):
        return tuple(size)
    config = getattr(model, "config", None)
    image, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if image is None and channels is None:  # diffusers: in_channels x sample_size (latent or pixel)
        image, channels = _config_get(config, "sample_size"), _config_get(config, "in_channels")
    if isinstance(image, int) and isinstance(channels, int) and image > 0 and channels > 0:
        return (channels, image, image)
    if isinstance(image, (list, tuple)) and len(image) == 2 and isinstance(channels, int) and channels > 0 \
            and all(isinstance(v, int) and v > 0 for v in image):
        return (channels,) + tuple(image)
    return None


def _config_get(config, name):
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return value if isinstance(value, (int, list, tuple)) and not isinstance(value, bool) else None


_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


def with_required_arguments(model, x, seed: int = 0):
    """``x`` as the model's first forward argument plus seeded values for the further arguments
    its forward requires that a diffusion model takes -- ``timestep`` (one per sample) and
    ``encoder_hidden_states`` (8 tokens of the config's ``cross_attention_dim``) -- as keyword
    arguments; ``x`` itself when the forward requires nothing more. Another required argument
    cannot be made up: a one-line error asks for ``--inputs``."""
    import inspect

    import torch

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return x
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if not params or params[0].kind not in kinds:
        return x
    required = [p for p in params[1:] if p.default is inspect.Parameter.empty and p.kind in kinds]
    if not required:
        return x
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    out = {params[0].name: x}
    for p in required:
        if p.name in _TIMESTEP_NAMES:
            out[p.name] = torch.randint(1, 1000, (n,), generator=g)
            continue
        dim = _config_get(getattr(model, "config", None), "cross_attention_dim")
        dim = dim[0] if isinstance(dim, (list, tuple)) and dim else dim
        if p.name == "encoder_hidden_states" and isinstance(dim, int) and dim > 0:
            out[p.name] = torch.randn((n, 8, dim), generator=g)
            continue
        raise SelectionError(f"the model's forward also requires {p.name!r}, which cannot be made up",
                             hint="pass --inputs (a file holding a dict of the forward's arguments)")
    return out


def random_inputs(shape, n: int | None = None, seed: int = 0, dtype=None):
    """Seeded normal inputs. ``shape`` is per-sample when ``n`` is given, else the full batch shape."""
    import torch

    g = torch.Generator().manual_seed(seed)
    full = (n,) + tuple(shape) if n is not None else tuple(shape)
    x = torch.randn(full, generator=g)
    return x.to(dtype) if dtype is not None else x


def load_inputs(path: str):
    """A tensor (or tuple/list/dict of tensors) saved with torch.save / safetensors, loaded safely."""
    from .loading import load

    import os

    if path.endswith(".safetensors"):
        ck = load(path)
        tensors = [v.to_torch() for v in ck.state.values()]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)
    import torch

    if not os.path.isfile(path):
        from .errors import InputNotFoundError

        raise InputNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SelectionError(f"cannot load inputs from {path}: {str(e).splitlines()[0][:200]}") from None


def output_leaves(out, path: str = "output") -> list:
    """``(path, tensor)`` for every tensor in a model's output: a tensor, tuples, lists, dicts,
    a transformers ModelOutput.

    Example::

        output_leaves(model(x))  # [("output.logits", tensor(...))]
    """
    import torch

    if isinstance(out, torch.Tensor):
        return [(path, out)]
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):
        out = {k: out[k] for k in out.keys()}
    if isinstance(out, dict):
        return [leaf for k, v in out.items() for leaf in output_leaves(v, f"{path}.{k}")]
    if isinstance(out, (list, tuple)):
        return [leaf for i, v in enumerate(out) for leaf in output_leaves(v, f"{path}[{i}]")]
    return []


def relative_error(ref_out, out) -> tuple[float, float]:
    """(max |a-b|, ||a-b|| / ||a||) over all the floating tensors of two outputs of one structure."""
    import torch

    la, lb = output_leaves(ref_out), output_leaves(out)
    pairs = [(a, b) for (_, a), (_, b) in zip(la, lb) if a.is_floating_point() and a.shape == b.shape]
    if len(la) != len(lb) or not pairs:
        raise SelectionError("the two models' outputs cannot be compared (different structures, or no "
                             "floating-point tensors)")
    a = torch.cat([x.detach().double().flatten() for x, _ in pairs])
    b = torch.cat([y.detach().double().flatten() for _, y in pairs])
    return float((a - b).abs().max()), float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a).clamp_min(1e-12))
