"""A projection's weight and its GEMM on CPU: packed once at load for our kernel or for
oneDNN; `F.linear` elsewhere.

Why not plain `F.linear`: torch's CPU `F.linear` calls MKL's sgemm, which repacks the weight
on every call and, on the development VMs' AMD CPUs, reaches ~100-165 GFLOPS at batch 32 over
SmolLM2's projections where oneDNN over a weight reordered once into its blocked layout
reaches 320-475 (Zen 4, AVX-512), and a batch-1 pass over all the weights runs ~3x faster
(`python -m bench.gemm` prints them side by side).

Why our kernel (runtime/model/gemm_cpu.py) before oneDNN for float32: a decode step streams
every weight from memory for a few dozen rows, and there oneDNN's time was its arithmetic
plus the reads, where ours fetches the next block of its weight stream while it computes on
the current one. Measured over SmolLM2's weights at batch 32 (`python -m bench.gemm`): on a
Zen 3 (AVX2) the step's GEMMs ~20% faster; on a Zen 5 (AVX-512, 512-bit kernel) 1.2-1.5x
oneDNN from batch 1 to 32, ~1.0x at 64, 0.8-0.9x on 256-row prefill chunks. bfloat16 stays on
oneDNN where this CPU runs its bf16 GEMM (avx512_bf16 dot products: 0.6x ours' time at batch
32 on the Zen 5), and goes to ours wherever oneDNN has no bf16 GEMM (F.linear's bf16 there is
an order of magnitude slower than float32).

The packing happens at load and replaces the plain weight (no second copy); `dense()` gives
the plain one back for the few callers that need it (tests, benchmarks).

Numerics: all are fp32 (bf16) GEMMs with fp32 accumulation that sum in different orders, so
outputs differ in the last bits (~1e-6 relative), as they already do between batch sizes of
one library; greedy tokens stay equal to transformers + PEFT on every oracle test.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels import native
from runtime.model import gemm_cpu

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


def gemm_backend(choice: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The `Linear` backend for RuntimeConfig.gemm `choice`: "native", "onednn" or "plain".

    "auto" on CPU, where the library builds: float32 on our kernel where the CPU has AVX2
    and FMA (the avx2 and avx512 build variants, kernels/native.py), else oneDNN; bfloat16
    on oneDNN where this CPU runs its bf16 GEMM (avx512bw/vl/dq or avx_ne_convert), else on
    ours where the CPU has AVX2 (F.linear's bf16 there reached 16 GFLOPS at batch 32 on a
    Zen 3, ours 96: `python -m bench.gemm --dtype bfloat16`); else F.linear. "native" and
    "onednn" ask for one (ValueError where it cannot run); "torch" is F.linear everywhere."""
    if choice == "torch" or torch.device(device).type != "cpu":
        return "plain"
    packable = dtype in (torch.float32, torch.bfloat16)

    def native_ok() -> bool:  # builds the library on first use: only where it may run
        return packable and gemm_cpu.load()

    onednn_ok = packable and onednn_available(dtype)
    if choice == "native":
        if not native_ok():
            raise ValueError(f"gemm 'native' runs float32 or bfloat16 on CPU with its C++ "
                             f"library built (dtype {dtype}; see the log for a build error)")
        return "native"
    if choice == "onednn":
        if not onednn_ok:
            raise ValueError(f"gemm 'onednn': this torch or CPU has no oneDNN linear for {dtype}")
        return "onednn"
    # Our kernel's vector paths need AVX2 + FMA (both x86 variants that have them); the
    # plain build's scalar std::fma would be slower than F.linear.
    vectors = native.variant()[0] in ("avx2", "avx512")
    if dtype == torch.float32 and vectors and native_ok():
        return "native"
    if onednn_ok:
        return "onednn"
    return "native" if vectors and native_ok() else "plain"


class Linear:
    """y = x @ weight.T (+ bias), for x [num_tokens, in_features]."""

    __slots__ = ("backend", "bias", "dtype", "in_features", "out_features", "weight")

    def __init__(
        self,
        weight: torch.Tensor,  # [out_features, in_features]
        bias: torch.Tensor | None = None,  # [out_features]
        *,
        backend: str = "plain",  # gemm_backend(): "native", "onednn" or "plain"
    ) -> None:
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = bias
        self.backend = backend
        if backend == "native":
            self.weight = gemm_cpu.pack(weight)
        elif backend == "onednn":
            self.weight = reorder_for_onednn(weight)
        elif backend == "plain":
            self.weight = weight
        else:
            raise ValueError(f"unknown Linear backend {backend!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "native":
            return gemm_cpu.linear(x, self.weight, self.bias, self.out_features)
        if self.backend == "onednn":
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    @property
    def packed(self) -> bool:
        """Whether the weight is held in a packed layout (not a plain [out, in] tensor)."""
        return self.backend != "plain"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.dtype.itemsize

    def dense(self) -> torch.Tensor:
        """The plain [out_features, in_features] weight (a copy when packed)."""
        if self.backend == "native":
            return gemm_cpu.unpack(self.weight, self.out_features)
        return self.weight.to_dense() if self.backend == "onednn" else self.weight
