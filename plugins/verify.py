"""verify: rebuild the model for two checkpoints and check forward equivalence, layer by layer."""

from __future__ import annotations

import copy
import time

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.dtypes import PLAIN_FLOATS, plain_float
from ckptsurgeon.errors import EXIT_FINDING, CkptSurgeonError, ModelError, SelectionError
from ckptsurgeon.inputs import output_leaves
from ckptsurgeon.types import Operation

from .verify_numerics import TOLERANCES, compare, gather, no_tf32, output_stats, resolve_device
from .verify_run import Recorder, make_inputs, moved, program_inputs, run

NON_PRESERVING = {"bn-to-gn": "a plain BatchNorm->GroupNorm swap changes the function (calibration only narrows it)"}


def build(model_spec, model_args, ck: Checkpoint, trust_pickle=False):
    """A fresh reference model: factory spec, a callable, a module (deep-copied), the program a
    TorchScript or torch.export archive holds, or HF config."""
    import torch

    if isinstance(model_spec, torch.nn.Module):
        return copy.deepcopy(model_spec)
    if callable(model_spec):
        return model_spec(**(model_args or {}))
    from ckptsurgeon.modelspec import build_from_archive, build_from_config, build_model

    if model_spec:
        return build_model(model_spec, model_args)
    model = build_from_archive(ck, trust_pickle)
    return model if model is not None else build_from_config(ck, "verify")


def _model_source(ca: Checkpoint, cb: Checkpoint, trust_pickle=False):
    """Which checkpoint says what the model is when no --model is given, and the model it built:
    A when a config.json is beside it or it is a program archive, else B (plain weights checked
    against the TorchScript archive they came from, in either order)."""
    from ckptsurgeon.modelspec import NoModelSource

    for ck in (ca, cb):
        try:
            return ck, build(None, None, ck, trust_pickle)
        except NoModelSource:
            pass
    raise NoModelSource("verify needs --model (or, as A or B, a Hugging Face or timm folder with config.json, or a "
                         "TorchScript or torch.export archive)")


def apply_transforms(model, transforms, side: str = ""):
    """The architecture changes a surgery recorded in the checkpoint (fold-bn, bn-to-gn), applied
    to a freshly built model. A record that does not fit the model (another architecture: a
    layer it names is missing or of another kind) is the user's model choice, not a bug: one line."""
    from ckptsurgeon.manager import get_manager

    m = get_manager()
    for t in transforms:
        spec = m.transform(t["name"])
        try:
            model = spec.apply(model, t.get("params", {})) or model
        except CkptSurgeonError as e:
            if not side:
                raise
            raise ModelError(f"{side}: {e.message}", hint=e.hint or f"pass the --model the checkpoint was made from "
                             f"with {t['name']}") from None
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            what = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ModelError(f"{side + ': ' if side else ''}the {t['name']} change recorded in the checkpoint does not fit "
                             f"the model ({type(model).__name__}): {what}",
                             hint=f"pass the --model the checkpoint was made from with {t['name']}") from None
    return model


