"""The in-memory model of a checkpoint: wrapper + where its state dict sits + the state dict.

``Checkpoint`` is immutable by convention: operations build a new one with :meth:`replace`.
State-dict values are :class:`~ckptsurgeon.refs.TensorRef` (lazy, file-backed), real torch tensors
(computed by a surgery, or loaded by torch for formats we cannot read lazily), or, rarely, other
values (``_extra_state``). Renaming keys never touches tensor bytes.

Example::

    ck = ckptsurgeon.load("model.pt")
    print(ck.summary()["tensors"], ck.sd_path)
"""

from __future__ import annotations

import copy
import io
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace as dc_replace
from typing import Any, Iterator, Mapping

from . import dtypes
from .errors import AmbiguousStateDictError, NoStateDictError, SelectionError
from .refs import CallRef, GlobalRef, InertCall, InertObject, TensorRef, is_tensor_like, special_kind

# Where people put the model's weights inside a wrapper dict, most specific first.
PRIMARY_KEYS = ("model_state_dict", "state_dict", "model", "module", "net", "network", "weights", "params")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "model_ema_state_dict")
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.", "_forward_module.", "_fsdp_wrapped_module.")


@dataclass
class Source:
    """Where a checkpoint came from."""

    path: str
    format: str  # "torch-zip", "torch-legacy", "safetensors", "hf-folder", or a plugin's name
    size: int = 0
    files: tuple = ()
    lazy: bool = True  # tensors still on disk (False: torch.load materialised them)
    zip_prefix: str = "archive"
    byteorder: bytes = b"little"
    version: bytes = b"3\n"
    notes: tuple = ()
    program: str = ""  # "torchscript" / "torch.export": the file is a program archive, read for its weights


