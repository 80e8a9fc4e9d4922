"""DeepSpeed checkpoint folders, and ZeRO-3 weights put back together without DeepSpeed.

``engine.save_checkpoint(dir, tag)`` writes ``dir/latest`` (the tag's name) and ``dir/<tag>/``
holding the model states (``mp_rank_00_model_states.pt``, or one
``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` per rank) and one ``*_optim_states.pt`` per
data-parallel rank. Under ZeRO stages 0-2 the model states hold the whole model: that file is
read, like any torch file. Under ZeRO-3 they hold empty placeholders; the weights exist only as
each rank's partition of the fp32 master copy in its optimizer-state file. Those are put back
together here the way DeepSpeed's own ``zero_to_fp32.py`` does it, with the same result
(tested against it):

* the trainable parameters, in the order of ``param_shapes``, occupy consecutive runs of
  ``ceil(numel / world)`` elements in every rank's flat fp32 groups (``fp32_flat_groups``,
  concatenated; a run may cross from one group into the next); a parameter is its runs taken
  rank after rank, cut to ``numel``, so the last rank's run carries the padding;
* frozen parameters are each rank's ``frozen_param_fragments[name]``, joined and cut the same
  way, in their own dtype; buffers come from rank 0's model states as saved; ``shared_params``
  make aliases.

Every parameter is a list of byte ranges of the optimizer-state files: nothing is assembled in
memory, outputs copy the ranges in the kernel (see :class:`~ckptsurgeon.refs.AssembledBytes`),
and only the pickles are read. The optimizer-state files pickle DeepSpeed classes (the stage
enum, the loss scaler): those are recorded inert, never imported. Anything else outside torch's
weights-only allowlist is refused as for any file. Model or pipeline parallel checkpoints
(``mp_rank`` other than 00) and partition-native expert layers are refused with the way out.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping

from ..checkpoint import Checkpoint, Source
from ..errors import CorruptCheckpointError, NotACheckpointError, UnsafePickleError, UnsupportedError
from ..pickle_io import InertPrefix, NotFastPath, load_refs
from ..refs import CallRef, GlobalRef, InertObject, TensorRef, concat_ref
from ..safety import TRUST_HINT, unsafe_in
from ..zipfmt import TorchZip

MODEL_STATES = "mp_rank_00_model_states.pt"
_RANK_FILE = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")
_HINT = "consolidate with the zero_to_fp32.py script DeepSpeed saves in the checkpoint folder"


def tag_folder(path: str) -> str | None:
    """The folder holding a checkpoint's states: ``path`` itself, or the tag its ``latest`` names."""
    if not os.path.isdir(path):
        return None
    if _is_tag_folder(path):
        return path
    try:
        with open(os.path.join(path, "latest"), encoding="utf-8") as f:
            tag = f.read(256).strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
        return None
    sub = os.path.join(path, tag)
    return sub if _is_tag_folder(sub) else None


def _is_tag_folder(folder: str) -> bool:
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return MODEL_STATES in names or any(_RANK_FILE.match(n) and n.endswith("_model_states.pt") for n in names)


def sniff(path: str, head: bytes) -> bool:
    """A DeepSpeed folder -- unless it also holds Hugging Face weights of its own (a Trainer
    checkpoint-N/ folder with model.safetensors beside global_stepN/): those are the model as
    saved, and the DeepSpeed states stay reachable by passing their tag folder."""
    from .hf import INDEX_NAMES, SINGLE_NAMES

    if tag_folder(path) is None:
        return False
    return not any(os.path.isfile(os.path.join(path, n)) for n in INDEX_NAMES + SINGLE_NAMES)


def load(path: str, *, key=None, trust_pickle=False, **_) -> Checkpoint:
    from ..loading import load_file
    from .torchfile import ZeRO3Placeholders

    folder = tag_folder(path)
    if folder is None:
        raise NotACheckpointError(f"{path}: not a DeepSpeed checkpoint folder")
    files = _rank_files(folder)
    first = os.path.join(folder, MODEL_STATES)
    if not os.path.isfile(first):
        first = files["model"][0]
    where = os.path.relpath(first, path) if first.startswith(path.rstrip(os.sep) + os.sep) else first
    note = f"DeepSpeed folder: read {where}" + (" (the tag its 'latest' file names)" if folder != path else "")
    from dataclasses import replace

    try:
        ck = load_file(first, key=key, trust_pickle=trust_pickle)
    except ZeRO3Placeholders:
        return consolidate_zero3(folder, files, trust_pickle)
    return replace(ck, notes=ck.notes + (note,))


