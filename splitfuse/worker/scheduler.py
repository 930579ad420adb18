"""Which requests run in the next forward pass, and with how many tokens.

Policy "splitfuse" (Dynamic SplitFuse): every generating request gets one token; the rest of
the token budget is filled with prompt chunks, first come first served, a long prompt continuing
over later steps and short ones fused. The budget is token_budget while any request streams its
tokens (each of them waits a step), else batch_token_budget, when only throughput counts.
Policy "prefill-first" is the baseline FastGen compared against: whole prompts only, and a step is
either all prompts (which go first) or all decodes.
When KV blocks run out, the most recently admitted request is preempted by recompute.

With prefix caching, a request being admitted first takes the cached blocks of its prefix
(BlockManager.take_cached_prefix) and only the uncached rest of its prompt is scheduled, in
chunks or (prefill-first) whole; if not even a first chunk of that fits, it gives them back and
waits. Blocks computed by the previous step are registered in the cache before each schedule."""
from collections import deque
from dataclasses import dataclass

from splitfuse.worker.block_manager import BlockManager
from splitfuse.worker.request import Request


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    num_tokens: int


class Scheduler:
    def __init__(self, policy: str, token_budget: int, max_num_seqs: int, blocks: BlockManager,
                 batch_token_budget: int | None = None):
        self.policy = policy
        self.token_budget = token_budget
        self.batch_token_budget = batch_token_budget or token_budget
        self.num_streamed = 0  # of the requests waiting or running
        self.max_num_seqs = max_num_seqs
        self.blocks = blocks
        self.waiting: deque[Request] = deque()  # not holding blocks; preempted ones go to the front
        self.running: list[Request] = []        # holding blocks, in admission order
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self.num_streamed += request.streamed

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out and free its blocks."""
        for queue in (self.running, self.waiting):
            if request in queue:
                queue.remove(request)
                self.num_streamed -= request.streamed
                break
        self.blocks.free(request)

    def budget(self) -> int:
        """Tokens the next step may carry."""
        return self.token_budget if self.num_streamed else self.batch_token_budget

    def queued_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.waiting) + sum(r.num_new_tokens for r in self.running)

    def schedule(self) -> list[ScheduledChunk]:
        for request in self.running:
            self.blocks.register_computed(request)
        if self.policy == "prefill-first":
            return self._schedule_prefill_first()
        preemptions = self.num_preemptions
        chunks = self._schedule_decodes()
        budget = self.budget() - len(chunks)
        for request in [r for r in self.running if r.num_new_tokens > 1]:  # prompts already admitted
            budget -= self._add_prompt_chunk(request, budget, chunks)
        # After a preemption, admit nobody this step: the victim would only take its freed blocks straight back.
        admit = self.num_preemptions == preemptions
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            self.blocks.take_cached_prefix(request)
            taken = self._add_prompt_chunk(request, budget, chunks)
            if taken == 0:
                self._release(request)
                break
            self._admit()
            budget -= taken
        return chunks

    def _schedule_decodes(self) -> list[ScheduledChunk]:
        """One token for every running request that is generating, preempting on block shortage."""
        chunks: list[ScheduledChunk] = []
        preempted: set[Request] = set()
        for request in list(self.running):
            if request.num_new_tokens != 1 or request in preempted:
                continue  # still on its prompt, or preempted meanwhile
            if self.blocks.blocks_needed(request, 1):  # its blocks are full
                while not self.blocks.num_free:
                    victim = self._preempt_newest()
                    preempted.add(victim)
                    if victim is request:
                        break
                if request in preempted:
                    continue
                self.blocks.allocate(request, 1)
            chunks.append(ScheduledChunk(request, 1))
        return chunks

    def _add_prompt_chunk(self, request: Request, budget: int, chunks: list[ScheduledChunk]) -> int:
        """Schedule as much of the request's prompt as budget and free blocks allow; returns tokens taken."""
        if budget <= 0 or len(chunks) >= self.max_num_seqs:
            return 0
        n = self.blocks.tokens_that_fit(request, min(request.num_new_tokens, budget))
        if n > 0:
            self.blocks.allocate(request, n)
            chunks.append(ScheduledChunk(request, n))
        return n

    def _schedule_prefill_first(self) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        budget = self.budget()
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            self.blocks.take_cached_prefix(request)
            n = request.num_new_tokens
            # A prompt longer than the budget runs alone, as in the baseline (its budget covered any prompt).
            fits_budget = n <= budget or not chunks
            if not fits_budget or self.blocks.blocks_needed(request, n) > self.blocks.num_free:
                self._release(request)
                break
            self.blocks.allocate(request, n)
            chunks.append(ScheduledChunk(request, n))
            self._admit()
            budget -= n
        return chunks or self._schedule_decodes()

    def _admit(self) -> None:
        """The first waiting request got its first chunk: it runs, and its cache hits count."""
        request = self.waiting.popleft()
        self.running.append(request)
        self.blocks.count_admission(request)
        if request.num_generated == 0:
            request.num_cached_tokens = request.num_computed_tokens

    def _release(self, request: Request) -> None:
        """Give back every block (the computed ones stay cached) and start from nothing again."""
        self.blocks.free(request)
        request.num_computed_tokens = 0

    def _preempt_newest(self) -> Request:
        """The most recently admitted request recomputes later: its blocks released, it is requeued first (it
        finds its blocks again if they survive). Returns it."""
        request = self.running.pop()
        self._release(request)
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        return request
