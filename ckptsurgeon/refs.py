"""Lazy, torch-free references to tensors and the bytes behind them.

A checkpoint's object graph is held with these stand-ins in place of torch objects:
``TensorRef`` knows a tensor's dtype, shape, stride and where its bytes live (``StorageRef`` ->
a byte source) without reading them; ``GlobalRef``/``CallRef`` keep any other allowlisted torch
global exactly as the pickle named it (:mod:`ckptsurgeon.inert`), so the graph can be pickled back
byte-compatibly without importing torch. Only :meth:`TensorRef.to_torch` imports torch. The byte sources themselves
(file ranges, memory, assembled pieces) are :mod:`ckptsurgeon.byteranges`'.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from . import dtypes
from .errors import CorruptCheckpointError, MemoryLimitError
from .inert import GlobalRef


class StorageRef:
    """One storage record: raw bytes of ``numel`` elements of ``dtype`` from ``source``."""

    __slots__ = ("dtype", "numel", "storage_type", "location", "source", "key", "_torch", "__weakref__")

    def __init__(self, dtype: str, numel: int, source, *, storage_type: GlobalRef | None = None,
                 location: str = "cpu", key: str | None = None):
        self.dtype = dtype
        self.numel = int(numel)
        self.storage_type = storage_type or _storage_type_for(dtype)
        self.location = location
        self.source = source
        self.key = key
        self._torch = None

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)

    def untyped_storage(self):
        """A torch UntypedStorage over the bytes (zero-copy over an mmap where possible)."""
        if self._torch is None:
            import torch

            buf = self.source.buffer()
            if len(buf) != self.nbytes:
                raise CorruptCheckpointError(
                    f"storage {self.key or ''} holds {len(buf)} bytes, its header says {self.nbytes}"
                )
            if self.nbytes == 0:
                self._torch = torch.UntypedStorage(0)
            else:
                self._torch = torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()
        return self._torch


def _storage_type_for(dtype: str) -> GlobalRef:
    name = dtypes.DTYPE_TO_STORAGE.get(dtype)
    return GlobalRef("torch", name) if name else GlobalRef("torch.storage", "UntypedStorage")


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_dense_fits(ref: "TensorRef", name: str = "") -> None:
    """Before a view is made dense: refuse, in one clear line, one whose dense form is far larger
    than the storage it views (a broadcast ``expand``, stride 0) and than the memory available.
    A 1.8 KB file holding ``torch.ones(1).expand(10**6, 10**6)`` asked torch for 4 TB (an
    allocator error), and a smaller such view fits the address space and is killed by the kernel."""
    dense = ref.nbytes
    if dense <= max(2 * ref.storage.nbytes, 256 << 20):
        return
    avail = available_memory()
    if avail is not None and dense > avail:
        raise MemoryLimitError(
            f"{f'{name}: ' if name else ''}a tensor of shape {list(ref.shape)} (strides {list(ref.stride)}) views "
            f"{dtypes.human_bytes(ref.storage.nbytes)} of storage but is {dtypes.human_bytes(dense)} dense, "
            f"more than the {dtypes.human_bytes(avail)} of memory available",
            hint="a torch zip output (.pt) keeps such a view as it is; other outputs and comparisons need it dense")


def contiguous_stride(shape) -> tuple:
    """Row-major strides (in elements) of a tensor of ``shape``."""
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


class TensorRef:
    """A tensor as a view (offset, shape, stride) on a :class:`StorageRef`; no bytes read."""

    __slots__ = ("storage", "offset", "shape", "stride", "dtype", "requires_grad", "hooks",
                 "metadata", "param", "attrs", "numel", "__weakref__")

    def __init__(self, storage: StorageRef, offset: int, shape, stride, dtype: str | None = None, *,
                 requires_grad: bool = False, hooks: Any = None, metadata: Any = None, param=None,
                 attrs: Any = None):
        self.storage = storage
        self.offset = int(offset)
        self.shape = tuple(map(int, shape))
        self.stride = tuple(map(int, stride))
        self.numel = math.prod(self.shape)  # (a MoE checkpoint has 10^5 tensors: asked for often)
        self.dtype = dtype or storage.dtype
        self.requires_grad = bool(requires_grad)
        self.hooks = hooks
        self.metadata = metadata
        # None for a plain tensor; (requires_grad, hooks, state_or_None) for an nn.Parameter
        self.param = param
        # Python attributes set on a plain tensor (DeepSpeed's ds_id...): the state torch pickles
        # with _rebuild_from_type_v2(..., torch.Tensor, ..., state); None when there are none
        self.attrs = attrs

    # ---- facts, no data
    @property
    def itemsize(self) -> int:
        return dtypes.ITEMSIZE.get(self.dtype) or dtypes.itemsize(self.dtype)  # (the lookup alone: hot)

    @property
    def nbytes(self) -> int:
        return self.numel * (dtypes.ITEMSIZE.get(self.dtype) or dtypes.itemsize(self.dtype))

    def is_contiguous(self) -> bool:
        expected = 1
        for size, st in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and st != expected:
                return False
            expected *= size
        return True

    def byte_span(self) -> tuple[int, int] | None:
        """(start, length) of this tensor's bytes inside its storage, if laid out contiguously."""
        if not self.is_contiguous():
            return None
        start = self.offset * self.itemsize
        return start, self.nbytes

    def check_bounds(self) -> None:
        """Raise if the view reaches outside its storage (a hostile or corrupt pickle)."""
        if any(s < 0 for s in self.shape) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise CorruptCheckpointError("tensor with negative size, stride or offset")
        if max((*self.shape, *self.stride, self.offset, self.numel)) >= 1 << 63:  # (an empty tensor too)
            raise CorruptCheckpointError("tensor with a size, stride or offset past torch's 64-bit range")
        if self.numel == 0:
            return
        last = self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        storage_bytes = self.storage.nbytes
        if (last + 1) * self.itemsize > storage_bytes:
            raise CorruptCheckpointError(
                f"tensor of shape {list(self.shape)} reaches past its storage "
                f"({(last + 1) * self.itemsize} > {storage_bytes} bytes)"
            )

    def read_bytes(self) -> memoryview:
        """This tensor's bytes in row-major order (zero-copy when contiguous)."""
        span = self.byte_span()
        if span is not None:
            start, length = span
            return self.storage.source.buffer()[start:start + length]
        check_dense_fits(self)
        t = self.to_torch().contiguous()
        return tensor_bytes(t)

    # ---- data
    def to_torch(self):
        """Materialise as a CPU torch tensor (imports torch; zero-copy from an mmap)."""
        import torch

        self.check_bounds()
        dt = dtypes.torch_dtype(self.dtype)
        t = torch.empty(0, dtype=dt)
        if self.storage.nbytes:
            t.set_(self.storage.untyped_storage(), self.offset, self.shape, self.stride)
        else:
            t = torch.empty(self.shape, dtype=dt)
        if self.param is not None:
            t = torch.nn.Parameter(t, requires_grad=bool(self.param[0]))
        elif self.requires_grad and t.is_floating_point():
            t.requires_grad_(True)
        if isinstance(self.attrs, dict):
            t.__dict__.update(self.attrs)
        return t

    def __repr__(self):
        return f"TensorRef({self.dtype}, {list(self.shape)})"

    # ---- construction from torch
    @staticmethod
    def from_torch(t, _storages: dict | None = None) -> "TensorRef":
        """Wrap a real CPU tensor; tensors sharing a storage share one StorageRef."""
        import torch

        from .errors import UnsupportedError

        kind = special_kind(t)
        if kind:
            raise UnsupportedError(f"cannot store a {kind} tensor without torch.save")
        if t.device.type != "cpu":
            t = t.cpu()
        us = t.untyped_storage()
        key = (us.data_ptr(), us.nbytes())
        storages = _storages if _storages is not None else {}
        sref = storages.get(key)
        dname = dtypes.dtype_name(t.dtype)
        if sref is None or sref.dtype != dname:
            n_elems = us.nbytes() // max(t.element_size(), 1)
            sref = StorageRef(dname, n_elems, TorchStorageBytes(us))
            storages[key] = sref
        param = None
        if isinstance(t, torch.nn.Parameter):
            param = (t.requires_grad, None, None)
        return TensorRef(sref, t.storage_offset(), tuple(t.shape), tuple(t.stride()), dname,
                         requires_grad=t.requires_grad and param is None, param=param)


