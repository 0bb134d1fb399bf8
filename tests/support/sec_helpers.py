"""Helpers of the security checks (a module name of its own, so no other test area
shadows it): fuzz example counts, the report printed after the run, adapter files."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any


def fuzz_examples(default: int) -> int:
    raw = os.environ.get("LORAGATE_FUZZ_EXAMPLES", "")
    return int(raw) if raw.strip() else default


# Lines the fuzz tests want shown after the run, whatever pytest's capture mode.
REPORT: list[str] = []


def report(title: str, counts: dict[str, Counter[Any]]) -> None:
    overall: Counter[Any] = Counter()
    for counter in counts.values():
        overall.update(counter)
    REPORT.append(f"{title}: {sum(overall.values())} in total ({_counts(overall)})")
    for name, counter in sorted(counts.items()):
        REPORT.append(f"  {name}: {sum(counter.values())} ({_counts(counter)})")


def report_outcomes(title: str, outcomes: Counter[str]) -> None:
    """Fuzz outcomes: 'accepted' or 'refused: <rule>', one line per rule."""
    refused = sum(v for k, v in outcomes.items() if k != "accepted")
    REPORT.append(f"{title}: {sum(outcomes.values())} inputs tried, "
                  f"{outcomes['accepted']} accepted, {refused} refused")
    for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        REPORT.append(f"  {count:6d}  {outcome}")


def _counts(counter: Counter[Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items(), key=str))


def adapter_dir(out: Path, spec: Any, seed: int, rank: int = 4) -> Path:
    """A valid LoRA adapter for the built-in model (distinct bytes per seed)."""
    from tests.support.adapter_files import lora_config, lora_tensors, write_adapter

    write_adapter(out, lora_config(rank=rank),
                  lora_tensors(rank=rank, layers=spec.num_hidden_layers, spec=spec, seed=seed))
    return out