@dataclass
class Checkpoint:
    state: "OrderedDict[str, Any]"
    wrapper: Any = None
    sd_path: tuple = ()
    metadata: Any = None
    source: Source | None = None
    st_metadata: dict = field(default_factory=dict)
    candidates: tuple = ()
    transforms: tuple = ()
    notes: tuple = ()
    plain_dict: bool = False  # the source's state dict was a dict, not an OrderedDict: write it back so
    # a nested state dict (Megatron's {"language_model": {"embedding": {...}, "encoder": {...}}}),
    # held flat with "."-joined names: every mapping of the tree as (path, plain dict?, _metadata,
    # its own names), root first, so writing back nests the names again (see unflatten)
    nested: tuple = ()

    # ---- construction helpers
    def replace(self, **changes) -> "Checkpoint":
        return dc_replace(self, **changes)

    def with_state(self, state: Mapping[str, Any], **changes) -> "Checkpoint":
        return self.replace(state=OrderedDict(state), **changes)

    # ---- facts
    def tensor_items(self) -> Iterator[tuple[str, Any]]:
        for k, v in self.state.items():
            if is_tensor_like(v):
                yield k, v

    def summary(self, infos=None) -> dict:
        """Counts over the state dict's tensors (``infos``: their :func:`tensor_info`, if at hand)."""
        n_tensors = n_params = n_bytes = 0
        by_dtype: dict[str, int] = {}
        for i in infos if infos is not None else (tensor_info(v) for _, v in self.tensor_items()):
            n_tensors += 1
            n_params += i["numel"]
            n_bytes += i["nbytes"]
            by_dtype[i["dtype"]] = by_dtype.get(i["dtype"], 0) + i["nbytes"]
        return {"tensors": n_tensors, "parameters": n_params, "bytes": n_bytes, "bytes_by_dtype": by_dtype}

    def tied(self) -> list[tuple[str, str]]:
        """``(alias, name)`` for each state-dict name that is another, earlier name's very tensor
        (tied weights: an LM head sharing the embedding). Reads no data."""
        from .refs import as_ref, tie_key

        first: dict[tuple, str] = {}
        storages: dict = {}
        out = []
        for name, v in self.tensor_items():
            if not isinstance(v, TensorRef) and special_kind(v):
                continue  # a sparse or quantized tensor (read by torch.load): no plain storage to compare
            key = tie_key(as_ref(v, storages))
            if key in first:
                out.append((name, first[key]))
            else:
                first[key] = name
        return out

    def quantization_data(self) -> set:
        """Names of the floating-point tensors that belong to a quantized weight's codes: they are
        only meaningful with those exact codes, so casting or averaging them alone would change
        every value they dequantize.

        A module's weight is held as codes when a tensor named ``weight*`` or ``qweight`` has an
        integer, float8 or float4 dtype (FP8 exports and DeepSeek-V3, GPTQ/AWQ ``qweight``,
        bitsandbytes int8 and 4-bit, compressed-tensors ``weight_packed``). Its quantization data
        are then that module's other floating tensors except ``bias`` (``weight_scale_inv``,
        ``weight_scale``/``input_scale``, GPTQ/AWQ ``scales``, bitsandbytes ``SCB``), and for
        bitsandbytes 4-bit everything under ``<weight>.`` (``weight.absmax``, ``weight.quant_map``,
        the nested ones)."""
        items = [(name, tensor_info(v)["dtype"]) for name, v in self.tensor_items()]
        coded: set = set()
        for name, dtype in items:
            module, _, leaf = name.rpartition(".")
            codes = dtype.startswith(("float8", "float4")) or (
                dtype not in dtypes.FLOATING and dtype != "bool" and not dtype.startswith("complex"))
            if codes and (leaf.startswith("weight") or leaf == "qweight"):
                coded.add(module)
                coded.add(name)  # bitsandbytes 4-bit: <module>.weight.absmax...
        if not coded:
            return set()
        return {name for name, dtype in items
                if dtype in dtypes.FLOATING and not dtype.startswith(("float8", "float4"))
                and name.rpartition(".")[0] in coded and name.rpartition(".")[2] != "bias"}

    def wrapper_keys(self) -> list[str]:
        """The wrapper's top-level entries besides the state dict: the key that holds the state dict
        itself is not one (a key that holds it deeper down, beside other content, is)."""
        own = str(self.sd_path[0]) if len(self.sd_path) == 1 else None
        if isinstance(self.wrapper, Mapping) and self.sd_path:
            return [str(k) for k in self.wrapper.keys() if str(k) != own]
        if type(self.wrapper) in (list, tuple) and self.sd_path:
            return [str(i) for i in range(len(self.wrapper)) if str(i) != own]
        return []

    def __repr__(self) -> str:
        s = self.summary()
        where = "/".join(map(str, self.sd_path)) or "<bare>"
        fmt = self.source.format if self.source else "memory"
        return (f"<Checkpoint {fmt} state_dict@{where}: {dtypes.count(s['tensors'], 'tensor')}, "
                f"{s['parameters']:,} parameters, {s['bytes']:,} bytes>")

    # ---- assembling the object to write
    def state_dict_object(self) -> dict:
        if self.nested:
            return unflatten(self.state, self.nested)
        if self.plain_dict and self.metadata is None:
            return dict(self.state)
        sd = OrderedDict(self.state)
        if self.metadata is not None:
            sd._metadata = self.metadata
        return sd

    def assemble(self) -> Any:
        """The full object to pickle: the wrapper with the (new) state dict put back in place."""
        sd = self.state_dict_object()
        if not self.sd_path:
            return sd
        return _put(self.wrapper, self.sd_path, sd)

    def select(self, key: str) -> "Checkpoint":
        """The same checkpoint with the state dict at ``key`` chosen instead, this one's state dict
        (changed or not) first put back in its place: surgeries on several state dicts of one
        wrapper add up (a GAN's ``G`` and ``D``, DINO's ``student`` and ``teacher``, each saved
        under DataParallel). Reads no tensor data."""
        if self.wrapper is None:
            raise SelectionError(f"no wrapper around the state dict to choose {key!r} from",
                                 hint="--key picks a state dict inside a wrapper dict (state_dict, model/ema, G)")
        from .formats.torchfile import from_object

        source = dc_replace(self.source, notes=()) if self.source is not None else Source(path="", format="memory")
        new = from_object(self.assemble(), source, key=key, transforms=self.transforms)
        return new.replace(source=self.source, notes=self.notes + tuple(n for n in new.notes if n not in self.notes))

    def torch_state_dict(self) -> "OrderedDict[str, Any]":
        """name -> real torch tensor (zero-copy over the file where possible), with _metadata."""
        out = OrderedDict((k, v.to_torch() if isinstance(v, TensorRef) else v) for k, v in self.state.items())
        if self.metadata is not None:
            out._metadata = copy.deepcopy(materialize(self.metadata))
        return out


