"""Partial loading for finetuning: load what matches, freeze it, fail loudly when little matches."""

from __future__ import annotations

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.errors import EXIT_FINDING, CkptSurgeonError, SelectionError
from ckptsurgeon.keys import align_to_model, detect_prefix, parse_patterns, select
from ckptsurgeon.modelload import transformers_convert
from ckptsurgeon.refs import is_tensor_like
from ckptsurgeon.types import Operation


class PartialLoadError(CkptSurgeonError):
    """Too few of the requested parameters matched the checkpoint."""

    kind = "partial-load"

    def __init__(self, message, report, **kw):
        super().__init__(message, **kw)
        self.report = report


def load_partial(model, source, *, layers=None, freeze: bool = False, min_match: float = 0.9, key=None,
                 trust_pickle: bool = False, dry_run: bool = False) -> dict:
    """Load every checkpoint tensor whose (prefix-aligned) name and shape match ``model``.

    ``layers`` limits what is requested (module paths/globs/re: like extract). Raises
    :class:`PartialLoadError` *before touching the model* when the loaded fraction of the
    requested tensors is below ``min_match`` — the silent ``strict=False`` loaded-nothing bug.
    ``freeze=True`` sets ``requires_grad=False`` on the loaded parameters.

    Example::

        report = load_partial(model, "ckpt.pth", layers=["backbone"], freeze=True, min_match=0.9)
    """
    import torch

    from ckptsurgeon.loading import load

    if not 0 <= min_match <= 1:
        raise SelectionError(f"--min-match {min_match} is a fraction of the requested tensors: between 0 and 1")
    ck = source if isinstance(source, Checkpoint) else load(source, key=key, trust_pickle=trust_pickle)
    model_sd = model.state_dict()
    model_keys = list(model_sd)
    requested = model_keys
    if layers:
        pats = parse_patterns(layers)
        requested, counts = select(model_keys, pats, detect_prefix(model_keys))
        missing_pats = [p for p, n in counts.items() if n == 0]
        if missing_pats:
            raise SelectionError(f"layer pattern{'s' if len(missing_pats) > 1 else ''} match{'' if len(missing_pats) > 1 else 'es'} nothing in the model: {', '.join(map(repr, missing_pats))}")
    requested_set = set(requested)
    ck_keys = [k for k, v in ck.state.items() if is_tensor_like(v)]
    how, fn = align_to_model(ck_keys, model_keys)
    loaded, mismatched, used = {}, [], set()
    for k in ck_keys:
        mk = fn(k)
        if mk not in requested_set:
            continue
        used.add(k)
        v = ck.state[k]
        shape = tuple(v.shape)
        if shape != tuple(model_sd[mk].shape):
            mismatched.append({"key": mk, "checkpoint": list(shape), "model": list(model_sd[mk].shape)})
            continue
        loaded[mk] = k
    missing = [k for k in requested if k not in loaded and k not in {m["key"] for m in mismatched}]
    unexpected = [k for k in ck_keys if k not in used]
    values = None  # model name -> tensor, when transformers converted the checkpoint
    if missing and unexpected:
        # names on both sides left unmatched: maybe another transformers version's names/layout
        # (fused MoE experts, renamed layers). Load it the way from_pretrained does, when that
        # matches more of what is requested (a backbone-only file leaves nothing unexpected and
        # never pays for this: it builds a second model)
        got = transformers_convert(model, ck, ck_keys, lenient=True)
        if got is not None:
            converted, info, how_t = got
            bad = set(info.get("missing_keys") or ()) | {m[0] for m in info.get("mismatched_keys") or ()}
            ok = [k for k in requested if k in converted and k not in bad]
            if len(ok) > len(loaded):
                how, values = how_t, converted
                loaded = {k: k for k in ok}
                mismatched = [{"key": m[0], "checkpoint": list(m[1]), "model": list(m[2])}
                              for m in info.get("mismatched_keys") or () if m[0] in requested_set]
                missing = [k for k in requested if k not in loaded and k not in {m["key"] for m in mismatched}]
                unexpected = sorted(info.get("unexpected_keys") or ())
    fraction = len(loaded) / len(requested) if requested else 0.0
    report = {
        "alignment": how,
        "requested": len(requested), "loaded": len(loaded), "fraction": round(fraction, 6),
        "min_match": min_match,
        "shape_mismatched": mismatched, "missing_in_checkpoint": missing, "unexpected": unexpected,
        "frozen": [], "loaded_keys": sorted(loaded),
    }
    if fraction < min_match:
        raise PartialLoadError(
            f"only {len(loaded)} of {len(requested)} requested tensors ({fraction:.1%}) match the checkpoint, "
            f"below min_match={min_match:.0%} (alignment: {how}; {len(mismatched)} shape mismatches, "
            f"{len(missing)} missing)", report, hint="check --layers / prefixes, or lower min_match")
    if dry_run:
        return report
    if values is not None:
        sub = {mk: values[mk] for mk in loaded}
    else:
        sub = {mk: ck.state[k].to_torch() if hasattr(ck.state[k], "to_torch") else ck.state[k]
               for mk, k in loaded.items()}
    with torch.no_grad():
        result = model.load_state_dict(sub, strict=False)
    del result
    if freeze:
        params = dict(model.named_parameters())
        for mk in loaded:
            p = params.get(mk)
            if p is not None:
                p.requires_grad_(False)
                report["frozen"].append(mk)
    return report


def _human(r: dict) -> None:
    click.echo(f"alignment: {r['alignment']}")
    click.echo(f"loaded {r['loaded']} of {r['requested']} requested tensors ({r['fraction']:.1%}); "
               f"min_match {r['min_match']:.0%}")
    for m in r["shape_mismatched"]:
        click.echo(f"  shape mismatch: {m['key']}: checkpoint {m['checkpoint']} vs model {m['model']}")
    if r["missing_in_checkpoint"]:
        click.echo(f"  missing in checkpoint ({len(r['missing_in_checkpoint'])}): " + ", ".join(r["missing_in_checkpoint"][:10]))
    if r["unexpected"]:
        click.echo(f"  unexpected in checkpoint ({len(r['unexpected'])}): " + ", ".join(r["unexpected"][:10]))


@click.command("check")
@click.argument("path")
@cliutil.model_options
@click.option("--layers", multiple=True, help="Only these model layers are requested.")
@click.option("--min-match", default=0.9, show_default=True, help="Required fraction of requested tensors.")
@cliutil.load_options
@cliutil.json_option
def check_cmd(path, model_spec, model_args, layers, min_match, key, trust_pickle, as_json):
    """Report how a checkpoint would load into a model (exit 1 below --min-match).

    \b
    Example:
      ckpt-surgeon check ckpt.pth --model 'samples/models.py:seednet'
    """
    from ckptsurgeon.modelspec import build_model

    if not model_spec:
        raise SelectionError("--model is required", hint="e.g. --model samples/models.py:seednet")
    model = build_model(model_spec, cliutil.parse_model_args(model_args))
    try:
        report = load_partial(model, path, layers=layers, min_match=min_match, key=key, trust_pickle=trust_pickle,
                              dry_run=True)
        ok = True
    except PartialLoadError as e:
        report, ok = e.report, False
        report["error"] = e.one_line()
    cliutil.emit(report, as_json, _human)
    if not ok:
        if not as_json:
            click.echo(f"ckpt-surgeon: {report['error']}", err=True)
        raise SystemExit(EXIT_FINDING)


@hookimpl
def ckptsurgeon_commands():
    return [check_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("load_partial", load_partial, "load matching weights into a model, optionally frozen")]