def _rank_files(folder: str) -> dict[str, list[str]]:
    found: dict[str, dict[int, str]] = {"model": {}, "optim": {}}
    for name in os.listdir(folder):
        m = _RANK_FILE.match(name)
        if not m:
            continue
        if m[2] != "00":
            raise UnsupportedError(f"{folder}: a model- or pipeline-parallel DeepSpeed checkpoint ({name})",
                                   hint="convert it with DeepSpeed's ds_to_universal.py, or save with "
                                   "stage3_gather_16bit_weights_on_model_save")
        rank = int(m[1])
        if rank in found[m[3]]:
            raise CorruptCheckpointError(f"{folder}: two {m[3]}-state files for rank {rank} "
                                         f"({found[m[3]][rank]}, {name})")
        found[m[3]][rank] = os.path.join(folder, name)
    return {kind: [ranks[r] for r in sorted(ranks)] for kind, ranks in found.items()}


def consolidate_zero3(folder: str, files: dict[str, list[str]], trust_pickle=False) -> Checkpoint:
    """ZeRO-3's parameters from the ranks' fp32 partitions (see the module docstring)."""
    models, optims = files["model"], files["optim"]
    if not optims:
        raise CorruptCheckpointError(f"{folder}: ZeRO-3 model states without any *_optim_states.pt file "
                                     "(the weights live there)", hint="copy the whole tag folder")
    ranks = [_graph(p, trust_pickle) for p in optims]
    state0 = _optimizer_state(ranks[0], optims[0])
    stage = _stage(state0.get("zero_stage"))
    if stage != 3:
        raise CorruptCheckpointError(f"{optims[0]}: ZeRO stage {stage!r}, but the model states hold ZeRO-3 "
                                     "placeholders")
    world = state0.get("partition_count")
    world = max(world) if isinstance(world, (list, tuple)) and world else world
    if not isinstance(world, int) or world < 1:
        raise CorruptCheckpointError(f"{optims[0]}: no partition count")
    if len(optims) != world or [int(_RANK_FILE.match(os.path.basename(p))[1]) for p in optims] != list(range(world)):
        raise CorruptCheckpointError(f"{folder}: {len(optims)} optimizer-state files for {world} ranks "
                                     "(one missing, or files of two runs?)", hint="copy the whole tag folder")
    groups = []
    for graph, path in zip(ranks, optims):
        flat = _optimizer_state(graph, path).get("fp32_flat_groups")
        if not isinstance(flat, (list, tuple)) or not all(_flat(t) for t in flat):
            raise CorruptCheckpointError(f"{path}: no fp32_flat_groups of 1-D tensors")
        groups.append(list(flat))
    if any([t.numel for t in g] != [t.numel for t in groups[0]] for g in groups):
        raise CorruptCheckpointError(f"{folder}: the ranks' fp32 partitions differ in size")

    model_graphs = [_graph(p, trust_pickle) for p in models]
    if len(models) != world:
        raise CorruptCheckpointError(f"{folder}: {len(models)} model-state files for {world} ranks")
    m0 = model_graphs[0]
    if not isinstance(m0, Mapping) or not isinstance(m0.get("param_shapes"), (list, tuple)):
        raise CorruptCheckpointError(f"{models[0]}: not DeepSpeed model states (no param_shapes)")
    for k in ("ds_autoep_layers", "autoep_layers"):
        layers = m0.get(k)
        if isinstance(layers, list) and any(isinstance(e, Mapping) and e.get("checkpoint_format") == "zero3_partitioned"
                                            for e in layers):
            raise UnsupportedError(f"{folder}: expert layers partitioned over expert-parallel groups (AutoEP)",
                                   hint="convert it with DeepSpeed's ds_to_universal.py")

    state: OrderedDict = OrderedDict()
    module = m0.get("module") if isinstance(m0.get("module"), Mapping) else {}
    buffers = set(m0.get("buffer_names") or ())
    for name, v in module.items():
        if name in buffers and isinstance(v, TensorRef):
            state[name] = v
    frozen = m0.get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        frags = [g.get("frozen_param_fragments", {}).get(name) if isinstance(g, Mapping) else None
                 for g in model_graphs]
        if not all(_flat(t) for t in frags):
            raise CorruptCheckpointError(f"{folder}: frozen parameter {name!r} lacks a rank's fragment")
        state[name] = _gathered(name, _shape(shape), [[f] for f in frags], 0)
    offset, total = 0, sum(t.numel for t in groups[0])
    for shapes in m0["param_shapes"]:
        for name, shape in shapes.items():
            shape = _shape(shape)
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            if offset + part > total:
                raise CorruptCheckpointError(f"{folder}: parameter {name!r} runs past the ranks' fp32 partitions")
            state[name] = _gathered(name, shape, groups, offset, part)
            offset += part
    if offset != total:
        raise CorruptCheckpointError(f"{folder}: the parameters take {offset} of the {total} elements of each "
                                     "rank's fp32 partition")
    for alias, target in (m0.get("shared_params") or {}).items():
        if target in state:
            state[alias] = state[target]
    order = [k for k in module if k in state] + [k for k in state if k not in module]
    state = OrderedDict((k, state[k]) for k in order)
    note = (f"DeepSpeed ZeRO-3 checkpoint: {len(state)} tensors put together from {world} ranks' fp32 partitions "
            f"(as zero_to_fp32.py does: trainable parameters fp32, frozen ones and buffers as saved)")
    every = models + optims
    src = Source(path=folder, format="deepspeed-zero3", size=sum(os.path.getsize(p) for p in every),
                 files=tuple(every), lazy=True, notes=(note,))
    return Checkpoint(state=state, source=src, notes=(note,))


