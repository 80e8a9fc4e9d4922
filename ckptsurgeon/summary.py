"""``inspect()``: what a checkpoint holds, from headers and the pickle only (no tensor bytes).

Example::

    info = ckptsurgeon.inspect("model_dp.pt")
    info["prefix"]        # 'module.'
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Mapping

from .checkpoint import Checkpoint, flatten, tensor_info
from .dtypes import count
from .errors import AmbiguousStateDictError, NoStateDictError
from .keys import detect_prefix, module_tree, prefix_report
from .norms import detect_norms
from .locate import _RNG_KEYS, RNG_NOTE, describe_optimizer, describe_training_state, key_paths, nests_tensors
from .inert import InertObject
from .refs import TensorRef, is_tensor_like, tie_key


def shared_storages(ck: Checkpoint) -> list[dict]:
    """Storages that several different tensors are views of (a DeepSpeed or Megatron flat
    parameter buffer): ``{"tensors": n, "bytes": storage size}`` each, largest first. Names of
    one tied tensor count once."""
    first: dict = {}  # storage -> its first view; most storages have one (a view key each: 10^5 tuples)
    views: dict = {}
    for _name, v in ck.tensor_items():
        if isinstance(v, TensorRef):
            one = first.setdefault(id(v.storage), v)
            if one is not v:
                views.setdefault(id(v.storage), (v.storage, {tie_key(one)}))[1].add(tie_key(v))
    out = [{"tensors": len(keys), "bytes": storage.nbytes} for storage, keys in views.values() if len(keys) > 1]
    return sorted(out, key=lambda d: -d["bytes"])


def broadcast_views(ck: Checkpoint) -> list[dict]:
    """Tensors more than twice as large dense as the storage they view (``expand``: stride 0):
    ``{"name", "dense_bytes", "storage_bytes"}``, largest first. Written dense (safetensors, a
    cast) they take their dense size; a torch zip keeps them as views."""
    out = [{"name": k, "dense_bytes": v.nbytes, "storage_bytes": v.storage.nbytes} for k, v in ck.tensor_items()
           if isinstance(v, TensorRef) and v.nbytes > 2 * v.storage.nbytes and v.nbytes > 4096]
    return sorted(out, key=lambda d: -d["dense_bytes"])


def describe_value(v: Any) -> str:
    if is_tensor_like(v):
        i = tensor_info(v)
        return f"tensor {i['dtype']}{i['shape']}"
    if isinstance(v, Mapping):
        # a small flat mapping of plain values (Lightning's hyper_parameters, a config): show them
        if 0 < len(v) <= 12 and all(isinstance(k, str) for k in v) and \
                all(isinstance(x, (int, float, bool, str)) or x is None for x in v.values()):
            text = "{" + ", ".join(f"{k}: {x!r}" for k, x in v.items()) + "}"
            if len(text) <= 120:
                return text
        return f"dict ({count(len(v), 'key')})"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__} ({count(len(v), 'item')})"
    if isinstance(v, InertObject) or (isinstance(v, type) and issubclass(v, InertObject)):
        what = v if isinstance(v, type) else type(v)
        return f"{what.inert_module}.{what.inert_name} ({'class, ' if v is what else ''}inert)"
    if type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        v = v.item()  # a numpy scalar (np.float64(0.91), np.int64(3)): show its value
    elif type(v).__name__ == "ndarray" and hasattr(v, "shape"):
        return f"ndarray {v.dtype}{list(v.shape)}"
    if isinstance(v, (int, float, bool, str)) or v is None:
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."
    return type(v).__name__


def inspect(source, *, depth: int = 2, values: bool = False, key=None, trust_pickle=False, tensors: bool = False,
            match=()) -> dict:
    """A JSON-able summary of a checkpoint (path or Checkpoint). ``values=True`` also reads the
    tensors to count NaN/Inf (the only option that touches tensor bytes). ``tensors=True`` adds
    ``tensor_list``: every tensor's name, dtype, shape and size (from the headers); ``match``
    (module paths, globs or ``re:`` regexes, as for extract) keeps the tensors it names, and a
    pattern that names none is an error.

    Example::

        inspect("model.safetensors", match=["*norm*"])["tensor_list"][0]["shape"]
    """
    from .loading import load

    chosen, why = True, ""
    try:
        ck = source if isinstance(source, Checkpoint) else load(source, key=key, trust_pickle=trust_pickle)
    except (AmbiguousStateDictError, NoStateDictError) as e:
        if e.overview is None:
            raise
        ck, chosen = e.overview, False  # an optimizer state, several models, an RNG state: the whole file
        optimizer = describe_optimizer(ck.wrapper, [tuple(c.split("/")) for c in ck.candidates])
        why = (f"{optimizer}: pick a parameter's state with --key (e.g. --key state/0) to see it" if optimizer
               else f"{len(ck.candidates)} state dicts and none is clearly the model's: pick one with --key to see it"
               if isinstance(e, AmbiguousStateDictError) else describe_training_state(ck.wrapper) or e.one_line())
    src = ck.source
    infos = OrderedDict((k, tensor_info(v)) for k, v in ck.tensor_items())
    shapes = OrderedDict((k, tuple(i["shape"])) for k, i in infos.items())
    sizes = OrderedDict((k, i["numel"]) for k, i in infos.items())
    wrapper = {}
    if isinstance(ck.wrapper, Mapping):
        for k, v in ck.wrapper.items():
            wrapper[str(k)] = describe_value(v)
    elif isinstance(ck.wrapper, (list, tuple)):  # torch.save((model_sd, optim_sd, epoch)): by position
        for i, v in enumerate(ck.wrapper[:50]):
            wrapper[str(i)] = describe_value(v)
        if len(ck.wrapper) > 50:
            wrapper["..."] = f"{count(len(ck.wrapper) - 50, 'more item')}"
    summ = ck.summary(infos.values())
    tied = ck.tied()
    prefix = detect_prefix(shapes.keys())
    tree_sizes = OrderedDict((k[len(prefix):], n) for k, n in sizes.items()) if prefix else sizes
    out = {
        "path": src.path if src else None,
        "format": src.format if src else None,
        "program": (src.program or None) if src else None,  # a TorchScript / torch.export archive
        "file_size": src.size if src else None,
        "files": list(src.files) if src else [],
        "lazy": src.lazy if src else False,
        "state_dict_at": ("/".join(map(str, ck.sd_path)) or "<bare>") if chosen else None,
        "candidates": list(ck.candidates),
        "candidate_sizes": [] if chosen else candidate_sizes(ck.wrapper, ck.candidates),
        "wrapper": wrapper,
        "tensors": summ["tensors"],
        "parameters": summ["parameters"],
        "tied": [list(t) for t in tied],  # (alias, name): one tensor under two names
        "shared_storages": shared_storages(ck),
        "broadcast_views": broadcast_views(ck),
        "unique_parameters": summ["parameters"] - sum(sizes[a] for a, _ in tied),
        "bytes": summ["bytes"],
        "bytes_by_dtype": summ["bytes_by_dtype"],
        "non_tensor_entries": [k for k, v in ck.state.items() if not is_tensor_like(v)],
        "prefix": prefix,
        "prefixes_seen": prefix_report(shapes.keys()),
        "norm_layers": detect_norms(shapes),
        "modules": module_tree(tree_sizes, depth),  # below the wrapper prefix, if any
        "modules_below": prefix,
        "has_module_metadata": ck.metadata is not None,
        "safetensors_metadata": dict(ck.st_metadata),
        "transforms": list(ck.transforms),
        "notes": list(ck.notes) + ([why] if why else []) + ([RNG_NOTE] if chosen and looks_like_rng_state(infos, ck.state)
                                                             else []),
    }
    if (tensors or match) and not chosen:
        out["tensor_list"] = candidate_tensor_list(ck.wrapper, ck.candidates, match)
    elif tensors or match:
        out["tensor_list"] = tensor_list(infos, tied, match, prefix)
        if src and len(src.files) > 1:  # a sharded folder: which file holds each tensor
            folder = os.path.dirname(src.path) if os.path.isfile(src.path) else src.path
            for row in out["tensor_list"]:
                where = _file_of(ck.state[row["name"]])
                if where:
                    row["file"] = os.path.relpath(where, folder) if folder else where
    if values:
        out["nonfinite"] = nonfinite(ck)
    return out


def _file_of(v) -> str | None:
    """The file a lazily read tensor's bytes are in (None: in memory, or put together from pieces)."""
    source = getattr(getattr(v, "storage", None), "source", None)
    path = getattr(source, "path", None)
    return path if isinstance(path, str) else None