class TorchStorageBytes:
    """Bytes of a live torch UntypedStorage (CPU)."""

    def __init__(self, storage):
        self.storage = storage
        self.crc = None
        self.label = ""

    @property
    def length(self) -> int:
        return self.storage.nbytes()

    def buffer(self) -> memoryview:
        import torch

        if self.storage.nbytes() == 0:
            return memoryview(bytearray(0))
        t = torch.empty(0, dtype=torch.uint8).set_(self.storage)
        return memoryview(t.numpy()).cast("B")


def special_kind(t) -> str | None:
    """'sparse_coo', 'nested', 'quantized', 'meta'... for a tensor that is not plain strided
    memory (no flat bytes to hash or copy); None for an ordinary tensor."""
    import torch

    if getattr(t, "is_nested", False):
        return "nested"
    if t.layout != torch.strided:
        return str(t.layout).replace("torch.", "")
    if t.is_quantized:
        return "quantized"
    if t.is_meta:
        return "meta"
    return None


def plain_form(kind: str) -> str:
    """How a tensor of a special kind (see special_kind) becomes a plain one, for messages."""
    return {"quantized": "t.dequantize()", "nested": "t.to_padded_tensor(0)",
            "meta": "real data (a meta tensor has none)"}.get(kind, "t.to_dense()")


