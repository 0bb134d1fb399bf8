"""LLMEngine: wiring of model, KV cache, scheduler, sampler and tokenizer. One `step` = one forward.

Single-threaded: call `add_request`, `abort` and `step` from one thread (the async front
does). LoRA plugs in through two optional objects, built by the caller: `lora` (attached to
the model; prepared with the step's token -> slot map before each forward) and `adapters`
(the scheduler's AdapterProvider). Without them, a request naming an adapter is refused,
never served by the base model. `build_engine(config)` builds both from the config, as the
runtime process serves it.
"""

from __future__ import annotations

from typing import Any

import torch

from runtime.config import RuntimeConfig
from runtime.lora.manager import artifact_scope, build_lora_runtime
from runtime.lora.protocol import AdapterProvider
from runtime.model import fused_cpu
from runtime.model.attention import build_metadata, use_paged_kernel
from runtime.model.grammar import Grammars
from runtime.model.kv_cache import KVCache, bytes_per_block
from runtime.model.linear import gemm_backend
from runtime.model.llama import LlamaModel
from runtime.model.sampler import Batch, SamplerState, make_generator, sample
from runtime.model.tokenizer import TextStream, Tokenizer
from runtime.model.weights import ModelArgs
from runtime.protocol import RequestLimits
from runtime.scheduling.scheduler import Scheduler
from runtime.scheduling.sequence import Sequence, SequenceStatus
from runtime.types import EngineRequest, FinishReason, QueueFull, RequestOutput, choice_seed

