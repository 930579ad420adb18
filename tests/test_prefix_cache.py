"""Prefix caching: block reuse and its bookkeeping without a model (a fake one checks what every chunk
reads), then greedy tokens with the cache on and off on the tiny models and the bundled one."""
import random
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from splitfuse import protocol
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.frontend.replicas import Supervisor
from splitfuse.frontend.router import Router
from splitfuse.worker.block_manager import BlockManager, block_hash
from splitfuse.worker.engine import Engine
from splitfuse.worker.request import Request
from splitfuse.worker.scheduler import Scheduler

BLOCK = 16


def make(name: str, prompt: list[int], max_new: int = 4) -> Request:
    return Request(name, list(prompt), len(prompt), SamplingParams(max_new_tokens=max_new))


def fake_token(token_ids: list[int]) -> int:
    return (sum(t * (k + 1) for k, t in enumerate(token_ids)) * 31 + 7) % 500


class FakeModel:
    """Stands in for the runner: each computed position's K/V is the prefix it depends on, written into
    its slot; every position a chunk attends to must hold its own prefix's, and no chunk may write into
    a block another request holds."""

    def __init__(self):
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def run(self, request: Request, n: int, blocks: BlockManager) -> None:
        start, table = request.num_computed_tokens, request.block_table
        for pos in range(start + n):
            slot, prefix = (table[pos // BLOCK], pos % BLOCK), tuple(request.token_ids[:pos + 1])
            if pos >= start:
                assert blocks._refs[slot[0]] == 1, "a chunk writes into a shared block"
                self.slots[slot] = prefix
            else:
                assert self.slots.get(slot) == prefix, "a chunk reads the K/V of another prefix"


def check_blocks(sched: Scheduler) -> None:
    """Reference counts are the holders; every block is in use, free uncached, or cached and evictable."""
    bm = sched.blocks
    holders = Counter(b for r in sched.running for b in r.block_table)
    assert all(not r.block_table and r.num_computed_tokens == 0 for r in sched.waiting)
    assert bm._refs == [holders[b] for b in range(bm.num_blocks)]
    free, evictable, in_use = set(bm._free), set(bm._evictable), set(holders)
    assert len(free) == len(bm._free)
    assert not (free & evictable or free & in_use or evictable & in_use)
    assert free | evictable | in_use == set(range(bm.num_blocks))
    assert not free & set(bm._hash_of) and evictable <= set(bm._hash_of)
    assert {b: h for h, b in bm._cached.items()} == bm._hash_of
    assert bm.enable_caching or not bm._cached
    for r in sched.running:  # exact accounting: just the blocks of the computed tokens
        assert len(r.block_table) == bm.blocks_for(r.num_computed_tokens)


def step(sched: Scheduler, model: FakeModel) -> list[Request]:
    """One engine step with the fake model; returns the requests it finished."""
    finished = []
    for chunk in sched.schedule():
        r = chunk.request
        model.run(r, chunk.num_tokens, sched.blocks)
        r.num_computed_tokens += chunk.num_tokens
        if r.num_computed_tokens == len(r.token_ids):
            r.token_ids.append(fake_token(r.token_ids))
            if r.num_generated == r.params.max_new_tokens:
                sched.remove(r)
                finished.append(r)
    return finished


def drain(sched: Scheduler, model: FakeModel) -> list[Request]:
    finished = []
    for _ in range(3000):
        if not (sched.waiting or sched.running):
            return finished
        finished += step(sched, model)
        check_blocks(sched)
    raise AssertionError("the scheduler did not finish")


def test_hashes_chain_so_equal_hashes_mean_equal_prefixes():
    a, b = list(range(16)), list(range(16, 32))
    assert block_hash(b"", a) == block_hash(b"", list(a))
    assert block_hash(block_hash(b"", a), b) != block_hash(block_hash(b"", [99] + a[1:]), b)
    assert block_hash(b"", [1, 2]) != block_hash(b"", [513])  # packed, not summed or concatenated as text


def test_a_prompt_entirely_cached_still_computes_its_last_token_in_a_fresh_block():
    sched, model = Scheduler("splitfuse", 64, 8, BlockManager(8, BLOCK)), FakeModel()
    prompt = list(range(32))
    first = make("a", prompt, max_new=1)
    sched.add(first)
    drain(sched, model)
    again, longer = make("b", prompt, max_new=1), make("c", prompt + [7], max_new=1)
    sched.add(again)
    sched.add(longer)
    chunks = [(c.request.request_id, c.request.num_computed_tokens, c.num_tokens) for c in sched.schedule()]
    # The exact repeat takes only its first block: the second holds its last token, which must be computed.
    assert chunks == [("b", 16, 16), ("c", 32, 1)]
    assert (again.num_cached_tokens, longer.num_cached_tokens) == (16, 32)
    assert again.block_table[0] == longer.block_table[0] and again.block_table[1] != longer.block_table[1]
    assert (sched.blocks.queries, sched.blocks.hits) == (32 + 32 + 33, 48)


def test_eviction_takes_the_least_recently_used_free_block_never_one_in_use():
    bm = BlockManager(4, BLOCK)
    old, new = make("old", list(range(33))), make("new", list(range(100, 133)))
    for r in (old, new):
        bm.take_cached_prefix(r)
        bm.allocate(r, 32)
        r.num_computed_tokens = 32
    new_blocks = list(new.block_table)
    bm.free(old)
    bm.free(new)  # both prefixes cached and unreferenced: old's blocks are the least recently used
    assert bm.num_cached == 4 and bm.num_free == 4 and bm.num_used == 0
    reuse = make("reuse", list(range(40)))
    bm.take_cached_prefix(reuse)  # old's prefix in use again
    assert reuse.num_computed_tokens == 32 and bm.num_free == 2
    fresh = make("fresh", list(range(200, 220)))
    bm.allocate(fresh, 16)
    assert fresh.block_table == new_blocks[1:] and bm.num_cached == 3  # new's tail: the least recently used
    bm.allocate(fresh, 32)
    assert fresh.block_table == new_blocks[::-1] and bm.num_cached == 2  # never old's, which reuse holds
    with pytest.raises(RuntimeError):
        bm.allocate(make("more", [1]), 1)
    assert bm.tokens_that_fit(make("more", [1]), 16) == 0


def test_caching_off_reuses_nothing():
    sched, model = Scheduler("splitfuse", 64, 8, BlockManager(8, BLOCK, enable_caching=False)), FakeModel()
    for name in "ab":
        sched.add(make(name, list(range(40)), max_new=2))
        drain(sched, model)
    assert sched.blocks.hits == 0 and sched.blocks.num_cached == 0 and sched.blocks.num_free == 8


PREFIX = [random.Random(0).randrange(500) for _ in range(64)]
OPS = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 64), st.integers(0, 20), st.integers(1, 12)),
    st.tuples(st.just("follow-up"), st.integers(0, 1000), st.integers(1, 10), st.integers(1, 6)),
    st.tuples(st.just("step")), st.tuples(st.just("step")), st.tuples(st.just("step")),
    st.tuples(st.just("abort"), st.integers(0, 1000)),
    st.tuples(st.just("preempt")),
)


