"""kohya-ss (sd-scripts) LoRA files for merge-lora: module names with dots as underscores after a
model prefix (``lora_unet_``, ``lora_te1_``...), mapped onto a diffusers, LDM single-file or
OpenCLIP base; ``.alpha`` tensors as exact per-module alphas. It registers nothing itself."""

from __future__ import annotations

import re
from collections import OrderedDict

from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.dtypes import count
from ckptsurgeon.errors import SelectionError, UnsupportedError
from ckptsurgeon.refs import as_ref, is_tensor_like

from .lora_adapters import ALPHA_IS_RANK, MODULE_ALPHAS, OTHER_PARTS, WEIGHT_OF, finite_number

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
    return finite_number(float(value.float().reshape(-1)[0]), f"{kname}.alpha", False)


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
