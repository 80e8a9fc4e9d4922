"""fold-bn: fold eval-mode BatchNorm into the conv/linear that feeds it (forward-equivalent)."""

from __future__ import annotations

from collections import OrderedDict

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.errors import ModelError, SelectionError
from ckptsurgeon.keys import align_to_model, filter_metadata
from ckptsurgeon.layers import bn_kind, without_norm
from ckptsurgeon.refs import is_tensor_like
from ckptsurgeon.types import ModelTransform, Operation


def _feeders() -> tuple:
    """The layers BN folds into: each computes ``x @ W + b`` or a (transposed) convolution with
    ``W`` and ``b``, so a per-output-channel scale and shift go into ``W`` and ``b``."""
    from torch import nn

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _scaled_weight(layer, w, scale):
    """``w`` with each output channel multiplied by ``scale``. A transposed convolution keeps its
    output channels in dimension 1, per group: (in, out/groups, *kernel)."""
    from torch import nn

    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        g = layer.groups
        grouped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        return (grouped * scale.reshape(g, 1, w.shape[1], *(1,) * (w.dim() - 2))).reshape(w.shape)
    return w * scale.reshape((-1,) + (1,) * (w.dim() - 1))


def _feeder_problem(m) -> str | None:
    """None when BN can be folded into layer ``m`` (a conv/linear that computes a plain
    ``x @ W + b`` / ``conv(x, W, b)``), else why not. A subclass with its own forward may transform
    its weight first (weight standardization renormalises it, so a folded scale would vanish);
    timm's Conv2dSame only pads its input, which folding does not touch."""
    for base in _feeders():
        if isinstance(m, base):
            cls = type(m)
            if cls.forward is base.forward and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None):
                return None
            if cls.__name__ == "Conv2dSame" and cls.__module__.startswith("timm."):
                return None
            return f"{cls.__name__} computes its own forward"
    return "not a conv/linear"


def _fx_graph(model):
    """The model's torch.fx graph with every conv/linear/BN (subclasses included) a leaf, so
    library subclasses (timm's BatchNormAct2d, Conv2dSame) show up as the module calls they are."""
    import torch.fx
    from torch import nn

    leaves = (nn.modules.batchnorm._BatchNorm,) + _feeders()

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    return _Tracer().trace(model)


#: Calls that read a tensor's metadata, not its values: not a use of the values for _traced_pairs.
_METADATA_CALLS = frozenset({"dim", "size", "numel", "stride", "is_contiguous", "is_floating_point", "is_complex",
                             "element_size", "ndimension", "nelement", "get_device", "data_ptr", "storage_offset",
                             "__len__"})
_METADATA_PROPS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse",
                             "is_quantized", "is_meta", "names", "grad_fn", "is_leaf"})


def _traced_pairs(model, x) -> list[tuple[str, str]]:
    """(layer, bn) pairs seen in one real forward pass on ``x``: the BN's input is the very tensor a
    conv/linear returned, and nothing else -- no other module, no torch function outside the BN --
    reads that tensor's values (every torch call is watched through a TorchFunctionMode, so a
    residual ``x + conv(x)``-style second use is seen). Layers or BNs called more than once are left
    out. For models torch.fx cannot trace (data-dependent control flow, HF models)."""
    import torch
    from torch import nn
    from torch.overrides import TorchFunctionMode

    feeders = _feeders()
    produced: dict = {}  # id(output tensor) -> layer name
    calls: dict = {}  # module name -> number of calls
    bn_input: dict = {}  # bn name -> id(its input)
    uses: dict = {}  # id(tensor) -> value uses outside BN forwards
    alive: list = []  # outputs kept alive so that no id is reused during the pass
    inside_bn = [0]

    def count(obj):
        # only the layers' outputs, which are kept alive from their creation: an id of a tensor
        # freed earlier may come back as a layer's output, and must not bring its uses along
        if isinstance(obj, torch.Tensor):
            if id(obj) in produced:
                uses[id(obj)] = uses.get(id(obj), 0) + 1
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                count(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                count(o)

    class _Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            prop = getattr(getattr(func, "__self__", None), "__name__", None) if name == "__get__" else None
            if not inside_bn[0] and name not in _METADATA_CALLS and prop not in _METADATA_PROPS:
                count(args)
                count(kwargs or {})
            return func(*args, **(kwargs or {}))

    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, feeders):
            def after(mod, args, out, name=name):
                calls[name] = calls.get(name, 0) + 1
                if isinstance(out, torch.Tensor):
                    produced[id(out)] = name
                    alive.append(out)
            hooks.append(m.register_forward_hook(after))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            def before(mod, args, name=name):
                calls[name] = calls.get(name, 0) + 1
                bn_input[name] = id(args[0]) if args and isinstance(args[0], torch.Tensor) else None
                inside_bn[0] += 1

            def done(mod, args, out):
                inside_bn[0] -= 1
            hooks += [m.register_forward_pre_hook(before), m.register_forward_hook(done)]
    try:
        with torch.no_grad(), _Watch():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    pairs = []
    for bn, src_id in bn_input.items():
        src = produced.get(src_id)
        if src is not None and calls.get(src) == 1 and calls.get(bn) == 1 and uses.get(src_id, 0) == 0:
            pairs.append((src, bn))
    return pairs


