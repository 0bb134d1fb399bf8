"""Prometheus figures: bounded label values, per-app registry, runtime cache figures."""

from __future__ import annotations

import pytest

from gateway.inference.metrics import OTHER, LabelCap, Metrics

pytestmark = pytest.mark.unit


def test_label_cap_folds_values_past_the_cap_into_other() -> None:
    cap = LabelCap(3)
    assert [cap(v) for v in ("a", "b", "c", "d", "a", "e")] == ["a", "b", "c", OTHER, "a", OTHER]


def test_observations_render_with_bounded_labels_and_runtime_stats() -> None:
    stats = {"http://r1": {"num_running": 2, "adapters": {
        "hits": {"device": 5, "host": 1}, "loads": 3, "evictions": {"device": 1, "host": 0},
        "load_seconds": {"buckets": {"0.1": 1}}}},
        "http://r2": {"num_running": 0, "adapters": {"evictions": 4, "hits": "odd"}}}
    metrics = Metrics(lambda: stats, max_values=2)
    for i in range(5):
        labels = metrics.labels("acme", f"adapter{i}", "")
        metrics.observe(labels, status=200, ttft_s=0.01, total_s=0.02, tokens_in=3,
                        tokens_out=4)
    text = metrics.render().decode()
    assert 'loragate_requests_total{adapter="other",status="200",tenant="acme",variant=""} 3.0' \
        in text
    assert 'loragate_tokens_out_total{adapter="adapter0",tenant="acme",variant=""} 4.0' in text
    assert "loragate_time_to_first_token_seconds_bucket" in text
    assert 'loragate_runtime_adapter_hits{runtime="http://r1",tier="device"} 5.0' in text
    assert 'loragate_runtime_adapter_loads{runtime="http://r1"} 3.0' in text
    assert 'loragate_runtime_adapter_evictions{runtime="http://r1",tier="device"} 1.0' in text
    assert 'loragate_runtime_adapter_evictions{runtime="http://r2",tier="all"} 4.0' in text
    # A second app in the same process has registries of its own.
    assert "loragate_requests_total{" not in Metrics().render().decode()
