"""merge-lora: fold a PEFT LoRA adapter into its base model's weights, tensor by tensor; and
extract-lora, the reverse: an adapter from the difference between a base and its fine-tune.

PEFT's own way (``PeftModel.from_pretrained(base).merge_and_unload()``) builds the whole model in
memory. Here the base checkpoint stays where it is: each weight the adapter touches is computed
when it is written (W + scale * B @ A, in float32 or wider, written in W's dtype) and every other
tensor is copied as it is, so a base of any size merges in the memory of one tensor.

What is merged is what PEFT merges for a LoRA adapter: ``lora_A``/``lora_B`` on linear layers
(``fan_in_fan_out`` for GPT-2's Conv1D), on embeddings (``lora_embedding_A``/``_B``) and on
convolutions (1x1 as a matmul, larger kernels by composing the two convolutions), with
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per-module ``rank_pattern`` and
``alpha_pattern``, ``lora_bias``, and ``modules_to_save`` (whole replacement tensors). DoRA,
trainable tokens, LoRA on bare parameters and other PEFT methods are refused with one line: their
merge needs more than these tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import replace as dc_replace

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.dtypes import PLAIN_FLOATS, count
from ckptsurgeon.errors import NotACheckpointError, SelectionError, UnsupportedError
from ckptsurgeon.keys import align_keys
from ckptsurgeon.layout import assembled_ref, cast_ref
from ckptsurgeon.refs import TensorRef, as_ref, is_tensor_like, tie_key
from ckptsurgeon.types import Operation

PEFT_PREFIX = "base_model.model."
_PARTS = ("A", "B", "embedding_A", "embedding_B")


def _lora_key(name: str):
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


_REFUSED = {"lora_magnitude_vector": "DoRA (use_dora): its merge renormalises each column with a magnitude vector",
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


def _component(ad: Checkpoint, config: dict, base_keys: list[str]) -> tuple[Checkpoint, dict, list[str]]:
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
        mods = {_lora_key(k[len(c) + 1:])[0] for k in names if k.startswith(c + ".") and _lora_key(k[len(c) + 1:])}
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


def _from_kohya(ad: Checkpoint, config: dict, base_keys: list[str]) -> tuple[Checkpoint, dict]:
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


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern key K for which the
    module name matches ``(.*\\.)?K$`` gives the value."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            raise UnsupportedError(f"adapter config: the pattern {key!r} is not a valid regex") from None
    return default


def _check_config(config: dict) -> None:
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


def merge_lora(base: Checkpoint, adapter, *, scale: float = 1.0, trust_pickle=False) -> tuple[Checkpoint, dict]:
    """Merge a PEFT LoRA adapter (its folder, or ``(adapter Checkpoint, config dict)``) into
    ``base``. Returns the merged checkpoint (merged weights computed when written) and a report.
    ``scale`` multiplies every update (0.5: half strength).

    Example::

        merged, rep = merge_lora(load("llama_base/"), "my_lora/")
        save(merged, "llama_merged/", max_shard_size="5GB")
    """
    if isinstance(adapter, (str, os.PathLike)):
        ad, config = read_adapter(os.fspath(adapter), trust_pickle=trust_pickle)
    else:
        ad, config = adapter
    base_tensor_keys = [k for k, v in base.state.items() if is_tensor_like(v)]
    ad, config, other_components = _component(ad, config, base_tensor_keys)
    ad, config = _from_kohya(ad, config, base_tensor_keys)
    other_components = other_components + list(config.get(OTHER_PARTS, ()))
    _check_config(config)
    if not math.isfinite(scale):
        raise SelectionError(f"--scale {scale} is not a finite number")
    rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))

    # ---- what the adapter holds, by module
    mods: "OrderedDict[str, dict]" = OrderedDict()
    replaced: "OrderedDict[str, object]" = OrderedDict()
    adapters = set()
    for key, v in ad.state.items():
        if not is_tensor_like(v):
            continue
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".original_module." in f".{name}":
            continue  # a live ModulesToSaveWrapper's untouched copy of the base's own module
        # a live wrapper's trained copy (<module>.modules_to_save.<adapter>.weight): the module's
        name = re.sub(r"(^|\.)modules_to_save\.[^.]+\.", r"\1", name)
        for marker, what in _REFUSED.items():
            if marker in name.split("."):
                raise UnsupportedError(f"the adapter holds {key!r}: {what}, which merge-lora does not merge",
                                       hint="merge it with PEFT: PeftModel.from_pretrained(base, path).merge_and_unload()")
        m = _lora_key(name)
        if m is None and ".base_layer." in f".{name}":
            # the wrapped layer's own weight, saved with the adapter (PEFT does this for embeddings:
            # save_embedding_layers): it replaces the base's, and a LoRA update goes on top of it
            replaced[name.replace("base_layer.", "")] = v
            continue
        if m is None:
            if "lora_" in name:
                raise UnsupportedError(f"the adapter holds {key!r}, a LoRA tensor of a kind merge-lora does not know")
            replaced[name] = v  # modules_to_save: the whole tensor, trained
            continue
        mod, part, adapter_name, param = m
        if adapter_name:
            adapters.add(adapter_name)
        mods.setdefault(mod, {})[part + (".bias" if param == "bias" else "")] = v
    if len(adapters) > 1:
        raise UnsupportedError(f"the state dict holds several adapters ({', '.join(sorted(adapters))})",
                               hint="save each with save_pretrained and merge them one at a time")
    if not mods and not replaced:
        raise SelectionError("the adapter holds no LoRA tensors")
    stray = [k for k in replaced if k.rsplit(".", 1)[0] not in mods] if not config.get("modules_to_save") else []
    if stray:
        first = stray[0]
        raise UnsupportedError(f"the adapter holds {first!r}, which is neither a LoRA tensor nor listed in "
                               "modules_to_save")

    # ---- where each goes in the base
    base_keys = [k for k, v in base.state.items() if is_tensor_like(v)]
    wanted, candidates = [], {}
    targets = [t for t in config.get("target_parameters") or () if isinstance(t, str) and t]
    weight_of = config.get(WEIGHT_OF) or {}
    for mod, parts in mods.items():
        wanted.append(weight_of.get(mod, f"{mod}.weight"))
        if "B.bias" in parts:
            wanted.append(f"{mod}.bias")
        if targets:  # LoRA on a bare parameter: the parameters of its module the config targets
            candidates[mod] = _parameter_candidates(mod, targets)
    wanted += list(replaced)
    to_common, base_common, alignment = align_keys(wanted + [c for cs in candidates.values() for c in cs], base_keys)
    base_of = {c: k for k, c in base_common.items()}
    params = {}  # mod -> (base key, layout) for the LoRAs on bare parameters
    for mod, cands in candidates.items():
        if to_common[f"{mod}.weight"] in base_of and not mod.endswith(".base_layer"):
            continue  # a module's weight (target_modules): the usual merge
        present = [base_of[to_common[c]] for c in cands if to_common[c] in base_of]
        split = None if present else _split_experts(mod, mods[mod], cands, base.state)
        params[mod] = ("", "experts_split", split) if split else \
            _parameter_target(mod, mods[mod], present, refs_of=base.state) + (None,)
        wanted.remove(f"{mod}.weight")
    missing = [w for w in wanted if to_common[w] not in base_of]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SelectionError(f"the base has no {', '.join(map(repr, missing[:3]))}{more} (the adapter's targets)",
                             hint="is this the base model the adapter was trained on?")

    state = OrderedDict(base.state)
    storages: dict = {}
    refs = {k: as_ref(base.state[k], storages) for k in base_keys}
    tie_of = {k: tie_key(refs[k]) for k in base_keys}
    ties: dict = {}
    for k in base_keys:
        ties.setdefault(tie_of[k], []).append(k)
    merged, kinds = [], {}

    def put(base_key: str, ref) -> None:
        for k in ties[tie_of[base_key]]:  # tied names stay one tensor
            state[k] = refs[k] = ref  # refs: a LoRA update on a replaced weight goes on top of it

    swapped = []
    for name, v in replaced.items():
        bkey = base_of[to_common[name]]
        old, new = refs[bkey], as_ref(v)
        if tuple(old.shape) != tuple(new.shape):
            raise SelectionError(f"the adapter's {name!r} has shape {list(new.shape)}, "
                                 f"the base's {bkey} {list(old.shape)}")
        if new.dtype != old.dtype and new.dtype in PLAIN_FLOATS and old.dtype in PLAIN_FLOATS:
            new = cast_ref(new, old.dtype, label=bkey)  # the base's dtype
        put(bkey, new)
        swapped.append(bkey)
    for mod, parts in mods.items():
        wkey, layout, split = params[mod] if mod in params else \
            (base_of[to_common[weight_of.get(mod, f"{mod}.weight")]], None, None)
        if split:  # fused in memory, one weight per expert (and per part) in the file
            entry = _merge_split_experts(mod, parts, split, refs, put, config, scale)
            kinds["experts"] = kinds.get("experts", 0) + 1
            merged.append(entry)
            continue
        w = refs[wkey]
        if w.dtype not in PLAIN_FLOATS:
            raise UnsupportedError(f"{wkey} is {w.dtype}: merge-lora merges into floating-point weights")
        kind, a, b = _kind(mod, parts, w) if layout is None else (layout, as_ref(parts["A"]), as_ref(parts["B"]))
        experts = w.shape[0] if layout in ("experts", "experts_transposed") else 1
        r, alpha, scaling = _rank_alpha_scaling(mod, a, experts, config, scale)
        if layout is None:
            _check_shapes(mod, kind, a, b, w, fan_in_fan_out)
        put(wkey, assembled_ref(w.shape, w.dtype, _merged(w, a, b, kind, scaling, fan_in_fan_out), label=wkey))
        kinds[kind] = kinds.get(kind, 0) + 1
        entry = {"module": mod, "weight": wkey, "kind": kind, "r": int(r), "alpha": alpha, "scaling": scaling}
        if "B.bias" in parts:
            bkey = base_of[to_common[f"{mod}.bias"]]
            bias, lb = refs[bkey], as_ref(parts["B.bias"])
            if tuple(lb.shape) != tuple(bias.shape):
                raise SelectionError(f"{mod}: lora_B.bias has shape {list(lb.shape)}, the base bias {list(bias.shape)}")
            put(bkey, assembled_ref(bias.shape, bias.dtype, _biased(bias, lb, scaling), label=bkey))
            entry["bias"] = bkey
        merged.append(entry)
    changed = {k for e in merged for k in (e["weight"], e.get("bias"), *e.get("weights", ())) if k} | set(swapped)
    changed = {t for k in changed for t in ties[tie_of[k]]}
    report = {"operation": "merge-lora", "merged": merged, "by_kind": kinds, "replaced": swapped,
              "scale": scale, "rslora": rslora, "alignment": alignment,
              "untouched": len(base_keys) - len(changed),
              "wrapper_untouched": base.wrapper_keys()}
    if other_components:
        report["other_components"] = other_components
    if config.get(ALPHA_IS_RANK):
        report["alpha_is_rank"] = True
    ema = sum(k.startswith("model_ema.") for k in base_keys)
    if ema and any(k.startswith("model.diffusion_model.") for k in changed):
        report["notes"] = [f"the file also holds an EMA copy of the UNet (model_ema.*, {count(ema, 'tensor')}), left as it "
                           "is: Stable Diffusion tools run the non-EMA weights unless told to use the EMA ones"]
    source = base.source
    if source is not None and ad.source is not None:  # an output over the adapter needs --in-place too
        source = dc_replace(source, files=tuple(dict.fromkeys(source.files + ad.source.files)))
    return base.with_state(state, source=source), report


def _parameter_candidates(mod: str, targets: list[str]) -> list[str]:
    """The parameters of ``mod``'s module (``.base_layer`` nesting removed: PEFT wraps one
    ParamWrapper in the next for each parameter of a module) whose names end with one of the
    config's ``target_parameters``, as PEFT matches them."""
    owner = mod
    while owner.endswith(".base_layer"):
        owner = owner[: -len(".base_layer")]
    out = []
    for t in targets:
        name = f"{owner}.{t.rsplit('.', 1)[-1]}"
        if (name == t or name.endswith("." + t)) and name not in out:
            out.append(name)
    return out


