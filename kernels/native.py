"""The builder of this repository's C++ CPU extensions, compiled at first use.

`load_library(name, sources)` compiles the sources with torch's extension builder (g++ and
ninja) into `.cache/torch_extensions/<name>_<variant>` of the checkout (torch's default cache
dir when the package is installed elsewhere) and loads the library, whose TORCH_LIBRARY
blocks register its ops under `torch.ops`; later processes reuse the build. When the build
cannot happen (no compiler, no ninja, a read-only tree) it logs why and answers False,
never raising: each caller keeps a torch path for that case. Callers keep the answer (one
`functools.cache`d loader each), so a process tries, and warns, once per library.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sysconfig
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

_log = logging.getLogger(__name__)
_ROOT = Path(__file__).resolve().parents[1]
# Headers every library may include: omp_parallel.h (why not at::parallel_for).
_HEADERS = Path(__file__).resolve().with_name("csrc")
# One build at a time: two engines built on two threads must not run ninja in one folder.
_build_lock = threading.Lock()


def variant() -> tuple[str, list[str]]:
    """A build name suffix and compiler flags for this CPU, from torch's own probe of it:
    AVX-512 (the F, BW, VL and DQ subsets torch requires for "AVX512"), AVX2 + FMA, or plain
    x86-64. The name differs per variant, so that a build made on one machine kind is never
    loaded where its instructions do not exist. ATEN_CPU_CAPABILITY=avx2 (or default) lowers
    what torch reports, and so the variant built here."""
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    base = ["-O3", "-fno-trapping-math"]
    if capability == "AVX512":
        return "avx512", [*base, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                          "-mavx2", "-mfma"]
    if capability == "AVX2":
        return "avx2", [*base, "-mavx2", "-mfma"]
    return "default", base


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


def openmp_flags() -> list[str]:
    """What csrc/omp_parallel.h needs to run on torch's intra-op pool (an OpenMP team):
    without -fopenmp its `#pragma omp parallel` compiles to a plain serial call, as
    at::parallel_for's does. Linking -fopenmp names libgomp.so.1, the soname of the libgomp torch
    ships and has loaded already, so the process keeps one OpenMP runtime (one pool, sized by
    torch.set_num_threads). Torch's own thread pool (ParallelNative) needs nothing."""
    with_openmp: bool = torch.backends.openmp.is_available()  # type: ignore[no-untyped-call]
    return ["-fopenmp"] if with_openmp else []


def load_library(name: str, sources: Sequence[Path], *, fallback: str = "using the torch path",
                 openmp: bool = True, extra_cflags: Sequence[str] = ()) -> bool:
    """Build (or reuse the build of) `sources` as `<name>_<variant>` and load it: True when
    its ops are registered; False, with a warning naming `fallback`, when it cannot be.
    `openmp=False` builds at::parallel_for as a serial loop (see `openmp_flags`);
    `extra_cflags` come after the variant's (e.g. -ffp-contract=off)."""
    try:
        from torch.utils import cpp_extension

        suffix, flags = variant()
        parallel = openmp_flags() if openmp else []
        full_name = f"{name}_{suffix}"
        build_dir: str | None = None
        with _build_lock:
            if (_ROOT / "pyproject.toml").exists():  # a checkout: its ignored .cache/
                path = _ROOT / ".cache" / "torch_extensions" / full_name
                path.mkdir(parents=True, exist_ok=True)
                build_dir = str(path)
            with _ninja_on_path():
                cpp_extension.load(
                    name=full_name, sources=[str(s) for s in sources],
                    extra_cflags=[*flags, *parallel, *extra_cflags], extra_ldflags=parallel,
                    extra_include_paths=[str(_HEADERS)],
                    build_directory=build_dir, is_python_module=False, verbose=False,
                )
        return True
    except Exception as exc:  # any failure means "no native op here", never a crash
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        _log.warning("C++ extension %s unavailable, %s: %s", name, fallback, why)
        return False
