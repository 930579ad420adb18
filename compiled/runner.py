"""Fixed-shape execution of the model.

Every step is padded to one of a few token-count buckets (SplitFuse keeps steps near the token
budget, so a handful covers all traffic). Inputs are written in place into static buffers; each
bucket's forward is compiled once with static shapes and, on CUDA, captured as a CUDA graph that is
replayed. Padded tokens have slot -1 and padded sequences query length 0, so they cost nothing
but their share of the matmuls.

Compiling takes tens of seconds per bucket, so it can run in a background thread while steps run
eagerly; the runner switches to the compiled forward once every bucket is compiled (never to a
half-compiled set, so the serving thread never enters torch.compile while it is compiling)."""
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch._inductor.config
from torch import nn

from splitfuse.compiled.batch import Batch


@dataclass(slots=True)
class SequenceChunk:
    """One sequence's share of a step: new tokens starting at position `start`."""
    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool  # whether this step wants the next-token logits of this sequence


def default_buckets(token_budget: int, smallest: int = 16, step: int = 4) -> list[int]:
    """The budget and shapes `step` times smaller down to `smallest`: few shapes to compile, at most
    `step`x padding for steps under the budget (light load, where padding costs little)."""
    buckets, b = [token_budget], token_budget // step
    while b >= smallest:
        buckets.insert(0, b)
        b //= step
    return buckets


