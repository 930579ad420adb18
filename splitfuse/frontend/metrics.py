"""Prometheus metrics of one frontend: what its requests did, and its workers' latest state."""
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds; fine below 100 ms, where inter-token latencies of a healthy server lie.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("splitfuse_requests", "Finished requests, by finish reason", ["finish_reason"],
                                registry=registry)
        self.prompt_tokens = Counter("splitfuse_prompt_tokens", "Prompt tokens of the requests sent to workers",
                                     registry=registry)
        self.generation_tokens = Counter("splitfuse_generation_tokens", "Tokens generated", registry=registry)
        self.time_to_first_token = Histogram("splitfuse_time_to_first_token_seconds",
                                             "From a request's arrival to its first token", buckets=LATENCY_BUCKETS,
                                             registry=registry)
        self.inter_token_latency = Histogram("splitfuse_inter_token_latency_seconds",
                                             "Between a request's successive outputs", buckets=LATENCY_BUCKETS,
                                             registry=registry)
        self._engines = _Engines()
        registry.register(self._engines)

    def update_engines(self, replicas: list[dict], queued_in_frontend: int) -> None:
        """Called by the core's thread; a scrape on another thread reads the snapshot as a whole."""
        self._engines.snapshot = (replicas, queued_in_frontend)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _Engines:
    """The workers' gauges, summed over replicas, from their latest heartbeats."""

    def __init__(self):
        self.snapshot: tuple[list[dict], int] = ([], 0)

    def collect(self):
        replicas, queued_in_frontend = self.snapshot
        engines = [r["engine"] for r in replicas if r["engine"]]

        def total(key: str) -> int:
            return sum(e.get(key, 0) for e in engines)

        yield GaugeMetricFamily("splitfuse_requests_running", "Requests the workers are running",
                                value=total("running"))
        yield GaugeMetricFamily("splitfuse_requests_waiting", "Requests waiting for a worker to schedule them, "
                                "or for their prompt to be tokenized", value=total("waiting") + queued_in_frontend)
        yield GaugeMetricFamily("splitfuse_kv_blocks_in_use", "KV cache blocks in use", value=total("blocks_in_use"))
        yield GaugeMetricFamily("splitfuse_kv_blocks", "KV cache blocks", value=total("blocks_total"))
        yield GaugeMetricFamily("splitfuse_replicas_ready", "Replicas that serve",
                                value=sum(r["ready"] for r in replicas))
        yield CounterMetricFamily("splitfuse_preemptions", "Requests preempted for lack of KV blocks, since the "
                                  "replicas (re)started", value=total("preemptions"))
