"""Tensor parallelism on CPU over gloo: a group of two ranks computes what one process does.

The oracle is our single-process forward (itself held to transformers' logits in test_models.py).
fp32 throughout: two ranks add their partial products in another order than one process, so logits
differ by rounding only, and greedy tokens are the same. Every process a test starts is ended, and
the tests check that none outlives its group."""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.compiled.loader import load_config, load_model
from splitfuse.compiled.models.llama import LlamaForCausalLM
from splitfuse.compiled.models.sharded import attention_heads
from splitfuse.compiled.parallel import Shard
from splitfuse.compiled.runner import ModelRunner, SequenceChunk, kv_cache_bytes_per_block
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.frontend.client import AsyncClient
from splitfuse.frontend.pipeline import pipeline
from splitfuse.frontend.serve import serve
from splitfuse.worker.engine import Engine

# A small budget: prompts are split over several steps and share them with decodes; prefill-first
# steps exceed it (the runner's oversized path).
ENGINE = dict(device="cpu", dtype="fp32", eager=True, num_blocks=128, max_model_len=256, token_budget=32)
SAMPLING = dict(max_new_tokens=12, ignore_eos=True, logprobs=0)
LOGPROB_TOLERANCE = 1e-3  # of the chosen tokens' log-probabilities, TP=2 against TP=1 (measured: about 1e-4)
LOGITS_TOLERANCE = 1e-5   # tiny models' logits, two ranks against one (measured: about 1e-7)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, 20000, (n,), generator=g).tolist() for n in (5, 40, 75)]


@pytest.fixture(scope="module")
def one_rank() -> list[tuple[list[int], list[float]]]:
    """(tokens, logprobs) of each prompt from one in-process engine: the oracle for either scheduler (test_engine.py
    holds the two to the same tokens)."""
    engine = Engine(EngineConfig(**ENGINE), progress=False)
    for i, p in enumerate(prompts()):
        engine.add_request(str(i), p, SamplingParams(**SAMPLING))
    tokens, logprobs = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.id, []).extend(out.token_ids)
            logprobs.setdefault(out.id, []).extend(out.logprobs)
    return [(tokens[str(i)], logprobs[str(i)]) for i in range(len(prompts()))]


def assert_same_answers(answers, expected) -> None:
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(answers, expected):
        assert tokens == want_tokens
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=LOGPROB_TOLERANCE, rtol=0)


async def complete_all(address: str) -> list[tuple[list[int], list[float]]]:
    """Every prompt at once, so that steps mix prompt chunks and decodes."""
    async with AsyncClient(address) as client:
        answers = await asyncio.gather(*(client.complete(p, **SAMPLING) for p in prompts()))
    return [(a.token_ids, a.logprobs) for a in answers]


