"""Our CPU projection GEMM (runtime/model/gemm_cpu.py, csrc/gemm_cpu.cpp) against a float64
reference, float32 and bfloat16: every shape the model meets (edge panels, a bias, rows of a
wider tensor, prefill batches past the row chunk), results independent of the batch, the
plain weight given back, and bad arguments refused with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.model import gemm_cpu
from runtime.model.linear import Linear
from tests.support.native_variants import LOWER_VARIANTS, ROOT, not_in_a_rerun, rerun_under_variant

pytestmark = [pytest.mark.unit, pytest.mark.skipif(
    not gemm_cpu.load(), reason="the CPU GEMM library did not build")]


def _case(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) * k**-0.5,
            torch.randn(n, generator=gen))


def _assert_near_float64(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                         b: torch.Tensor | None) -> None:
    """Within the textbook bound of a float32 sum of k products, element by element:
    |error| <= (k + 1) * 2**-24 * (|x| @ |w|.T + |b|). A wrong index, a lost block or another
    row's term is off by the size of a term, orders of magnitude past it."""
    bias = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.double()
    ref = x.double() @ w.double().T + bias
    bound = (x.shape[1] + 1) * 2.0**-24 * (x.double().abs() @ w.double().abs().T + bias.abs())
    assert got.dtype == torch.float32 and got.shape == ref.shape
    excess = (got.double() - ref).abs() - bound
    assert excess.max() <= 0, excess.max()


