"""The benchmark's metric definitions (splitfuse/benchmarks/metrics.py) on hand-built request timelines."""
import math

import pytest

from splitfuse.benchmarks import report
from splitfuse.benchmarks.metrics import (SLA, Offline, Timeline, duration, ema, meets_cumulative_sla, meets_ema_sla,
                                          meets_prompt_sla, percentile, scaled_sla, summarize, token_gaps, ttft,
                                          unloaded_speeds)
from splitfuse.benchmarks.report import PresetResults
from splitfuse.benchmarks.workload import PRESETS, make_workload

# First token due prompt_length / 100 s after sending; then a token every 0.1 s.
RATES = SLA(prompt_tokens_per_s=100.0, gen_tokens_per_s=10.0)


def steady(prompt_length: int = 50, send: float = 0.0, first: float = 0.3, gaps: list[float] | None = None,
           completed: bool = True) -> Timeline:
    """A request whose first token arrives `first` s after `send`, then one token after each gap."""
    times = [send + first]
    for g in gaps if gaps is not None else [0.05] * 10:
        times.append(times[-1] + g)
    return Timeline(prompt_length, send, times, completed)


def test_ema_matches_pandas_adjusted_definition():
    # span 3: alpha = 0.5; weights 1, 0.5, 0.25 on the newest, next, oldest value.
    assert ema([1.0, 0.0, 0.0], span=3) == pytest.approx([1.0, 0.5 / 1.5, 0.25 / 1.75])
    assert ema([2.0] * 20) == pytest.approx([2.0] * 20)
    assert ema([]) == []


def test_request_that_meets_the_sla():
    t = steady()  # deadline 0.5 s, first token at 0.3 s, gaps 0.05 s < 0.1 s
    assert ttft(t) == pytest.approx(0.3)
    assert token_gaps(t) == pytest.approx([0.05] * 10)
    assert meets_prompt_sla(t, RATES) and meets_ema_sla(t, RATES) and meets_cumulative_sla(t, RATES)


def test_late_first_token_fails_both_variants():
    t = steady(first=0.51)  # deadline 0.5 s; the rest of the request is fast
    assert not meets_prompt_sla(t, RATES)
    assert not meets_ema_sla(t, RATES)
    assert not meets_cumulative_sla(t, RATES)
    # The deadline scales with the prompt: 60 tokens are due by 0.6 s.
    assert meets_ema_sla(steady(prompt_length=60, first=0.51), RATES)


def test_burst_of_slow_tokens_trips_the_ema_but_not_the_mean():
    gaps = [0.02] * 30 + [0.3] * 4 + [0.02] * 6
    t = steady(gaps=gaps)
    assert sum(gaps) / len(gaps) < 1 / RATES.gen_tokens_per_s  # the mean gap (0.048 s) is within the SLA
    assert max(ema(gaps)) > 0.1                                 # the EMA after the burst is not
    assert not meets_ema_sla(t, RATES)
    # Cumulatively the request stays ahead of a 10 tokens/s reader: the burst spends banked slack.
    assert meets_cumulative_sla(t, RATES)


def test_single_slow_gap_is_smoothed_by_the_ema():
    t = steady(gaps=[0.05] * 20 + [0.2] + [0.05] * 5)  # the EMA rises to about 0.068 s
    assert meets_ema_sla(t, RATES)


def test_cumulative_schedule_is_anchored_at_the_first_token_deadline():
    # Token k is due at send + 0.5 + 0.1 k (send at 10 s, prompt of 50 tokens).
    due = [10.5 + 0.1 * k for k in range(8)]
    on_time = Timeline(50, 10.0, [d - 1e-6 for d in due])
    assert meets_cumulative_sla(on_time, RATES)
    late = Timeline(50, 10.0, [d - 1e-6 for d in due[:3]] + [due[3] + 1e-3] + [d - 1e-6 for d in due[4:]])
    assert not meets_cumulative_sla(late, RATES)
    # An early first token leaves slack: gaps of 0.15 s are fine until the slack (0.4 s) is spent.
    early = steady(send=10.0, first=0.1, gaps=[0.15] * 7)  # token k at 10.1 + 0.15 k; due 10.5 + 0.1 k
    assert meets_cumulative_sla(early, RATES)
    assert not meets_ema_sla(early, RATES)
    assert not meets_cumulative_sla(steady(send=10.0, first=0.1, gaps=[0.15] * 9), RATES)


def test_request_without_tokens_meets_nothing():
    t = Timeline(50, 0.0, [], completed=False)
    assert not meets_prompt_sla(t, RATES) and not meets_cumulative_sla(t, RATES)


def test_percentiles_match_hand_computation():
    values = [float(v) for v in range(1, 11)]  # rank r = q/100 * 9, interpolated between neighbours
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 95) == pytest.approx(9.55)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile([3.0], 95) == 3.0
    assert math.isnan(percentile([], 50))


