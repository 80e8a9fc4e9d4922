"""rename: ordered regex rules over state-dict keys, with an undo map in the report."""

from __future__ import annotations

import json
import os
import re

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.dtypes import count
from ckptsurgeon.errors import SelectionError
from ckptsurgeon.safeout import one_line
from ckptsurgeon.transform import rename_keys
from ckptsurgeon.types import Operation


def parse_rule(text: str) -> tuple[str, str]:
    """'PATTERN=>REPLACEMENT' (Python re syntax, \\1 for groups)."""
    pattern, sep, repl = text.partition("=>")
    if not sep or not pattern:
        raise SelectionError(f"rename rule {text!r} is not PATTERN=>REPLACEMENT")
    return pattern, repl


def load_rules(path: str) -> list[tuple[str, str]]:
    """Rules from .json/.yaml/.toml: {pattern: replacement}, [[pattern, replacement], ...]
    or {"rules": [...]}; order is kept."""
    if not os.path.isfile(path):
        raise SelectionError(f"map file {path} " + ("is not a file" if os.path.exists(path) else "does not exist"))
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise SelectionError("YAML map files need PyYAML", hint="pip install pyyaml, or use .json/.toml") from None
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        elif ext == ".toml":
            try:
                import tomllib
            except ImportError:  # Python < 3.11
                import tomli as tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except SelectionError:
        raise
    except Exception as e:
        raise SelectionError(f"cannot read map file {path}: {e}") from None
    if isinstance(data, dict) and "rules" in data:
        data = data["rules"]
    if isinstance(data, dict):
        return [(str(k), str(v)) for k, v in data.items()]
    if isinstance(data, list):
        rules = []
        for item in data:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                rules.append((str(item[0]), str(item[1])))
            elif isinstance(item, dict) and "pattern" in item:
                rules.append((str(item["pattern"]), str(item.get("replacement", item.get("repl", "")))))
            else:
                raise SelectionError(f"map file {path}: cannot read rule {item!r}")
        return rules
    raise SelectionError(f"map file {path}: expected a mapping or a list of rules")


def rename(ck: Checkpoint, rules, *, allow_unmatched: bool = False) -> tuple[Checkpoint, dict]:
    """Apply regex rules in order to every key (each rule sees the result of the previous).

    A rule that matches no key is an error (a typo must not pass silently) unless
    ``allow_unmatched``; collisions are errors. The report's ``inverse`` undoes the rename.

    Example::

        new, rep = rename(ck, [(r"^backbone\\.(.*)", r"encoder.\\1"), (r"fc\\.", "head.")])
    """
    compiled = []
    for pattern, repl in rules:
        try:
            compiled.append((pattern, re.compile(pattern), repl))
        except re.error as e:
            raise SelectionError(f"invalid pattern {pattern!r}: {e}") from None
    if not compiled:
        raise SelectionError("no rename rules given", hint="--map 'PATTERN=>REPLACEMENT' or --map-file")
    hits = {p: 0 for p, _, _ in compiled}
    inside: dict[str, list] = {p: [] for p, _, _ in compiled if _LITERAL.match(p)}  # module-path-like rules

    def apply(key: str, count: bool = True) -> str:
        for pattern, rx, repl in compiled:
            try:
                new, n = rx.subn(repl, key)
            except (re.error, IndexError) as e:
                raise SelectionError(f"replacement {repl!r} for {pattern!r} is invalid: {e}") from None
            if n and count:
                hits[pattern] += 1
                if pattern in inside and len(inside[pattern]) < 3 and _mid_component(rx.search(key), key):
                    inside[pattern].append(f"{key} -> {new}")
            key = new
        return key

    mapping = {k: apply(k) for k in ck.state}
    unmatched = [p for p, n in hits.items() if n == 0]
    if unmatched and not allow_unmatched:
        raise SelectionError(f"rename rule{'s' if len(unmatched) > 1 else ''} matched no key: {', '.join(map(repr, unmatched))}",
                             hint="check the pattern, or pass --allow-unmatched")
    new, changed = rename_keys(ck, lambda k: mapping[k] if k in mapping else apply(k, count=False))
    report = {
        "operation": "rename",
        "rules": [{"pattern": p, "replacement": r, "matched": hits[p]} for p, _, r in compiled],
        "unmatched_rules": unmatched,
        "renamed": len(changed),
        "mapping": dict(changed),
        "inverse": [["^" + re.escape(n) + "$", o.replace("\\", "\\\\")] for o, n in changed.items()],
    }
    notes = [f"rule {p!r} also matched inside a name component ({'; '.join(ex)}); to match whole components "
             f"only: '{_whole_components(p)}'" for p, ex in inside.items() if ex]
    if notes:
        report["notes"] = notes
    return new, report


