"""Reading LoRA adapters for merge-lora: a PEFT folder (adapter_config.json + adapter_model),
diffusers' and kohya's single-file layouts (Stable Diffusion, SDXL, OpenCLIP text encoders), with
their names mapped onto the base model's and their configuration checked (ranks, alphas, patterns).

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
from ckptsurgeon.dtypes import count
from ckptsurgeon.errors import NotACheckpointError, SelectionError, UnsupportedError
from ckptsurgeon.refs import TensorRef, as_ref, is_tensor_like

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
# kohya-ss sd-scripts names a module by its path with dots as underscores, after a model prefix
_KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_")
_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


# A diffusers UNet module as the original (LDM) UNet of a Stable Diffusion single file names it.
# sd-scripts names SD 1.x/2.x UNet modules by their diffusers paths (down_blocks_0_attentions_0_...),
# SDXL ones by the LDM paths; a single-file checkpoint (v1-5-pruned.safetensors) holds the LDM
# UNet (model.diffusion_model.input_blocks.1.1...). The layout is LDM's openaimodel.UNetModel,
# the same one diffusers' single-file loader converts from: with L resnets per down block,
# input_blocks.0 is conv_in, down block i's j-th resnet/attention is input_blocks.(L+1)i+j+1 .0/.1
# and its downsampler input_blocks.(L+1)(i+1).0.op; up block i (L+1 resnets) is output_blocks.
# (L+1)i+j .0/.1 with its upsampler after them (.1.conv, or .2.conv after an attention); the middle
# block is resnet, attention, resnet; in a resnet norm1/conv1/time_emb_proj/norm2/conv2/
# conv_shortcut are in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection.
_LDM_TOP = {"conv_in": "input_blocks_0_0", "time_embedding_linear_1": "time_embed_0",
            "time_embedding_linear_2": "time_embed_2", "conv_norm_out": "out_0", "conv_out": "out_2"}
_LDM_RESNET = {"norm1": "in_layers_0", "conv1": "in_layers_2", "time_emb_proj": "emb_layers_1",
               "norm2": "out_layers_0", "conv2": "out_layers_3", "conv_shortcut": "skip_connection"}
_DIFFUSERS_BLOCK = re.compile(r"(down|up)_blocks_(\d+)_(resnets|attentions)_(\d+)_(.+)")
_DIFFUSERS_MID = re.compile(r"mid_block_(resnets|attentions)_(\d+)_(.+)")
_DIFFUSERS_SAMPLER = re.compile(r"(down|up)_blocks_(\d+)_(downsamplers|upsamplers)_0_conv")


def _ldm_resnets_per_block(base_keys: list[str]) -> int | None:
    """L, the resnets per down block of an LDM UNet, from where its downsamplers are
    (input_blocks.(L+1)(i+1).0.op); None for a base that is not one."""
    at = sorted({int(m.group(1)) for k in base_keys for m in [re.search(r"(?:^|\.)input_blocks\.(\d+)\.0\.op\.", k)]
                 if m})
    if not at or any(b != at[0] * (i + 1) for i, b in enumerate(at)):
        return None
    return at[0] - 1


def _ldm_names(name: str, per_block: int) -> list[str]:
    """The LDM module paths (dots as underscores) a diffusers UNet module path may be; two for an
    upsampler, whose place depends on whether its block has attentions (the base decides)."""
    if name in _LDM_TOP:
        return [_LDM_TOP[name]]
    step = per_block + 1
    m = _DIFFUSERS_BLOCK.fullmatch(name)
    if m:
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        block = f"input_blocks_{step * i + j + 1}" if side == "down" else f"output_blocks_{step * i + j}"
        if kind == "attentions":
            return [f"{block}_1_{rest}"]
        return [f"{block}_0_{_LDM_RESNET[rest]}"] if rest in _LDM_RESNET else []
    m = _DIFFUSERS_MID.fullmatch(name)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return [f"middle_block_{2 * j + 1}_{rest}"]
        return [f"middle_block_{2 * j}_{_LDM_RESNET[rest]}"] if rest in _LDM_RESNET else []
    m = _DIFFUSERS_SAMPLER.fullmatch(name)
    if m:
        i = int(m.group(2))
        if m.group(1) == "down":
            return [f"input_blocks_{step * (i + 1)}_0_op"]
        return [f"output_blocks_{step * i + per_block}_1_conv", f"output_blocks_{step * i + per_block}_2_conv"]
    return []


def _single_file_roots(base_keys: list[str]) -> dict:
    """Where each kohya part's modules live in a Stable Diffusion single file (the UNet under
    model.diffusion_model., SD 1.x/2.x's text encoder under cond_stage_model., SDXL's two under
    conditioner.embedders.0/1.), for the parts whose root the base has; {} for any other base.
    A trailing-name match outside its root is another model's module: the VAE has a conv_in too."""
    tops = {k.split(".", 1)[0] for k in base_keys}
    out = {}
    if "model" in tops and any(k.startswith("model.diffusion_model.") for k in base_keys):
        out["lora_unet_"] = "model.diffusion_model."
    if "cond_stage_model" in tops:
        out["lora_te_"] = "cond_stage_model."
    if "conditioner" in tops:
        out.update({"lora_te1_": "conditioner.embedders.0.", "lora_te2_": "conditioner.embedders.1."})
    return out


