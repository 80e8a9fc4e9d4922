"""DeepSpeed checkpoint folders, and ZeRO-3 weights put back together without DeepSpeed.

``engine.save_checkpoint(dir, tag)`` writes ``dir/latest`` (the tag's name) and ``dir/<tag>/``
holding the model states (``mp_rank_00_model_states.pt``, or one
``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` per rank) and one ``*_optim_states.pt`` per
data-parallel rank. Under ZeRO stages 0-2 the model states hold the whole model in its
training dtype: that file is read, like any torch file (``key="fp32"``, ``--key fp32``: the fp32
master weights instead, see below). Under ZeRO-3 they hold empty placeholders; the weights exist
only as each rank's partition of the fp32 master copy in its optimizer-state file. Those are put
back together here the way DeepSpeed's own ``zero_to_fp32.py`` does it, with the same result
(tested against it):

* stages 1-2: parameter group ``g`` is the ranks' ``single_partition_of_fp32_groups[g]`` one
  after another; its parameters follow each other in it (with ``param_alignment_paddings``
  where recorded), the group padded to a multiple of ``2 * world``;

* stage 3: the trainable parameters, in the order of ``param_shapes``, occupy consecutive runs of
  ``ceil(numel / world)`` elements in every rank's flat fp32 groups (``fp32_flat_groups``,
  concatenated; a run may cross from one group into the next); a parameter is its runs taken
  rank after rank, cut to ``numel``, so the last rank's run carries the padding;
* frozen parameters are each rank's ``frozen_param_fragments[name]``, joined and cut the same
  way, in their own dtype; buffers come from rank 0's model states as saved; ``shared_params``
  make aliases.

Every parameter is a list of byte ranges of the optimizer-state files: nothing is assembled in
memory, outputs copy the ranges in the kernel (see :class:`~ckptsurgeon.byteranges.AssembledBytes`),
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
from dataclasses import replace

from ..checkpoint import Checkpoint, Source
from ..dtypes import count
from ..errors import CorruptCheckpointError, NotACheckpointError, UnsafePickleError, UnsupportedError
from ..keys import name_list
from ..layout import concat_ref
from ..pickle_io import InertPrefix, NotFastPath, load_refs
from ..inert import CallRef, GlobalRef, InertObject
from ..refs import TensorRef
from ..safety import TRUST_HINT, unsafe_in
from ..zipfmt import TorchZip

MODEL_STATES = "mp_rank_00_model_states.pt"
_RANK_FILE = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")
_HINT = "consolidate with the zero_to_fp32.py script DeepSpeed saves in the checkpoint folder"
#: ``key=FP32_KEY`` (``--key fp32``): the fp32 master weights from the optimizer states, at any stage
FP32_KEY = "fp32"


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
    from .hf import WEIGHT_NAMES

    if tag_folder(path) is None:
        return False
    return not any(os.path.isfile(os.path.join(path, n)) for n in WEIGHT_NAMES)


def load(path: str, *, key=None, trust_pickle=False, **_) -> Checkpoint:
    from ..loading import load_file
    from ..graph import ZeRO3Placeholders

    folder = tag_folder(path)
    if folder is None:
        raise NotACheckpointError(f"{path}: not a DeepSpeed checkpoint folder")
    files = _rank_files(folder)
    first = _model_states(folder, files)
    where = os.path.relpath(first, path) if first.startswith(path.rstrip(os.sep) + os.sep) else first
    note = f"DeepSpeed folder: read {where}" + (" (the tag its 'latest' file names)" if folder != path else "")
    if key == FP32_KEY:
        return consolidate(folder, files, trust_pickle)
    try:
        ck = load_file(first, key=key, trust_pickle=trust_pickle)
    except ZeRO3Placeholders:
        if key is not None:
            raise
        return consolidate(folder, files, trust_pickle)
    if files["optim"]:
        note += f"; the fp32 master weights in its optimizer states: --key {FP32_KEY}"
    return replace(ck, notes=ck.notes + (note,))


def _model_states(folder: str, files: dict[str, list[str]]) -> str:
    """The model-states file that holds the model (stages 0-2) or rank 0's placeholders (stage 3)."""
    single = os.path.join(folder, MODEL_STATES)
    return single if os.path.isfile(single) else files["model"][0]


