"""Tensor parallelism (Megatron-style) over torch.distributed: the sharded layers and the step broadcast.

Each of a group's ranks holds a slice of every large weight and runs the same forward on the same
tokens. Column-parallel projections (q/k/v, gate/up, OPT's fc1) keep a slice of the output features
and need no communication; the row-parallel ones after them (o_proj, down_proj, fc2) keep the
matching slice of the input features and sum their partial results with one all-reduce. The
embedding and lm_head keep a slice of the vocabulary (the last one padded with zero rows, so
every rank's is the same size): the embedding sums its rows with an all-reduce, lm_head gathers
its logits. Attention is split by KV group: a rank holds some KV heads and the query heads that
read them, so attention needs no communication; with fewer KV heads than ranks, each KV head is
held by several ranks (replicated), each with its own share of the query heads.

Layers record which slice of a checkpoint tensor they hold (`shards`: parameter name -> (dim, start),
the length being the parameter's own), which the loader reads with safetensors' get_slice. With one
rank they are the plain layers: no communication, full slices.

Collectives inside the model are torch.distributed's functional ones, which Dynamo traces into the
compiled graph. Rank 0 runs the scheduler; `StepBroadcast` hands each step's flat inputs to the
other ranks, which run the same bucket in lockstep."""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import nn
from torch.nn import functional as F

from splitfuse.compiled.models.layers import Linear, LMHead


@dataclass(frozen=True, slots=True)
class Shard:
    """This process's place in its tensor-parallel group; the default is a group of one."""
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def split(self, n: int) -> tuple[int, int]:
        """(start, length) of this rank's part of n items split as evenly as possible."""
        start = self.rank * n // self.size
        return start, (self.rank + 1) * n // self.size - start

    def padded(self, n: int) -> tuple[int, int]:
        """(start, length) of this rank's part of n items in equal parts, the last padded (the vocabulary)."""
        length = -(-n // self.size)
        return self.rank * length, length

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.group is None else fc.all_reduce(x, "sum", self.group)

    def agree_min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's value (every rank must size its KV cache alike)."""
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)  # NCCL reduces device memory only
        dist.all_reduce(t, dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


SINGLE = Shard()


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shard.group is None:
            return super().forward(x)
        y = self.shard.all_reduce(self.project(x, None))
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


class GroupLost(BaseException):
    """A rank of the group is gone: its collectives fail from now on, so the group must end (not the step only,
    hence not an Exception, which a worker survives)."""


class StepBroadcast:
    """Rank 0 sends each step's header (bucket, tokens, sequences, logits rows) and the flat int32 inputs
    the step reads; the other ranks receive them into their own runner's buffers and run the same step.
    Everything travels on the runner's device (NCCL broadcasts device memory)."""
    HEADER = 4

    def __init__(self, shard: Shard, device: torch.device):
        self.shard = shard
        self.header = torch.zeros(self.HEADER, dtype=torch.int64, device=device)

    def send(self, buffers, bucket: int | None, num_seqs: int, num_logits: int) -> None:
        tokens = buffers.batch.input_ids.shape[0]
        self.header.copy_(torch.tensor([bucket or 0, tokens, num_seqs, num_logits]))
        try:
            dist.broadcast(self.header, 0, group=self.shard.group)
            dist.broadcast(buffers.step_inputs(num_seqs), 0, group=self.shard.group)
        except RuntimeError as e:  # a rank died (in an earlier step, which failed with it)
            raise GroupLost(f"a tensor-parallel rank is gone: {str(e).splitlines()[0]}") from None

    @torch.inference_mode()
    def follow(self, runner) -> None:
        """Run rank 0's steps until the group breaks (rank 0 gone: the broadcast raises)."""
        while True:
            dist.broadcast(self.header, 0, group=self.shard.group)
            bucket, tokens, num_seqs, num_logits = self.header.tolist()
            buffers = runner.step_buffers(bucket or None, tokens, num_seqs)
            dist.broadcast(buffers.step_inputs(num_seqs), 0, group=self.shard.group)
            runner.run_step(buffers, bucket or None, num_logits)