WEIGHT_OF = "ckpt_surgeon.weight_of"  # module -> the base key its update goes to, where not <module>.weight
_HF_CLIP = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc1|mlp_fc2)")
_OPENCLIP_PART = {"self_attn_out_proj": "attn.out_proj", "mlp_fc1": "mlp.c_fc", "mlp_fc2": "mlp.c_proj"}


def _kohya_alpha(kname: str, parts: dict) -> float | None:
    """A kohya module's ``.alpha`` as a finite number (one line where it is not); None where the
    file saves none."""
    if "alpha" not in parts:
        return None
    value = as_ref(parts["alpha"]).to_torch()
    if value.numel() != 1:
        raise SelectionError(f"{kname}.alpha holds {value.numel()} values, not one")
    return _number(float(value.float().reshape(-1)[0]), f"{kname}.alpha", False)


def _openclip_parts(prefix: str, root: str, groups: dict, base_keys: list[str]):
    """A kohya text-encoder part (Hugging Face CLIP names: ``text_model_encoder_layers_N_self_attn_
    q_proj``...) as updates of the same model in OpenCLIP's layout, as SD 2.x and SDXL single files
    hold it under ``root`` (``...transformer.resblocks.N.attn.in_proj_weight`` with q, k and v
    stacked in that order, ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj``). q, k and v of a layer
    become one LoRA on the stacked weight whose rank is the sum of theirs: lora_A their lora_downs
    stacked, lora_B their lora_ups each scaled by its alpha/rank and placed in its third of the
    rows, so the update is exactly theirs side by side. Returns {module: {"A", "B", "alpha" (a
    number or None), "weight" (where not <module>.weight)}}, or None where a name or a shape does not fit (the caller refuses the part)."""
    fused = [k for k in base_keys if k.startswith(root) and k.endswith(".attn.in_proj_weight") and ".resblocks." in k]
    if not fused:
        return None
    at = fused[0].index(".resblocks.") + len(".resblocks.")
    blocks = fused[0][:at]  # e.g. conditioner.embedders.1.model.transformer.resblocks.
    keys = set(base_keys)
    out: dict = {}
    qkv: dict = {}
    for kname, parts in groups.items():
        if not kname.startswith(prefix):
            continue
        m = _HF_CLIP.fullmatch(kname[len(prefix):])
        if m is None or "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            return None
        layer, which, proj = int(m.group(1)), m.group(2), m.group(3)
        if proj in ("q", "k", "v"):
            qkv.setdefault(layer, {})["qkv".index(proj)] = (kname, parts)
            continue
        mod = f"{blocks}{layer}.{_OPENCLIP_PART[which]}"
        if f"{mod}.weight" not in keys:
            return None
        out[mod] = {"A": parts["lora_down.weight"], "B": parts["lora_up.weight"], "alpha": _kohya_alpha(kname, parts)}
    import torch

    for layer, got in qkv.items():
        wkey = f"{blocks}{layer}.attn.in_proj_weight"
        if wkey not in keys:
            return None
        downs, ups = [], []
        for slot, (kname, parts) in sorted(got.items()):
            down, up = as_ref(parts["lora_down.weight"]).to_torch(), as_ref(parts["lora_up.weight"]).to_torch()
            if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
                return None
            alpha = _kohya_alpha(kname, parts)
            if alpha is None:  # none saved: its rank (scale 1), as sd-scripts loads it
                alpha = down.shape[0]
            downs.append(down.float())
            ups.append((slot, up.float() * (alpha / down.shape[0])))
        d = ups[0][1].shape[0]
        if any(u.shape[0] != d for _, u in ups) or any(x.shape[1] != downs[0].shape[1] for x in downs):
            return None
        a = torch.cat(downs)
        b = torch.zeros(3 * d, a.shape[0])
        col = 0
        for slot, up in ups:
            b[slot * d:(slot + 1) * d, col:col + up.shape[1]] = up
            col += up.shape[1]
        out[f"{blocks}{layer}.attn.in_proj"] = {"A": a, "B": b, "alpha": float(a.shape[0]), "weight": wkey}
    return out