__all__ = ["LLMEngine", "QueueFull", "attention_dtype", "build_engine", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(config: RuntimeConfig) -> torch.dtype:
    """The configured dtype; by default float32 on CPU (exact) and bfloat16 on CUDA."""
    default = "bfloat16" if torch.device(config.device).type == "cuda" else "float32"
    return _DTYPES[config.dtype or default]


def attention_dtype(config: RuntimeConfig) -> torch.dtype:
    """Of rotary, attention and the KV cache: float32 on CPU whatever the weights' dtype.

    bf16 pays on the CPU in the GEMMs (oneDNN's avx512_bf16 path, ~2.5x float32); attention
    is a small share of the step there, and float32 scores and cache keep greedy text close
    to float32's. On CUDA the weights' dtype, as the fused SDPA kernels want."""
    return resolve_dtype(config) if torch.device(config.device).type == "cuda" else torch.float32


def build_engine(config: RuntimeConfig) -> LLMEngine:
    """The engine as `loragate runtime` serves it: with its LoRA runtime unless the config
    asks for no device slots. The base model's config.json is parsed once, here."""
    args = ModelArgs.from_model_dir(config.model_dir)
    lora = adapters = None
    if config.max_gpu_adapters > 0:
        lora, adapters = build_lora_runtime(config, args, resolve_dtype(config))
    return LLMEngine(config, args=args, lora=lora, adapters=adapters)


class LLMEngine:
    def __init__(
        self,
        config: RuntimeConfig,
        *,
        args: ModelArgs | None = None,
        lora: Any = None,
        adapters: AdapterProvider | None = None,
    ) -> None:
        """`args`: the base model's parsed config.json (parsed here when not given)."""
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config)
        args = args or ModelArgs.from_model_dir(config.model_dir)
        limits = [args.max_position_embeddings, config.max_model_len, args.sliding_window]
        # A sliding window is not implemented: capping the context at the window keeps
        # Mistral-style models exact (attention never reaches past it).
        self.max_model_len = min(x for x in limits if x)
        self.kv_dtype = attention_dtype(config)
        self.model = LlamaModel.load(
            config.model_dir, config.device, self.dtype, self.max_model_len, args=args,
            attn_dtype=self.kv_dtype,
            gemm=gemm_backend(config.gemm, self.device, self.dtype),
            fused_ops=config.layer_ops == "auto" and fused_cpu.usable(self.device, self.dtype,
                                                                      self.kv_dtype),
        )
        self.tokenizer = Tokenizer.load(config.model_dir)
        num_blocks = self._num_blocks(args)
        self.kv_cache = KVCache(args, num_blocks, config.block_size, self.kv_dtype, self.device)
        self.paged_kernel = use_paged_kernel(config.attention, self.device, self.kv_dtype,
                                             args.num_heads, args.num_kv_heads, args.head_dim)
        self.max_model_len = min(self.max_model_len, num_blocks * config.block_size)
        eos = set(args.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.scheduler = Scheduler(
            num_blocks=num_blocks,
            block_size=config.block_size,
            max_running=config.max_running,
            max_batch_tokens=config.max_batch_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=tuple(sorted(eos)),
            max_adapter_wait_steps=config.max_adapter_wait_steps,
            adapters=adapters,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.lora = lora
        self.adapters = adapters
        self.limits = RequestLimits(
            max_model_len=self.max_model_len,
            vocab_size=args.vocab_size,
            max_lora_rank=config.max_lora_rank,
            serves_adapters=lora is not None and adapters is not None,
            store=artifact_scope(config),
        )
        if lora is not None:
            self.model.set_lora(lora)
        self._streams: dict[str, TextStream] = {}
        self._generators: dict[str, torch.Generator] = {}
        self.sampler_state = SamplerState(args.vocab_size, self.device, config.max_running)
        self.grammars = Grammars(self.tokenizer.hf, args.vocab_size, self.device)
        self._choices: dict[str, list[Sequence]] = {}  # request id -> its choices, n > 1 only
        # choice 0's key -> (choice 0, the choices still to fork from it)
        self._unforked: dict[str, tuple[Sequence, list[Sequence]]] = {}
        self._pending: list[RequestOutput] = []  # aborts to report at the next step
        self.num_generated_tokens = 0

    def _num_blocks(self, args: ModelArgs) -> int:
        cfg = self.config
        per_block = bytes_per_block(args, cfg.block_size, self.kv_dtype)
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
        """Raise ValueError (runtime.protocol.ProtocolError: HTTP 400) when the request can
        never be served as asked. Pure: safe to call from any thread."""
        self.limits.check(req)

    def add_request(self, req: EngineRequest, *, checked: bool = False) -> None:
        """Queue `req`; `checked`: the caller already ran `check_request` (or the same check
        against `self.limits`), so it is not run a second time."""
        if not checked:
            self.check_request(req)
        if self.scheduler.num_waiting >= self.config.max_waiting:
            raise QueueFull("the waiting queue is full")
        choices = [Sequence(req, arrival=0, index=i) for i in range(req.sampling.n)]
        for seq in choices:
            self.grammars.add(seq.request_id, req.sampling)
            self._streams[seq.request_id] = TextStream(self.tokenizer, req.sampling.stop)
            seed = choice_seed(req.sampling.seed, seq.index)
            self._generators[seq.request_id] = make_generator(seed, self.device)
        first = choices[0]
        self.scheduler.add(first)
        self.sampler_state.add(first.request_id, req.sampling, req.prompt_token_ids,
                               self.eos_token_ids)
        if len(choices) > 1:
            # The prompt is prefilled once, by choice 0; the others fork from it (step).
            first.num_forks = len(choices) - 1
            self._choices[req.request_id] = choices
            self._unforked[first.request_id] = (first, choices[1:])
        prefetch = getattr(self.adapters, "prefetch", None)
        if req.adapter is not None and prefetch is not None:
            # Load while the running batch decodes, not after the request reaches the head.
            prefetch(req.adapter)

    def abort(self, request_id: str) -> None:
        lone = self.scheduler.get(request_id)
        for seq in self._choices.get(request_id) or ([lone] if lone is not None else []):
            if seq.is_finished:
                continue
            if self.scheduler.get(seq.request_id) is not None:
                self.scheduler.abort(seq.request_id)
            else:  # a choice not forked yet: it never reached the scheduler
                self._end_unscheduled(seq, FinishReason.ABORT)
            self._pending.append(self._final(seq, "", None))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or bool(self._unforked)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request in flight with an error (a step raised); the engine stays usable."""
        outputs, self._pending = self._pending, []
        for seq in self.scheduler.unfinished():
            self.scheduler.finish(seq, FinishReason.ERROR, message)
            outputs.append(self._final(seq, "", None))
        return outputs + self._pending_orphans()

    @staticmethod
    def _end_unscheduled(seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error

    def _pending_orphans(self) -> list[RequestOutput]:
        """End the unforked choices of parents that ended before forking (abort, error)."""
        outputs = []
        for key in [k for k in self._unforked if self.scheduler.get(k) is None]:
            parent, children = self._unforked.pop(key)
            for seq in children:
                if not seq.is_finished:
                    self._end_unscheduled(seq, parent.finish_reason or FinishReason.ABORT,
                                          parent.error)
                    outputs.append(self._final(seq, "", None))
        return outputs

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Choice 0 has its prompt cached: the other choices start from its KV blocks (copy
        on write); those that get no block or slot now are queued to prefill on their own.
        Returns the forked ones, which sample their first token from the parent's logits."""
        forked = []
        for child in self._unforked.pop(parent.request_id)[1]:
            copies = self.scheduler.fork(parent, child)
            if copies is None:
                self.scheduler.add(child)
                self.sampler_state.add(child.request_id, child.sampling,
                                       child.token_ids, self.eos_token_ids)
                continue
            self.kv_cache.copy_blocks(copies)
            self.sampler_state.fork(parent.request_id, child.request_id)
            forked.append(child)
        parent.num_forks = 0
        return forked

    # -- one step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        scheduled, failed = self.scheduler.schedule()
        outputs += [self._final(seq, "", None) for seq in failed]
        if self._unforked:
            outputs += self._pending_orphans()
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
            paged=self.paged_kernel,
        )
        if self.lora is not None:
            # The host list: the manager decides "no adapter this step" without a device sync.
            self.lora.prepare(token_to_slot)
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
        if self._unforked:
            for seq in [s for s in sampling if s.request_id in self._unforked]:
                for child in self._fork(seq):
                    ends[child.request_id] = ends[seq.request_id]
                    sampling.append(child)
        last_rows = [ends[s.request_id] for s in sampling]
        if last_rows != list(range(hidden.shape[0])):  # a pure decode step samples every row
            hidden = hidden.index_select(0, torch.tensor(last_rows, device=self.device))
        logits = self.model.compute_logits(hidden)
        # One batched check per step: a sequence whose activations turned non-finite stops
        # here with its own error; the others sample on in this same step. An inf or NaN
        # anywhere makes the total non-finite, so one sum clears the common case; a finite
        # total that overflowed (|logits| ~ 1e34) only costs the exact per-row check.
        finite = [True] * len(sampling)
        if not bool(torch.isfinite(logits.sum())):
            finite = torch.isfinite(logits).all(-1).tolist()
        if not all(finite):
            keep = [i for i, ok in enumerate(finite) if ok]
            outputs += [self._stop_non_finite(s) for s, ok in zip(sampling, finite, strict=True)
                        if not ok]
            sampling = [sampling[i] for i in keep]
            if not sampling:
                return outputs
            logits = logits.index_select(0, torch.tensor(keep, device=logits.device))
        keys = [s.request_id for s in sampling]
        grammars = len(self.grammars) > 0
        tokens, logprobs = sample(
            logits,
            [s.sampling for s in sampling],
            [self._generators[k] for k in keys],
            Batch(self.sampler_state.rows(keys), self.sampler_state,
                  self.grammars.allowed(keys) if grammars else None),
        )
        ended = self.grammars.advance(keys, tokens) if grammars else {}
        self.scheduler.postprocess(list(zip(sampling, tokens, strict=True)))
        for seq in sampling:
            if seq.request_id in ended and not seq.is_finished:
                error = ended[seq.request_id]
                # A complete JSON value stops the choice; a refused token fails only it.
                self.scheduler.finish(seq, FinishReason.ERROR if error else FinishReason.STOP,
                                      error)
        self.num_generated_tokens += len(tokens)
        for seq, token, lp in zip(sampling, tokens, logprobs, strict=True):
            stream = self._streams[seq.request_id]
            # A stop token id ends the choice like EOS: its text is not part of the answer.
            by_id = seq.is_finished and token in seq.sampling.stop_token_ids
            delta = "" if by_id else stream.push(token)
            if stream.stopped and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP)
            if seq.is_finished:
                outputs.append(self._final(seq, delta, [token], lp))
            else:
                outputs.append(RequestOutput(
                    seq.output_id, [token], None if lp is None else [lp], delta,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_cached_tokens=seq.num_cached_prompt_tokens,
                    num_output_tokens=seq.num_output_tokens, index=seq.index,
                ))
        return outputs

    def _stop_non_finite(self, seq: Sequence) -> RequestOutput:
        """End `seq` with an error naming its adapter and zero its KV blocks as they are freed."""
        if seq.adapter is not None:
            name = seq.adapter.name or seq.adapter.key
            message = f"adapter {name} produced non-finite activations"
            code = "adapter_numerics"
        else:
            message, code = "the model produced non-finite activations", "internal_error"
        # Its blocks leave the prefix cache, so no later prompt starts from its K/V. Only the
        # blocks it alone holds are zeroed: a block shared with its sibling choices (n > 1)
        # or with another request of its prefix is zeroed by the last of them to let go of it.
        bm = self.scheduler.block_manager
        bm.forget(seq.block_table)
        self.kv_cache.zero_blocks([b for b in seq.block_table if bm.ref_counts[b] == 1])
        self.scheduler.finish(seq, FinishReason.ERROR, message)
        out = self._final(seq, "", None)
        out.error_code = code
        return out

    def _final(self, seq: Sequence, delta: str, tokens: list[int] | None, lp=None) -> RequestOutput:
        stream = self._streams.pop(seq.request_id, None)
        self._generators.pop(seq.request_id, None)
        self.sampler_state.remove(seq.request_id)
        self.grammars.remove(seq.request_id)
        choices = self._choices.get(seq.output_id)
        if choices is not None and all(c.is_finished for c in choices):
            del self._choices[seq.output_id]
        if stream is not None and seq.finish_reason is not FinishReason.ERROR:
            delta += stream.flush()
        return RequestOutput(
            seq.output_id,
            tokens or [],
            None if lp is None else [lp],
            delta,
            finished=True,
            finish_reason=seq.finish_reason,
            error=seq.error,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            index=seq.index,
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
            "queue_wait_seconds": self.scheduler.queue_wait.to_dict(),
            "prefix_cache": self.scheduler.prefix_cache_stats(),
            **({"adapters": adapter_stats()} if adapter_stats is not None else {}),
        }
