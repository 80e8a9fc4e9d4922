"""Pieces every CLI command shares: options, loading/saving with progress, printing reports.

Plugins use these so that every command has the same conventions (``-o``, ``--dry-run``,
``--json``, ``--key``, ``--trust-pickle``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Callable

import click

from .dtypes import count, human_bytes


def state(ctx: click.Context | None = None) -> dict:
    ctx = ctx or click.get_current_context()
    root = ctx.find_root()
    root.ensure_object(dict)
    return root.obj


def pickle_options(f: Callable) -> Callable:
    """--trust-pickle / --inert-pickle, both setting ``trust_pickle`` (False, True or "inert")."""
    f = click.option("--inert-pickle", "trust_pickle", flag_value="inert", type=click.UNPROCESSED,
                     help="Read pickle globals outside the allowlist as inert records: nothing imported or run, "
                          "carried unchanged into torch-format outputs.")(f)
    f = click.option("--trust-pickle", "trust_pickle", flag_value=True, default=False, type=click.UNPROCESSED,
                     help="Allow pickle globals outside torch's weights-only allowlist (runs code from the file).")(f)
    return f


def load_options(f: Callable) -> Callable:
    f = click.option("--key", default=None, metavar="PATH",
                     help="Where the state dict sits in a wrapper (e.g. state_dict, model/ema; "
                          "fp32: a DeepSpeed folder's fp32 master weights).")(f)
    return pickle_options(f)


def load_each_options(f: Callable) -> Callable:
    """load_options for a command that may change several state dicts of one wrapper: --key repeats."""
    f = click.option("--key", "keys", multiple=True, metavar="PATH",
                     help="Where the state dict sits in a wrapper (e.g. state_dict, model/ema); repeat it to "
                          "change several in turn (--key G --key D).")(f)
    return pickle_options(f)


def on_each_state_dict(path: str, keys, trust_pickle, op: Callable, write: dict | None = None) -> tuple[Any, dict]:
    """Load ``path`` and apply ``op(ck) -> (ck, report)`` to the state dict at each of ``keys`` in
    turn (none given: to the one the loader finds). One key: ``op``'s own report; several:
    ``{"operation": ..., "state_dicts": {key: report}}``. ``write`` (the command's write options):
    several state dicts are refused up front where the output could hold only one of them."""
    from .errors import SelectionError

    keys = tuple(keys or ())
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise SelectionError(f"--key {twice[0]} is given twice", hint="give each state dict's --key once")
    ck = load(path, keys[0] if keys else None, trust_pickle)
    if len(keys) <= 1:
        return op(ck)
    if write:
        _one_file_for_several(ck, write)
    ck, reports = ck.each(keys, op)
    for rep in reports.values():  # the other state dicts given are changed too, not "kept as they are"
        if isinstance(rep.get("wrapper_untouched"), list):
            rep["wrapper_untouched"] = [w for w in rep["wrapper_untouched"] if w not in keys]
    return ck, {"operation": next(iter(reports.values()))["operation"], "state_dicts": reports}


def unmatched_in_every(report: dict, field: str) -> list:
    """For a report of several state dicts (see on_each_state_dict): the patterns that each
    sub-report lists under ``field`` as having matched nothing -- unmatched only when they match
    in none of them. Empty for a report of one state dict (its own check applies)."""
    subs = list(report.get("state_dicts", {}).values())
    if not subs:
        return []
    return [p for p in subs[0][field] if all(p in r[field] for r in subs[1:])]


def _written_format(write: dict, ck=None) -> str | None:
    """The format write_options' output asks for (None without -o)."""
    from .saving import output_format

    if not write.get("output"):
        return None
    source = getattr(ck, "source", None)
    return output_format(write["output"], write.get("out_format"), write.get("max_shard_size"),
                         input_format=source.format if source else None)


def keeps_wrapper(write: dict, ck=None) -> bool:
    """Whether the output write_options describe keeps the whole wrapper, every state dict in it:
    a torch file without --state-dict-only (not a safetensors file or a Hugging Face folder)."""
    return not write.get("state_dict_only") and _written_format(write, ck) == "torch-zip"


def _one_file_for_several(ck, write: dict) -> None:
    """Several changed state dicts go out in their wrapper, in a torch file: --state-dict-only, a
    safetensors file or a Hugging Face folder would keep the last one alone."""
    from .errors import SelectionError

    if write.get("state_dict_only"):
        raise SelectionError("--state-dict-only writes one state dict, and several --key were given",
                             hint="give one --key with --state-dict-only, or leave it out to keep the wrapper")
    fmt = _written_format(write, ck)
    if fmt not in (None, "torch-zip"):
        raise SelectionError(f"a {fmt} output holds one state dict, and several --key were given",
                             hint="write a torch file (.pt) to keep them all in their wrapper, or give one --key")


def emit_each(report: dict, as_json: bool, human: Callable[[dict], None]) -> None:
    """emit() for on_each_state_dict's report: one block per state dict, then what was written."""
    if as_json or "state_dicts" not in report:
        return emit(report, as_json, human)
    for key, sub in report["state_dicts"].items():
        click.echo(f"[{key}]")
        human(sub)
    echo_save(report["save"])


def write_options(f: Callable) -> Callable:
    f = click.option("--state-dict-only", is_flag=True,
                     help="Write the state dict alone, without its wrapper (epoch, optimizer, Lightning "
                          "loops...): what model.load_state_dict(torch.load(f)) expects.")(f)
    f = click.option("--dedupe-tied", is_flag=True,
                     help="safetensors: keep one copy of tied tensors instead of writing each name.")(f)
    f = click.option("--max-shard-size", default=None, metavar="SIZE",
                     help="Write a Hugging Face sharded folder with shards of at most SIZE (e.g. 5GB).")(f)
    f = click.option("--in-place", is_flag=True, help="Allow -o to be the input file (replaced atomically).")(f)
    f = click.option("--dry-run", is_flag=True, help="Report what would be written; write nothing.")(f)
    f = click.option("--format", "out_format", default=None, metavar="NAME",
                     help="Output format (torch-zip, safetensors, hf-folder); default: by extension.")(f)
    f = click.option("-o", "--output", default=None, metavar="PATH",
                     help="Output file (.pt/.pth/.bin/.ckpt: torch; .safetensors; a folder with --max-shard-size).")(f)
    return f


class FloatDtype(click.Choice):
    """One of PLAIN_FLOATS, also as people type it: bf16, fp16, half, torch.float32, FLOAT32."""

    def __init__(self):
        from .dtypes import PLAIN_FLOATS

        super().__init__(PLAIN_FLOATS)

    def convert(self, value, param, ctx):
        from .dtypes import plain_float

        return super().convert(plain_float(value), param, ctx)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")(f)


def model_options(f: Callable) -> Callable:
    f = click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                     help="Argument for the model factory (repeatable; values parsed as Python literals).")(f)
    f = click.option("--model", "model_spec", default=None, metavar="MODULE:CALLABLE",
                     help="Model factory: package.module:callable or path/to/file.py:callable.")(f)
    return f


