"""The engine on CUDA: same greedy tokens as on the CPU (fp32), and bf16 runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.config import RuntimeConfig
from runtime.engine import LLMEngine
from runtime.types import EngineRequest, SamplingParams
from tests.support.hf_models import builtin_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def generate(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", p, params))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def test_cuda_engine_matches_cpu(tmp_path: Path) -> None:
    model_dir = builtin_model_dir(tmp_path / "builtin")
    gen = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 1000, (k,), generator=gen).tolist() for k in (4, 30, 70)]

    def engine(device: str, dtype: str) -> LLMEngine:
        return LLMEngine(RuntimeConfig(model_dir=model_dir, device=device, dtype=dtype,
                                       kv_cache_bytes=16 << 20, max_batch_tokens=32,
                                       max_gpu_adapters=0))

    cpu = generate(engine("cpu", "float32"), prompts, 16)
    assert generate(engine("cuda", "float32"), prompts, 16) == cpu
    bf16 = generate(engine("cuda", "bfloat16"), prompts, 16)
    assert [len(t) for t in bf16] == [16, 16, 16]