@settings(max_examples=150, deadline=None)
@given(policy=st.sampled_from(["splitfuse", "prefill-first"]), budget=st.sampled_from([8, 32, 64]),
       num_blocks=st.integers(4, 24), caching=st.booleans(), ops=st.lists(OPS, max_size=60))
def test_random_add_abort_finish_preempt_keeps_blocks_consistent(policy, budget, num_blocks, caching, ops):
    sched, model = Scheduler(policy, budget, 8, BlockManager(num_blocks, BLOCK, caching)), FakeModel()
    finished: list[Request] = []
    room = num_blocks * BLOCK
    for i, op in enumerate(ops):
        live = [*sched.running, *sched.waiting]
        if op[0] == "add":
            prompt = PREFIX[:op[1]] + [500 + i * 20 + j for j in range(op[2])]
            if prompt and len(prompt) + op[3] <= room:
                sched.add(make(str(i), prompt, op[3]))
        elif op[0] == "follow-up" and finished:  # the next turn of a conversation: its answer is in the prompt
            prompt = finished[op[1] % len(finished)].token_ids + [900 + j for j in range(op[2])]
            if len(prompt) + op[3] <= room:
                sched.add(make(str(i), prompt, op[3]))
        elif op[0] == "step":
            finished += step(sched, model)
        elif op[0] == "abort" and live:
            sched.remove(live[op[1] % len(live)])
        elif op[0] == "preempt" and sched.running:
            sched._preempt_newest()
        check_blocks(sched)
    drain(sched, model)
    bm = sched.blocks
    assert bm.num_used == 0 and not any(bm._refs)  # idle: every block free, or cached and unreferenced
    assert len(bm._free) + len(bm._evictable) == num_blocks
    assert bm.hits <= bm.queries and (caching or bm.hits == 0)


# With a model: greedy tokens with the cache on and off.

