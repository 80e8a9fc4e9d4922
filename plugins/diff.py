"""diff: what changed between two checkpoints, in numbers; deepdiff for everything but tensors.

JSON schema ``ckpt-surgeon.diff/1`` (see README): keys only in A/B, renames (same shape, dtype
and content under another name), shape/dtype changes, tensors equal/close/changed with
max|a-b|, mean|a-b|, relative L2 and cosine, a per-module roll-up, NaN/Inf found, and the
deepdiff of the non-tensor content (epoch, hyper-parameters, optimizer param_groups...).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.values import Walk
from ckptsurgeon.dtypes import count
from ckptsurgeon.errors import EXIT_FINDING
from ckptsurgeon.keys import align_keys
from ckptsurgeon.refs import TensorRef, check_dense_fits, is_tensor_like
from ckptsurgeon.types import Operation

from .diff_content import deep_diff, has_header, other_content, same_content, shape_dtype
from .diff_report import human, plot

SCHEMA = "ckpt-surgeon.diff/1"


def _module(name: str, depth: int) -> str:
    parts = name.split(".")
    return ".".join(parts[:max(1, min(depth, len(parts) - 1))])


def _sides(a, b, key_a, key_b, trust_pickle, loader) -> tuple[Checkpoint, Checkpoint, list[str]]:
    """Both sides read with ``loader`` (paths; Checkpoints are taken as they are). Two files with
    no model state dict (optimizer states, schedulers, RNG states) and no --key are compared as
    wholes: every tensor by hash at its place, with the rest (the notes say so). One such file
    against a model's checkpoint is an error: its own."""
    from ckptsurgeon.errors import AmbiguousStateDictError, NoStateDictError

    sides, why = [], []
    for x, key in ((a, key_a), (b, key_b)):
        try:
            sides.append(x if isinstance(x, Checkpoint) else loader(x, key=key, trust_pickle=trust_pickle))
            why.append(None)
        except (AmbiguousStateDictError, NoStateDictError) as e:
            if key is not None or e.overview is None:
                raise
            sides.append(e.overview)
            why.append(e)
    if (why[0] is None) != (why[1] is None):
        raise why[0] or why[1]
    whole = [f"{side}: {' '.join(e.message.split('; ')[0].split())}; compared as a whole: its tensors by hash, "
             "with the other content" for side, e in zip("AB", why) if e is not None]
    return sides[0], sides[1], whole


