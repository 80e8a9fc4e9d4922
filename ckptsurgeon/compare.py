"""Comparing tensors: a fast content digest first, statistics only when the bytes differ."""

from __future__ import annotations

from typing import Any

from .refs import TensorRef, tensor_bytes


def digest(v: Any) -> str:
    """xxh3-128 of a tensor's bytes in row-major order (≈30 GiB/s, zero-copy over an mmap)."""
    import xxhash

    data = v.read_bytes() if isinstance(v, TensorRef) else tensor_bytes(v)
    return xxhash.xxh3_128_hexdigest(data)


def stats(a, b, atol: float = 0.0, rtol: float = 0.0) -> dict:
    """Difference statistics of two same-shape tensors (torch tensors or TensorRefs)."""
    import torch

    ta = a.to_torch() if isinstance(a, TensorRef) else a
    tb = b.to_torch() if isinstance(b, TensorRef) else b
    ta, tb = ta.detach(), tb.detach()
    floating = ta.is_floating_point() or ta.is_complex()
    work = torch.float64 if ta.dtype in (torch.float64, torch.int64, torch.complex128) else torch.float32
    if ta.is_complex():
        xa, xb = torch.view_as_real(ta).to(work), torch.view_as_real(tb.to(ta.dtype)).to(work)
    else:
        xa, xb = ta.to(work), tb.to(work)
    d = xa - xb
    absd = d.abs()
    finite = torch.isfinite(absd)
    n_diff = int((ta != tb).sum()) if not floating else int((~(xa == xb) & ~(torch.isnan(xa) & torch.isnan(xb))).sum())
    na = float(torch.linalg.vector_norm(xa[torch.isfinite(xa)])) if xa.numel() else 0.0
    nd = float(torch.linalg.vector_norm(absd[finite])) if absd.numel() else 0.0
    nb = float(torch.linalg.vector_norm(xb[torch.isfinite(xb)])) if xb.numel() else 0.0
    dot = float((xa[finite] * xb[finite]).sum()) if absd.numel() else 0.0
    out = {
        "max_abs": float(absd[finite].max()) if bool(finite.any()) else 0.0,
        "mean_abs": float(absd[finite].mean()) if bool(finite.any()) else 0.0,
        "rel_l2": nd / na if na > 0 else (0.0 if nd == 0 else float("inf")),
        "cosine": dot / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0),
        "n_diff": n_diff,
        "numel": int(ta.numel()),
        "diff_sq": nd * nd,
        "ref_sq": na * na,
    }
    if floating and (atol or rtol):
        out["close"] = bool(torch.allclose(xa, xb, rtol=rtol, atol=atol, equal_nan=True))
    else:
        out["close"] = n_diff == 0
    for side, t in (("a", xa), ("b", xb)):
        if floating:
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if nan or inf:
                out.setdefault("nonfinite", {})[side] = {"nan": nan, "inf": inf}
    return out