def tensor_bytes(t) -> memoryview:
    """Raw bytes of a contiguous CPU tensor, any dtype."""
    import torch

    kind = special_kind(t)
    if kind:
        from .errors import UnsupportedError

        raise UnsupportedError(f"a {kind} tensor has no flat bytes to compare or copy",
                               hint=f"convert it to a plain tensor first ({plain_form(kind)})")
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(bytearray(0))
    flat = t.reshape(-1)
    if flat.stride(0) != 1:  # one element under any stride counts as contiguous, but cannot be viewed as bytes
        flat = flat.as_strided((1,), (1,))
    u8 = flat.view(torch.uint8) if flat.element_size() > 0 else flat
    return memoryview(u8.numpy()).cast("B")


def is_tensor_like(v) -> bool:
    if isinstance(v, TensorRef):
        return True
    mod = type(v).__module__
    if mod.startswith("torch"):
        import torch

        return isinstance(v, torch.Tensor)
    return False


def holds_tensors(v, depth: int = 4, seen: set | None = None) -> bool:
    """Whether a non-tensor value carries tensors in its lists, tuples or mappings (a quantized
    module's ``_packed_params`` tuple, a nested dict of weights). A container the pickle puts in
    many places is looked at once (a 14 KB file nesting one 2,000-item list in another, three
    deep, was 8 * 10^9 steps)."""
    if is_tensor_like(v):
        return True
    if depth <= 0 or not isinstance(v, (Mapping, list, tuple)):
        return False
    seen = set() if seen is None else seen
    if id(v) in seen:
        return False
    seen.add(id(v))
    return any(holds_tensors(x, depth - 1, seen) for x in (v.values() if isinstance(v, Mapping) else v))


def as_ref(v, storages: dict | None = None) -> TensorRef:
    """TensorRef for either a TensorRef or a torch tensor."""
    return v if isinstance(v, TensorRef) else TensorRef.from_torch(v, storages)


def tie_key(ref: TensorRef) -> tuple:
    """Equal for two names of the very same tensor (tied weights): same storage, same view."""
    return id(ref.storage), ref.offset, ref.shape, ref.stride, ref.dtype

