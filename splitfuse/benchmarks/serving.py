"""Load generator: N concurrent streaming clients driving a running `splitfuse serve`, or any
OpenAI-compatible server (`splitfuse serve --http-port`, `vllm serve`, ...).

    python -P -m splitfuse.benchmarks.serving --address tcp://127.0.0.1:5555 --preset p2600-g128 --clients 1 4 16
    python -P -m splitfuse.benchmarks.serving --address http://127.0.0.1:8000/v1 --preset p2600-g128 --clients 1 4 16

Each client sends its next request as soon as its previous one finished (a closed loop, as in
FastGen's benchmark), all through one connection (ZeroMQ `AsyncClient`, or one `openai.AsyncOpenAI`
for an http:// address) with streaming, and records the send time and the arrival time of every
generated token; splitfuse/benchmarks/metrics.py turns those into throughput, latency percentiles and
effective throughput. Over HTTP the prompts go as token ids to /v1/completions, greedy, with vLLM's
`ignore_eos`; each streamed chunk counts as one token, checked against the final usage. Workloads:
splitfuse/benchmarks/workload.py."""
import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from splitfuse.frontend.client import AsyncClient

from . import report
from .metrics import Timeline
from .workload import PRESETS, Request, corpus_ids, make_workload


REQUEST_TIMEOUT = 600.0  # seconds; a request without an answer by then counts as failed, and the run goes on


# Streams one request into its timeline; returns its finish reason.
Streamer = Callable[[Request, Timeline, float], Awaitable[str | None]]


async def send(stream: Streamer, request: Request, timeout: float = REQUEST_TIMEOUT) -> Timeline:
    """One streamed request; each token's arrival is the arrival of the delta that carried it."""
    timeline = Timeline(len(request.prompt_ids), time.perf_counter())
    try:
        finish = await asyncio.wait_for(stream(request, timeline, timeout), timeout)
    except Exception:  # refused by the server, failed, or no answer in time: counted as not completed
        finish = "error"
    timeline.completed = finish == "length" and len(timeline.token_times) == request.max_new_tokens
    return timeline


@asynccontextmanager
async def connect(address: str) -> AsyncIterator[Streamer]:
    """A streamer over one connection: OpenAI-compatible HTTP for an http(s):// address, else ZeroMQ."""
    if not address.startswith(("http://", "https://")):
        async with AsyncClient(address) as client:
            yield lambda request, timeline, timeout: _stream_zmq(client, request, timeline, timeout)
        return
    import openai  # only the HTTP mode needs it (the dev extra)
    async with openai.AsyncOpenAI(base_url=address, api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT) as api:
        model = (await api.models.list()).data[0].id
        yield lambda request, timeline, timeout: _stream_openai(api, model, request, timeline)


async def _stream_zmq(client: AsyncClient, request: Request, timeline: Timeline, timeout: float) -> str | None:
    finish = None
    async for delta in client.generate(request.prompt_ids, max_new_tokens=request.max_new_tokens,
                                       ignore_eos=True, timeout=timeout):
        now = time.perf_counter()
        timeline.token_times.extend([now] * len(delta.token_ids))
        finish = delta.finish_reason
    return finish


async def _stream_openai(api, model: str, request: Request, timeline: Timeline) -> str | None:
    finish = None
    stream = await api.completions.create(model=model, prompt=request.prompt_ids, max_tokens=request.max_new_tokens,
                                          temperature=0, stream=True, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            timeline.token_times.append(now)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:  # a chunk may have carried several tokens, or none
            generated = chunk.usage.completion_tokens
            timeline.token_times = timeline.token_times[:generated]
            timeline.token_times += [now] * (generated - len(timeline.token_times))
    return finish


async def run_clients(address: str, requests: list[Request], clients: int) -> list[Timeline]:
    """`clients` closed-loop clients sharing the request list; timelines in request order."""
    timelines: list[Timeline | None] = [None] * len(requests)
    pending = iter(range(len(requests)))

    async def client_loop(stream: Streamer) -> None:
        for i in pending:  # one shared iterator: each request is taken by exactly one client
            timelines[i] = await send(stream, requests[i])

    async with connect(address) as stream:
        await asyncio.gather(*(client_loop(stream) for _ in range(clients)))
    return timelines


def run(address: str, requests: list[Request], clients: int) -> list[Timeline]:
    return asyncio.run(run_clients(address, requests, clients))


def level_size(clients: int, requests_per_client: int, min_requests: int) -> int:
    """Requests at one concurrency level: enough for every client to send several, and a floor."""
    return max(min_requests, clients * requests_per_client)


def requests_needed(clients: list[int], requests_per_client: int, min_requests: int) -> int:
    return max(level_size(n, requests_per_client, min_requests) for n in clients)


def sweep(address: str, requests: list[Request], clients: list[int], requests_per_client: int,
          min_requests: int) -> dict[int, list[Timeline]]:
    """One closed-loop run per concurrency level, each on the first `level_size` requests (a shared prefix)."""
    results = {}
    for n in clients:
        count = level_size(n, requests_per_client, min_requests)
        start = time.perf_counter()
        results[n] = run(address, requests[:count], n)
        failed = sum(1 for t in results[n] if not t.completed)
        print(f"    {n:3d} clients: {count} requests in {time.perf_counter() - start:.1f}s"
              + (f", {failed} FAILED" if failed else ""), flush=True)
    return results


def warm_up(address: str, corpus: list[int]) -> None:
    """A few short requests first, so one-time costs (first allocations, caches) stay out of the numbers."""
    run(address, [Request(corpus[:64], 4), Request(corpus[64:80], 4)], 2)


def main() -> None:
    """Sweep one workload against a server someone else started; print its table (SLA from 1 client)."""
    from splitfuse.compiled.bundled import bundled_model_dir  # no torch unless the model must be converted

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="a running server: ZeroMQ, e.g. tcp://127.0.0.1:5555, or "
                                                         "OpenAI-compatible HTTP, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model-dir", default=None, help="for its tokenizer; default: the bundled model")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="p2600-g128")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--sla-prompt-slowdown", type=float, default=report.SLA_PROMPT_SLOWDOWN)
    parser.add_argument("--sla-gen-slowdown", type=float, default=report.SLA_GEN_SLOWDOWN)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if 1 not in args.clients:
        parser.error("--clients must include 1: the SLA is derived from the single-request speed")

    corpus = corpus_ids(args.model_dir or bundled_model_dir())
    preset = PRESETS[args.preset]
    requests = make_workload(preset, requests_needed(args.clients, args.requests_per_client, args.min_requests),
                             corpus, args.seed)
    print(preset.describe())
    warm_up(args.address, corpus)
    results = {preset.name: report.PresetResults(preset, {"server": sweep(
        args.address, requests, args.clients, args.requests_per_client, args.min_requests)})}
    report.derive_slas(results, args.sla_prompt_slowdown, args.sla_gen_slowdown)
    print(report.sla_lines(results, args.sla_prompt_slowdown, args.sla_gen_slowdown))
    print(report.serving_table(results))
    if args.out:
        report.save(args.out, results, {"settings": vars(args) | {"out": str(args.out)}})


if __name__ == "__main__":
    main()
