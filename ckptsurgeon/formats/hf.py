"""Hugging Face folders: ``save_pretrained`` output, single-file or sharded with an index JSON."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import replace

from ..atomic import _fsync_dir, atomic_output, fsync_wanted
from ..checkpoint import Checkpoint, Source
from ..dtypes import PLAIN_FLOATS, count
from ..errors import CorruptCheckpointError, InputNotFoundError, NotACheckpointError, OutputError
from . import safetensors as st

WEIGHT_EXT = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def sniff(path: str, head: bytes) -> bool:
    return os.path.isdir(path) or path.endswith(".index.json")


# What a model folder's weights are, in the order transformers' from_pretrained looks for them
# (a single safetensors file before its index, safetensors before .bin): a folder holding both a
# model.safetensors and a stale index reads as the model transformers would load.
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "diffusion_pytorch_model.bin", "model.pt", "model.pth")


def hub_snapshot(folder: str) -> tuple[str, str] | None:
    """(snapshot folder, a note) for a huggingface_hub cache repo folder -- ``models--org--name/``
    with ``blobs/``, ``refs/`` and ``snapshots/<commit>/`` -- the folder people find under
    ``~/.cache/huggingface/hub``; None for any other folder. The snapshot is the one ``refs/main``
    names, or the only one there is; several and none named is an error listing them."""
    snaps = os.path.join(folder, "snapshots")
    if not os.path.isdir(snaps) or not any(os.path.isdir(os.path.join(folder, d)) for d in ("refs", "blobs")):
        return None
    if any(f.endswith(WEIGHT_EXT + (".index.json",)) for f in os.listdir(folder)):
        return None  # weights of its own: a model folder that happens to have such sub-folders
    names = sorted(d for d in os.listdir(snaps) if os.path.isdir(os.path.join(snaps, d)))
    repo = os.path.basename(os.path.normpath(os.path.abspath(folder)))
    parts = repo.split("--")
    repo_id = "/".join(parts[1:]) if len(parts) > 1 and parts[0] in ("models", "datasets", "spaces") else repo
    try:
        with open(os.path.join(folder, "refs", "main"), "rb") as f:
            ref = f.read(256).decode("ascii", "replace").strip()
    except OSError:
        ref = ""
    if ref in names:  # a name from the listing: never a path the file could point elsewhere with
        pick, how = ref, "refs/main"
    elif len(names) == 1:
        pick, how = names[0], "its only snapshot"
    elif not names:
        raise NotACheckpointError(f"{folder}: a Hugging Face cache folder ({repo_id}) with no snapshot downloaded")
    else:
        raise NotACheckpointError(
            f"{folder}: a Hugging Face cache folder ({repo_id}) with {len(names)} snapshots and no refs/main "
            f"naming one of them: {', '.join(names[:6])}" + (" ..." if len(names) > 6 else ""),
            hint=f"pass the snapshot, e.g. {os.path.join(snaps, names[0])}")
    return os.path.join(snaps, pick), f"Hugging Face cache of {repo_id}: read snapshot {pick[:12]} ({how})"


_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def hub_cache_dir() -> str:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub or ~/.cache/huggingface/hub (its own defaults)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _repo_id_like(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.lower().endswith(WEIGHT_EXT)


def existing_or_cached(path: str) -> str:
    """``path`` itself when it exists; for a path that does not but reads as a Hub repo id
    (``org/name``, ``gpt2``), its folder in the local huggingface_hub cache when it was
    downloaded (nothing is fetched). Otherwise InputNotFoundError, with the way to download it
    where the name looks like ``org/name``."""
    if os.path.exists(path):
        return path
    if _repo_id_like(path):
        folder = os.path.join(hub_cache_dir(), "models--" + path.replace("/", "--"))
        if os.path.isdir(os.path.join(folder, "snapshots")):
            return folder
    hint = None
    if _repo_id_like(path) and path.count("/") == 1:
        hint = (f"if it is a Hugging Face repo id, it is not in the local cache ({hub_cache_dir()}): "
                f"download it first (huggingface-cli download {path})")
    raise InputNotFoundError(f"{path}: no such file or directory", hint=hint)


def find_weights(folder: str) -> tuple[str | None, list[str]]:
    """(the weights file or index a model folder is read from, the other known weight files
    beside it that it takes precedence over); (None, []) where none of the known names is there."""
    present = [n for n in WEIGHT_NAMES if os.path.isfile(os.path.join(folder, n))]
    if present:
        return os.path.join(folder, present[0]), present[1:]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".index.json"))
    return (os.path.join(folder, found[0]), []) if len(found) == 1 else (None, [])


def load(path: str, *, key=None, trust_pickle: bool = False, **_) -> Checkpoint:
    ck = _load(path, key, trust_pickle)
    if os.path.isdir(path):
        from .deepspeed import tag_folder

        states = tag_folder(path)
        if states is not None:  # a Trainer checkpoint-N/: the saved model, and DeepSpeed's states beside it
            where = os.path.relpath(states, path)
            ck = replace(ck, notes=ck.notes + (f"DeepSpeed states are also here ({where}/): pass that folder "
                                               "for them",))
        adapter = peft_adapter(path)
        if adapter:
            ck = replace(ck, notes=ck.notes + (adapter,))
        more = _more_models(path)
        if more:  # accelerate save_state of several prepared models: model.safetensors, model_1.safetensors...
            ck = replace(ck, notes=ck.notes + (
                f"other models saved beside this one, not read: {', '.join(more)} (pass one by path: "
                f"{os.path.join(path, more[0])})",))
        beside = training_state_files(path)
        if beside:  # transformers Trainer checkpoint-N/, accelerate save_state: the model is what was read
            ck = replace(ck, notes=ck.notes + (
                f"training state beside the weights, not read: {', '.join(beside)} (each reads on its own: "
                f"ckpt-surgeon inspect {os.path.join(path, beside[0])})",))
    return ck


def peft_adapter(folder: str) -> str | None:
    """One line on a PEFT adapter folder (adapter_config.json): its method, rank and targets, and
    the base model its keys (``base_model.model.``...) belong to. None where there is none."""
    try:
        with open(os.path.join(folder, "adapter_config.json"), "rb") as f:
            cfg = json.loads(f.read(1 << 20))  # a few KB in practice; a hostile one costs nothing
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(cfg, dict):
        return None
    kind = str(cfg.get("peft_type") or "PEFT")
    parts = [f"PEFT {kind} adapter"]
    if cfg.get("r") is not None:
        parts.append(f"r={cfg['r']}" + (f", alpha={cfg['lora_alpha']}" if cfg.get("lora_alpha") is not None else ""))
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)) and targets:
        parts.append("on " + ", ".join(sorted(map(str, targets))))
    elif isinstance(targets, str):
        parts.append(f"on modules matching {targets!r}")
    base = cfg.get("base_model_name_or_path") or (cfg.get("auto_mapping") or {}).get("base_model_class")
    if base:
        parts.append(f"for {base}")
    return " ".join(parts[:1]) + (" (" + "; ".join(parts[1:]) + ")" if len(parts) > 1 else "") + \
        ": these are the adapter's weights only, not the base model's"


_STATE_FILE = re.compile(r"^(optimizer|scheduler|scaler|lr_scheduler)(_\d+)?\.(pt|bin|pth)$|"
                         r"^(rng_state|random_states)(_\d+)?\.(pth|pkl)$|^(trainer_state\.json|training_args\.bin)$")


_MORE_MODELS = re.compile(r"^(model|pytorch_model)_\d+\.(safetensors|bin)$")


def _more_models(folder: str) -> list[str]:
    """The further models an accelerate ``save_state`` keeps beside ``model.safetensors``
    (``model_1.safetensors``, ``pytorch_model_1.bin``...: one per prepared model)."""
    try:
        names = [f for f in os.listdir(folder) if _MORE_MODELS.match(f)]
    except OSError:
        return []
    return sorted(names, key=lambda f: (int(re.search(r"_(\d+)\.", f).group(1)), f))


def training_state_files(folder: str) -> list[str]:
    """The files a transformers Trainer checkpoint-N/ or an accelerate save_state folder keeps
    beside the model's weights (optimizer, scheduler, AMP scaler, RNG states, trainer state)."""
    try:
        return sorted(f for f in os.listdir(folder) if _STATE_FILE.match(f))
    except OSError:
        return []


