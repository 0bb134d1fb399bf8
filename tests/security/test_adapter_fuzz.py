"""Fuzz of the adapter validator: mutated adapter files are accepted or refused with
ValidationFailed, never another exception, never slowly; and over HTTP they are 4xx and
leave nothing behind.

The mutations (tests/security/adapter_mutations.py) start from a valid PEFT adapter and flip
bits, truncate, rewrite the header length, break dtype/shape/offsets/names, put NaN and
infinity in tensor data, inject repeated keys, giant numbers and deep nesting into either
JSON, and set config fields to values of every type; value-range mutations change only
numbers (huge finite, tiny, subnormal, each dtype's max, scaled tensors, alpha against r),
so each value bound is refused in the counts too. `LORAGATE_FUZZ_EXAMPLES` (default 150)
sets the number of inputs; `make fuzz-adapters` raises it and prints the outcome counts.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.errors import ValidationFailed
from adapters.safetensors_header import parse_header
from tests.support.adapter_mutations import (
    BOUND_RULES,
    RandomChooser,
    classify,
    good_config,
    good_tensors,
    header_and_data,
    mutated_pair,
    pack,
)
from tests.support.sec_helpers import fuzz_examples, report_outcomes

pytestmark = pytest.mark.unit

EXAMPLES = fuzz_examples(150)


class HypothesisChooser:
    def __init__(self, data: Any) -> None:
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return int(self.data.draw(st.integers(lo, hi)))

    def raw(self, max_len: int) -> bytes:
        return bytes(self.data.draw(st.binary(max_size=max_len)))


@pytest.fixture(scope="module")
def outcomes() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()
    yield counts
    report_outcomes("fuzz-adapters (hypothesis)", counts)


@pytest.mark.timeout(max(300, EXAMPLES // 5))
def test_mutated_adapters_are_accepted_or_refused_cleanly(
    tmp_path: Path, outcomes: Counter[str]
) -> None:
    @given(data=st.data())
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def one(data: Any) -> None:
        config, model = mutated_pair(HypothesisChooser(data))
        outcomes[classify(config, model, tmp_path)] += 1

    one()
    assert sum(outcomes.values()) >= EXAMPLES
    # The mutations must reach deep rules, not only the first byte checks.
    assert any("NaN" in k for k in outcomes) or EXAMPLES < 100, outcomes
    assert len(outcomes) >= min(10, EXAMPLES // 10), outcomes
    if EXAMPLES >= 1000:  # each rule ~1% of inputs or more; below, the seeded test checks
        for rule, words in BOUND_RULES.items():
            assert any(words in k for k in outcomes), (rule, outcomes)


def test_seeded_mutations_reach_every_value_bound(tmp_path: Path) -> None:
    """A fixed draw of 300 pairs: every value bound refuses some, and nothing else escapes."""
    chooser = RandomChooser(3)
    outcomes = Counter(classify(*mutated_pair(chooser), tmp_path) for _ in range(300))
    for rule, words in BOUND_RULES.items():
        assert any(words in k for k in outcomes), (rule, outcomes)
    assert outcomes["accepted"] > 0  # small and subnormal values, among others, pass


def _parse_seconds(tmp_path: Path, blob: bytes) -> float:
    path = tmp_path / "linear.safetensors"
    path.write_bytes(blob)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        try:
            parse_header(path)
        except ValidationFailed:
            pass
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("shape", ["many tensors", "long names", "deep nesting", "metadata"])
def test_header_parsing_time_grows_linearly(tmp_path: Path, shape: str) -> None:
    """16x the header costs well under 16x squared the time: no quadratic path for an
    attacker to find within the 16 MiB header limit."""

    def blob(n: int) -> bytes:
        if shape == "many tensors":
            entries = ",".join(f'"t{i}": {{"dtype": "F32", "shape": [0], '
                               f'"data_offsets": [0, 0]}}' for i in range(n))
            return pack(("{" + entries + "}").encode(), b"")
        if shape == "long names":
            name = "n" * (n * 40)
            return pack(f'{{"{name}": {{"dtype": "F32", "shape": [0], '
                        f'"data_offsets": [0, 0]}}}}'.encode(), b"")
        if shape == "deep nesting":
            return pack(b'{"x": ' + b"[" * n + b"]" * n + b"}", b"")
        meta = ",".join(f'"k{i}": "v{i}"' for i in range(n))
        return pack(('{"__metadata__": {' + meta + "}}").encode(), b"")

    small, large = blob(2_000), blob(32_000)
    assert len(large) < 16 * 1024 * 1024
    t_small = max(_parse_seconds(tmp_path, small), 1e-4)
    t_large = _parse_seconds(tmp_path, large)
    assert t_large < 1.0, t_large
    assert t_large / t_small < 16 * 4, (t_small, t_large)  # linear with room for noise


def test_a_huge_declared_header_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    started = time.perf_counter()
    with pytest.raises(ValidationFailed):
        parse_header(path)
    assert time.perf_counter() - started < 0.1


def test_the_unmutated_adapter_is_accepted(tmp_path: Path) -> None:
    """The fuzz's starting point is valid, so refusals come from the mutations."""
    import json

    header, data = header_and_data(good_tensors())
    for dtype in ("F32", "F16", "BF16"):
        header, data = header_and_data(good_tensors(), dtype)
        assert classify(json.dumps(good_config()).encode(),
                        pack(json.dumps(header).encode(), data), tmp_path) == "accepted"


def http_samples(count: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """Mutated pairs that the validator refuses (drawn with a fixed seed)."""
    chooser = RandomChooser(seed)
    samples = []
    while len(samples) < count:
        pair = mutated_pair(chooser)
        if classify(*pair) != "accepted":
            samples.append(pair)
    return samples


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def test_fuzzed_uploads_over_http_are_4xx_and_leave_nothing(
    tmp_path: Path, base_model_dir: Path, base_spec: Any
) -> None:
    from litestar.testing import AsyncTestClient

    from adapters.db import upgrade_database
    from gateway.app import create_app
    from tests.support.gw_helpers import admin, make_settings

    settings_ = make_settings(tmp_path / "data", base_model_dir)
    upgrade_database(settings_.database_url)
    samples = []
    chooser = RandomChooser(7)  # fixed: the same dozen files every run
    while len(samples) < 12:
        pair = mutated_pair(chooser, base_spec)
        if classify(*pair, tmp_path, spec=base_spec) != "accepted":
            samples.append(pair)
    async with AsyncTestClient(create_app(settings_)) as client:
        r = await client.post("/admin/tenants", json={"name": "acme"}, headers=admin())
        assert r.status_code == 201
        before = _files_under(settings_.data_dir)
        for config, model in samples:
            files = {"adapter_config": ("adapter_config.json", config, "application/json"),
                     "adapter_model": ("adapter_model.safetensors", model,
                                       "application/octet-stream")}
            r = await client.post("/admin/tenants/acme/adapters/fuzzed/versions", files=files,
                                  headers=admin())
            assert r.status_code in (400, 413, 415, 422), r.text
            assert set(r.json()["error"]) == {"message", "type", "code", "param"}
        listed = await client.get("/admin/tenants/acme/adapters", headers=admin())
        assert listed.json() == []  # no adapter row, no version row
        # No stored object and no leftover upload file; only the SQLite files may change.
        after = _files_under(settings_.data_dir)
        new = [p for p in after if p not in before and not p.name.startswith("catalog.db")]
        assert new == [], new
        assert _files_under(settings_.artifacts_dir) == []
