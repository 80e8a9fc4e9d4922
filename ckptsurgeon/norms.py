"""Norm layers told from a state dict's names and shapes alone (no torch): BatchNorm, GroupNorm,
LayerNorm, RMSNorm, InstanceNorm, for inspect and bn-to-gn."""

from __future__ import annotations

import re
from collections import OrderedDict

from .keys import group_by_module, module_of

_IN_NAME = re.compile(r"(^|[._])(in\d*|inorm|instance_?norm\d*|instnorm\d*)($|[._])", re.I)
_BN_NAME = re.compile(r"(^|[._])(bn\d*|batch_?norm\d*|downsample\.1|norm\d*)($|[._])", re.I)
_GN_NAME = re.compile(r"(^|[._])(gn\d*|group_?norm\d*)($|[._])", re.I)
_LN_NAME = re.compile(r"(^|[._])(ln\w*|layer_?norm\w*|norm\w*|ln_f|ln_\d+)($|[._])", re.I)
_LN_ONLY = re.compile(r"(^|[._])(ln\w*|layer_?norm\w*|ln_f|ln_\d+)($|[._])", re.I)  # says LayerNorm, not just norm


def detect_norms(shapes: "OrderedDict[str, tuple]") -> list[dict]:
    """Norm layers inferred from key sets and shapes; ``kind`` is BatchNorm, InstanceNorm,
    BatchNorm-or-InstanceNorm (tracked statistics, name gives no hint), LayerNorm, RMSNorm (or
    RMSNorm-or-LayerNorm: a weight without bias), GroupNorm, GroupNorm-or-LayerNorm (weight+bias
    named only ``norm...`` beside convolutions: a diffusers ResNet block's ``norm1`` is a GroupNorm,
    a ConvNeXt block's ``norm`` a LayerNorm; beside linear layers alone it is taken for a
    LayerNorm, as in every transformer) or norm (affine 1-D weight+bias with a name that says no
    more)."""
    out = []
    groups = group_by_module(shapes.keys())
    beside_conv = set()  # parents with a convolution among their direct children
    for mod, leaves in groups.items():
        w = shapes.get((mod + ".weight") if mod else "weight") if "weight" in leaves else None
        if w is not None and len(w) >= 3:
            beside_conv.add(module_of(mod))
    for mod, leaves in groups.items():
        leafset = set(leaves)
        full = (mod + ".") if mod else ""
        if {"running_mean", "running_var"} <= leafset:
            channels = (shapes[full + "running_mean"] or [0])[0]
            tail = mod.rsplit(".", 1)[-1] if mod else mod
            if _IN_NAME.search(tail or ""):
                kind = "InstanceNorm"
            elif _BN_NAME.search(tail or "") or "bn" in (tail or "").lower():
                kind = "BatchNorm"
            else:
                kind = "BatchNorm-or-InstanceNorm"
            out.append({"module": mod, "kind": kind, "channels": channels, "affine": "weight" in leafset})
        elif leafset == {"weight", "bias"} or leafset == {"weight"}:
            w = shapes[full + "weight"]
            b = shapes.get(full + "bias")
            if b is not None and tuple(w) != tuple(b):
                continue
            if len(w) != 1 and not (_LN_NAME.search(mod.rsplit(".", 1)[-1] if mod else "") and len(w) >= 1):
                continue
            tail = mod.rsplit(".", 1)[-1] if mod else ""
            if _GN_NAME.search(tail):
                kind = "GroupNorm"
            elif _IN_NAME.search(tail):
                kind = "InstanceNorm"
            elif _LN_NAME.search(tail) or len(w) > 1:
                # no bias: RMSNorm (Llama, T5, Mistral) or a LayerNorm(bias=False); the key set is the same
                if b is None:
                    kind = "RMSNorm" if "rms" in tail.lower() else "RMSNorm-or-LayerNorm"
                elif (mod and module_of(mod) in beside_conv) and not _LN_ONLY.search(tail):
                    kind = "GroupNorm-or-LayerNorm"
                else:
                    kind = "LayerNorm"
            elif _BN_NAME.search(tail):
                kind = "norm"
            else:
                continue  # 1-D weight with an uninformative name: could be anything (e.g. a scale)
            out.append({"module": mod, "kind": kind, "channels": w[0] if w else 0, "affine": True})
    return out
