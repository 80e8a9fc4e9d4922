"""Where the state dict sits inside what a checkpoint file holds: the mapping of names to
tensors among wrappers (Lightning's ``state_dict``, timm's ``state_dict_ema``, a resume file's
``model_state_dict`` beside an optimizer's), chosen by name or by ``--key``, and what a file
without one holds instead (an optimizer's, a scheduler's, an RNG state).
"""

from __future__ import annotations

from typing import Any, Mapping

from . import dtypes
from .errors import AmbiguousStateDictError, NoStateDictError, SelectionError
from .keys import name_list
from .refs import is_tensor_like

# Where people put the model's weights inside a wrapper dict, most specific first.
PRIMARY_KEYS = ("model_state_dict", "state_dict", "model", "module", "net", "network", "weights", "params")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "model_ema_state_dict")


def is_tensor_tree(obj: Any, max_depth: int = 8) -> bool:
    """A nested state dict: a mapping (not a state dict itself) whose values are, through nested
    mappings, mostly tensors -- Megatron's {"language_model": {"embedding": {"word_embeddings":
    {"weight": T}}, "encoder": {"layers.0.x": T, ...}}}, or a model saved as {"encoder": sd,
    "decoder": sd}. Names of nested mappings must be non-empty and dot-free, so that the
    "."-joined flat names split back unambiguously."""
    return _tree_tensors(obj, max_depth) is not None


def _tree_tensors(obj: Any, max_depth: int = 8) -> int | None:
    """The tensors of a tensor tree (see is_tensor_tree), None when ``obj`` is not one."""
    if not isinstance(obj, Mapping) or not obj or is_state_dict(obj):
        return None
    walked = _walk_tree(obj, max_depth)
    if walked is None:
        return None
    tensors, leaves, extra, nested = walked
    return tensors if nested and tensors > 0 and (tensors + extra) * 2 >= leaves else None


def _walk_tree(obj: Mapping, max_depth: int = 8) -> tuple[int, int, int, bool] | None:
    """(tensors, leaves, module extra states, whether it nests) of a mapping whose nested mappings
    could be held with "."-joined names; None when one could not (see is_tensor_tree)."""
    leaves = tensors = extra = 0
    nested = False
    stack = [(obj, 0)]
    seen = {id(obj)}
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return None
        for k, v in node.items():
            if not isinstance(k, str):
                return None
            if isinstance(v, Mapping):
                if not v or not k or "." in k or id(v) in seen:  # shared: no tree (and no 1000^8 walk)
                    return None
                seen.add(id(v))
                nested = True
                stack.append((v, depth + 1))
            else:
                leaves += 1
                tensors += is_tensor_like(v)
                extra += _is_extra_state(k, v)
    return tensors, leaves, extra, nested


def nests_tensors(obj: Any) -> bool:
    """A state dict held with "."-joined names: a tensor tree (see is_tensor_tree), or a flat state
    dict some of whose modules were saved as mappings of their own ({"encoder.weight": T, ...,
    "decoder": {"weight": T, ...}}) -- every mapping among its values holds tensors, under names a
    tree can hold. A mapping of other things ({"config": {"lr": 0.1}}) keeps it flat, the mapping
    one opaque value, as a module's ``_extra_state`` does; so does one that holds at least as many
    tensors as the top level itself, which makes the whole a wrapper (see _wraps_weights)."""
    if is_tensor_tree(obj):
        return True
    if not is_state_dict(obj) or _wraps_weights(obj):  # (then a wrapper: its mapping is the state dict)
        return False
    parts = [(k, v) for k, v in obj.items() if isinstance(v, Mapping)]
    walked = _walk_tree(obj)
    if not parts or any(_is_extra_state(k, v) for k, v in parts) or walked is None:
        return False
    tensors, leaves, extra, _ = walked
    if (tensors + extra) * 2 < leaves:  # held flat, it would be no state dict (mostly other values)
        return False
    if not all((_walk_tree(v) or (0,))[0] > 0 for _, v in parts):
        return False
    # and no name twice once joined ("decoder.w" beside "decoder": {"w": ...}): then it stays flat
    names, stack = set(), [("", obj)]
    while stack:
        prefix, node = stack.pop()
        for k, v in node.items():
            if isinstance(v, Mapping):
                stack.append((f"{prefix}{k}.", v))
            elif prefix + k in names:
                return False
            else:
                names.add(prefix + k)
    return True


def _names_tensors(obj: Any) -> bool:
    """A mapping of names holding at least one tensor: what --key may choose explicitly even when
    other values outnumber the tensors (``sd["epoch"] = 3`` on a small model's state dict)."""
    return (isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj)
            and any(is_tensor_like(v) for v in obj.values()))