def _put(container, path: tuple, value):
    """Copy of ``container`` with ``value`` at ``path``; only the dicts on the path are copied."""
    head, rest = path[0], path[1:]
    inner = value if not rest else _put(container[head], rest, value)
    if type(container) is tuple:  # a top-level tuple (see find_candidates)
        return container[:head] + (inner,) + container[head + 1:]
    new = copy.copy(container)
    new[head] = inner
    return new


def tensor_info(v) -> dict:
    if isinstance(v, TensorRef):
        return {"dtype": v.dtype, "shape": list(v.shape), "numel": v.numel, "nbytes": v.nbytes}
    name = dtypes.dtype_name(v.dtype)
    kind = special_kind(v)
    if kind == "nested":  # no single shape
        return {"dtype": name, "shape": [], "numel": 0, "nbytes": 0, "layout": kind}
    info = {"dtype": name, "shape": list(v.shape), "numel": v.numel(), "nbytes": v.numel() * v.element_size()}
    if kind:
        info["layout"] = kind
    return info


# --------------------------------------------------------------------------- nested state dicts
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
    return tensors if nested and tensors > 0 and (tensors + extra) * 2 >= leaves else None


def flatten(tree: Mapping) -> tuple["OrderedDict[str, Any]", tuple]:
    """(flat state dict with "."-joined names, the tree's mappings as Checkpoint.nested wants)."""
    flat: OrderedDict = OrderedDict()
    nodes = []

    def walk(node, path):
        # its direct names too: writing back reuses those very str objects, so a pickle that
        # memoised a repeated name ("weight") is written again byte for byte
        leaves = {k: k for k, v in node.items() if not isinstance(v, Mapping)}
        nodes.append((path, type(node) is dict, getattr(node, "_metadata", None), leaves))
        prefix = "".join(f"{p}." for p in path)
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, path + (k,))
            elif prefix + k in flat:
                raise SelectionError(f"the nested state dict names {prefix + k!r} twice (as a key with dots and "
                                     "as nested mappings)", hint="choose one part with --key")
            else:
                flat[prefix + k] = v

    walk(tree, ())
    return flat, tuple(nodes)


def unflatten(state: Mapping[str, Any], nodes: tuple) -> Any:
    """Nest flat names again: each goes under the deepest mapping of the original tree whose
    dotted path starts it (so renamed or stripped names land where their new name says, and a
    name that no longer starts with any nested path stays at the top). Mappings keep their type
    and _metadata; ones left empty (extract) are dropped; order is the order of ``state``."""
    made: dict[tuple, Any] = {}
    info = {path: (plain, meta) for path, plain, meta, _ in nodes}
    names = {path: leaves for path, _, _, leaves in nodes}
    by_name = {".".join(path): path for path in info if path}

    def node(path):
        if path not in made:
            plain, meta = info[path]
            made[path] = {} if plain else OrderedDict()
            if meta is not None and not plain:
                made[path]._metadata = meta
            if path:
                node(path[:-1])[path[-1]] = made[path]
        return made[path]

    node(())
    for name, value in state.items():
        parts = name.split(".")
        where, rest = (), name
        for i in range(len(parts) - 1, 0, -1):
            hit = by_name.get(".".join(parts[:i]))
            if hit is not None:
                where, rest = hit, ".".join(parts[i:])
                break
        node(where)[names[where].get(rest, rest)] = value
    return made[()]