def _parameter_target(mod: str, parts: dict, keys: list[str], refs_of) -> tuple[str, str]:
    """(base key, layout) of the one targeted parameter a LoRA on bare parameters fits, by shape:
    lora_A (E*r, in) and lora_B (out, r*E) fit a 2-D (out, in) weight ("linear"), a 3-D experts
    weight (E, out, in) ("experts") or, for a module whose experts are stored transposed, (E, in,
    out) ("experts_transposed"). PEFT reads the last from the module's ``is_transposed``, which
    no file holds: a square expert matrix that fits both ways is refused, never guessed."""
    if "B.bias" in parts or not {"A", "B"} <= set(parts):
        raise UnsupportedError(f"{mod}: a LoRA on a bare parameter with "
                               f"{'a lora_B bias' if 'B.bias' in parts else 'lora_A or lora_B missing'}",
                               hint="merge it with PEFT: PeftModel.from_pretrained(base, path).merge_and_unload()")
    a, b = as_ref(parts["A"]), as_ref(parts["B"])
    fits = []
    if len(a.shape) == 2 and len(b.shape) == 2:
        (ra, fan_in), (fan_out, rb) = a.shape, b.shape
        for key in keys:
            ws = tuple(as_ref(refs_of[key]).shape)
            if len(ws) == 2 and ra == rb and ws == (fan_out, fan_in):
                fits.append((key, "linear"))
            elif len(ws) == 3 and ra == rb and ws[0] and ra % ws[0] == 0:
                if ws[1:] == (fan_out, fan_in):
                    fits.append((key, "experts"))
                if ws[1:] == (fan_in, fan_out):
                    fits.append((key, "experts_transposed"))
    if len(fits) == 1:
        return fits[0]
    shapes = f"lora_A {list(a.shape)}, lora_B {list(b.shape)}"
    if not fits:
        raise SelectionError(f"{mod}: no targeted parameter ({', '.join(keys) or 'none in the base'}) fits {shapes}",
                             hint="is this the base model the adapter was trained on? (transformers may save "
                                  "fused experts under per-expert names: merge it with PEFT)")
    raise UnsupportedError(f"{mod}: {shapes} fit more than one way ({', '.join(f'{k} as {v}' for k, v in fits)}): "
                           "which one depends on the module (is_transposed), not on the file",
                           hint="merge it with PEFT: PeftModel.from_pretrained(base, path).merge_and_unload()")


