"""Serving metrics over recorded request timelines, after DeepSpeed-FastGen's benchmark method.

Pure functions: the load generator records, per request, when it was sent and when each generated
token arrived (one clock, seconds); everything here is computed from those records afterwards, so
the definitions can be unit-tested on hand-built timelines and re-applied to saved results.

Definitions (FastGen: arXiv 2401.08671 and its benchmark script, DeepSpeedExamples
splitfuse/benchmarks/inference/mii/src/plot_effective_throughput.py):

- TTFT: first token arrival - send time.
- End-to-end latency: last token arrival - send time.
- Per-token latency: the gaps between consecutive tokens of a request (the first token's wait is
  TTFT, not a gap); percentiles pool the gaps of all completed requests. Tokens that arrive in the
  same message share an arrival time, so their gap is 0.
- Throughput: completed requests (and tokens) divided by the run's duration, from the first send
  to the last token arrival (FastGen: max end - min start).
- SLA, with rates S_prompt (prompt tokens/s) and S_gen (generated tokens/s). A request meets it if
  (1) its first token arrives within prompt_length / S_prompt of sending (<=), and
  (2) EMA variant: the exponential moving average of its gaps stays below 1 / S_gen (strict <) at
      every token. The EMA is pandas' `Series.ewm(span=16).mean()` as FastGen computes it:
      alpha = 2 / (span + 1), bias-corrected (adjust=True), i.e. after gap i it is
      sum_j (1-alpha)^j g[i-j] / sum_j (1-alpha)^j, so the first value is the first gap itself.
      A short burst of slow tokens can trip it even when the request's mean gap is fine.
  (2') cumulative variant: token k (k = 0 for the first token) arrives by
      send + prompt_length / S_prompt + k / S_gen (<=): the reader started at the TTFT deadline
      and reads at S_gen; time a request is ahead of that schedule is kept as slack. (FastGen's
      script anchors the schedule at the first token's actual arrival instead, which gives no
      credit for a fast first token; ours makes (1) the k = 0 case of (2').)
- Effective throughput = completed requests/s x the fraction of completed requests that met the
  SLA, i.e. requests meeting the SLA per second. Requests that failed (error, abort) are not
  completed: they count in neither factor and are reported separately.
"""
import math
from dataclasses import dataclass, field

import numpy as np

EMA_SPAN = 16
PERCENTILES = (50, 90, 95, 99)
TOKEN_PERCENTILES = (50, 90, 95)


@dataclass(slots=True)
class Timeline:
    """What the load generator records for one request."""
    prompt_length: int
    send_time: float
    token_times: list[float] = field(default_factory=list)  # arrival of each generated token, in order
    completed: bool = True                                    # False: it ended with an error or abort


@dataclass(slots=True)
class SLA:
    prompt_tokens_per_s: float  # S_prompt: the first token is due prompt_length / S_prompt after sending
    gen_tokens_per_s: float     # S_gen: tokens are due every 1 / S_gen seconds after that
    ema_span: int = EMA_SPAN


@dataclass(slots=True)
class Distribution:
    """Mean and percentiles of a sample; NaN where the sample is empty."""
    mean: float
    percentiles: dict[int, float]

    @classmethod
    def of(cls, values: list[float], qs: tuple[int, ...] = PERCENTILES) -> "Distribution":
        return cls(float(np.mean(values)) if values else math.nan, {q: percentile(values, q) for q in qs})


@dataclass(slots=True)
class Summary:
    requests: int
    completed: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float        # generated tokens
    total_tokens_per_s: float         # prompt + generated tokens
    latency_s: Distribution           # end to end
    ttft_s: Distribution
    token_latency_s: Distribution     # inter-token gaps, pooled
    sla: SLA
    sla_fraction_ema: float           # of completed requests
    sla_fraction_cumulative: float
    effective_rps_ema: float          # requests meeting the SLA per second
    effective_rps_cumulative: float