# --------------------------------------------------------------------------- state dict location
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
    dict, or at least as many tensors as its own. A module's ``_extra_state`` is part of it."""
    direct = sum(1 for v in obj.values() if is_tensor_like(v))
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
            elif (depth == 0 and (k in PRIMARY_KEYS or k in EMA_KEYS)) or held >= direct:
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
        for sep in ("/", "."):
            parts = tuple(p for p in key.split(sep) if p) if key not in ("", "<bare>") else ()
            try:
                node, path = node_at(obj, parts)
            except (KeyError, TypeError, IndexError, ValueError):
                continue
            if is_state_dict(node) or is_tensor_tree(node) or _names_tensors(node):
                return path, candidates
            raise SelectionError(f"--key {key!r} does not hold a state dict (a mapping of names to tensors)",
                                 hint=f"candidates: {', '.join(map(path_str, candidates)) or 'none'}")
        raise SelectionError(f"--key {key!r} is not in the checkpoint",
                             hint=f"candidates: {', '.join(map(path_str, candidates)) or 'none'}")
    if not candidates and isinstance(obj, Mapping) and not obj:
        return (), candidates  # an empty state dict (a module without parameters): nothing to choose
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
    raise AmbiguousStateDictError(
        f"several state dicts in the checkpoint: {', '.join(names)}",
        candidates=names, hint="choose one with --key (API: key=...); strip-prefix, add-prefix, rename and cast "
                               "change several when --key is given once for each")


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


# --------------------------------------------------------------------------- materialising
def materialize(obj: Any, memo: dict | None = None) -> Any:
    """Replace stand-ins (TensorRef, GlobalRef, CallRef) by real torch objects, recursively."""
    memo = {} if memo is None else memo
    oid = id(obj)
    if oid in memo:
        return memo[oid]
    if isinstance(obj, TensorRef):
        out = obj.to_torch()
    elif isinstance(obj, GlobalRef):
        out = obj.resolve()
    elif isinstance(obj, CallRef):
        func = obj.func.resolve()
        out = func(*[materialize(a, memo) for a in obj.args])
        if obj.state is not None:
            state = materialize(obj.state, memo)
            if hasattr(out, "__setstate__"):
                out.__setstate__(state)
            else:
                out.__dict__.update(state)
    elif isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else copy.copy(obj)
        memo[oid] = out
        for k, v in obj.items():
            out[k] = materialize(v, memo)
        if getattr(obj, "__dict__", None):
            for k, v in vars(obj).items():
                setattr(out, k, materialize(v, memo))
        return out
    elif isinstance(obj, list):
        out = []
        memo[oid] = out
        out.extend(materialize(v, memo) for v in obj)
        return out
    elif isinstance(obj, tuple):
        out = tuple(materialize(v, memo) for v in obj)
    elif isinstance(obj, (set, frozenset)):
        out = type(obj)(materialize(v, memo) for v in obj)
    else:
        out = obj
    memo[oid] = out
    return out


