"""Dtype facts without importing torch: names, item sizes, legacy storage names, safetensors codes."""

from __future__ import annotations

ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
    "uint16": 2, "uint32": 4, "uint64": 8,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
}

# Legacy typed-storage class names torch writes into persistent ids (torch/storage.py).
STORAGE_TO_DTYPE = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "QInt8Storage": "qint8", "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}
DTYPE_TO_STORAGE = {v: k for k, v in STORAGE_TO_DTYPE.items()}

# safetensors dtype codes (the format's spec) <-> torch dtype names.
SAFETENSORS_TO_DTYPE = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64",
    "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2",
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_DTYPE.items()}
# safetensors counts a sub-byte dtype's elements (F4: 4 bits each); torch's packed dtype counts
# bytes (float4_e2m1fn_x2: two values per element). The last dimension differs by this factor,
# as safetensors' own torch bridge converts it ([..., 2n] F4 <-> [..., n] float4_e2m1fn_x2).
PACKED_PER_ELEMENT = {"float4_e2m1fn_x2": 2}
#: the floating-point dtypes a model computes in and a checkpoint is cast between
PLAIN_FLOATS = ("float32", "bfloat16", "float16", "float64")
#: what people type for them (``--dtype bf16``, ``torch.float16``, ``half``)
FLOAT_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "bf16": "bfloat16",
                 "fp16": "float16", "f16": "float16", "half": "float16",
                 "fp64": "float64", "f64": "float64", "double": "float64"}


def plain_float(name: str) -> str:
    """``name`` as one of PLAIN_FLOATS when it is one or an alias of one; else unchanged."""
    n = str(name).strip().lower()
    n = n[len("torch."):] if n.startswith("torch.") else n
    n = FLOAT_ALIASES.get(n, n)
    return n if n in PLAIN_FLOATS else name
# dtypes the safetensors format defines that torch has no dtype for (6-bit floats, packed).
SAFETENSORS_NO_TORCH = {"F6_E2M3": 6, "F6_E3M2": 6}

def safetensors_bits(code: str) -> int | None:
    """Bits per element of a safetensors dtype code (None: not a code the format defines)."""
    if code in SAFETENSORS_NO_TORCH:
        return SAFETENSORS_NO_TORCH[code]
    dt = SAFETENSORS_TO_DTYPE.get(code)
    if dt is None:
        return None
    return 8 * ITEMSIZE[dt] // PACKED_PER_ELEMENT.get(dt, 1)


FLOATING = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
            "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2"}


def itemsize(dtype: str) -> int:
    try:
        return ITEMSIZE[dtype]
    except KeyError:
        from .errors import UnsupportedError

        raise UnsupportedError(f"unknown dtype {dtype!r}") from None


def torch_dtype(name: str):
    """The torch dtype object for a name (imports torch)."""
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        from .errors import UnsupportedError

        raise UnsupportedError(f"this torch ({torch.__version__}) has no dtype {name!r}")
    return dt


def dtype_name(dt) -> str:
    """'float32' for torch.float32."""
    return str(dt).replace("torch.", "")


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless one: "1 tensor", "2 tensors", "1,024 keys", "3 biases"."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def human_bytes(n: float) -> str:
    """A byte count as people read it: ``12 B``, ``3.1 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
