"""``save()``: Checkpoint -> file, format chosen by extension (or forced), always atomic."""

from __future__ import annotations

import os

from .atomic import check_output_path
from .checkpoint import Checkpoint
from .errors import OutputError, PluginError
from .keys import name_list
from .formats.hf_write import model_folder
from .manager import get_manager


def output_format(path: str, format: str | None = None, max_shard_size=None, from_model_folder: bool = False,
                  input_format: str | None = None) -> str:
    """The format an output path asks for: a folder (a path ending in a separator, an existing
    folder, --max-shard-size, or no extension at all when the input was a model folder, as
    save_pretrained writes one, or a sharded folder) is a Hugging Face folder; .safetensors; a plugin's extension;
    torch's extensions (.pt, .pth, .bin, .ckpt, .tar, .pkl) a torch zip. A path with no extension,
    or one no writer claims (``model.st``, ``weights.v2``), keeps ``input_format`` where it is a
    single-file format that can be written (a safetensors input stays safetensors); else a torch
    zip."""
    if format:
        return format
    ext = os.path.splitext(str(path))[1].lower()
    if os.path.isdir(path) and ext in (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors"):
        raise OutputError(f"output {path} is a directory", hint="name a file, or a folder for sharded output")
    if max_shard_size or str(path).endswith(os.sep) or os.path.isdir(path):
        return "hf-folder"
    if (from_model_folder or input_format == "hf-folder") and not ext and not os.path.exists(path):
        return "hf-folder"  # a sharded folder in, a folder out (`strip-prefix ckpt_dir -o ckpt_dir2`)
    formats = get_manager().formats()
    claimed = _claimed(ext, formats)
    if claimed:
        return claimed
    read_only = [name for name, (spec, _p) in formats.items() if ext and ext in spec.extensions]
    if read_only:  # (.pt2) a state dict written under that name would pass for what it is not
        raise OutputError(f"cannot write {read_only[0]} ({ext}): ckpt-surgeon reads that format only",
                          hint="write the weights as .pt or .safetensors (or choose with --format)")
    keep = formats.get(input_format) if input_format not in (None, "hf-folder") else None
    if keep is not None and keep[0].save is not None:
        return input_format
    return "torch-zip"


def _claimed(ext: str, formats) -> str | None:
    """The writable format an output extension names, if any."""
    if ext == ".safetensors":
        return "safetensors"
    for name, (spec, _p) in formats.items():  # a plugin's claim first: it may take .bin or .pt
        if spec.save is not None and ext in spec.extensions and name != "torch-zip":
            return name
    if ext and "torch-zip" in formats and ext in formats["torch-zip"][0].extensions:
        return "torch-zip"
    return None


def save(ck: Checkpoint, path, *, format: str | None = None, in_place: bool = False, dry_run: bool = False,
         max_shard_size=None, dedupe_tied: bool = False, state_dict_only: bool = False, progress=None) -> dict:
    """Write ``ck`` to ``path`` atomically and return a report (what was written, what was not).

    The format follows the extension (``.safetensors``; torch's own are a torch zip; none or an
    unknown one keeps a safetensors input's format, else a torch zip) unless ``format`` says otherwise; ``max_shard_size`` ('5GB') writes a Hugging Face sharded folder.
    The input file is never overwritten unless ``in_place=True``. ``state_dict_only`` writes the
    state dict alone, without the wrapper around it (a Lightning checkpoint's epoch, optimizer
    and loop states; a resume dict's other entries): what ``model.load_state_dict(torch.load(f))``
    expects.

    Example::

        save(load("model_dp.pt"), "model.safetensors")
    """
    path = os.fspath(path)
    if path == "-":  # a file named "-" is never what was meant
        raise OutputError("cannot write a checkpoint to standard output (it is written with seeks, then renamed)",
                          hint="name an output file, e.g. -o out.pt")
    dropped = []
    if state_dict_only and (ck.sd_path or ck.wrapper is not None):
        dropped = ck.wrapper_keys()
        ck = ck.replace(wrapper=None, sd_path=(), candidates=())
    fmt = output_format(path, format, max_shard_size, from_model_folder=model_folder(ck) is not None,
                        input_format=ck.source.format if ck.source else None)
    formats = get_manager().formats()
    if fmt not in formats or formats[fmt][0].save is None:
        writable = sorted(n for n, (s, _) in formats.items() if s.save is not None)
        raise PluginError(f"cannot write format {fmt!r}", hint=f"writable formats: {', '.join(writable)}")
    inputs = ck.source.files if ck.source else ()
    if fmt == "hf-folder":
        path = path.rstrip(os.sep) or path
        if os.path.isfile(path):
            raise OutputError(f"{path} is a file; a sharded checkpoint needs a directory")
        for inp in inputs:
            if os.path.dirname(os.path.abspath(inp)) == os.path.abspath(path) and not in_place:
                raise OutputError(f"refusing to write shards into the input's folder {path}", hint="choose another -o")
    else:
        check_output_path(path, inputs, in_place)
    options = {"dry_run": dry_run, "dedupe_tied": dedupe_tied, "progress": progress}
    if max_shard_size is not None:
        options["max_shard_size"] = max_shard_size
    report = formats[fmt][0].save(ck, path, **options)
    if dropped:
        report.setdefault("notes", []).insert(0, f"state dict only: the wrapper around it not written ({name_list(dropped)})")
    ext = os.path.splitext(path)[1]
    if not format and fmt != "hf-folder" and not _claimed(ext.lower(), formats):
        why = f"its extension {ext!r} names no format" if ext else "it has no extension"
        kept = ck.source is not None and fmt == ck.source.format
        report.setdefault("notes", []).append(
            f"written as {fmt}{' like the input' if kept else ''}: {why} (--format, or .pt / .safetensors, to choose)")
    named = _claimed(ext.lower(), formats) if format and fmt != "hf-folder" else None
    if named and named != fmt:  # torch.load itself reads any *.safetensors path as safetensors
        why = " (torch.load takes every *.safetensors path for safetensors)" if named == "safetensors" else ""
        report.setdefault("notes", []).append(
            f"written as {fmt} under a name that says {named} ({ext}): readers that go by the name{why} "
            f"will fail on it; rename it to match")
    return report