_LAYER_FILE = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$")


def _rank_files(folder: str) -> dict[str, list[str]]:
    found: dict[str, dict[int, str]] = {"model": {}, "optim": {}}
    for name in os.listdir(folder):
        if _LAYER_FILE.match(name):
            raise UnsupportedError(f"{folder}: a pipeline-parallel DeepSpeed checkpoint (its layers are in "
                                   f"layer_*-model_states.pt files, e.g. {name})",
                                   hint="convert it with DeepSpeed's ds_to_universal.py")
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


def consolidate(folder: str, files: dict[str, list[str]], trust_pickle=False) -> Checkpoint:
    """The weights from the ranks' fp32 partitions in the optimizer states, as zero_to_fp32.py
    puts them together (see the module docstring; stages 1-2 below)."""
    models, optims = files["model"], files["optim"]
    if not optims:
        raise CorruptCheckpointError(f"{folder}: no *_optim_states.pt file (the fp32 weights live there)",
                                     hint="copy the whole tag folder")
    ranks = [_graph(p, trust_pickle) for p in optims]
    state0 = _optimizer_state(ranks[0], optims[0])
    stage = _stage(state0.get("zero_stage"))
    if stage not in (1, 2, 3):
        raise CorruptCheckpointError(f"{optims[0]}: unknown ZeRO stage {stage!r}")
    world = state0.get("partition_count")
    if isinstance(world, (list, tuple)) and world and len(set(world)) > 1:
        raise UnsupportedError(f"{folder}: parameter groups partitioned over different numbers of ranks "
                               "(expert-parallel MoE groups)", hint=_HINT)
    world = world[0] if isinstance(world, (list, tuple)) and world else world
    if not isinstance(world, int) or world < 1:
        raise CorruptCheckpointError(f"{optims[0]}: no partition count")
    if len(optims) != world or [int(_RANK_FILE.match(os.path.basename(p))[1]) for p in optims] != list(range(world)):
        raise CorruptCheckpointError(f"{folder}: {len(optims)} optimizer-state files for {world} ranks "
                                     "(one missing, or files of two runs?)", hint="copy the whole tag folder")
    name = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    groups = []
    for graph, path in zip(ranks, optims):
        flat = _optimizer_state(graph, path).get(name)
        if not isinstance(flat, (list, tuple)) or not all(_flat(t) for t in flat):
            raise CorruptCheckpointError(f"{path}: no {name} of 1-D tensors")
        groups.append(list(flat))
    if any(len(g) != len(groups[0]) for g in groups) or (
            stage == 3 and any([t.numel for t in g] != [t.numel for t in groups[0]] for g in groups)):
        raise CorruptCheckpointError(f"{folder}: the ranks' fp32 partitions differ")

    if stage == 3:
        if len(models) != world:
            raise CorruptCheckpointError(f"{folder}: {len(models)} model-state files for {world} ranks")
    else:
        models = [_model_states(folder, files)]
    model_graphs = [_graph(p, trust_pickle) for p in models]
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
    for key, v in module.items():
        if key in buffers and isinstance(v, TensorRef):
            state[key] = v
    for key, shape in (m0.get("frozen_param_shapes") or {}).items():
        frags = [g.get("frozen_param_fragments", {}).get(key) if isinstance(g, Mapping) else None
                 for g in model_graphs]
        want = _shape(shape)
        if len(frags) == 1 and isinstance(frags[0], TensorRef) and frags[0].shape == want:
            state[key] = frags[0]  # stages 1-2: the whole parameter
        elif all(_flat(t) for t in frags):  # stage 3: each rank's flat fragment
            state[key] = _gathered(key, want, [[f] for f in frags], 0)
        else:
            raise CorruptCheckpointError(f"{folder}: frozen parameter {key!r} lacks a rank's fragment")
    if stage == 3:
        _zero3_params(folder, state, m0["param_shapes"], groups, world)
    else:
        _zero2_params(folder, state, m0, state0, groups, world)
    for alias, target in (m0.get("shared_params") or {}).items():
        if target in state:
            state[alias] = state[target]
    order = [k for k in module if k in state] + [k for k in state if k not in module]
    state = OrderedDict((k, state[k]) for k in order)
    note = (f"DeepSpeed ZeRO-{stage} checkpoint: {count(len(state), 'tensor')} put together from {world} ranks' fp32 "
            "partitions (as zero_to_fp32.py does: trainable parameters fp32, frozen ones and buffers as saved)")
    every = models + optims
    src = Source(path=folder, format=f"deepspeed-zero{stage}", size=sum(os.path.getsize(p) for p in every),
                 files=tuple(every), lazy=True, notes=(note,))
    return Checkpoint(state=state, source=src, notes=(note,))