def find_pairs(model, inputs=None) -> tuple[list[tuple[str, str]], list[dict], str]:
    """(conv/linear, bn) pairs where the BN directly and only consumes the layer's output;
    BNs left alone with the reason; how pairs were found: the torch.fx graph; else one traced
    forward pass (``inputs``: a tensor or a per-sample shape, default inferred from the first
    layer); else, when no input runs the model, neighbours in a Sequential."""
    from torch import nn

    feeders = _feeders()
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    pairs, method = [], "torch.fx graph"
    try:
        graph = _fx_graph(model)
        for node in graph.nodes:
            if node.op != "call_module" or node.target not in bns:
                continue
            src = node.args[0] if node.args else None
            if (getattr(src, "op", None) == "call_module" and isinstance(model.get_submodule(src.target), feeders)
                    and len(src.users) == 1):
                pairs.append((src.target, node.target))
    except Exception:
        pairs = None
    if pairs is None:
        try:
            import copy

            import torch

            from ckptsurgeon.inputs import infer_sample_shape, random_inputs

            if isinstance(inputs, torch.Tensor):
                x = inputs
            else:
                x = random_inputs(tuple(inputs) if inputs else infer_sample_shape(model), 2, seed=0)
            pairs = _traced_pairs(copy.deepcopy(model).eval(), x)
            method = "a traced forward pass (torch.fx could not trace the model)"
        except Exception:  # noqa: BLE001 - no input runs it: fall back to Sequential neighbours
            pairs = None
    if pairs is None:
        method = "module order (torch.fx could not trace the model, nor a forward pass run it)"
        pairs = []
        for _parent_name, parent in model.named_modules():
            if not isinstance(parent, nn.Sequential):
                continue
            children = list(parent.named_children())
            for (n1, m1), (n2, m2) in zip(children, children[1:]):
                if isinstance(m1, feeders) and isinstance(m2, nn.modules.batchnorm._BatchNorm):
                    prefix = f"{_parent_name}." if _parent_name else ""
                    pairs.append((prefix + n1, prefix + n2))
    # a layer may feed only one BN; each BN folds once
    seen_bn, seen_src, clean = set(), set(), []
    for src, bn in pairs:
        if bn in seen_bn or src in seen_src:
            continue
        seen_bn.add(bn)
        seen_src.add(src)
        clean.append((src, bn))
    skipped = []
    for bn in sorted(bns - seen_bn):
        m = model.get_submodule(bn)
        reason = "no running statistics" if not m.track_running_stats else "does not directly follow a conv/linear"
        skipped.append({"bn": bn, "reason": reason})
    ok = []
    for src, bn in clean:
        m = model.get_submodule(bn)
        layer = model.get_submodule(src)
        out = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
        kind, problem = bn_kind(m), _feeder_problem(layer)
        if not m.track_running_stats or m.running_mean is None:
            skipped.append({"bn": bn, "reason": "no running statistics"})
        elif out != m.num_features:
            skipped.append({"bn": bn, "reason": f"channel mismatch with {src}"})
        elif problem:
            skipped.append({"bn": bn, "reason": f"follows {src}: {problem}"})
        elif kind not in ("plain", "norm-act"):
            skipped.append({"bn": bn, "reason": kind})
        else:
            ok.append((src, bn))
    return ok, skipped, method




