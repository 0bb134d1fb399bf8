"""Projection GEMMs (runtime/model/linear.py): oneDNN over a reordered weight against F.linear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import native
from runtime.config import RuntimeConfig
from runtime.engine import build_engine
from runtime.model import gemm_cpu
from runtime.model.linear import Linear, gemm_backend, onednn_available
from runtime.types import EngineRequest, SamplingParams
from tests.support.engine_runs import drain
from tests.support.hf_models import builtin_model_dir, hf_greedy, hf_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="no oneDNN linear in this torch")


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen) * in_features**-0.5


@needs_onednn
@pytest.mark.parametrize("batch", [1, 3, 32, 77, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_float32_matches_f_linear_at_any_batch(batch: int, with_bias: bool) -> None:
    """The layout is chosen for one batch size; every other size must still be right."""
    w = _weight(96, 80, seed=batch)
    b = torch.randn(96) if with_bias else None
    x = torch.randn(batch, 80)
    packed = Linear(w.clone(), None if b is None else b.clone(), backend="onednn")
    assert packed.packed
    torch.testing.assert_close(packed(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_packed_reads_rows_of_a_wider_tensor() -> None:
    """The model feeds slices (a split's column views): strides must be honoured."""
    w = _weight(40, 64, seed=1)
    wide = torch.randn(9, 128)
    x = wide[:, 32:96]
    assert not x.is_contiguous()
    torch.testing.assert_close(Linear(w.clone(), backend="onednn")(x), F.linear(x, w),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not onednn_available(torch.bfloat16),
                    reason="oneDNN's bf16 GEMM needs avx512bw/vl/dq or avx_ne_convert")
def test_packed_bfloat16_within_bf16_rounding() -> None:
    w = _weight(128, 256, seed=2)
    x = torch.randn(16, 256)
    out = Linear(w.bfloat16(), backend="onednn")(x.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = F.linear(x.bfloat16().float(), w.bfloat16().float())
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)


@needs_onednn
def test_dense_gives_back_the_weight_and_the_packed_copy_replaces_it() -> None:
    w = _weight(24, 48, seed=3)
    packed = Linear(w.clone(), backend="onednn")
    assert packed.weight.is_mkldnn  # the plain weight is not kept beside it
    assert torch.equal(packed.dense(), w)
    assert packed.shape == (24, 48) and packed.nbytes == w.numel() * 4
    plain = Linear(w)
    assert not plain.packed and plain.dense() is w


def test_backend_choice_by_device_dtype_and_cpu() -> None:
    native_here = gemm_cpu.load() and native.variant()[0] in ("avx2", "avx512")
    expected = "native" if native_here else "onednn" if onednn_available() else "plain"
    assert gemm_backend("auto", "cpu", torch.float32) == expected
    assert gemm_backend("torch", "cpu", torch.float32) == "plain"
    assert gemm_backend("auto", "cuda", torch.float32) == "plain"
    assert gemm_backend("native", "cuda", torch.float32) == "plain"  # CUDA is F.linear
    assert gemm_backend("auto", "cpu", torch.float16) == "plain"
    # bf16 on oneDNN only where this CPU runs its bf16 GEMM (a Zen 3 does not: loading
    # `--dtype bfloat16` there raised at the first reorder until the probe), else ours.
    vector_build = native.variant()[0] in ("avx2", "avx512") and gemm_cpu.load()
    assert gemm_backend("auto", "cpu", torch.bfloat16) == (
        "onednn" if onednn_available(torch.bfloat16)
        else "native" if vector_build else "plain")
    with pytest.raises(ValueError, match="native"):
        gemm_backend("native", "cpu", torch.float16)
    if onednn_available():
        assert gemm_backend("onednn", "cpu", torch.float32) == "onednn"
    with pytest.raises(ValueError, match="onednn"):
        gemm_backend("onednn", "cpu", torch.float16)


def test_onednn_probe_runs_the_op_and_says_no_where_it_raises(monkeypatch) -> None:
    """The probe is the op itself: a CPU (or torch) whose reorder raises gets plain weights."""
    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support ...")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    onednn_available.cache_clear()
    try:
        assert not onednn_available(torch.bfloat16)
        vector_build = native.variant()[0] in ("avx2", "avx512") and gemm_cpu.load()
        assert gemm_backend("auto", "cpu", torch.bfloat16) == (
            "native" if vector_build else "plain")
    finally:
        monkeypatch.undo()
        onednn_available.cache_clear()


def test_config_refuses_an_unknown_gemm(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gemm"):
        RuntimeConfig(model_dir=tmp_path, gemm="mkl")


@needs_onednn
def test_engine_packs_by_default_and_greedy_equals_transformers_either_way(
    tmp_path: Path,
) -> None:
    model_dir = builtin_model_dir(tmp_path / "m")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (9, 40)]
    hf = hf_model(model_dir)
    expected = [hf_greedy(hf, p, 16) for p in prompts]
    gemms = {"auto": gemm_backend("auto", "cpu", torch.float32), "onednn": "onednn",
             "torch": "plain"}
    if gemm_cpu.load():
        gemms["native"] = "native"
    for gemm, backend in gemms.items():
        engine = build_engine(RuntimeConfig(model_dir=model_dir, kv_cache_bytes=4 << 20,
                                            max_gpu_adapters=0, gemm=gemm))
        assert engine.model.layers[0].qkv_proj.backend == backend
        assert engine.model.lm_head.backend == backend
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(EngineRequest(f"r{i}", prompt, params))
        outs = drain(engine)
        got = [[t for o in outs[f"r{i}"] for t in o.new_token_ids] for i in range(2)]
        assert got == expected, gemm


@pytest.mark.parametrize("gemm", [
    pytest.param("onednn", marks=needs_onednn),
    pytest.param("native", marks=pytest.mark.skipif(not gemm_cpu.load(),
                                                    reason="the CPU GEMM did not build"))])
def test_packing_takes_the_plain_weights_out_so_load_never_holds_two_models(
    tmp_path: Path, gemm: str,
) -> None:
    from runtime.model.llama import LlamaModel
    from runtime.model.weights import ModelArgs, load_weights

    model_dir = builtin_model_dir(tmp_path / "m")
    args = ModelArgs.from_model_dir(model_dir)
    projections = [f"layers.{i}.{p}" for i in range(args.num_layers)
                   for p in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]
    plain = load_weights(model_dir, args, torch.float32, "cpu")
    LlamaModel(args, plain, 64)
    assert all(name in plain for name in [*projections, "lm_head"])  # borrowed, not taken
    weights = load_weights(model_dir, args, torch.float32, "cpu")
    model = LlamaModel(args, weights, 64, gemm=gemm)
    assert not any(name in weights for name in [*projections, "lm_head"])
    assert "embed" in weights and model.embed is weights["embed"]  # the lookup keeps its own
