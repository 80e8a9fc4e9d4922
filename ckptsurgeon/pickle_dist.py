"""DTensors (FSDP2, tensor parallel) and ShardedTensors (FSDP1's SHARDED_STATE_DICT) as a
pickle holds them, read without torch.distributed: their classes and specs are recorded inert
(never imported), and each becomes its local tensor when that holds the whole value, or, for a
folder of every rank's file, a :class:`DTensorShard` that :mod:`ckptsurgeon.formats.dtensor_ranks`
puts together. :mod:`ckptsurgeon.pickle_io`'s unpickler hands them here.
"""

from __future__ import annotations

from .errors import CorruptCheckpointError, NotFastPath, UnsupportedError
from .inert import CallRef, GlobalRef, InertObject
from .refs import TensorRef


#: What a DTensor (FSDP2, tensor parallel) pickles besides torch's own rebuild functions: the
#: class, its spec, the device mesh and the placements. torch.distributed.tensor registers these
#: with add_safe_globals, so torch.load(weights_only=True) reads them once that module is
#: imported; older versions kept them under torch.distributed._tensor, hence names, not paths.
#: Here they are never imported: the parts are recorded inert and the DTensor becomes its local
#: tensor when that holds the whole value (see _dtensor).
DTENSOR_NAMES = frozenset({"DTensor", "DTensorSpec", "TensorMeta", "ShardOrderEntry", "DeviceMesh", "Shard",
                           "Replicate", "Partial", "_Partial", "_StridedShard", "_MeshLayout", "_FlatLayout"})


#: What an FSDP1 SHARDED_STATE_DICT (a ShardedTensor per parameter) pickles, saved per rank with
#: torch.save: torch.distributed._shard's data classes, recorded inert the same way (the
#: ShardedTensor becomes its rank's piece; see _sharded_tensor).
SHARDED_TENSOR_NAMES = frozenset({"ShardedTensor", "ShardMetadata", "_remote_device", "ShardedTensorMetadata",
                                  "TensorProperties", "MEM_FORMAT_ENCODING", "ChunkShardingSpec",
                                  "EnumerableShardingSpec"})


def is_dtensor_global(module: str, name: str) -> bool:
    return module.startswith("torch.distributed.") and (name in DTENSOR_NAMES or name in SHARDED_TENSOR_NAMES)


def is_sharded_tensor_class(obj) -> bool:
    return (isinstance(obj, type) and issubclass(obj, InertObject) and obj.inert_name == "ShardedTensor"
            and obj.inert_module.startswith("torch.distributed."))


class DTensorType(GlobalRef):
    """The DTensor class as a pickle names it (marks the _rebuild_from_type_v2 call to handle)."""


def _state_dict_of(state) -> dict:
    """An object's pickled state: a dict, or (dict, slots) as copyreg writes it."""
    if isinstance(state, tuple) and len(state) == 2:
        merged = dict(state[0] or {})
        merged.update(state[1] or {})
        return merged
    return state if isinstance(state, dict) else {}


def _placements(spec) -> list[str]:
    """Class names of a recorded DTensorSpec's placements (Shard, Replicate, Partial...)."""
    if not isinstance(spec, InertObject):
        return []
    return [type(p).inert_name if isinstance(p, InertObject) else type(p).__name__ for p in _placement_objs(spec)]


def _placement_objs(spec) -> list:
    placements = _state_dict_of(spec._inert["state"]).get("placements") or () if isinstance(spec, InertObject) else ()
    return list(placements) if isinstance(placements, (tuple, list)) else []


class DTensorShard:
    """One rank's piece of a DTensor sharded over a 1-D device mesh (or of an FSDP1 ShardedTensor),
    as a per-rank torch.save file holds it: the local tensor, the global shape, the sharded
    dimension (None: replicated) and this piece's place along it (its coordinate on the mesh; for a
    ShardedTensor, its rank among all shards' offsets). ``local`` None: this rank holds no piece
    (a ShardedTensor smaller than the world). :mod:`ckptsurgeon.formats.dtensor_ranks` puts the
    pieces of all ranks together."""

    def __init__(self, local: TensorRef, size: tuple, dim: int | None, coordinate: int):
        self.local, self.size, self.dim, self.coordinate = local, size, dim, coordinate


def _shard_of(local: TensorRef, size: tuple, spec) -> DTensorShard:
    placements = _placement_objs(spec)
    names = _placements(spec)
    if len(placements) != 1 or names[0] not in ("Shard", "Replicate"):
        raise UnsupportedError(f"a DTensor placed as {'/'.join(names) or '?'}: only one-dimensional meshes with "
                               "Shard or Replicate are put together here", hint=_DTENSOR_HINT)
    dim = None
    if names[0] == "Shard":
        dim = _state_dict_of(placements[0]._inert["state"]).get("dim")
        if not isinstance(dim, int) or not 0 <= dim < len(size):
            raise CorruptCheckpointError(f"a DTensor Shard placement names dimension {dim!r} of a {list(size)} tensor")
    mesh = _state_dict_of(spec._inert["state"]).get("mesh")
    fields = _state_dict_of(mesh._inert["state"]) if isinstance(mesh, InertObject) else {}
    coord = fields.get("_coordinate_on_dim")
    if not (isinstance(coord, (tuple, list)) and len(coord) == 1 and isinstance(coord[0], int)):
        raise UnsupportedError("a DTensor whose device mesh does not record this rank's coordinate",
                               hint=_DTENSOR_HINT)
    return DTensorShard(local, tuple(size), dim, coord[0])


