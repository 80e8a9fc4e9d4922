"""``load()``: any checkpoint path -> :class:`Checkpoint`, through the format registry."""

from __future__ import annotations

import os

from .atomic import special_kind
from .checkpoint import Checkpoint
from .errors import (CkptSurgeonError, CorruptCheckpointError, InputNotFoundError, NotACheckpointError, PluginError,
                     UnsupportedError, missing_dependency)
from .gcpause import paused_gc
from .manager import get_manager


def load(path, *, key: str | None = None, trust_pickle: bool | str = False, format: str | None = None) -> Checkpoint:
    """Read a checkpoint to CPU, lazily where the format allows.

    ``path`` may be a torch file (zip or legacy), a safetensors file, a Hugging Face folder or its
    ``*.index.json``, a DCP, DeepSpeed or per-rank DTensor folder. ``key`` picks the state dict
    inside a wrapper ('state_dict', 'model/ema'; 'fp32': a DeepSpeed folder's fp32 master weights);
    ``trust_pickle=True`` allows globals outside torch's weights-only allowlist (executes code
    from the file: only for files you trust); ``trust_pickle="inert"`` records them as inert
    stand-ins instead (nothing imported or run; torch zip and legacy files, .nemo, DCP values).

    Example::

        ck = load("runs/epoch10.ckpt")          # Lightning: state dict found under 'state_dict'
        print(ck.sd_path, len(ck.state))
    """
    path = os.fspath(path)
    if not hasattr(os, "pread"):  # Windows: every reader and writer here uses positional I/O
        raise UnsupportedError("ckpt-surgeon reads and writes with positional file I/O (os.pread/os.pwrite), which "
                               "Python does not offer on this platform", hint="run it on Linux or macOS (or WSL)")
    if not os.path.exists(path):
        from .formats.hf import existing_or_cached

        path = existing_or_cached(path)  # a Hub repo id downloaded before: its cache folder
    if os.path.isdir(path):
        from .formats.hf import hub_snapshot

        hub = hub_snapshot(path)
        if hub is not None:  # ~/.cache/huggingface/hub/models--org--name: the snapshot it stands for
            ck = load(hub[0], key=key, trust_pickle=trust_pickle, format=format)
            return ck.replace(notes=(hub[1],) + tuple(ck.notes))
    if os.path.isdir(path) or path.endswith(".index.json"):
        spec = _pick(path, b"", format)
        return _run_load(spec, path, key=key, trust_pickle=trust_pickle)
    ck = load_file(path, key=key, trust_pickle=trust_pickle, format=format)
    from .formats.hf import shard_position

    shard = shard_position(path)
    if shard and shard[1] > 1:  # a surgery on it writes that part only: say so, once
        ck = ck.replace(notes=ck.notes + (
            f"this is shard {shard[0]} of {shard[1]} of a sharded model: only its tensors were read "
            f"(pass the folder, {os.path.dirname(os.path.abspath(path))}, for the whole model)",))
    return ck


def load_file(path: str, *, key=None, trust_pickle=False, format=None) -> Checkpoint:
    kind = special_kind(path)
    if kind and kind != "a block device":  # a pipe cannot be read in place (seeks, mmap)
        raise NotACheckpointError(f"{path} is {kind}, not a file: checkpoints are read in place",
                                  hint="save the stream to a file first")
    try:
        with open(path, "rb") as f:
            head = f.read(512)  # formats sniff the first 64 bytes; a tar header needs 262
    except IsADirectoryError:
        raise InputNotFoundError(f"{path} is a directory, a file was expected") from None
    except PermissionError:
        raise InputNotFoundError(f"{path}: permission denied") from None
    except OSError as e:
        raise InputNotFoundError(f"{path}: cannot read ({e.strerror})") from None
    if not head:
        raise NotACheckpointError(f"{path} is empty")
    spec = _pick(path, head[:64], format, describe_head=head)
    return _run_load(spec, path, key=key, trust_pickle=trust_pickle)


