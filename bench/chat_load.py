"""The chat load every API contender gets: the same requests, all at once, one way of counting.

    tokens, seconds, texts = chat_load(url, headers, models, messages, max_tokens)

Both loragate's API (`bench/real_model.py`) and vLLM's OpenAI server
(`bench/vllm_contender.py`) are driven by this one function, so their figures differ only by
the server: non-streamed /v1/chat/completions, greedy (temperature 0), EOS ignored, every
request sent at once over one httpx.AsyncClient. One request per distinct model goes first,
before the clock starts, so that adapter loads are not timed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


def chat_load(url: str, headers: dict[str, str], models: list[str],
              messages: list[list[dict[str, str]]], max_tokens: int
              ) -> tuple[int, float, list[str]]:
    """(completion tokens summed over the answers, wall seconds, each answer's text)."""
    return asyncio.run(_drive(url, headers, models, messages, max_tokens))


async def _drive(url: str, headers: dict[str, str], models: list[str],
                 messages: list[list[dict[str, str]]], max_tokens: int
                 ) -> tuple[int, float, list[str]]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=1800, headers=headers) as client:
        async def one(model: str, msgs: list[dict[str, str]]) -> tuple[int, str]:
            body: dict[str, Any] = {"model": model, "messages": msgs,
                                    "max_tokens": max_tokens, "temperature": 0,
                                    "ignore_eos": True}
            answer = await client.post("/v1/chat/completions", json=body)
            answer.raise_for_status()
            data = answer.json()
            return (int(data["usage"]["completion_tokens"]),
                    data["choices"][0]["message"]["content"] or "")

        await asyncio.gather(*(one(m, messages[0]) for m in sorted(set(models))))
        start = time.perf_counter()
        done = await asyncio.gather(*(one(m, c) for m, c in zip(models, messages,
                                                                strict=True)))
        wall = time.perf_counter() - start
    return sum(n for n, _ in done), wall, [text for _, text in done]
