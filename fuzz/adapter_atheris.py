"""Coverage-guided fuzzing of the adapter upload validator with atheris (libFuzzer).

Each input is turned into a mutated adapter by the same structured mutators as the hypothesis
fuzz (tests/security/adapter_mutations.py), with atheris's bytes driving every choice, so
coverage feedback steers which header fields, values and JSON edits get combined (value-range
mutations included: huge finite, tiny and subnormal values, scaled tensors, alpha against r).
Every input must validate or be refused with ValidationFailed within the time bound; anything
else is a crash that atheris reports with the input that caused it.

    .venv/bin/python fuzz/adapter_atheris.py -atheris_runs=20000   # or -max_total_time=60

Prints the inputs tried, the outcome counts (accepted, refused by rule) and which of the value
bounds (scale, weight, delta) refused something at the end.
"""

from __future__ import annotations

import atexit
import sys
from collections import Counter
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]

with atheris.instrument_imports():
    import adapters.safetensors_header
    import adapters.validation
    import adapters.weight_bounds  # noqa: F401 (instrumented for coverage)
from tests.support.adapter_mutations import (  # noqa: E402 (after instrumenting)
    BOUND_RULES,
    classify,
    mutated_pair,
)

OUTCOMES: Counter[str] = Counter()


class FuzzedChooser:
    def __init__(self, data: bytes) -> None:
        self.fdp = atheris.FuzzedDataProvider(data)

    def integer(self, lo: int, hi: int) -> int:
        return int(self.fdp.ConsumeIntInRange(lo, hi))

    def raw(self, max_len: int) -> bytes:
        return bytes(self.fdp.ConsumeBytes(self.fdp.ConsumeIntInRange(0, max_len)))


def test_one_input(data: bytes) -> None:
    config, model = mutated_pair(FuzzedChooser(data))
    OUTCOMES[classify(config, model)] += 1


def _print_counts() -> None:
    refused = sum(v for k, v in OUTCOMES.items() if k != "accepted")
    print(f"fuzz-adapters (atheris): {sum(OUTCOMES.values())} inputs tried, "
          f"{OUTCOMES['accepted']} accepted, {refused} refused")
    for outcome, count in OUTCOMES.most_common():
        print(f"  {count:6d}  {outcome}")
    reached = {rule: sum(v for k, v in OUTCOMES.items() if words in k)
               for rule, words in BOUND_RULES.items()}
    print("value bounds refused: " + ", ".join(f"{rule} {n}" for rule, n in reached.items()))


if __name__ == "__main__":
    atexit.register(_print_counts)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
