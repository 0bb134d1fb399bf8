"""The Triton kernels compiled for CUDA, at model-sized shapes; skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.reference import add_lora_reference
from tests.support.lora_cases import Case, make_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# On the GPU the expand rounds the rank-sized float32 input to the weights' dtype before
# the tensor-core dot, so half precisions get a little more room than on the CPU.
GPU_TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
}


def on_cuda(case: Case) -> Case:
    return Case(
        **{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(case).items()}
    )


def reference(case: Case) -> torch.Tensor:  # on the case's device, float64 inside
    return add_lora_reference(
        case.y, case.x, case.lora_a, case.lora_b, case.scales, case.token_to_slot,
        case.slice_sizes,
    ).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 512])
def test_fused_qkv_shapes_match_reference(dtype: torch.dtype, num_tokens: int) -> None:
    # Llama-8B-like qkv under GQA: 4096 -> 4096 + 1024 + 1024, ranks 4..64 mixed, 32 slots.
    case = on_cuda(make_case(num_tokens, 4096, [4096, 1024, 1024], num_slots=32, dtype=dtype,
                             seed=num_tokens))
    y = case.y.clone()
    meta = kernels.build_meta(case.token_to_slot, 32)
    kernels.add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, meta, case.slice_sizes)
    torch.testing.assert_close(y.cpu().double(), reference(case).double(),
                               **GPU_TOLERANCES[dtype])
    off = (case.token_to_slot < 0).cpu()
    assert torch.equal(y.cpu()[off], case.y.cpu()[off])


def test_decode_batch_of_64_distinct_adapters() -> None:
    t2s = torch.arange(64, dtype=torch.int32)
    case = on_cuda(make_case(64, 4096, [14336], num_slots=64, dtype=torch.bfloat16,
                             ranks=(16,), token_to_slot=t2s))
    y = case.y.clone()
    kernels.add_lora(y, case.x, case.lora_a, case.lora_b, case.scales,
                     kernels.build_meta(case.token_to_slot, 64), case.slice_sizes)
    torch.testing.assert_close(y.cpu().double(), reference(case).double(),
                               **GPU_TOLERANCES[torch.bfloat16])


def test_cuda_graph_replays_with_a_refilled_meta() -> None:
    # The meta is preallocated; a graph captured once must serve a new token->slot map.
    first = make_case(48, 512, [256, 128], num_slots=8, dtype=torch.bfloat16, seed=1)
    second_map = torch.randint(-1, 8, (48,), generator=torch.Generator().manual_seed(2))
    second = make_case(48, 512, [256, 128], num_slots=8, dtype=torch.bfloat16, seed=1,
                       token_to_slot=second_map)
    c1, c2 = on_cuda(first), on_cuda(second)
    assert torch.equal(c1.lora_a, c2.lora_a)  # same seed: same weights, new map and inputs
    buf = kernels.LoraMeta.empty(48, 8, "cuda")
    meta = kernels.build_meta(c1.token_to_slot, 8, out=buf)
    y = c1.y.clone()
    args = (c1.x, c1.lora_a, c1.lora_b, c1.scales, meta, c1.slice_sizes)
    kernels.add_lora(y.clone(), *args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.add_lora(y, *args)
    y.copy_(c2.y)
    c1.x.copy_(c2.x)
    kernels.build_meta(c2.token_to_slot, 8, out=buf)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y.cpu().double(), reference(c2).double(),
                               **GPU_TOLERANCES[torch.bfloat16])
