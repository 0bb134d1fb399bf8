"""The value bounds of adapters/weight_bounds.py: each one just below its limit passes and just
above is refused, in every file dtype; the hostile-tenant finding's two adapters are refused;
the scan reports exact maxima (bfloat16 included) without reading a tensor whole."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from adapters import validation
from adapters.errors import ValidationFailed
from adapters.safetensors_header import parse_header
from adapters.validation import scan_and_hash, validate_adapter
from adapters.weight_bounds import MAX_DELTA_ABS, MAX_LORA_SCALE, MAX_WEIGHT_ABS, lora_scale
from tests.support.adapter_files import SPEC, encode_safetensors, lora_config, write_adapter

pytestmark = pytest.mark.unit
MAX_RANK = 16
DTYPES = ("F16", "BF16", "F32")
PAIR = "base_model.model.model.layers.1.self_attn.v_proj"
A, B = f"{PAIR}.lora_A.weight", f"{PAIR}.lora_B.weight"


# ------------------------------------------------------------- values exact in a dtype


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits by truncation (exact for the values these tests pick)."""
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _bf16_value(bits: int) -> float:
    return float(np.array([bits << 16], np.uint32).view(np.float32)[0])


def _at_most(limit: float, dtype: str) -> float:
    """The largest value of `dtype` that is <= limit."""
    if dtype == "BF16":
        return _bf16_value(int(_bf16_bits(np.array([limit]))[0]))
    t = np.float16 if dtype == "F16" else np.float32
    v = t(limit)
    return float(v if v <= limit else np.nextafter(v, t(0)))


def _next_up(value: float, dtype: str) -> float:
    """The next value of `dtype` above `value` (a value of that dtype)."""
    if dtype == "BF16":
        return _bf16_value(int(_bf16_bits(np.array([value]))[0]) + 1)
    t = np.float16 if dtype == "F16" else np.float32
    return float(np.nextafter(t(value), t(np.inf)))


def _tensors(dtype: str, rank: int = 4, **values: float) -> dict[str, np.ndarray]:
    """A small, valid adapter (|value| <= 0.01) in `dtype`; values={"A": v} or {"B": v} puts v
    (exact in dtype) at [0, 0] of layer 1's v_proj."""
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            in_f, out_f = SPEC.module_features(module)
            base = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            out[f"{base}.lora_A.weight"] = rng.uniform(-0.01, 0.01, (rank, in_f))
            out[f"{base}.lora_B.weight"] = rng.uniform(-0.01, 0.01, (out_f, rank))
    for side, value in values.items():
        out[A if side == "A" else B][0, 0] = value
    if dtype == "BF16":
        return {n: _bf16_bits(a) for n, a in out.items()}
    return {n: a.astype(np.float16 if dtype == "F16" else np.float32) for n, a in out.items()}


def _validate(tmp_path: Path, tensors: dict[str, np.ndarray], config: dict | None = None):
    paths = write_adapter(tmp_path / "up", config=config or lora_config(), model=tensors)
    return validate_adapter(*paths, SPEC, MAX_RANK)


def _refusal(tmp_path: Path, tensors: dict[str, np.ndarray], config: dict | None = None) -> str:
    with pytest.raises(ValidationFailed) as refused:
        _validate(tmp_path, tensors, config)
    return refused.value.reason


# ------------------------------------------------------------------- max |value| per weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", ["A", "B"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_weight_just_below_the_bound_passes_and_just_above_is_refused(
    tmp_path: Path, dtype: str, side: str, sign: float
) -> None:
    below = _at_most(MAX_WEIGHT_ABS, dtype)
    assert below > MAX_WEIGHT_ABS * 0.99  # the test is near the bound in every dtype
    _validate(tmp_path, _tensors(dtype, **{side: sign * below}))
    above = _next_up(below, dtype)
    reason = _refusal(tmp_path, _tensors(dtype, **{side: sign * above}))
    assert reason.startswith(f"lora_{side} of layers.1.v_proj: max |value| ")
    assert reason.endswith(f"exceeds {MAX_WEIGHT_ABS:g}")


def test_the_findings_3e38_in_lora_b_is_refused(tmp_path: Path) -> None:
    reason = _refusal(tmp_path, _tensors("F32", B=3e38))
    assert reason == "lora_B of layers.1.v_proj: max |value| 3e+38 exceeds 10000"
    assert "max |value|" in _refusal(tmp_path, _tensors("BF16", B=3e38))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_largest_finite_value_of_each_dtype_is_refused(tmp_path: Path, dtype: str) -> None:
    largest = {"F16": 65504.0, "BF16": _bf16_value(0x7F7F),
               "F32": float(np.finfo(np.float32).max)}[dtype]
    assert "max |value|" in _refusal(tmp_path, _tensors(dtype, A=largest))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_subnormal_and_zero_values_pass(tmp_path: Path, dtype: str) -> None:
    smallest = {"F16": 2.0**-24, "BF16": _bf16_value(1), "F32": 2.0**-149}[dtype]
    tensors = _tensors(dtype, A=smallest, B=-0.0)
    tensors[B.replace("v_proj", "q_proj")][:] = 0  # PEFT's own init: lora_B all zero
    _validate(tmp_path, tensors)


