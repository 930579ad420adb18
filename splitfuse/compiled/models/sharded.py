"""The layers a tensor-parallel rank holds a slice of (compiled/parallel.py tells the scheme): column- and
row-parallel projections, the vocabulary-parallel embedding and LM head, and the attention heads per rank.
With one rank they are the plain layers."""
from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as fc
from torch import nn
from torch.nn import functional as F

from splitfuse.compiled.models.layers import Linear, LMHead
from splitfuse.compiled.parallel import Shard


@dataclass(frozen=True, slots=True)
class Heads:
    """The attention heads one rank holds: query heads [q_start, q_start + q_count), KV heads likewise."""
    q_start: int
    q_count: int
    kv_start: int
    kv_count: int


def attention_heads(num_heads: int, num_kv_heads: int, shard: Shard) -> Heads:
    """Whole KV groups per rank (as evenly as they go: SmolLM2's 3 go 1 and 2 over two ranks), or, with fewer
    KV heads than ranks, each KV head replicated over size / num_kv_heads ranks that split its query heads."""
    per_group = num_heads // num_kv_heads
    if num_kv_heads >= shard.size:
        kv_start, kv_count = shard.split(num_kv_heads)
        return Heads(kv_start * per_group, kv_count * per_group, kv_start, kv_count)
    if shard.size % num_kv_heads or num_heads % shard.size:
        raise ValueError(f"tensor_parallel_size {shard.size} does not fit this model's {num_heads} attention heads "
                         f"and {num_kv_heads} KV heads: use at most {num_kv_heads} ranks, or a multiple of "
                         f"{num_kv_heads} that divides {num_heads}")
    q_start, q_count = shard.split(num_heads)
    return Heads(q_start, q_count, q_start // per_group, 1)


class ColumnLinear(Linear):
    """Output features [start, start + out_features) of a projection: its slice of the weight's rows
    and of the bias. Needs no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool, start: int):
        super().__init__(in_features, out_features, bias=bias)
        self.shards = {"weight": (0, start), "bias": (0, start)}


class RowLinear(Linear):
    """Input features [start, start + in_features) of a projection: partial sums over the ranks, added up
    by an all-reduce. The bias (whole on every rank) is added once, after it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, start: int, shard: Shard):
        super().__init__(in_features, out_features, bias=bias)
        self.shards = {"weight": (1, start)}
        self.shard = shard

    def forward(self, x: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
        if self.shard.group is None:
            return super().forward(x, used)
        y = self.shard.all_reduce(self.project(x, None, used))
        return y if self.bias is None else y + self.bias


class VocabEmbedding(nn.Embedding):
    """Rows of this rank's slice of the vocabulary; a token outside it looks up zeros, and the all-reduce
    gives every rank the full embedding."""

    def __init__(self, vocab_size: int, dim: int, shard: Shard):
        self.start, rows = shard.padded(vocab_size)
        super().__init__(rows, dim)
        self.shards = {"weight": (0, self.start)}
        self.shard = shard

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard.group is None:
            return super().forward(ids)
        local = ids - self.start
        mine = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.shard.all_reduce(x)


class VocabLMHead(LMHead):
    """fp32 logits of this rank's slice of the vocabulary, gathered from every rank and cut to the vocabulary
    (it runs eagerly, outside the compiled graph, on the sampled rows)."""

    def __init__(self, in_features: int, vocab_size: int, shard: Shard):
        start, rows = shard.padded(vocab_size)
        super().__init__(in_features, rows)
        self.shards = {"weight": (0, start)}
        self.shard = shard
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.shard.group is None:
            return logits
        # Gathered along dim 0 (what the collective supports): each rank's columns, transposed.
        gathered = fc.wait_tensor(fc.all_gather_single(logits.t().contiguous(), 0, self.shard.group))
        return gathered.t()[:, :self.vocab_size]
