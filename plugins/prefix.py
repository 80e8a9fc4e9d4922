"""strip-prefix / add-prefix: the wrapper prefixes of DataParallel/DDP, torch.compile, Lightning."""

from __future__ import annotations

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.dtypes import count
from ckptsurgeon.errors import SelectionError
from ckptsurgeon.keys import detect_prefix, drop_inner_wrappers, inner_wrappers, prefix_report
from ckptsurgeon.transform import rename_keys
from ckptsurgeon.types import Operation


def strip_prefix(ck: Checkpoint, prefix: str | None = None, *, partial: bool = False) -> tuple[Checkpoint, dict]:
    """Remove a wrapper prefix from state-dict keys.

    Without ``prefix`` the stack of known wrapper prefixes carried by every key is detected
    (``module.``, ``_orig_mod.``, ``model.``, ``module._orig_mod.`` ...). A given prefix must be on
    every key unless ``partial=True``. Tensors are not read; ``_metadata`` follows.

    Example::

        new, report = strip_prefix(load("model_dp.pt"))     # report["prefix"] == "module."
    """
    keys = list(ck.state)
    detected = prefix is None
    inner: dict = {}
    if detected:
        prefix = detect_prefix(keys, partial=partial)
        inner = inner_wrappers(k[len(prefix):] if k.startswith(prefix) else k for k in keys)
        if not prefix and not inner:
            seen = ", ".join(f"{p['prefix']} ({p['keys']}/{p['of']})" for p in prefix_report(keys)) or "none"
            raise SelectionError("no wrapper prefix is carried by every key (known prefixes seen: " + seen + ")",
                                 hint="pass --prefix, or --partial to strip where present")
        if not prefix:  # only wrapped submodules (per-block torch.compile): drop those components
            new, changed = rename_keys(ck, drop_inner_wrappers)
            return new, {"operation": "strip-prefix", "prefix": "", "inner": inner, "detected": True,
                         "renamed": len(changed), "unchanged": len(keys) - len(changed),
                         "wrapper_untouched": ck.wrapper_keys()}
    if not prefix:
        raise SelectionError("an empty prefix changes nothing",
                             hint="e.g. --prefix module., or leave --prefix out to detect it")
    notes = []
    if not prefix.endswith("."):  # --prefix module: the component, not 'module' off '.0.weight'
        rest = {k[len(prefix):len(prefix) + 1] for k in keys if k.startswith(prefix)}
        if rest == {"."}:
            prefix += "."
            notes.append(f"prefix normalised to {prefix!r}")
    n = sum(1 for k in keys if k.startswith(prefix))
    if n == 0:
        raise SelectionError(f"no key starts with {prefix!r}", hint=f"first key: {keys[0]!r}" if keys else None)
    if n < len(keys) and not partial:
        raise SelectionError(f"only {n} of {len(keys)} keys start with {prefix!r}",
                             hint="pass --partial to strip it where present")
    if inner:
        new, changed = rename_keys(ck, lambda k: drop_inner_wrappers(k[len(prefix):] if k.startswith(prefix) else k))
    else:
        new, changed = rename_keys(ck, lambda k: k[len(prefix):] if k.startswith(prefix) else k)
    report = {"operation": "strip-prefix", "prefix": prefix, "detected": detected, "renamed": len(changed),
              "unchanged": len(keys) - len(changed), "wrapper_untouched": ck.wrapper_keys()}
    if inner:
        report["inner"] = inner
    others = _other_state_dicts_with(ck, prefix)
    if others:  # timm's state_dict_ema, an EMA callback's copy: one state dict is rewritten per run
        report["also_prefixed"] = others
        notes.append(_also_prefixed_note(others, prefix, ck))
    if notes:
        report["notes"] = notes
    return new, report


def _also_prefixed_note(others: list[str], prefix: str, ck: Checkpoint) -> str:
    from ckptsurgeon.locate import path_str

    return (f"{', '.join(others)} also carr{'ies' if len(others) == 1 else 'y'} {prefix!r} on every key, left as "
            f"{'it is' if len(others) == 1 else 'they are'} (to strip it too: "
            f"--key {path_str(ck.sd_path)} {' '.join('--key ' + o for o in others)})")


def _other_state_dicts_with(ck: Checkpoint, prefix: str) -> list[str]:
    """The wrapper's other state dicts (ck.candidates, as paths) whose every key starts with ``prefix``."""
    from collections.abc import Mapping

    from ckptsurgeon.locate import key_paths, path_str

    out = []
    for cand in ck.candidates:
        if cand in (path_str(ck.sd_path), "<bare>"):
            continue
        node, _ = next(key_paths(ck.wrapper, cand), (None, None))
        keys = [k for k in node if isinstance(k, str)] if isinstance(node, Mapping) else []
        if keys and all(k.startswith(prefix) for k in keys):
            out.append(cand)
    return out


