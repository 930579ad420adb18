"""Fixed-size KV cache blocks: reference counts, a free list, each request's block table, and the
prefix cache.

Prefix caching: a full block whose K/V are computed is known by a hash of its token ids chained
with its parent block's hash, so equal hashes mean equal prefixes up to and including the block
(blake2b, 256 bits: a collision is no practical risk). A request being admitted takes the cached
blocks of the longest such prefix of its tokens and starts computing past them. A block is
registered once its last token's K/V are computed (seen when the scheduler next looks, or when
the request lets go of it), never while a step may still be writing it. Blocks no request holds
any longer stay cached and are evicted, least recently used first, only when a fresh block is
needed and no uncached one is free.

    block table  [ b7 | b3 | b9 | b12 ]        tokens: 0..15 | 16..31 | 32..47 | 48..53 (partial)
                   taken from the cache   fresh: computed, registered in turn
    every block: in use (ref > 0), or free: uncached (a stack) or cached (an LRU, evictable)

The K/V of a block depend only on the tokens up to it (causal attention, a sliding window
included, since every block of a sequence is kept), so a cached block serves any request
with the same prefix; sliding-window models need nothing special."""
import hashlib
from array import array
from collections import OrderedDict

from splitfuse.worker.request import Request


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("i", token_ids).tobytes(), digest_size=32).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # uncached, a stack: pop() hands out low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recently used first
        self._hash_of: dict[int, bytes] = {}              # block -> hash, for cached blocks
        self._cached: dict[bytes, int] = {}               # hash -> block
        self.queries = 0                                  # prompt tokens looked up at admission
        self.hits = 0                                     # of them, found in the cache

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: uncached free ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Extra blocks the request needs to hold its cached tokens plus `num_tokens` more."""
        return max(self.blocks_for(request.num_computed_tokens + num_tokens) - len(request.block_table), 0)

    def tokens_that_fit(self, request: Request, wanted: int) -> int:
        """How many of `wanted` new tokens fit in the request's blocks plus all free ones (evictable
        cached blocks included: evicting them is what they are kept for)."""
        capacity = (len(request.block_table) + self.num_free) * self.block_size
        return max(min(wanted, capacity - request.num_computed_tokens), 0)

    def take_cached_prefix(self, request: Request) -> None:
        """On admission (no blocks held, nothing computed): take the cached blocks of the longest prefix
        of the request's tokens, leaving at least its last token to compute (it gives the logits to
        sample). A block with the last token is never taken, so no request writes into a shared block."""
        assert not request.block_table and request.num_computed_tokens == 0
        if not self.enable_caching or request.scores_prompt:  # its prompt's logits are wanted: compute them all
            return
        for i in range((len(request.token_ids) - 1) // self.block_size):
            block = self._cached.get(self._hash(request, i))
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            request.block_table.append(block)
        request.num_registered_blocks = len(request.block_table)
        request.num_computed_tokens = len(request.block_table) * self.block_size

    def count_admission(self, request: Request) -> None:
        """The request was admitted with what take_cached_prefix found: count the query and its hits."""
        self.queries += len(request.token_ids)
        self.hits += request.num_computed_tokens

    def allocate(self, request: Request, num_tokens: int) -> None:
        need = self.blocks_needed(request, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"allocating {need} blocks with {self.num_free} free")  # the scheduler checks first
        for _ in range(need):
            block = self._free.pop() if self._free else self._evict()
            self._refs[block] = 1
            request.block_table.append(block)

    def register_computed(self, request: Request) -> None:
        """Cache the request's blocks that are full and computed and not yet registered. A block whose
        prefix is already cached (computed twice, by requests admitted before either finished it)
        stays uncached: the one in the cache keeps serving. A request that scored its prompt shares nothing:
        its scoring chunks ran eagerly (ModelRunner.execute), and eager K/V differ from compiled ones in
        their last bits, which another request would then inherit."""
        if not self.enable_caching or request.params.prompt_logprobs is not None:
            return
        full = request.num_computed_tokens // self.block_size
        for i in range(request.num_registered_blocks, full):
            h, block = self._hash(request, i), request.block_table[i]
            if h not in self._cached:
                self._cached[h], self._hash_of[block] = block, h
        request.num_registered_blocks = full

    def free(self, request: Request) -> None:
        """Let go of the request's blocks, registering its computed ones first. The last block goes
        first into the LRU, so a prefix's tail is evicted before its head (which more requests share)."""
        self.register_computed(request)
        for block in reversed(request.block_table):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)
        request.block_table.clear()
        request.num_registered_blocks = 0

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._hash_of.pop(block)]
        return block

    def _hash(self, request: Request, i: int) -> bytes:
        """The chained hash of the request's block i, memoised on the request (its tokens only grow)."""
        hashes, size = request.block_hashes, self.block_size
        while len(hashes) <= i:
            n = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else b"", request.token_ids[n * size:(n + 1) * size]))
        return hashes[i]