def _load(path: str, key, trust_pickle) -> Checkpoint:
    from ..loading import load_file

    if os.path.isdir(path):
        picked, shadowed = find_weights(path)
        if picked is not None and shadowed:
            ck = _load(picked, key, trust_pickle)
            return replace(ck, notes=ck.notes + (
                f"read {os.path.basename(picked)}, as transformers would; also here and not read: "
                f"{', '.join(shadowed)}",))
        index = picked if picked and picked.endswith(".index.json") else None
        if index is None:
            if picked is not None:
                return load_file(picked, key=key, trust_pickle=trust_pickle)
            weights = sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_EXT))
            _refuse_incomplete_shards(path, weights)
            if len(weights) == 1:
                return load_file(os.path.join(path, weights[0]), key=key, trust_pickle=trust_pickle)
            shards = _indexless_shards(weights)
            if shards:
                return _load_shards(path, shards, trust_pickle)
            parts = _component_folders(path)
            if parts and not weights:  # a diffusers pipeline, a Trainer output dir: models in sub-folders
                raise NotACheckpointError(
                    f"{path} holds no weights itself; these folders do: {', '.join(parts[:12])}"
                    + (f" and {len(parts) - 12} more" if len(parts) > 12 else ""),
                    hint=f"pass one of them, e.g. {os.path.join(path, parts[0])}")
            other = sorted(f for f in os.listdir(path) if f.startswith(_OTHER_FRAMEWORKS) or f == "saved_model.pb"
                           or TF_CHECKPOINT_DATA.search(f))
            if other and not weights:  # transformers' TensorFlow / Flax weights only
                raise NotACheckpointError(
                    f"{path} holds TensorFlow or Flax weights only ({', '.join(other[:4])}), no PyTorch weights",
                    hint="convert them with transformers (from_pretrained(path, from_tf=True) or from_flax=True, "
                         "then save_pretrained)")
            raise NotACheckpointError(
                f"{path} is a directory without a weights index or a single weights file",
                hint="pass the file itself" if weights else "expected model.safetensors or an *.index.json")
    elif not path.endswith(".index.json"):
        return load_file(path, key=key, trust_pickle=trust_pickle)
    else:
        index = path
    return load_index(index, trust_pickle=trust_pickle)


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})(?P<ext>\.[A-Za-z]+)$")