# How files name the experts transformers >= 5 fuses in memory: ((module path in memory, in the
# file), {part: name in the file}). Qwen2/3-MoE, OLMoE, DeepSeek...: experts.{e}.gate_proj /
# up_proj / down_proj under the same path; Mixtral, PhiMoE: block_sparse_moe.experts.{e}.w1 / w3 / w2.
_EXPERT_FILES = ((("", ""), {}),
                 ((".mlp.experts", ".block_sparse_moe.experts"), {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}))


def _split_experts(mod: str, parts: dict, cands: list[str], state) -> dict | None:
    """Where a LoRA on a fused experts parameter goes when the file holds one weight per expert:
    transformers >= 5 fuses ``experts.{e}.gate_proj.weight`` + ``experts.{e}.up_proj.weight``
    into ``experts.gate_up_proj`` (E, out, in) -- the parts concatenated along ``out`` in the
    order the name gives them -- and ``experts.{e}.down_proj.weight`` into ``experts.down_proj``,
    and saves them split again. {"param", "experts": E, "pieces": [(e, key, row0, row1)]} for
    the one candidate whose per-expert weights exist and fit the LoRA's shapes; None otherwise."""
    if not {"A", "B"} <= set(parts) or "B.bias" in parts:
        return None
    a, b = as_ref(parts["A"]), as_ref(parts["B"])
    if len(a.shape) != 2 or len(b.shape) != 2:
        return None
    found = []
    for cand, scheme in ((c, sch) for c in cands for sch in _EXPERT_FILES):
        owner, _, pname = cand.rpartition(".")
        if not pname.endswith("_proj"):
            continue
        (mem_path, file_path), part_names = scheme
        if mem_path:
            if not owner.endswith(mem_path):
                continue
            owner = owner[: -len(mem_path)] + file_path
        names = [part_names.get(f"{n}_proj", f"{n}_proj") for n in pname[: -len("_proj")].split("_")]
        experts = 0
        while all(f"{owner}.{experts}.{n}.weight" in state for n in names):
            experts += 1
        if not experts:
            continue
        pieces, ok = [], True
        for e in range(experts):
            row = 0
            for n in names:
                key = f"{owner}.{e}.{n}.weight"
                shape = tuple(as_ref(state[key]).shape)
                ok = ok and len(shape) == 2 and shape[1] == a.shape[1]
                pieces.append((e, key, row, row + (shape[0] if shape else 0)))
                row += shape[0] if shape else 0
            ok = ok and row == b.shape[0]  # every expert: the fused rows lora_B gives
        if ok and a.shape[0] == b.shape[1] and a.shape[0] % experts == 0:
            found.append({"param": cand, "experts": experts, "pieces": pieces})
    return found[0] if len(found) == 1 else None


