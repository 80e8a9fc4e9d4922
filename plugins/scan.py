"""scan: list the globals a checkpoint's pickles would import, without executing anything."""

from __future__ import annotations

import os

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.dtypes import count
from ckptsurgeon.errors import EXIT_ERROR, EXIT_FINDING, CkptSurgeonError, InputNotFoundError, NotACheckpointError
from ckptsurgeon.types import Operation


#: in a folder, files that are not checkpoints by their name (configs, tokenizers, docs,
#: scripts): not read. Files named like checkpoints always are; any other file is read when its
#: first bytes are a zip, a pickle (protocol 2+), a tar or a safetensors header -- so a LICENSE or
#: DeepSpeed's 'latest' is passed over, and a pickle renamed to hide is not.
NOT_CHECKPOINTS = (".json", ".md", ".txt", ".py", ".yaml", ".yml", ".model", ".tiktoken", ".gitattributes",
                   ".gitignore", ".png", ".jpg")
CHECKPOINT_NAMES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".safetensors", ".nemo", ".tar", ".joblib")


def _looks_like_checkpoint(path: str) -> bool:
    name = os.path.basename(path).lower()
    if name.endswith(NOT_CHECKPOINTS):
        return False
    if name.endswith(CHECKPOINT_NAMES):
        return True
    from ckptsurgeon.formats.safetensors import sniff as st_sniff

    try:
        with open(path, "rb") as f:
            head = f.read(263)
    except OSError:
        return True  # unreadable: let the scan say so
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or head[257:262] == b"ustar" or st_sniff(path, head[:16])


