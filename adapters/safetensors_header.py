"""A strict parser of the safetensors header, run before any library touches an upload.

Layout: 8-byte little-endian header length N, N bytes of a UTF-8 JSON object, then the data
section. Each entry other than `__metadata__` is `{"dtype", "shape", "data_offsets": [b, e]}`
with offsets relative to the data section. Rules enforced here (all refusals raise
ValidationFailed with the rule in the reason):
- the file holds at least the 8 length bytes; 2 <= N <= MAX_HEADER_BYTES and 8 + N <= size;
- the header is UTF-8 JSON, an object, with no repeated keys; byte 8 is `{`;
- `__metadata__`, when present, maps strings to strings;
- dtype is F16, BF16 or F32 (other safetensors dtypes are named in the refusal; anything
  else is "unknown"); shape is a list of non-negative ints; e - b == prod(shape) * itemsize;
- tensors tile the data section exactly, in offset order: no overlap, no gap, and no bytes
  after the last tensor. This matches what the reference (Rust) implementation accepts and
  leaves no room for smuggled payloads.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.errors import ValidationFailed

# The Rust reference allows 100 MB; parsing that much JSON costs ~1 GB of Python objects, and
# a LoRA of an 80-layer model needs ~200 KB, so 16 MiB is ample and bounds the memory.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 100_000
MAX_DIMS = 8
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4}
OTHER_DTYPES = frozenset(
    {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F64",
     "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    header_bytes: int
    data_start: int
    file_size: int
    tensors: tuple[TensorInfo, ...]  # in offset order
    metadata: dict[str, str]


def _refuse(reason: str) -> ValidationFailed:
    return ValidationFailed(f"adapter_model.safetensors: {reason}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _refuse(f"header repeats the key {key!r}")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor(name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype = entry["dtype"]
    # A str check first: a list or object dtype is unhashable, and the set lookups below
    # raised TypeError (a 500) for it (found by tests/security/test_adapter_fuzz.py).
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        if isinstance(dtype, str) and dtype in OTHER_DTYPES:
            raise _refuse(f"tensor {name!r} has dtype {dtype}; only F16, BF16, F32 are allowed")
        raise _refuse(f"tensor {name!r} has an unknown dtype {str(dtype)[:32]!r}")
    shape = entry["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(_is_int(d) and 0 <= d < 2**40 for d in shape)
    ):
        raise _refuse(f"tensor {name!r} has a malformed shape")
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
        raise _refuse(f"tensor {name!r} has malformed data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _refuse(f"tensor {name!r} has data_offsets outside the data section")
    if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
        raise _refuse(f"tensor {name!r}: data_offsets do not match its shape and dtype")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def parse_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Parse and bounds-check the header of the file at path, reading only the header."""
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise _refuse("file is truncated (shorter than the 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if length > max_header_bytes:
            raise _refuse(f"header length {length} is over the {max_header_bytes} byte limit")
        if 8 + length > size:
            raise _refuse("header length runs past the end of the file")
        if length < 2:
            raise _refuse("header is not a JSON object")
        raw = f.read(length)
    if raw[:1] != b"{":
        raise _refuse("header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    # ValueError too: json raises a plain one (not JSONDecodeError) for an integer literal
    # over sys.get_int_max_str_digits() digits, which used to escape as a 500.
    except (ValueError, RecursionError):
        raise _refuse("header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise _refuse("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _refuse("__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise _refuse(f"more than {MAX_TENSORS} tensors")
    data_start = 8 + length
    data_len = size - data_start
    tensors = sorted(
        (_tensor(name, entry, data_start, data_len) for name, entry in header.items()),
        key=lambda t: (t.begin, t.end),
    )
    cursor = data_start
    for t in tensors:
        if t.begin < cursor:
            raise _refuse(f"tensor {t.name!r} overlaps another tensor")
        if t.begin > cursor:
            raise _refuse(f"unused bytes before tensor {t.name!r}")
        cursor = t.end
    if cursor != size:
        raise _refuse("bytes after the last tensor")
    return SafetensorsHeader(length, data_start, size, tuple(tensors), metadata)