def _indexless_shards(names: list[str]) -> list[str] | None:
    """``model-00001-of-00003.safetensors`` ... all present, one set, no index file beside them
    (copied without it): the shards in order, else None."""
    found = [(m, n) for n in names if (m := _SHARD.match(n))]
    if not found or len(found) != len(names):
        return None
    stems = {(m["stem"], m["n"], m["ext"]) for m, _ in found}
    if len(stems) != 1:
        return None
    total = int(found[0][0]["n"])
    order = sorted(found, key=lambda x: int(x[0]["i"]))
    if [int(m["i"]) for m, _ in order] != list(range(1, total + 1)):
        return None
    return [n for _, n in order]


def shard_position(name: str) -> tuple[int, int] | None:
    """(i, n) for a file named like a shard, ``model-0000i-of-0000n.safetensors``; else None."""
    m = _SHARD.match(os.path.basename(name))
    return (int(m["i"]), int(m["n"])) if m else None


def _refuse_incomplete_shards(folder: str, names: list[str]) -> None:
    """A set of ``-0000i-of-0000n`` shards with no index and some missing (a copy that stopped, a
    download of one shard): an error naming what is missing. Read alone, one shard of two passed
    for the whole model and a convert wrote half of it."""
    sets: dict = {}
    for name in names:
        m = _SHARD.match(name)
        if m:
            sets.setdefault((m["stem"], int(m["n"]), m["ext"]), set()).add(int(m["i"]))
    for (stem, n, ext), have in sorted(sets.items()):
        missing = [f"{stem}-{i:05d}-of-{n:05d}{ext}" for i in range(1, n + 1) if i not in have]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise CorruptCheckpointError(
                f"{folder}: {len(missing)} of the {n} shards of {stem}{ext} missing ({shown}), and no index file",
                hint="copy the whole set (with its .index.json); to read a shard alone, pass its file")


def _load_shards(folder: str, shards: list[str], trust_pickle) -> Checkpoint:
    """A sharded folder without its index: the shards' tensors in shard order (a name in two
    shards is an error, as it would be for an index)."""
    from ..loading import load_file

    state: OrderedDict = OrderedDict()
    files = []
    for shard in shards:
        p = os.path.join(folder, shard)
        part = load_file(p, trust_pickle=trust_pickle)
        files.append(p)
        for k, v in part.state.items():
            if k in state:
                raise CorruptCheckpointError(f"{folder}: tensor {k!r} is in more than one shard (in {shard} again)")
            state[k] = v
    note = f"no index file: read the {len(shards)} shards {shards[0]} .. {shards[-1]} in order"
    src = Source(folder, "hf-folder", sum(os.path.getsize(f) for f in files), tuple(files), notes=(note,))
    return Checkpoint(state=state, source=src, notes=(note,))


