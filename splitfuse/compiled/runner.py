"""Fixed-shape execution of the model.

Every step is padded to one of a few token-count buckets (SplitFuse keeps steps near the token
budget, so a handful covers all traffic). Inputs are written in place into static buffers; each
bucket's forward is compiled once with static shapes and, on CUDA, captured as a CUDA graph that is
replayed. A step's inputs are int32 in one flat buffer: on CUDA one pinned host array and one copy
into its device twin (of which the static batches are views); on CPU the static batches are the host
array itself, so nothing is copied. Padded tokens have slot -1 and padded sequences query length 0, so they cost nothing
in attention; on CPU the linears multiply only the rows in use (Batch.used), so padding costs little there too.

The compiled forward is one graph whose sizes are dynamic, for every bucket; on CUDA each bucket is
still captured as a graph of its own fixed shape. Compiled code is
kept on disk (precompile.py): a configuration compiles once per machine, in a process of its own while
steps run eagerly; a background thread then loads it, and the runner switches to the compiled forward
once every bucket is ready (never to a half-compiled set, so the serving thread never enters
torch.compile while it is compiling)."""
import atexit
import ctypes
import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx._symbolic_trace
from torch import nn

from splitfuse.compiled import precompile
from splitfuse.compiled.batch import Batch
from splitfuse.compiled.loader import anonymous_memory
from splitfuse.compiled.precompile import CompileSpec

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SequenceChunk:
    """One sequence's share of a step: new tokens starting at position `start`."""
    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool  # whether this step wants the next-token logits of this sequence
    score: bool = False  # whether it wants the logits of every token (prompt log-probabilities)


def default_buckets(token_budget: int, gpu: bool) -> list[int]:
    """One token, then the budget and smaller shapes. A lone decode gets a shape of its own: it is bound
    by reading the weights. On GPU a step of a few hundred tokens costs about what one of a few does, so
    quarters down to 16 keep the shapes (each compiled and captured) few. On CPU the linears multiply only
    a step's tokens (Batch.used), but the norms and the rest run over its padding too: halves down to 8, so
    that no step pays there for more than twice its tokens."""
    smallest, step = (16, 4) if gpu else (8, 2)
    buckets, b = [token_budget], token_budget // step
    while b >= smallest:
        buckets.insert(0, b)
        b //= step
    return [1, *buckets] if buckets[0] > 1 else buckets


def kv_cache_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * dtype.itemsize


COMPILE_START_S = 10.0  # a background compile waits at most this long for its start signal

# glibc's mallopt parameters, and what a CPU runner sets them to.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_FREE_BYTES = 1 << 30  # free memory the heap keeps rather than hands back to the system
HEAP_BELOW_BYTES = 32 << 20  # allocations under this come from the heap (glibc's largest setting)


