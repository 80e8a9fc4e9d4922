"""verify's running of a model: the inputs it is given, the model on its device and dtype, the
forward pass, and the hooks that record every submodule's output for localising a difference."""

from __future__ import annotations

from ckptsurgeon.errors import ModelError
from ckptsurgeon.inputs import output_leaves


class Recorder:
    """Forward hooks on every submodule: first tensor output per (module, call)."""

    def __init__(self, model):
        self.outputs: dict = {}
        self.order: list = []
        self.calls: dict = {}
        self.hooks = []
        self.unsupported = False
        for name, mod in model.named_modules():
            if name:
                try:
                    self.hooks.append(mod.register_forward_hook(self._hook(name, type(mod).__name__)))
                except RuntimeError:  # a TorchScript module takes no Python hooks: outputs compared only
                    self.unsupported = True
                    self.remove()
                    self.hooks = []
                    break

    def _hook(self, name, kind):
        def fn(_m, _i, out):
            leaves = output_leaves(out)
            if not leaves:
                return
            calls = self.calls.get(name, 0)
            self.calls[name] = calls + 1
            key = (name, calls)
            self.order.append(key)
            self.outputs[key] = (kind, leaves[0][1].detach())
        return fn

    def remove(self):
        for h in self.hooks:
            h.remove()


def program_inputs(model):
    """A torch.export program's own example inputs, as one argument tuple or keyword dict (None:
    the model is no program's, it kept none, or it takes both kinds)."""
    from ckptsurgeon.modelspec import EXAMPLE_INPUTS

    example = getattr(model, EXAMPLE_INPUTS, None)
    if example is None or (example[0] and example[1]):
        return None
    return example[1] if example[1] else tuple(example[0])


def make_inputs(model, inputs, input_shape, batch, seed, device, dtype):
    import torch

    from ckptsurgeon.inputs import infer_sample_shape, load_inputs, random_inputs, with_required_arguments

    example = program_inputs(model) if inputs is None and input_shape is None else None
    if inputs is not None:
        x = load_inputs(inputs) if isinstance(inputs, str) else inputs
    elif example is not None:
        x = example
    elif hasattr(model, "config") and getattr(model.config, "vocab_size", None):
        g = torch.Generator().manual_seed(seed)
        shape = tuple(input_shape) if input_shape else (batch, 16)
        x = {"input_ids": torch.randint(0, model.config.vocab_size, shape, generator=g)}
    else:
        shape = tuple(input_shape) if input_shape else (batch,) + tuple(infer_sample_shape(model))
        x = with_required_arguments(model, random_inputs(shape, seed=seed), seed=seed)

    def move(v):
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            return v.to(dtype) if v.is_floating_point() and dtype is not None else v
        if isinstance(v, dict):
            return {k: move(t) for k, t in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(move(t) for t in v)
        return v

    return move(x)


def moved(model, device, dtype):
    """The model on ``device`` in ``dtype``, in eval mode; the dtype is passed only when some
    floating-point tensor has another (diffusers warns on any ``.to(dtype)``, "modules that should
    be kept in float32: []", for a model already in it)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in tensors):
        model = model.to(device=device, dtype=dtype)
    else:
        model = model.to(device=device)
    try:
        return model.eval()
    except NotImplementedError:  # torch.export's module(): captured in the mode it was exported in
        return model


def describe(x) -> str:
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join(describe(v) for v in x) + ")"
    shape = getattr(x, "shape", None)
    return f"{str(getattr(x, 'dtype', '')).replace('torch.', '')}{list(shape)}" if shape is not None else type(x).__name__


def run(model, x, which: str = "A"):
    import torch

    try:
        with torch.no_grad():
            if isinstance(x, dict):
                return model(**x)
            if isinstance(x, (list, tuple)):
                return model(*x)
            return model(x)
    except Exception as e:  # noqa: BLE001 - the inputs do not fit the model: a user error, said in one line
        raise ModelError(f"model {which}'s forward failed on the inputs {describe(x)}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:240]}",
                         hint="check --input-shape (batch included) or --inputs") from None
