"""Scheduler + BlockManager without a model: a simulated engine loop checks the step contracts."""
import random
from dataclasses import dataclass

import pytest

from splitfuse.config import SamplingParams
from splitfuse.worker.block_manager import BlockManager
from splitfuse.worker.request import Request
from splitfuse.worker.scheduler import Scheduler

BLOCK = 16


def make(i: int, prompt_len: int, max_new: int = 4, streamed: bool = True) -> Request:
    return Request(f"r{i}", [(i * 7 + j) % 100 for j in range(prompt_len)], prompt_len,
                   SamplingParams(max_new_tokens=max_new), streamed=streamed)


def arrival(r: Request) -> int:
    """The order make() numbered it in: the order it arrives in every test here."""
    return int(r.request_id[1:])


def fake_token(token_ids: list[int]) -> int:
    """A deterministic stand-in for the model: the next token depends only on the context."""
    return (sum(t * (k + 1) for k, t in enumerate(token_ids)) * 31 + 7) % 1000


@dataclass
class Step:
    chunks: list[tuple[Request, int]]
    generating: list[Request]   # requests that were generating before the step, in running order
    preempted: bool


def simulate(sched: Scheduler, arrivals: dict[int, list[Request]], max_steps: int = 3000) -> list[Step]:
    """Drive the scheduler as the engine does, checking the invariants after every schedule()."""
    steps: list[Step] = []
    pending = dict(arrivals)
    while pending or sched.waiting or sched.running:
        assert len(steps) < max_steps, "no end in sight: the scheduler stalls or livelocks"
        for r in pending.pop(len(steps), []):
            sched.add(r)
        generating = [r for r in sched.running if r.num_generated > 0 and r.num_new_tokens == 1]
        wanted = {id(r): r.num_new_tokens for r in [*sched.running, *sched.waiting]}
        preemptions = sched.num_preemptions
        had_work = bool(sched.waiting or sched.running)
        chunks = [(c.request, c.num_tokens) for c in sched.schedule()]
        step = Step(chunks, generating, sched.num_preemptions > preemptions)
        check_step(sched, step, wanted, had_work)
        steps.append(step)
        for r, n in chunks:
            r.num_computed_tokens += n
            if r.num_computed_tokens == len(r.token_ids):
                r.token_ids.append(fake_token(r.token_ids))
                if r.num_generated == r.params.max_new_tokens:
                    sched.remove(r)
    return steps


def check_step(sched: Scheduler, step: Step, wanted: dict[int, int], had_work: bool) -> None:
    chunks, blocks = step.chunks, sched.blocks
    assert chunks or not had_work, "work was waiting but nothing was scheduled"
    streams = any(r.streamed for r in [*sched.running, *sched.waiting])
    assert sum(n for _, n in chunks) <= (sched.token_budget if streams else sched.batch_token_budget)
    assert len(chunks) <= sched.max_num_seqs
    assert len({id(r) for r, _ in chunks}) == len(chunks), "a request appears twice in one step"
    assert all(1 <= n <= wanted[id(r)] and r in sched.running for r, n in chunks)
    # Exact block accounting: each running request holds just enough blocks; only cached prefixes are shared.
    scheduled = {id(r): n for r, n in chunks}
    for r in sched.running:
        assert len(r.block_table) == blocks.blocks_for(r.num_computed_tokens + scheduled.get(id(r), 0))
    assert all(not r.block_table and r.num_computed_tokens == 0 for r in sched.waiting)
    held = [b for r in sched.running for b in r.block_table]
    assert len(set(held)) == blocks.num_used
    assert all(0 <= b < blocks.num_blocks for b in held)
    # First come first served: nothing that arrived later runs while an earlier request waits.
    if sched.waiting:
        first_waiting = min(arrival(r) for r in sched.waiting)
        assert all(arrival(r) < first_waiting for r, _ in chunks)
    if sched.policy == "splitfuse" and not step.preempted:
        # Decodes first: every generating request gets exactly one token, ahead of any prompt chunk.
        assert chunks[:len(step.generating)] == [(r, 1) for r in step.generating]
    if sched.policy == "prefill-first":
        # Whole prompts: all that the prefix cache did not hold.
        whole_prompts = all(n == r.num_new_tokens and r not in step.generating for r, n in chunks)
        decodes = all(r in step.generating and n == 1 for r, n in chunks)
        assert whole_prompts or decodes, "a prefill-first step mixes prompts and decodes"


def scheduler(policy="splitfuse", budget=64, max_seqs=8, num_blocks=256, batch_budget=None) -> Scheduler:
    return Scheduler(policy, budget, max_seqs, BlockManager(num_blocks, BLOCK), batch_budget)


def random_load(seed: int, n: int, max_prompt: int, max_new: int = 10) -> dict[int, list[Request]]:
    """n requests arriving over the first 20 steps, in arrival order."""
    rng = random.Random(seed)
    load: dict[int, list[Request]] = {}
    for i, step in enumerate(sorted(rng.randrange(20) for _ in range(n))):
        load.setdefault(step, []).append(make(i, rng.randint(1, max_prompt), rng.randint(1, max_new),
                                              streamed=rng.random() < 0.5))
    return load


def table(steps: list[Step]) -> list[list[tuple[str, int]]]:
    return [[(r.request_id, n) for r, n in s.chunks] for s in steps]