def is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    n_tensor = n_files = n_extra = 0
    for k, v in obj.items():
        if not isinstance(k, str):
            return False
        if is_tensor_like(v):
            n_tensor += 1
        n_extra += _is_extra_state(k, v)
        if k.endswith(_FILE_SUFFIXES):
            n_files += 1
    # every key a checkpoint file name: Lightning's ModelCheckpoint.best_k_models ({path: score})
    return n_tensor > 0 and (n_tensor + n_extra) * 2 >= len(obj) and n_files < len(obj)


def _is_extra_state(k: str, v: Any) -> bool:
    """A module's ``get_extra_state()`` entry (``<module>._extra_state``): part of a state dict
    although not a tensor -- Transformer Engine saves one per layer (a BytesIO, or None), so a
    Megatron layer without biases holds almost as many of them as tensors."""
    return (k == "_extra_state" or k.endswith("._extra_state")) and not is_tensor_like(v)


_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".tar")


def _wraps_weights(obj: Mapping) -> bool:
    """A wrapper that passes for a state dict by its own values -- as many tensors (an RNG state,
    a mask, a step count) as other entries, ``{"state_dict": sd, "rng_state": t}`` -- but holds
    the weights in a mapping one or two levels down: under a name training scripts give a state
    dict, or at least as many tensors as its own -- unless its own tensors all have module paths
    for names ("encoder.weight"): those are weights, and the mapping a module saved nested (see
    nests_tensors). A module's ``_extra_state`` is part of it."""
    own = [k for k, v in obj.items() if is_tensor_like(v)]
    direct = len(own)
    weights = bool(own) and all("." in str(k) for k in own)
    seen: set[int] = set()
    level = list(obj.items())
    for depth in range(2):
        below = []
        for k, v in level:
            if not isinstance(v, Mapping) or id(v) in seen or _is_extra_state(str(k), v):
                continue
            seen.add(id(v))
            held = sum(1 for x in v.values() if is_tensor_like(x)) if is_state_dict(v) else _tree_tensors(v)
            if held is None:
                below.extend(v.items())
            elif (depth == 0 and (k in PRIMARY_KEYS or k in EMA_KEYS)) or (held >= direct and not weights):
                return True
        level = below
    return False


def find_candidates(obj: Any, max_depth: int = 3) -> list[tuple]:
    """Every path (tuple of keys) inside ``obj`` that holds a state dict."""
    if is_state_dict(obj) and not _wraps_weights(obj):
        return [()]
    found: list[tuple] = []
    verdicts: dict[int, bool] = {}  # per object: a pickle can put one mapping under many keys
    walked: set[int] = set()

    def holds_weights(v) -> bool:
        if id(v) not in verdicts:  # a nested state dict is one candidate, not its parts
            verdicts[id(v)] = (is_state_dict(v) and not _wraps_weights(v)) or is_tensor_tree(v)
        return verdicts[id(v)]

    def walk(node, path):
        if len(path) >= max_depth or id(node) in walked:
            return
        if isinstance(node, Mapping):
            items = node.items()
        elif not path and type(node) in (list, tuple):  # torch.save((model.state_dict(), extra)): the
            items = enumerate(node)  # top level only (deeper lists hold optimizer states, shapes...)
        else:
            return
        walked.add(id(node))
        for k, v in items:
            if isinstance(v, Mapping) and holds_weights(v):
                found.append(path + (k,))
            elif isinstance(v, Mapping):
                walk(v, path + (k,))

    walk(obj, ())
    return found


def node_at(obj: Any, parts) -> tuple[Any, tuple]:
    """(object, path of actual keys) that the text parts of a --key name inside ``obj``.
    Raises KeyError, IndexError, TypeError or ValueError when they name nothing."""
    node, path = obj, []
    for part in parts:
        part = _actual_key(node, part)
        node = node[part]
        path.append(part)
    return node, tuple(path)


def key_paths(obj: Any, key: str):
    """Every (object, path) the text of a --key can name inside ``obj``, in the order tried: the
    whole text as one key (a name holding '/' or '.': ``{"gen/ema": sd}``), then its parts split
    on '/', then on '.'; ``''`` or ``'<bare>'`` names ``obj`` itself."""
    if key in ("", "<bare>"):
        yield obj, ()
        return
    tried = []
    for parts in ((key,), tuple(p for p in key.split("/") if p), tuple(p for p in key.split(".") if p)):
        if parts in tried or not parts:
            continue
        tried.append(parts)
        try:
            yield node_at(obj, parts)
        except (KeyError, TypeError, IndexError, ValueError):
            continue


