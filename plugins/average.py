"""average: the (weighted) mean of several checkpoints of one model -- a model soup, averaged
late-training checkpoints (SWA-style) -- computed tensor by tensor, never holding a model."""

from __future__ import annotations

import math

from collections import OrderedDict
from dataclasses import replace as dc_replace

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint, tensor_info
from ckptsurgeon.dtypes import FLOATING, count
from ckptsurgeon.errors import SelectionError
from ckptsurgeon.keys import align_keys
from ckptsurgeon.layout import assembled_ref
from ckptsurgeon.refs import TensorRef, is_tensor_like, tie_key
from ckptsurgeon.types import Operation


def average(cks: list[Checkpoint], *, weights=None, align: bool = True) -> tuple[Checkpoint, dict]:
    """The element-wise (weighted) mean of the state dicts of ``cks`` (two or more checkpoints of
    one model), accumulated in float64 and written in the first one's dtypes. Keys are matched
    across wrapper prefixes (``module.`` against none) and must be the same set, with the same
    shapes. Integer tensors (``num_batches_tracked``) must agree, or the first one's are kept and
    named. The result is the first checkpoint with its tensors replaced: its keys, wrapper and
    file layout (its optimizer state does not belong to the mean: the report says so). Each mean is
    computed when it is written, one tensor at a time.

    Example::

        soup, rep = average([load("run1.pt"), load("run2.pt"), load("run3.pt")], weights=[2, 1, 1])
    """
    from ckptsurgeon.compare import digest

    if len(cks) < 2:
        raise SelectionError("average needs at least two checkpoints")
    if weights is None:
        weights = [1.0] * len(cks)
    weights = [float(w) for w in weights]
    if len(weights) != len(cks):
        raise SelectionError(f"{count(len(weights), 'weight')} for {count(len(cks), 'checkpoint')}")
    if not all(math.isfinite(w) for w in weights):  # a NaN weight made every averaged tensor NaN
        raise SelectionError(f"weights must be finite numbers, got {', '.join(f'{w:g}' for w in weights)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise SelectionError("weights must be >= 0 and not all 0")
    share = [w / sum(weights) for w in weights]
    first = cks[0]
    tensors = [OrderedDict((k, v) for k, v in ck.state.items() if is_tensor_like(v)) for ck in cks]
    names = list(tensors[0])
    matched = []  # per other checkpoint: {first's key: its key}
    notes = []
    for i, other in enumerate(tensors[1:], start=2):
        ma, mb, alignment = align_keys(names, list(other), align)
        inv = {c: k for k, c in mb.items()}
        missing = [k for k in names if ma[k] not in inv]
        extra = sorted(set(other) - {inv[ma[k]] for k in names if ma[k] in inv})
        if missing or extra:
            sample = ", ".join(missing[:3] + extra[:3])
            raise SelectionError(f"checkpoint {i} has other tensors than the first: {len(missing)} missing, "
                                 f"{len(extra)} extra (e.g. {sample})", hint="average needs checkpoints of one model")
        if alignment["applied"]:
            notes.append(f"checkpoint {i}: {alignment['note'].replace('A', 'the first').replace('B', 'this one')}")
        matched.append({k: inv[ma[k]] for k in names})
    new_state: OrderedDict = OrderedDict(first.state)
    qdata = first.quantization_data()  # kept with their codes (integer/float8/float4), never averaged
    made: dict = {}
    averaged = kept_first = 0
    # tensors the first checkpoint ties (one storage: an embedding and its LM head) stay one tensor
    # only where every other checkpoint holds them equal too; else each gets its own mean
    groups: dict = {}
    for name in names:
        groups.setdefault(_tie(tensors[0][name]), []).append(name)
    tied = {n: g for g in groups.values() if len(g) > 1 for n in g}
    broken: set = set()
    for name in names:
        refs = [tensors[0][name]] + [tensors[j + 1][m[name]] for j, m in enumerate(matched)]
        infos = [tensor_info(r) for r in refs]
        shapes = {tuple(i["shape"]) for i in infos}
        if len(shapes) > 1:
            raise SelectionError(f"{name}: shapes differ across the checkpoints ({', '.join(map(str, shapes))})")
        dtype = infos[0]["dtype"]
        layout = next((i["layout"] for i in infos if i.get("layout")), None)  # sparse, nested, quantized
        if dtype not in FLOATING or dtype.startswith("float8") or dtype.startswith("float4") or layout or \
                any(i["dtype"].startswith(("float8", "float4", "complex")) for i in infos) or name in qdata:
            if not _all_equal(refs):
                what = f"a {layout} {dtype} tensor, not averaged" if layout else dtype
                notes.append(f"{name} ({what}) differs across the checkpoints: the first one's kept")
            kept_first += 1
            continue
        if name in tied:
            key = (_tie(refs[0]),) + tuple(digest(r) for r in refs[1:])
            if any(k[0] == key[0] and k != key for k in made):
                broken.add(tuple(tied[name]))
        else:
            key = ("own", name)
        if key not in made:
            made[key] = assembled_ref(infos[0]["shape"], dtype, _mean(refs, share, dtype), label=name)
        new_state[name] = made[key]
        averaged += 1
    for group in sorted(broken):
        notes.append(f"{' / '.join(group)} are one tensor in the first checkpoint but differ in another: "
                     "averaged separately, no longer tied")
    if first.wrapper_keys():
        notes.append("wrapper content (epoch, optimizer state...) is the first checkpoint's; its optimizer state "
                     "does not belong to the averaged weights")
    report = {"operation": "average", "inputs": len(cks), "weights": share, "averaged": averaged,
              "kept_from_first": kept_first, "notes": notes}
    # every input counts as this checkpoint's source: an output over any of them needs --in-place
    files = tuple(dict.fromkeys(f for ck in cks if ck.source for f in ck.source.files))
    source = dc_replace(first.source, files=files) if first.source else None
    return first.with_state(new_state, source=source), report


def _tie(ref):
    return tie_key(ref) if isinstance(ref, TensorRef) else id(ref)


def _all_equal(refs) -> bool:
    from ckptsurgeon.compare import digest

    first = digest(refs[0])
    return all(digest(r) == first for r in refs[1:])


def _mean(refs, share, dtype: str):
    def build():
        import torch

        from ckptsurgeon.dtypes import torch_dtype

        acc = None
        for r, w in zip(refs, share):
            t = (r.to_torch() if isinstance(r, TensorRef) else r).detach().to(torch.float64)
            acc = t * w if acc is None else acc.add_(t, alpha=w)
        return acc.to(torch_dtype(dtype)).contiguous()
    return build


def _human(r: dict) -> None:
    w = ", ".join(f"{x:.4g}" for x in r["weights"])
    click.echo(f"averaged {count(r['averaged'], 'tensor')} over {r['inputs']} checkpoints (weights {w})")
    if r["kept_from_first"]:
        click.echo(f"kept {count(r['kept_from_first'], 'tensor')} from the first as {'it was' if r['kept_from_first'] == 1 else 'they were'} (integer, quantized, float8/4, "
                   "complex or sparse: not averaged)")
    cliutil.echo_notes(r["notes"])
    cliutil.echo_save(r["save"])


@click.command("average")
@click.argument("paths", nargs=-1, required=True)
@click.option("--weights", default=None, metavar="W1,W2,...", help="Relative weights, one per checkpoint (default equal).")
@click.option("--no-align", is_flag=True, help="Do not match keys across wrapper prefixes.")
@cliutil.load_options
@cliutil.write_options
@cliutil.json_option
def average_cmd(paths, weights, no_align, key, trust_pickle, as_json, **write):
    """Average several checkpoints of one model (model soup, SWA-style), tensor by tensor.

    \b
    Examples:
      ckpt-surgeon average epoch8.pt epoch9.pt epoch10.pt -o avg.pt
      ckpt-surgeon average a.safetensors b.safetensors -o soup.safetensors --weights 0.7,0.3
    """
    ws = None
    if weights:
        try:
            ws = [float(w) for w in weights.split(",")]
        except ValueError:
            raise SelectionError(f"--weights {weights!r}: numbers separated by commas, e.g. 0.7,0.3") from None
    cks = [cliutil.load(p, key, trust_pickle) for p in paths]
    new, report = average(cks, weights=ws, align=not no_align)
    report["save"] = cliutil.save(new, **write)
    cliutil.emit(report, as_json, _human)


@hookimpl
def ckptsurgeon_commands():
    return [average_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("average", average, "the (weighted) mean of several checkpoints of one model")]