def load(path: str, key=None, trust_pickle=False):
    """Load for a command; the loader's notes (legacy format, torch.load fallback) go to stderr."""
    from .loading import load as _load

    ck = _load(path, key=key, trust_pickle=trust_pickle)
    if not state().get("quiet", False):
        said = state().setdefault("notes_said", set())
        for note in ck.notes:
            # a command reading two files (diff, verify, average) says which one; each line once
            line = note if str(path) in note else f"{path}: {note}"
            if line not in said:
                said.add(line)
                click.echo(f"ckpt-surgeon: note: {line}", err=True)
    return ck


@contextlib.contextmanager
def progress_bar(total: int, description: str):
    """A rich progress bar on stderr for byte counts; silent with --quiet or when not a tty."""
    quiet = state().get("quiet", False)
    if quiet or total < (256 << 20) or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from rich.console import Console

    from .safeout import raw

    # the bar moves the cursor: it writes to the stream beneath safeout's escaping
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=Console(file=raw(sys.stderr)), transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n: prog.advance(task, n)


def save(ck, output: str | None, *, out_format=None, dry_run=False, in_place=False, max_shard_size=None,
         dedupe_tied=False, state_dict_only=False) -> dict:
    from .errors import OutputError
    from .saving import save as _save

    if not output:
        if not dry_run:
            raise OutputError("no output given", hint="add -o OUTPUT (or --dry-run)")
        # a dry run without -o still reports what a torch file would hold
        rep = _save(ck, os.path.join(os.getcwd(), "dry-run.pt"), format=out_format, dry_run=True,
                    max_shard_size=max_shard_size, dedupe_tied=dedupe_tied, state_dict_only=state_dict_only)
        rep.update(output=None, dry_run=True)
        return rep
    total = ck.summary()["bytes"]
    with progress_bar(total, f"writing {output}") as cb:
        rep = _save(ck, output, format=out_format, in_place=in_place, dry_run=dry_run,
                    max_shard_size=max_shard_size, dedupe_tied=dedupe_tied, state_dict_only=state_dict_only,
                    progress=cb)
    rep["dry_run"] = dry_run
    return rep


def emit(report: dict, as_json: bool, human: Callable[[dict], None] | None = None) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, default=_json_default))
    elif human is not None:
        human(report)
    else:
        click.echo(json.dumps(report, indent=2, default=_json_default))


def _json_default(o: Any):
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    return str(o)


def console():
    """The console the human-readable reports print on. Written to a file or a pipe (``> diff.txt``,
    ``| less``) it is as wide as a table needs instead of rich's 80 columns, which cut tensor names
    to ``transformer.h.0.ln…``; ``COLUMNS`` still sets the width where given."""
    from rich.console import Console

    width = None
    if not os.environ.get("COLUMNS") and not sys.stdout.isatty():
        width = 400
    # no markup (a tensor named 'a[/]b' is text) and no colours (stdout escapes control characters:
    # see safeout)
    return Console(highlight=False, soft_wrap=True, width=width, markup=False, color_system=None)


def echo_notes(notes, out: Callable | None = None, indent: str = "") -> None:
    """A report's notes, one line each, unless --quiet (the --json report keeps them)."""
    if state().get("quiet", False):
        return
    for n in notes or ():
        (out or click.echo)(f"{indent}note: {n}")


def echo_save(rep: dict) -> None:
    if rep.get("output") is None:
        if rep.get("dry_run"):
            click.echo(f"dry run: would write {count(rep.get('tensors', 0), 'tensor')} ({human_bytes(rep.get('bytes', 0))}); "
                       "no -o given")
        return
    verb = "would write" if rep.get("dry_run") else "wrote"
    click.echo(f"{verb} {rep['output']} ({rep.get('format')}, {count(rep.get('tensors', 0), 'tensor')}, "
               f"{human_bytes(rep.get('bytes', 0))})")
    echo_notes(rep.get("notes"), indent="  ")


def parse_model_args(items) -> dict:
    import ast

    from .errors import SelectionError

    out = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SelectionError(f"--model-arg {item!r} is not KEY=VALUE")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out
