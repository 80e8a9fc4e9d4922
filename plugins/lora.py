"""merge-lora: fold a PEFT LoRA adapter into its base model's weights, tensor by tensor (and the
plugin's registration of extract-lora, the reverse, which lives in :mod:`.lora_extract`; adapters
are read by :mod:`.lora_adapters`; MoE weights saved one per expert are merged by :mod:`.lora_experts`).

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

import math
import os
import re
from collections import OrderedDict
from dataclasses import replace as dc_replace

import click

from ckptsurgeon import cliutil, hookimpl
from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.dtypes import PLAIN_FLOATS, count
from ckptsurgeon.errors import SelectionError, UnsupportedError
from ckptsurgeon.keys import align_keys
from ckptsurgeon.layout import assembled_ref, cast_ref
from ckptsurgeon.refs import TensorRef, as_ref, is_tensor_like, tie_key
from ckptsurgeon.types import Operation

from .lora_adapters import (ALPHA_IS_RANK, OTHER_PARTS, PEFT_PREFIX, REFUSED, WEIGHT_OF, adapter_component, check_config,
                            lora_key, rank_alpha_scaling, read_adapter)
from .lora_experts import merge_split_experts, split_experts
from .lora_extract import accumulation_dtype, extract_lora, extract_lora_cmd, save_adapter
from .lora_kohya import from_kohya


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
    ad, config, other_components = adapter_component(ad, config, base_tensor_keys)
    ad, config = from_kohya(ad, config, base_tensor_keys)
    other_components = other_components + list(config.get(OTHER_PARTS, ()))
    check_config(config)
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
        for marker, what in REFUSED.items():
            if marker in name.split("."):
                raise UnsupportedError(f"the adapter holds {key!r}: {what}, which merge-lora does not merge",
                                       hint="merge it with PEFT: PeftModel.from_pretrained(base, path).merge_and_unload()")
        m = lora_key(name)
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
        split = None if present else split_experts(mod, mods[mod], cands, base.state)
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
            entry = merge_split_experts(mod, parts, split, refs, put, config, scale)
            kinds["experts"] = kinds.get("experts", 0) + 1
            merged.append(entry)
            continue
        w = refs[wkey]
        if w.dtype not in PLAIN_FLOATS:
            raise UnsupportedError(f"{wkey} is {w.dtype}: merge-lora merges into floating-point weights")
        kind, a, b = _kind(mod, parts, w) if layout is None else (layout, as_ref(parts["A"]), as_ref(parts["B"]))
        experts = w.shape[0] if layout in ("experts", "experts_transposed") else 1
        r, alpha, scaling = rank_alpha_scaling(mod, a, experts, config, scale)
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


def _merged(w: TensorRef, a: TensorRef, b: TensorRef, kind: str, scaling: float, fan_in_fan_out: bool):
    def build():
        import torch

        base = w.to_torch()
        acc = accumulation_dtype(base.dtype)
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
        acc = accumulation_dtype(base.dtype)
        return (base.to(acc) + lb.to_torch().to(acc) * scaling).to(base.dtype).contiguous()
    return build


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


@hookimpl
def ckptsurgeon_commands():
    return [merge_lora_cmd, extract_lora_cmd]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("merge_lora", merge_lora, "merge a PEFT LoRA adapter into its base weights"),
            Operation("extract_lora", extract_lora, "a LoRA adapter from the difference of two checkpoints"),
            Operation("save_adapter", save_adapter, "write a PEFT adapter folder")]
