"""Reading LoRA adapters for merge-lora: a PEFT folder (adapter_config.json + adapter_model),
diffusers' single-file layout (kohya's: :mod:`.lora_kohya`), with their names mapped onto the base
model's and their configuration checked (ranks, alphas, patterns).

Kept apart from :mod:`ckptsurgeon.plugins.lora` (the merge and extract arithmetic and the
commands), which imports it; it registers nothing itself.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict

from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.errors import NotACheckpointError, SelectionError, UnsupportedError
from ckptsurgeon.refs import TensorRef, is_tensor_like

PEFT_PREFIX = "base_model.model."
_PARTS = ("A", "B", "embedding_A", "embedding_B")


def lora_key(name: str):
    """(module, part, adapter name or None, param) for ``<module>.lora_A.weight``,
    ``<module>.lora_B.bias`` or ``<module>.lora_embedding_A``, also with an adapter name before the
    parameter (a state dict taken from a live PeftModel: ``.lora_A.default.weight``); else None."""
    mod, sep, tail = name.rpartition(".lora_")
    if not sep or not mod:
        return None
    part, *rest = tail.split(".")
    if part not in _PARTS or len(rest) > 2:
        return None
    adapter, param = None, "weight"
    if rest and rest[-1] in ("weight", "bias"):
        param = rest.pop()
    if rest:
        adapter = rest.pop()
    if rest or (param == "bias" and part != "B"):
        return None
    return mod, part, adapter, param


REFUSED = {"lora_magnitude_vector": "DoRA (use_dora): its merge renormalises each column with a magnitude vector",
            "trainable_tokens": "trainable tokens (trainable_token_indices)",
            "token_adapter": "trainable tokens (trainable_token_indices)"}


DIFFUSERS_LORA = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
DIFFUSERS_METADATA = "lora_adapter_metadata"  # the LoraConfig diffusers embeds in the safetensors header
ALPHA_IS_RANK = "ckpt_surgeon.alpha_is_rank"  # no alphas saved: each module's alpha is its rank (scale 1)
FROM_DIFFUSERS = "ckpt_surgeon.diffusers"  # read from a diffusers LoRA file: names may carry a component


def read_adapter(path: str, *, trust_pickle=False) -> tuple[Checkpoint, dict]:
    """(adapter tensors, adapter config) from a PEFT adapter folder or a weights file inside one
    (adapter_config.json + adapter_model.*), or from a diffusers LoRA file
    (``pytorch_lora_weights.safetensors``, as ``save_lora_weights`` / ``save_lora_adapter``
    write it: the LoraConfig in its header, ``lora_adapter_metadata``; tensors and config keys
    prefixed ``unet.``/``transformer.``/``text_encoder.`` when a pipeline saved them)."""
    from ckptsurgeon.formats.hf import existing_or_cached, hub_snapshot
    from ckptsurgeon.loading import load

    path = existing_or_cached(os.fspath(path))  # (a Hub repo id downloaded before: its cache folder)
    hub = hub_snapshot(path) if os.path.isdir(path) else None
    path = hub[0] if hub is not None else path  # an adapter repo in ~/.cache/huggingface/hub: its snapshot
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(folder, "adapter_config.json")
    if os.path.isdir(path):
        diffusers_file = next((os.path.join(path, n) for n in DIFFUSERS_LORA
                               if os.path.isfile(os.path.join(path, n))), "")
    else:
        diffusers_file = path  # a LoRA file without a config beside it (diffusers, kohya .safetensors/.pt)
    if not os.path.exists(cfg_path) and os.path.isfile(diffusers_file):
        return _read_diffusers_lora(load(diffusers_file, trust_pickle=trust_pickle))
    try:
        with open(cfg_path, "rb") as f:
            config = json.loads(f.read(1 << 22))
    except FileNotFoundError:
        raise NotACheckpointError(f"{path}: no adapter_config.json beside the adapter",
                                  hint="merge-lora needs PEFT's config (r, lora_alpha, targets): "
                                       "point it at the folder save_pretrained wrote") from None
    except (OSError, ValueError, RecursionError) as e:
        raise NotACheckpointError(f"{cfg_path}: not a readable adapter config ({e})") from None
    if not isinstance(config, dict):
        raise NotACheckpointError(f"{cfg_path}: not a JSON object")
    if os.path.isdir(path):
        names = [n for n in ("adapter_model.safetensors", "adapter_model.bin") if os.path.isfile(os.path.join(path, n))]
        if not names:
            raise NotACheckpointError(f"{path}: no adapter_model.safetensors or adapter_model.bin in the folder")
        path = os.path.join(path, names[0])
    return load(path, trust_pickle=trust_pickle), config


def _read_diffusers_lora(ck: Checkpoint) -> tuple[Checkpoint, dict]:
    """A diffusers LoRA file as (tensors, config). Without the embedded config (files written
    before diffusers kept it) each module's alpha is its rank, as diffusers loads them."""
    raw = (ck.st_metadata or {}).get(DIFFUSERS_METADATA)  # (a .bin has no header: alpha = rank)
    config: dict = {}
    if raw:
        try:
            config = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise NotACheckpointError(f"{ck.source.path}: its {DIFFUSERS_METADATA} is not JSON ({e})") from None
        if not isinstance(config, dict):
            raise NotACheckpointError(f"{ck.source.path}: its {DIFFUSERS_METADATA} is not a JSON object")
    else:
        config = {ALPHA_IS_RANK: True}
    config.setdefault("peft_type", "LORA")
    config[FROM_DIFFUSERS] = True
    return ck, config


