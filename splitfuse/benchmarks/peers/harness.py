"""The measuring half of every runner: each system's runner only opens its engine and says how to
generate; this module runs the same sequence on all of them and writes the same result file.

Runners for peers run by file path inside their own virtual environment (this file is imported as
the top-level module `harness` there), so it uses the standard library only.

Sequence: open the engine, answer the probe (a short prompt, one token: the engine is "ready"
when that answer is back), warm up, let the engine settle (one that compiles in the background
finishes), warm up again, time the single-stream prompts one at a time, then the offline batch
(all prompts in one call). Every generation is greedy with EOS ignored."""
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

# generate(prompts, max_new_tokens) -> generated token ids of each prompt, in order
Generate = Callable[[list[list[int]], int], list[list[int]]]


@dataclass
class Engine:
    generate: Generate
    info: dict[str, Any]                          # the version, and how the system was run
    settle: Callable[[], None] = lambda: None     # returns once the engine runs at its full speed


OpenEngine = Callable[[dict[str, Any]], AbstractContextManager[Engine]]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(engine: Engine, workload: dict[str, Any]) -> dict[str, Any]:
    """Everything after the engine is open; `ready_at` is wall-clock time, comparable across processes."""
    generate = engine.generate
    generate([workload["probe"]], 1)
    result: dict[str, Any] = {"ready_at": time.time()}
    progress("ready; warming up")

    def warm_up() -> None:
        generate(workload["warmup"], workload["warmup_new_tokens"])
        generate([workload["probe"]], workload["warmup_new_tokens"])  # a lone sequence, as single stream
    warm_up()
    start = time.perf_counter()
    engine.settle()
    result["settle_seconds"] = time.perf_counter() - start
    warm_up()  # again: what an engine switched to once settled (compiled code) warms up too
    single_seconds, single_ids = [], []
    for prompt in workload["single"]:
        start = time.perf_counter()
        single_ids.append(generate([prompt], workload["single_new_tokens"])[0])
        single_seconds.append(time.perf_counter() - start)
    progress(f"single stream: {', '.join(f'{s:.2f}' for s in single_seconds)} s; "
             f"offline: {len(workload['offline'])} requests")
    start = time.perf_counter()
    offline_ids = generate(workload["offline"], workload["offline_new_tokens"])
    result.update(single_seconds=single_seconds, single_median_s=statistics.median(single_seconds),
                  offline_seconds=time.perf_counter() - start, single_ids=single_ids, offline_ids=offline_ids)
    progress(f"offline: {result['offline_seconds']:.1f} s")
    return result


def main(open_engine: OpenEngine) -> None:
    """`runner.py WORKLOAD.json RESULT.json`: the workload file holds the token ids and the settings."""
    workload_path, result_path = sys.argv[1:3]
    with open(workload_path) as f:
        workload = json.load(f)
    with open_engine(workload["settings"]) as engine:
        result = measure(engine, workload)
    result["info"] = engine.info
    with open(result_path, "w") as f:
        json.dump(result, f)


def chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
