"""Structured mutations of a valid PEFT LoRA adapter, for fuzzing the upload validator.

Besides broken structure, value-range mutations keep the file well formed and change only
numbers: huge finite values, tiny and subnormal ones, each dtype's largest finite value,
whole tensors scaled, and lora_alpha / r / use_rslora combinations, so that every value bound
of adapters/weight_bounds.py (BOUND_RULES) shows up in the outcome counts.

The same mutators serve hypothesis (tests/security/test_adapter_fuzz.py), atheris
(fuzz/adapter_atheris.py) and a seeded `random.Random` (the HTTP sample): each draws its
choices from a `Chooser`, so every engine explores the same space of broken files.

A mutated pair either validates or is refused with `ValidationFailed`; `classify` runs
`adapters.validation.validate_adapter` on it and lets any other exception through, which is
the bug the fuzzers look for.
"""

from __future__ import annotations

import json
import math
import random
import re
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from adapters.base_model import BaseModelSpec
from adapters.errors import ValidationFailed
from adapters.validation import validate_adapter
from adapters.weight_bounds import MAX_LORA_SCALE, MAX_WEIGHT_ABS

# The catalog tests' tiny Llama (hidden 64, two layers): files of a few KB, fast to validate.
SPEC = BaseModelSpec(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     model_type="llama")
MAX_RANK = 16
# Wall-clock bound on one validation of these (< 1 MiB) inputs: far above the few ms they
# take, far below a hang. The header parser and the scan are linear by construction.
MAX_SECONDS_PER_INPUT = 2.0

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIRD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 4, 65, 2**31, 2**63, 2**64 + 1, -(2**63), 1.5, 1e308, -0.0,
    math.nan, math.inf, -math.inf, "", "4", "LORA", "F32", "\u202eLORA", "\x00", "é" * 70,
    "../../etc/passwd", "s3://bucket/key", "file:///etc/passwd", [], [4], [[[]]], {}, {"a": 1},
    "x" * 5000, ["q_proj"] * 3, ["lm_head"], "all-linear", ".*", "(.*.*)*z",
    "(?:[a-z.0-9_]|\\w|.)*(?:\\w|.)*(?:\\w|.|[a-z])*\\d{2}", "(" * 300, "[", "a{99999999999}",
]
DTYPES: list[Any] = ["F16", "BF16", "F32", "F64", "BOOL", "I8", "U8", "f32", "", "F8_E4M3",
                     "F32 ", 32, None, ["F32"]]
TENSOR_NAMES = [
    "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight",
    "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
    "base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight",
    "base_model.model.lm_head.lora_A.weight", "../../etc/passwd", "", "\x00", "é" * 300,
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight\u202e",
    "__metadata__", "a" * 10_000,
]
NONFINITE_BITS = {"F32": ("<u4", [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001]),
                  "F16": ("<u2", [0x7C00, 0xFC00, 0x7E00]),
                  "BF16": ("<u2", [0x7F80, 0xFF80, 0x7FC0])}
# Finite extremes as bits: largest finite, smallest subnormal, largest subnormal, smallest
# normal, and the largest value at or under the weight bound (1e4) and the next one above it.
EXTREME_BITS = {"F32": ("<u4", [0x7F7FFFFF, 0x00000001, 0x007FFFFF, 0x00800000, 0x461C4000,
                                0x461C4001]),
                "F16": ("<u2", [0x7BFF, 0x0001, 0x03FF, 0x0400, 0x70E2, 0x70E3]),
                "BF16": ("<u2", [0x7F7F, 0x0001, 0x007F, 0x0080, 0x461C, 0x461D])}
# Finite values from 1e-45 (a float32 subnormal) to 3e38, and values around the bounds; each
# is clipped to the largest finite value of the tensor's dtype, so only the NaN/inf mutation
# makes non-finite data.
RANGE_VALUES = [3e38, 1e30, 1e6, 65504.0, MAX_WEIGHT_ABS, MAX_WEIGHT_ABS * 1.01, 5000.0, 300.0,
                100.0, 32.0, 1.0, 1e-3, 1e-8, 1e-30, 1e-40, 1.4e-45, 0.0, -0.0, -3e38, -5000.0]