def kv_cache_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, model: nn.Module, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, buckets: list[int], compile: bool = True, cuda_graphs: bool = True):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.buckets = sorted(buckets)
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # Zeros, not empty: masked-out context still enters the attention's weighted sum as 0 * value.
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(model.num_layers)]
        self._host = _HostBuffers(self.buckets[-1], max_num_seqs, self.max_blocks_per_seq)
        self._static = Batch(**{name: torch.zeros(arr.shape, dtype=_TORCH_TYPES[arr.dtype], device=self.device)
                                for name, arr in self._host.arrays().items()})
        self._views = {t: self._bucket_view(t) for t in self.buckets}
        self._forward = model.forward
        self._compiled = None
        self.compiled = threading.Event()  # set once every bucket is compiled (or when not compiling)
        if compile:
            # One compiled graph per bucket; lift dynamo's per-function cache limit to cover them.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(buckets))
            self._compiled = torch.compile(model.forward, dynamic=False)
        else:
            self.compiled.set()
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None

    def seqs_in_bucket(self, tokens: int) -> int:
        return min(tokens, self.max_num_seqs)

    def bucket_for(self, num_tokens: int) -> int:
        for b in self.buckets:
            if b >= num_tokens:
                return b
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.buckets[-1]}")

    def _bucket_view(self, tokens: int) -> Batch:
        return _bucket_slice(self._static, tokens, self.seqs_in_bucket(tokens))

    @torch.inference_mode()
    def execute(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """Run one step; returns fp32 logits [num sampled chunks, vocab] in chunk order."""
        num_tokens = sum(len(c.token_ids) for c in chunks)
        if num_tokens > self.buckets[-1]:
            return self._execute_oversized(chunks, num_tokens)
        bucket = self.bucket_for(num_tokens)
        if len(chunks) > self.seqs_in_bucket(bucket):
            raise ValueError(f"{len(chunks)} sequences exceed the {self.seqs_in_bucket(bucket)} slots of bucket {bucket}")
        num_logits = self._host.fill(chunks, bucket, self.seqs_in_bucket(bucket), self.block_size)
        self._copy_inputs(bucket)
        return self._run(bucket)[:num_logits]

    def _execute_oversized(self, chunks: list[SequenceChunk], num_tokens: int) -> torch.Tensor:
        """Only the prefill-first baseline exceeds the budget (a whole long prompt in one step):
        such steps run eagerly at their exact size rather than adding shapes to compile."""
        host = _HostBuffers(num_tokens, len(chunks), self.max_blocks_per_seq)
        num_logits = host.fill(chunks, num_tokens, len(chunks), self.block_size)
        batch = Batch(**{name: torch.from_numpy(arr).to(self.device) for name, arr in host.arrays().items()})
        return self.model(batch, self.kv_caches)[:num_logits]

    def _copy_inputs(self, bucket: int) -> None:
        view = self._views[bucket]
        for name, arr in self._host.arrays().items():
            dst = getattr(view, name)
            dst.copy_(torch.from_numpy(arr[tuple(slice(0, n) for n in dst.shape)]), non_blocking=True)

    def _run(self, bucket: int) -> torch.Tensor:
        if not self.use_graphs or self._forward is self.model.forward:
            return self._forward(self._views[bucket], self.kv_caches)
        if bucket not in self._graphs:
            self._capture(bucket)
        graph, out = self._graphs[bucket]
        graph.replay()
        return out

    def _capture(self, bucket: int) -> None:
        view = self._views[bucket]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up runs off the capture, as CUDA graphs require
            for _ in range(2):
                self._forward(view, self.kv_caches)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every bucket's graph
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = self._forward(view, self.kv_caches)
        self._graphs[bucket] = (graph, out)

    def compile(self, background: bool, progress: bool = True) -> None:
        """Compile every bucket, largest first, on all-padding batches of its own (they write no KV),
        then serve compiled. In the background, steps run eagerly meanwhile; `compiled` tells when."""
        if self._compiled is None:
            return
        if background:
            threading.Thread(target=self._compile_all, args=(progress,), name="compile", daemon=True).start()
        else:
            self._compile_all(progress)

    def _compile_all(self, progress: bool) -> None:
        host = _HostBuffers(self.buckets[-1], self.max_num_seqs, self.max_blocks_per_seq)
        for i, bucket in enumerate(reversed(self.buckets)):
            start = time.perf_counter()
            host.fill([], bucket, self.seqs_in_bucket(bucket), self.block_size)
            # Made outside inference mode like the static buffers: dynamo's guards tell the two kinds apart.
            batch = Batch(**{name: torch.from_numpy(arr).to(self.device) for name, arr in host.arrays().items()})
            # Freezing makes the weights constants of the graph, which on CPU lets Inductor prepack them
            # for the GEMM library (read where torch.compile's `options` do not reach, hence the patch).
            with torch.inference_mode(), torch._inductor.config.patch(freezing=self.device.type == "cpu"):
                self._compiled(_bucket_slice(batch, bucket, self.seqs_in_bucket(bucket)), self.kv_caches)
            if progress:
                print(f"compiled {i + 1}/{len(self.buckets)}: bucket {bucket} tokens "
                      f"in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        self._forward = self._compiled
        self.compiled.set()


def _bucket_slice(batch: Batch, tokens: int, seqs: int) -> Batch:
    """The leading `tokens` rows and `seqs` sequences of a batch laid out for a larger bucket."""
    return Batch(input_ids=batch.input_ids[:tokens], positions=batch.positions[:tokens],
                 slot_mapping=batch.slot_mapping[:tokens], query_start_loc=batch.query_start_loc[:seqs + 1],
                 seq_lens=batch.seq_lens[:seqs], block_tables=batch.block_tables[:seqs],
                 logits_indices=batch.logits_indices[:seqs])


_TORCH_TYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


class _HostBuffers:
    """Numpy staging arrays for one step's inputs, sized for the largest bucket."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int):
        self.input_ids = np.zeros(max_tokens, np.int64)
        self.positions = np.zeros(max_tokens, np.int64)
        self.slot_mapping = np.full(max_tokens, -1, np.int64)
        self.query_start_loc = np.zeros(max_seqs + 1, np.int32)
        self.seq_lens = np.zeros(max_seqs, np.int32)
        self.block_tables = np.zeros((max_seqs, max_blocks), np.int32)
        self.logits_indices = np.zeros(max_seqs, np.int64)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "positions": self.positions, "slot_mapping": self.slot_mapping,
                "query_start_loc": self.query_start_loc, "seq_lens": self.seq_lens,
                "block_tables": self.block_tables, "logits_indices": self.logits_indices}

    def fill(self, chunks: list[SequenceChunk], tokens: int, seqs: int, block_size: int) -> int:
        """Lay the chunks out flat and pad to `tokens`/`seqs`; returns the number of logits rows."""
        self.input_ids[:tokens] = 0
        self.positions[:tokens] = 0
        self.slot_mapping[:tokens] = -1
        self.seq_lens[:seqs] = 0
        self.block_tables[:seqs] = 0
        self.logits_indices[:seqs] = 0
        offset = num_logits = 0
        for i, chunk in enumerate(chunks):
            n = len(chunk.token_ids)
            pos = np.arange(chunk.start, chunk.start + n)
            table = np.asarray(chunk.block_table, dtype=np.int64)
            self.input_ids[offset:offset + n] = chunk.token_ids
            self.positions[offset:offset + n] = pos
            self.slot_mapping[offset:offset + n] = table[pos // block_size] * block_size + pos % block_size
            self.block_tables[i, :len(table)] = table
            self.query_start_loc[i] = offset
            self.seq_lens[i] = chunk.start + n
            offset += n
            if chunk.sample:
                self.logits_indices[num_logits] = offset - 1
                num_logits += 1
        self.query_start_loc[len(chunks):seqs + 1] = offset  # padded sequences: query length 0
        return num_logits