def _rank_alpha_scaling(mod: str, a: TensorRef, experts: int, config: dict, scale: float):
    """(r, alpha, scaling) of one module's update: r and alpha from the config (its patterns by
    PEFT's rule), or from lora_A's rows where the adapter records no alpha (alpha = r) or its own
    per module (a kohya file); ``experts`` updates share lora_A's rows."""
    r = _pattern_value(config.get("rank_pattern") or {}, mod, config.get("r"))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, mod, config.get("lora_alpha"))
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


def _merge_split_experts(mod, parts, split, refs, put, config, scale):
    """Merge PEFT's update of a fused experts parameter into the per-expert weights of the file
    (see _split_experts): expert e's update is lora_B[:, :, e] @ lora_A[e] (B's r*E axis ordered
    (r, E), A's (E, r)), its rows split among the parts."""
    a, b = as_ref(parts["A"]), as_ref(parts["B"])
    experts = split["experts"]
    r, alpha, scaling = _rank_alpha_scaling(mod, a, experts, config, scale)
    keys = []
    for e, key, row0, row1 in split["pieces"]:
        w = refs[key]
        if w.dtype not in PLAIN_FLOATS:
            raise UnsupportedError(f"{key} is {w.dtype}: merge-lora merges into floating-point weights")
        put(key, assembled_ref(w.shape, w.dtype, _expert_piece(w, a, b, e, experts, row0, row1, scaling), label=key))
        keys.append(key)
    return {"module": mod, "weight": keys[0], "weights": keys, "kind": "experts",
            "parameter": split["param"], "experts": experts, "r": int(r), "alpha": alpha, "scaling": scaling}