def keep_freed_memory() -> None:
    """Has the C library's allocator keep what a step frees for the next one. By default glibc hands the top of
    its heap back to the system once more than twice its (adaptive) mmap threshold is free there, and a large
    step's activations then come from fresh pages, each faulted in and zeroed again: 1.4k to 325k page faults
    over the first offline batch of the peers' workload, in processes alike, the slowest 4% slower (Xeon with
    AMX, bf16). With the allocator keeping up to a gigabyte, 1.4k in each. A C library without mallopt (musl,
    macOS) keeps its own ways."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)
        mallopt(M_MMAP_THRESHOLD, HEAP_BELOW_BYTES)


class ModelRunner:
    def __init__(self, model: nn.Module, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, buckets: list[int], compile: bool = True, cuda_graphs: bool = True,
                 spec: CompileSpec | None = None):
        """`spec`: the configuration as the on-disk compile cache knows it (precompile.py); with it, a
        background compile that finds no mark for it compiles in a process of its own first."""
        if compile:
            precompile.use_cache_dir()
        param = next(model.parameters())
        if param.device.type == "cpu":
            keep_freed_memory()
        self.model = model
        self.spec = spec
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.buckets = sorted(buckets)
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        shape = (model.num_layers, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # Zeros, not empty: masked-out context still enters the attention's weighted sum as 0 * value. On CPU a fresh
        # mapping's zeros, which the kernel fills in as steps first touch its pages: zeroing all of the default 2.4 GB
        # first, `pipeline()` answered first after 5.5-8.1 s, against 2.9-3.3 (Zen 5, bf16, with the compile's
        # wrapper made later, below).
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device) if self.device.type != "cpu" else \
            anonymous_memory(math.prod(shape) * self.dtype.itemsize).view(self.dtype).view(shape)
        torch._dynamo.maybe_mark_dynamic(self.kv_cache, 2)  # the block count follows memory: no graph depends on it
        self._buffers = _StepBuffers(self.buckets[-1], max_num_seqs, self.max_blocks_per_seq, self.device)
        self._static = self._buffers.batch
        self._views = {t: self._bucket_view(t) for t in self.buckets}
        self._forward = model.forward
        self._compiled = None  # made as the compile starts: torch.compile imports Inductor (0.5-0.7 s of a start)
        self._compile_options = None
        # Tensor parallel, rank 0: called with each step's filled buffers before it runs (StepBroadcast.send).
        self.on_step: Callable[[_StepBuffers, int | None, int, int], None] | None = None
        self.compiled = threading.Event()  # set once every bucket is compiled (or when not compiling)
        if compile:
            # One compiled graph per bucket; lift dynamo's per-function cache limit to cover them.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(buckets))
            # Without guards on the modules' attributes: the model is not changed once loaded, and checking
            # them took 1.3 ms of every step (0.17 ms left, for the inputs' guards that pick the bucket).
            options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            if self.device.type == "cpu":
                # A CPU step's ~270 kernel and operator calls made from C++ rather than Python (a GPU step
                # replays a CUDA graph instead). The wrapper is built apart from the kernels, at -O1: built
                # whole at -O3, a cold compile took twice as long.
                options |= {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}
            self._compile_options = options
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
        """Run one step; returns fp32 logits in chunk order: a row per token of a scoring chunk (its last is
        the sampled one's when it samples), one per other sampled chunk."""
        scoring = [c.score for c in chunks]
        if any(scoring) and not all(scoring):
            return self._execute_apart(chunks)
        num_tokens = sum(len(c.token_ids) for c in chunks)
        if num_tokens > self.buckets[-1] or any(scoring):
            return self._execute_oversized(chunks, num_tokens)
        bucket = self.bucket_for(num_tokens)
        if len(chunks) > self.seqs_in_bucket(bucket):
            raise ValueError(f"{len(chunks)} sequences exceed the {self.seqs_in_bucket(bucket)} slots of bucket {bucket}")
        num_logits = self._buffers.fill(chunks, bucket, self.seqs_in_bucket(bucket), self.block_size)
        self._buffers.copy(len(chunks))
        return self._step(self._buffers, bucket, len(chunks), num_logits)

    def _execute_apart(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """Chunks that score a prompt in a forward of their own, the others in theirs: the others take their
        bucket as in any step, so that their outputs do not depend on whether a scoring chunk came along."""
        parts = [[c for c in chunks if c.score], [c for c in chunks if not c.score]]
        rows = [[len(c.token_ids) if c.score else int(c.sample) for c in part] for part in parts]
        pieces = [iter(self.execute(part).split(r)) for part, r in zip(parts, rows)]
        return torch.cat([next(pieces[0] if c.score else pieces[1]) for c in chunks])

    def _execute_oversized(self, chunks: list[SequenceChunk], num_tokens: int) -> torch.Tensor:
        """Steps the buckets do not fit: the prefill-first baseline's (a whole long prompt in one step) and
        those that score a prompt (logits at every row). They run eagerly at their exact size rather than
        adding shapes to compile."""
        buffers = self.step_buffers(None, num_tokens, len(chunks))
        num_logits = buffers.fill(chunks, num_tokens, len(chunks), self.block_size)
        buffers.copy(len(chunks))
        return self._step(buffers, None, len(chunks), num_logits)

    def _step(self, buffers: "_StepBuffers", bucket: int | None, num_seqs: int, num_logits: int) -> torch.Tensor:
        if self.on_step is not None:
            self.on_step(buffers, bucket, num_seqs, num_logits)
        return self.run_step(buffers, bucket, num_logits)

    def step_buffers(self, bucket: int | None, num_tokens: int, num_seqs: int) -> "_StepBuffers":
        """The static buffers of the buckets, or (bucket None) new ones of an oversized step's exact size."""
        if bucket is not None:
            return self._buffers
        return _StepBuffers(num_tokens, num_seqs, self.max_blocks_per_seq, self.device)

    def run_step(self, buffers: "_StepBuffers", bucket: int | None, num_logits: int) -> torch.Tensor:
        """The forward of filled (and copied) buffers at `bucket`, or eagerly at their own size (None)."""
        if bucket is not None:
            return self.model.lm_head(self._run(bucket)[:num_logits])
        batch = dataclasses.replace(buffers.batch, logits_indices=buffers.batch.logits_indices[:num_logits])
        return self.model.lm_head(self.model(batch, self.kv_cache))

    @torch.inference_mode()
    def profile(self) -> None:
        """One eager all-padding forward at the largest bucket (it writes no KV): its peak holds the
        activations and logits of the largest step, which the KV cache must leave room for."""
        bucket = self.buckets[-1]
        self._buffers.fill([], bucket, self.seqs_in_bucket(bucket), self.block_size)
        self._buffers.copy(0)
        self.model.lm_head(self.model(self._views[bucket], self.kv_cache))

    def _run(self, bucket: int) -> torch.Tensor:
        if not self.use_graphs or self._forward is self.model.forward:
            return self._forward(self._views[bucket], self.kv_cache)
        if bucket not in self._graphs:
            self._capture(bucket)
        graph, out = self._graphs[bucket]
        graph.replay()
        return out

    def _capture(self, bucket: int) -> None:
        view = self._views[bucket]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up runs off the capture, as CUDA graphs require
            for _ in range(2):
                self._forward(view, self.kv_cache)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every bucket's graph
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = self._forward(view, self.kv_cache)
        self._graphs[bucket] = (graph, out)

    def compile(self, background: bool, progress: bool = True, start: threading.Event | None = None) -> None:
        """Compile every bucket, largest first, on all-padding batches of its own (they write no KV),
        then serve compiled. In the background, steps run eagerly meanwhile; `compiled` tells when.
        A configuration the on-disk cache has not seen compiles first in a process of the lowest priority,
        so that the interpreter and the cores stay with the eager steps (precompile.py). This process then
        loads the compiled code, once `start` is set, or COMPILE_START_S later at the latest: loading holds
        the interpreter for seconds, which would slow the first answers."""
        if self._compile_options is None:
            return
        if background:
            _confine_fx_patches_to_their_thread()
            thread = threading.Thread(target=self._compile_in_background, args=(progress, start), name="compile",
                                      daemon=True)
            thread.start()
            _compile_threads[:] = [t for t in _compile_threads if t.is_alive()] + [thread]
        else:
            self._compile_all(progress)

    def _compile_in_background(self, progress: bool, start: threading.Event | None) -> None:
        if self.spec is not None and not precompile.is_warm(self.spec):
            precompile.compile_elsewhere(self.spec, progress)  # at once: it leaves the cores to the steps
        if start is not None:
            start.wait(COMPILE_START_S)
        self._compile_all(progress)

    def _compile_all(self, progress: bool) -> None:
        self._compiled = torch.compile(self.model.forward, dynamic=False, options=self._compile_options)
        # Laid out as the static buffers (each field a view of one flat buffer), and made outside inference
        # mode like them: dynamo's guards tell the two kinds apart.
        buffers = _StepBuffers(self.buckets[-1], self.max_num_seqs, self.max_blocks_per_seq, self.device)
        for i, bucket in enumerate(reversed(self.buckets)):
            start = time.perf_counter()
            buffers.fill([], bucket, self.seqs_in_bucket(bucket), self.block_size)
            buffers.copy(0)
            try:
                self._compile_bucket(buffers, bucket)
            except Exception as e:  # a corrupt or unreadable cache: once more from nothing
                precompile.discard(f"{type(e).__name__}: {e}".splitlines()[0])
                torch._dynamo.reset()
                self._compile_bucket(buffers, bucket)
            if progress:
                log.info("compiled %d/%d: bucket %d tokens in %.1fs", i + 1, len(self.buckets), bucket,
                         time.perf_counter() - start)
        if self.spec is not None:
            precompile.mark_warm(self.spec)
        self._forward = self._compiled
        self.compiled.set()

    def _compile_bucket(self, buffers: "_StepBuffers", bucket: int) -> None:
        # This thread's current CUDA device is not the serving thread's: Triton launches on the current one.
        with torch.inference_mode(), (torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()):
            self._compiled(_bucket_slice(buffers.batch, bucket, self.seqs_in_bucket(bucket)), self.kv_cache)


_compile_threads: list[threading.Thread] = []


@atexit.register
def _wait_for_compile_threads() -> None:
    """A thread that ran the compiler ends by freeing Python objects held in PyTorch's native thread-locals,
    which takes the GIL: if the interpreter is shutting down by then, that aborts the process ("terminate
    called without an active exception", pytorch/pytorch#38228). So exit waits for the compile threads to
    end, their native part too (which outlives join()). One compile thread kept alive for the process instead
    made every compiled step 2x slower (measured: 19 against 39 tokens/s single stream), most likely from
    its idle OpenMP team: libgomp stops its workers spinning when it manages more threads than cores."""
    for thread in _compile_threads:
        if thread.is_alive():
            log.info("waiting for the background compile to finish before exiting")
        thread.join()
        native = Path(f"/proc/self/task/{thread.native_id}")
        deadline = time.monotonic() + 5.0
        while native.exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # lets the thread take the GIL for its last frees


def _confine_fx_patches_to_their_thread() -> None:
    """While it compiles, Inductor FX-traces small functions, and FX tracing swaps nn.Module.__call__
    (and __getattr__) process-wide for the moment; an eager step in the serving thread would then be
    traced into and fail. Make each swapped-in method act only in the thread that swapped it in."""
    patcher = torch.fx._symbolic_trace._Patcher
    if getattr(patcher.patch_method, "_thread_confined", False):
        return
    original = patcher.patch_method

    def patch_method(self, cls, name, new_fn, deduplicate=True):
        owner, old_fn = threading.get_ident(), getattr(cls, name)

        @functools.wraps(new_fn)
        def confined(*args, **kwargs):
            return (new_fn if threading.get_ident() == owner else old_fn)(*args, **kwargs)
        original(self, cls, name, confined, deduplicate)

    patch_method._thread_confined = True
    patcher.patch_method = patch_method


def _bucket_slice(batch: Batch, tokens: int, seqs: int) -> Batch:
    """The leading `tokens` rows and `seqs` sequences of a batch laid out for a larger bucket. Their sizes
    are unbacked to the compiler (dynamic, and never specialized, not even to 1), so that one graph serves
    every bucket: compiling it costs about what one bucket cost, and loading it from the cache a few
    seconds."""
    view = Batch(input_ids=batch.input_ids[:tokens], positions=batch.positions[:tokens],
                 slot_mapping=batch.slot_mapping[:tokens], query_start_loc=batch.query_start_loc[:seqs + 1],
                 seq_lens=batch.seq_lens[:seqs], block_tables=batch.block_tables[:seqs],
                 logits_indices=batch.logits_indices[:seqs])
    for field in dataclasses.fields(view):
        torch._dynamo.decorators.mark_unbacked(getattr(view, field.name), 0)
    return view


class _StepBuffers:
    """One step's inputs, sized for the largest bucket, as int32 in one flat host buffer that `fill`
    writes through numpy views. On CUDA the host buffer is pinned and `copy` moves it in one
    asynchronous copy into a device twin; on CPU the device side is the host buffer itself. `batch`
    views the device side (`on_device`). Block tables come last, so a step copies only the rows of its sequences:
    the kernels never read a table past a sequence's context, so stale rows and columns are harmless."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device):
        shapes = {"input_ids": (max_tokens,), "positions": (max_tokens,), "slot_mapping": (max_tokens,),
                  "query_start_loc": (max_seqs + 1,), "seq_lens": (max_seqs,), "logits_indices": (max_tokens,),
                  "block_tables": (max_seqs, max_blocks)}
        size = sum(math.prod(shape) for shape in shapes.values())
        cuda = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=cuda)
        self.on_device = torch.zeros(size, dtype=torch.int32, device=device) if cuda else self.host
        self._table_start, self._max_blocks = size - max_seqs * max_blocks, max_blocks
        host = _split(self.host.numpy(), shapes)
        self.input_ids, self.positions, self.slot_mapping = host["input_ids"], host["positions"], host["slot_mapping"]
        self.query_start_loc, self.seq_lens = host["query_start_loc"], host["seq_lens"]
        self.logits_indices, self.block_tables = host["logits_indices"], host["block_tables"]
        self.batch = Batch(**_split(self.on_device, shapes))
        # The host buffer must not be rewritten while the previous copy may still read it (a step that
        # samples nothing never waits for the device).
        self._copied = torch.cuda.Event() if cuda else None

    def copy(self, num_seqs: int) -> None:
        """Move the filled inputs to the device: everything before the block tables and `num_seqs` rows of them."""
        if self._copied is not None:
            inputs = self.step_inputs(num_seqs)
            inputs.copy_(self.host[:inputs.numel()], non_blocking=True)
            self._copied.record()

    def step_inputs(self, num_seqs: int) -> torch.Tensor:
        """The device-side inputs a step of `num_seqs` sequences reads (what `copy` moves)."""
        return self.on_device[:self._table_start + num_seqs * self._max_blocks]

    def fill(self, chunks: list[SequenceChunk], tokens: int, seqs: int, block_size: int) -> int:
        """Lay the chunks out flat and pad to `tokens`/`seqs`; returns the number of logits rows. Whole arrays
        at a time: a step of 256 decodes cost 1.4 ms chunk by chunk, most of its host work."""
        if self._copied is not None:
            self._copied.synchronize()
        n = len(chunks)
        lens = np.fromiter((len(c.token_ids) for c in chunks), np.int64, n)
        starts = np.fromiter((c.start for c in chunks), np.int64, n)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        used = int(offsets[-1])
        tables = [c.block_table for c in chunks]  # in one assignment: row by row took half of fill at 256 decodes
        row, column = _ragged(np.fromiter(map(len, tables), np.int64, n))
        self.block_tables[row, column] = np.fromiter(itertools.chain.from_iterable(tables), np.int32, len(row))
        seq, index = _ragged(lens)  # each token's chunk, and its place in it
        pos = starts[seq] + index
        self.input_ids[:used] = [t for c in chunks for t in c.token_ids]
        self.positions[:used] = pos
        self.slot_mapping[:used] = self.block_tables[seq, pos // block_size] * block_size + pos % block_size
        self.input_ids[used:tokens] = 0
        self.positions[used:tokens] = 0
        self.slot_mapping[used:tokens] = -1  # padded tokens: nothing stored
        self.seq_lens[:n] = starts + lens
        self.seq_lens[n:seqs] = 0
        self.query_start_loc[:n + 1] = offsets
        self.query_start_loc[n + 1:seqs + 1] = used  # padded sequences: query length 0
        # Logits rows: every row of a scoring chunk (row j gives the logits of the token after it), the last
        # of another that samples.
        score = np.fromiter((c.score for c in chunks), bool, n)
        sample = np.fromiter((c.sample for c in chunks), bool, n)
        rows = np.flatnonzero(score[seq] | ((np.arange(used) == offsets[1:][seq] - 1) & sample[seq]))
        self.logits_indices[:len(rows)] = rows
        self.logits_indices[len(rows):max(seqs, len(rows))] = -1  # padding: the last layer attends nothing for it
        return len(rows)


def _ragged(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of these lengths laid end to end: each element's run, and its index within the run."""
    run = np.repeat(np.arange(len(lengths)), lengths)
    return run, np.arange(len(run)) - (np.cumsum(lengths) - lengths)[run]


def _split(flat, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Consecutive views of a flat numpy array or tensor, one per named shape."""
    views, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        views[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return views
