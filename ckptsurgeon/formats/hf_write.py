"""Writing Hugging Face folders: safetensors shards of at most ``--max-shard-size`` and their
index JSON, streamed one shard at a time (``diffusion_pytorch_model.*`` for a diffusers model),
with the source folder's config, tokenizer and code files beside them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from ..atomic import _fsync_dir, atomic_output, fsync_wanted
from ..checkpoint import Checkpoint
from ..dtypes import PLAIN_FLOATS
from ..errors import OutputError
from ..keys import name_list
from . import safetensors as st
from .hf import DIFFUSERS_STEM, is_diffusers_config, read_config, training_state_files


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.I)


def parse_size(text) -> int:
    """Bytes of a size like 5GB (10^9), 2GiB (2^30), 500MB or a plain number; at least 1."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise OutputError(f"cannot read the size {text!r}", hint="use e.g. 5GB, 500MB or 2GiB")
        num, unit = float(m.group(1)), m.group(2).upper()
        base = 1024 if "I" in unit else 1000
        power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.replace("I", "").replace("B", "") or ""]
        size = int(num * base ** power)
    if size < 1:
        raise OutputError(f"the size {text!r} is not positive", hint="use e.g. 5GB, 500MB or 2GiB")
    return size


def save_sharded(ck: Checkpoint, out_dir: str, *, max_shard_size="5GB", dry_run: bool = False,
                 dedupe_tied: bool = False, progress=None, **_) -> dict:
    """safetensors shards of at most ``max_shard_size`` plus ``model.safetensors.index.json``
    (``diffusion_pytorch_model.*`` for a diffusers model folder, the names diffusers loads)."""
    limit = parse_size(max_shard_size)
    items, notes, tied = st.plan(ck, dedupe_tied=dedupe_tied)
    groups, cur, cur_size = [], [], 0
    for name, ref in items:
        if cur and cur_size + ref.nbytes > limit:
            groups.append(cur)
            cur, cur_size = [], 0
        cur.append((name, ref))
        cur_size += ref.nbytes
    if cur or not groups:
        groups.append(cur)
    n = len(groups)
    src_folder = model_folder(ck)
    stem = weights_stem(ck, src_folder, out_dir)
    names = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(r.nbytes for _, r in items)
    report = {"output": out_dir, "format": "hf-sharded", "shards": names, "tensors": len(items),
              "bytes": total, "tied": tied, "notes": notes}
    side = side_files(src_folder, out_dir)
    stale = _our_weight_files(out_dir, stem) - set(names) if os.path.isdir(out_dir) else set()
    if n > 1:
        stale.discard(_index(stem))
    if side:
        report["notes"] = report["notes"] + [f"from the source folder too: {name_list(side)}"]
    if stale:
        report["notes"] = report["notes"] + [f"replaces the earlier weights here: {name_list(sorted(stale))}"]
    config = _config_with_dtype(src_folder if "config.json" in side else out_dir, items)
    if config is not None:
        report["notes"] = report["notes"] + [config[1]]
    if dry_run:
        return report
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise OutputError(f"output directory {parent} does not exist")
    made = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        _commit_shards(out_dir, stem, names, groups, total, progress)
    except BaseException:
        if made:  # a folder this run made, left empty by the failure (a full disk): gone again
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)
        raise
    for f in side:
        if f == "config.json" and config is not None:
            continue
        with open(os.path.join(src_folder, f), "rb") as src, atomic_output(os.path.join(out_dir, f)) as fd:
            while chunk := src.read(1 << 20):
                os.write(fd, chunk)
    if config is not None:
        with atomic_output(os.path.join(out_dir, "config.json")) as fd:
            os.write(fd, (json.dumps(config[0], indent=2) + "\n").encode())
    return report


def _config_with_dtype(folder: str, items) -> tuple[dict, str] | None:
    """(config.json for the output with its dtype set to the weights written, a note), when the
    output folder gets or has a config.json whose ``dtype``/``torch_dtype`` names another dtype
    than the one all written floating-point weights share (a bfloat16 cast of a float32 folder:
    from_pretrained(dtype="auto") would load it back as float32); None otherwise. save_pretrained
    records the model's dtype there the same way."""
    written = {str(getattr(r, "dtype", "")).replace("torch.", "") for _, r in items}
    floats = written & set(PLAIN_FLOATS)
    if len(floats) != 1:
        return None
    (dtype,) = floats
    cfg = read_config(folder)
    if cfg is None:
        return None
    keys = [k for k in ("dtype", "torch_dtype") if isinstance(cfg.get(k), str) and cfg[k] in PLAIN_FLOATS]
    if not keys or all(cfg[k] == dtype for k in keys):
        return None
    before = cfg[keys[0]]
    cfg = dict(cfg)
    for k in keys:
        cfg[k] = dtype
    return cfg, f"config.json: {keys[0]} {before} -> {dtype}, the weights written"


def _index(stem: str) -> str:
    return f"{stem}.safetensors.index.json"


