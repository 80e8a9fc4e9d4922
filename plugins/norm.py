"""bn-to-gn: swap BatchNorm for GroupNorm in a checkpoint (plain or statistics-calibrated)
and in a model (``swap_bn_for_gn``), plus the model transform ``verify`` uses to rebuild it."""

from __future__ import annotations

from collections import OrderedDict

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.errors import CkptSurgeonError, ModelError, SelectionError
from ckptsurgeon.keys import align_to_model, detect_prefix, parse_patterns, select
from ckptsurgeon.norms import detect_norms
from ckptsurgeon.layers import group_norm_for, norm_output_module
from ckptsurgeon.refs import is_tensor_like
from ckptsurgeon.types import ModelTransform, Operation

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def choose_groups(channels: int, groups: int, policy: str, layer: str = "") -> int:
    """GroupNorm needs groups | channels. strict: error; nearest: largest divisor <= groups."""
    if groups <= 0:
        raise SelectionError("--groups must be positive")
    if channels % groups == 0:
        return groups
    if policy == "strict":
        raise SelectionError(f"layer {layer or '?'} has {channels} channels, not divisible by {groups} groups",
                             hint="use --groups-policy nearest, or another --groups")
    if policy != "nearest":
        raise SelectionError(f"unknown groups policy {policy!r} (strict or nearest)")
    for g in range(min(groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def swap_bn_for_gn(model, groups: int = 32, policy: str = "strict", layers=None, plan: dict | None = None) -> list[dict]:
    """Replace BatchNorm modules of ``model`` by GroupNorm, in place; returns what was replaced.

    γ/β are copied (the plain swap), eps and affine carried. ``plan`` ({module: groups}) fixes
    the groups per layer (how ``verify`` rebuilds a converted checkpoint's model); otherwise
    ``groups``/``policy`` decide. Modules are collected first and replaced afterwards, so no
    module dict is mutated while being iterated.

    Example::

        replaced = swap_bn_for_gn(model, groups=32, policy="nearest")
    """
    import torch
    from torch import nn

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if layers:
        pats = parse_patterns(layers)
        names, _ = select([n for n, _ in targets], pats)
        targets = [(n, m) for n, m in targets if n in set(names)]
    if plan is not None:
        targets = [(n, m) for n, m in targets if n in plan]
        missing = set(plan) - {n for n, _ in targets}
        if missing:
            raise ModelError(f"bn-to-gn: the model has no BatchNorm named {', '.join(sorted(missing))}")
    replaced = []
    for name, bn in targets:
        c = bn.num_features
        g = plan[name] if plan is not None else choose_groups(c, groups, policy, name)
        gn = group_norm_for(bn, g)
        if bn.affine:
            with torch.no_grad():
                gn.weight.copy_(bn.weight)
                gn.bias.copy_(bn.bias)
        gn.to(device=bn.weight.device if bn.affine else None)
        _set_submodule(model, name, gn)
        replaced.append({"layer": name, "channels": c, "groups": g, "eps": bn.eps, "affine": bn.affine})
    return replaced


def _set_submodule(model, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _apply_transform(model, params: dict):
    swap_bn_for_gn(model, plan=dict(params["layers"]))
    return model


def bn_to_gn(ck: Checkpoint, *, groups: int = 32, policy: str = "strict", model=None, layers=None,
             calibrate: int = 0, inputs=None, input_shape=None, holdout: int = 16, seed: int = 0) -> tuple[Checkpoint, dict]:
    """Convert the checkpoint's BatchNorm layers to GroupNorm.

    BN layers come from ``model`` (exactly its BatchNorm modules) or, without one, from the key
    sets; layers whose keys cannot tell BN from a tracked InstanceNorm are an error unless
    ``layers`` names what to convert. Plain swap: γ/β kept, running statistics dropped.
    ``calibrate=N`` (needs ``model``) fits each GN layer's γ'/β' so that its output's per-channel
    mean and std over N inputs match the BN layer's, layer by layer in forward order, and reports
    the held-out relative output error of both swaps.

    Example::

        new, rep = bn_to_gn(ck, groups=32, policy="nearest")
    """
    if groups <= 0:
        raise SelectionError("--groups must be positive")
    if calibrate < 0:
        raise SelectionError(f"--calibrate {calibrate}: the number of inputs must be 0 (no calibration) or more")
    keys = [k for k, v in ck.state.items() if is_tensor_like(v)]
    strip = detect_prefix(keys)
    notes, skipped = [], []
    if model is not None:
        from torch import nn

        model_keys = list(model.state_dict())
        how, fn = align_to_model(keys, model_keys)
        inv = {fn(k): k for k in keys}
        bn_modules = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if layers:
            chosen, counts = select(bn_modules, parse_patterns(layers))
            none = [p for p, n in counts.items() if n == 0]
            if none:
                raise SelectionError(f"--layers matched no BatchNorm of the model: {', '.join(none)}")
            bn_modules = chosen
        modules = {}
        for name in bn_modules:
            probe = f"{name}.running_mean"
            if probe not in inv:
                raise ModelError(f"model BatchNorm {name} has no running_mean in the checkpoint ({how})")
            ck_mod = inv[probe][: -len(".running_mean")]
            modules[ck_mod] = (name, model.get_submodule(name).num_features)
        others = [n for n, m in model.named_modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
        if others:
            notes.append(f"InstanceNorm layers left as they are: {', '.join(others)}")
    else:
        shapes = OrderedDict((k, tuple(ck.state[k].shape)) for k in keys)
        norms = {n["module"]: n for n in detect_norms(shapes) if n["kind"] in ("BatchNorm", "InstanceNorm",
                                                                                "BatchNorm-or-InstanceNorm")}
        if layers:
            chosen, counts = select(list(norms), parse_patterns(layers), strip)
            none = [p for p, n in counts.items() if n == 0]
            if none:
                raise SelectionError(f"--layers matched no layer with BatchNorm statistics: {', '.join(none)}")
            picked = chosen
        else:
            unclear = [m for m, n in norms.items() if n["kind"] == "BatchNorm-or-InstanceNorm"]
            if unclear:
                raise SelectionError(
                    f"cannot tell BatchNorm from InstanceNorm(track_running_stats=True) from the keys of: "
                    f"{', '.join(unclear[:8])}", hint="pass --model to use the real architecture, or --layers to choose")
            picked = [m for m, n in norms.items() if n["kind"] == "BatchNorm"]
            skipped = [m for m, n in norms.items() if n["kind"] == "InstanceNorm"]
            if skipped:
                notes.append(f"left as InstanceNorm (by name): {', '.join(skipped)}")
        modules = {}
        for m in picked:
            name = m[len(strip):] if strip and m.startswith(strip) else m
            modules[m] = (name, norms[m]["channels"])
    if not modules:
        raise SelectionError("no BatchNorm layer found to convert")

    plan, per_layer = {}, []
    for ck_mod, (name, channels) in modules.items():
        g = choose_groups(channels, groups, policy, name)
        plan[name] = g
        per_layer.append({"layer": name, "channels": channels, "groups": g, "adjusted": g != groups})
    drop = {f"{m}.{b}" for m in modules for b in BN_BUFFERS}
    state = OrderedDict((k, v) for k, v in ck.state.items() if k not in drop)
    meta = None
    if ck.metadata is not None:
        meta = OrderedDict((m, v) for m, v in ck.metadata.items() if m not in modules)
    transform = {"name": "bn-to-gn", "params": {"layers": plan}}
    report = {"operation": "bn-to-gn", "groups": groups, "policy": policy, "layers": per_layer,
              "dropped_buffers": len(drop & set(ck.state)), "notes": notes, "calibrated": False}
    new = ck.replace(state=state, metadata=meta, transforms=tuple(ck.transforms) + (transform,))
    try:
        if calibrate:
            if model is None:
                raise SelectionError("--calibrate needs --model (and --input-shape or --inputs)")
            new = _calibrate(ck, new, model, plan, modules, calibrate, inputs, input_shape, holdout, seed, report)
        elif model is not None and (inputs is not None or input_shape is not None):
            report["error_plain"] = _measure(ck, new, model, plan, inputs, input_shape, holdout, seed)
    except CkptSurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 - the inputs do not fit the model: a user error, in one line
        what = f"inputs of shape {list(input_shape)} per sample" if input_shape else \
            ("the --inputs tensors" if inputs is not None else "inputs of the shape inferred from the first layer")
        raise ModelError(f"the model's forward failed on {what}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}",
                         hint="pass --input-shape (per sample, e.g. 3,224,224) or --inputs") from None
    return new, report


def _models(ck, model, plan):
    import copy

    from ckptsurgeon.modelload import load_into_model

    ref = copy.deepcopy(model).eval()
    load_into_model(ref, ck)
    gn = copy.deepcopy(ref)
    swap_bn_for_gn(gn, plan=plan)
    return ref.eval(), gn.eval()


def _heldout(model, inputs, input_shape, holdout, seed):
    """Held-out inputs: seeded random, shaped like the calibration inputs."""
    import torch

    from ckptsurgeon.inputs import infer_sample_shape, load_inputs, random_inputs

    shape = input_shape
    if shape is None and inputs is not None:
        x = load_inputs(inputs) if isinstance(inputs, str) else inputs
        if isinstance(x, torch.Tensor):
            shape = tuple(x.shape[1:])
    shape = shape or infer_sample_shape(model)
    return random_inputs(shape, holdout, seed=seed + 1000)


def _rel_error(ref, other, x) -> float:
    import torch

    from ckptsurgeon.inputs import relative_error

    with torch.no_grad():
        return relative_error(ref(x), other(x))[1]


def _measure(ck, new, model, plan, inputs, input_shape, holdout, seed) -> float:
    ref, gn = _models(ck, model, plan)
    x = _heldout(model, inputs, input_shape, holdout, seed)
    return _rel_error(ref, gn, x)


def _calibrate(ck, new, model, plan, modules, n, inputs, input_shape, holdout, seed, report) -> Checkpoint:
    import torch

    from ckptsurgeon.inputs import infer_sample_shape, load_inputs, random_inputs

    ref, gn = _models(ck, model, plan)
    if inputs is not None:
        x = load_inputs(inputs) if isinstance(inputs, str) else inputs
        if not isinstance(x, torch.Tensor):
            raise SelectionError("--inputs must hold one tensor for calibration")
        x = x[:n]
    else:
        x = random_inputs(input_shape or infer_sample_shape(model), n, seed=seed)
    held = _heldout(model, inputs, input_shape, holdout, seed)
    err_plain = _rel_error(ref, gn, held)
    order = _forward_order(ref, list(plan), x[:1])
    for name in order:
        bn_mod, gn_mod = ref.get_submodule(name), gn.get_submodule(name)
        ys, xs = [], []
        # the normalised output before a norm-act layer's activation: its drop's input
        inner = norm_output_module(bn_mod)
        h1 = (inner.register_forward_hook(lambda m, i, o: ys.append(i[0].detach())) if inner is not None
              else bn_mod.register_forward_hook(lambda m, i, o: ys.append(o.detach())))
        h2 = gn_mod.register_forward_hook(
            lambda m, i, o: xs.append(torch.nn.functional.group_norm(i[0].detach(), m.num_groups, eps=m.eps)))
        with torch.no_grad():
            for chunk in x.split(32):
                ref(chunk)
                gn(chunk)
        h1.remove()
        h2.remove()
        y = torch.cat(ys).transpose(0, 1).reshape(bn_mod.num_features, -1).double()
        xh = torch.cat(xs).transpose(0, 1).reshape(bn_mod.num_features, -1).double()
        my, sy = y.mean(1), y.std(1, unbiased=False)
        mx, sx = xh.mean(1), xh.std(1, unbiased=False)
        cov = ((y - my[:, None]) * (xh - mx[:, None])).mean(1)
        gamma = torch.where(sx > 1e-12, sy / sx.clamp_min(1e-12), torch.zeros_like(sy)) * torch.sign(cov + (cov == 0))
        beta = my - gamma * mx
        if not gn_mod.affine:
            raise SelectionError(f"cannot calibrate {name}: BatchNorm without affine parameters")
        with torch.no_grad():
            gn_mod.weight.copy_(gamma.to(gn_mod.weight.dtype))
            gn_mod.bias.copy_(beta.to(gn_mod.bias.dtype))
    err_cal = _rel_error(ref, gn, held)
    report.update({"calibrated": True, "calibration_inputs": int(x.shape[0]), "holdout_inputs": int(held.shape[0]),
                   "error_plain": err_plain, "error_calibrated": err_cal, "calibration_kept": err_cal <= err_plain})
    if err_cal > err_plain:  # chosen on the held-out inputs: never hand back the worse of the two
        report["notes"].append(f"calibration on {int(x.shape[0])} inputs raised the held-out error ({err_plain:.4g} "
                               f"-> {err_cal:.4g}): the plain swap's γ/β are kept; calibrate on more inputs, or "
                               "on real ones (--inputs)")
        return new
    state = OrderedDict(new.state)
    for ck_mod, (name, _c) in modules.items():
        mod = gn.get_submodule(name)
        for leaf in ("weight", "bias"):
            k = f"{ck_mod}.{leaf}"
            if k in state:
                state[k] = getattr(mod, leaf).detach().clone()
    return new.replace(state=state)


def _forward_order(model, names: list[str], x) -> list[str]:
    import torch

    seen, hooks = [], []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.append(n)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    order = list(dict.fromkeys(seen))
    return order + [n for n in names if n not in order]


def _human(r: dict) -> None:
    for layer in r["layers"]:
        adj = " (adjusted)" if layer["adjusted"] else ""
        click.echo(f"{layer['layer']}: BatchNorm({layer['channels']}) -> GroupNorm({layer['groups']}, {layer['channels']}){adj}")
    if "error_plain" in r:
        click.echo(f"relative output error vs the BN model, plain swap: {r['error_plain']:.4g}")
    if r.get("calibrated"):
        click.echo(f"relative output error after calibration on {r['calibration_inputs']} inputs: "
                   f"{r['error_calibrated']:.4g}" + ("" if r.get("calibration_kept", True) else " (not kept)"))
    cliutil.echo_notes(r["notes"])
    cliutil.echo_save(r["save"])


@click.command("bn-to-gn")
@click.argument("path")
@click.option("--groups", default=32, show_default=True, help="GroupNorm groups.")
@click.option("--groups-policy", type=click.Choice(["strict", "nearest"]), default="strict", show_default=True,
              help="strict: error when groups do not divide channels; nearest: largest divisor <= groups.")
@click.option("--layers", multiple=True, help="Only these layers (module paths/globs/re:).")
@click.option("--calibrate", default=0, metavar="N", help="Fit GN affine to BN output statistics on N inputs.")
@click.option("--input-shape", default=None, help="Per-sample input shape for calibration, e.g. 3,224,224.")
@click.option("--inputs", default=None, help="Tensor file with calibration inputs.")
@cliutil.model_options
@cliutil.load_options
@cliutil.write_options
@cliutil.json_option
def bn_to_gn_cmd(path, groups, groups_policy, layers, calibrate, input_shape, inputs, model_spec, model_args, key,
                 trust_pickle, as_json, **write):
    """Swap BatchNorm for GroupNorm (plain, or calibrated with --calibrate N).

    \b
    Examples:
      ckpt-surgeon bn-to-gn resnet.pt -o resnet_gn.pt --groups 32
      ckpt-surgeon bn-to-gn resnet.pt -o resnet_gn.pt --model samples/models.py:seednet --groups 32 --groups-policy nearest
      ckpt-surgeon bn-to-gn resnet.pt -o gn.pt --model pkg:factory --calibrate 64 --input-shape 3,224,224
    """
    from ckptsurgeon.inputs import parse_shape

    from ckptsurgeon.modelspec import build_from_config, build_model

    ck = cliutil.load(path, key, trust_pickle)
    model = None
    if model_spec:
        model = build_model(model_spec, cliutil.parse_model_args(model_args))
    elif calibrate > 0:  # calibration runs the model: a model folder's config.json describes it
        model = build_from_config(ck, "bn-to-gn --calibrate")
    new, report = bn_to_gn(ck, groups=groups, policy=groups_policy, model=model, layers=layers, calibrate=calibrate,
                           inputs=inputs, input_shape=parse_shape(input_shape))
    report["save"] = cliutil.save(new, **write)
    cliutil.emit(report, as_json, _human)


@hookimpl
def ckptsurgeon_commands():
    return [bn_to_gn_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("bn_to_gn", bn_to_gn, "swap BatchNorm for GroupNorm in a checkpoint"),
            Operation("swap_bn_for_gn", swap_bn_for_gn, "swap BatchNorm for GroupNorm in an nn.Module")]


@hookimpl
def ckptsurgeon_model_transforms():
    return [ModelTransform("bn-to-gn", _apply_transform, "replace BatchNorm layers by GroupNorm (per-layer groups)")]
