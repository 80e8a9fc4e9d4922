"""Comparing tensors: a fast content digest first, statistics only when the bytes differ.

Statistics run in chunks over the mapped bytes with numpy (float64 accumulation), so comparing
two multi-GiB checkpoints neither imports torch nor holds more than a few chunks in memory.
Dtypes numpy cannot read (float8, complex32...) go through torch.
"""

from __future__ import annotations

import math
from typing import Any

from .byteranges import crc32, file_pieces
from .errors import SelectionError
from .refs import TensorRef, check_dense_fits, special_kind, tensor_bytes

CHUNK = 1 << 22  # elements per chunk: 32 MiB per float64 working array

_NUMPY = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8", "int32": "<i4",
          "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "u1", "uint16": "<u2", "uint32": "<u4",
          "uint64": "<u8", "complex64": "<c8", "complex128": "<c16",
          "float8_e8m0fnu": "u1", "float4_e2m1fn_x2": "u1"}
# OCP MX FP4 (E2M1) magnitudes by code; bit 3 is the sign. Two values per byte, low nibble first.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


class SharedBlocks:
    """Tells two file-backed tensors apart from equal ones without reading them twice: on a
    filesystem that shares blocks (XFS, btrfs), a surgery's output or a ``cp --reflink`` copy
    holds its tensors on the input's own blocks, and bytes on the same blocks are the same bytes
    (:mod:`ckptsurgeon.extents`). Their CRC-32s, where recorded, are still checked, with one read
    of A instead of reading and hashing both sides. Anywhere else :meth:`same` answers False at
    the cost of an ioctl, and the pair is hashed as before."""

    def __init__(self, pool=None):
        self._fds: dict[str, int] = {}
        self._pool = pool  # a checking thread: every other pair's CRC read goes there
        self._pending: list = []

    def _fd(self, path: str) -> int:
        import os

        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    @staticmethod
    def _piece(v):
        if not isinstance(v, TensorRef) or not v.is_contiguous():
            return None
        span = v.byte_span()
        pieces = file_pieces(v.storage.source, *span) if span is not None else None
        if not pieces or len(pieces) != 1:
            return None
        r, at, n = pieces[0]
        if r.crc is not None and (at, n) != (0, r.length):
            return None  # part of a record: its CRC covers more than these bytes
        return r, at, n

    def same(self, va, vb) -> bool:
        from .extents import same_bytes

        pa, pb = self._piece(va), self._piece(vb)
        if pa is None or pb is None or pa[2] != pb[2]:
            return False
        (ra, at_a, n), (rb, at_b, _) = pa, pb
        try:
            if not same_bytes(self._fd(ra.path), ra.offset + at_a, self._fd(rb.path), rb.offset + at_b, n):
                return False
        except OSError:
            return False
        if ra.crc is not None or rb.crc is not None:
            if self._pool is not None and len(self._pending) % 2 == 0:
                self._pending.append(self._pool.submit(self._check, ra, at_a, n, rb))
            else:
                self._pending.append(None)
                self._check(ra, at_a, n, rb)
        return True

    @staticmethod
    def _check(ra, at: int, n: int, rb) -> None:
        crc = 0
        for chunk in ra.chunks(at, n):
            crc = crc32(chunk, crc)
        ra.verify_crc_value(crc)  # CorruptCheckpointError, naming the file, when it does not match
        rb.verify_crc_value(crc)

    def finish(self) -> None:
        """Wait for the CRC checks handed to the checking thread (raising what they found)."""
        pending, self._pending = self._pending, []
        for fut in pending:
            if fut is not None:
                fut.result()

    def close(self) -> None:
        import os

        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def digest(v: Any) -> str:
    """xxh3-128 of a tensor's bytes in row-major order (≈30 GiB/s).

    File-backed contiguous tensors are streamed with pread in 1 MiB chunks of one reused buffer:
    faster than faulting in an mmap page by page, and flat in memory (works under a memory cap).
    """
    import xxhash

    if isinstance(v, TensorRef):
        span = v.byte_span()
        # in files: the range itself, or the ranges of the pieces it is made of (sharded over ranks)
        pieces = file_pieces(v.storage.source, *span) if span is not None else None
        if pieces is not None:
            h = xxhash.xxh3_128()
            for src, at, n in pieces:
                # a whole record with a CRC still to check: checked in the same pass
                whole = (at, n) == (0, src.length) and src.crc is not None and not src._checked
                if not whole:
                    src.check_crc()  # streamed; a no-op once checked or when there is no CRC
                crc = 0
                for chunk in src.chunks(at, n):
                    h.update(chunk)
                    if whole:
                        crc = crc32(chunk, crc)
                if whole:
                    src.verify_crc_value(crc)
            return h.hexdigest()
        return xxhash.xxh3_128_hexdigest(v.read_bytes())
    kind = special_kind(v)
    if kind in ("quantized", "nested") or (kind or "").startswith("sparse"):
        h = xxhash.xxh3_128()
        header, parts = _special_parts(v, kind)
        h.update(header)
        for t in parts:
            h.update(f"|{list(t.shape)}|".encode())
            h.update(tensor_bytes(t.contiguous()))
        return h.hexdigest()
    return xxhash.xxh3_128_hexdigest(tensor_bytes(v))


