"""A projection's weight and its GEMM: reordered once for oneDNN on CPU, `F.linear` elsewhere.

Why: torch's CPU `F.linear` calls MKL's sgemm, which repacks the weight on every call and,
on the development VM's AMD CPU, takes a path that reaches ~100-165 GFLOPS at batch 32 over
SmolLM2's projections and ~200 at batch 1,024. oneDNN's GEMM over a weight reordered once
into its own blocked layout reaches 320-475 at batch 32 and 450-490 at 256, and a batch-1
pass over all the weights runs ~3x faster (`python -m bench.gemm` prints them side by
side). The reorder happens at load and replaces the plain weight (no second copy); `dense()`
gives the plain one back for the few callers that need it (tests, benchmarks).

Numerics: both are fp32 (bf16) GEMMs with fp32 accumulation that sum in different orders,
so outputs differ in the last bits (~1e-6 relative), as they already do between batch sizes
of one library; greedy tokens stay equal to transformers + PEFT on every oracle test.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# The batch size oneDNN picks its weight layout for. Measured on SmolLM2: hints 32 and 128
# run every batch from 1 to 256 within 5% of each other, so one fixed value serves all.
_LAYOUT_BATCH_HINT = 64


@functools.cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch has oneDNN's linear ops for `dtype` weights on this CPU.

    Every x86 and aarch64 CPU build has the ops, but their bf16 path needs CPU support
    (avx512bw/vl/dq or avx_ne_convert on x86: a Zen 3 has neither) and raises without it, at
    the first reorder. So this runs the two ops once on a tiny weight: the check is the op's
    own, whatever CPU or torch version decides it."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype),
                                                         _LAYOUT_BATCH_HINT)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), packed, None,
                                                 "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return out.dtype == dtype and bool((out == 8).all())


def reorder_for_onednn(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out_features, in_features] in oneDNN's blocked layout (a new tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _LAYOUT_BATCH_HINT)


def onednn_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ bias) over `reorder_for_onednn(weight)`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def use_onednn(backend: str, device: torch.device | str, dtype: torch.dtype) -> bool:
    """`backend`: RuntimeConfig.gemm. "auto" packs on CPU for float32, and for bfloat16
    where this CPU runs oneDNN's bf16 GEMM (elsewhere bf16 weights stay plain for F.linear)."""
    return (backend == "auto" and torch.device(device).type == "cpu"
            and dtype in (torch.float32, torch.bfloat16) and onednn_available(dtype))


class Linear:
    """y = x @ weight.T (+ bias), for x [num_tokens, in_features]."""

    __slots__ = ("bias", "dtype", "in_features", "out_features", "packed", "weight")

    def __init__(
        self,
        weight: torch.Tensor,  # [out_features, in_features]
        bias: torch.Tensor | None = None,  # [out_features]
        *,
        pack: bool = False,
    ) -> None:
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = bias
        self.packed = pack
        self.weight = reorder_for_onednn(weight) if pack else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.weight.element_size()

    def dense(self) -> torch.Tensor:
        """The plain [out_features, in_features] weight (a copy when packed)."""
        return self.weight.to_dense() if self.packed else self.weight