def _component_folders(folder: str) -> list[str]:
    """Sub-folders that hold weights of their own (diffusers' unet/, vae/, text_encoder/...)."""
    out = []
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        if os.path.isdir(sub) and not name.startswith("."):
            try:
                if any(f.endswith(WEIGHT_EXT + (".index.json", ".distcp")) for f in os.listdir(sub)):
                    out.append(name)
            except OSError:
                continue
    return out


MAX_INDEX = 512 << 20  # a weights index larger than this is damaged or hostile (read whole as JSON)


def load_index(index: str, *, trust_pickle: bool = False) -> Checkpoint:
    from ..loading import load_file

    folder = os.path.dirname(os.path.abspath(index))
    try:
        if os.path.getsize(index) > MAX_INDEX:  # DeepSeek-V3's 91,000 tensors: 9 MB
            raise ValueError(f"{os.path.getsize(index):,} bytes, more than any real index holds")
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{index}: not a valid weights index ({e})") from None
    # the index may only name files inside its folder -- checked on the names (no absolute path,
    # no '..'), not on where symlinks lead: the Hugging Face cache's snapshot folders hold every
    # file as a symlink into ../../blobs/, and those are the user's files, not the index's doing
    shards: "OrderedDict[str, list[str]]" = OrderedDict()
    for name, shard in weight_map.items():
        names = shards.get(shard) if isinstance(shard, str) else None
        if names is None:  # a shard's path is checked once, not once per tensor it holds
            if not isinstance(shard, str) or not shard:
                raise CorruptCheckpointError(f"{index}: tensor {name!r} maps to an invalid shard {shard!r}")
            full = os.path.normpath(os.path.join(folder, shard))
            if os.path.isabs(shard) or "\\" in shard or os.path.commonpath([folder, full]) != folder:
                raise CorruptCheckpointError(f"{index}: shard {shard!r} points outside the folder {folder}")
            names = shards[shard] = []
        names.append(name)
    state: OrderedDict = OrderedDict()
    files, notes, formats = [], [], set()
    for shard, names in shards.items():
        p = os.path.join(folder, shard)
        if not os.path.isfile(p):
            raise CorruptCheckpointError(f"{index}: shard {shard} is missing")
        part = load_file(p, trust_pickle=trust_pickle)
        formats.add(part.source.format)
        files.append(p)
        wanted = set(names)
        for k in names:
            if k not in part.state:
                raise CorruptCheckpointError(f"{index}: tensor {k!r} is not in shard {shard}")
        for k, v in part.state.items():
            if k in wanted:
                state[k] = v
        extra = [k for k in part.state if k not in wanted]
        if extra:
            notes.append(f"shard {shard} holds {count(len(extra), 'tensor')} the index does not list; ignored")
    meta = {k: str(v) for k, v in (data.get("metadata") or {}).items()} if isinstance(data.get("metadata"), dict) else {}
    size = sum(os.path.getsize(f) for f in files)
    src = Source(index, "hf-folder", size, tuple(files), notes=tuple(notes))
    return Checkpoint(state=state, source=src, st_metadata=meta, notes=tuple(notes))


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
        report["notes"] = report["notes"] + [f"from the source folder too: {', '.join(side)}"]
    if stale:
        report["notes"] = report["notes"] + [f"replaces the earlier weights here: {', '.join(sorted(stale))}"]
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


DIFFUSERS_STEM = "diffusion_pytorch_model"
_OTHER_FRAMEWORKS = ("tf_model", "flax_model")  # transformers' TensorFlow (.h5) and Flax (.msgpack) weights
TF_CHECKPOINT_DATA = re.compile(r"\.data-\d{5}-of-\d{5}$")  # tf.train.Checkpoint's data files (beside an .index)
INDEX = "model.safetensors.index.json"  # transformers' (the default stem's) index


def _index(stem: str) -> str:
    return f"{stem}.safetensors.index.json"


def read_config(folder: str) -> dict | None:
    """``folder``'s config.json as a dict; None when it is missing, unreadable or not an object."""
    try:
        with open(os.path.join(folder, "config.json"), "rb") as f:
            cfg = json.loads(f.read(16 << 20))
    except (OSError, ValueError, RecursionError, TypeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def is_diffusers_config(cfg) -> bool:
    """A config.json diffusers' save_pretrained wrote (a model's or a pipeline's)."""
    return isinstance(cfg, dict) and isinstance(cfg.get("_class_name"), str) and "_diffusers_version" in cfg


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