def _special_parts(t, kind: str) -> tuple[bytes, list]:
    """What a tensor that is not flat memory *is*, as plain tensors to hash: a quantized tensor's
    integer values with its scheme, scales and zero points (two tensors quantize equal only when
    all of them are); a sparse tensor's dense values; a nested tensor's pieces."""
    import torch

    if kind == "quantized":
        scheme = t.qscheme()
        header = [str(t.dtype), str(scheme)]
        parts = [t.int_repr()]
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            header += [repr(float(t.q_scale())), repr(int(t.q_zero_point()))]
        else:
            header.append(str(t.q_per_channel_axis()))
            parts += [t.q_per_channel_scales(), t.q_per_channel_zero_points()]
        return "|".join(header).encode(), parts
    if kind == "nested":
        return f"{t.dtype}|nested".encode(), list(t.unbind())
    return f"{t.dtype}|{kind}".encode(), [t.to_dense()]


def plain_values(v):
    """The values of a quantized / sparse torch tensor as an ordinary tensor (dequantized, dense),
    for statistics; other values as they are."""
    if isinstance(v, TensorRef):
        return v
    kind = special_kind(v)
    if kind == "quantized":
        return v.dequantize()
    if (kind or "").startswith("sparse"):
        return v.to_dense()
    return v


def _as_numpy(v):
    """A flat numpy view of the tensor's bytes, or None when numpy cannot express the dtype."""
    import numpy as np

    dtype = v.dtype if isinstance(v, TensorRef) else str(v.dtype).replace("torch.", "")
    code = _NUMPY.get(dtype)
    if code is None:
        return None, dtype
    raw = v.read_bytes() if isinstance(v, TensorRef) else tensor_bytes(v)
    return np.frombuffer(raw, dtype=code), dtype