def verify(a, b, *, model=None, model_args=None, inputs=None, input_shape=None, batch: int = 2, device="auto",
           dtype: str = "float32", atol=None, rtol=None, key_a=None, key_b=None, trust_pickle=False, seed: int = 0,
           localize: bool = True, cross_device: bool = False) -> dict:
    """Build the model for A and for B (B with the transforms its surgery recorded), load each
    strictly, run both on the same seeded inputs in eval mode with TF32 off, and compare the
    outputs and every module's output.

    Example::

        rep = verify("model_dp.pt", "model.pt", model="samples/models.py:seednet")
        rep["equivalent"], rep["first_divergent"]
    """
    dtype = plain_float(dtype)
    if dtype not in PLAIN_FLOATS:  # a model runs in a floating-point dtype only: checked before any work
        raise SelectionError(f"--dtype {dtype!r}: verify runs models in {', '.join(PLAIN_FLOATS)}")
    import torch

    from ckptsurgeon.compare import check_tolerances
    from ckptsurgeon.dtypes import torch_dtype
    from ckptsurgeon.modelload import load_into_model
    from ckptsurgeon.loading import load

    check_tolerances(atol, rtol)
    t0 = time.perf_counter()
    ca = a if isinstance(a, Checkpoint) else load(a, key=key_a, trust_pickle=trust_pickle)
    cb = b if isinstance(b, Checkpoint) else load(b, key=key_b, trust_pickle=trust_pickle)
    dev = resolve_device(device)
    tdtype = torch_dtype(dtype)
    if cross_device:
        if not torch.cuda.is_available():
            raise SelectionError("--cross-device compares CPU and CUDA, but CUDA is not available here")
    if model:
        source, built = cb, build(model, model_args, ca, trust_pickle)
    else:  # A's config or archive, else B's, builds both models
        source, built = _model_source(ca, cb, trust_pickle)
    model_a = apply_transforms(built, ca.transforms, "A")
    how_a = load_into_model(model_a, ca)
    model_b = apply_transforms(build(model, model_args, source, trust_pickle), cb.transforms, "B")
    try:
        how_b = load_into_model(model_b, cb)
    except ModelError as e:
        raise ModelError(f"B: {e.message}", hint="was the surgery that changed the architecture recorded? "
                         "(bn-to-gn/fold-bn outputs carry it)") from None
    dev_b = dev
    if cross_device:
        dev, dev_b = torch.device("cpu"), torch.device("cuda")
    from ckptsurgeon.modelspec import EXAMPLE_INPUTS

    program = hasattr(model_a, EXAMPLE_INPUTS)  # a torch.export program: its dtypes are part of its graph,
    run_dtype = None if program else tdtype     # so it runs as exported
    model_a = moved(model_a, dev, run_dtype)
    model_b = moved(model_b, dev_b, run_dtype)
    x_a = make_inputs(model_a, inputs, input_shape, batch, seed, dev, run_dtype)
    x_b = make_inputs(model_a, inputs, input_shape, batch, seed, dev_b, run_dtype)
    t_build = time.perf_counter() - t0
    with no_tf32():
        rec_a, rec_b = (Recorder(model_a), Recorder(model_b)) if localize else (None, None)
        t1 = time.perf_counter()
        out_a = run(model_a, x_a, "A")
        out_b = run(model_b, x_b, "B")
        if dev.type == "cuda" or dev_b.type == "cuda":
            torch.cuda.synchronize()
        t_run = time.perf_counter() - t1
        if localize:
            rec_a.remove()
            rec_b.remove()
    la, lb = output_leaves(out_a), output_leaves(out_b)
    if len(la) != len(lb):
        raise ModelError(f"the models return different output structures ({len(la)} vs {len(lb)} tensors)")
    pairs = []
    if localize:
        for i, key in enumerate(rec_a.order):
            kind, ta = rec_a.outputs[key]
            if key in rec_b.outputs:
                kb = key
            elif i < len(rec_b.order):
                kb = rec_b.order[i]  # matched by position where a transform renamed/replaced modules
            else:
                continue
            kind_b, tb = rec_b.outputs[kb]
            if ta.shape == tb.shape:
                pairs.append((key, kind, kind_b, ta, tb))
    stats = gather([output_stats(ta, tb) for (_pa, ta), (_pb, tb) in zip(la, lb)] +
                    [output_stats(ta, tb) for *_k, ta, tb in pairs])
    outputs = []
    for ((pa, ta), (_pb, tb)), st in zip(zip(la, lb), stats):
        c = compare(ta, tb, dtype, atol, rtol, st)
        outputs.append({"output": pa, "shape": list(ta.shape), **c})
    equivalent = all(o["ok"] for o in outputs)
    modules, first = [], None
    by_design = set()
    from ckptsurgeon.manager import get_manager

    for t in cb.transforms:
        spec = get_manager().transform(t["name"])
        if spec.affected is not None:
            by_design |= set(spec.affected(t.get("params", {})))
    for (key, kind, kind_b, ta, tb), st in zip(pairs, stats[len(la):]):
        c = compare(ta, tb, dtype, atol, rtol, st)
        entry = {"module": key[0] + (f"#{key[1]}" if key[1] else ""), "type": kind, "type_b": kind_b,
                 "max_abs": c["max_abs"], "rel": c["rel"], "tolerance": c["tolerance"], "ok": c["ok"],
                 "reason": c.get("reason", ""), "changed_by_surgery": key[0] in by_design}
        modules.append(entry)
        if not c["ok"] and first is None and key[0] not in by_design:
            first = entry["module"]
    notes = []
    if not model and isinstance(model_a, torch.jit.ScriptModule):
        notes.append("model built from the TorchScript archive A (torch.jit.load)")
    if program:
        notes.append("model built from the torch.export program in A, run in the dtypes it was exported with"
                     + (f" (--dtype {dtype} not applied)" if dtype != "float32" else ""))
    if localize and (rec_a.unsupported or rec_b.unsupported):
        notes.append("a TorchScript model takes no forward hooks: its outputs are compared, not each module's")
    narrow = None if equivalent else _narrower_weights(ca, cb, dtype)
    if narrow:
        notes.append(f"{narrow[0]}'s floating-point weights are {narrow[1]}, {narrow[2]}'s {narrow[3]}: rounding to "
                     f"{narrow[1]} alone can exceed {dtype}'s tolerance; --dtype {narrow[1]} checks the function "
                     f"within {narrow[1]}'s")
    for t in cb.transforms:
        if t["name"] in NON_PRESERVING and not equivalent:
            notes.append(f"{t['name']}: {NON_PRESERVING[t['name']]}; measured divergence reported, not hidden")
    return {
        "schema": "ckpt-surgeon.verify/1",
        "a": ca.source.path if ca.source else None, "b": cb.source.path if cb.source else None,
        "device": str(dev) if not cross_device else f"{dev} vs {dev_b}",
        "dtype": "as exported" if program else dtype,
        "alignment": {"a": how_a, "b": how_b}, "transforms_b": [t["name"] for t in cb.transforms],
        "inputs": inputs if isinstance(inputs, str) else ("the program's example inputs" if inputs is None and input_shape
                                                          is None and program_inputs(model_a) is not None else
                                                          "seeded random" if inputs is None else "given"),
        "outputs": outputs, "equivalent": equivalent, "first_divergent": first,
        "modules": modules, "notes": notes,
        "seconds": {"build_and_load": round(t_build, 4), "forward_both": round(t_run, 4)},
    }


