"""The CPU projection GEMM of our own: `csrc/gemm_cpu.cpp`, built at first use.

`pack(weight)` lays a float32 or bfloat16 [out_features, in_features] weight out in panels of
`panel_width()` output columns, each a contiguous [in_features, panel] run; `linear(x, packed,
bias, out_features)` is x @ weight.T (+ bias) over it. Why it exists and its numerics (one
FMA chain per output over k in order, so a row's result does not depend on the batch): the
C++ file's header; bfloat16 weights load widened to float32, sum in float32 and round y once.
runtime/model/linear.py decides where it runs ("auto": float32 on CPUs whose best vectors are
AVX2, where it measured faster than oneDNN, and bfloat16 where oneDNN has no bf16 GEMM;
`RuntimeConfig.gemm`).

`load()` is False (logged once) when the library cannot be built: callers keep oneDNN or
F.linear.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kernels import native

_SOURCE = Path(__file__).with_name("csrc") / "gemm_cpu.cpp"
_BUILD_NAME = "loragate_gemm_cpu"


@functools.cache
def load() -> bool:
    """Whether the library is built and loaded (built on the first call of the process)."""
    return native.load_library(_BUILD_NAME, [_SOURCE], fallback="using oneDNN or F.linear")


def panel_width() -> int:
    """Output columns per packed panel in this build (16 with AVX2, 8 in the plain build)."""
    return int(torch.ops.loragate_gemm.panel_width())


def pack(weight: torch.Tensor) -> torch.Tensor:  # [out, in] -> [panels, in, width], same dtype
    return torch.ops.loragate_gemm.pack_weight(weight)


def linear(
    x: torch.Tensor,  # [num_tokens, in_features] of the weight's dtype, unit column stride
    packed: torch.Tensor,  # from pack()
    bias: torch.Tensor | None,  # [out_features] of the weight's dtype
    out_features: int,
) -> torch.Tensor:  # [num_tokens, out_features] of the weight's dtype
    return torch.ops.loragate_gemm.linear(x, packed, bias, out_features)


def unpack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The plain [out_features, in_features] weight back (a copy), for `Linear.dense()`."""
    panels, in_features, width = packed.shape
    return packed.permute(0, 2, 1).reshape(panels * width, in_features)[:out_features].clone()