#: a rule written like a module path or name ('layer.1', 'fc\\.', 'backbone.0'): no regex syntax
#: beyond dots, so 'layer.1' renaming 'layer.10.weight' too is worth a note
_LITERAL = re.compile(r"^(?:[\w-]|\\?\.)+$")


def _mid_component(m, key: str) -> bool:
    """Whether a match starts or ends inside a dot-separated component of ``key``."""
    if m is None or m.start() == m.end():
        return False
    text = m.group(0)
    starts_inside = m.start() > 0 and key[m.start() - 1] != "." and not text.startswith(".")
    ends_inside = m.end() < len(key) and key[m.end()] != "." and not text.endswith(".")
    return starts_inside or ends_inside


def _whole_components(pattern: str) -> str:
    """A module-path-like rule that matches only at component boundaries (dots as dots)."""
    text = re.sub(r"(?<!\\)\.", r"\\.", pattern)
    head = "" if text.startswith("\\.") else "(?<![^.])"
    tail = "" if text.endswith("\\.") else "(?![^.])"
    return head + text + tail


LIST_MAX = 40  # renames printed in full by a real run; above this, the first half of it


def _human(report: dict) -> None:
    for r in report["rules"]:
        click.echo(f"rule {r['pattern']!r} => {r['replacement']!r}: {count(r['matched'], 'key')}")
    mapping = list(report["mapping"].items())
    # a review (--dry-run) lists every rename; a real run on a large model shows a sample
    dry_run = report["save"].get("dry_run") if "save" in report else report.get("dry_run")
    shown = mapping if dry_run or len(mapping) <= LIST_MAX else mapping[:LIST_MAX // 2]
    for old, new in shown:
        click.echo(f"  {one_line(old)} -> {one_line(new)}")
    if len(shown) < len(mapping):
        click.echo(f"  ... and {len(mapping) - len(shown)} more (every rename: --dry-run, or --json)")
    click.echo(f"{count(report['renamed'], 'key')} renamed")
    cliutil.echo_notes(report.get("notes"))
    if "save" in report:  # (one state dict of several: what was written comes once, after them all)
        cliutil.echo_save(report["save"])


@click.command("rename")
@click.argument("path")
@click.option("--map", "maps", multiple=True, metavar="'PATTERN=>REPL'", help="Regex rule (repeatable, applied in order).")
@click.option("--map-file", default=None, help="Rules from a .json, .yaml or .toml file.")
@click.option("--allow-unmatched", is_flag=True, help="A rule that matches nothing is a note, not an error.")
@click.option("--save-inverse", default=None, metavar="FILE", help="Write the undo rules as JSON (usable with --map-file).")
@cliutil.load_each_options
@cliutil.write_options
@cliutil.json_option
def rename_cmd(path, maps, map_file, allow_unmatched, save_inverse, keys, trust_pickle, as_json, **write):
    """Rename keys with ordered regex rules.

    \b
    Examples:
      ckpt-surgeon rename in.pt -o out.pt --map '^backbone\\.(.*)=>encoder.\\1' --map 'fc\\.=>head.'
      ckpt-surgeon rename in.pt -o out.pt --map-file renames.json
      ckpt-surgeon rename in.pt --map 'old=>new' --dry-run
    """
    rules = [parse_rule(m) for m in maps]
    if map_file:
        rules += load_rules(map_file)
    several = len(keys) > 1
    if several and save_inverse:
        raise SelectionError("--save-inverse undoes the renames of one state dict", hint="give one --key with it")
    new, report = cliutil.on_each_state_dict(
        path, keys, trust_pickle, lambda ck: rename(ck, rules, allow_unmatched=allow_unmatched or several),
        write=write)
    unmatched = cliutil.unmatched_in_every(report, "unmatched_rules")
    if unmatched and not allow_unmatched:
        raise SelectionError(f"rename rule{'s' if len(unmatched) > 1 else ''} matched no key in "
                             f"{', '.join(keys)}: {', '.join(map(repr, unmatched))}",
                             hint="check the pattern, or pass --allow-unmatched")
    for r in report.get("state_dicts", {}).values():
        r["dry_run"] = write["dry_run"]
    report["save"] = cliutil.save(new, **write)
    if save_inverse and not write["dry_run"]:
        from ckptsurgeon.atomic import atomic_output

        with atomic_output(save_inverse) as fd:
            os.write(fd, json.dumps({"rules": report["inverse"]}, indent=1).encode())
    cliutil.emit_each(report, as_json, _human)


@hookimpl
def ckptsurgeon_commands():
    return [rename_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("rename", rename, "rename keys with ordered regex rules")]
