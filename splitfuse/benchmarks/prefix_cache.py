"""Prefix caching and prefix-aware routing on a shared-prefix chat workload, all setups in one run.

    python -P -m splitfuse.benchmarks.prefix_cache            # 64 chats + 8 conversations of 4 turns, 16 clients
    python -P -m splitfuse.benchmarks.prefix_cache --quick    # smoke run: a few short requests, eager

The workload: one system prompt of ~1,000 tokens; 64 chats, each the system prompt and one short
distinct question; and conversations that start the same way, each later turn's prompt being the
previous prompt, its answer and a new question. Closed-loop streaming clients take the next chat
or conversation as soon as their last one ended (a conversation's turns in order, by one client).
Every setup is a fresh `splitfuse serve` (an empty cache) with the same requests: one replica
with the cache off and on, and two replicas with the cache on, routed by least outstanding work
alone and prefix-aware. Reported: throughput (requests/s, prompt+generated tokens/s), time to
first token, and the hit rate (prompt tokens served from the cache over prompt tokens looked up,
from the replicas' stats). Writes splitfuse/benchmarks/results/prefix_cache.json and prefix_cache.md."""
import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import splitfuse
from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.frontend.client import AsyncClient

from . import workload
from .metrics import Distribution, Timeline, duration, ttft
from .run import machine

RESULTS = Path(__file__).parent / "results"
STATS_SETTLE_S = 1.5  # workers report their stats with a heartbeat (every second, and when they go idle)
DEFAULT = dict(chats=64, conversations=8, turns=4, system_tokens=1000, question_tokens=(16, 48), answer_tokens=32,
               clients=16)
QUICK = dict(chats=4, conversations=1, turns=2, system_tokens=160, question_tokens=(8, 16), answer_tokens=4,
             clients=4)
SETUPS = {  # name: (replicas, engine options)
    "1 replica, cache off": (1, dict(enable_prefix_caching=False)),
    "1 replica, cache on": (1, {}),
    "2 replicas, cache on, least-work routing": (2, dict(prefix_routing=False)),
    "2 replicas, cache on, prefix routing": (2, {}),
}


@dataclass(slots=True)
class Result:
    setup: str
    requests: int
    failed: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float       # prompt + generated
    ttft_s: Distribution
    hit_rate: float           # prompt tokens served from the cache / prompt tokens looked up


def sessions(corpus: list[int], size: dict, seed: int) -> tuple[list[int], list[list[list[int]]]]:
    """The system prompt and the sessions: each a list of questions (a chat has one), shuffled."""
    rng = random.Random(seed)
    system = corpus[:size["system_tokens"]]

    def question() -> list[int]:
        n = rng.randint(*size["question_tokens"])
        start = rng.randrange(size["system_tokens"], len(corpus) - n)
        return corpus[start:start + n]
    chats = [[question()] for _ in range(size["chats"])]
    talks = [[question() for _ in range(size["turns"])] for _ in range(size["conversations"])]
    mixed = chats + talks
    rng.shuffle(mixed)
    return system, mixed


async def turn(client: AsyncClient, prompt: list[int], max_new: int) -> tuple[Timeline, list[int]]:
    """One streamed request: its timeline and the generated ids."""
    timeline, answer = Timeline(len(prompt), time.perf_counter()), []
    finish = None
    try:
        async for delta in client.generate(prompt, max_new_tokens=max_new, ignore_eos=True, timeout=600.0):
            timeline.token_times.extend([time.perf_counter()] * len(delta.token_ids))
            answer += delta.token_ids
            finish = delta.finish_reason
    except (ValueError, asyncio.TimeoutError):
        finish = "error"
    timeline.completed = finish == "length" and len(answer) == max_new
    return timeline, answer


async def drive(address: str, system: list[int], mixed: list[list[list[int]]], clients: int,
                max_new: int) -> list[Timeline]:
    timelines: list[Timeline] = []
    pending = iter(mixed)

    async def client_loop(client: AsyncClient) -> None:
        for questions in pending:  # one shared iterator: each session is taken by exactly one client
            history = system
            for q in questions:
                timeline, answer = await turn(client, history + q, max_new)
                timelines.append(timeline)
                history = history + q + answer

    async with AsyncClient(address) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return timelines


async def cache_counts(address: str) -> tuple[int, int]:
    """(queries, hits) in prompt tokens, summed over the replicas."""
    await asyncio.sleep(STATS_SETTLE_S)
    async with AsyncClient(address) as client:
        stats = await client.stats()
    engines = [r.get("engine", {}) for r in stats["replicas"]]
    return (sum(e.get("prefix_cache_queries", 0) for e in engines), sum(e.get("prefix_cache_hits", 0) for e in engines))


