"""Fixed-size KV cache blocks: a free list and each request's block table."""
from splitfuse.worker.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Extra blocks the request needs to hold its cached tokens plus `num_tokens` more."""
        return max(self.blocks_for(request.num_computed_tokens + num_tokens) - len(request.block_table), 0)

    def tokens_that_fit(self, request: Request, wanted: int) -> int:
        """How many of `wanted` new tokens fit in the request's blocks plus all free ones."""
        capacity = (len(request.block_table) + len(self._free)) * self.block_size
        return max(min(wanted, capacity - request.num_computed_tokens), 0)

    def allocate(self, request: Request, num_tokens: int) -> None:
        need = self.blocks_needed(request, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"allocating {need} blocks with {len(self._free)} free")  # the scheduler checks first
        request.block_table.extend(self._free.pop() for _ in range(need))

    def free(self, request: Request) -> None:
        self._free.extend(reversed(request.block_table))
        request.block_table.clear()
