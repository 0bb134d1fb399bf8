"""Driving an LLMEngine to the end in the runtime tests."""

from __future__ import annotations

import time
from typing import Any


def drain(engine: Any, limit: int = 5000) -> dict[str, list[Any]]:
    """Step until nothing is unfinished: every request's outputs, in order, by request id.
    A step with no output waits a little (an adapter loading in the loader's threads)."""
    outputs: dict[str, list[Any]] = {}
    for _ in range(limit):
        if not engine.has_unfinished():
            return outputs
        outs = engine.step()
        for out in outs:
            outputs.setdefault(out.request_id, []).append(out)
        if not outs:
            time.sleep(0.002)
    raise AssertionError("the engine stopped making progress")