def run(engine: Engine, prompts: dict[str, list[int]], max_new: int) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Add the prompts, run to the end; returns each request's tokens and its cached prompt tokens."""
    requests = {}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
        requests[rid] = engine._requests[rid]
    tokens = {rid: [] for rid in prompts}
    for _ in range(5000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            tokens[out.id] += out.token_ids
    assert engine.stats()["blocks_in_use"] == 0
    return tokens, {rid: r.num_cached_tokens for rid, r in requests.items()}


def waves(base: list[int], sfx: list[int], first_answer: list[int] | None = None) -> list[dict[str, list[int]]]:
    """A first prompt of exactly five blocks, then prompts sharing 0 to all of it (and its answer)."""
    later = {f"share{k}": base[:k] + sfx for k in (5, 16, 47, 48, 49, 80)} | {"again": base[:80]}
    if first_answer is not None:
        later["follow-up"] = base[:80] + first_answer + sfx
    return [{"first": base[:80]}, later]


def compare_on_and_off(model, options: dict, base: list[int], sfx: list[int]) -> dict[str, int]:
    """Greedy tokens of the waves with the cache on and off; returns the cached prompt tokens (cache on)."""
    results = []
    for caching in (True, False):
        engine = Engine(EngineConfig(model=model, dtype="float32", device="cpu", eager=True, block_size=BLOCK,
                                     enable_prefix_caching=caching, **options), progress=False)
        first, _ = run(engine, waves(base, sfx)[0], max_new=17)
        tokens, cached = run(engine, waves(base, sfx, first["first"])[1], max_new=3)
        results.append((first, tokens, cached, engine.stats()))
    (first_on, on, cached, stats), (first_off, off, cached_off, stats_off) = results
    assert first_on == first_off and on == off
    assert not any(cached_off.values()) and stats_off["prefix_cache_hits"] == 0
    # Hits count at every admission, a preempted request's again: at least what the requests report.
    assert stats["prefix_cache_hits"] >= sum(cached.values()) > 0 and stats["blocks_cached"] > 0
    return cached


# 80 prompt + 17 generated tokens: K/V for 96 fill a sixth block with the answer, which the follow-up finds too.
EXPECTED_CACHED = {"share5": 0, "share16": 16, "share47": 32, "share48": 48, "share49": 48, "share80": 80,
                   "again": 64, "follow-up": 96}


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("policy", ["splitfuse", "prefill-first"])
def test_tiny_models_give_the_same_greedy_tokens_with_and_without_the_cache(make_checkpoint, family, policy):
    """Mistral's sliding window (8 tokens) needs nothing special: a block's K/V depend only on its prefix.
    A pool of 12 blocks preempts, and evicts cached blocks while others are in use."""
    g = random.Random(1)
    base, sfx = [g.randrange(128) for _ in range(80)], [g.randrange(128) for _ in range(9)]
    for num_blocks, token_budget in ((128, 64), (12, 32)):
        cached = compare_on_and_off(str(make_checkpoint(family)), dict(num_blocks=num_blocks, scheduler=policy,
                                                                        token_budget=token_budget, max_num_seqs=8),
                                    base, sfx)
        if num_blocks == 128:
            assert cached == EXPECTED_CACHED


def test_bundled_model_gives_the_same_greedy_tokens_with_and_without_the_cache():
    g = random.Random(2)
    base, sfx = [g.randrange(3, 40000) for _ in range(80)], [g.randrange(3, 40000) for _ in range(9)]
    cached = compare_on_and_off(None, dict(num_blocks=64, token_budget=128, max_num_seqs=8), base, sfx)
    assert cached == EXPECTED_CACHED


# Routing: a repeated prefix goes to the replica that holds it, until that replica is overloaded.

def fake_router(prefix_routing: bool) -> Router:
    """A router over two replicas that count as ready without processes (sends to them go nowhere)."""
    supervisor = Supervisor(EngineConfig(prefix_routing=prefix_routing), replicas=2)
    supervisor.info = protocol.Ready(0, 0, "", 4096, "")
    for r in supervisor.replicas:
        r.identity = b"w%d" % r.index
    return Router(supervisor)


@pytest.mark.parametrize("prefix_routing", [True, False])
def test_two_replicas_route_a_repeated_prefix_to_the_same_replica(prefix_routing):
    router = fake_router(prefix_routing)
    try:
        system, params = list(range(1000, 1320)), SamplingParams(max_new_tokens=32)  # a 20-block system prompt
        router.submit("other", list(range(200)), params)                              # replica 0 is busier
        for i in range(6):
            router.submit(f"chat{i}", system + [i] * 5, params)
        chats = [router.jobs[f"chat{i}"].replica.index for i in range(6)]
        if not prefix_routing:
            assert chats == [1, 0, 1, 0, 1, 0]   # least outstanding work alone spreads the prefix
            return
        assert chats == [1] * 6                  # they only cost their questions there
        assert [router.jobs[f"chat{i}"].cached for i in range(6)] == [0] + [320] * 5
        for i in range(6, 40):                   # a hot prefix: the other replica takes its share too
            router.submit(f"chat{i}", system + [i] * 5, params)
        hot = [router.jobs[f"chat{i}"].replica.index for i in range(40)]
        assert 0 < hot.count(0) < hot.count(1)
        busy = sorted(r.outstanding for r in router.supervisor.replicas)
        assert busy[1] - busy[0] <= len(system) + 32 + 5
    finally:
        router.supervisor.close()