@pytest.mark.parametrize(("m", "n", "k"), [
    (1, 576, 576),    # one request decoding
    (32, 960, 576),   # a decode step's qkv
    (7, 100, 33),     # n and k off every block size: a partial last panel
    (5, 3, 1536),     # fewer columns than one panel
    (50, 130, 300),   # past the 48-row chunk, 6-row calls unevenly split
    (97, 64, 700),    # k past the 256-row k block, unevenly
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_within_float32_rounding(m: int, n: int, k: int, with_bias: bool) -> None:
    x, w, b = _case(m, n, k, seed=m * 1000 + n)
    bias = b if with_bias else None
    got = Linear(w, bias, backend="native")(x)
    _assert_near_float64(got, x, w, bias)


@pytest.mark.parametrize(("m", "n", "k"), [(32, 960, 576), (7, 100, 33), (50, 130, 300)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bfloat16_sums_in_float32_and_rounds_once(m: int, n: int, k: int,
                                                 with_bias: bool) -> None:
    """bf16 weights, x and bias: the float32 sums over the bf16 values (within the float32
    bound), then one rounding to bfloat16: every output within half a bf16 ulp (at most
    2**-8 relative) of that, and bitwise what the float32 kernel over the same values rounds to."""
    x, w, b = (t.bfloat16() for t in _case(m, n, k, seed=m + n))
    bias = b if with_bias else None
    got = Linear(w, bias, backend="native")(x)
    assert got.dtype == torch.bfloat16
    wide = Linear(w.float(), None if bias is None else bias.float(), backend="native")
    assert torch.equal(got, wide(x.float()).bfloat16())
    ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
    bound = ((k + 1) * 2.0**-24 * (x.double().abs() @ w.double().abs().T
                                   + (0 if bias is None else bias.double().abs()))
             + 2.0**-8 * ref.abs() * (1 + 2.0**-7))
    assert ((got.double() - ref).abs() <= bound).all()
    assert torch.equal(Linear(w, bias, backend="native").dense(), w)


def test_a_row_does_not_depend_on_the_batch_it_runs_in() -> None:
    """One FMA chain per output: the same row gives the same bits alone, at the head of a
    6-row call, in a 5-row call, or past the row chunk (oneDNN's split of k varies)."""
    x, w, b = _case(130, 200, 640, seed=3)
    lin = Linear(w, b, backend="native")
    full = lin(x)
    for rows in ([0], [4, 5], list(range(30, 62)), list(range(100, 130))):
        index = torch.tensor(rows)
        assert torch.equal(lin(x.index_select(0, index)), full.index_select(0, index)), rows


def test_reads_rows_of_a_wider_tensor_and_no_other_columns() -> None:
    """The model feeds split views; the columns beside the view must not enter any sum."""
    x, w, _ = _case(9, 40, 64, seed=4)
    wide = torch.full((9, 128), float("nan"))
    wide[:, 32:96] = x
    view = wide[:, 32:96]
    assert not view.is_contiguous()
    got = Linear(w, backend="native")(view)
    assert torch.equal(got, Linear(w, backend="native")(x))
    _assert_near_float64(got, x, w, None)


def test_zero_rows_and_the_weight_given_back() -> None:
    x, w, _ = _case(3, 37, 19, seed=5)
    lin = Linear(w.clone(), backend="native")
    assert lin.packed and lin.shape == (37, 19) and lin.nbytes == w.numel() * 4
    assert torch.equal(lin.dense(), w)
    assert lin(x[:0]).shape == (0, 37)


def test_bad_arguments_are_refused_with_a_clear_error() -> None:
    x, w, b = _case(4, 40, 24, seed=6)
    packed = gemm_cpu.pack(w)
    with pytest.raises(RuntimeError, match="features"):
        gemm_cpu.linear(torch.randn(4, 25), packed, None, 40)
    with pytest.raises(RuntimeError, match="out_features"):
        gemm_cpu.linear(x, packed, None, 40 + gemm_cpu.panel_width())
    with pytest.raises(RuntimeError, match="bias"):
        gemm_cpu.linear(x, packed, b[:39], 40)
    with pytest.raises(RuntimeError, match="dtype"):
        gemm_cpu.linear(x.double(), packed, None, 40)
    with pytest.raises(RuntimeError, match="pack_weight"):
        gemm_cpu.linear(x, w, None, 40)  # a plain weight, not a packed one
    with pytest.raises(RuntimeError, match="dtype"):
        gemm_cpu.linear(x.bfloat16(), packed, None, 40)  # bf16 x over a float32 weight
    with pytest.raises(RuntimeError, match="bfloat16"):
        gemm_cpu.pack(w.half())


def test_a_non_finite_input_row_stays_in_its_row() -> None:
    """Isolation across a batch: one tenant's NaN activations never reach another's row."""
    x, w, _ = _case(32, 64, 96, seed=7)
    x[11] = float("nan")
    got = Linear(w, backend="native")(x)
    assert torch.isnan(got[11]).all()
    assert torch.isfinite(torch.cat([got[:11], got[12:]])).all()


@pytest.mark.slow
@not_in_a_rerun
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_the_variants_for_lesser_cpus_pass_these_tests_too(capability: str) -> None:
    """The kernel's tests again under each lesser CPU variant (the plain C++ path included)."""
    rerun_under_variant(__file__, capability, "not variants")


# Shapes that take every path of every build: full and partial panels of 8, 16 and 32
# columns, 1 to 12 rows per call, several k blocks and row chunks, with and without a bias.
_SAME_BITS_CASES = [(32, 960, 576), (11, 100, 300), (50, 37, 700), (1, 33, 1536), (97, 64, 19)]


def _same_bits_outputs(inputs: Path, outputs: Path) -> None:
    """Every case's x @ w.T and x @ w.T + b through our kernel, from the inputs saved in
    `inputs` (torch.randn's bits depend on the CPU variant too, so they are made once)."""
    t = load_file(str(inputs))
    out = {}
    for m, n, k in _SAME_BITS_CASES:
        x, w, b = (t[f"{m}x{n}x{k}.{part}"] for part in "xwb")
        out[f"{m}x{n}x{k}"] = Linear(w, backend="native")(x)
        out[f"{m}x{n}x{k}+bias"] = Linear(w, b, backend="native")(x)
    save_file(out, str(outputs))


@pytest.mark.slow
@not_in_a_rerun
def test_every_build_variant_gives_the_same_bits(tmp_path: Path) -> None:
    """512-bit, 256-bit and plain C++: one FMA chain per output in the same order, so the bits
    agree across the builds this CPU can run (a model's tokens do not depend on the CPU kind)."""
    lesser = LOWER_VARIANTS.get(torch.backends.cpu.get_cpu_capability(), ())
    if not lesser:
        pytest.skip("this CPU runs only one build variant")
    inputs = tmp_path / "inputs.safetensors"
    save_file({f"{m}x{n}x{k}.{part}": tensor for m, n, k in _SAME_BITS_CASES
               for part, tensor in zip("xwb", _case(m, n, k, seed=m + n + k), strict=True)},
              str(inputs))
    _same_bits_outputs(inputs, tmp_path / "own.safetensors")
    own = load_file(str(tmp_path / "own.safetensors"))
    script = ("import sys; from pathlib import Path; "
              "from tests.runtime.test_gemm_cpu import _same_bits_outputs; "
              "_same_bits_outputs(Path(sys.argv[1]), Path(sys.argv[2]))")
    for capability in lesser:
        path = tmp_path / f"{capability}.safetensors"
        done = subprocess.run(
            [sys.executable, "-c", script, str(inputs), str(path)], cwd=ROOT,
            capture_output=True, text=True, timeout=240, check=False,
            env=os.environ | {"ATEN_CPU_CAPABILITY": capability})
        assert done.returncode == 0, done.stderr[-3000:]
        theirs = load_file(str(path))
        assert theirs.keys() == own.keys()
        for name, tensor in own.items():
            assert torch.equal(theirs[name], tensor), (capability, name)