def weights_stem(ck: Checkpoint, src_folder: str | None, out_dir: str) -> str:
    """How the output folder's weights are named: ``diffusion_pytorch_model`` for a diffusers
    model (read from such files, or a config.json that diffusers wrote, in the source folder or
    the output folder), which diffusers' from_pretrained
    looks for; ``model`` (transformers' name) otherwise."""
    files = ck.source.files if ck.source is not None else ()
    if any(os.path.basename(f).startswith(DIFFUSERS_STEM) for f in files):
        return DIFFUSERS_STEM
    if any(is_diffusers_config(read_config(folder)) for folder in (src_folder, out_dir) if folder):
        return DIFFUSERS_STEM
    return "model"


def _our_weight_files(folder: str, stem: str) -> set[str]:
    """Files in ``folder`` named as this writer names its output (single file, index, shards;
    shards also under the interim name a file system without hard links keeps)."""
    shard = re.compile(rf"^{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.safetensors(\.ckpt-surgeon-[0-9a-f]{{8}})?$")
    try:
        return {f for f in os.listdir(folder) if f in (f"{stem}.safetensors", _index(stem)) or shard.match(f)}
    except OSError:
        return set()


def _commit_shards(out_dir: str, stem: str, names: list[str], groups: list, total: int, progress) -> None:
    """Write the shards so that at every moment the folder reads (in transformers' order: single
    file, then index) as the complete earlier checkpoint or the complete new one -- also when the
    folder is the input's, whose shards are read while the new ones are written: every shard is
    written under a name of its own first, and nothing the earlier checkpoint uses is replaced
    before all the new bytes are on disk.

    One file: renaming it to {stem}.safetensors is the switch. Several: the index is replaced
    (pointing at the new names) and an earlier {stem}.safetensors, which would come first, removed;
    then the shards get their usual names through hard links and a second index replacement."""
    index, single = _index(stem), f"{stem}.safetensors"
    earlier = _our_weight_files(out_dir, stem) - {index}  # what the folder's earlier checkpoint may use
    token = os.urandom(4).hex()
    interim = [f"{name}.ckpt-surgeon-{token}" for name in names]
    meta = {"format": "pt"}
    weight_map = {}
    try:
        for fname, group in zip(interim, groups):
            header, order = st.build_header(group, meta, data_start_like=st.first_file_offset(group))
            with atomic_output(os.path.join(out_dir, fname), label=os.path.join(out_dir, fname.rsplit(".ckpt-surgeon-", 1)[0])) as fd:
                st.write_data(fd, header, order, progress=progress, writeback=fsync_wanted())  # one shard at a time
            for name, _ in group:
                weight_map[name] = fname
        if len(names) == 1:
            os.replace(os.path.join(out_dir, interim[0]), os.path.join(out_dir, names[0]))  # the switch
            interim = []
            _remove(out_dir, (earlier | {index}) - {names[0]})
            return
        _write_index(out_dir, index, total, weight_map)  # the switch, unless an earlier single file comes
        _remove(out_dir, [single])                        # first: then this is
        _remove(out_dir, earlier)  # the earlier shards: no index names them any more
        try:
            for tmp, name in zip(interim, names):
                os.link(os.path.join(out_dir, tmp), os.path.join(out_dir, name))
        except OSError:  # no hard links here: the shards keep their interim names, the index names them
            for name in names:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(out_dir, name))
            interim = []
            return
        final = dict(zip(interim, names))
        _write_index(out_dir, index, total, {k: final[v] for k, v in weight_map.items()})
    except OSError as e:
        raise OutputError(f"cannot write {out_dir}: {e.strerror or e}") from None
    finally:
        for tmp in interim:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out_dir, tmp))
        if fsync_wanted():
            _fsync_dir(out_dir)


def _remove(folder: str, names) -> None:
    for f in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, f))


def _write_index(out_dir: str, name: str, total: int, weight_map: dict) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with atomic_output(os.path.join(out_dir, name)) as fd:
        os.write(fd, json.dumps(index, indent=2).encode())


# What a model folder holds besides its weights that from_pretrained needs or a user keeps with it
_SIDE_EXT = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py", ".md")


def model_folder(ck: Checkpoint) -> str | None:
    """The Hugging Face model folder ``ck`` was read from (one with a config.json), or None."""
    src = ck.source
    if src is None or not src.path:
        return None
    folder = src.path if os.path.isdir(src.path) else os.path.dirname(os.path.abspath(src.path))
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def side_files(folder: str | None, out_dir: str) -> list[str]:
    """The config, generation config, tokenizer files, chat template and custom code of the model
    folder ``folder`` (see model_folder), which a sharded output folder needs to load with
    from_pretrained; files already in ``out_dir`` are kept, weights and training state are not copied."""
    if folder is None or (os.path.isdir(out_dir) and os.path.samefile(folder, out_dir)):
        return []
    state = set(training_state_files(folder))
    out = []
    for f in sorted(os.listdir(folder)):
        if (f.endswith(_SIDE_EXT) and not f.endswith(".index.json") and f not in state and not f.startswith(".")
                and os.path.isfile(os.path.join(folder, f)) and not os.path.exists(os.path.join(out_dir, f))):
            out.append(f)
    return out
