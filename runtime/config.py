"""Settings of one runtime process. Plain data; the gateway fills it, nothing reads env."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class RuntimeConfig:
    model_dir: Path
    device: str = "cpu"  # "cpu", "cuda", "cuda:N"
    # None: float32 on CPU, bfloat16 on CUDA; else "float32", "bfloat16" or "float16".
    dtype: str | None = None

    # Batching. A step runs at most max_running sequences and max_batch_tokens new tokens.
    max_running: int = 64
    max_batch_tokens: int = 2048
    max_waiting: int = 1024  # beyond this, add_request refuses (the server answers 503)
    max_model_len: int | None = None  # None: the model's max_position_embeddings

    # Paged KV cache. kv_cache_bytes wins when set; else on CUDA a fraction of the memory
    # left after loading the weights, on CPU enough for max_running full-length sequences
    # capped at cpu_kv_cache_max_bytes.
    block_size: int = 16
    kv_cache_bytes: int | None = None
    gpu_memory_fraction: float = 0.8
    cpu_kv_cache_max_bytes: int = 1 << 30
    # "auto": on CPU, attention reads the block tables through the C++ kernel
    # (runtime/model/paged_attention_cpu.py), or gathers when it cannot build; "gather":
    # always gather each context and run SDPA (the CUDA path; the A/B and oracle tests).
    attention: str = "auto"
    # "auto": on CPU, projections run over weights packed once at load: float32 through our
    # kernel where the CPU has AVX2 and FMA (runtime/model/gemm_cpu.py), else oneDNN;
    # bfloat16 through oneDNN where the CPU has its bf16 GEMM, else ours; "native" /
    # "onednn": that one (the engine refuses where it cannot run); "torch": F.linear (MKL on
    # CPU), the CUDA path everywhere (runtime/model/linear.py).
    gemm: str = "auto"
    # "auto": on CPU (float32, or bf16 with float32 attention), each layer's norms (with the
    # residual add), rotary with the KV write, and silu(gate) * up run as fused C++ calls
    # (runtime/model/fused_cpu.py), or torch ops when it cannot build; "torch": torch ops
    # always (the CUDA path; the A/B and oracle tests).
    layer_ops: str = "auto"
    # The engine thread's intra-op (OpenMP) threads; None: torch's default (the cores it
    # sees). On a host whose cores other work shares, fewer threads than cores keeps a team
    # from spinning against that work (bench/README.md measured 2 threads on 2 busy cores
    # at a tenth of their quiet speed).
    num_threads: int | None = None

    # Reuse the K/V of prompt blocks an earlier request of the same tenant and adapter
    # version computed (scheduling/prefix_hashes.py). Off: every prompt prefills in full.
    enable_prefix_caching: bool = True

    # A waiting request whose adapter is still loading lets others pass it for at most this
    # many steps; then it blocks admission behind it until its adapter is resident.
    max_adapter_wait_steps: int = 64

    # Adapters (used by the adapter cache and LoRA layers).
    max_gpu_adapters: int = 8
    max_host_adapters: int = 64
    adapter_disk_dir: Path | None = None
    adapter_disk_bytes: int = 4 << 30
    max_lora_rank: int = 64

    # Artifact store passthrough; boto3 reads AWS credentials from its usual sources.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # The store adapters may come from: artifacts under `artifacts_dir`, objects in
    # `s3_bucket` under `s3_prefix`. Any other URI is refused before it is opened. With
    # neither set the engine is unconfined (embedded use, tests); `loragate runtime` always
    # sets one.
    artifacts_dir: Path | None = None
    s3_bucket: str | None = None
    s3_prefix: str = ""

    @property
    def confined(self) -> bool:
        return self.artifacts_dir is not None or self.s3_bucket is not None

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if self.artifacts_dir is not None:
            self.artifacts_dir = Path(self.artifacts_dir)
        if self.max_running < 1 or self.max_batch_tokens < 1 or self.block_size < 1:
            raise ValueError("max_running, max_batch_tokens and block_size must be positive")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must not be negative")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")
        if self.attention not in ("auto", "gather"):
            raise ValueError(f"attention must be 'auto' or 'gather', not {self.attention!r}")
        if self.num_threads is not None and not 1 <= self.num_threads <= 1024:
            raise ValueError("num_threads must be in 1..1024")
        if self.gemm not in ("auto", "native", "onednn", "torch"):
            raise ValueError("gemm must be 'auto', 'native', 'onednn' or 'torch', "
                             f"not {self.gemm!r}")
        if self.layer_ops not in ("auto", "torch"):
            raise ValueError(f"layer_ops must be 'auto' or 'torch', not {self.layer_ops!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")