SCALE_FACTORS = [0.0, 1e-30, 1e-3, 0.5, 2.0, 4.0, 8.0, 30.0, 100.0, 1e4, 1e30]
# lora_alpha values: past float range (as JSON ints and floats), subnormal, and around
# MAX_LORA_SCALE * r (alpha / r) and MAX_LORA_SCALE * sqrt(r) (rsLoRA) for r 4 and 8.
ALPHAS: list[Any] = [1e308, 10**400, -(10**400), 2**1024, 3e38, 65504, 5e-324, 1e-30, 1, 16,
                     64, 1e4, 4 * MAX_LORA_SCALE, math.nextafter(4 * MAX_LORA_SCALE, math.inf),
                     8 * MAX_LORA_SCALE, math.nextafter(8 * MAX_LORA_SCALE, math.inf),
                     2 * MAX_LORA_SCALE, math.sqrt(8) * MAX_LORA_SCALE, 1.5 * MAX_LORA_SCALE]
# The words that name each value bound's refusal (adapters/weight_bounds.py).
BOUND_RULES = {"scale": "scale lora_alpha", "weight": "max |value|", "delta": "delta bound"}
_FINITE_MAX = {"F32": float(np.finfo(np.float32).max), "F16": 65504.0,
               "BF16": float(np.array([0x7F7F0000], "<u4").view("<f4")[0])}


class Chooser(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...

    def raw(self, max_len: int) -> bytes: ...


class RandomChooser:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def raw(self, max_len: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_len))


def pick(c: Chooser, options: list[Any] | tuple[Any, ...]) -> Any:
    return options[c.integer(0, len(options) - 1)]


# ----------------------------------------------------------------------- the good adapter