def _actual_key(node: Any, part: str):
    """The key or index that ``part`` (text from --key) names in ``node``: optimizer states are
    keyed by int parameter ids, Lightning keeps optimizer states in a list."""
    if isinstance(node, Mapping):
        if part in node:
            return part
        try:
            number = int(part)
        except ValueError:
            raise KeyError(part) from None
        if number in node:
            return number
        raise KeyError(part)
    if isinstance(node, (list, tuple)):
        return int(part)
    raise TypeError(type(node).__name__)


def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path) if path else "<bare>"


def choose_state_dict(obj: Any, key: str | None = None) -> tuple[tuple, list[tuple]]:
    """(chosen path, all candidates). ``key`` ('state_dict', 'model/ema', 'a.b') chooses explicitly."""
    candidates = find_candidates(obj)
    if key is not None:
        named = False
        for node, path in key_paths(obj, key):
            if is_state_dict(node) or is_tensor_tree(node) or _names_tensors(node) or _empty_mapping(node):
                return path, candidates
            named = True
        if named:
            raise SelectionError(f"--key {key!r} does not hold a state dict (a mapping of names to tensors)",
                                 hint=f"candidates: {name_list(map(path_str, candidates), 12) or 'none'}")
        raise SelectionError(f"--key {key!r} is not in the checkpoint",
                             hint=f"candidates: {name_list(map(path_str, candidates), 12) or 'none'}")
    if not candidates and isinstance(obj, Mapping) and not obj:
        return (), candidates  # an empty state dict (a module without parameters): nothing to choose
    if not candidates and isinstance(obj, Mapping):
        empty = [k for k in PRIMARY_KEYS if _empty_mapping(obj.get(k))]
        if len(empty) == 1:  # {"state_dict": {}, "epoch": 1}: the same, inside a wrapper
            return (empty[0],), candidates
    if not candidates:
        hint = None
        what = describe_training_state(obj)
        if what:  # a scheduler's, a GradScaler's, an RNG state: say what it is
            raise NoStateDictError(f"no state dict here: {what}")
        if isinstance(obj, Mapping):
            top = list(obj.keys())[:12]
            if _names_tensors(obj):
                n = sum(1 for v in obj.values() if is_tensor_like(v))
                hint = (f"its {dtypes.count(n, 'tensor')} {'is' if n == 1 else 'are'} outnumbered by the "
                        f"{len(obj) - n} other values; to take it as the state dict anyway: --key '<bare>'")
        elif is_tensor_like(obj):  # torch.save(tensor): a tensor, but no name to give it
            shape = list(getattr(obj, "shape", ()))
            top = f"one tensor {shape} {str(getattr(obj, 'dtype', '')).replace('torch.', '')}"
            hint = "save it under a name: torch.save({'name': tensor}, path)"
        elif isinstance(obj, (list, tuple)):
            n = sum(1 for v in obj if is_tensor_like(v))
            top = f"a {type(obj).__name__} of {dtypes.count(len(obj), 'item')} ({dtypes.count(n, 'tensor')})"
            hint = "save them under names: torch.save({'name': tensor, ...}, path)" if n else None
        else:
            top = type(obj).__name__
        raise NoStateDictError(f"no state dict (mapping of names to tensors) found; top level: {top}", hint=hint)
    if len(candidates) == 1:
        return candidates[0], candidates
    if () in candidates:
        return (), candidates
    # an optimizer's per-parameter states (exp_avg, exp_avg_sq: tensors by name) look like state
    # dicts: beside a model's, they are not what is meant ({"my_net": sd, "optim": opt.state_dict()})
    pool = [c for c in candidates if not _in_optimizer_state(obj, c)] or candidates
    if len(pool) == 1:
        return pool[0], candidates
    top_level = [c for c in pool if len(c) == 1]
    primary = [c for c in pool if str(c[-1]) in PRIMARY_KEYS]
    if len(primary) > 1:
        # prefer the shallowest, then the most specific name
        primary.sort(key=lambda c: (len(c), PRIMARY_KEYS.index(str(c[-1]))))
        if len(primary[0]) < len(primary[1]):
            primary = primary[:1]
    if len(primary) == 1:
        return primary[0], candidates
    ema = [c for c in pool if str(c[-1]) in EMA_KEYS]
    if not primary and len(ema) == 1 and len(top_level) <= 1:
        return ema[0], candidates
    names = [path_str(c) for c in pool]
    optimizer = describe_optimizer(obj, candidates)
    if optimizer:
        raise AmbiguousStateDictError(f"{optimizer}; its per-parameter states: {', '.join(names[:8])}"
                                      f"{' ...' if len(names) > 8 else ''}",
                                      candidates=names, hint="choose one with --key (e.g. --key state/0)")
    together = ("; --key '<bare>' takes them together as one nested state dict (their names joined: "
                f"{path_str(pool[0])}.<name>)" if is_tensor_tree(obj) else "")
    e = AmbiguousStateDictError(
        f"several state dicts in the checkpoint: {', '.join(names[:12])}"
        + (f" ... and {len(names) - 12} more" if len(names) > 12 else ""),
        candidates=names, hint="choose one with --key (API: key=...); strip-prefix, add-prefix, rename and cast "
                               "change several when --key is given once for each" + together)
    e.together = together
    raise e


