"""Tensor parallelism (Megatron-style) over torch.distributed: a rank's place in its group and the step
broadcast; the sharded layers are in models/sharded.py.

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
