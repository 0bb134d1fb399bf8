"""One runtime process: load the engine, serve HTTP with uvicorn, register, drain on SIGTERM.

`serve()` is what `loragate runtime` calls. The order of a shutdown: the first SIGTERM or
SIGINT stops admitting (/generate and /health answer 503) and removes the registry key so
gateways stop picking this runtime; running streams finish (up to `DRAIN_TIMEOUT_S`, then they
are aborted); uvicorn stops; the engine shuts down; the process returns normally, so it exits
0. A second signal forces an immediate exit.

With `parent_pid` (what `loragate serve` passes its runtime child), the runtime also drains
and exits once that process is no longer its parent: a gateway killed with SIGKILL cannot
stop its child, and an orphaned runtime would hold the port, the memory and the device.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from runtime.config import RuntimeConfig
from runtime.http.app import RuntimeInfo, RuntimeState, create_runtime_app
from runtime.http.registry import RuntimeRegistry

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 300.0  # a long generation on a slow CPU; then what is left is aborted
PARENT_CHECK_INTERVAL_S = 1.0


def public_url_for(host: str, port: int) -> str:
    """The URL gateways use when none is given: a wildcard bind is not an address."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 (comparing, not binding)
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class _DrainingServer(uvicorn.Server):
    """uvicorn, except the first exit signal drains instead of closing the listener at once.

    uvicorn's own handler would stop accepting connections straight away (clients would see
    connection refused, not 503) and re-raise the signal after shutdown (exit status 143).
    """

    def __init__(self, config: uvicorn.Config, on_drain: Any) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._drain_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested or self._loop is None:
            logger.warning("second signal %s: exiting without draining", sig)
            self.should_exit = self.force_exit = True
            return
        self._drain_requested = True
        logger.info("signal %s: draining", signal.Signals(sig).name)
        # Runs in the signal handler, on the loop's thread between bytecodes: only schedule.
        self._loop.call_soon_threadsafe(self._on_drain)


@dataclass
class Loaded:
    """A loaded engine as the process needs it."""

    front: Any  # AsyncLLMEngine
    tokenizer: Any  # runtime.model.tokenizer.Tokenizer
    info: RuntimeInfo
    adapters: Any  # AdapterCache or None: its loader threads stop at shutdown


def build_front(config: RuntimeConfig) -> Loaded:
    """Load the engine with its LoRA layers and adapter cache (blocking) and describe it."""
    # Imported here: torch and the model load in the loading thread, while uvicorn already
    # answers /health with 503 "loading".
    from runtime.async_engine import AsyncLLMEngine
    from runtime.engine import build_engine

    engine = build_engine(config)
    limits = engine.limits
    info = RuntimeInfo(
        model=config.model_dir.resolve().name,
        device=str(config.device),
        max_model_len=limits.max_model_len,
        vocab_size=limits.vocab_size,
        max_running=config.max_running,
        max_waiting=config.max_waiting,
        max_gpu_adapters=config.max_gpu_adapters if limits.serves_adapters else 0,
        max_lora_rank=limits.max_lora_rank,
        store=limits.store,
    )
    # The app checks every request against info.limits (== engine.limits) as it decodes it.
    front = AsyncLLMEngine(engine, requests_checked=True, num_threads=config.num_threads)
    return Loaded(front, engine.tokenizer, info, engine.adapters)


def _load_single_threaded(config: RuntimeConfig) -> Loaded:
    """build_front on a helper thread that keeps to one torch thread: the engine thread owns
    the runtime's thread pool (runtime/model/threads.py says why)."""
    from runtime.model.threads import single_threaded

    single_threaded()
    return build_front(config)


