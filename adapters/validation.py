"""Upload validation of a PEFT LoRA adapter against the base model (API.md, "Adapter format").

`validate_adapter(config_path, model_path, base, max_rank)` reads both files from disk, never
whole into memory, and returns what the catalog stores, or raises ValidationFailed naming
the rule. Values are bounded too (adapters/weight_bounds.py): the scale, every weight and
each module's delta, so that serving the adapter cannot overflow. Honest limits: DoRA,
rank_pattern/alpha_pattern (per-module ranks), LoRA biases, modules_to_save, layer
replication and trainable tokens are refused because the runtime's kernels apply one plain
rank-r LoRA per projection.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import regex

from adapters.base_model import ATTENTION_MODULES, TARGET_MODULES, BaseModelSpec
from adapters.errors import ValidationFailed
from adapters.safetensors_header import SafetensorsHeader, TensorInfo, parse_header
from adapters.weight_bounds import check_delta, check_scale, check_weight, lora_scale

MAX_CONFIG_BYTES = 1024 * 1024
SCAN_BYTES = 4 * 1024 * 1024  # chunk of tensor data held at once during the value scan
MAX_REGEX_CHARS = 512
# A target_modules regex is the uploader's code: with `re`, a pattern such as
# "(?:[a-z.0-9_]|\w|.)*(?:\w|.)*\d{2}" backtracks for hours while holding the GIL, which froze
# the whole gateway (event loop included). `regex` matches with a time limit and lets go of
# the GIL while it runs (concurrent=True); it is the `re` syntax PEFT's own fullmatch uses.
REGEX_TIMEOUT_S = 0.1
_TENSOR_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(0|[1-9][0-9]{0,5})\.(self_attn|mlp)\."
    r"([a-z_]+)\.lora_(A|B)\.weight"
)
# Per dtype: little-endian bits, the mask that drops the sign, and the magnitude bits of
# infinity. IEEE magnitudes order like their bits read as unsigned ints (subnormals included),
# so one integer max per chunk gives both max |value| and, at or above infinity's bits (the
# exponent all ones), NaN or infinity. bfloat16 is float32's top half: shifted back into
# float32 bits its max is read exactly, since numpy has no bfloat16.
_BITS = {
    "F16": ("<u2", 0x7FFF, 0x7C00),
    "BF16": ("<u2", 0x7FFF, 0x7F80),
    "F32": ("<u4", 0x7FFFFFFF, 0x7F800000),
}
# Config fields whose non-default value changes the math beyond plain LoRA.
_REFUSED_TRUTHY = {
    "use_dora": "DoRA (use_dora) is not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "fan_in_fan_out": "fan_in_fan_out is not supported (Llama projections are nn.Linear)",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters is not supported",
}


@dataclass(frozen=True, slots=True)
class ValidatedAdapter:
    sha256: str  # of adapter_model.safetensors: the adapter_key
    config_sha256: str
    size_bytes: int
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # in TARGET_MODULES order
    use_rslora: bool


def _refuse(reason: str) -> ValidationFailed:
    return ValidationFailed(reason)


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    with path.open("rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise _refuse("adapter_config.json is larger than 1 MiB")
    try:
        config = json.loads(raw.decode("utf-8"))
    # ValueError too: json raises a plain one (not JSONDecodeError) for an integer literal
    # over sys.get_int_max_str_digits() digits, which used to escape as a 500.
    except (ValueError, RecursionError):
        raise _refuse("adapter_config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise _refuse("adapter_config.json is not a JSON object")
    return config, hashlib.sha256(raw).hexdigest()


def _declared_modules(target: object) -> frozenset[str]:
    """PEFT saves target_modules as a list (or set) of names, or a regex string."""
    if isinstance(target, list):
        if not target or not all(isinstance(m, str) for m in target):
            raise _refuse("target_modules must be a non-empty list of module names")
        unknown = sorted(set(target) - set(TARGET_MODULES))
        if unknown:
            raise _refuse(f"unknown target module(s) {unknown}; allowed: {list(TARGET_MODULES)}")
        return frozenset(target)
    if isinstance(target, str):
        if target == "all-linear":
            return frozenset(TARGET_MODULES)
        if len(target) > MAX_REGEX_CHARS:
            raise _refuse("target_modules regex is too long")
        try:
            pattern = regex.compile(target)
        except (regex.error, ValueError, OverflowError, RecursionError):
            raise _refuse("target_modules is not a valid regular expression") from None
        group = {m: ("self_attn" if m in ATTENTION_MODULES else "mlp") for m in TARGET_MODULES}
        # PEFT full-matches the regex against module paths; layer 0 stands for every layer.
        try:
            return frozenset(
                m
                for m in TARGET_MODULES
                if pattern.fullmatch(
                    f"model.layers.0.{group[m]}.{m}", timeout=REGEX_TIMEOUT_S, concurrent=True
                )
            )
        except TimeoutError:
            raise _refuse("target_modules regex takes too long to evaluate") from None
    raise _refuse("target_modules must be a list of module names or a regex string")


def check_config(config: dict[str, Any], max_rank: int) -> tuple[int, float, bool, frozenset[str]]:
    """(rank, alpha, use_rslora, declared modules) of a LoRA config within our limits."""
    if config.get("peft_type") != "LORA":
        raise _refuse(f"not a LoRA config (peft_type {str(config.get('peft_type'))[:32]!r})")
    for field, reason in _REFUSED_TRUTHY.items():
        if config.get(field):
            raise _refuse(reason)
    if config.get("bias", "none") != "none":
        raise _refuse('only bias "none" is supported')
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _refuse("r must be a positive integer")
    if rank > max_rank:
        raise _refuse(f"rank {rank} exceeds the maximum rank {max_rank}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise _refuse("lora_alpha must be a finite positive number")
    try:
        alpha = float(alpha)
    # An int literal past float range (1e400 written out): math.isfinite raised this, a 500.
    except OverflowError:
        raise _refuse("lora_alpha must be a finite positive number") from None
    if not math.isfinite(alpha) or alpha <= 0:
        raise _refuse("lora_alpha must be a finite positive number")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _refuse("use_rslora must be a boolean")
    check_scale(alpha, rank, use_rslora)
    return rank, alpha, use_rslora, _declared_modules(config.get("target_modules"))


def _sniff(path: Path) -> None:
    """Name pickles and zips (torch.save) plainly instead of failing on their header."""
    with path.open("rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        raise _refuse("a zip archive (torch.save or .bin/.pt) is refused; upload safetensors")
    if (
        head[:1] == b"\x80"
        and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        and head[8:9] != b"{"
    ):
        raise _refuse("a pickle file (.bin/.pt) is refused; upload safetensors")


def _parse_name(name: str) -> tuple[int, str, str, str]:
    """(layer, "self_attn" or "mlp", module, "A" or "B") of a PEFT LoRA tensor name."""
    match = _TENSOR_NAME.fullmatch(name)
    if match is None:
        raise _refuse(f"tensor {name[:200]!r} does not name a LoRA weight of the base model")
    return int(match[1]), match[2], match[3], match[4]


def check_tensors(
    header: SafetensorsHeader, base: BaseModelSpec, rank: int, declared: frozenset[str]
) -> tuple[str, ...]:
    """Names, layers and shapes against the base model; returns the modules present."""
    pairs: dict[tuple[int, str], set[str]] = {}
    for t in header.tensors:
        layer, group, module, side = _parse_name(t.name)
        expected_group = "self_attn" if module in ATTENTION_MODULES else "mlp"
        if module not in TARGET_MODULES or group != expected_group:
            raise _refuse(f"tensor {t.name!r}: unknown module {group}.{module}")
        if module not in declared:
            raise _refuse(f"tensor {t.name!r}: module {module} is not in target_modules")
        if layer >= base.num_hidden_layers:
            raise _refuse(f"tensor {t.name!r}: the base model has {base.num_hidden_layers} layers")
        in_features, out_features = base.module_features(module)
        expected = (rank, in_features) if side == "A" else (out_features, rank)
        if t.shape != expected:
            raise _refuse(f"tensor {t.name!r} has shape {list(t.shape)}, expected {list(expected)}")
        pairs.setdefault((layer, module), set()).add(side)
    if not pairs:
        raise _refuse("adapter_model.safetensors holds no LoRA weights")
    for (layer, module), sides in sorted(pairs.items()):
        if sides != {"A", "B"}:
            missing = "B" if "A" in sides else "A"
            raise _refuse(f"layer {layer} {module}: lora_{missing} is missing")
    present = {module for _, module in pairs}
    return tuple(m for m in TARGET_MODULES if m in present)


def _magnitude(top: int, dtype: str) -> float:
    """The float whose magnitude bits are `top` in `dtype`."""
    if dtype == "F32":
        return float(np.array([top], "<u4").view("<f4")[0])
    if dtype == "F16":
        return float(np.array([top], "<u2").view("<f2")[0])
    return float(np.array([top << 16], "<u4").view("<f4")[0])  # BF16


def _scan_tensor(f: Any, t: TensorInfo, digest: Any) -> float:
    """Hash the tensor's bytes, refuse NaN/inf in them; returns its max |value|."""
    dtype, magnitude, infinity = _BITS[t.dtype]
    top = 0
    remaining = t.end - t.begin
    chunk = SCAN_BYTES - SCAN_BYTES % t.itemsize
    while remaining:
        raw = f.read(min(chunk, remaining))
        # A partial item too: np.frombuffer raised ValueError (a 500) on a file cut mid-value.
        if not raw or len(raw) % t.itemsize:
            raise _refuse("adapter_model.safetensors is truncated")
        digest.update(raw)
        top = max(top, int((np.frombuffer(raw, dtype=dtype) & magnitude).max()))
        if top >= infinity:
            raise _refuse(f"tensor {t.name!r} contains NaN or infinite values")
        remaining -= len(raw)
    return _magnitude(top, t.dtype)


