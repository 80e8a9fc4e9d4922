"""cast: change the dtype of a checkpoint's floating-point tensors (float32 -> bfloat16 to halve a
model, or back), tensor by tensor, without holding the model in memory."""

from __future__ import annotations

from collections import Counter, OrderedDict

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint, tensor_info
from ckptsurgeon.dtypes import PLAIN_FLOATS, count, plain_float
from ckptsurgeon.errors import SelectionError
from ckptsurgeon.keys import detect_prefix, name_list, parse_patterns, select, unmatched_hint
from ckptsurgeon.layout import cast_ref
from ckptsurgeon.refs import TensorRef, is_tensor_like, special_kind, tie_key
from ckptsurgeon.types import Operation

# what a cast reads and writes: the dtypes whose values a plain cast carries (float8/float4 codes
# need their scales, which live elsewhere; complex and integer tensors are not weights to cast)
TARGETS = PLAIN_FLOATS


def cast(ck: Checkpoint, dtype: str, *, keep=(), only=(), allow_unmatched: bool = False) -> tuple[Checkpoint, dict]:
    """Cast the floating-point tensors of the state dict to ``dtype`` (float32, bfloat16, float16,
    float64). Integer tensors (``num_batches_tracked``, position ids), float8/float4 codes and
    complex tensors stay as they are. ``keep``: tensors to leave alone (module paths, globs or
    ``re:`` regexes, as for extract: ``'*norm*'`` keeps norms in float32). ``only``: cast only
    tensors of these source dtypes. Each cast tensor is computed when it is written, one at a
    time; tied weights stay tied. A ``keep`` pattern that matches nothing is an error unless
    ``allow_unmatched`` (the report's ``unmatched_keep`` lists it).

    Example::

        new, rep = cast(load("model.safetensors"), "bfloat16", keep=["*norm*"])
    """
    dtype, only = plain_float(dtype), tuple(plain_float(d) for d in only)
    if dtype not in TARGETS:
        raise SelectionError(f"cannot cast to {dtype!r}", hint=f"one of: {', '.join(TARGETS)}")
    for d in only:
        if d not in TARGETS:
            raise SelectionError(f"--only {d!r} is not a castable dtype", hint=f"one of: {', '.join(TARGETS)}")
    keys = list(ck.state)
    kept: set = set()
    missing: list = []
    patterns = parse_patterns(keep)
    if patterns:
        chosen, counts = select(keys, patterns, detect_prefix(keys))
        missing = [p for p, n in counts.items() if n == 0]
        if missing and not allow_unmatched:
            raise SelectionError(f"--keep pattern{'s' if len(missing) > 1 else ''} matched nothing: {', '.join(map(repr, missing))}",
                                 hint=unmatched_hint(missing, keys, detect_prefix(keys)))
        kept = set(chosen)
    qdata = ck.quantization_data()
    new_state: OrderedDict = OrderedDict()
    tied: dict = {}
    changes: Counter = Counter()
    left: Counter = Counter()
    before = after = 0
    for name, v in ck.state.items():
        if not is_tensor_like(v):
            new_state[name] = v
            continue
        info = tensor_info(v)
        src = info["dtype"]
        before += info["nbytes"]
        castable = src in TARGETS and src != dtype and (not only or src in only) and name not in kept \
            and name not in qdata
        if castable and not isinstance(v, TensorRef) and special_kind(v):
            castable = False  # sparse, quantized, nested: no plain cast
        if not castable:
            new_state[name] = v
            after += info["nbytes"]
            reason = ("kept by --keep" if name in kept else "already " + dtype if src == dtype
                      else "quantization data of a quantized weight" if name in qdata
                      else "not in --only" if only and src in TARGETS else f"{src}, not cast")
            left[reason] += 1
            continue
        changes[(src, dtype)] += 1
        if isinstance(v, TensorRef):
            key = tie_key(v)
            if key not in tied:
                out = cast_ref(v, dtype, label=name)
                for attr in ("requires_grad", "hooks", "metadata", "param", "attrs"):  # a Parameter stays one
                    setattr(out, attr, getattr(v, attr))
                tied[key] = out
            new_state[name] = tied[key]
        else:
            import torch

            from ckptsurgeon.dtypes import torch_dtype

            new_state[name] = v.detach().to(torch_dtype(dtype)) if isinstance(v, torch.Tensor) else v
        after += tensor_info(new_state[name])["nbytes"]
    if not changes:
        why = ", ".join(f"{n} {reason}" for reason, n in left.items()) or "the state dict holds no tensors"
        raise SelectionError(f"no tensor to cast to {dtype} ({why})", hint="nothing would change: no file written")
    report = {"operation": "cast", "dtype": dtype,
              "cast": [{"from": a, "to": b, "tensors": n} for (a, b), n in changes.items()],
              "left": dict(left), "bytes_before": before, "bytes_after": after,
              "wrapper_untouched": ck.wrapper_keys(), "unmatched_keep": missing}
    return ck.with_state(new_state), report


def _human(r: dict) -> None:
    for c in r["cast"]:
        click.echo(f"cast {count(c['tensors'], 'tensor')} {c['from']} -> {c['to']}")
    for why, n in r["left"].items():
        click.echo(f"left {count(n, 'tensor')} as {'it is' if n == 1 else 'they are'}: {why}")
    click.echo(f"tensor bytes {cliutil.human_bytes(r['bytes_before'])} -> {cliutil.human_bytes(r['bytes_after'])}")
    if r["wrapper_untouched"]:
        cliutil.echo_notes([f"wrapper entries kept as they are (optimizer state included): "
                            f"{name_list(r['wrapper_untouched'], 8)}"])
    if "save" in r:  # (one state dict of several: what was written comes once, after them all)
        cliutil.echo_save(r["save"])


@click.command("cast")
@click.argument("path")
@click.option("--dtype", "dtype", required=True, type=cliutil.FloatDtype(), help="Target dtype (bf16, fp16... accepted).")
@click.option("--keep", multiple=True, metavar="PATTERN",
              help="Tensors to leave as they are (module path, glob or re:regex; repeatable), e.g. '*norm*'.")
@click.option("--only", multiple=True, type=cliutil.FloatDtype(), help="Cast only tensors of this dtype (repeatable).")
@cliutil.load_each_options
@cliutil.write_options
@cliutil.json_option
def cast_cmd(path, dtype, keep, only, keys, trust_pickle, as_json, **write):
    """Cast floating-point tensors to another dtype (integer tensors stay as they are).

    \b
    Examples:
      ckpt-surgeon cast model.safetensors --dtype bfloat16 -o model_bf16.safetensors
      ckpt-surgeon cast model.pt --dtype float16 --keep '*norm*' -o model_fp16.pt
      ckpt-surgeon cast ckpt.pth.tar --key state_dict --key state_dict_ema --dtype bf16 -o ckpt_bf16.pth.tar
    """
    several = len(keys) > 1
    new, report = cliutil.on_each_state_dict(
        path, keys, trust_pickle, lambda ck: cast(ck, dtype, keep=keep, only=only, allow_unmatched=several),
        write=write)
    missing = cliutil.unmatched_in_every(report, "unmatched_keep")
    if missing:
        raise SelectionError(f"--keep pattern{'s' if len(missing) > 1 else ''} matched nothing in "
                             f"{', '.join(keys)}: {', '.join(map(repr, missing))}")
    report["save"] = cliutil.save(new, **write)
    cliutil.emit_each(report, as_json, _human)


@hookimpl
def ckptsurgeon_commands():
    return [cast_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("cast", cast, "cast floating-point tensors to another dtype")]