class RuntimeProcess:
    """The async side of `serve()`: the pieces whose lifetimes it orders."""

    def __init__(
        self, config: RuntimeConfig, host: str, port: int, redis_url: str | None, url: str,
        parent_pid: int | None = None, token: str | None = None,
    ) -> None:
        self.config, self.redis_url, self.url = config, redis_url, url
        self.parent_pid = parent_pid
        self.state = RuntimeState()
        self.registry: RuntimeRegistry | None = None
        self.load_error: BaseException | None = None
        self.loaded: Loaded | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        app = create_runtime_app(
            state=self.state, on_startup=[self._start_loading], on_shutdown=[self._shutdown],
            token=token,
        )
        uv_config = uvicorn.Config(
            app, host=host, port=port, log_level="info", access_log=False, lifespan="on",
            timeout_graceful_shutdown=30,
        )  # fmt: skip
        self.server = _DrainingServer(uv_config, self._request_drain)

    async def run(self) -> None:
        await self.server.serve()
        if self.load_error is not None:
            raise RuntimeError(f"the runtime failed to start: {self.load_error}") from (
                self.load_error
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_loading(self) -> None:
        # Loading runs while uvicorn already answers: /health says 503 "loading" meanwhile.
        self._spawn(self._load())
        if self.parent_pid is not None:
            self._spawn(self._watch_parent(self.parent_pid))

    async def _watch_parent(self, parent_pid: int) -> None:
        # Polling getppid: an orphan is re-parented (to init or a subreaper), and Linux's
        # PR_SET_PDEATHSIG would need the parent to set it up in an unsafe pre-exec hook.
        while os.getppid() == parent_pid:  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(PARENT_CHECK_INTERVAL_S)
        if not self.state.draining:
            logger.warning("parent process %d is gone: draining and exiting", parent_pid)
            self._request_drain()

    async def _load(self) -> None:
        try:
            self.loaded = await asyncio.to_thread(_load_single_threaded, self.config)
            info = self.loaded.info
            await self.loaded.front.start()
            self.state.attach(self.loaded.front, self.loaded.tokenizer, info)
            if self.redis_url:
                self.registry = RuntimeRegistry(self.redis_url, {
                    "url": self.url, "device": info.device, "model": info.model,
                    "max_running": info.max_running, "max_gpu_adapters": info.max_gpu_adapters,
                })  # fmt: skip
                await self.registry.start()
            logger.info("runtime ready at %s (model %s on %s)", self.url, info.model, info.device)
        except Exception as exc:
            logger.exception("runtime failed to start")
            self.load_error = exc
            self.server.should_exit = True

    def _request_drain(self) -> None:
        self.state.draining = True
        self._spawn(self._drain())

    async def _drain(self) -> None:
        if self.registry is not None:
            await self.registry.stop()
        try:
            await asyncio.wait_for(self.state.wait_idle(), timeout=DRAIN_TIMEOUT_S)
        except TimeoutError:
            logger.warning("drain timed out; aborting %d requests", len(self.state.streams))
            if self.state.front is not None:
                for request_id in list(self.state.streams):
                    self.state.front.abort(request_id)
        logger.info("drained; stopping")
        self.server.should_exit = True

    async def _shutdown(self) -> None:
        self.state.draining = True
        for task in list(self._tasks):
            task.cancel()
        if self.registry is not None:
            await self.registry.stop()
        if self.state.front is not None:
            await self.state.front.shutdown(drain=False)
        if self.loaded is not None and self.loaded.adapters is not None:
            self.loaded.adapters.close()



def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """ValueError for a non-loopback bind without a token (API.md "Runtimes"): anyone who can
    reach the port could otherwise run any tenant's adapters, or any artifact of the store."""
    if not token and not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host!r} without LORAGATE_RUNTIME_TOKEN: a runtime reachable "
            "from other machines answers only its gateways' token"
        )


def serve(
    config: RuntimeConfig,
    host: str,
    port: int,
    redis_url: str | None,
    public_url: str | None = None,
    parent_pid: int | None = None,
    token: str | None = None,
) -> None:
    """Run one runtime until SIGTERM/SIGINT (blocking), in the order this module's docstring says.

    `public_url` is what the registry advertises (default: http://host:port); with
    `parent_pid` the runtime drains and exits once that process is no longer its parent;
    `token`: the bearer token every route but /health requires.
    Raises ValueError for a non-loopback `host` without a token, RuntimeError when the engine
    or the registry fails to start.
    """
    check_bind(host, token)
    url = public_url or public_url_for(host, port)
    process = RuntimeProcess(config, host, port, redis_url, url, parent_pid, token)
    asyncio.run(process.run())
