"""verify's numerics: the device, TF32 switched off (and restored) while checking, and the
comparison of two outputs against per-dtype tolerances (README: Verification)."""

from __future__ import annotations

import contextlib

from ckptsurgeon.dtypes import count
from ckptsurgeon.errors import SelectionError

# Per-dtype base tolerances; the allowed max |a-b| is atol + rtol * max|reference| (see README).
TOLERANCES = {"float64": (1e-10, 1e-9), "float32": (1e-5, 1e-5), "float16": (1e-3, 1e-2), "bfloat16": (1e-2, 5e-2)}

def resolve_device(device: str):
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SelectionError(f"unknown device {device!r}", hint="auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SelectionError(f"--device {device} was asked for, but CUDA is not available here",
                                 hint="use --device auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SelectionError(f"--device {device}: only {count(torch.cuda.device_count(), 'CUDA device')}")
    return dev


# torch >= 2.9 keeps TF32 choices per backend and operation ('fp32_precision': ieee, tf32, bf16 or
# none = inherit) beside the legacy flags; mixing the two APIs makes torch raise when it checks
# them (at a CUDA matmul too). Turned off through both, consistently, and restored as found.
PRECISION_SLOTS = (("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"),
                    ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))


def precision_api():
    import torch

    get = getattr(torch._C, "_get_fp32_precision_getter", None)
    put = getattr(torch._C, "_set_fp32_precision_setter", None)
    return (get, put) if get is not None and put is not None else (None, None)


def legacy_flags():
    """(float32 matmul precision, cuDNN allow_tf32), or None where torch refuses to say (mixed APIs)."""
    import torch

    try:
        return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError:
        return None


@contextlib.contextmanager
def no_tf32():
    """Exact fp32 matmuls/convolutions during the check (TF32 alone can differ by 0.1 on ResNet-50;
    CPU backends may lower fp32 to bf16 too where asked)."""
    import torch

    get, put = precision_api()
    slots = []
    if get is not None:
        for backend, op in PRECISION_SLOTS:
            try:
                slots.append((backend, op, get(backend, op)))
            except RuntimeError:  # a slot this torch does not know
                pass
    legacy = legacy_flags()
    torch.backends.cuda.matmul.allow_tf32 = False   # legacy setters keep both APIs in step
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    for backend, op, _value in slots:
        if op != "all":  # leaves: ieee, whatever their parents say
            put(backend, op, "ieee")
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cudnn.allow_tf32 = legacy[1]
            if legacy[0] == "highest":
                torch.backends.cuda.matmul.allow_tf32 = False
        for backend, op, value in slots:
            put(backend, op, value)


def tolerances(dtype_name: str, atol, rtol) -> tuple[float, float]:
    base_atol, base_rtol = TOLERANCES.get(dtype_name, TOLERANCES["float32"])
    return (base_atol if atol is None else atol), (base_rtol if rtol is None else rtol)


def output_stats(a, b):
    """[max|a-b|, max|a|, ||a-b||, ||a||, all finite] of two same-shaped float tensors as one small
    float64 tensor on the device that holds them (B's for CPU-vs-GPU): no host sync and no copy of
    the activations to the host. The difference is taken in the wider of the two dtypes, at least
    float32 (exact enough for a tolerance test), in one buffer; norms accumulate in float64 (a float32
    norm of 1e20-sized values overflows). None where the fast path does not apply."""
    import torch

    if a.shape != b.shape or not (a.is_floating_point() or a.is_complex()) or a.numel() == 0:
        return None
    dev = b.device if b.device.type != "cpu" else a.device
    wide = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    x, y = a.detach().to(dev, wide), b.detach().to(dev, wide)
    d = torch.sub(x, y)
    if d.is_complex():
        d, x = d.abs(), x.abs()
        scale = x.amax()
    else:
        d = d.abs_()
        lo, hi = torch.aminmax(x)
        scale = torch.maximum(-lo, hi)
    max_abs = d.amax()  # NaN or inf anywhere shows here (and in scale): the careful path then decides
    f64 = torch.float64
    return torch.stack([max_abs.to(f64), scale.to(f64), torch.linalg.vector_norm(d, dtype=f64),
                        torch.linalg.vector_norm(x, dtype=f64), (max_abs.isfinite() & scale.isfinite()).to(f64)])


def gather(stats: list) -> list:
    """The stats tensors as Python lists, with one device-to-host transfer per device."""
    import torch

    out: list = [None] * len(stats)
    by_device: dict = {}
    for i, s in enumerate(stats):
        if s is not None:
            by_device.setdefault(s.device, []).append(i)
    for _dev, idx in by_device.items():
        rows = torch.stack([stats[i] for i in idx]).cpu().tolist()
        for i, row in zip(idx, rows):
            out[i] = row
    return out


def compare(a, b, dtype_name: str, atol=None, rtol=None, stats=None) -> dict:
    """Judge B's tensor against A's: max |a-b| <= atol + rtol x max|a| (see README). ``stats`` is
    output_stats(a, b) already fetched; NaN/inf and integer outputs take the careful path."""
    import torch

    atol, rtol = tolerances(dtype_name, atol, rtol)
    if a.shape != b.shape:
        return {"ok": False, "reason": f"shape {list(a.shape)} vs {list(b.shape)}", "max_abs": None,
                "rel": None, "tolerance": None, "scale": None}
    if not (a.is_floating_point() or a.is_complex()):
        same = bool(torch.equal(a.cpu(), b.cpu()))
        return {"ok": same, "max_abs": 0.0 if same else None, "rel": 0.0 if same else None, "tolerance": 0.0,
                "scale": None, "reason": "" if same else "integer outputs differ"}
    if stats is not None and stats[4] == 1.0:  # everything finite: the usual case
        max_abs, scale, dnorm, xnorm = stats[:4]
        rel = dnorm / max(xnorm, 1e-30)
    else:
        dev = b.device if b.device.type != "cpu" else a.device
        wide = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
        x, y = a.detach().to(dev, wide), b.detach().to(dev, wide)
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))  # NaN where both have NaN, equal infinities
        d = torch.where(same, torch.zeros((), dtype=x.real.dtype, device=dev), (x - y).abs())
        if bool(torch.isnan(d).any()):
            return {"ok": False, "max_abs": None, "rel": None, "tolerance": None, "scale": None,
                    "reason": "NaN in one output only"}
        finite_x = x[torch.isfinite(x)]
        scale = float(finite_x.abs().max()) if finite_x.numel() else 0.0
        max_abs = float(d.max()) if d.numel() else 0.0
        rel = float(torch.linalg.vector_norm(d[torch.isfinite(d)]) /
                    torch.linalg.vector_norm(finite_x).clamp_min(1e-30)) if finite_x.numel() else 0.0
    tol = atol + rtol * scale
    return {"ok": max_abs <= tol, "max_abs": max_abs, "rel": rel, "tolerance": tol, "scale": scale,
            "rule": f"{atol:g} + {rtol:g} x max|ref| ({scale:.4g})", "reason": ""}