@dataclass(slots=True)
class Offline:
    """Offline throughput: a batch of requests submitted at once, timed until the last one finished."""
    backend: str
    requests: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float  # the requested generation lengths only (not padding or overshoot)
    total_tokens_per_s: float   # prompt + requested generation tokens
    note: str = ""

    @classmethod
    def measure(cls, backend: str, prompt_tokens: int, output_tokens: int, requests: int, seconds: float,
                note: str = "") -> "Offline":
        return cls(backend, requests, seconds, requests / seconds, output_tokens / seconds,
                   (prompt_tokens + output_tokens) / seconds, note)

    @classmethod
    def from_timelines(cls, backend: str, timelines: list[Timeline], note: str = "") -> "Offline":
        """Completed requests' tokens over the run's duration (first send to last token)."""
        done = [t for t in timelines if t.completed]
        return cls.measure(backend, sum(t.prompt_length for t in done), sum(len(t.token_times) for t in done),
                           len(done), duration(timelines), note)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as FastGen uses); NaN if empty."""
    return float(np.percentile(values, q)) if len(values) else math.nan


def ttft(t: Timeline) -> float:
    return t.token_times[0] - t.send_time


def e2e_latency(t: Timeline) -> float:
    return t.token_times[-1] - t.send_time


def token_gaps(t: Timeline) -> list[float]:
    """Time between consecutive tokens (len(token_times) - 1 values)."""
    return [b - a for a, b in zip(t.token_times, t.token_times[1:])]


def ema(values: list[float], span: int = EMA_SPAN) -> list[float]:
    """Bias-corrected exponential moving average after each value (pandas ewm(span).mean(), adjust=True)."""
    alpha = 2.0 / (span + 1)
    out, numerator, weight = [], 0.0, 0.0
    for v in values:
        numerator = v + (1 - alpha) * numerator
        weight = 1.0 + (1 - alpha) * weight
        out.append(numerator / weight)
    return out


def first_token_deadline(t: Timeline, sla: SLA) -> float:
    return t.send_time + t.prompt_length / sla.prompt_tokens_per_s


def meets_prompt_sla(t: Timeline, sla: SLA) -> bool:
    return bool(t.token_times) and t.token_times[0] <= first_token_deadline(t, sla)


def meets_ema_sla(t: Timeline, sla: SLA) -> bool:
    """First token in time, and the EMA of the gaps below 1 / S_gen after every token."""
    limit = 1.0 / sla.gen_tokens_per_s
    return meets_prompt_sla(t, sla) and all(v < limit for v in ema(token_gaps(t), sla.ema_span))


def meets_cumulative_sla(t: Timeline, sla: SLA) -> bool:
    """Token k arrives by the first-token deadline + k / S_gen (k = 0 is the prompt condition)."""
    start = first_token_deadline(t, sla)
    return bool(t.token_times) and all(
        arrival <= start + k / sla.gen_tokens_per_s for k, arrival in enumerate(t.token_times))


def duration(timelines: list[Timeline]) -> float:
    """First send to last token arrival, over every request."""
    start = min(t.send_time for t in timelines)
    end = max([t.send_time for t in timelines] + [x for t in timelines for x in t.token_times])
    return end - start


def summarize(timelines: list[Timeline], sla: SLA) -> Summary:
    """Every metric of one run (one backend, one concurrency level)."""
    done = [t for t in timelines if t.completed and t.token_times]
    seconds = duration(timelines)
    rps = len(done) / seconds if seconds > 0 else math.nan
    generated = sum(len(t.token_times) for t in done)
    prompts = sum(t.prompt_length for t in done)
    frac_ema = _fraction(done, lambda t: meets_ema_sla(t, sla))
    frac_cum = _fraction(done, lambda t: meets_cumulative_sla(t, sla))
    return Summary(
        requests=len(timelines), completed=len(done), failed=len(timelines) - len(done),
        duration_s=seconds, requests_per_s=rps,
        output_tokens_per_s=generated / seconds if seconds > 0 else math.nan,
        total_tokens_per_s=(generated + prompts) / seconds if seconds > 0 else math.nan,
        latency_s=Distribution.of([e2e_latency(t) for t in done]),
        ttft_s=Distribution.of([ttft(t) for t in done]),
        token_latency_s=Distribution.of([g for t in done for g in token_gaps(t)], TOKEN_PERCENTILES),
        sla=sla, sla_fraction_ema=frac_ema, sla_fraction_cumulative=frac_cum,
        effective_rps_ema=rps * frac_ema, effective_rps_cumulative=rps * frac_cum)


def unloaded_speeds(timelines: list[Timeline]) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of requests served alone: prompt tokens over time to
    first token, and tokens after the first over the time they took, each summed over requests."""
    done = [t for t in timelines if t.completed and t.token_times]
    prompt = sum(t.prompt_length for t in done) / sum(ttft(t) for t in done)
    generating = sum(t.token_times[-1] - t.token_times[0] for t in done)
    return prompt, sum(len(t.token_times) - 1 for t in done) / generating


def scaled_sla(alone: list[Timeline], prompt_slowdown: float, gen_slowdown: float) -> SLA:
    """The SLA as the single-request speed divided by slowdown factors: a request may see its first
    token `prompt_slowdown` times later, and tokens `gen_slowdown` times slower, than when alone.
    FastGen fixed S_prompt = 512 and S_gen = 2..8 tokens/s for 7B-70B models on A100s; a CPU runs a
    different model at another speed, so the rates are tied to what this machine measured instead."""
    prompt, gen = unloaded_speeds(alone)
    return SLA(prompt / prompt_slowdown, gen / gen_slowdown)


def _fraction(timelines: list[Timeline], ok) -> float:
    return sum(1 for t in timelines if ok(t)) / len(timelines) if timelines else math.nan
