"""Loading a checkpoint into a built model (verify, check, fold-bn, bn-to-gn): its names aligned
to the model's (:func:`keys.align_to_model`: wrapper prefixes, re-rooting), the modules' saved
versions passed on, and -- for a transformers model whose checkpoint another transformers version
wrote -- the tensors put in as transformers' own loading would (its key renames, fused or split
weights, ``gamma``/``beta``).
"""

from __future__ import annotations

from collections import OrderedDict

from .keys import align_to_model, detect_prefix, rename_metadata

def load_into_model(model, ck, *, strict: bool = True) -> str:
    """Load a Checkpoint into ``model`` with automatic prefix alignment; returns how it aligned.

    With ``strict`` every model key must be present with the right shape and no checkpoint
    tensor may be left over: otherwise a ModelError lists missing/unexpected/mismatched keys.
    """
    from .errors import ModelError
    from .refs import is_tensor_like

    model_sd = model.state_dict()
    ck_keys = [k for k, v in ck.state.items() if is_tensor_like(v)]
    how, fn = align_to_model(ck_keys, list(model_sd))
    sub, unexpected, mismatched = OrderedDict(), [], []
    for k in ck_keys:
        mk = fn(k)
        if mk not in model_sd:
            unexpected.append(k)
            continue
        v = ck.state[k]
        if tuple(v.shape) != tuple(model_sd[mk].shape):
            mismatched.append(f"{mk} {list(v.shape)} vs model {list(model_sd[mk].shape)}")
            continue
        sub[mk] = v.to_torch() if hasattr(v, "to_torch") else v
    # a key tied to one that loads (GPT-2's lm_head.weight = wte.weight, dropped by save_pretrained)
    # is not missing: the module shares the parameter
    ties: dict = {}
    for k, t in model_sd.items():
        if t.numel():
            ties.setdefault((t.data_ptr(), tuple(t.shape)), []).append(k)
    tied_ok = {k for group in ties.values() if len(group) > 1 and any(g in sub for g in group)
               for k in group}
    missing = [k for k in model_sd if k not in sub and k not in tied_ok]
    if strict and (missing or unexpected or mismatched):
        converted = _load_via_transformers(model, ck, ck_keys)
        if converted:
            return converted
        if _is_transformers_model(model):
            how += "; transformers' own conversions (from_pretrained) did not load it either"
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:6])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:6])}")
        if mismatched:
            parts.append(f"shape mismatch {len(mismatched)}: {', '.join(mismatched[:4])}")
        raise ModelError(f"checkpoint does not load strictly into the model ({how}): " + "; ".join(parts))
    import torch

    meta = _metadata_for_model(ck, fn, model_sd)
    if meta is not None:
        sub._metadata = meta
    with torch.no_grad():
        model.load_state_dict(sub, strict=False)
    return how


def _metadata_for_model(ck, fn, model_sd):
    """The module versions to load with (``state_dict._metadata``): the checkpoint's, renamed as
    its keys were aligned; for a checkpoint without them (a dict rebuilt by hand, a safetensors
    file), the model's own. Without any, torch passes each module version None, which some
    modules refuse (torchvision's MNASNet raises) and others read as an old layout."""
    import copy

    from .values import materialize

    if getattr(ck, "metadata", None) is not None:
        try:
            return rename_metadata(copy.deepcopy(materialize(ck.metadata)), fn)
        except Exception:  # noqa: BLE001 - inert or odd records in the file's metadata: use the model's
            pass
    own = getattr(model_sd, "_metadata", None)
    return copy.deepcopy(own) if own is not None else None


def _is_transformers_model(model) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(type(model), "from_pretrained") \
        and hasattr(model, "config")


def transformers_convert(model, ck, ck_keys: list[str], *, lenient: bool = False):
    """The checkpoint's tensors as transformers' own loading puts them into ``model``'s class
    (``from_pretrained(None, config=model.config, state_dict=...)``: its key renames, fused or
    split experts and qkv, ``gamma``/``beta``...), for a checkpoint whose names or layout are
    another transformers version's. Returns (state dict in the model's names, loading info with
    missing/unexpected/mismatched keys, how) or None where transformers cannot load it at all.
    ``lenient`` lets shapes mismatch (reported in the info) instead of failing."""
    if not _is_transformers_model(model):
        return None
    import logging
    import warnings

    import torch

    prefix = detect_prefix(ck_keys)
    state = OrderedDict()
    for k in ck_keys:
        v = ck.state[k]
        state[k[len(prefix):]] = v.to_torch() if hasattr(v, "to_torch") else v
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.CRITICAL)  # its load report and warnings: the caller reports what happened
    try:
        from transformers.utils import logging as tlog

        bars = tlog.is_progress_bar_enabled()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - an older transformers without these switches
        tlog, bars = None, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other, info = type(model).from_pretrained(None, config=model.config, state_dict=state, dtype=dtype,
                                                      output_loading_info=True, ignore_mismatched_sizes=lenient)
    except Exception:  # noqa: BLE001 - transformers could not load it either: report the plain mismatch
        return None
    finally:
        log.setLevel(level)
        if tlog is not None and bars:
            tlog.enable_progress_bar()
    renamed = len(set(state) ^ set(model.state_dict()))
    how = (f"strip {prefix!r}, " if prefix else "") + \
        f"converted by transformers' own loading ({renamed} names differ from the model's)"
    # what it did not take, as given (a conv bias fold-bn added, in a model class built without it)
    info["unexpected_tensors"] = {k: state[k] for k in info.get("unexpected_keys") or () if k in state}
    return other.state_dict(), info, how


def _load_via_transformers(model, ck, ck_keys: list[str]) -> str | None:
    """Load through :func:`transformers_convert` when that, together with what it did not take,
    loads ``model`` strictly; returns how, or None (the caller then reports the plain mismatch).

    transformers converts into a model freshly built from the config; ``model`` may have been
    changed since by a surgery's transform (fold-bn: BatchNorms gone, biases added). So the
    tensors it converted are used (not the fresh ones it made up for what the file lacks: the
    folded BatchNorms) plus those it did not take, under their own names (the added biases), and
    ``model`` must take exactly that set."""
    got = transformers_convert(model, ck, ck_keys)
    if got is None:
        return None
    converted, info, how = got
    if info.get("mismatched_keys") or info.get("error_msgs"):
        return None
    missing = set(info.get("missing_keys") or ())
    state = {k: v for k, v in converted.items() if k not in missing}
    for k, v in info.get("unexpected_tensors", {}).items():
        state.setdefault(k, v)
    import torch

    try:
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
    except RuntimeError:
        return None
    return how
