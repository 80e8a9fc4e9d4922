"""extract-lora: a PEFT LoRA adapter from the difference between a base model and its
fine-tune, each changed weight factored to the given rank (the largest singular values of
``tuned - base``), written as a folder PEFT loads; the reverse of merge-lora.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict

import click

from ckptsurgeon import cliutil
from ckptsurgeon.checkpoint import Checkpoint
from ckptsurgeon.dtypes import PLAIN_FLOATS, count
from ckptsurgeon.errors import SelectionError
from ckptsurgeon.keys import align_keys
from ckptsurgeon.refs import TensorRef, as_ref, is_tensor_like

from .lora_adapters import PEFT_PREFIX


# modules whose 2-D weight is an embedding table (PEFT gives nn.Embedding another LoRA layout);
# their changes are kept whole (modules_to_save) rather than guessed at
def accumulation_dtype(dtype):
    """The dtype a LoRA product is computed in: float64 for float64 weights, else float32."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


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
    acc = accumulation_dtype(b.dtype)
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
