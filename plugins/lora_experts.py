"""merge-lora on mixture-of-experts weights saved one per expert: transformers >= 5 fuses the
experts of Qwen-MoE, OLMoE, DeepSeek or Mixtral into one parameter in memory, PEFT trains its LoRA
on that fused parameter, and the checkpoint still holds one weight per expert. The update is
split back into each expert's weights here; :mod:`.lora` merges everything else."""

from __future__ import annotations

from ckptsurgeon.dtypes import PLAIN_FLOATS
from ckptsurgeon.errors import UnsupportedError
from ckptsurgeon.layout import assembled_ref
from ckptsurgeon.refs import TensorRef, as_ref

from .lora_adapters import rank_alpha_scaling
from .lora_extract import accumulation_dtype


# How files name the experts transformers >= 5 fuses in memory: ((module path in memory, in the
# file), {part: name in the file}). Qwen2/3-MoE, OLMoE, DeepSeek...: experts.{e}.gate_proj /
# up_proj / down_proj under the same path; Mixtral, PhiMoE: block_sparse_moe.experts.{e}.w1 / w3 / w2.
_EXPERT_FILES = ((("", ""), {}),
                 ((".mlp.experts", ".block_sparse_moe.experts"), {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}))


def split_experts(mod: str, parts: dict, cands: list[str], state) -> dict | None:
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


def merge_split_experts(mod, parts, split, refs, put, config, scale):
    """Merge PEFT's update of a fused experts parameter into the per-expert weights of the file
    (see split_experts): expert e's update is lora_B[:, :, e] @ lora_A[e] (B's r*E axis ordered
    (r, E), A's (E, r)), its rows split among the parts."""
    a, b = as_ref(parts["A"]), as_ref(parts["B"])
    experts = split["experts"]
    r, alpha, scaling = rank_alpha_scaling(mod, a, experts, config, scale)
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
        acc = accumulation_dtype(base.dtype)
        A = a.to_torch().to(acc).reshape(experts, -1, a.shape[1])[e]
        B = b.to_torch().to(acc).reshape(b.shape[0], -1, experts)[row0:row1, :, e]
        delta = (B @ A).mul_(scaling).add_(base)
        return delta if delta.dtype == base.dtype else delta.to(base.dtype)
    return build
