"""scan: list the globals a checkpoint's pickles would import, without executing anything."""

from __future__ import annotations

import os

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.errors import EXIT_ERROR, EXIT_FINDING, CkptSurgeonError, InputNotFoundError
from ckptsurgeon.types import Operation


#: in a folder, files that are not checkpoints (configs, tokenizers, docs, DeepSpeed's scripts
#: and its 'latest' tag name): not read. Anything else is.
NOT_CHECKPOINTS = (".json", ".md", ".txt", ".py", ".yaml", ".yml", ".model", ".tiktoken", ".gitattributes",
                   ".gitignore", ".png", ".jpg")


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        from ckptsurgeon.formats.deepspeed import tag_folder

        folder = tag_folder(path) or path  # a DeepSpeed folder: the tag its 'latest' names
        return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                      if os.path.isfile(os.path.join(folder, f)) and not f.lower().endswith(NOT_CHECKPOINTS)
                      and f != "latest")
    return [path]


def _is_tar(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(263)
    return head[257:262] == b"ustar"


def scan(path: str) -> dict:
    """{'path', 'files': [{file, format, pickles: {name: [globals]}, unsafe: [...]}], 'unsafe': [...]}.

    Every pickle inside a torch zip is read (a second ``.pkl`` record is a classic hiding
    place), a legacy file's leading pickles too; safetensors files hold no pickle and are only
    header-checked. A global counts as unsafe when it is outside torch's weights-only
    allowlist (plus globals registered with ``torch.serialization.add_safe_globals``).

    Example::

        rep = scan("download.bin"); rep["unsafe"]   # ['posix.system']
    """
    from ckptsurgeon.safety import allowed_globals, pickle_globals
    from ckptsurgeon.stfmt import read_header

    if not os.path.exists(path):
        raise InputNotFoundError(f"{path}: no such file or directory")
    allowed = allowed_globals()
    files, unsafe_all = [], []
    from ckptsurgeon.formats import dcp

    if dcp.sniff(path, b""):  # a torch.distributed.checkpoint folder (or its .metadata)
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        files = dcp.scan_folder(folder, allowed)
        unsafe_all = list(dict.fromkeys(n for f in files for n in f["unsafe"]))
        return {"path": path, "files": files, "unsafe": unsafe_all}
    for f in _files(path):
        entry = {"file": f, "format": None, "pickles": {}, "unsafe": [], "error": None}
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
            for names in entry["pickles"].values():
                entry["unsafe"] += [n for n in dict.fromkeys(names) if n not in allowed and n not in entry["unsafe"]]
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
    return {"path": path, "files": files, "unsafe": unsafe_all}


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
            for f in r["files"]:
                status = "ERROR " + f["error"] if f["error"] else ("UNSAFE" if f["unsafe"] else "ok")
                click.echo(f"{f['file']}: {status} ({f['format']})")
                for pkl, names in f["pickles"].items():
                    click.echo(f"  {pkl}: {len(names)} global(s), {len(set(names))} distinct")
                for n in f["unsafe"]:
                    click.echo(f"  unsafe global: {n}")
    if unsafe:
        click.get_current_context().exit(EXIT_FINDING)
    if errors:
        click.get_current_context().exit(EXIT_ERROR)


@hookimpl
def ckptsurgeon_commands():
    return [scan_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("scan", scan, "list the globals a pickle would import")]