def _apply_transform(model, params: dict):
    """Rebuild the folded architecture: BN -> Identity (a norm-act layer -> its drop and act),
    a bias on every folded layer."""
    import torch
    from torch import nn

    for src, bn in params["pairs"]:
        layer = model.get_submodule(src)
        if layer.bias is None:
            out = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
            layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device))
        parent_name, _, child = bn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, without_norm(model.get_submodule(bn)))
    return model


def fold_bn(ck: Checkpoint, model, *, input_shape=None) -> tuple[Checkpoint, dict]:
    """Fold every foldable BN of ``model`` (W' = W·γ/σ, b' = (b−μ)·γ/σ + β) in the checkpoint.
    Pairs come from the model's torch.fx graph, or, where fx cannot trace it, from one forward
    pass on random inputs (``input_shape`` per sample; default inferred from the first layer).

    Example::

        new, rep = fold_bn(ck, bnnet())      # rep["pairs"] lists (conv, bn) pairs
    """
    import torch

    if model is None:
        raise SelectionError("fold-bn needs --model: pairs come from the model's graph")
    keys = [k for k, v in ck.state.items() if is_tensor_like(v)]
    how, fn = align_to_model(keys, list(model.state_dict()))
    inv = {fn(k): k for k in keys}
    pairs, skipped, method = find_pairs(model, input_shape)
    if not pairs:
        raise SelectionError("no BatchNorm directly follows a conv/linear layer in this model",
                             hint=f"looked with {method}")
    state = OrderedDict(ck.state)
    dropped_modules = set()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def get(name):
        if name not in inv:
            raise ModelError(f"{name} is not in the checkpoint ({how})")
        v = ck.state[inv[name]]
        t = (v.to_torch() if hasattr(v, "to_torch") else v).detach()
        if name in expected and tuple(t.shape) != expected[name]:  # another architecture, or a damaged file
            raise ModelError(f"{inv[name]} has shape {list(t.shape)} in the checkpoint, the model's {name} has "
                             f"{list(expected[name])}", hint="--model must build the checkpoint's architecture "
                             "(ckpt-surgeon check lists every mismatch)")
        return t

    folded = []
    for src, bn in pairs:
        w = get(f"{src}.weight")
        b = get(f"{src}.bias") if f"{src}.bias" in inv else None
        mean, var = get(f"{bn}.running_mean"), get(f"{bn}.running_var")
        eps = model.get_submodule(bn).eps
        gamma = get(f"{bn}.weight") if f"{bn}.weight" in inv else torch.ones_like(mean)
        beta = get(f"{bn}.bias") if f"{bn}.bias" in inv else torch.zeros_like(mean)
        work = torch.float64
        scale = gamma.to(work) / torch.sqrt(var.to(work) + eps)
        w_new = _scaled_weight(model.get_submodule(src), w.to(work), scale).to(w.dtype)
        b0 = b.to(work) if b is not None else torch.zeros_like(mean, dtype=work)
        b_new = ((b0 - mean.to(work)) * scale + beta.to(work)).to(w.dtype)
        wkey = inv[f"{src}.weight"]
        state[wkey] = w_new
        bkey = inv.get(f"{src}.bias") or wkey[: -len("weight")] + "bias"
        if bkey in state:
            state[bkey] = b_new
        else:  # insert right after the weight so the key order stays natural
            items = list(state.items())
            i = [k for k, _ in items].index(wkey)
            items.insert(i + 1, (bkey, b_new))
            state = OrderedDict(items)
        ck_bn = inv[f"{bn}.running_mean"][: -len(".running_mean")]
        dropped_modules.add(ck_bn)
        for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            state.pop(f"{ck_bn}.{leaf}", None)
        folded.append({"layer": src, "bn": bn, "added_bias": b is None})
    meta = filter_metadata(ck.metadata, lambda m: m not in dropped_modules)
    transform = {"name": "fold-bn", "params": {"pairs": [[p["layer"], p["bn"]] for p in folded]}}
    report = {"operation": "fold-bn", "method": method, "alignment": how, "folded": folded, "skipped": skipped}
    return ck.replace(state=state, metadata=meta, transforms=tuple(ck.transforms) + (transform,)), report