def from_kohya(ad: Checkpoint, config: dict, base_keys: list[str]) -> tuple[Checkpoint, dict]:
    """A kohya-ss LoRA (``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
    / ``.alpha``, as sd-scripts and most Stable Diffusion LoRAs are shared) as PEFT names on the
    base's own modules: each underscored name is matched against the base's module paths (any
    trailing part of them, dots as underscores: a diffusers folder's ``down_blocks.0...`` or a
    single-file checkpoint's ``model.diffusion_model.input_blocks.4.1...``); a name that matches
    no module, or several, is an error -- nothing is merged by a guess. Without an ``.alpha``
    a module's alpha is its rank (scale 1), as sd-scripts loads it. Other adapters pass as they are."""
    names = [k for k, v in ad.state.items() if is_tensor_like(v)]
    if not any(k.endswith(".lora_down.weight") for k in names):
        return ad, config
    groups: dict = {}
    for k in names:
        kname, _, part = k.partition(".")
        if part not in _KOHYA_PARTS:
            what = "DoRA" if "dora" in part else "LyCORIS (LoHa/LoKr)" if part.startswith(("hada_", "lokr_")) \
                else f"a {part!r} tensor"
            raise UnsupportedError(f"the adapter holds {k!r}: {what}, which merge-lora does not merge")
        groups.setdefault(kname, {})[part] = ad.state[k]
    index: dict = {}
    for key in base_keys:
        if key.endswith(".weight"):
            parts = key[: -len(".weight")].split(".")
            for i in range(len(parts)):
                index.setdefault("_".join(parts[i:]), set()).add(".".join(parts))
    state, alphas, unmatched = OrderedDict(), {}, []
    found_of = {}
    per_block = None
    roots = _single_file_roots(base_keys)
    for kname in groups:
        prefix = next((p for p in _KOHYA_PREFIXES if kname.startswith(p)), "")
        found = index.get(kname[len(prefix):], set()) if prefix else set()
        root = roots.get(prefix)
        if root:  # a single file: the UNet's (text encoder's) modules only, never the VAE's conv_in
            found = {m for m in found if m.startswith(root)}
        if not found and prefix == "lora_unet_":  # an SD 1.x/2.x LoRA (diffusers names), an LDM base?
            if per_block is None:
                per_block = _ldm_resnets_per_block(base_keys) or 0
            for ldm in _ldm_names(kname[len(prefix):], per_block) if per_block else ():
                found = index.get(ldm, set())
                if found:
                    break
        found_of[kname] = (prefix, found)
    # a model the base is not (a text encoder's modules beside a UNet base): left for its own base
    hit = {prefix for prefix, found in found_of.values() if found}
    skipped = sorted({prefix.rstrip("_") for prefix, _ in found_of.values() if prefix and prefix not in hit})
    held = sorted({prefix for prefix, _ in found_of.values() if prefix and prefix not in hit and roots.get(prefix)})
    openclip: dict = {}
    handled = set()
    for prefix in list(held):
        mapped = _openclip_parts(prefix, roots[prefix], groups, base_keys)
        if mapped is not None:  # the same text encoder in OpenCLIP's layout: merged there
            openclip.update(mapped)
            held.remove(prefix)
            skipped.remove(prefix.rstrip("_"))
            hit.add(prefix)
            handled.add(prefix)
    if held and hit:  # the base holds that model, under names this part cannot be mapped to: not another model's
        root = roots[held[0]]
        fused = any(k.startswith(root) and ".resblocks." in k for k in base_keys)
        layout = ("in OpenCLIP's layout (q, k and v fused in attn.in_proj_weight), which not all of its modules "
                  "map onto" if fused else "under names its modules cannot be matched to")
        keep = ",".join(f"re:^{p}" for p in sorted(hit))
        raise UnsupportedError(
            f"the adapter's {held[0].rstrip('_')} updates are for the model this file holds under {root}, "
            f"but {layout}; nothing was merged",
            hint=f"merge the other parts alone: ckpt-surgeon extract LORA_FILE --layers '{keep}' -o parts.safetensors, "
                 "then merge-lora with parts.safetensors")
    weight_of = {}
    for mod, parts in openclip.items():
        state[f"{mod}.lora_A.weight"], state[f"{mod}.lora_B.weight"] = parts["A"], parts["B"]
        if parts.get("weight"):
            weight_of[mod] = parts["weight"]
        if parts["alpha"] is not None:
            alphas[mod] = parts["alpha"]
    for kname, parts in groups.items():
        prefix, found = found_of[kname]
        if hit and prefix and prefix not in hit:
            continue
        if prefix in handled:
            continue  # merged through its OpenCLIP modules above
        if len(found) != 1:
            unmatched.append((kname, sorted(found)))
            continue
        (mod,) = found
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise SelectionError(f"{kname}: lora_down or lora_up is missing")
        state[f"{mod}.lora_A.weight"] = parts["lora_down.weight"]
        state[f"{mod}.lora_B.weight"] = parts["lora_up.weight"]
        alpha = _kohya_alpha(kname, parts)
        if alpha is not None:
            alphas[mod] = alpha
    if unmatched:
        name, found = unmatched[0]
        why = f"matches {count(len(found), 'module')} ({', '.join(found[:3])})" if found else "matches no module of the base"
        raise SelectionError(f"kohya LoRA module {name} {why}"
                             + (f" ({len(unmatched)} such modules)" if len(unmatched) > 1 else ""),
                             hint="is this the base model the LoRA was trained on? (an SD 1.x/2.x LoRA merges "
                                  "into the same model's diffusers folder or single file; SDXL's likewise)")
    config = {"peft_type": "LORA", MODULE_ALPHAS: alphas, ALPHA_IS_RANK: len(alphas) < len(state) // 2,
              OTHER_PARTS: skipped, WEIGHT_OF: weight_of}
    return ad.with_state(state), config


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
            _number(config[key], f"adapter config: {key}", positive)
    for key, positive in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key)
        if patterns is not None and not isinstance(patterns, dict):
            raise SelectionError(f"adapter config: {key} is a {type(patterns).__name__}, not a mapping")
        for name, value in (patterns or {}).items():
            _number(value, f"adapter config: {key}[{name!r}]", positive)
    targets = config.get("target_parameters")
    if targets is not None and not (isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets)):
        raise SelectionError("adapter config: target_parameters is not a list of names")


def _number(value, what: str, positive: bool) -> float:
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