def _to_f64(chunk, dtype):
    import numpy as np

    if dtype == "bfloat16":
        return (chunk.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype.startswith("complex"):
        return chunk.view(np.float32 if dtype == "complex64" else np.float64).astype(np.float64)
    if dtype == "float8_e8m0fnu":  # a power of two: 2^(code-127); 0xFF is NaN
        out = np.ldexp(1.0, chunk.astype(np.int32) - 127)
        out[chunk == 0xFF] = np.nan
        return out
    if dtype == "float4_e2m1fn_x2":
        lut = np.array(_E2M1 + tuple(-v for v in _E2M1), dtype=np.float64)
        out = np.empty(chunk.size * 2, dtype=np.float64)
        out[0::2], out[1::2] = lut[chunk & 0x0F], lut[chunk >> 4]
        return out
    return chunk.astype(np.float64)


def comparable(dtype_a: str, dtype_b: str) -> bool:
    """Whether two dtypes can be compared value by value (in float64): complex with complex only,
    and two values per byte (float4 pairs) only with the same."""
    if complex_dtype(dtype_a) != complex_dtype(dtype_b):
        return False
    return (dtype_a == "float4_e2m1fn_x2") == (dtype_b == "float4_e2m1fn_x2")


def check_tolerances(atol, rtol) -> None:
    """Refuse a tolerance that is negative or NaN (None: the caller's default)."""
    for name, v in (("atol", atol), ("rtol", rtol)):
        if v is not None and not v >= 0:
            raise SelectionError(f"--{name} {v} must be 0 or more")


def stats(a, b, atol: float = 0.0, rtol: float = 0.0) -> dict | None:
    """Difference statistics of two same-shape tensors (TensorRefs or torch tensors), in float64,
    also across dtypes (float32 against its bfloat16 copy): max|a-b|, mean|a-b|, relative L2
    ‖a−b‖/‖a‖, cosine, number of differing elements, NaN/Inf counts, and whether they are close
    within atol + rtol·|b| elementwise. None where the dtypes cannot be compared (``comparable``)."""
    import numpy as np

    a, b = plain_values(a), plain_values(b)
    xa, dtype = _as_numpy(a)
    xb, dtype_b = _as_numpy(b)
    if not comparable(dtype, dtype_b):
        return None
    if xa is None or xb is None:
        return _stats_torch(a, b, atol, rtol)
    floating = any(d.startswith(("float", "bfloat", "complex")) for d in (dtype, dtype_b))
    n = xa.size
    max_abs = sum_abs = d2 = a2 = b2 = ab = 0.0
    n_diff = n_finite = 0
    close = True
    nonfinite = {"a": [0, 0], "b": [0, 0]}
    with np.errstate(all="ignore"):
        for start in range(0, n, CHUNK):
            ca = _to_f64(xa[start:start + CHUNK], dtype)
            cb = _to_f64(xb[start:start + CHUNK], dtype_b)
            if floating:
                for side, c in (("a", ca), ("b", cb)):
                    nonfinite[side][0] += int(np.isnan(c).sum())
                    nonfinite[side][1] += int(np.isinf(c).sum())
                both_nan = np.isnan(ca) & np.isnan(cb)
                same = (ca == cb) | both_nan
                fin = np.isfinite(ca) & np.isfinite(cb)
            else:
                same = ca == cb
                fin = np.ones(ca.shape, dtype=bool)
            n_diff += int((~same).sum())
            fa, fb = ca[fin], cb[fin]
            d = np.abs(fa - fb)
            if d.size:
                max_abs = max(max_abs, float(d.max()))
                sum_abs += float(d.sum())
            n_finite += int(d.size)
            d2 += float(np.dot(d, d))
            a2 += float(np.dot(fa, fa))
            b2 += float(np.dot(fb, fb))
            ab += float(np.dot(fa, fb))
            if close and (atol or rtol):
                ok = np.abs(ca - cb) <= atol + rtol * np.abs(cb)
                close = bool((ok | same).all())
    if complex_dtype(dtype):
        n_diff //= 2
    na, nb, nd = math.sqrt(a2), math.sqrt(b2), math.sqrt(d2)
    out = {
        "max_abs": max_abs,
        "mean_abs": sum_abs / n_finite if n_finite else 0.0,
        "rel_l2": nd / na if na > 0 else (0.0 if nd == 0 else float("inf")),
        "cosine": ab / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0),
        "n_diff": n_diff,
        # complex: values, not real/imag halves; float4 pairs: each 4-bit value counts
        "numel": n // 2 if complex_dtype(dtype) else n * 2 if dtype == "float4_e2m1fn_x2" else n,
        "diff_sq": d2,
        "ref_sq": a2,
        "close": close if (atol or rtol) else n_diff == 0,
    }
    nf = {side: {"nan": v[0], "inf": v[1]} for side, v in nonfinite.items() if v[0] or v[1]}
    if nf:
        out["nonfinite"] = nf
    return out


def complex_dtype(dtype: str) -> bool:
    return dtype.startswith("complex")


def _stats_torch(a, b, atol, rtol) -> dict:
    import torch

    for x in (a, b):
        if isinstance(x, TensorRef):
            check_dense_fits(x)
    ta = (a.to_torch() if isinstance(a, TensorRef) else a).detach().reshape(-1)
    tb = (b.to_torch() if isinstance(b, TensorRef) else b).detach().reshape(-1)
    if ta.is_complex():
        ta, tb = torch.view_as_real(ta).reshape(-1), torch.view_as_real(tb).reshape(-1)
    xa, xb = ta.to(torch.float64), tb.to(torch.float64)
    same = (xa == xb) | (torch.isnan(xa) & torch.isnan(xb))
    fin = torch.isfinite(xa) & torch.isfinite(xb)
    d = (xa - xb).abs()[fin]
    fa, fb = xa[fin], xb[fin]
    na, nb, nd = float(fa.norm()), float(fb.norm()), float(d.norm())
    out = {
        "max_abs": float(d.max()) if d.numel() else 0.0,
        "mean_abs": float(d.mean()) if d.numel() else 0.0,
        "rel_l2": nd / na if na > 0 else (0.0 if nd == 0 else float("inf")),
        "cosine": float((fa * fb).sum()) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0),
        "n_diff": int((~same).sum()),
        "numel": int(xa.numel()),
        "diff_sq": nd * nd,
        "ref_sq": na * na,
    }
    if atol or rtol:
        out["close"] = bool(((xa - xb).abs() <= atol + rtol * xb.abs()).logical_or(same).all())
    else:
        out["close"] = out["n_diff"] == 0
    nf = {}
    for side, t in (("a", xa), ("b", xb)):
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if nan or inf:
            nf[side] = {"nan": nan, "inf": inf}
    if nf:
        out["nonfinite"] = nf
    return out