def _check(ck, new, model, input_shape) -> dict:
    import copy

    import torch

    from ckptsurgeon.inputs import infer_sample_shape, random_inputs, relative_error
    from ckptsurgeon.modelload import load_into_model

    ref = copy.deepcopy(model).eval()
    load_into_model(ref, ck)
    folded = _apply_transform(copy.deepcopy(model), new.transforms[-1]["params"]).eval()
    load_into_model(folded, new)
    x = random_inputs(input_shape or infer_sample_shape(model), 4, seed=0)
    with torch.no_grad():
        max_abs, rel = relative_error(ref(x), folded(x))
    return {"max_abs_error": max_abs, "relative_error": rel}


def _human(r: dict) -> None:
    click.echo(f"pairs found by {r['method']}:")
    for p in r["folded"]:
        click.echo(f"  folded {p['bn']} into {p['layer']}" + (" (bias added)" if p["added_bias"] else ""))
    for s in r["skipped"]:
        click.echo(f"  left {s['bn']}: {s['reason']}")
    if "check" in r:
        click.echo(f"check on random inputs: max |error| {r['check']['max_abs_error']:.3g}, "
                   f"relative {r['check']['relative_error']:.3g} (run `ckpt-surgeon verify` for the full check)")
    elif r.get("check_skipped"):
        click.echo(f"quick check skipped: {r['check_skipped']}")
    cliutil.echo_save(r["save"])


@click.command("fold-bn")
@click.argument("path")
@click.option("--input-shape", default=None,
              help="Per-sample input shape: for the quick equivalence check, and to trace models torch.fx cannot.")
@cliutil.model_options
@cliutil.load_options
@cliutil.write_options
@cliutil.json_option
def fold_cmd(path, input_shape, model_spec, model_args, key, trust_pickle, as_json, **write):
    """Fold BatchNorm into the preceding conv/linear layers.

    The model comes from --model, or from the config.json of a Hugging Face or timm folder.

    \b
    Examples:
      ckpt-surgeon fold-bn model.pt -o folded.pt --model 'samples/models.py:bnnet'
      ckpt-surgeon fold-bn timm-resnet50/ -o folded.safetensors
    """
    from ckptsurgeon.inputs import parse_shape
    from ckptsurgeon.modelspec import build_from_config, build_model

    ck = cliutil.load(path, key, trust_pickle)
    if model_spec:
        model = build_model(model_spec, cliutil.parse_model_args(model_args))
    else:
        model = build_from_config(ck, "fold-bn")
    new, report = fold_bn(ck, model, input_shape=parse_shape(input_shape))
    try:
        report["check"] = _check(ck, new, model, parse_shape(input_shape))
    except SelectionError as e:
        report["check_skipped"] = e.one_line()
    except Exception as e:  # noqa: BLE001 - the quick check's inputs do not fit the model: said, not fatal
        report["check_skipped"] = (f"the quick check's forward failed: {type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:200]} (pass --input-shape, or run verify)")
    report["save"] = cliutil.save(new, **write)
    cliutil.emit(report, as_json, _human)


@hookimpl
def ckptsurgeon_commands():
    return [fold_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("fold_bn", fold_bn, "fold BatchNorm into conv/linear weights")]


@hookimpl
def ckptsurgeon_model_transforms():
    return [ModelTransform("fold-bn", _apply_transform, "BatchNorm -> Identity, biases on the folded layers",
                           affected=lambda params: [src for src, _bn in params["pairs"]])]