def test_summary_throughput_latency_and_effective_throughput():
    # Four completed requests and a failed one, from the first send at 0 s to the last token at 2 s.
    timelines = [
        steady(send=0.0, first=0.2, gaps=[0.099] * 3),   # e2e 0.497: meets both
        steady(send=0.5, first=0.2, gaps=[0.05] * 3),    # e2e 0.35: meets both
        steady(send=1.0, first=0.7, gaps=[0.05] * 3),    # e2e 0.85: first token late (due at 0.5 s)
        steady(send=1.44, first=0.2, gaps=[0.12] * 3),   # e2e 0.56: EMA 0.12 s, but ahead of the schedule
        Timeline(50, 1.9, [], completed=False),          # failed: counts in neither factor
    ]
    s = summarize(timelines, RATES)
    assert (s.requests, s.completed, s.failed) == (5, 4, 1)
    assert duration(timelines) == pytest.approx(2.0) and s.duration_s == pytest.approx(2.0)
    assert s.requests_per_s == pytest.approx(2.0)
    assert s.output_tokens_per_s == pytest.approx(16 / 2.0)
    assert s.total_tokens_per_s == pytest.approx((16 + 4 * 50) / 2.0)
    latencies = [0.497, 0.35, 0.85, 0.56]
    assert s.latency_s.mean == pytest.approx(sum(latencies) / 4)
    assert s.latency_s.percentiles[50] == pytest.approx((0.497 + 0.56) / 2)
    assert s.latency_s.percentiles[90] == pytest.approx(0.56 + 0.7 * (0.85 - 0.56))
    assert s.ttft_s.percentiles[50] == pytest.approx(0.2)
    gaps = [0.099] * 3 + [0.05] * 6 + [0.12] * 3
    assert s.token_latency_s.percentiles[50] == pytest.approx(percentile(gaps, 50))
    assert s.token_latency_s.percentiles[95] == pytest.approx(0.12)
    assert set(s.token_latency_s.percentiles) == {50, 90, 95}
    assert s.sla_fraction_ema == pytest.approx(0.5)          # the first two
    assert s.sla_fraction_cumulative == pytest.approx(0.75)  # and the fourth
    assert s.effective_rps_ema == pytest.approx(2.0 * 0.5)
    assert s.effective_rps_cumulative == pytest.approx(2.0 * 0.75)


def test_sla_is_scaled_from_the_single_request_speed():
    # Alone: 100 prompt tokens in 0.5 s (200 tokens/s), then 4 gaps of 0.05 s and 4 of 0.15 s (10 tokens/s).
    alone = [steady(prompt_length=100, first=0.5, gaps=[0.05] * 4), steady(prompt_length=100, first=0.5,
                                                                          gaps=[0.15] * 4)]
    assert unloaded_speeds(alone) == pytest.approx((200.0, 10.0))
    sla = scaled_sla(alone, prompt_slowdown=4, gen_slowdown=2)
    assert (sla.prompt_tokens_per_s, sla.gen_tokens_per_s, sla.ema_span) == pytest.approx((50.0, 5.0, 16))


def test_offline_throughput_counts_completed_requests_over_the_run():
    timelines = [steady(send=0.0, first=0.5, gaps=[0.5] * 3), steady(send=0.0, first=1.0, gaps=[0.5] * 2),
                 Timeline(50, 0.0, [0.2], completed=False)]
    o = Offline.from_timelines("x", timelines)
    assert (o.requests, o.seconds) == (2, pytest.approx(2.0))
    assert o.requests_per_s == pytest.approx(1.0)
    assert o.output_tokens_per_s == pytest.approx(7 / 2.0)
    assert o.total_tokens_per_s == pytest.approx((7 + 100) / 2.0)


def test_workload_is_seeded_and_shares_a_prefix_across_sizes():
    corpus = list(range(5000))
    preset = PRESETS["p2600-g128"]
    small, large = make_workload(preset, 5, corpus), make_workload(preset, 50, corpus)
    assert small == large[:5]
    assert make_workload(preset, 50, corpus, seed=1) != large
    for r in large:
        assert 1 <= len(r.prompt_ids) <= 2 * preset.prompt_mean and 1 <= r.max_new_tokens <= 2 * preset.gen_mean
        assert r.prompt_ids == corpus[r.prompt_ids[0]:r.prompt_ids[0] + len(r.prompt_ids)]  # a window of the corpus
    mean = sum(len(r.prompt_ids) for r in large) / len(large)
    assert 0.8 * preset.prompt_mean < mean < 1.2 * preset.prompt_mean


def test_report_tables_from_hand_built_runs(tmp_path):
    fast = [steady(send=s, first=0.2, gaps=[0.05] * 5) for s in (0.0, 0.1)]
    slow = [steady(send=s, first=0.2, gaps=[0.05, 0.9, 0.05, 0.05, 0.05]) for s in (0.0, 0.1)]
    results = {"p2600-g128": PresetResults(
        PRESETS["p2600-g128"], serving={"splitfuse": {1: fast[:1], 2: fast}, "prefill-first": {1: slow[:1], 2: slow}},
        offline={"splitfuse": Offline.measure("splitfuse", 100, 40, 4, 2.0),
                 "hf-static": Offline.measure("hf-static", 100, 40, 4, 8.0)}, sla=RATES)}
    text = report.markdown(results, {"machine": {"cores": 2}, "settings": {}})
    assert "| p2600-g128 | splitfuse | 2 | 2/2 |" in text and "| p2600-g128 | hf-static | 4 | 8.0 |" in text
    assert "4.00x" in text  # splitfuse's offline output tokens/s over the static baseline's
    assert "(goal 2x: met)" in text  # effective throughput: prefill-first met no SLA
    report.save(tmp_path / "r.json", results, {"machine": {}, "settings": {}})
    loaded, _ = report.load(tmp_path / "r.json")
    assert loaded["p2600-g128"].serving == results["p2600-g128"].serving
    assert loaded["p2600-g128"].offline == results["p2600-g128"].offline