def _float_dtypes(ck: Checkpoint) -> set:
    from ckptsurgeon.checkpoint import tensor_info

    return {d for d in (tensor_info(v)["dtype"] for _k, v in ck.tensor_items()) if d in PLAIN_FLOATS}


def _narrower_weights(ca: Checkpoint, cb: Checkpoint, dtype: str):
    """(side, its dtype, other side, the other's dtypes) when one checkpoint holds its floating-point
    weights in one dtype that tolerates more than ``dtype`` (A float32, B cast to bfloat16) and
    the other's differ; None otherwise."""
    fa, fb = _float_dtypes(ca), _float_dtypes(cb)
    for side, mine, other, theirs in (("B", fb, "A", fa), ("A", fa, "B", fb)):
        if len(mine) == 1 and mine != theirs and theirs:
            (narrow,) = mine
            if TOLERANCES.get(narrow, (0, 0))[1] > TOLERANCES.get(dtype, (0, 0))[1]:
                return side, narrow, other, "/".join(sorted(theirs))
    return None


def _human(r: dict) -> None:
    click.echo(f"device {r['device']}, dtype {r['dtype']}, inputs {r['inputs']}")
    if r["transforms_b"]:
        click.echo(f"B rebuilt with: {', '.join(r['transforms_b'])}")
    for o in r["outputs"]:
        status = "ok" if o["ok"] else "DIFFERENT"
        if o["max_abs"] is None:
            click.echo(f"{o['output']} {o['shape']}: {status} ({o['reason']})")
        else:
            click.echo(f"{o['output']} {o['shape']}: {status}: max |a-b| {o['max_abs']:.3g}, relative {o['rel']:.3g}, "
                       f"tolerance {o['tolerance']:.3g} = {o.get('rule', '')}")
    if r["first_divergent"]:
        click.echo(f"first divergent module: {r['first_divergent']}")
        bad = [m for m in r["modules"] if not m["ok"] and not m["changed_by_surgery"]][:10]
        for m in bad:
            if m["max_abs"] is None:  # no number to give: NaN on one side only, shapes or integers that differ
                click.echo(f"  {m['module']} ({m['type']}): {m.get('reason') or 'differs'}")
            else:
                click.echo(f"  {m['module']} ({m['type']}): max |a-b| {m['max_abs']:.3g}, relative {m['rel']:.3g}")
    cliutil.echo_notes(r["notes"])
    click.echo("EQUIVALENT" if r["equivalent"] else "NOT EQUIVALENT")


@click.command("verify")
@click.argument("a")
@click.argument("b")
@cliutil.model_options
@click.option("--input-shape", default=None, help="Full input shape incl. batch, e.g. 8,3,224,224.")
@click.option("--inputs", default=None, help="Tensor file (torch.save / safetensors) with inputs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, type=cliutil.FloatDtype(),
              help="The dtype the models run in (bf16, fp16... accepted).")
@click.option("--atol", type=float, default=None, help="Override the absolute tolerance.")
@click.option("--rtol", type=float, default=None, help="Override the relative tolerance (x max|ref|).")
@click.option("--cross-device", is_flag=True, help="Run A on CPU and B on CUDA (CPU vs GPU agreement).")
@click.option("--key-a", default=None, metavar="PATH", help="Where the state dict sits in A (e.g. state_dict, model/ema).")
@click.option("--key-b", default=None, metavar="PATH", help="Where the state dict sits in B.")
@cliutil.pickle_options
@cliutil.json_option
def verify_cmd(a, b, model_spec, model_args, input_shape, inputs, device, dtype, atol, rtol, cross_device, key_a,
               key_b, trust_pickle, as_json):
    """Check that two checkpoints compute the same function. Exit 0 equivalent, 1 not, 2 error.

    \b
    Examples:
      ckpt-surgeon verify model_dp.pt model.pt --model 'samples/models.py:seednet'
      ckpt-surgeon verify bn.pt folded.pt --model 'samples/models.py:bnnet' --input-shape 8,3,32,32 --device cuda
      ckpt-surgeon verify model.pt model.pt --model pkg:factory --cross-device
    """
    from ckptsurgeon.inputs import parse_shape

    report = verify(a, b, model=model_spec, model_args=cliutil.parse_model_args(model_args), inputs=inputs,
                    input_shape=parse_shape(input_shape), device=device, dtype=dtype, atol=atol, rtol=rtol,
                    key_a=key_a, key_b=key_b, trust_pickle=trust_pickle, cross_device=cross_device)
    cliutil.emit(report, as_json, _human)
    if not report["equivalent"]:
        click.get_current_context().exit(EXIT_FINDING)


@hookimpl
def ckptsurgeon_commands():
    return [verify_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("verify", verify, "check forward equivalence of two checkpoints")]