def diff(a, b, *, atol: float = 0.0, rtol: float = 0.0, align: bool = True, key_a=None, key_b=None,
         trust_pickle: bool = False, depth: int = 1, metadata_hashes: bool = True, progress=None,
         tensors_only: bool = False) -> dict:
    """Compare two checkpoints (paths or Checkpoints), tensor by tensor, each pair read once.

    Equal bytes (xxh3-128) short-circuit; statistics are computed only for pairs that differ.
    ``tensors_only``: the state dicts' tensors only (a Lightning .ckpt against the weights
    extracted from it); wrappers, non-tensor entries and header metadata are not compared.

    Example::

        rep = diff("epoch10.pt", "epoch20.safetensors")
        rep["identical"], rep["changed"][0]["name"], rep["modules"][0]
    """
    from ckptsurgeon.compare import SharedBlocks, check_tolerances, digest, stats
    from ckptsurgeon.loading import load

    check_tolerances(atol, rtol)
    ca, cb, whole = _sides(a, b, key_a, key_b, trust_pickle, load)
    ta = OrderedDict((k, v) for k, v in ca.state.items() if is_tensor_like(v))
    tb = OrderedDict((k, v) for k, v in cb.state.items() if is_tensor_like(v))
    for side, tensors in (("A", ta), ("B", tb)):  # hashed in row-major order: a broadcast view is made dense
        for k, v in tensors.items():
            if isinstance(v, TensorRef) and not v.is_contiguous():
                check_dense_fits(v, f"{k} (in {side})")
    xa = [k for k, v in ca.state.items() if not is_tensor_like(v)]  # non-tensor entries: renamed alike
    xb = [k for k, v in cb.state.items() if not is_tensor_like(v)]
    ma, mb, alignment = align_keys(list(ta), list(tb), align, xa, xb)
    renamed_a, renamed_b = {k: ma.pop(k) for k in xa}, {k: mb.pop(k) for k in xb}
    inv_b = {c: k for k, c in mb.items()}
    common = [(k, ma[k], inv_b[ma[k]]) for k in ta if ma[k] in inv_b]
    matched_b = {kb for _, _, kb in common}
    only_a = [k for k in ta if ma[k] not in inv_b]
    only_b = [k for k in tb if k not in matched_b]

    renamed = []
    if only_a and only_b:
        index: dict = {}
        for k in only_b:
            shape, dtype = shape_dtype(tb[k])
            index.setdefault((shape, dtype), []).append(k)
        by_hash: dict = {}
        for k in only_a:
            shape, dtype = shape_dtype(ta[k])
            cands = index.get((shape, dtype))
            if not cands:
                continue
            h = digest(ta[k])
            for kb in list(cands):
                hb = by_hash.get(kb)
                if hb is None:
                    hb = by_hash[kb] = digest(tb[kb])
                if hb == h:
                    renamed.append({"a": k, "b": kb})
                    cands.remove(kb)
                    break
        ra = {r["a"] for r in renamed}
        rb = {r["b"] for r in renamed}
        only_a = [k for k in only_a if k not in ra]
        only_b = [k for k in only_b if k not in rb]

    # a tied copy one side stores once (save_pretrained's safetensors drops lm_head.weight, a .bin
    # holds it as a second name of the embedding): the same values as its partner, compared there
    tied_a = _tied_copies(ca, only_a, {ka for ka, _, _ in common})
    tied_b = _tied_copies(cb, only_b, {kb for _, _, kb in common})
    only_a = [k for k in only_a if k not in tied_a]
    only_b = [k for k in only_b if k not in tied_b]
    # the same values under a second name, stored as a copy (a tied weight written without sharing)
    copies_a = _copies(ta, only_a, [ka for ka, _, _ in common], digest)
    copies_b = _copies(tb, only_b, [kb for _, _, kb in common], digest)

    shape_changed, dtype_changed, changed, close, nonfinite = [], [], [], [], []
    equal = 0
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    shared = SharedBlocks(pool)
    mods: "OrderedDict[str, dict]" = OrderedDict()
    try:
        for ka, name, kb in common:
            va, vb = ta[ka], tb[kb]
            (sa, da), (sb, db) = shape_dtype(va), shape_dtype(vb)
            nbytes = _nbytes(va)
            if progress is not None:
                progress(nbytes)
            mod = mods.setdefault(_module(name, depth), {"module": _module(name, depth), "tensors": 0, "changed": 0,
                                                          "diff_sq": 0.0, "ref_sq": 0.0})
            mod["tensors"] += 1
            if sa != sb:
                shape_changed.append({"name": name, "a": list(sa), "b": list(sb)})
                mod["changed"] += 1
                continue
            if da != db:  # the values compared all the same (a float32 model against its bfloat16 copy)
                s = stats(va, vb, atol, rtol)
                entry = {"name": name, "a": da, "b": db}
                if s is not None:
                    nf = s.pop("nonfinite", None)
                    if nf:
                        nonfinite.append({"name": name, **nf})
                    entry.update({k: _num(v) for k, v in s.items() if k not in ("diff_sq", "ref_sq", "close")})
                    mod["diff_sq"] += s["diff_sq"]
                    mod["ref_sq"] += s["ref_sq"]
                dtype_changed.append(entry)
                mod["changed"] += 1
                continue
            if nbytes >= _PARALLEL_HASH and shared.same(va, vb):  # the same disk blocks (a reflink copy)
                equal += 1
                continue
            if nbytes >= _PARALLEL_HASH:  # A and B hashed (and CRC-checked) on both cores
                pending = pool.submit(digest, va)
                same = digest(vb) == pending.result()
            else:  # a small pair: handing it to the other thread costs more than hashing it
                same = digest(va) == digest(vb)
            if same:
                equal += 1
                continue
            s = stats(va, vb, atol, rtol)
            nf = s.pop("nonfinite", None)
            if nf:
                nonfinite.append({"name": name, **nf})
            entry = {"name": name, "shape": list(sa), "dtype": da, **{k: _num(v) for k, v in s.items()
                                                                       if k not in ("diff_sq", "ref_sq", "close")}}
            mod["diff_sq"] += s["diff_sq"]
            mod["ref_sq"] += s["ref_sq"]
            if s["close"] and (atol or rtol):
                close.append(entry)
                continue
            changed.append(entry)
            mod["changed"] += 1
        shared.finish()
    finally:
        pool.shutdown()
        shared.close()
    changed.sort(key=lambda e: (-(e["rel_l2"] if e["rel_l2"] is not None else math.inf), e["name"]))
    modules = []
    for m in mods.values():
        rel = math.sqrt(m["diff_sq"]) / math.sqrt(m["ref_sq"]) if m["ref_sq"] > 0 else (0.0 if m["diff_sq"] == 0 else None)
        modules.append({"module": m["module"], "tensors": m["tensors"], "changed": m["changed"], "rel_l2": _num(rel)})
    modules.sort(key=lambda m: (-(m["rel_l2"] or 0), m["module"]))

    if tensors_only and not ta and not tb:  # no state dict (two optimizers' files): compared whole
        tensors_only = False
        whole = whole + ["--tensors-only does not apply: neither side has a model state dict, so the files are "
                         "compared whole"]
    if tensors_only:  # the wrappers are not even read (a Lightning .ckpt's optimizer state: not hashed)
        oa = ob = {}
        notes = whole + ["only the state dicts' tensors were compared (--tensors-only): wrappers, non-tensor entries "
                         "and header metadata were not"]
    else:
        (oa, cut_a), (ob, cut_b) = other_content(ca, metadata_hashes), other_content(cb, metadata_hashes)
        for content, names in ((oa, renamed_a), (ob, renamed_b)):  # compared under the aligned names too
            if "__state_dict_non_tensor__" in content:
                content["__state_dict_non_tensor__"] = {names.get(k, k): v for k, v in
                                                       content["__state_dict_non_tensor__"].items()}
        notes = whole + [f"the non-tensor content of {side} was compared up to {Walk.LIMIT:,} items and "
                         f"{Walk.MAX_DEPTH} levels only: it is larger, deeper, or shares containers without end (a "
                         "hostile pickle can)" for side, cut in (("A", cut_a), ("B", cut_b)) if cut]
        if not (has_header(ca) and has_header(cb)):  # header metadata where only one format can hold it
            for side, o in (("A", oa), ("B", ob)):
                header = o.pop("__safetensors_metadata__", None) if isinstance(o, dict) else None
                if header:
                    notes.append(f"{side}'s safetensors header metadata ({', '.join(sorted(header))}) not "
                                 "compared: the other side's format has none")
    other_differs = not same_content(oa, ob)
    meta, meta_notes = deep_diff(oa, ob) if other_differs else ({}, [])
    notes += meta_notes
    differences = bool(only_a or only_b or renamed or shape_changed or dtype_changed or changed or other_differs)
    identical = not differences and not close
    if tied_a or tied_b:
        notes.append("a tied name stored on one side only is compared through the tensor it names: a model that "
                     "ties them (from_pretrained with tie_word_embeddings) loads either file the same")
    if identical:
        verdict = "identical: every tensor is bitwise equal" + ("" if tensors_only else " and the other content matches")
        if tied_a or tied_b:
            verdict += f" ({count(len(tied_a) + len(tied_b), 'tied name')} stored on one side only)"
    elif not differences:
        verdict = (f"equal within tolerance (atol={atol}, rtol={rtol}): {count(len(close), 'tensor')} "
                   f"differ{'s' if len(close) == 1 else ''} slightly")
    else:
        found = [(changed, "tensor", " changed"), (shape_changed, "shape change", ""),
                 (dtype_changed, "dtype change", ""), (renamed, "rename", ""), (only_a, "", "only in A"),
                 (only_b, "", "only in B")]
        bits = [(count(len(items), noun) if noun else str(len(items))) + (f" {what}" if not noun else what)
                for items, noun, what in found if items]
        verdict = "different: " + ", ".join(bits + (["other content differs"] if other_differs else []))
    return {
        "schema": SCHEMA,
        "a": _side(ca, len(ta)), "b": _side(cb, len(tb)),
        "alignment": alignment,
        "tolerance": {"atol": atol, "rtol": rtol},
        "only_in_a": only_a, "only_in_b": only_b, "renamed": renamed,
        "tied_only_in_a": [{"name": k, "tied_to": m} for k, m in tied_a.items()],
        "tied_only_in_b": [{"name": k, "tied_to": m} for k, m in tied_b.items()],
        "copies_only_in_a": [{"name": k, "same_as": m} for k, m in copies_a.items()],
        "copies_only_in_b": [{"name": k, "same_as": m} for k, m in copies_b.items()],
        "shape_changed": shape_changed, "dtype_changed": dtype_changed,
        "equal": equal, "close": close, "changed": changed,
        "modules": modules, "nonfinite": nonfinite, "metadata": meta,
        "notes": notes,
        "differences": differences, "identical": identical, "verdict": verdict,
    }