class Walk:
    """State of one :func:`plain` traversal: the containers on the current path (a container met
    again inside itself -- pickles can hold cycles -- becomes "<cycle>") and a budget of nodes.

    The budget counts items visited, not distinct objects: a pickle can share one list between two slots
    of another, sixty levels deep, and a tree walk of those 2^60 paths would never end (a 2 KB
    "billion laughs" file); and 100,000 nested lists would exhaust Python's recursion limit. Past
    ``limit`` nodes or ``MAX_DEPTH`` levels the rest becomes "<truncated>" and ``truncated`` says
    so."""

    LIMIT = 200_000
    MAX_DEPTH = 100  # containers inside containers; real checkpoints nest a handful deep

    def __init__(self, limit: int = LIMIT):
        self.active: set = set()
        self.left = limit
        self.truncated = False

    def enter(self, obj) -> str | None:
        """None to go on into ``obj``, or the marker to put in its place."""
        if id(obj) in self.active:
            return "<cycle>"
        if self.left <= 0 or len(self.active) >= self.MAX_DEPTH:
            self.truncated = True
            return "<truncated>"
        try:  # the container and each of its items: what the caller is about to go through
            self.left -= 1 + len(obj)
        except TypeError:
            self.left -= 1
        self.active.add(id(obj))
        return None


def plain(obj: Any, walk: Walk | None = None) -> Any:
    """A JSON-able / deepdiff-able view of non-tensor content: tensors become summaries, cycles
    "<cycle>", and anything past the walk's node budget "<truncated>" (see :class:`Walk`)."""
    walk = Walk() if walk is None else walk
    if not isinstance(obj, (Mapping, list, tuple, set, frozenset, InertObject, InertCall, CallRef)):
        return _plain(obj, walk)
    marker = walk.enter(obj)
    if marker is not None:
        return marker
    try:
        return _plain(obj, walk)
    finally:
        walk.active.discard(id(obj))


def _plain(obj: Any, active: Walk) -> Any:
    if isinstance(obj, TensorRef) or is_tensor_like(obj):
        i = tensor_info(obj)
        return {"<tensor>": f"{i['dtype']}{i['shape']}"}
    if isinstance(obj, GlobalRef):
        return f"<{obj.qualname}>"
    if isinstance(obj, CallRef):
        return f"<{obj.func.qualname}{tuple(plain(a, active) for a in obj.args)!r}>"
    if isinstance(obj, Mapping):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): plain(v, active) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, active) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((plain(v, active) for v in obj), key=repr)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return _plain_bytes(obj)
    if isinstance(obj, io.BytesIO):  # Transformer Engine's extra state: compared by content, not address
        return {"<BytesIO>": _plain_bytes(obj.getbuffer())}
    if isinstance(obj, InertObject):  # compared by how the pickle builds it
        rec = obj._inert
        out = {f"<inert {obj.inert_module}.{obj.inert_name}>": plain(list(rec["args"]), active)}
        out.update({k: plain(rec[k], active) for k in ("kwargs", "state", "items", "dictitems") if rec[k]})
        return out
    if isinstance(obj, InertCall):
        return {"<inert call>": plain(obj.func, active), "args": plain(list(obj.args), active), "state": plain(obj.state, active)}
    if isinstance(obj, type) and issubclass(obj, InertObject):
        return f"<{obj.inert_module}.{obj.inert_name}>"
    if type(obj).__module__ == "numpy" and hasattr(obj, "dtype") and hasattr(obj, "tobytes"):
        if obj.size <= 16:  # small arrays and scalars: their values
            return obj.tolist()
        import hashlib

        data = obj.tobytes()  # a large array: dtype, shape and a hash of its bytes
        return {"<ndarray>": f"{obj.dtype}{list(obj.shape)}", "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}
    cls = type(obj)
    if cls.__repr__ is object.__repr__ and isinstance(getattr(obj, "__dict__", None), dict):
        # (a trusted load's plain object) its class and attributes: its repr is just its address
        return {f"<object {cls.__module__}.{cls.__qualname__}>": plain(obj.__dict__, active)}
    return _ADDRESS.sub("", repr(obj))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # "<Foo object at 0x7f..>": differs between two loads of one file


def _plain_bytes(data) -> Any:
    if len(data) <= 32:
        return f"<bytes {bytes(data).hex()}>"
    import hashlib

    return {"<bytes>": len(data), "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}