def _expert_piece(w: TensorRef, a: TensorRef, b: TensorRef, e: int, experts: int, row0: int, row1: int,
                  scaling: float):
    def build():
        base = w.to_torch()
        acc = _wide(base.dtype)
        A = a.to_torch().to(acc).reshape(experts, -1, a.shape[1])[e]
        B = b.to_torch().to(acc).reshape(b.shape[0], -1, experts)[row0:row1, :, e]
        delta = (B @ A).mul_(scaling).add_(base)
        return delta if delta.dtype == base.dtype else delta.to(base.dtype)
    return build


def _kind(mod: str, parts: dict, w: TensorRef):
    if "embedding_A" in parts or "embedding_B" in parts:
        if not {"embedding_A", "embedding_B"} <= set(parts):
            raise SelectionError(f"{mod}: lora_embedding_A or lora_embedding_B is missing")
        return "embedding", as_ref(parts["embedding_A"]), as_ref(parts["embedding_B"])
    if not {"A", "B"} <= set(parts):
        raise SelectionError(f"{mod}: lora_A or lora_B is missing")
    a, b = as_ref(parts["A"]), as_ref(parts["B"])
    if len(a.shape) == 2 and len(b.shape) == 2:
        return "linear", a, b
    if len(a.shape) == len(b.shape) == len(w.shape) and len(w.shape) in (3, 4, 5):
        return f"conv{len(w.shape) - 2}d", a, b
    raise SelectionError(f"{mod}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit a weight of "
                         f"shape {list(w.shape)}")


def _check_shapes(mod, kind, a, b, w, fan_in_fan_out) -> None:
    ws = tuple(w.shape)
    if kind == "linear":  # A: (r, in), B: (out, r); W: (out, in), or (in, out) with fan_in_fan_out
        want = (ws[1], ws[0]) if fan_in_fan_out and len(ws) == 2 else ws
        ok = len(ws) == 2 and b.shape[1] == a.shape[0] and (b.shape[0], a.shape[1]) == want
    elif kind == "embedding":  # A: (r, num_embeddings), B: (embedding_dim, r); W: (num_embeddings, embedding_dim)
        ok = len(ws) == 2 and b.shape[1] == a.shape[0] and (a.shape[1], b.shape[0]) == ws
    else:
        if a.shape[1] != ws[1]:
            raise UnsupportedError(f"{mod}: a grouped convolution (in-channels {ws[1]} per group, lora_A reads "
                                   f"{a.shape[1]}): merge it with PEFT")
        ok = b.shape[0] == ws[0] and b.shape[1] == a.shape[0] and all(s == 1 for s in b.shape[2:]) \
            and tuple(a.shape[2:]) == ws[2:]
    if not ok:
        raise SelectionError(f"{mod}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit the base "
                             f"weight {list(ws)}" + (" (fan_in_fan_out is on)" if fan_in_fan_out else ""),
                             hint="is this the base model the adapter was trained on?")


def _wide(dtype):
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def _merged(w: TensorRef, a: TensorRef, b: TensorRef, kind: str, scaling: float, fan_in_fan_out: bool):
    def build():
        import torch

        base = w.to_torch()
        acc = _wide(base.dtype)
        A, B = a.to_torch().to(acc), b.to_torch().to(acc)
        if kind in ("experts", "experts_transposed"):  # PEFT's ParamWrapper: A (E*r, in), B (out, r*E)
            e = base.shape[0]
            A3, B3 = A.reshape(e, -1, A.shape[-1]), B.reshape(B.shape[0], -1, e)
            delta = torch.einsum("ore,eri->eio" if kind == "experts_transposed" else "ore,eri->eoi", B3, A3)
        elif kind == "linear":
            delta = B @ A
            if fan_in_fan_out:
                delta = delta.T
        elif kind == "embedding":
            delta = (B @ A).T
        elif all(s == 1 for s in base.shape[2:]):  # 1x1: a matmul over channels
            delta = (B.flatten(1) @ A.flatten(1)).reshape(base.shape)
        else:  # compose the two convolutions: lora_B (1x1) after lora_A (k x k)
            conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}
            delta = conv[base.dim()](A.transpose(0, 1), B).transpose(0, 1)
        # one weight-sized buffer: the update, scaled, then the base added in (a + b rounds as b + a)
        delta = delta.contiguous().mul_(scaling).add_(base)
        return delta if delta.dtype == base.dtype else delta.to(base.dtype)
    return build