# ----------------------------------------------------------------- scale * r * max|A| * max|B|


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_delta_bound_just_below_passes_and_just_above_is_refused(
    tmp_path: Path, dtype: str
) -> None:
    # r 4, alpha 8: scale 2, so 2 * 4 * 16 * 32 is the bound exactly, in every dtype.
    assert lora_scale(8, 4, False) * 4 * 16 * 32 == MAX_DELTA_ABS
    _validate(tmp_path, _tensors(dtype, A=16.0, B=-32.0))
    reason = _refusal(tmp_path, _tensors(dtype, A=16.0, B=-_next_up(32.0, dtype)))
    assert reason.startswith("layers.1.v_proj: delta bound scale x r x max|A| x max|B| = 2 x 4 x ")
    assert reason.endswith(f"exceeds {MAX_DELTA_ABS:g}")


def test_the_delta_bound_uses_the_rslora_scale(tmp_path: Path) -> None:
    tensors = _tensors("F32", A=8.0, B=8.0)  # r 4: scale * 4 * 64 <= 4096 iff scale <= 16
    _validate(tmp_path, tensors, lora_config(lora_alpha=64))  # alpha / r = 16
    reason = _refusal(tmp_path, tensors, lora_config(lora_alpha=64, use_rslora=True))  # 32
    assert "delta bound" in reason and "= 32 x 4 x 8 x 8 = 8192" in reason


def test_values_each_within_the_weight_bound_can_still_exceed_the_delta_bound(
    tmp_path: Path,
) -> None:
    reason = _refusal(tmp_path, _tensors("F16", A=100.0, B=100.0))
    assert "layers.1.v_proj: delta bound" in reason


# ------------------------------------------------------------------------- the config scale


@pytest.mark.parametrize(
    ("rank", "alpha", "use_rslora"),
    [(4, 4 * MAX_LORA_SCALE, False), (4, 2 * MAX_LORA_SCALE, True), (1, MAX_LORA_SCALE, False),
     (16, 4 * MAX_LORA_SCALE, True)],
)
def test_a_scale_at_the_bound_passes_and_just_above_is_refused(
    tmp_path: Path, rank: int, alpha: float, use_rslora: bool
) -> None:
    tensors = _tensors("F32", rank=rank)
    _validate(tmp_path, tensors, lora_config(rank=rank, lora_alpha=alpha, use_rslora=use_rslora))
    over = lora_config(rank=rank, lora_alpha=math.nextafter(alpha, math.inf),
                       use_rslora=use_rslora)
    reason = _refusal(tmp_path, tensors, over)
    formula = "lora_alpha / sqrt(r)" if use_rslora else "lora_alpha / r"
    assert reason.startswith(f"scale {formula} = ")
    assert reason.endswith(f"exceeds {MAX_LORA_SCALE:g}")


def test_rslora_decides_the_scale(tmp_path: Path) -> None:
    tensors = _tensors("F32", rank=16)
    _validate(tmp_path, tensors, lora_config(rank=16, lora_alpha=8192))  # 8192 / 16 = 512
    reason = _refusal(tmp_path, tensors, lora_config(rank=16, lora_alpha=8192, use_rslora=True))
    assert reason == "scale lora_alpha / sqrt(r) = 2048 (lora_alpha 8192, r 16) exceeds 1024"


def test_the_findings_alpha_1e308_is_refused(tmp_path: Path) -> None:
    reason = _refusal(tmp_path, _tensors("F32"), lora_config(lora_alpha=1e308))
    assert reason == "scale lora_alpha / r = 2.5e+307 (lora_alpha 1e+308, r 4) exceeds 1024"


@pytest.mark.parametrize("alpha", [10**400, -(10**400), 2**1024])
def test_an_integer_alpha_past_float_range_is_refused(tmp_path: Path, alpha: int) -> None:
    # math.isfinite(10**400) raises OverflowError: it escaped the validator as a 500.
    reason = _refusal(tmp_path, _tensors("F32"), lora_config(lora_alpha=alpha))
    assert reason == "lora_alpha must be a finite positive number"


def test_the_scale_is_the_one_the_runtime_applies() -> None:
    from runtime.types import AdapterRef

    for rank in (1, 2, 3, 8, 64, 256):
        for alpha in (0.5, 1, 16, 1e4, 1e308):
            for use_rslora in (False, True):
                ref = AdapterRef(key="ab" * 32, uri="file:///x", rank=rank, alpha=alpha,
                                 target_modules=("q_proj",), use_rslora=use_rslora)
                assert lora_scale(alpha, rank, use_rslora) == ref.scale


# -------------------------------------------------------------------------------- the scan


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_scan_reports_each_tensors_exact_max_across_chunks(
    tmp_path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validation, "SCAN_BYTES", 24)  # many chunks per tensor
    tensors = _tensors(dtype, A=-7.5, B=0.25)
    tensors[B][-1, -1] = tensors[B][0, 0]  # the max also in the last chunk of a tensor
    path = tmp_path / "m.safetensors"
    path.write_bytes(encode_safetensors(tensors))
    _, maxima = scan_and_hash(path, parse_header(path))
    for name, array in tensors.items():
        values = array.astype(np.uint32) << 16 if dtype == "BF16" else array
        decoded = values.view(np.float32) if dtype == "BF16" else values
        assert maxima[name] == float(np.abs(decoded).max()), name
    assert maxima[A] == 7.5 and maxima[B] == 0.25


def test_a_file_cut_mid_value_during_the_scan_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(encode_safetensors(_tensors("F32")))
    header = parse_header(path)
    with path.open("r+b") as f:  # the upload changes after its header was checked
        f.truncate(header.file_size - 1)
    with pytest.raises(ValidationFailed, match="truncated"):
        scan_and_hash(path, header)