def add_prefix(ck: Checkpoint, prefix: str) -> tuple[Checkpoint, dict]:
    """Put ``prefix`` in front of every state-dict key (``module.`` to load into DataParallel).

    Example::

        new, report = add_prefix(load("model.pt"), "module.")
    """
    if not prefix:
        raise SelectionError("an empty prefix changes nothing", hint="e.g. --prefix module.")
    notes = []
    if not prefix.endswith("."):
        prefix += "."
        notes.append(f"prefix normalised to {prefix!r}")
    keys = [k for k in ck.state if isinstance(k, str)]
    if keys and all(k.startswith(prefix) for k in keys):  # twice DataParallel-wrapped is rarely what was meant
        notes.append(f"every key already started with {prefix!r}: they now start with {prefix + prefix!r}")
    new, changed = rename_keys(ck, lambda k: prefix + k)
    return new, {"operation": "add-prefix", "prefix": prefix, "renamed": len(changed), "notes": notes}


def _human(report: dict) -> None:
    op = report["operation"]
    if op == "strip-prefix":
        how = "detected" if report["detected"] else "given"
        if report["prefix"]:
            click.echo(f"stripped {how} prefix {report['prefix']!r} from {count(report['renamed'], 'key')}"
                       + (f" ({count(report['unchanged'], 'key')} without it kept)" if report["unchanged"] else ""))
        if report.get("inner"):
            parts = ", ".join(f"{p!r} ({count(n, 'key')})" for p, n in sorted(report["inner"].items()))
            click.echo(f"dropped inner wrapper component{'s' if len(report['inner']) > 1 else ''} {parts}: submodules wrapped on their own "
                       "(torch.compile per block, FSDP/activation-checkpoint wrappers)")
    else:
        click.echo(f"added prefix {report['prefix']!r} to {count(report['renamed'], 'key')}")
    cliutil.echo_notes(report.get("notes"))
    if "save" in report:  # (one state dict of several: what was written comes once, after them all)
        cliutil.echo_save(report["save"])


@click.command("strip-prefix")
@click.argument("path")
@click.option("--prefix", default=None, help="Prefix to strip (default: detect module./_orig_mod./model. stacks).")
@click.option("--partial", is_flag=True, help="Strip from the keys that carry it, keep the others.")
@cliutil.load_each_options
@cliutil.write_options
@cliutil.json_option
def strip_cmd(path, prefix, partial, keys, trust_pickle, as_json, **write):
    """Strip a wrapper prefix (module., _orig_mod., model.) from every key.

    \b
    Examples:
      ckpt-surgeon strip-prefix model_dp.pt -o model.pt
      ckpt-surgeon strip-prefix model.ckpt -o model.safetensors --prefix model.
      ckpt-surgeon strip-prefix gan.pt --key G --key D -o gan_plain.pt
    """
    def op(ck):
        new, rep = strip_prefix(ck, prefix, partial=partial)
        if len(keys) > 1 and rep.get("also_prefixed"):  # no note on what a later --key strips
            rep["notes"].remove(_also_prefixed_note(rep["also_prefixed"], rep["prefix"], ck))
            left = [o for o in rep["also_prefixed"] if o not in keys]
            if left:
                rep["notes"].append(_also_prefixed_note(left, rep["prefix"], ck))
            if not rep["notes"]:
                del rep["notes"]
        return new, rep

    new, report = cliutil.on_each_state_dict(path, keys, trust_pickle, op, write=write)
    report["save"] = cliutil.save(new, **write)
    cliutil.emit_each(report, as_json, _human)


@click.command("add-prefix")
@click.argument("path")
@click.option("--prefix", required=True, help="Prefix to add, e.g. module.")
@cliutil.load_each_options
@cliutil.write_options
@cliutil.json_option
def add_cmd(path, prefix, keys, trust_pickle, as_json, **write):
    """Add a prefix to every key (e.g. module. for DataParallel).

    \b
    Example:
      ckpt-surgeon add-prefix model.pt -o model_dp.pt --prefix module.
    """
    new, report = cliutil.on_each_state_dict(path, keys, trust_pickle, lambda ck: add_prefix(ck, prefix),
                                             write=write)
    report["save"] = cliutil.save(new, **write)
    cliutil.emit_each(report, as_json, _human)


@hookimpl
def ckptsurgeon_commands():
    return [strip_cmd, add_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("strip_prefix", strip_prefix, "remove a wrapper prefix from keys"),
            Operation("add_prefix", add_prefix, "add a prefix to every key")]