def adapter_component(ad: Checkpoint, config: dict, base_keys: list[str]) -> tuple[Checkpoint, dict, list[str]]:
    """A diffusers pipeline's LoRA holds several models' updates under ``unet.``,
    ``transformer.``, ``text_encoder.``... (config keys prefixed the same): the one whose modules
    the base has, prefix dropped; the names of the others (merged into their own base by another
    run). Anything else is returned as it is."""
    names = [k for k, v in ad.state.items() if is_tensor_like(v)]
    comps = {k.split(".", 1)[0] for k in names}
    if not config.get(FROM_DIFFUSERS) or not names or not all(c.startswith(_PIPELINE_COMPONENTS) for c in comps):
        return ad, config, []  # (text_encoder_2 starts with text_encoder)
    base = {k.rsplit(".", 1)[0] for k in base_keys}

    def hits(c):
        mods = {lora_key(k[len(c) + 1:])[0] for k in names if k.startswith(c + ".") and lora_key(k[len(c) + 1:])}
        return len(mods & base)
    best = max(sorted(comps), key=hits)
    if not hits(best):
        return ad, config, []  # no component fits: the usual "the base has no ..." error follows
    state = OrderedDict((k[len(best) + 1:], v) for k, v in ad.state.items() if k.startswith(best + "."))
    prefixed = {k for k in config if k.split(".", 1)[0] in comps and "." in k}
    cfg = {k: v for k, v in config.items() if k not in prefixed}
    cfg.update({k[len(best) + 1:]: v for k, v in config.items() if k.startswith(best + ".")})
    return ad.with_state(state), cfg, sorted(comps - {best})


_PIPELINE_COMPONENTS = ("unet", "transformer", "text_encoder", "prior", "controlnet", "vae")
MODULE_ALPHAS = "ckpt_surgeon.module_alphas"  # exact alpha per module (a kohya file's .alpha tensors)
OTHER_PARTS = "ckpt_surgeon.other_parts"  # a kohya file's parts for other models (lora_te when the base is a UNet)
WEIGHT_OF = "ckpt_surgeon.weight_of"  # module -> the base key its update goes to, where not <module>.weight


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern key K for which the
    module name matches ``(.*\\.)?K$`` gives the value."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            raise UnsupportedError(f"adapter config: the pattern {key!r} is not a valid regex") from None
    return default


def check_config(config: dict) -> None:
    kind = str(config.get("peft_type") or "")
    if kind.upper() != "LORA":
        raise UnsupportedError(f"this is a PEFT {kind or 'unknown'} adapter; merge-lora merges LoRA adapters",
                               hint="merge it with PEFT: PeftModel.from_pretrained(base, path).merge_and_unload()")
    refused = [(bool(config.get("use_dora")), "DoRA (use_dora)"),
               (bool(config.get("trainable_token_indices")), "trainable tokens (trainable_token_indices)"),
               (bool(config.get("layer_replication")), "layer replication (layer_replication)"),
               (bool(config.get("alora_invocation_tokens")), "activated LoRA (alora_invocation_tokens)")]
    for on, what in refused:
        if on:
            raise UnsupportedError(f"the adapter uses {what}, which merge-lora does not merge",
                                   hint="merge it with PEFT: PeftModel.from_pretrained(base, path).merge_and_unload()")
    # the numbers every merged weight is scaled by: a NaN alpha would write NaN weights
    for key, positive in (("r", True), ("lora_alpha", False)):
        if config.get(key) is not None:
            finite_number(config[key], f"adapter config: {key}", positive)
    for key, positive in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key)
        if patterns is not None and not isinstance(patterns, dict):
            raise SelectionError(f"adapter config: {key} is a {type(patterns).__name__}, not a mapping")
        for name, value in (patterns or {}).items():
            finite_number(value, f"adapter config: {key}[{name!r}]", positive)
    targets = config.get("target_parameters")
    if targets is not None and not (isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets)):
        raise SelectionError("adapter config: target_parameters is not a list of names")


def finite_number(value, what: str, positive: bool) -> float:
    """``value`` as a finite number (positive where a rank is meant); a one-line error otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise SelectionError(f"{what} is {value!r}, not a {'positive' if positive else 'finite'} number")
    return float(value)


def rank_alpha_scaling(mod: str, a: TensorRef, experts: int, config: dict, scale: float):
    """(r, alpha, scaling) of one module's update: r and alpha from the config (its patterns by
    PEFT's rule), or from lora_A's rows where the adapter records no alpha (alpha = r) or its own
    per module (a kohya file); ``experts`` updates share lora_A's rows."""
    r = pattern_value(config.get("rank_pattern") or {}, mod, config.get("r"))
    alpha = pattern_value(config.get("alpha_pattern") or {}, mod, config.get("lora_alpha"))
    if config.get(ALPHA_IS_RANK):
        r = alpha = None  # both from lora_A's rank below
    if mod in config.get(MODULE_ALPHAS, {}):
        r, alpha = None, config[MODULE_ALPHAS][mod]
    if r is None:
        r = a.shape[0] // experts
    if alpha is None and config.get(ALPHA_IS_RANK):
        alpha = r
    if alpha is None:
        raise UnsupportedError("the adapter config names no lora_alpha")
    if a.shape[0] != r * experts:
        raise SelectionError(f"{mod}: lora_A has rank {a.shape[0] // experts} but the config says r={r}",
                             hint="the adapter_config.json does not belong to these weights")
    return r, alpha, float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r) * scale