def tensor_list(infos: Mapping, tied, match=(), strip: str = "") -> list[dict]:
    """One row per tensor (name, dtype, shape, numel, bytes; ``tied_to`` for a second name of a
    tensor), in the state dict's order, kept to those ``match`` names when given."""
    patterns = _patterns(match)
    names, counts = _matching(list(infos), patterns, strip)
    _refuse_unmatched(counts, list(infos), strip)
    return _rows(infos, names, dict(tied))


def candidate_tensor_list(wrapper: Any, candidates, match=()) -> list[dict]:
    """tensor_list for a file whose state dict is not chosen (a GAN's G and D, an optimizer state):
    every candidate's tensors, named ``<candidate>/<name>``; a mapping under several paths is
    listed once. A pattern is unmatched only when it names a tensor in none of them."""
    patterns = _patterns(match)
    rows, every = [], []
    counts = {p.text: 0 for p in patterns}
    for cand, infos, again in candidate_infos(wrapper, candidates):
        if again:
            continue
        names, found = _matching(list(infos), patterns, detect_prefix(infos.keys()))
        for text, n in found.items():
            counts[text] += n
        every += list(infos)
        rows += [dict(r, name=f"{cand}/{r['name']}") for r in _rows(infos, names, {})]
    _refuse_unmatched(counts, every, "")
    return rows