def _zero3_params(folder, state, param_shapes, groups, world) -> None:
    """Each parameter: ``ceil(numel / world)`` elements at a running offset of every rank's
    flat groups (concatenated), rank after rank."""
    offset, total = 0, sum(t.numel for t in groups[0])
    for shapes in param_shapes:
        for name, shape in shapes.items():
            shape = _shape(shape)
            part = math.ceil(math.prod(shape) / world)
            if offset + part > total:
                raise CorruptCheckpointError(f"{folder}: parameter {name!r} runs past the ranks' fp32 partitions")
            state[name] = _gathered(name, shape, groups, offset, part)
            offset += part
    if offset != total:
        raise CorruptCheckpointError(f"{folder}: the parameters take {offset} of the {total} elements of each "
                                     "rank's fp32 partition")


def _zero2_params(folder, state, m0, state0, groups, world) -> None:
    """Stages 1-2: parameter group ``g`` is the ranks' partitions of group ``g`` one after another;
    its parameters follow each other in it (plus ``param_alignment_paddings`` where recorded),
    and the group ends padded to a multiple of ``2 * world``."""
    shapes_of = m0["param_shapes"]
    if len(shapes_of) != len(groups[0]):
        raise CorruptCheckpointError(f"{folder}: {len(shapes_of)} parameter groups in the model states, "
                                     f"{len(groups[0])} in the optimizer states")
    paddings = state0.get("param_alignment_paddings")
    align = 2 * world
    for g, shapes in enumerate(shapes_of):
        flats = [groups[r][g] for r in range(world)]
        avail = sum(t.numel for t in flats)
        pads = paddings[g] if isinstance(paddings, (list, tuple)) and g < len(paddings) else None
        if pads is not None and (not isinstance(pads, (list, tuple)) or len(pads) != len(shapes)):
            raise CorruptCheckpointError(f"{folder}: group {g} has {len(shapes)} parameters but "
                                         f"{len(pads) if isinstance(pads, (list, tuple)) else '?'} alignment paddings")
        offset = 0
        for j, (name, shape) in enumerate(shapes.items()):
            shape = _shape(shape)
            numel = math.prod(shape)
            if offset + numel > avail:
                raise CorruptCheckpointError(f"{folder}: parameter {name!r} runs past its group's fp32 partitions")
            state[name] = _gathered(name, shape, [flats], offset, numel)
            offset += numel + (pads[j] if pads is not None and isinstance(pads[j], int) else 0)
        if math.ceil(offset / align) != math.ceil(avail / align):
            raise CorruptCheckpointError(f"{folder}: group {g}'s parameters take {offset} of its {avail} elements")


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
                                        f"{name_list(unsafe, 20)}; nothing was executed", globals_=unsafe,
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