def _tied_copies(ck: Checkpoint, only: list, compared: set) -> "OrderedDict[str, str]":
    """{name on one side only: a name of the very same tensor on that side that both sides hold}."""
    if not only:
        return OrderedDict()
    groups: dict[str, list] = {}
    for alias, name in ck.tied():
        groups.setdefault(name, [name]).append(alias)
    partners = {k: g for g in groups.values() for k in g}
    out: "OrderedDict[str, str]" = OrderedDict()
    for k in only:
        m = next((x for x in partners.get(k, ()) if x != k and x in compared), None)
        if m is not None:
            out[k] = m
    return out


_COPY_CHECKS = 16  # names on one side only checked for a copy of a compared tensor (each a hash or two)


def _copies(tensors: dict, only: list, compared: list, digest) -> "OrderedDict[str, str]":
    """{name on one side only: a compared name on that side holding the same values}: a tied weight
    written as two copies (a safetensors file made without --dedupe-tied) beside a file that stores
    it once. Only tensors of the same shape and dtype are hashed, for the first _COPY_CHECKS names."""
    out: "OrderedDict[str, str]" = OrderedDict()
    if not only or not compared:
        return out
    by_kind: dict = {}
    for k in compared:
        by_kind.setdefault(shape_dtype(tensors[k]), []).append(k)
    hashes: dict = {}
    for k in only[:_COPY_CHECKS]:
        cands = by_kind.get(shape_dtype(tensors[k]))
        if not cands or len(cands) > _COPY_CHECKS:  # (many alike: a bias among biases says little)
            continue
        h = digest(tensors[k])
        for c in cands:
            if c not in hashes:
                hashes[c] = digest(tensors[c])
            if hashes[c] == h:
                out[k] = c
                break
    return out