def _targets(path: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """What to scan under ``path``: ("file", f, ""), ("dcp", folder, "") and ("unreadable",
    folder, why) items, and notes. A folder is walked whole (a diffusers pipeline's components, Llama's
    original/ weights, every DeepSpeed tag), hidden folders aside; a Hugging Face cache repo
    folder stands for its snapshot; a sub-folder that cannot be listed is an error, not a gap."""
    from ckptsurgeon.formats import dcp
    from ckptsurgeon.formats.hf import hub_snapshot

    if not os.path.isdir(path):
        return [("dcp", os.path.dirname(path) or ".", "") if dcp.sniff(path, b"") else ("file", path, "")], []
    notes = []
    hub = hub_snapshot(path)
    if hub is not None:
        path = hub[0]
        notes.append(hub[1].replace(": read snapshot", ": scanned snapshot"))
    out = []

    def unreadable(e: OSError) -> None:  # a folder os.walk cannot list: an error, not silently skipped
        out.append(("unreadable", e.filename, e.strerror or str(e)))

    for folder, dirs, files in os.walk(path, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if dcp.sniff(folder, b""):  # its .distcp files are many archives end to end: read through the metadata
            out.append(("dcp", folder, ""))
            continue
        out += [("file", os.path.join(folder, f), "") for f in sorted(files)
                if os.path.isfile(os.path.join(folder, f)) and _looks_like_checkpoint(os.path.join(folder, f))]
    return out, notes


def _only_named(path: str, unsafe: list[str]) -> bool:
    """Whether the unsafe globals of a torch file are only named, never built (a class as a dict
    key or a value: old Lightning callback states, act=nn.ReLU), so that ckpt-surgeon reads the
    file by default (see pickle_io.load_refs_naming); torch.load(weights_only=True) refuses it."""
    from ckptsurgeon.errors import AmbiguousStateDictError, NoStateDictError
    from ckptsurgeon.loading import load
    from ckptsurgeon.safety import only_nameable

    if not unsafe or not only_nameable(unsafe):
        return False
    try:  # the allowlist-only reader: nothing is imported or run
        load(path)
    except (AmbiguousStateDictError, NoStateDictError):
        return True  # read; it is the state dict that is not clear
    except CkptSurgeonError:
        return False
    return True


def _torchscript_read(path: str, entry: dict) -> bool:
    """Whether a torch zip is a TorchScript archive whose weights ckpt-surgeon reads by default:
    its outside-the-allowlist globals are the archive's own compiled classes (``__torch__.``),
    names with no Python module behind them, recorded inert (see formats.torchscript.load_torchscript)."""
    from ckptsurgeon.formats.torchscript import script_name
    from ckptsurgeon.loading import load

    if entry["format"] != "torch-zip" or not any(p.endswith("constants.pkl") for p in entry["pickles"]):
        return False
    if not all(script_name(n) for n in entry["unsafe"]):
        return False
    try:
        load(path)
    except CkptSurgeonError:
        return False
    return True


def _is_tar(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(263)
    return head[257:262] == b"ustar"


def scan(path: str) -> dict:
    """{'path', 'files': [{file, format, pickles: {name: [globals]}, unsafe: [...], only_named, torchscript,
    error}],
    'unsafe': [...], 'notes': [...]}.

    Every pickle inside a torch zip is read (a second ``.pkl`` record is a classic hiding
    place), a legacy file's leading pickles too; safetensors files hold no pickle and are only
    header-checked. A folder is walked whole (see :func:`_targets`); a Hub repo id that is not a
    path is looked up in the local huggingface_hub cache. A global counts as unsafe when it is outside torch's weights-only
    allowlist (plus globals registered with ``torch.serialization.add_safe_globals``).

    Example::

        rep = scan("download.bin"); rep["unsafe"]   # ['posix.system']
    """
    from ckptsurgeon.formats.hf import existing_or_cached
    from ckptsurgeon.safety import allowed_globals, pickle_globals
    from ckptsurgeon.stfmt import read_header

    path = existing_or_cached(os.fspath(path))  # (a Hub repo id downloaded before: its cache folder)
    allowed = allowed_globals()
    files, unsafe_all = [], []
    from ckptsurgeon.formats import dcp

    targets, notes = _targets(path)
    if not targets:
        raise NotACheckpointError(f"{path}: no checkpoint file in this folder or below it (nothing to scan)",
                                  hint="pass the folder or file that holds the weights")
    for kind, f, why in targets:
        if kind == "unreadable":
            files.append({"file": f, "format": None, "pickles": {}, "unsafe": [], "error": f"{f}: cannot be read ({why})"})
            continue
        if kind == "dcp":  # a torch.distributed.checkpoint folder (or its .metadata)
            found = dcp.scan_folder(f, allowed)
            files += found
            unsafe_all += [n for e in found for n in e["unsafe"] if n not in unsafe_all]
            continue
        entry = {"file": f, "format": None, "pickles": {}, "unsafe": [], "error": None, "only_named": False,
                 "torchscript": False}
        try:
            with open(f, "rb") as fh:
                head = fh.read(16)
            from ckptsurgeon.formats.safetensors import sniff as st_sniff

            if st_sniff(f, head):
                read_header(f)
                entry["format"] = "safetensors"
            elif f.endswith(".nemo") or _is_tar(f):
                from ckptsurgeon.formats.torchfile import tar_pickles

                entry["pickles"] = tar_pickles(f)
                entry["format"] = "tar"
            else:
                entry["pickles"] = pickle_globals(f)
                entry["format"] = "torch-zip" if head[:4] == b"PK\x03\x04" else "pickle"
                if entry["format"] == "torch-zip" and not any(p.endswith("/data.pkl") and "!" not in p
                                                              for p in entry["pickles"]):
                    entry["format"] = "zip"  # no torch.save pickle of its own: a torch.export archive, say
            for names in entry["pickles"].values():
                entry["unsafe"] += [n for n in dict.fromkeys(names) if n not in allowed and n not in entry["unsafe"]]
            entry["torchscript"] = _torchscript_read(f, entry)
            entry["only_named"] = not entry["torchscript"] and entry["format"] != "tar" and _only_named(f, entry["unsafe"])
            twice = sorted({k.split(" (copy ")[0] for k in entry["pickles"] if " (copy " in k})
            if twice:  # torch never writes a name twice, and readers differ on which copy they take
                entry["error"] = (f"{f}: the archive holds {', '.join(twice)} more than once (a loader may read "
                                  "another copy than a scanner): not a file torch.save wrote")
        except CkptSurgeonError as e:
            if not os.path.isdir(path):
                raise
            entry["error"] = e.one_line()
        except OSError as e:
            raise InputNotFoundError(f"{f}: cannot read ({e.strerror})") from None
        unsafe_all += [n for n in entry["unsafe"] if n not in unsafe_all]
        files.append(entry)
    return {"path": path, "files": files, "unsafe": unsafe_all, "notes": notes}


@click.command("scan")
@click.argument("paths", nargs=-1, required=True)
@cliutil.json_option
def scan_cmd(paths, as_json):
    """List the globals a pickle would import (nothing is executed); exit 1 if any is unsafe.

    \b
    Example:
      ckpt-surgeon scan downloaded.bin other.pt
    """
    reports = [scan(p) for p in paths]
    unsafe = any(r["unsafe"] for r in reports)
    errors = any(f["error"] for r in reports for f in r["files"])
    if as_json:
        cliutil.emit({"reports": reports, "unsafe": unsafe}, True)
    else:
        for r in reports:
            cliutil.echo_notes(r["notes"], out=lambda line: click.echo(f"ckpt-surgeon: {line}", err=True))
            for f in r["files"]:
                status = "ERROR " + f["error"] if f["error"] else ("UNSAFE" if f["unsafe"] else "ok")
                click.echo(f"{f['file']}: {status} ({f['format']})")
                for pkl, names in f["pickles"].items():
                    click.echo(f"  {pkl}: {count(len(names), 'global')}, {len(set(names))} distinct")
                for n in f["unsafe"]:
                    click.echo(f"  unsafe global: {n}")
                if f.get("torchscript"):
                    click.echo("  a TorchScript archive (torch.jit.save): these classes are its own compiled code, not "
                               "Python imports; ckpt-surgeon reads its weights by default, running nothing of it; "
                               "torch.load(weights_only=True) refuses it and torch.jit.load runs its code")
                if f.get("only_named"):
                    click.echo("  only named, never built (a class as a key or value): ckpt-surgeon reads this file "
                               "by default, importing nothing; torch.load(weights_only=True) refuses it")
    if errors:  # each named in the report above; the error itself, one line, where errors go
        bad = [f["file"] for r in reports for f in r["files"] if f["error"]]
        click.echo(f"ckpt-surgeon: error: errors in {count(len(bad), 'file')} (see the report): {', '.join(bad[:3])}"
                   + (" ..." if len(bad) > 3 else ""), err=True)
    if unsafe:  # the finding decides the exit code: an unsafe global found is what a caller must see
        click.get_current_context().exit(EXIT_FINDING)
    if errors:
        click.get_current_context().exit(EXIT_ERROR)


@hookimpl
def ckptsurgeon_commands():
    return [scan_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("scan", scan, "list the globals a pickle would import")]
