"""LLMEngine: wiring of model, KV cache, scheduler, sampler and tokenizer. One `step` = one forward.

Single-threaded: call `add_request`, `abort` and `step` from one thread (the async front
does). LoRA plugs in through two optional objects: `lora` (attached to the model; prepared
with the step's token -> slot map before each forward) and `adapters` (the scheduler's
AdapterProvider). Without them, a request naming an adapter is refused, never served by the
base model.
"""

from __future__ import annotations

from typing import Any

import torch

from runtime.config import RuntimeConfig
from runtime.lora.protocol import AdapterProvider
from runtime.model.attention import build_metadata
from runtime.model.kv_cache import KVCache, bytes_per_block
from runtime.model.llama import LlamaModel
from runtime.model.sampler import make_generator, sample
from runtime.model.tokenizer import TextStream, Tokenizer
from runtime.model.weights import ModelArgs
from runtime.scheduling.scheduler import Scheduler
from runtime.scheduling.sequence import Sequence
from runtime.types import EngineRequest, FinishReason, RequestOutput

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QueueFull(Exception):  # noqa: N818 (reads as a condition: "the queue is full")
    """The waiting queue is at max_waiting; the caller should retry later (HTTP 503)."""


class LLMEngine:
    def __init__(
        self, config: RuntimeConfig, *, lora: Any = None, adapters: AdapterProvider | None = None
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        default = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = _DTYPES[config.dtype or default]
        args = ModelArgs.from_model_dir(config.model_dir)
        limits = [args.max_position_embeddings, config.max_model_len, args.sliding_window]
        # A sliding window is not implemented: capping the context at the window keeps
        # Mistral-style models exact (attention never reaches past it).
        self.max_model_len = min(x for x in limits if x)
        self.model = LlamaModel.load(
            config.model_dir, config.device, self.dtype, self.max_model_len
        )
        self.tokenizer = Tokenizer.load(config.model_dir)
        num_blocks = self._num_blocks(args)
        self.kv_cache = KVCache(args, num_blocks, config.block_size, self.dtype, self.device)
        self.max_model_len = min(self.max_model_len, num_blocks * config.block_size)
        eos = set(args.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        if lora is None and adapters is None and config.max_gpu_adapters > 0:
            from runtime.lora.manager import build_lora_runtime

            lora, adapters = build_lora_runtime(config, args, self.dtype)
        self.scheduler = Scheduler(
            num_blocks=num_blocks,
            block_size=config.block_size,
            max_running=config.max_running,
            max_batch_tokens=config.max_batch_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=tuple(sorted(eos)),
            max_adapter_wait_steps=config.max_adapter_wait_steps,
            adapters=adapters,
        )
        self.lora = lora
        self.adapters = adapters
        if lora is not None:
            self.model.set_lora(lora)
        self._streams: dict[str, TextStream] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._pending: list[RequestOutput] = []  # aborts to report at the next step
        self.num_generated_tokens = 0

    def _num_blocks(self, args: ModelArgs) -> int:
        cfg = self.config
        per_block = bytes_per_block(args, cfg.block_size, self.dtype)
        budget = cfg.kv_cache_bytes
        if budget is None and self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = int(free * cfg.gpu_memory_fraction)
        if budget is None:
            blocks_per_seq = -(-self.max_model_len // cfg.block_size)
            budget = min(cfg.max_running * blocks_per_seq * per_block, cfg.cpu_kv_cache_max_bytes)
        return max(budget // per_block, 0)

    # -- requests -----------------------------------------------------------------------

    def check_request(self, req: EngineRequest) -> None:
        """Raise ValueError when the request can never be served as asked (HTTP 400)."""
        if not req.prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(req.prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(req.prompt_token_ids)} tokens; this runtime's context "
                f"length is {self.max_model_len}"
            )
        vocab = self.model.args.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        req.sampling.validate(self.max_model_len)
        if req.adapter is not None:
            if self.adapters is None or self.lora is None:
                raise ValueError("this runtime serves no adapters")
            if req.adapter.rank > self.config.max_lora_rank:
                raise ValueError(f"adapter rank exceeds the max of {self.config.max_lora_rank}")

    def add_request(self, req: EngineRequest) -> None:
        self.check_request(req)
        if self.scheduler.num_waiting >= self.config.max_waiting:
            raise QueueFull("the waiting queue is full")
        self.scheduler.add(Sequence(req, arrival=0))
        self._streams[req.request_id] = TextStream(self.tokenizer, req.sampling.stop)
        self._generators[req.request_id] = make_generator(req.sampling.seed, self.device)
        prefetch = getattr(self.adapters, "prefetch", None)
        if req.adapter is not None and prefetch is not None:
            # Load while the running batch decodes, not after the request reaches the head.
            prefetch(req.adapter)

    def abort(self, request_id: str) -> None:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._pending.append(self._final(seq, "", None))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request in flight with an error (a step raised); the engine stays usable."""
        outputs, self._pending = self._pending, []
        for seq in self.scheduler.unfinished():
            self.scheduler.finish(seq, FinishReason.ERROR, message)
            outputs.append(self._final(seq, "", None))
        return outputs

    # -- one step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        scheduled, failed = self.scheduler.schedule()
        outputs += [self._final(seq, "", None) for seq in failed]
        if not scheduled:
            return outputs
        input_ids: list[int] = []
        positions: list[int] = []
        token_to_slot: list[int] = []
        for seq, n in scheduled:
            start = seq.num_cached_tokens
            input_ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            token_to_slot += [seq.slot] * n
        meta = build_metadata(
            [(seq.block_table, seq.num_cached_tokens, n) for seq, n in scheduled],
            self.config.block_size,
            self.device,
        )
        if self.lora is not None:
            # A host tensor: the manager decides "no adapter this step" without a device sync.
            self.lora.prepare(torch.tensor(token_to_slot, dtype=torch.int32))
        hidden = self.model.forward(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            meta,
            self.kv_cache,
        )
        ends, row = {}, 0
        for seq, n in scheduled:
            row += n
            ends[seq.request_id] = row - 1
        sampling = self.scheduler.advance(scheduled)
        if not sampling:
            return outputs
        rows = torch.tensor([ends[s.request_id] for s in sampling], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        tokens, logprobs = sample(
            logits,
            [s.sampling for s in sampling],
            [self._generators[s.request_id] for s in sampling],
        )
        self.scheduler.postprocess(list(zip(sampling, tokens, strict=True)))
        self.num_generated_tokens += len(tokens)
        for seq, token, lp in zip(sampling, tokens, logprobs, strict=True):
            stream = self._streams[seq.request_id]
            delta = stream.push(token)
            if stream.stopped and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP)
            if seq.is_finished:
                outputs.append(self._final(seq, delta, [token], lp))
            else:
                outputs.append(RequestOutput(
                    seq.request_id, [token], None if lp is None else [lp], delta,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_output_tokens=seq.num_output_tokens,
                ))
        return outputs

    def _final(self, seq: Sequence, delta: str, tokens: list[int] | None, lp=None) -> RequestOutput:
        stream = self._streams.pop(seq.request_id, None)
        self._generators.pop(seq.request_id, None)
        if stream is not None and seq.finish_reason is not FinishReason.ERROR:
            delta += stream.flush()
        return RequestOutput(
            seq.request_id,
            tokens or [],
            None if lp is None else [lp],
            delta,
            finished=True,
            finish_reason=seq.finish_reason,
            error=seq.error,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
        )

    def stats(self) -> dict[str, Any]:
        bm = self.scheduler.block_manager
        adapter_stats = getattr(self.adapters, "stats", None)
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": self.scheduler.num_waiting,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_total": bm.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            **({"adapters": adapter_stats()} if adapter_stats is not None else {}),
        }