def _run_load(spec, path, **options) -> Checkpoint:
    try:
        with paused_gc():  # a few objects per tensor, no cycles: see gcpause
            return spec.load(path, **options)
    except CorruptCheckpointError as e:
        if str(path) not in e.message:  # a reader's own words ("the pickle is malformed"): say which file
            e.message = f"{path}: {e.message}"
            e.args = (e.message,)
        raise
    except CkptSurgeonError:
        raise
    except (MemoryError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path}: too large or too deeply nested to read ({type(e).__name__})") from e
    except Exception as e:  # a format reader tripping over a damaged file
        if missing_dependency(e):  # not the file's fault: an install without torch (the CLI says so)
            raise
        raise CorruptCheckpointError(f"{path}: cannot be read as {spec.name}: {type(e).__name__}: {e}") from e


_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"),
               (b"\x04\x22\x4d\x18", "lz4"), (b"7z\xbc\xaf\x27\x1c", "7-Zip"))


def _pick(path: str, head: bytes, format: str | None, describe_head: bytes | None = None):
    formats = get_manager().formats()
    if format:
        if format not in formats:
            raise PluginError(f"unknown format {format!r}", hint=f"known: {', '.join(sorted(formats))}")
        spec = formats[format][0]
        if spec.load is None:
            raise PluginError(f"format {format!r} cannot be read")
        return spec
    claims = []
    for spec, _plugin in formats.values():
        if spec.load is None or spec.sniff is None:
            continue
        try:
            if spec.sniff(path, head):
                claims.append(spec)
        except Exception:
            continue
    if not claims:
        raise NotACheckpointError(f"{path} is not a checkpoint ({describe(describe_head or head, path)})",
                                  hint="expected a torch file, safetensors or a Hugging Face folder")
    claims.sort(key=lambda s: -s.priority)  # stable: registration order breaks ties
    return claims[0]


_OTHER_FORMATS = {  # by extension, for files whose bytes say little
    ".onnx": "an ONNX model", ".msgpack": "Flax weights (msgpack)", ".tflite": "a TensorFlow Lite model",
    ".keras": "a Keras model", ".npz": "a numpy .npz archive", ".mlmodel": "a Core ML model",
}


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def describe(head: bytes, path: str = "") -> str:
    import re

    from . import dtypes

    ext = os.path.splitext(path)[1].lower()
    if ext in _OTHER_FORMATS:
        return f"by its name, {_OTHER_FORMATS[ext]}, not a PyTorch checkpoint"
    from .formats.hf import TF_CHECKPOINT_DATA

    name = os.path.basename(path)
    if (name.endswith(".index") or TF_CHECKPOINT_DATA.search(name)) and \
            any(TF_CHECKPOINT_DATA.search(f) for f in _listdir(os.path.dirname(path) or ".")):
        return ("by its name, part of a TensorFlow checkpoint (.index + .data-NNNNN-of-NNNNN), not a PyTorch one: "
                "load it in TensorFlow, or with transformers' from_pretrained(..., from_tf=True), and save it "
                "with PyTorch")
    if head.startswith(b"\x93NUMPY"):
        return "it is a numpy .npy array"
    if head.startswith(b"\x89PNG"):
        return "it is a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "it is a JPEG image"
    for magic, what in _COMPRESSED:
        if head.startswith(magic):
            return f"it is {what}-compressed: decompress it first"
    if head.startswith(b"PK"):
        return "it is a zip archive of another kind"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "it is an HDF5 file, as Keras and TensorFlow save"
    if head.startswith(b"GGUF"):
        return "it is a GGUF file, as llama.cpp saves"
    if head.startswith(b"version https://git-lfs"):  # a clone without `git lfs`: the pointer, not the file
        size = re.search(rb"\nsize (\d+)", head)
        of = f" to a {dtypes.human_bytes(int(size.group(1)))} file" if size else ""
        return f"it is a Git LFS pointer{of}, not the file: run `git lfs pull` in the clone, or download the file"
    if re.match(rb"\s*<(!doctype html|html|head|body)\b", head[:512], re.I):
        return "it is an HTML page, not weights: the download saved a web page (an error or login page?)"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "it is a tar archive; a .nemo file? extract it and pass the checkpoint inside"
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c.isspace() for c in text):
            return "it looks like a text file"
    except UnicodeDecodeError:
        pass
    return "unrecognised bytes at the start"