def scan_and_hash(path: Path, header: SafetensorsHeader) -> tuple[str, dict[str, float]]:
    """sha256 of the whole file and each tensor's max |value|, chunk by chunk, refusing NaN/inf
    and values over the weight bound."""
    digest = hashlib.sha256()
    maxima: dict[str, float] = {}
    with path.open("rb") as f:
        digest.update(f.read(header.data_start))
        for t in header.tensors:  # they tile the data section in order (header check)
            maxima[t.name] = _scan_tensor(f, t, digest)
            check_weight(_label(t.name), maxima[t.name])
        if f.read(1):
            raise _refuse("adapter_model.safetensors changed while it was validated")
    return digest.hexdigest(), maxima


def _label(name: str) -> str:
    """The tensor as "lora_B of layers.0.q_proj", for a name check_tensors accepted."""
    layer, _, module, side = _parse_name(name)
    return f"lora_{side} of layers.{layer}.{module}"


def check_deltas(maxima: dict[str, float], scale: float, rank: int) -> None:
    """Each (layer, module)'s delta weight bound, from its lora_A and lora_B maxima."""
    for name in sorted(maxima):
        layer, _, module, side = _parse_name(name)
        if side == "A":  # check_tensors made sure its lora_B is there
            max_b = maxima[name.replace(".lora_A.", ".lora_B.")]
            check_delta(f"layers.{layer}.{module}", scale, rank, maxima[name], max_b)


def validate_adapter(
    config_path: Path, model_path: Path, base: BaseModelSpec, max_rank: int
) -> ValidatedAdapter:
    config, config_sha = _read_config(Path(config_path))
    rank, alpha, use_rslora, declared = check_config(config, max_rank)
    model_path = Path(model_path)
    _sniff(model_path)
    header = parse_header(model_path)
    modules = check_tensors(header, base, rank, declared)
    sha, maxima = scan_and_hash(model_path, header)
    check_deltas(maxima, lora_scale(alpha, rank, use_rslora), rank)
    return ValidatedAdapter(
        sha256=sha,
        config_sha256=config_sha,
        size_bytes=header.file_size,
        rank=rank,
        alpha=alpha,
        target_modules=modules,
        use_rslora=use_rslora,
    )
