"""Hugging Face folders: ``save_pretrained`` output, single-file or sharded with an index JSON,
and Hub repo ids read from the local cache. Writing them is :mod:`.hf_write`'s."""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from dataclasses import replace

from ..checkpoint import Checkpoint, Source
from ..dtypes import count
from ..errors import CorruptCheckpointError, InputNotFoundError, NotACheckpointError
from ..locate import refuse_key

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
                refuse_key(key, path, "a folder of shards")
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
    refuse_key(key, path, "a sharded checkpoint")
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


DIFFUSERS_STEM = "diffusion_pytorch_model"
_OTHER_FRAMEWORKS = ("tf_model", "flax_model")  # transformers' TensorFlow (.h5) and Flax (.msgpack) weights
TF_CHECKPOINT_DATA = re.compile(r"\.data-\d{5}-of-\d{5}$")  # tf.train.Checkpoint's data files (beside an .index)
INDEX = "model.safetensors.index.json"  # transformers' (the default stem's) index


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