def _patterns(match) -> list:
    from .errors import SelectionError
    from .keys import parse_patterns

    patterns = parse_patterns(match)
    if match and not patterns:
        raise SelectionError(f"--match {', '.join(map(repr, match))} names no pattern",
                             hint="give a module path, a glob or re:regex, or leave --match out to list every tensor")
    return patterns


def _matching(names: list, patterns: list, strip: str) -> tuple[list, dict]:
    from .keys import select

    return select(names, patterns, strip) if patterns else (names, {})


def _refuse_unmatched(counts: dict, names: list, strip: str) -> None:
    from .errors import SelectionError
    from .keys import unmatched_hint

    missing = [t for t, n in counts.items() if not n]
    if missing:
        raise SelectionError(f"--match pattern{'s' if len(missing) > 1 else ''} matched no tensor: "
                             f"{', '.join(map(repr, missing))}", hint=unmatched_hint(missing, names, strip))


def _rows(infos: Mapping, names: list, alias_of: dict) -> list[dict]:
    rows = []
    for name in names:
        i = infos[name]
        row = {"name": name, "dtype": i["dtype"], "shape": i["shape"], "numel": i["numel"], "bytes": i["nbytes"]}
        if i.get("layout"):
            row["layout"] = i["layout"]
        if name in alias_of:
            row["tied_to"] = alias_of[name]
        rows.append(row)
    return rows


def looks_like_rng_state(infos: Mapping, state: Mapping) -> bool:
    """Keys like transformers' / accelerate's RNG checkpoint and every tensor a uint8 byte vector
    (torch.get_rng_state(): the generator's state, not values)."""
    keys = {str(k) for k in state}
    return bool(infos) and keys <= _RNG_KEYS and bool(keys & {"cpu", "python", "numpy"}) and all(
        i["dtype"] == "uint8" and len(i["shape"]) == 1 for i in infos.values())


def candidate_infos(wrapper: Any, candidates):
    """(candidate, its tensors' infos by name, whether this mapping was met under an earlier
    candidate) for each candidate path that names a mapping; a mapping named under many paths is
    read once (a 66 KB file naming one 2,000-tensor mapping 2,000 times took 4 s). From the
    pickle only: no tensor data."""
    seen: dict = {}
    for cand in candidates:
        node, _ = next(key_paths(wrapper, cand), (None, None))
        if not isinstance(node, Mapping):
            continue
        again = id(node) in seen
        if not again:
            items = flatten(node)[0] if nests_tensors(node) else node  # (Megatron's nesting)
            seen[id(node)] = OrderedDict((str(k), tensor_info(v)) for k, v in items.items() if is_tensor_like(v))
        yield cand, seen[id(node)], again


def candidate_sizes(wrapper: Any, candidates) -> list[dict]:
    """Tensors and bytes under each candidate path (see candidate_infos)."""
    return [{"at": cand, "tensors": len(infos), "bytes": sum(i["nbytes"] for i in infos.values())}
            for cand, infos, _again in candidate_infos(wrapper, candidates)]


def nonfinite(ck: Checkpoint) -> list[dict]:
    """Tensors holding NaN or Inf (reads floating tensors once each)."""
    import torch

    found = []
    for name, v in ck.tensor_items():
        t = v.to_torch() if hasattr(v, "to_torch") else v
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        t = t.detach()
        if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128):
            t = t.float()
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        if n_nan or n_inf:
            found.append({"tensor": name, "nan": n_nan, "inf": n_inf, "numel": t.numel()})
    return found


__all__ = ["inspect", "nonfinite"]