@pytest.mark.parametrize("policy", ["splitfuse", "prefill-first"])
@pytest.mark.parametrize("budget,max_seqs", [(64, 8), (8, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_load_keeps_every_contract(policy, budget, max_seqs, seed):
    load = random_load(seed, n=30, max_prompt=100 if policy == "splitfuse" else budget)
    requests = [r for rs in load.values() for r in rs]
    sched = scheduler(policy, budget, max_seqs, batch_budget=2 * budget)  # half the requests stream
    steps = simulate(sched, load)
    assert all(r.num_generated == r.params.max_new_tokens for r in requests)
    assert sched.blocks.num_used == 0 and sched.num_preemptions == 0
    if policy == "splitfuse" and budget == 64:
        assert any(len(s.chunks) > 1 and any(n > 1 for _, n in s.chunks) for s in steps), "nothing was fused"


def test_long_prompt_is_split_and_chunks_fill_the_budget():
    a, b = make(0, 10, max_new=10), make(1, 100, max_new=2)
    steps = simulate(scheduler(budget=32), {0: [a, b]})
    # a's prompt and b's first chunk fuse; then a decodes while b's chunks take the other 31 tokens.
    assert table(steps)[:4] == [[("r0", 10), ("r1", 22)], [("r0", 1), ("r1", 31)], [("r0", 1), ("r1", 31)],
                                [("r0", 1), ("r1", 16)]]
    assert table(steps)[4] == [("r0", 1), ("r1", 1)]


def test_steps_keep_to_the_token_budget_while_a_request_streams_and_take_the_batch_budget_when_none_does():
    batch = [make(i, 40, max_new=10, streamed=False) for i in range(8)]
    streamed, late = make(8, 8, max_new=3), make(9, 100, max_new=2, streamed=False)
    steps = simulate(scheduler(budget=32, batch_budget=128, max_seqs=16), {0: batch, 1: [streamed], 12: [late]})
    tokens = [sum(n for _, n in s.chunks) for s in steps]
    last = max(i for i, s in enumerate(steps) if any(r is streamed for r, _ in s.chunks))
    assert tokens[0] == 128  # three prompts whole and 8 tokens of the fourth: over the token budget
    assert last > 2 and all(t <= 32 for t in tokens[1:last + 1])  # while the streamed request runs
    assert steps[12].chunks[-1] == (late, 100)  # after it, a whole 100-token prompt again
    assert all(r.num_generated == r.params.max_new_tokens for r in [*batch, streamed, late])


def test_short_prompts_are_fused_into_one_step():
    reqs = [make(i, 10, max_new=2) for i in range(5)]
    steps = simulate(scheduler(budget=64), {0: reqs})
    assert table(steps) == [[(f"r{i}", 10) for i in range(5)], [(f"r{i}", 1) for i in range(5)]]


def test_max_num_seqs_caps_a_step_and_later_prompts_wait_their_turn():
    reqs = [make(i, 3, max_new=2) for i in range(6)]
    steps = simulate(scheduler(budget=64, max_seqs=4), {0: reqs})
    assert table(steps) == [[(f"r{i}", 3) for i in range(4)], [(f"r{i}", 1) for i in range(4)],
                            [("r4", 3), ("r5", 3)], [("r4", 1), ("r5", 1)]]


def test_a_later_arrival_fills_what_decodes_and_earlier_prompts_leave():
    a, b, c = make(0, 4, max_new=5), make(1, 40, max_new=5), make(2, 30, max_new=1)
    steps = simulate(scheduler(budget=16), {0: [a, b], 3: [c]})
    assert table(steps)[:5] == [[("r0", 4), ("r1", 12)], [("r0", 1), ("r1", 15)], [("r0", 1), ("r1", 13)],
                                [("r0", 1), ("r1", 1), ("r2", 14)], [("r0", 1), ("r1", 1), ("r2", 14)]]


@pytest.mark.parametrize("policy", ["splitfuse", "prefill-first"])
def test_preemption_under_a_tiny_pool_finishes_everything_with_the_same_tokens(policy):
    def load():  # 8 requests of 20-60 prompt tokens + 20 new: each needs at most 5 of the 6 blocks
        rng = random.Random(3)
        return {0: [make(i, rng.randint(20, 60), max_new=20) for i in range(8)]}

    tiny, big = load(), load()
    pressured = scheduler(policy, budget=64, num_blocks=6)
    simulate(pressured, tiny)
    simulate(scheduler(policy, budget=64, num_blocks=256), big)
    assert pressured.num_preemptions > 0
    assert pressured.blocks.num_used == 0 and pressured.blocks.num_free == 6
    assert [r.token_ids for r in tiny[0]] == [r.token_ids for r in big[0]]
    assert all(r.num_generated == 20 for r in tiny[0])


def test_prefill_first_runs_whole_prompts_first_then_decodes():
    a, b, c = make(0, 10, max_new=4), make(1, 12, max_new=4), make(2, 5, max_new=2)
    steps = simulate(scheduler("prefill-first", budget=64), {0: [a, b], 2: [c]})
    assert table(steps) == [[("r0", 10), ("r1", 12)], [("r0", 1), ("r1", 1)], [("r2", 5)],
                            [("r0", 1), ("r1", 1), ("r2", 1)], [("r0", 1), ("r1", 1)]]


def test_prefill_first_defers_a_prompt_that_does_not_fit_the_rest_of_the_budget():
    a, b = make(0, 40, max_new=1), make(1, 30, max_new=1)
    steps = simulate(scheduler("prefill-first", budget=64), {0: [a, b]})
    assert table(steps) == [[("r0", 40)], [("r1", 30)]]