def dtensor(args, state, collect: bool = False):
    """A pickled DTensor -> its local tensor, when that is the whole value: the global shape equals
    the local one (one rank, or replicated) and no placement is a pending partial sum. Anything
    else is one rank's piece of a sharded tensor, which this file alone cannot rebuild."""
    fields = _state_dict_of(state)
    local = fields.get("_local_tensor")
    if not isinstance(local, TensorRef):
        raise NotFastPath("DTensor without a plain local tensor")
    size = args[2] if isinstance(args, tuple) and len(args) > 2 else None
    if isinstance(size, CallRef):  # torch.Size(...)
        size = size.args[0] if size.args else None
    kinds = _placements(fields.get("_spec"))
    partial = [k for k in kinds if "Partial" in k]
    if partial:
        raise UnsupportedError(f"a DTensor with a {partial[0]} placement holds one rank's partial sum, not "
                               "the value", hint=_DTENSOR_HINT)
    if collect and isinstance(size, (tuple, list)) and tuple(size) != tuple(local.shape):
        return _shard_of(local, tuple(size), fields.get("_spec"))
    if not isinstance(size, (tuple, list)) or tuple(size) != tuple(local.shape):
        raise UnsupportedError(f"a DTensor sharded across ranks ({'/'.join(kinds) or 'sharded'}): this file "
                               f"holds one rank's piece {list(local.shape)} of a {list(size or ())} tensor",
                               hint=_DTENSOR_HINT)
    if len(args) > 7 and isinstance(args[7], bool):
        local.requires_grad = args[7]
    return local


_DTENSOR_HINT = ("save a full state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict with "
                 "StateDictOptions(full_state_dict=True, cpu_offload=True)), or save with "
                 "torch.distributed.checkpoint and pass that folder")


def sharded_tensor(args, state, collect: bool = False):
    """A pickled ShardedTensor (torch.distributed._shard; FSDP1's SHARDED_STATE_DICT) -> its one
    local shard when that is the whole tensor; with ``collect``, a :class:`DTensorShard` (the
    sharded dimension and this shard's place among all shards' offsets, both read from the
    metadata every rank's file holds); else one rank's piece, which this file alone cannot rebuild."""
    size = args[2] if isinstance(args, tuple) and len(args) > 2 else None
    if isinstance(size, CallRef):  # torch.Size(...)
        size = size.args[0] if size.args else None
    shards = state[0] if isinstance(state, tuple) and state else None
    meta = state[1] if isinstance(state, tuple) and len(state) > 1 else None
    if not isinstance(size, (tuple, list)) or not isinstance(shards, list) or not isinstance(meta, InertObject):
        raise NotFastPath("a ShardedTensor of an unknown layout")
    size = tuple(size)
    if len(shards) > 1 or not all(isinstance(x, InertObject) for x in shards):
        raise UnsupportedError(f"a ShardedTensor with {len(shards)} local shards on one rank: only one shard per "
                               "rank is put together here", hint=_DTENSOR_HINT)
    if not all(isinstance(n, int) and n >= 0 for n in size):
        raise CorruptCheckpointError(f"a ShardedTensor of shape {size!r}")

    def offsets_of(m) -> tuple:
        got = _state_dict_of(m._inert["state"]).get("shard_offsets")
        if not (isinstance(got, (list, tuple)) and len(got) == len(size)
                and all(isinstance(n, int) and 0 <= n <= s for n, s in zip(got, size))):
            raise CorruptCheckpointError(f"a ShardedTensor shard at offsets {got!r} of a {list(size)} tensor")
        return tuple(got)

    listed = _state_dict_of(meta._inert["state"]).get("shards_metadata")
    everyone = [offsets_of(m) for m in listed if isinstance(m, InertObject)] if isinstance(listed, list) else []
    dims = {i for o in everyone for i, v in enumerate(o) if v}
    local = mine = None
    if shards:
        fields = _state_dict_of(shards[0]._inert["state"])
        local, own = fields.get("tensor"), fields.get("metadata")
        if not isinstance(local, TensorRef) or not isinstance(own, InertObject):
            raise NotFastPath("a ShardedTensor shard without a plain tensor")
        mine = offsets_of(own)
        if not collect and tuple(local.shape) == size and len(everyone) <= 1:
            return local  # one rank's file that holds the whole tensor (a world of one)
    if not collect or len(dims) > 1 or (mine is not None and mine not in everyone):
        piece = f"one rank's piece {list(local.shape)}" if local is not None else "no piece"
        raise UnsupportedError(f"a ShardedTensor (FSDP1 SHARDED_STATE_DICT) sharded across ranks: this file holds "
                               f"{piece} of a {list(size)} tensor",
                               hint="pass the folder of every rank's file, or " + _DTENSOR_HINT)
    dim = min(dims) if dims else 0
    if local is None:  # a rank left without rows (a parameter smaller than the world): nothing to add
        return DTensorShard(None, size, dim, None)
    return DTensorShard(local, size, dim, sorted(everyone, key=lambda o: o[dim]).index(mine))
