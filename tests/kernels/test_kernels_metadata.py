"""build_meta: tokens grouped by slot, stably, with -1 outside every segment."""

from __future__ import annotations

import pytest
import torch

from kernels import LoraMeta, build_meta


@pytest.mark.unit
def test_segments_group_tokens_by_slot_stably() -> None:
    t2s = torch.tensor([2, -1, 0, 2, 2, -1, 0, 3], dtype=torch.int32)
    meta = build_meta(t2s, num_slots=5)
    assert meta.sorted_token_ids.tolist() == [2, 6, 0, 3, 4, 7, 1, 5]
    assert meta.num_tokens_per_slot.tolist() == [2, 0, 3, 1, 0]
    assert meta.slot_starts.tolist() == [0, 2, 2, 5, 6]
    assert meta.active_slots.tolist() == [0, 2, 3, -1, -1]
    assert meta.host_segments() == [(0, 0, 2), (2, 2, 3), (3, 5, 1)]
    assert meta.num_tokens == 8


@pytest.mark.unit
def test_batch_without_adapters_has_no_segment() -> None:
    meta = build_meta(torch.full((4,), -1, dtype=torch.int32), num_slots=3)
    assert meta.active_slots.tolist() == [-1, -1, -1]
    assert meta.num_tokens_per_slot.tolist() == [0, 0, 0]
    assert meta.host_segments() == []


@pytest.mark.unit
def test_random_batches_match_a_python_grouping() -> None:
    g = torch.Generator().manual_seed(3)
    for num_tokens in (1, 7, 33, 128):
        t2s = torch.randint(-1, 32, (num_tokens,), generator=g, dtype=torch.int32)
        meta = build_meta(t2s, num_slots=32)
        slots = t2s.tolist()
        expected = [i for s in range(32) for i in range(num_tokens) if slots[i] == s]
        expected += [i for i in range(num_tokens) if slots[i] == -1]
        assert meta.sorted_token_ids.tolist() == expected
        for slot, start, count in meta.host_segments():
            seg = meta.sorted_token_ids[start : start + count].tolist()
            assert all(slots[i] == slot for i in seg) and count == slots.count(slot)


@pytest.mark.unit
def test_preallocated_meta_is_refilled_in_place() -> None:
    buf = LoraMeta.empty(max_num_tokens=16, num_slots=4, device="cpu")
    first = build_meta(torch.tensor([1, 1, 0], dtype=torch.int32), 4, out=buf)
    assert first.sorted_token_ids.data_ptr() == buf.sorted_token_ids.data_ptr()
    second = build_meta(torch.tensor([3, -1, 3, 2, 3], dtype=torch.int32), 4, out=buf)
    assert second.num_tokens == 5
    assert second.sorted_token_ids.tolist() == [3, 0, 2, 4, 1]
    assert second.active_slots.tolist() == [2, 3, -1, -1]
    assert second.host_segments() == [(2, 0, 1), (3, 1, 3)]


@pytest.mark.unit
@pytest.mark.parametrize("bad", [[0, 4], [-2, 0]])
def test_out_of_range_slots_are_refused(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="slots must lie"):
        build_meta(torch.tensor(bad, dtype=torch.int32), num_slots=4)


@pytest.mark.unit
def test_too_many_tokens_for_a_preallocated_meta_are_refused() -> None:
    buf = LoraMeta.empty(max_num_tokens=2, num_slots=4, device="cpu")
    with pytest.raises(ValueError, match="exceed"):
        build_meta(torch.zeros(3, dtype=torch.int32), 4, out=buf)