def _empty_mapping(obj: Any) -> bool:
    """An empty dict or OrderedDict: the state dict of a module without parameters."""
    return isinstance(obj, Mapping) and not obj


def _in_optimizer_state(obj: Any, path: tuple) -> bool:
    """Whether ``path`` goes through the ``state`` of a torch.optim state dict ('state' beside
    'param_groups')."""
    node = obj
    for part in path:
        if part == "state" and isinstance(node, Mapping) and "param_groups" in node:
            return True
        node = node[part] if isinstance(node, (Mapping, list, tuple)) else None
    return False


def describe_optimizer(obj: Any, candidates: list[tuple]) -> str | None:
    """One line about a torch.optim state dict ('state' + 'param_groups', every candidate a
    per-parameter state), or None when ``obj`` is not one."""
    if not (isinstance(obj, Mapping) and "param_groups" in obj and candidates
            and all(c[:1] == ("state",) for c in candidates)):
        return None
    states = obj.get("state")
    names: dict = {}
    for v in states.values() if isinstance(states, Mapping) else ():
        if isinstance(v, Mapping):
            names.update(dict.fromkeys(map(str, v)))
    groups = obj["param_groups"]
    lrs = [g.get("lr") for g in groups if isinstance(g, Mapping)] if isinstance(groups, (list, tuple)) else []
    lr = sorted({x for x in lrs if isinstance(x, (int, float)) and not isinstance(x, bool)})
    n_groups = dtypes.count(len(groups), "param group") if isinstance(groups, (list, tuple)) else ""
    n_states = dtypes.count(len(states), "parameter state") if isinstance(states, Mapping) else "? parameter states"
    return (f"an optimizer's state dict (torch.optim), not a model's: {n_states} "
            f"({', '.join(list(names)[:6]) or 'empty'})"
            + (f", {n_groups}" if n_groups else "") + (f" (lr {', '.join(f'{x:g}' for x in lr[:4])})" if lr else ""))


RNG_NOTE = ("these are random-number-generator states (a training run's rng_state.pth: Python's, numpy's and "
            "torch's per device), not model weights")
_RNG_KEYS = {"python", "numpy", "cpu", "cuda", "mps", "xpu", "npu", "hpu", "mlu", "musa", "torch", "random"}


def describe_training_state(obj: Any) -> str | None:
    """What a resume folder's other files hold, when ``obj`` is one of them (no model weights): a
    learning-rate scheduler's state_dict, a GradScaler's, accelerate's random_states_N.pkl."""
    if not isinstance(obj, Mapping):
        return None
    keys = {str(k) for k in obj}
    if "last_epoch" in keys and keys & {"base_lrs", "_last_lr"}:
        lrs = obj.get("_last_lr") or obj.get("base_lrs")
        lr = (f", lr {', '.join(f'{x:g}' for x in lrs[:4])}" if isinstance(lrs, (list, tuple)) and lrs
              and all(isinstance(x, (int, float)) for x in lrs[:4]) else "")
        return ("a learning-rate scheduler's state (torch.optim.lr_scheduler: "
                f"last_epoch {obj.get('last_epoch')}{lr}), not model weights")
    if {"scale", "growth_factor", "backoff_factor", "growth_interval"} <= keys:
        scale = obj.get("scale")
        of = f" {scale:g}" if isinstance(scale, (int, float)) else ""
        return f"a GradScaler's state (mixed-precision loss scale{of}), not model weights"
    if {"random_state", "torch_manual_seed"} <= keys:
        return "random-number-generator states (accelerate's random_states_N.pkl), not model weights"
    if keys <= _RNG_KEYS and {"python", "cpu"} <= keys:  # transformers' rng_state.pth
        return RNG_NOTE
    return None


def refuse_key(key: str | None, path: str, what: str) -> None:
    """A --key given for a file that holds a state dict alone, with no wrapper around it (a
    safetensors file, a sharded folder): nothing to choose, so said rather than ignored."""
    if key not in (None, "", "<bare>"):
        raise SelectionError(f"--key {key!r}: {path} is {what}: one state dict, no wrapper to choose it from",
                             hint="leave --key out; --key picks a state dict inside a torch file's wrapper dict")
