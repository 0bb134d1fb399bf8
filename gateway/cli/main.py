"""The `loragate` command: serve, runtime, migrate, admin, bench (API.md "Command line")."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.settings import Settings, SettingsError

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loragate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="gateway, plus one runtime unless --runtimes")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--base-model", type=Path, help="Hugging Face model directory")
    serve.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    serve.add_argument("--runtimes", help="comma-separated runtime URLs; dns+http://NAME:PORT "
                       "for every address behind a DNS name")

    runtime = sub.add_parser("runtime", help="one inference runtime")
    runtime.add_argument("--base-model", type=Path, required=True)
    runtime.add_argument("--host", default="127.0.0.1")
    runtime.add_argument("--port", type=int, default=8100)
    runtime.add_argument("--device")
    runtime.add_argument("--max-gpu-adapters", type=int)
    runtime.add_argument("--max-host-adapters", type=int)
    runtime.add_argument("--max-batch-tokens", type=int)
    runtime.add_argument("--max-running", type=int)
    runtime.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                         help="weights and LoRA (default: float32 on CPU, exact; bfloat16 on "
                              "CUDA); on CPU attention and the KV cache stay float32")
    runtime.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction,
                         help="reuse the KV blocks of a prompt's start that an earlier request "
                              "of the same tenant and adapter version computed (default: on)")
    runtime.add_argument("--threads", type=int,
                         help="torch threads of the engine (default: torch's, the cores it "
                              "sees); fewer than the cores where other work shares them")
    runtime.add_argument("--gemm", choices=("auto", "native", "onednn", "torch"),
                         help="CPU projections over weights packed at load: auto (the "
                              "default: our kernel on AVX2 CPUs, else oneDNN), native, onednn; "
                              "or torch's F.linear")
    runtime.add_argument("--layer-ops", choices=("auto", "torch"),
                         help="CPU norms, rotary, KV writes and silu: fused C++ calls "
                              "(auto, the default) or torch ops")
    runtime.add_argument("--public-url", help="URL gateways use for this runtime (registry)")
    runtime.add_argument("--artifacts-dir", type=Path,
                         help="the local artifact store adapters may come from "
                              "(default: DATA_DIR/artifacts)")
    runtime.add_argument("--parent-pid", type=int,
                         help="drain and exit once this process is no longer the parent "
                              "(set by `serve` for the runtime it starts)")

    migrate = sub.add_parser("migrate", help="alembic on LORAGATE_DATABASE_URL")
    migrate.add_argument("action", nargs="?", default="upgrade",
                         choices=["upgrade", "downgrade", "current"])
    migrate.add_argument("revision", nargs="?", help="target of upgrade/downgrade")
    migrate.add_argument("--data-dir", type=Path)

    _admin_parser(sub.add_parser("admin", help="call the admin API"))

    bench = sub.add_parser("bench", help="benchmarks (bench/README.md)")
    bench.add_argument("name", help="a script of bench/, without .py")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _admin_parser(admin: argparse.ArgumentParser) -> None:
    admin.add_argument("--url", help="gateway URL (default http://LORAGATE_HOST:LORAGATE_PORT)")
    sub = admin.add_subparsers(dest="admin_command", required=True)
    p = sub.add_parser("tenant-create")
    p.add_argument("name")
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens per minute")
    sub.add_parser("tenant-list")
    p = sub.add_parser("tenant-update", help="change a tenant's limits (PATCH)")
    p.add_argument("name")
    p.add_argument("--rpm", help="requests per minute, or 'none' for no limit")
    p.add_argument("--tpm", help="tokens per minute, or 'none' for no limit")
    p = sub.add_parser("tenant-delete", help="a tenant with its keys, adapters and experiments")
    p.add_argument("name")
    p = sub.add_parser("key-create")
    p.add_argument("tenant")
    p.add_argument("--name", default="default")
    p.add_argument("--expires-at", help="RFC 3339 date-time with an offset")
    p = sub.add_parser("key-list", help="a tenant's keys (never their secrets)")
    p.add_argument("tenant")
    p = sub.add_parser("key-revoke")
    p.add_argument("key_id")
    p = sub.add_parser("upload")
    p.add_argument("tenant")
    p.add_argument("adapter")
    p.add_argument("dir", help="directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--activate", action="store_true")
    p = sub.add_parser("list")
    p.add_argument("tenant")
    p = sub.add_parser("activate")
    p.add_argument("tenant")
    p.add_argument("adapter")
    p.add_argument("version", type=int)
    p = sub.add_parser("adapter-delete", help="an adapter with every version")
    p.add_argument("tenant")
    p.add_argument("adapter")
    p = sub.add_parser("experiment-list")
    p.add_argument("tenant")
    for command in ("experiment-get", "experiment-delete"):
        p = sub.add_parser(command)
        p.add_argument("tenant")
        p.add_argument("name")
    _rollout_parser(sub.add_parser("rollout", help="progressive delivery of a version"))


def _rollout_parser(rollout: argparse.ArgumentParser) -> None:
    sub = rollout.add_subparsers(dest="rollout_command", required=True)
    p = sub.add_parser("start", help="canary VERSION against the active version, in stages")
    p.add_argument("tenant")
    p.add_argument("adapter")
    p.add_argument("version", type=int)
    p.add_argument("--stages", help="candidate percentages, e.g. 5,25,50,100")
    p.add_argument("--stage-seconds", type=float)
    p.add_argument("--min-requests", type=int, help="per arm and stage")
    p.add_argument("--max-error-rate", type=float, help="above the stable arm's")
    p.add_argument("--max-latency-p95-ratio", type=float)
    p.add_argument("--min-score-delta", type=float, help="candidate mean - stable mean")
    p = sub.add_parser("status", help="the stages, both arms' figures and the history")
    p.add_argument("tenant")
    p.add_argument("adapter")
    p.add_argument("--json", action="store_true", help="the API's answer as it is")
    p = sub.add_parser("abort", help="all traffic back to the active version")
    p.add_argument("tenant")
    p.add_argument("adapter")


# Loggers held above the configured level whatever it is, and why.
LOGGER_FLOORS = {
    # Alembic announces each of its plugins at INFO on every start; keep its real news only.
    "alembic.runtime.plugins": logging.WARNING,
    # httpx logs every outbound call at INFO, readiness probes included.
    "httpx": logging.WARNING,
    # aiosqlite's DEBUG lines repr every SQL call with its parameters: API key prefixes and
    # secret hashes went to the log at LORAGATE_LOG_LEVEL=DEBUG (tests/security).
    "aiosqlite": logging.INFO,
}


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name, level in LOGGER_FLOORS.items():
        logging.getLogger(name).setLevel(level)


def _runtime(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.config import RuntimeConfig
    from runtime.http.process import serve as serve_runtime

    device = args.device or settings.device or _default_device()
    optional = {
        "max_gpu_adapters": args.max_gpu_adapters,
        "max_host_adapters": args.max_host_adapters,
        "max_batch_tokens": args.max_batch_tokens,
        "max_running": args.max_running,
        "dtype": args.dtype,
        "enable_prefix_caching": args.prefix_caching,
        "num_threads": args.threads,
        "gemm": args.gemm,
        "layer_ops": args.layer_ops,
    }
    config = RuntimeConfig(
        model_dir=args.base_model,
        device=device,
        max_lora_rank=settings.max_lora_rank,
        s3_endpoint_url=settings.s3_endpoint_url,
        # The runtime opens artifacts only in the store the gateways write: this folder, and
        # the bucket and prefix when the store is S3 (API.md "Runtimes").
        artifacts_dir=(args.artifacts_dir or settings.artifacts_dir).resolve(),
        s3_bucket=settings.s3_bucket,
        s3_prefix=settings.s3_prefix,
        **{k: v for k, v in optional.items() if v is not None},
    )
    try:
        serve_runtime(config, args.host, args.port, settings.redis_url,
                      public_url=args.public_url, parent_pid=args.parent_pid,
                      token=settings.runtime_token)
    except ValueError as exc:  # a bind the runtime refuses (no token off loopback)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from adapters import db

    if args.action == "current":
        print(db.current_revision(settings.database_url) or "(empty database)")
        return 0
    if args.action == "downgrade" and not args.revision:
        raise SystemExit("loragate migrate downgrade needs a revision (e.g. base or -1)")
    db.run_migrations(settings.database_url, args.action, args.revision or "head")
    return 0


def _bench(args: argparse.Namespace) -> int:
    # Only scripts that exist in bench/ by that exact name: no path from the command line.
    scripts = {p.stem for p in BENCH_DIR.glob("*.py") if not p.name.startswith("_")}
    if args.name not in scripts:
        available = ", ".join(sorted(scripts)) or "none"
        raise SystemExit(f"no benchmark {args.name!r}; available: {available}")
    command = [sys.executable, "-m", f"bench.{args.name}", *args.args]
    return subprocess.call(command, cwd=BENCH_DIR.parent)  # noqa: S603 (fixed interpreter and script)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.command == "serve":
        overrides = {"host": args.host, "port": args.port, "data_dir": args.data_dir,
                     "base_model_dir": args.base_model, "device": args.device,
                     "runtimes": args.runtimes}
    elif args.command == "migrate":
        overrides = {"data_dir": args.data_dir}
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "admin":
        from gateway.cli import admin_client

        url = args.url or f"http://{settings.host}:{settings.port}"
        return admin_client.run(args, url, settings.admin_token)
    if args.command == "bench":
        return _bench(args)
    _configure_logging(settings)
    if args.command == "serve":
        from gateway.cli.serve import serve

        return serve(settings)
    if args.command == "runtime":
        return _runtime(args, settings)
    return _migrate(args, settings)