_PARALLEL_HASH = 1 << 20  # tensors from this size are hashed on two threads (one per side)


def _nbytes(v) -> int:
    from ckptsurgeon.checkpoint import tensor_info

    return tensor_info(v)["nbytes"]


def _num(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def _side(ck: Checkpoint, n: int) -> dict:
    return {"path": ck.source.path if ck.source else None, "format": ck.source.format if ck.source else None,
            "state_dict_at": "/".join(map(str, ck.sd_path)) or "<bare>", "tensors": n}


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--atol", default=0.0, show_default=True, help="Absolute tolerance for 'equal'.")
@click.option("--rtol", default=0.0, show_default=True, help="Relative tolerance for 'equal'.")
@click.option("--no-align", is_flag=True, help="Do not align keys across wrapper prefixes.")
@click.option("--depth", default=1, show_default=True, type=click.IntRange(min=1), help="Module depth of the roll-up.")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png", help="Bar chart of change per module (matplotlib).")
@click.option("--key-a", default=None, metavar="PATH", help="Where the state dict sits in A (e.g. state_dict, model/ema).")
@click.option("--key-b", default=None, metavar="PATH", help="Where the state dict sits in B.")
@click.option("--tensors-only", is_flag=True,
              help="Compare the state dicts' tensors only, not wrappers (epoch, optimizer...), non-tensor entries "
                   "or header metadata.")
@cliutil.pickle_options
@cliutil.json_option
def diff_cmd(a, b, atol, rtol, no_align, depth, plot_path, key_a, key_b, tensors_only, trust_pickle, as_json):
    """Compare two checkpoints. Exit 0: no differences, 1: differences, 2: error.

    \b
    Examples:
      ckpt-surgeon diff a.pt b.pt
      ckpt-surgeon diff epoch10.pt epoch20.safetensors --json > report.json
      ckpt-surgeon diff base/ finetuned/ --atol 1e-6 --plot change.png
      ckpt-surgeon diff last.ckpt weights.safetensors --tensors-only   # the weights alone
    """
    ca, cb, whole = _sides(a, b, key_a, key_b, trust_pickle, cliutil.load)
    with cliutil.progress_bar(ca.summary()["bytes"], "comparing") as cb_progress:
        report = diff(ca, cb, atol=atol, rtol=rtol, align=not no_align, depth=depth, progress=cb_progress,
                      tensors_only=tensors_only)
    report["notes"][:0] = whole
    if plot_path:
        plot(report, plot_path)
    cliutil.emit(report, as_json, human)
    if report["differences"]:
        click.get_current_context().exit(EXIT_FINDING)


@hookimpl
def ckptsurgeon_commands():
    return [diff_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("diff", diff, "compare two checkpoints")]
