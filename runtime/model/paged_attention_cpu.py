"""The CPU paged-attention op: `csrc/paged_attention.cpp`, built at first use.

`load()` compiles the C++ source with torch's extension builder (g++ and ninja) into
`.cache/torch_extensions/` of the repository (torch's default cache dir when the package is
installed elsewhere) and registers `torch.ops.loragate.paged_attention`; later processes
reuse the build. When the build cannot happen (no compiler, no ninja, a read-only tree) it
logs why, once, and answers None: callers keep the gather path (`attention.py`).
`supports(...)` says whether a model's shapes fit the kernel.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sysconfig
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
_ROOT = Path(__file__).resolve().parents[2]
# Mirrors the kernel's own checks (paged_attention.cpp): beyond these, the gather path.
_LANES, _MAX_GROUP, _MAX_HEAD_DIM = 16, 16, 256

PagedAttentionOp = Callable[..., None]


def supports(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    return (dtype == torch.float32 and num_kv_heads > 0 and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= _MAX_GROUP and head_dim % _LANES == 0
            and head_dim <= _MAX_HEAD_DIM)


def _flags() -> tuple[str, list[str]]:
    """A build name and compiler flags for this CPU, from torch's own probe of it: AVX-512
    (the F, BW, VL and DQ subsets torch requires for "AVX512"), AVX2 + FMA, or plain x86-64.
    The name differs per variant, so that a build made on one machine kind is never loaded
    where its instructions do not exist. ATEN_CPU_CAPABILITY=avx2 (or default) lowers what
    torch reports, and so the variant built here."""
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    base = ["-O3", "-fno-trapping-math"]
    if capability == "AVX512":
        return "avx512", [*base, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                          "-mavx2", "-mfma"]
    if capability == "AVX2":
        return "avx2", [*base, "-mavx2", "-mfma"]
    return "default", base


_load_lock = threading.Lock()


@functools.cache
def load() -> PagedAttentionOp | None:
    """The op, built on the first call of the process; None (logged once, with why) when it
    cannot be built or loaded. Engines built on two threads at once build it once."""
    with _load_lock:
        return _build()


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's builder runs `ninja` from PATH. The PyPI `ninja` (a dependency) lands in the
    interpreter's scripts folder, which is not on PATH when a venv's python runs directly:
    add it for the build, when PATH has no ninja of its own."""
    scripts = sysconfig.get_path("scripts")
    before = os.environ.get("PATH", "")
    if shutil.which("ninja") is None and (Path(scripts) / "ninja").exists():
        os.environ["PATH"] = scripts + os.pathsep + before
    try:
        yield
    finally:
        os.environ["PATH"] = before


def _build() -> PagedAttentionOp | None:
    try:
        from torch.utils import cpp_extension

        suffix, flags = _flags()
        name = f"loragate_paged_attention_{suffix}"
        build_dir: str | None = None
        if (_ROOT / "pyproject.toml").exists():  # a checkout: its ignored .cache/
            path = _ROOT / ".cache" / "torch_extensions" / name
            path.mkdir(parents=True, exist_ok=True)
            build_dir = str(path)
        with _ninja_on_path():
            cpp_extension.load(
                name=name, sources=[str(_SOURCE)], extra_cflags=flags,
                build_directory=build_dir, is_python_module=False, verbose=False,
            )
        op: PagedAttentionOp = torch.ops.loragate.paged_attention
        return op
    except Exception as exc:  # any failure means "no kernel here", never a crash
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        _log.warning("CPU paged attention kernel unavailable, using the gather path: %s", why)
        return None


def paged_attention_cpu(
    op: PagedAttentionOp,
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim] float32
    k_pool: torch.Tensor,  # [pool_rows, num_kv_heads, head_dim] float32 (this layer)
    v_pool: torch.Tensor,  # [pool_rows, num_kv_heads, head_dim] float32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    rows: torch.Tensor,  # [num_queries] int32 rows of q (and of out) to attend for
    seqs: torch.Tensor,  # [num_queries] int32 row of block_tables of each query
    lens: torch.Tensor,  # [num_queries] int32 context each query sees (itself included)
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim] float32, written at `rows`
    block_size: int,
    scale: float,
) -> None:
    op(q.contiguous(), k_pool, v_pool, block_tables, rows, seqs, lens, out, block_size, scale)
