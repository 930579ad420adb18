"""A request as the worker sees it: token ids only."""
from dataclasses import dataclass, field

from splitfuse.config import SamplingParams


@dataclass(slots=True, eq=False)  # compared and hashed by identity: membership in the queues is O(1), not a list compare
class Request:
    request_id: str
    token_ids: list[int]                    # prompt + generated
    prompt_len: int
    params: SamplingParams
    streamed: bool = True                   # its tokens are read as they come (else only its whole answer)
    num_computed_tokens: int = 0            # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0              # prompt tokens served from the prefix cache at its last admission
                                            # before its first token (a preempted one keeps what it had)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks of token_ids, memoised
    num_registered_blocks: int = 0          # leading blocks of block_table known to the prefix cache
    finish_reason: str | None = None
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)  # per prompt position, when asked

    @property
    def scores_prompt(self) -> bool:
        """It asked for its prompt's log-probabilities and some are still to compute."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.prompt_len

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_new_tokens(self) -> int:
        """Tokens not yet in the cache: 1 for a request that is generating, more for a prompt."""
        return len(self.token_ids) - self.num_computed_tokens
