"""Element types of every model format, described once: name, size rule, and array type.

Stdlib only, so both sides read the same description: the inspectors (in the
supervisor) take sizes from it, the load child's loaders take the array type
each tensor becomes, and both spell a tensor's dtype in the manifest from it.
An array type is a name that numpy resolves once ``ml_dtypes`` (BF16, FP8) is
imported; the child resolves it (``loaders.array_dtype``). ``None`` means the
loader keeps the tensor's bytes as they are, as a flat ``uint8`` array: a
sub-byte type packed several to a byte (safetensors' F4 and F6: ml_dtypes'
float4/float6 take a whole byte per element, so unpacking would double or
more the memory) or a ggml block-quantized type.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ElementType:
    """One element type: ``block_elements`` elements take ``block_bytes`` bytes."""

    name: str
    block_elements: int
    block_bytes: int
    array: str | None

    def nbytes(self, count: int) -> int | None:
        """The bytes ``count`` elements take, or None when they do not fill whole blocks."""
        blocks, rest = divmod(count, self.block_elements)
        return None if rest else blocks * self.block_bytes

    def count_within(self, shape: list[int], max_bytes: int) -> int | None:
        """prod(shape), or None as soon as that many elements take more than ``max_bytes``.

        Stops at the cap so a shape like (2**62, 2**62, ...) never builds a huge number.
        """
        if 0 in shape:
            return 0
        count = 1
        for dim in shape:
            count *= dim
            if count // self.block_elements * self.block_bytes > max_bytes:
                return None
        return count

    def describe_block(self) -> str:
        """How the elements are packed, for messages: '2 elements per byte'."""
        unit = "byte" if self.block_bytes == 1 else f"{self.block_bytes} bytes"
        return f"{self.block_elements} elements per {unit}"


def _plain(name: str, itemsize: int, array: str) -> ElementType:
    return ElementType(name, 1, itemsize, array)


def _table(types: Iterable[ElementType]) -> dict[str, ElementType]:
    return {t.name: t for t in types}


BOOL = _plain("BOOL", 1, "bool")
U8, I8 = _plain("U8", 1, "uint8"), _plain("I8", 1, "int8")
U16, I16 = _plain("U16", 2, "uint16"), _plain("I16", 2, "int16")
U32, I32 = _plain("U32", 4, "uint32"), _plain("I32", 4, "int32")
U64, I64 = _plain("U64", 8, "uint64"), _plain("I64", 8, "int64")
F16, F32 = _plain("F16", 2, "float16"), _plain("F32", 4, "float32")
F64 = _plain("F64", 8, "float64")
BF16 = _plain("BF16", 2, "bfloat16")
C64, C128 = _plain("C64", 8, "complex64"), _plain("C128", 16, "complex128")

#: safetensors' dtypes (safetensors 0.8, ``Dtype`` in ``safetensors/src/tensor.rs``), each
#: with the array type the safetensors bindings give it (``float8_e4m3fn`` for F8_E4M3).
#: F4 and F6 are packed (4 and 6 bits per element): safetensors requires the element
#: count times the bit width to be whole bytes, i.e. a multiple of 2 (F4) or 4 (F6).
SAFETENSORS: dict[str, ElementType] = _table(
    (
        *(BOOL, U8, I8, U16, I16, U32, I32, U64, I64, F16, F32, F64, BF16, C64),
        _plain("F8_E4M3", 1, "float8_e4m3fn"),
        _plain("F8_E5M2", 1, "float8_e5m2"),
        _plain("F8_E8M0", 1, "float8_e8m0fnu"),
        _plain("F8_E4M3FNUZ", 1, "float8_e4m3fnuz"),
        _plain("F8_E5M2FNUZ", 1, "float8_e5m2fnuz"),
        ElementType("F4", 2, 1, None),  # float4_e2m1fn, two to a byte
        ElementType("F6_E2M3", 4, 3, None),  # float6_e2m3fn, four to three bytes
        ElementType("F6_E3M2", 4, 3, None),  # float6_e3m2fn, four to three bytes
    )
)


def _npy_table() -> dict[str, ElementType]:
    table = {"|b1": BOOL, "|i1": I8, "|u1": U8}
    for code, kind in {
        "f2": F16,
        "f4": F32,
        "f8": F64,
        "i2": I16,
        "i4": I32,
        "i8": I64,
        "u2": U16,
        "u4": U32,
        "u8": U64,
        "c8": C64,
        "c16": C128,
    }.items():
        for order in "<>":
            table[order + code] = kind
    return table


#: ``.npy`` ``descr`` strings we load (numeric and bool, as numpy writes them, both byte orders).
NPY: dict[str, ElementType] = _npy_table()
#: What a loaded ``.npy`` array's dtype is called in manifests, by numpy's dtype name.
NPY_BY_ARRAY: dict[str, str] = {t.array: t.name for t in NPY.values() if t.array}


def _ggml(name: str, block_elements: int, block_bytes: int) -> ElementType:
    return ElementType(name, block_elements, block_bytes, None)


#: ggml type id -> element type, as in ggml.h / gguf-py; block-quantized types stay raw bytes.
GGML: dict[int, ElementType] = {
    0: F32,
    1: F16,
    2: _ggml("Q4_0", 32, 18),
    3: _ggml("Q4_1", 32, 20),
    6: _ggml("Q5_0", 32, 22),
    7: _ggml("Q5_1", 32, 24),
    8: _ggml("Q8_0", 32, 34),
    9: _ggml("Q8_1", 32, 40),
    10: _ggml("Q2_K", 256, 84),
    11: _ggml("Q3_K", 256, 110),
    12: _ggml("Q4_K", 256, 144),
    13: _ggml("Q5_K", 256, 176),
    14: _ggml("Q6_K", 256, 210),
    15: _ggml("Q8_K", 256, 292),
    16: _ggml("IQ2_XXS", 256, 66),
    17: _ggml("IQ2_XS", 256, 74),
    18: _ggml("IQ3_XXS", 256, 98),
    19: _ggml("IQ1_S", 256, 50),
    20: _ggml("IQ4_NL", 32, 18),
    21: _ggml("IQ3_S", 256, 110),
    22: _ggml("IQ2_S", 256, 82),
    23: _ggml("IQ4_XS", 256, 136),
    24: I8,
    25: I16,
    26: I32,
    27: I64,
    28: F64,
    29: _ggml("IQ1_M", 256, 56),
    30: BF16,
    34: _ggml("TQ1_0", 256, 54),
    35: _ggml("TQ2_0", 256, 66),
    39: _ggml("MXFP4", 32, 17),
}
#: ggml element types by name (the manifest spells GGUF dtypes by these names).
GGML_BY_NAME: dict[str, ElementType] = _table(GGML.values())
