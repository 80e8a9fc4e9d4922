"""The in-memory model of a checkpoint: wrapper + where its state dict sits + the state dict.

``Checkpoint`` is immutable by convention: operations build a new one with :meth:`replace`.
State-dict values are :class:`~ckptsurgeon.refs.TensorRef` (lazy, file-backed), real torch tensors
(computed by a surgery, or loaded by torch for formats we cannot read lazily), or, rarely, other
values (``_extra_state``). Renaming keys never touches tensor bytes.

Example::

    ck = ckptsurgeon.load("model.pt")
    print(ck.summary()["tensors"], ck.sd_path)

Finding the state dict inside a wrapper is :mod:`ckptsurgeon.locate`'s; turning stand-ins into
torch objects or plain values, :mod:`ckptsurgeon.values`'.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field, replace as dc_replace
from typing import Any, Iterator, Mapping

from . import dtypes
from .errors import SelectionError
from .refs import TensorRef, is_tensor_like, special_kind

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
            from .locate import nests_tensors

            tree = unflatten(self.state, self.nested)
            # written flat instead when nesting would lose a name -- one that is both a tensor and
            # a mapping's path ("b.dec" beside a renamed "b.dec.a") -- or when the tree would not
            # read back nested (locate.nests_tensors): every name stays visible
            if _leaves(tree) == len(self.state) and (
                    not any(isinstance(v, Mapping) for v in tree.values()) or nests_tensors(tree)):
                return tree
            return OrderedDict(self.state)
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
        from .graph import from_object

        source = dc_replace(self.source, notes=()) if self.source is not None else Source(path="", format="memory")
        new = from_object(self.assemble(), source, key=key, transforms=self.transforms)
        return new.replace(source=self.source, notes=self.notes + tuple(n for n in new.notes if n not in self.notes))

    def each(self, keys, op) -> tuple["Checkpoint", dict]:
        """Apply ``op(ck) -> (ck, report)`` to the state dict at each of ``keys`` in turn, each
        change kept as the next is chosen (see :meth:`select`); returns the last checkpoint and
        ``{key: report}``. An error names the state dict it is about.

        Example::

            ck, reports = load("gan.pt", key="G").each(["G", "D"], strip_prefix)
        """
        from .errors import CkptSurgeonError

        from .locate import path_str

        ck, reports = self, {}
        for key in keys:
            try:
                chosen = ck if not reports and path_str(ck.sd_path) == key else ck.select(key)  # (loaded at it)
                ck, reports[key] = op(chosen)
            except CkptSurgeonError as e:
                e.message = f"state dict {key}: {e.message}"
                e.args = (e.message,)
                raise
        return ck, reports

    def torch_state_dict(self) -> "OrderedDict[str, Any]":
        """name -> real torch tensor (zero-copy over the file where possible), with _metadata."""
        out = OrderedDict((k, v.to_torch() if isinstance(v, TensorRef) else v) for k, v in self.state.items())
        if self.metadata is not None:
            from .values import materialize

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


def _leaves(tree: Mapping) -> int:
    """How many values that are not mappings a tree holds, through all its mappings."""
    count, stack = 0, [tree]
    while stack:
        for v in stack.pop().values():
            if isinstance(v, Mapping):
                stack.append(v)
            else:
                count += 1
    return count


def rename_nested(nodes: tuple, renamed: Mapping[str, str], bare: bool = False) -> tuple:
    """The tree's mappings after a rename (``renamed``: every flat name in the state dict -> its new
    name): a mapping whose names all moved together (``language_model.encoder.*`` renamed to
    ``language_model.decoder.*``, a prefix added or stripped) moves with them, so writing back
    nests them under their new path instead of flat under the deepest old one; its parents are
    made as needed. A mapping whose names went different ways, or to the top, stays where it was
    (unflatten then places each name as it says); so do paths whose parts hold dots or are not text.
    ``bare``: the tree is the file's top level, where a new top-level mapping named as wrappers
    name a state dict (add-prefix's ``module``) would read back as a wrapper around it, dropping
    that name: there nothing moves under one (the names are written as they say, flat)."""
    from .locate import EMA_KEYS, PRIMARY_KEYS

    tops = {path[0] for path, *_ in nodes if path}
    out = []
    for path, plain, meta, leaves in nodes:
        targets = set()
        if all(isinstance(p, str) and "." not in p for p in path):
            prefix = "".join(f"{p}." for p in path)
            for k in leaves:
                new = renamed.get(prefix + k)
                if new is None:  # no longer in the state dict (extract left it out)
                    continue
                parts = tuple(new[:-len(k) - 1].split(".")) if new.endswith("." + k) else ()
                targets.add(parts if parts and all(parts) else None)
        if len(targets) == 1 and None not in targets:
            moved = targets.pop()
            if bare and moved[0] not in tops and moved[0] in PRIMARY_KEYS + EMA_KEYS:
                out.append((path, plain, meta, leaves))
                continue
            if not path:  # the top's own names (add-prefix): the top stays, its names move below it
                out.append(((), plain, meta, {}))
                plain, meta = False, None
            path = moved
        out.append((path, plain, meta, leaves))
    return tuple(out)


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
            plain, meta = info.get(path, (False, None))  # (a parent a rename made: rename_nested)
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
        node(where)[names.get(where, {}).get(rest, rest)] = value
    return made[()]