def _gathered(name: str, shape: tuple, per_rank: list, offset: int, part: int | None = None) -> TensorRef:
    """A parameter from ``part`` elements at ``offset`` of each rank's concatenated flat tensors,
    rank after rank, cut to the parameter's size."""
    numel = math.prod(shape)
    pieces, want = [], numel
    for flats in per_rank:
        take = sum(t.numel for t in flats) - offset if part is None else part
        at, left = offset, min(take, want)
        want -= left
        for t in flats:
            if left <= 0:
                break
            if at >= t.numel:
                at -= t.numel
                continue
            n = min(t.numel - at, left)
            pieces.append(TensorRef(t.storage, t.offset + at * t.stride[0], (n,), (1,), t.dtype))
            left -= n
            at = 0
        if left > 0:
            raise CorruptCheckpointError(f"DeepSpeed parameter {name!r}: a rank's partition is too short")
    if want > 0 or len({p.dtype for p in pieces}) > 1:
        raise CorruptCheckpointError(f"DeepSpeed parameter {name!r}: its partitions hold fewer than {numel} "
                                     "elements of one dtype")
    dtype = pieces[0].dtype if pieces else per_rank[0][0].dtype
    return concat_ref(shape, dtype, pieces, label=f"DeepSpeed parameter {name!r}")


def _graph(path: str, trust_pickle):
    """A states file's object graph, torch-free; DeepSpeed's own classes recorded inert."""
    z = TorchZip(path)
    try:
        data = z.read("data.pkl")
        if z.has("byteorder") and z.read("byteorder").strip() == b"big":
            raise UnsupportedError(f"{path}: saved on a big-endian machine", hint=_HINT)

        def source(k, dtype, nbytes):
            return z.source(f"data/{k}", nbytes, label=f"storage data/{k}")

        try:
            return load_refs(data, source, inert=InertPrefix("deepspeed."))
        except NotFastPath as e:
            unsafe = [g for g in unsafe_in(data) if not g.startswith("deepspeed.")]
            if unsafe and trust_pickle is not True:
                raise UnsafePickleError(f"{path} would import globals outside the weights-only allowlist: "
                                        f"{', '.join(unsafe)}; nothing was executed", globals_=unsafe,
                                        hint=TRUST_HINT) from None
            raise UnsupportedError(f"{path}: uses {e}, which only torch.load rebuilds", hint=_HINT) from None
    finally:
        z.close()


def _optimizer_state(graph, path: str) -> Mapping:
    osd = graph.get("optimizer_state_dict") if isinstance(graph, Mapping) else None
    if not isinstance(osd, Mapping):
        raise CorruptCheckpointError(f"{path}: not a DeepSpeed optimizer-state file (no optimizer_state_dict)")
    return osd


def _stage(v):
    if isinstance(v, InertObject):  # ZeroStageEnum(3), recorded without importing DeepSpeed
        args = v._inert.get("args") or ()
        return args[0] if len(args) == 1 and isinstance(args[0], int) else None
    return v if isinstance(v, int) else None


def _shape(v) -> tuple:
    if isinstance(v, CallRef) and v.func == GlobalRef("torch", "Size") and len(v.args) == 1:
        v = v.args[0]
    if isinstance(v, (tuple, list)) and all(isinstance(d, int) and d >= 0 for d in v):
        return tuple(v)
    raise CorruptCheckpointError(f"DeepSpeed model states: {v!r} is not a shape")


def _flat(t) -> bool:
    return isinstance(t, TensorRef) and len(t.shape) == 1 and t.byte_span() is not None