def _biased(bias: TensorRef, lb: TensorRef, scaling: float):
    def build():
        base = bias.to_torch()
        acc = _wide(base.dtype)
        return (base.to(acc) + lb.to_torch().to(acc) * scaling).to(base.dtype).contiguous()
    return build


# modules whose 2-D weight is an embedding table (PEFT gives nn.Embedding another LoRA layout);
# their changes are kept whole (modules_to_save) rather than guessed at
_EMBEDDING = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared)$")


def extract_lora(base: Checkpoint, tuned: Checkpoint, *, rank: int = 16) -> tuple[Checkpoint, dict]:
    """A PEFT LoRA adapter that turns ``base`` into ``tuned`` (the reverse of merge_lora): each
    changed 2-D weight becomes its best rank-``rank`` update (truncated SVD of tuned - base, in
    float32 or wider; exact when the change has that rank or less), and every other changed module
    (norms, biases, embeddings, convolutions) is kept whole in ``modules_to_save``. Returns the
    adapter's tensors (as PEFT's save_pretrained names them) and a report whose
    ``adapter_config`` is its adapter_config.json; :func:`save_adapter` writes both.

    Example::

        adapter, rep = extract_lora(load("llama-base/"), load("llama-sft/"), rank=32)
        save_adapter(adapter, rep["adapter_config"], "llama-sft-lora/")
    """
    from ckptsurgeon.compare import digest
    from ckptsurgeon.keys import module_of

    if rank < 1:
        raise SelectionError(f"--rank {rank} must be at least 1")
    bt = OrderedDict((k, as_ref(v)) for k, v in base.state.items() if is_tensor_like(v))
    tt = OrderedDict((k, as_ref(v)) for k, v in tuned.state.items() if is_tensor_like(v))
    to_common, tuned_common, alignment = align_keys(list(bt), list(tt))
    tuned_of = {c: k for k, c in tuned_common.items()}
    missing = [k for k in bt if to_common[k] not in tuned_of]
    extra = [k for k, c in tuned_common.items() if c not in set(to_common.values())]
    if missing or extra:
        n = len(missing or extra)
        what = (f"{count(n, 'tensor')} of the {'base' if missing else 'tuned checkpoint'} {'is' if n == 1 else 'are'} "
                f"not in the {'tuned checkpoint' if missing else 'base'} ({(missing or extra)[0]!r}...)")
        raise SelectionError(f"not the same model: {what}", hint="a LoRA adapter only changes existing weights")
    changed_by_module: "OrderedDict[str, list]" = OrderedDict()
    for k, b in bt.items():
        t = tt[tuned_of[to_common[k]]]
        if tuple(b.shape) != tuple(t.shape):
            raise SelectionError(f"{k}: shape {list(b.shape)} in the base, {list(t.shape)} in the tuned checkpoint",
                                 hint="a LoRA adapter only changes values, not shapes")
        if b.dtype != t.dtype or digest(b) != digest(t):
            changed_by_module.setdefault(module_of(k), []).append(k)
    keys_of: dict = {}
    for k in bt:
        keys_of.setdefault(module_of(k), []).append(k)
    state: OrderedDict = OrderedDict()
    targets, whole, entries = [], [], []
    ranks: dict = {}
    for mod, keys in changed_by_module.items():
        w = f"{mod}.weight" if mod else "weight"
        low_rank = (keys == [w] and len(bt[w].shape) == 2 and bt[w].dtype in PLAIN_FLOATS and tt[tuned_of[to_common[w]]].dtype
                    in PLAIN_FLOATS and not _EMBEDDING.search(mod) and mod != "")
        if not mod:
            raise SelectionError(f"top-level tensor{'s' if len(keys) > 1 else ''} changed ({', '.join(keys[:3])}): "
                                 "an adapter changes modules",
                                 hint="nest them under a module name, or keep the whole checkpoint")
        if not low_rank:  # the whole module as trained
            for k in keys_of[mod]:
                state[PEFT_PREFIX + k] = tt[tuned_of[to_common[k]]]
            whole.append(mod)
            continue
        a, b_, r, err = _factor(bt[w], tt[tuned_of[to_common[w]]], rank, label=w)
        state[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = a
        state[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = b_
        targets.append(mod)
        if r != rank:
            ranks[mod] = r
        entries.append({"module": mod, "shape": list(bt[w].shape), "r": r, "rel_error": err})
    if not state:
        raise SelectionError("the two checkpoints hold the same tensors: there is no change to extract")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": targets or None,
              "modules_to_save": whole or None, "rank_pattern": {_anchored(m): r for m, r in ranks.items()},
              "alpha_pattern": {_anchored(m): r for m, r in ranks.items()},  # scaling 1 everywhere
              "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
              "init_lora_weights": True, "inference_mode": True, "task_type": None,
              "base_model_name_or_path": base.source.path if base.source else None}
    report = {"operation": "extract-lora", "rank": rank, "low_rank": entries, "modules_to_save": whole,
              "alignment": alignment, "adapter_config": config,
              "max_rel_error": max((e["rel_error"] for e in entries), default=0.0)}
    return Checkpoint(state=state), report


def _anchored(module: str) -> str:
    """A rank_pattern key for this module (PEFT matches ``(.*\\.)?KEY$``: the full name, escaped)."""
    return re.escape(module)


def _factor(base: TensorRef, tuned: TensorRef, rank: int, label: str = ""):
    """(lora_A, lora_B, r, relative error) of a rank-r approximation of tuned - base.

    A matrix much larger than the rank goes through a randomized SVD (torch.svd_lowrank, 4 power
    iterations, 8 extra directions): a 4096x4096 full SVD takes tens of seconds on two cores, and a
    change of rank <= r is still recovered exactly. The error is measured, not estimated."""
    import torch

    b, t = base.to_torch(), tuned.to_torch()
    acc = _wide(b.dtype)
    delta = t.to(acc) - b.to(acc)
    if not bool(torch.isfinite(delta).all()):
        raise SelectionError(f"{label}: the difference holds NaN or inf; no low-rank update describes it",
                             hint="check both checkpoints with ckpt-surgeon inspect --values")
    small = min(delta.shape)
    r = min(rank, small)
    if small > 2 * (r + 8):
        torch.manual_seed(0)  # the same adapter from the same inputs
        u, s, v = torch.svd_lowrank(delta, q=r + 8, niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:r].sqrt()
    lora_b = (u[:, :r] * root).contiguous()   # (out, r)
    lora_a = (root[:, None] * vh[:r]).contiguous()  # (r, in)
    total = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
    left = float(torch.linalg.vector_norm(delta - lora_b @ lora_a, dtype=torch.float64))
    return lora_a, lora_b, r, (left / total if total > 0 else 0.0)


def save_adapter(adapter: Checkpoint, config: dict, folder, *, dry_run: bool = False) -> dict:
    """Write a PEFT adapter folder: adapter_model.safetensors and adapter_config.json."""
    from ckptsurgeon.atomic import atomic_output
    from ckptsurgeon.errors import OutputError
    from ckptsurgeon.saving import save

    folder = os.fspath(folder)
    if os.path.isfile(folder):
        raise OutputError(f"{folder} is a file; an adapter is a folder")
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise OutputError(f"output directory {parent} does not exist")
    if dry_run:  # reported as if written; the folder need not exist yet
        rep = save(adapter, os.path.join(parent, "adapter_model.safetensors"), dry_run=True)
        rep["output"] = folder
        return rep
    os.makedirs(folder, exist_ok=True)
    rep = save(adapter, os.path.join(folder, "adapter_model.safetensors"))
    with atomic_output(os.path.join(folder, "adapter_config.json")) as fd:
        os.write(fd, (json.dumps(config, indent=2) + "\n").encode())
    rep["output"] = folder
    return rep


def _human_extract(r: dict) -> None:
    n = len(r["low_rank"])
    if n:
        worst = max(r["low_rank"], key=lambda e: e["rel_error"])
        click.echo(f"{count(n, 'changed weight')} as rank-{r['rank']} LoRA updates; largest relative error "
                   f"{worst['rel_error']:.3g} ({worst['module']})")
    if r["modules_to_save"]:
        click.echo(f"{count(len(r['modules_to_save']), 'changed module')} kept whole (modules_to_save): "
                   + ", ".join(r["modules_to_save"][:6]) + (" ..." if len(r["modules_to_save"]) > 6 else ""))
    if r["alignment"].get("applied"):
        cliutil.echo_notes([r["alignment"]["note"]])
    cliutil.echo_save(r["save"])


def _human(r: dict) -> None:
    kinds = ", ".join(f"{n} {k}" for k, n in r["by_kind"].items())
    weights = sum(len(e.get("weights", (e["weight"],))) for e in r["merged"])
    click.echo(f"merged LoRA into {count(weights, 'weight')} ({kinds})"
               + (f" at scale {r['scale']}" if r["scale"] != 1.0 else ""))
    scalings = sorted({e["scaling"] for e in r["merged"]})
    if scalings:
        click.echo(f"  scaling (alpha / {'sqrt(r)' if r['rslora'] else 'r'}): "
                   + ", ".join(f"{s:g}" for s in scalings[:6]) + (" ..." if len(scalings) > 6 else ""))
    biases = sum("bias" in e for e in r["merged"])
    if biases:
        click.echo(f"  and {count(biases, 'bias', 'biases')} (lora_bias)")
    if r["replaced"]:
        click.echo(f"took {count(len(r['replaced']), 'tensor')} whole from the adapter (modules_to_save, saved base layers): "
                   f"{', '.join(r['replaced'][:6])}" + (" ..." if len(r["replaced"]) > 6 else ""))
    if r["alignment"].get("applied"):
        cliutil.echo_notes([r["alignment"]["note"]])
    if r.get("alpha_is_rank"):
        cliutil.echo_notes(["the adapter records no alpha (a diffusers LoRA file without its config, a kohya "
                            "module without .alpha): such a module's alpha is its rank, scale 1, as those tools load it"])
    if r.get("other_components"):
        cliutil.echo_notes([f"the adapter's updates for {', '.join(r['other_components'])} are not for this base "
                            "(merge each into its own model folder)"])
    cliutil.echo_notes(r.get("notes"))
    click.echo(f"{count(r['untouched'], 'other tensor')} copied as {'it is' if r['untouched'] == 1 else 'they are'}")
    cliutil.echo_save(r["save"])


@click.command("merge-lora")
@click.argument("base")
@click.argument("adapter")
@click.option("--scale", default=1.0, type=float, show_default=True,
              help="Multiply every LoRA update by this (0.5: half strength; -1 takes a merged adapter back out).")
@cliutil.load_options
@cliutil.write_options
@cliutil.json_option
def merge_lora_cmd(base, adapter, scale, key, trust_pickle, as_json, **write):
    """Merge a PEFT LoRA adapter into its base model's weights.

    BASE is the base checkpoint (a Hugging Face folder, .safetensors, .pt...); ADAPTER is the
    folder PEFT's save_pretrained wrote (adapter_config.json + adapter_model.safetensors), a
    diffusers LoRA (pytorch_lora_weights.safetensors) or a kohya-ss LoRA file (lora_unet_*
    names) for the model it was trained on.
    Merged weights are computed one at a time as they are written; the rest is copied.

    \b
    Examples:
      ckpt-surgeon merge-lora llama-base/ my-lora/ -o llama-merged/ --max-shard-size 5GB
      ckpt-surgeon merge-lora base.safetensors my-lora/ -o merged.safetensors --scale 0.5
      ckpt-surgeon merge-lora sd15/unet/ style_lora.safetensors -o sd15_styled_unet/
      ckpt-surgeon merge-lora v1-5-pruned.safetensors style_lora.safetensors -o v1-5-styled.safetensors
    """
    ck = cliutil.load(base, key, trust_pickle)
    new, report = merge_lora(ck, adapter, scale=scale, trust_pickle=trust_pickle)
    report["save"] = cliutil.save(new, **write)
    cliutil.emit(report, as_json, _human)


@click.command("extract-lora")
@click.argument("base")
@click.argument("tuned")
@click.option("--rank", default=16, type=int, show_default=True, help="LoRA rank of each update.")
@click.option("-o", "--output", required=True, metavar="FOLDER", help="The adapter folder to write.")
@click.option("--dry-run", is_flag=True, help="Report what would be written; write nothing.")
@cliutil.load_options
@cliutil.json_option
def extract_lora_cmd(base, tuned, rank, output, dry_run, key, trust_pickle, as_json):
    """Extract a PEFT LoRA adapter that turns BASE into TUNED (truncated SVD of each change).

    Changed 2-D weights become rank-RANK updates (exact when the change has that rank or less);
    other changed modules (norms, biases, embeddings) are kept whole. The folder loads with
    PeftModel.from_pretrained(base_model, FOLDER) and with ckpt-surgeon merge-lora.

    \b
    Example:
      ckpt-surgeon extract-lora llama-base/ llama-sft/ -o llama-sft-lora/ --rank 32
    """
    b = cliutil.load(base, key, trust_pickle)
    t = cliutil.load(tuned, key, trust_pickle)
    adapter, report = extract_lora(b, t, rank=rank)
    report["save"] = save_adapter(adapter, report["adapter_config"], output, dry_run=dry_run)
    report["save"]["dry_run"] = dry_run
    cliutil.emit(report, as_json, _human_extract)


@hookimpl
def ckptsurgeon_commands():
    return [merge_lora_cmd, extract_lora_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("merge_lora", merge_lora, "merge a PEFT LoRA adapter into its base weights"),
            Operation("extract_lora", extract_lora, "a LoRA adapter from the difference of two checkpoints"),
            Operation("save_adapter", save_adapter, "write a PEFT adapter folder")]
