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


def test_autoscaling_signals_per_runtime_and_per_gateway() -> None:
    stats = {"http://r1": {
        "num_running": 3, "num_waiting": 7, "kv_blocks_free": 25, "kv_blocks_total": 100,
        "queue_wait_seconds": {"buckets": {"0.01": 2, "0.1": 5, "+Inf": 6}, "sum": 1.5,
                               "count": 6},
        "adapters": {"slots": {"held": 5, "total": 64}}},
        # An older runtime without the new figures, and one with a malformed histogram.
        "http://r2": {"num_running": 1, "queue_wait_seconds": {"buckets": {"0.1": 1}}}}
    load = {"shed": {"at_capacity": 4, "runtime_busy": 0, "no_runtime": 1},
            "members": {"ready": 2, "not_ready": 0, "draining": 1}, "dns_failures": 2,
            "runtimes": {"http://r1": {"in_flight": 9, "limit": 128}}}
    text = Metrics(lambda: stats, lambda: load).render().decode()
    assert 'loragate_runtime_requests_waiting{runtime="http://r1"} 7.0' in text
    assert 'loragate_runtime_kv_cache_usage{runtime="http://r1"} 0.75' in text
    assert 'loragate_runtime_adapter_slots_held{runtime="http://r1"} 5.0' in text
    assert 'loragate_runtime_adapter_slots{runtime="http://r1"} 64.0' in text
    assert 'loragate_runtime_queue_wait_seconds_bucket{le="0.1",runtime="http://r1"} 5.0' in text
    assert 'loragate_runtime_queue_wait_seconds_count{runtime="http://r1"} 6.0' in text
    assert 'loragate_runtime_queue_wait_seconds_sum{runtime="http://r1"} 1.5' in text
    assert 'runtime="http://r2"} 1.0' in text  # its running count still shows
    assert 'loragate_runtime_queue_wait_seconds_count{runtime="http://r2"}' not in text
    assert 'loragate_runtime_kv_cache_usage{runtime="http://r2"}' not in text
    assert 'loragate_runtime_in_flight{runtime="http://r1"} 9.0' in text
    assert 'loragate_requests_shed_total{reason="at_capacity"} 4.0' in text
    assert 'loragate_runtimes{state="draining"} 1.0' in text
    assert "loragate_dns_failures_total 2.0" in text


def test_prefix_cache_figures_by_tenant_fold_past_the_cap() -> None:
    tenants = {f"t{i}": {"queried_tokens": 100, "cached_tokens": 10 * i, "evicted_blocks": i}
               for i in range(4)}
    tenants["t9"] = {"queried_tokens": "odd"}  # a malformed figure is skipped, not fatal
    stats = {"http://r1": {"prefix_cache": {"cached_blocks": 12, "tenants": tenants}},
             "http://r2": {"prefix_cache": "odd"}}
    metrics = Metrics(lambda: stats, max_values=2)
    labels = metrics.labels("t0", "base", "")
    metrics.observe(labels, status=200, ttft_s=None, total_s=0.1, tokens_in=80, tokens_out=2,
                    tokens_cached=64)
    text = metrics.render().decode()
    assert 'loragate_tokens_in_cached_total{adapter="base",tenant="t0",variant=""} 64.0' in text
    assert 'loragate_runtime_prefix_cache_blocks{runtime="http://r1"} 12.0' in text
    # Tenant t0 took the first label; t1 the second; t2, t3 and t9 sum under "other".
    assert ('loragate_runtime_prefix_cache_cached_tokens{runtime="http://r1",tenant="t1"} 10.0'
            in text)
    assert ('loragate_runtime_prefix_cache_cached_tokens{runtime="http://r1",tenant="other"} '
            '50.0' in text)
    assert ('loragate_runtime_prefix_cache_evicted_blocks{runtime="http://r1",tenant="other"} '
            '5.0' in text)
    assert ('loragate_runtime_prefix_cache_queried_tokens{runtime="http://r1",tenant="other"} '
            '200.0' in text)
