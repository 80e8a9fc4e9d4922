"""extract --layers: keep some modules' weights (and their buffers), optionally re-rooted."""

from __future__ import annotations

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.dtypes import count
from ckptsurgeon.errors import SelectionError
from ckptsurgeon.keys import detect_prefix, module_of, name_list, parse_patterns, select, unmatched_hint
from ckptsurgeon.transform import keep_keys, rename_keys
from ckptsurgeon.types import Operation


def extract(ck: Checkpoint, layers, *, exclude=(), reroot: str | None = None,
            keep_optimizer: bool = False) -> tuple[Checkpoint, dict]:
    """Keep the tensors of the selected layers.

    ``layers``/``exclude``: module paths matched on whole components (``layer1`` matches
    ``layer1.0.conv1.weight``, not ``layer10``), globs (``*.bn*``) or regexes (``re:^enc\\.``),
    tried with and without the checkpoint's wrapper prefix. Every pattern must match something.
    A selected module's other tensors (BN running stats...) come along; the model's own top-level
    tensors (``cls_token``, ``pos_embed``) only where chosen themselves. ``reroot`` removes a
    prefix from the kept names. Optimizer state in the wrapper is dropped (it no longer matches).

    Example::

        new, rep = extract(ck, ["backbone"], reroot="backbone.")
    """
    inc = parse_patterns(layers)
    if not inc:
        raise SelectionError("no --layers given")
    exc = parse_patterns(exclude)
    keys = list(ck.state)
    strip = detect_prefix(keys)
    chosen, counts = select(keys, inc, strip)
    missing = [p for p, n in counts.items() if n == 0]
    if missing:
        raise SelectionError(f"layer pattern{'s' if len(missing) > 1 else ''} matched nothing: {', '.join(map(repr, missing))}",
                             hint=unmatched_hint(missing, keys, strip))
    # a selected module brings all of its own tensors (buffers included); the model's own
    # top-level tensors (ViT's cls_token, pos_embed) are no one module's: each comes alone
    def owner(k: str) -> str:
        bare = k[len(strip):] if strip and k.startswith(strip) else k
        return module_of(k) if "." in bare else ""

    modules = {owner(k) for k in chosen} - {""}
    chosen_set = set(chosen) | {k for k in keys if owner(k) in modules}
    if exc:
        dropped, ecounts = select(sorted(chosen_set), exc, strip)
        emissing = [p for p, n in ecounts.items() if n == 0]
        if emissing:
            raise SelectionError(f"--exclude pattern{'s' if len(emissing) > 1 else ''} matched nothing selected: {', '.join(map(repr, emissing))}",
                                 hint=unmatched_hint(emissing, sorted(chosen_set), strip))
        chosen_set -= set(dropped)
    if not chosen_set:
        raise SelectionError("the selection is empty after --exclude")
    new = keep_keys(ck, chosen_set)
    notes = []
    if reroot:
        pre = reroot if reroot.endswith(".") else reroot + "."
        kept = list(new.state)
        bad = [k for k in kept if not (k.startswith(pre) or k.startswith(strip + pre))]
        if bad:
            raise SelectionError(f"--reroot {pre!r}: {count(len(bad), 'extracted key')} {'does' if len(bad) == 1 else 'do'} not start with it, "
                                 f"e.g. {bad[0]!r}")
        full = pre if all(k.startswith(pre) for k in kept) else strip + pre
        new, _ = rename_keys(new, lambda k: k[len(full):] if k.startswith(full) else k)
    dropped_wrapper = []
    if new.sd_path and isinstance(new.wrapper, dict) and not keep_optimizer:
        wrapper = dict(new.wrapper) if type(new.wrapper) is dict else new.wrapper.copy()
        for k in list(wrapper):
            if "optim" in str(k).lower() and k != new.sd_path[0]:
                del wrapper[k]
                dropped_wrapper.append(str(k))
        new = new.replace(wrapper=wrapper)
        if dropped_wrapper:
            notes.append(f"dropped optimizer state ({name_list(dropped_wrapper)}): it no longer matches a partial model")
    summ = new.summary()
    left = [k for k in keys if k not in chosen_set]
    report = {
        "operation": "extract",
        "patterns": counts,
        "kept": summ["tensors"], "parameters": summ["parameters"], "bytes": summ["bytes"],
        "left_out": len(left), "left_out_modules": sorted({module_of(k) for k in left})[:50],
        "reroot": reroot, "dropped_wrapper_keys": dropped_wrapper, "notes": notes,
        "keys": list(new.state),
    }
    return new, report


PATTERNS_SHOWN = 8  # how many --layers patterns the summary lists one by one (--json has them all)


def _human(r: dict) -> None:
    click.echo(f"kept {count(r['kept'], 'tensor')} ({count(r['parameters'], 'parameter')}, {cliutil.human_bytes(r['bytes'])}); "
               f"left out {r['left_out']}")
    shown = list(r["patterns"].items())
    if len(shown) > PATTERNS_SHOWN:  # a generated list of 50 layers: the first few, then a sum
        rest, shown = shown[PATTERNS_SHOWN - 1:], shown[:PATTERNS_SHOWN - 1]
    else:
        rest = []
    for p, n in shown:
        click.echo(f"  {p!r}: {count(n, 'key')}")
    if rest:
        click.echo(f"  and {count(len(rest), 'more pattern')}: {count(sum(n for _, n in rest), 'key')}")
    cliutil.echo_notes(r["notes"])
    cliutil.echo_save(r["save"])


@click.command("extract")
@click.argument("path")
@click.option("--layers", multiple=True, required=True, help="Module paths, globs or re:regex (repeatable, comma-separated).")
@click.option("--exclude", multiple=True, help="Patterns to leave out of the selection.")
@click.option("--reroot", default=None, metavar="PREFIX", help="Remove PREFIX from extracted names.")
@click.option("--keep-optimizer", is_flag=True, help="Keep optimizer state in the wrapper anyway.")
@cliutil.load_options
@cliutil.write_options
@cliutil.json_option
def extract_cmd(path, layers, exclude, reroot, keep_optimizer, key, trust_pickle, as_json, **write):
    """Extract some layers' weights (for finetuning a backbone).

    \b
    Examples:
      ckpt-surgeon extract resnet.pt -o backbone.pt --layers conv1 --layers 'layer1,layer2' --exclude 'layer2.1'
      ckpt-surgeon extract ckpt.pth -o enc.safetensors --layers 're:^encoder\\.layer\\.[0-5]\\.' --reroot encoder.
      ckpt-surgeon extract resnet.pt -o headless.pt --layers '*' --exclude fc   # all but the classifier
    """
    ck = cliutil.load(path, key, trust_pickle)
    new, report = extract(ck, layers, exclude=exclude, reroot=reroot, keep_optimizer=keep_optimizer)
    report["save"] = cliutil.save(new, **write)
    cliutil.emit(report, as_json, _human)


@hookimpl
def ckptsurgeon_commands():
    return [extract_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("extract", extract, "keep the tensors of selected layers")]