def run_setup(name: str, args: argparse.Namespace, system: list[int], mixed: list, corpus: list[int],
              size: dict) -> Result:
    replicas, options = SETUPS[name]
    engine = dict(dtype=args.dtype, eager=args.eager, background_compile=False) | options
    if args.token_budget:
        engine["token_budget"] = args.token_budget
    with splitfuse.serve(args.model, replicas=replicas, **engine) as deployment:
        # Warm-up on tokens from the far end of the corpus, which no request of the run starts with.
        asyncio.run(drive(deployment.address, corpus[-200:-100], [[corpus[-40:-20]]] * 2 * replicas, 2 * replicas, 4))
        before = asyncio.run(cache_counts(deployment.address))
        start = time.perf_counter()
        timelines = asyncio.run(drive(deployment.address, system, mixed, size["clients"], size["answer_tokens"]))
        print(f"  {name}: {len(timelines)} requests in {time.perf_counter() - start:.1f}s", flush=True)
        after = asyncio.run(cache_counts(deployment.address))
    done = [t for t in timelines if t.completed]
    seconds = duration(timelines)
    queries, hits = after[0] - before[0], after[1] - before[1]
    return Result(name, len(timelines), len(timelines) - len(done), seconds, len(done) / seconds,
                  sum(t.prompt_length + len(t.token_times) for t in done) / seconds,
                  Distribution.of([ttft(t) for t in done]), hits / queries if queries else 0.0)


def markdown(results: list[Result], size: dict, command: str, host: dict) -> str:
    lines = [f"Shared-prefix workload: {size['chats']} chats and {size['conversations']} conversations of "
             f"{size['turns']} turns on one {size['system_tokens']}-token system prompt, questions of "
             f"{size['question_tokens'][0]}-{size['question_tokens'][1]} tokens, {size['answer_tokens']} tokens per "
             f"answer, {size['clients']} closed-loop clients. `{command}` on {host['cpu']}, {host['cores']} cores, "
             f"torch {host['torch']}.", "",
             "| setup | requests | s | requests/s | tokens/s | TTFT p50 s | TTFT p90 s | hit rate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.setup}{f' ({r.failed} failed)' if r.failed else ''} | {r.requests} | {r.seconds:.1f} | "
                     f"{r.requests_per_s:.2f} | {r.tokens_per_s:.0f} | {r.ttft_s.percentiles[50]:.2f} | "
                     f"{r.ttft_s.percentiles[90]:.2f} | {r.hit_rate:.0%} |")
    by = {r.setup: r for r in results}
    off, on = by.get("1 replica, cache off"), by.get("1 replica, cache on")
    if off and on:
        lines += ["", f"Cache on against off, one replica: median TTFT {off.ttft_s.percentiles[50] / on.ttft_s.percentiles[50]:.1f}x "
                      f"lower (goal 3x), throughput {on.requests_per_s / off.requests_per_s:.1f}x (goal 2x)."]
    plain, routed = by.get("2 replicas, cache on, least-work routing"), by.get("2 replicas, cache on, prefix routing")
    if plain and routed and on:
        lines.append(f"Two replicas: hit rate {plain.hit_rate:.0%} by least work, {routed.hit_rate:.0%} with prefix "
                     f"routing; one replica {on.hit_rate:.0%}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few short requests, eager, in minutes")
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--model", default=None, help="a local model directory (default: the bundled one)")
    parser.add_argument("--dtype", default="auto", help="the engine's choice: bf16 where the CPU has it natively")
    parser.add_argument("--token-budget", type=int, default=None, help="engine token budget (default: the engine's)")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (saves its warm-up per server)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else DEFAULT
    args.eager = args.eager or args.quick
    corpus = workload.corpus_ids(args.model or bundled_model_dir())
    system, mixed = sessions(corpus, size, args.seed)
    results = [run_setup(name, args, system, mixed, corpus, size) for name in args.setups]
    command = "python -P -m splitfuse.benchmarks.prefix_cache " + " ".join(argv if argv is not None else sys.argv[1:])
    host = machine()
    text = markdown(results, size, command.strip(), host)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_cache.md").write_text(text + "\n")
    (args.out / "prefix_cache.json").write_text(json.dumps(
        {"machine": host, "settings": vars(args) | {"size": size}, "results": [asdict(r) for r in results]},
        indent=1, default=str))
    print("\n" + text)


if __name__ == "__main__":
    main()