def run(coroutine, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def children(pid: int) -> list[int]:
    """Live child processes of `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "processes outlived their group"


def mixed_steps(path: Path, shard: Shard) -> torch.Tensor:
    """A model's logits for a step mixing decodes and a new prompt, after a step of prompts."""
    model = load_model(path, torch.float32, torch.device("cpu"), shard)
    runner = ModelRunner(model, num_blocks=16, block_size=16, max_num_seqs=4, max_model_len=64, buckets=[64],
                         compile=False)
    ps = [[(7 * i + 3 * n) % 128 for i in range(n)] for n in (5, 17, 33)]
    tables = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    runner.execute([SequenceChunk(p[:-1], 0, t, False) for p, t in zip(ps, tables)])
    return runner.execute([SequenceChunk(p[-1:], len(p) - 1, t, True) for p, t in zip(ps, tables)]
                          + [SequenceChunk(list(range(9)), 0, [9], True)])


def _rank(rank: int, store: str, out: str, paths: list[str]) -> None:
    """One rank of a two-rank group (this file run as a script); rank 0 saves the logits."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    logits = [mixed_steps(Path(p), Shard(rank, 2, dist.group.WORLD)) for p in paths]
    if rank == 0:
        torch.save(logits, out)
    # Both ranks done with the group, then out without tearing it down: gloo's threads, torn down at exit (with
    # destroy_process_group first or not), ended a rank now and then in std::terminate (exit status -6), which
    # is not what this test is about. The logits are saved by then.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_ranks_compute_the_logits_of_one(tmp_path, make_checkpoint):
    """Llama (GQA, a KV head per rank), Mistral (one KV head, replicated), Qwen2 (q/k/v bias), OPT (row bias)."""
    paths = [make_checkpoint(f) for f in ("llama", "mistral", "qwen2", "opt")]
    ranks = [subprocess.Popen([sys.executable, __file__, str(r), str(tmp_path / "store"), str(tmp_path / "out.pt"),
                               *map(str, paths)]) for r in range(2)]
    try:
        assert [p.wait(120) for p in ranks] == [0, 0]
    finally:
        for p in ranks:
            p.kill()
    for path, logits in zip(paths, torch.load(tmp_path / "out.pt")):
        torch.testing.assert_close(logits, mixed_steps(path, Shard()), atol=LOGITS_TOLERANCE, rtol=0)


def test_each_rank_holds_about_half_of_the_weights_and_of_the_kv_cache():
    """SmolLM2's 3 KV groups go 1 and 2 over two ranks; the MLP and the (tied) vocabulary split evenly."""
    def weight_bytes(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied weight counts once

    def build(shard: Shard):  # the shapes are what count here; test_two_ranks_... checks what is loaded into them
        with torch.device("meta"):
            return LlamaForCausalLM(load_config(bundled_model_dir()), shard)
    whole, ranks = build(Shard()), [build(Shard(r, 2)) for r in range(2)]
    for model in ranks:
        assert 0.45 < weight_bytes(model) / weight_bytes(whole) < 0.55
        assert model.lm_head.weight is model.model.embed_tokens.weight
    kv = [kv_cache_bytes_per_block(m, 16, torch.float32) for m in ranks]
    assert sum(kv) == kv_cache_bytes_per_block(whole, 16, torch.float32) and kv[0] < kv[1]


def test_sizes_that_do_not_fit_are_refused_with_a_sentence():
    with pytest.raises(ValueError, match="at most 3 ranks, or a multiple of 3 that divides 9"):
        attention_heads(9, 3, Shard(0, 4))
    assert attention_heads(8, 2, Shard(3, 4)) == attention_heads(8, 2, Shard(3, 4))
    assert attention_heads(8, 2, Shard(3, 4)).kv_start == 1  # ranks 2 and 3 share KV head 1
    for options, message in (({"tensor_parallel_size": 0}, "positive integer"),
                             ({"tensor_parallel_size": 4, "nnodes": 3}, "must divide"),
                             ({"tensor_parallel_size": 2, "nnodes": 2}, "needs master_port")):
        with pytest.raises(ValueError, match=message):
            EngineConfig(**options)


def test_pipeline_with_two_ranks_answers_as_one_rank(one_rank):
    """prefill-first: whole prompts in one step, over the budget (each rank runs it eagerly at its size)."""
    with pipeline(tensor_parallel_size=2, scheduler="prefill-first", **ENGINE) as pipe:
        answers = pipe(prompts(), **SAMPLING)
    assert_same_answers([(a.token_ids, a.logprobs) for a in answers], one_rank)


def test_a_served_group_answers_as_one_rank_and_comes_back_when_a_rank_dies(one_rank):
    with serve(tensor_parallel_size=2, ready_timeout=300, **ENGINE) as deployment:
        assert_same_answers(run(complete_all(deployment.address)), one_rank)
        run(_lose_rank_1(deployment.address), timeout=240)
        leader = run(_stats(deployment.address))["pid"]
        group = [leader, *children(leader)]
        assert len(group) == 2
    wait_gone(group)


async def _stats(address: str) -> dict:
    async with AsyncClient(address) as client:
        return (await client.stats())["replicas"][0]


async def _lose_rank_1(address: str) -> None:
    """Kill rank 1 under two long requests: both end with an error within seconds, and the group (rank 0
    and a new rank 1) comes back and serves."""
    async with AsyncClient(address) as client:
        started = [asyncio.Event() for _ in range(2)]

        async def consume(i: int):
            async for delta in client.generate(f"Count from {i} to a thousand:", max_new_tokens=200, ignore_eos=True):
                started[i].set()
            return delta
        tasks = [asyncio.create_task(consume(i)) for i in range(2)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        victim = (await client.stats())["replicas"][0]
        (follower,) = children(victim["pid"])
        os.kill(follower, signal.SIGKILL)
        ends = await asyncio.wait_for(asyncio.gather(*tasks), 15)
        assert all(d.finish_reason == "error" for d in ends), ends
        wait_gone([victim["pid"], follower])
        deadline = time.monotonic() + 120
        while not ((r := (await client.stats())["replicas"][0])["ready"] and r["pid"] != victim["pid"]):
            assert time.monotonic() < deadline, "the group did not come back"
            await asyncio.sleep(0.2)
        answer = await client.complete("Say hi.", max_new_tokens=4)
        assert answer.error is None and answer.token_ids


def test_a_group_over_two_hosts_answers_as_one_rank(one_rank):
    """Two "hosts" on 127.0.0.1: this one serves with rank 0, `splitfuse serve --node-rank 1` runs rank 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-port", str(port), "--device", "cpu", "--dtype", "fp32", "--eager",
             "--num-blocks", "128", "--max-model-len", "256", "--token-budget", "32"]
    node = subprocess.Popen([sys.executable, "-P", "-m", "splitfuse.cli", "serve", "--node-rank", "1", *flags])
    try:
        with serve(tensor_parallel_size=2, nnodes=2, master_port=port, ready_timeout=300, **ENGINE) as deployment:
            assert_same_answers(run(complete_all(deployment.address)), one_rank)
        ranks = children(node.pid)
    finally:
        node.terminate()
        node.wait(30)
    wait_gone(ranks)


if __name__ == "__main__":
    _rank(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
