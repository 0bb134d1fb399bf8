"""Bounds on an adapter's numbers, so that its LoRA delta is computed safely in any serving dtype.

The runtime adds, per token and projection (runtime/lora/layers.py),

    y[i] += scale * (x[i] @ A.T) @ B.T     # A = lora_A [r, in], B = lora_B [out, r]
    scale = alpha / r                      # alpha / sqrt(r) with use_rslora

with the weights cast to the serving dtype (float32, bfloat16 or float16, whose largest finite
value is 65504), the scale kept in float32 and the products accumulated in float32. Each entry
of the delta weight scale * B @ A is a sum of r products, so

    |delta[o, i]| <= scale * r * max|A| * max|B|

which is the bound checked per (layer, module) below. A finite value can still be poison: one
lora_B entry of 3e38 is finite, yet it made every K/V row it touched inf/NaN for all tenants
sharing the pool; an alpha of 1e308 is finite, yet alpha / r overflowed the float32 scale.

The limits are far above real adapters and far below overflow. Measured with PEFT 0.21 on the
built-in model (hidden 128, all-linear targets, batches of 8 x 128 tokens of its corpus),
max|A|, max|B| and the delta bound:
- PEFT's default init: A <= 1/sqrt(in) = 0.088, B = 0, bound 0; init_lora_weights=False: B
  <= 1/sqrt(r) = 0.35, bound 0.5; "gaussian": A <= 0.55, B = 0, bound 0;
- 300 AdamW steps at lr 1e-2, r 8, alpha 16: A 0.67, B 0.88, bound 8.4; rsLoRA r 64, alpha
  128 (scale 16, diverged to loss 6.4): A 0.78, B 0.63, bound 486; at lr 3e-2, r 1, alpha 64
  (scale 64): bound 27; 200 steps at lr 0.1, r 16, alpha 16: A 3.5, B 3.5, bound 196.
tests/adapters/test_peft_adapters.py trains two such adapters and uploads them.
Adam moves a weight by about lr per step at most: 300 steps at lr 1e-2 move it by 3 or less.
"""

from __future__ import annotations

import math

from adapters.errors import ValidationFailed

# alpha / r is 0.5..64 in practice (r 8 alpha 16 gives 2; rsLoRA r 256 alpha 512 gives 32);
# 16x over the top of that, and a float32 without any risk.
MAX_LORA_SCALE = 1024.0
# Trained values stay within a few units (3.5 after 200 steps at lr 0.1, above); 1e4 leaves
# three orders of magnitude and still casts to float16 (max 65504) with room to spare.
MAX_WEIGHT_ABS = 1e4
# 2**12, 1/16 of float16's max: each delta weight casts to float16, and so does its product
# with an activation up to 16. Upload cannot see activations, so this bounds the adapter, not
# every sum over in-features (the kernels accumulate those in float32). The largest bound
# measured above (486, a diverged rsLoRA run) has 8x headroom; the tests' N(0, 1) stand-in
# adapters (every value drawn from a unit normal) reach 100..540.
MAX_DELTA_ABS = 4096.0


def _num(value: float, limit: float) -> str:
    """`value` short, but never printed equal to the limit it exceeds."""
    text = f"{value:g}"
    return repr(value) if text == f"{limit:g}" else text


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """The scale the runtime multiplies the LoRA term by (runtime.types.AdapterRef.scale)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def check_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """The adapter's scale, or ValidationFailed when it is over MAX_LORA_SCALE."""
    scale = lora_scale(alpha, rank, use_rslora)
    if not scale <= MAX_LORA_SCALE:  # `not <=`: a NaN is refused too
        formula = "lora_alpha / sqrt(r)" if use_rslora else "lora_alpha / r"
        raise ValidationFailed(
            f"scale {formula} = {_num(scale, MAX_LORA_SCALE)} (lora_alpha {alpha:g}, "
            f"r {rank}) exceeds {MAX_LORA_SCALE:g}"
        )
    return scale


def check_weight(label: str, max_abs: float) -> None:
    """`label` is e.g. "lora_B of layers.0.q_proj"; max_abs its largest |value|."""
    if not max_abs <= MAX_WEIGHT_ABS:
        raise ValidationFailed(
            f"{label}: max |value| {_num(max_abs, MAX_WEIGHT_ABS)} exceeds {MAX_WEIGHT_ABS:g}"
        )


def check_delta(label: str, scale: float, rank: int, max_a: float, max_b: float) -> None:
    """`label` is e.g. "layers.0.q_proj"; refuses a delta weight bound over MAX_DELTA_ABS."""
    bound = scale * rank * max_a * max_b
    if not bound <= MAX_DELTA_ABS:
        raise ValidationFailed(
            f"{label}: delta bound scale x r x max|A| x max|B| = {scale:g} x {rank} x "
            f"{max_a:g} x {max_b:g} = {_num(bound, MAX_DELTA_ABS)} exceeds {MAX_DELTA_ABS:g}"
        )