def good_config(rank: int = 4) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
            "use_dora": False, "use_rslora": False, "fan_in_fan_out": False,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def good_tensors(rank: int = 4, modules: tuple[str, ...] = ("q_proj", "v_proj"),
                 spec: BaseModelSpec = SPEC, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for layer in range(spec.num_hidden_layers):
        for module in modules:
            group = "self_attn" if module in MODULES[:4] else "mlp"
            in_f, out_f = spec.module_features(module)
            base = f"base_model.model.model.layers.{layer}.{group}.{module}"
            out[f"{base}.lora_A.weight"] = rng.normal(size=(rank, in_f)).astype(np.float32)
            out[f"{base}.lora_B.weight"] = rng.normal(size=(out_f, rank)).astype(np.float32)
    return out


def header_and_data(tensors: dict[str, np.ndarray], dtype: str = "F32"
                    ) -> tuple[dict[str, Any], bytes]:
    """The safetensors header dict and data section (written here, not by the parser)."""
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name, array in tensors.items():
        if dtype == "F16":
            blob = array.astype("<f2").tobytes()
        elif dtype == "BF16":
            blob = (array.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        else:
            blob = array.astype("<f4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    return header, b"".join(blobs)


def pack(header_text: bytes, data: bytes, declared: int | None = None) -> bytes:
    length = len(header_text) if declared is None else declared
    return struct.pack("<Q", length % 2**64) + header_text + data


# ---------------------------------------------------------------------------- mutators


def _inject_text(c: Chooser, text: str) -> str:
    """Raw JSON text edits json.dumps cannot make: repeated keys, giant numbers, deep nesting."""
    kind = c.integer(0, 5)
    if kind == 0:  # a repeated key at the top level
        return text[:-1] + ', "__metadata__": {}, "__metadata__": {}}'
    if kind == 1:  # an integer literal past Python's 4300-digit conversion limit
        return text[:-1] + ', "x": ' + "9" * c.integer(4000, 6000) + "}"
    if kind == 2:  # a float literal that overflows to inf, and NaN literals
        return text.replace('"shape": [', '"shape": [1e999, NaN, ', 1)
    if kind == 3:  # nesting deep enough to reach the recursion limit
        depth = c.integer(10, 200_000)
        return text[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    if kind == 4:  # a lone surrogate and control characters
        return text.replace('"dtype"', '"dty\\ud800pe\\u0000"', 1)
    return text[: c.integer(0, len(text))]  # unbalanced JSON


def _ints(value: Any, count: int) -> list[int] | None:
    """`value` when it is a list of `count` ints (an earlier mutation may have broken it)."""
    if isinstance(value, list) and len(value) == count and all(
            type(v) is int for v in value):
        return value
    return None


def _decode(data: bytes, entry: dict[str, Any]) -> np.ndarray:
    """One tensor's values as float64 (bfloat16 shifted into float32 bits)."""
    b, e = entry["data_offsets"]
    raw = data[b:e]
    if entry["dtype"] == "F32":
        return np.frombuffer(raw, "<f4").astype(np.float64)
    if entry["dtype"] == "F16":
        return np.frombuffer(raw, "<f2").astype(np.float64)
    bits = np.frombuffer(raw, "<u2").astype("<u4") << 16
    return bits.view("<f4").astype(np.float64)


def _encode(values: np.ndarray, dtype: str) -> bytes:
    """Values clipped to dtype's finite range, as its little-endian bytes (bfloat16 truncated
    from float32, which never rounds a finite value up to infinity)."""
    clipped = np.clip(values, -_FINITE_MAX[dtype], _FINITE_MAX[dtype])
    if dtype == "F16":
        return clipped.astype("<f2").tobytes()
    f32 = clipped.astype("<f4")
    return f32.tobytes() if dtype == "F32" else (f32.view("<u4") >> 16).astype("<u2").tobytes()


def mutate_values(c: Chooser, header: dict[str, Any], data: bytes) -> bytes:
    """The same well-formed file with numbers changed: the structure checks all pass, so the
    value bounds decide."""
    out = bytearray(data)
    names = list(header)
    kind = c.integer(0, 3)
    if kind == 2:  # every tensor scaled: values within the weight bound, the delta not
        factor = pick(c, SCALE_FACTORS)
        for entry in header.values():
            b, e = entry["data_offsets"]
            out[b:e] = _encode(_decode(data, entry) * factor, entry["dtype"])
        return pack(json.dumps(header).encode(), bytes(out))
    entry = header[pick(c, names)]
    b, e = entry["data_offsets"]
    values = _decode(data, entry)
    if kind == 0:  # one value
        values[c.integer(0, len(values) - 1)] = pick(c, RANGE_VALUES)
        out[b:e] = _encode(values, entry["dtype"])
    elif kind == 1:  # the whole tensor
        out[b:e] = _encode(np.full_like(values, pick(c, RANGE_VALUES)), entry["dtype"])
    else:  # one value set to an extreme bit pattern of its dtype, either sign
        fmt, patterns = EXTREME_BITS[entry["dtype"]]
        itemsize = np.dtype(fmt).itemsize
        sign = (1 << (8 * itemsize - 1)) * c.integer(0, 1)
        at = b + c.integer(0, len(values) - 1) * itemsize
        out[at : at + itemsize] = np.array([pick(c, patterns) | sign], dtype=fmt).tobytes()
    return pack(json.dumps(header).encode(), bytes(out))


def _mutate_entry(c: Chooser, header: dict[str, Any]) -> None:
    names = [n for n in header if n != "__metadata__"]
    name = pick(c, names)
    entry = header[name]
    if not isinstance(entry, dict):  # an earlier draw already replaced it
        return
    kind = c.integer(0, 7)
    if kind == 0:
        entry["dtype"] = pick(c, DTYPES)
    elif kind == 1:
        entry["shape"] = pick(c, [[], [0], [-1, 4], [2**40, 2**40], [2**63], [1.0, 64], ["4", 64],
                                  [True, 64], [1] * 9, None, "4x64", [4, 64, 1],
                                  list(reversed(_ints(entry.get("shape"), 2) or [64, 4]))])
    elif kind == 2:
        b, e = _ints(entry.get("data_offsets"), 2) or [0, 8]  # maybe mutated already
        entry["data_offsets"] = pick(c, [[b, e + 1], [b + 1, e], [e, b], [-4, e], [b, 2**64],
                                         [0, e - b], [b, e, e], [float(b), e], None, [],
                                         [str(b), e], [b + 2**63, e + 2**63]])
    elif kind == 3 and entry:
        del entry[pick(c, sorted(entry))]
    elif kind == 4:
        entry[pick(c, ["extra", "dtype ", "offsets"])] = pick(c, WEIRD_VALUES)
    elif kind == 5:
        header[pick(c, TENSOR_NAMES)] = header.pop(name)
    elif kind == 6:
        header[name] = pick(c, WEIRD_VALUES)
    else:
        header["__metadata__"] = pick(c, [{"format": "pt"}, {"k": 1}, [], "pt", None,
                                          {"k": ["v"]}, {"\x00": "\ud7ff"}])


def mutate_model(c: Chooser, model: bytes, header: dict[str, Any], data: bytes) -> bytes:
    kind = c.integer(0, 8)
    if kind == 0:  # bit flips anywhere
        out = bytearray(model)
        for _ in range(c.integer(1, 8)):
            pos = c.integer(0, len(out) - 1)
            out[pos] ^= 1 << c.integer(0, 7)
        return bytes(out)
    if kind == 1:  # truncation
        return model[: c.integer(0, len(model) - 1)]
    if kind == 2:  # trailing junk
        return model + (c.raw(64) or b"\x00")
    if kind == 3:  # the 8-byte header length
        text_len = struct.unpack("<Q", model[:8])[0]
        declared = pick(c, [0, 1, 2, text_len - 1, text_len + 1, len(model), len(model) - 7,
                            16 * 1024 * 1024 + 1, 2**63, 2**64 - 1])
        return struct.pack("<Q", declared % 2**64) + model[8:]
    if kind == 4:  # a field of one tensor entry (dtype, shape, offsets, name, extra keys)
        mutated = json.loads(json.dumps(header))
        for _ in range(c.integer(1, 3)):
            _mutate_entry(c, mutated)
        text = json.dumps(mutated, ensure_ascii=bool(c.integer(0, 1)))
        return pack(text.encode("utf-8", "surrogatepass"), data)
    if kind == 5:  # raw JSON text edits
        text = _inject_text(c, json.dumps(header))
        encoded = text.encode("utf-8", "surrogatepass")
        fix_length = c.integer(0, 3) > 0
        return pack(encoded, data, None if fix_length else len(encoded) + c.integer(-3, 3))
    if kind == 6:  # NaN or infinity inside one tensor's data
        name = pick(c, list(header))
        entry = header[name]
        fmt, patterns = NONFINITE_BITS[entry["dtype"]]
        itemsize = np.dtype(fmt).itemsize
        b, e = entry["data_offsets"]
        index = c.integer(0, (e - b) // itemsize - 1)
        out = bytearray(data)
        out[b + index * itemsize : b + (index + 1) * itemsize] = np.array(
            [pick(c, patterns)], dtype=fmt).tobytes()
        return pack(json.dumps(header).encode(), bytes(out))
    if kind == 7:  # finite values out of range, or tiny, or around the bounds
        return mutate_values(c, header, data)
    # A file that is not safetensors at all: pickle and zip magic, random bytes.
    head = pick(c, [b"\x80\x04\x95", b"PK\x03\x04", b"", b"{", b"\xef\xbb\xbf{"])
    return head + c.raw(256)


def mutate_scale(c: Chooser, config: dict[str, Any]) -> dict[str, Any]:
    """lora_alpha against r and use_rslora: the scale bound, and the delta bound through it."""
    mutated = dict(config)
    mutated["lora_alpha"] = pick(c, ALPHAS)
    mutated["use_rslora"] = bool(c.integer(0, 1))
    if c.integer(0, 3) == 0:  # mostly the rank the tensors have, so the bounds decide
        mutated["r"] = pick(c, [1, 2, 4, 8, MAX_RANK])
    return mutated


def mutate_config(c: Chooser, config: dict[str, Any]) -> bytes:
    kind = c.integer(0, 6)
    mutated = dict(config)
    if kind == 0:  # a field set to a value of any type
        for _ in range(c.integer(1, 3)):
            field = pick(c, sorted(mutated) + ["layer_replication", "lora_bias", "x"])
            mutated[field] = pick(c, WEIRD_VALUES)
    elif kind == 1:  # a field removed
        mutated.pop(pick(c, sorted(mutated)), None)
    elif kind == 2:  # target_modules as any list or regex
        mutated["target_modules"] = pick(c, [[pick(c, MODULES)], list(MODULES), "q_proj|v_proj",
                                             ".*(q|v)_proj", pick(c, WEIRD_VALUES)])
    elif kind == 3:  # rank against the max
        mutated["r"] = pick(c, [1, MAX_RANK, MAX_RANK + 1, 8, 2])
    elif kind == 6:
        mutated = mutate_scale(c, mutated)
    text = json.dumps(mutated)
    if kind == 4:
        text = _inject_text(c, text)
    if kind == 5:
        return pick(c, [b"", b"[]", b'"LORA"', b"null", b"\xff\xfe{}", b"\xef\xbb\xbf" +
                        text.encode(), text.encode()[: c.integer(0, len(text))]])
    return text.encode("utf-8", "surrogatepass")


def mutated_pair(c: Chooser, spec: BaseModelSpec = SPEC) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors): both good, one broken, or both."""
    rank = pick(c, [4, 8])
    modules = pick(c, [("q_proj", "v_proj"), MODULES])
    config = good_config(rank)
    config["target_modules"] = list(modules)
    dtype = pick(c, ["F32", "F16", "BF16"])
    header, data = header_and_data(good_tensors(rank, modules, spec, seed=c.integer(0, 3)), dtype)
    model = pack(json.dumps(header).encode(), data)
    which = c.integer(0, 10)  # mostly the model file: it has more structure to break
    config_bytes = json.dumps(config).encode()
    if which == 10:  # numbers only, in a well-formed pair: the value bounds decide
        if c.integer(0, 1):
            return json.dumps(mutate_scale(c, config)).encode(), model
        return config_bytes, mutate_values(c, header, data)
    if which <= 1:
        config_bytes = mutate_config(c, config)
    if which >= 1:
        model = mutate_model(c, model, header, data)
    return config_bytes, model


# --------------------------------------------------------------------------- the oracle

# Quoted names, lists, objects, "layers.0.q_proj" labels, then numbers (floats as %g prints
# them: 2.5e+307, 16.0078) and ints.
_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\{[^}]*\}|\blayers\.\d+\.[a-z_]+"
                       r"|(?<![\w.-])-?\d+\.\d+(?:e[+-]\d+)?(?![\w.])"
                       r"|(?<![\w.-])-?\d+e[+-]\d+(?![\w.])|(?<![\w-])-?\d+(?!\w)")


def reason_kind(reason: str) -> str:
    """A refusal reason with names and numbers blanked, to count refusals by rule."""
    return _VARIABLE.sub("_", reason)[:90]


def classify(config: bytes, model: bytes, workdir: Path | None = None,
             spec: BaseModelSpec = SPEC) -> str:
    """'accepted', or 'refused: <rule>'; any other exception propagates (a bug)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        config_path, model_path = Path(tmp, "adapter_config.json"), Path(tmp, "m.safetensors")
        config_path.write_bytes(config)
        model_path.write_bytes(model)
        started = time.perf_counter()
        try:
            validate_adapter(config_path, model_path, spec, MAX_RANK)
            outcome = "accepted"
        except ValidationFailed as exc:
            outcome = f"refused: {reason_kind(exc.reason)}"
        elapsed = time.perf_counter() - started
    if elapsed > MAX_SECONDS_PER_INPUT:
        raise AssertionError(f"validation took {elapsed:.2f} s (> {MAX_SECONDS_PER_INPUT} s)")
    return outcome
