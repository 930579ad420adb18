"""The step loop of one worker: add and abort requests, schedule, run the model, sample, update."""
import functools
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from splitfuse.compiled.loader import load_config, load_model, resolve_dtype, resolve_model_dir
from splitfuse.compiled.parallel import SINGLE, Shard, StepBroadcast
from splitfuse.compiled.precompile import CompileSpec
from splitfuse.compiled.runner import ModelRunner, SequenceChunk, default_buckets, kv_cache_bytes_per_block
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.kernels import cpu, ops
from splitfuse.worker.block_manager import BlockManager
from splitfuse.worker.grammars import Grammars
from splitfuse.protocol import Output
from splitfuse.worker.request import Request
from splitfuse.worker.sampler import Sampler, token_logprobs
from splitfuse.worker.scheduler import Scheduler


# Device memory torch's allocator does not see: the CUDA context, cuBLAS workspaces, Triton and Inductor
# modules, and the sampler's copies of the logits.
CUDA_OVERHEAD_BYTES = 1 << 30


class Engine:
    def __init__(self, config: EngineConfig, progress: bool = True, replicas_on_device: int = 1,
                 shard: Shard = SINGLE):
        """`replicas_on_device`: replicas sharing this one's GPU, which split its gpu_memory_utilization.
        `shard`: this rank's place in a tensor-parallel group. Every rank builds an Engine in the same
        order (their collectives must match); rank 0 schedules and hands each step to the others."""
        device = torch.device(config.device if config.device != "auto"
                              else "cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            # Triton launches, streams and CUDA graphs go to the current device, not the tensors' one:
            # make this replica's current before anything touches CUDA.
            device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
            torch.cuda.set_device(device)
        dtype = resolve_dtype(config.dtype, device)
        bf16_cpu = device.type == "cpu" and dtype == torch.bfloat16
        self.config = config = config.for_device(device.type == "cuda", bf16_gemm=bf16_cpu and cpu.has_bf16_gemm(),
                                                 amx=bf16_cpu and cpu.has_amx())
        ops.batch_invariant = config.deterministic  # read as the model is traced: before it is built
        self.model_dir = resolve_model_dir(config.model, config.cache_dir)
        hf_config = load_config(self.model_dir)
        model = load_model(self.model_dir, dtype, device, shard)
        self.max_model_len = min(config.max_model_len or model.max_model_len, model.max_model_len)
        self.eos_token_ids = _eos_token_ids(hf_config)
        buckets = config.buckets or default_buckets(config.batch_token_budget, device.type == "cuda")
        # A tensor-parallel rank's graphs hold collectives of its group: they compile in place, never elsewhere.
        spec = CompileSpec(str(self.model_dir), str(dtype).removeprefix("torch."), device.type, config.block_size,
                           config.max_num_seqs, self.max_model_len, tuple(buckets),
                           config.deterministic and device.type == "cuda") if shard.size == 1 else None
        runner = functools.partial(ModelRunner, model, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                                   max_model_len=self.max_model_len, buckets=buckets)

        def profile() -> None:  # on a one-block cache: an all-padding step reads and writes no KV
            runner(num_blocks=1, compile=False, cuda_graphs=False).profile()
        num_blocks = config.num_blocks or _blocks_for_memory(model, config, dtype, device, profile, replicas_on_device)
        num_blocks = shard.agree_min(num_blocks, device)  # the ranks' shards, and so their blocks, differ in size
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, config.token_budget, config.max_num_seqs, self.blocks,
                                   config.batch_token_budget)
        self.runner = runner(num_blocks=num_blocks, compile=not config.eager, cuda_graphs=not config.eager, spec=spec)
        self._idle = threading.Event()  # set when the engine first goes idle: a background compile starts then
        # Not in the background beside tensor-parallel steps: the two threads' collectives would interleave
        # differently on each rank; nor when deterministic: eager steps differ from compiled ones in their last bits.
        self.runner.compile(background=config.background_compile and not config.deterministic and shard.size == 1,
                            progress=progress, start=self._idle)
        if shard.size > 1 and shard.rank == 0:
            self.runner.on_step = StepBroadcast(shard, device).send
        self.sampler = Sampler(self.eos_token_ids)
        self.grammars = Grammars(self.model_dir, model.lm_head.vocab_size, self.eos_token_ids)
        self._masks = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self._requests: dict[str, Request] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._pending: list[Output] = []  # aborts, reported by the next step

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    streamed: bool = True) -> Request:
        """`streamed`: someone reads its tokens as they come, so its steps keep to token_budget."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        self._check_prompt(prompt_token_ids, params)
        request = Request(request_id, list(prompt_token_ids), len(prompt_token_ids), params, streamed=streamed)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs.append(None)  # the first token has nothing before it
        if params.structured is not None:
            self.grammars.start(request_id, params.structured)
        self._requests[request_id] = request
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
            self._generators[request_id] = torch.Generator(self.runner.device).manual_seed(seed)
        self.scheduler.add(request)
        return request

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not isinstance(ids, list) or not ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.runner.model.lm_head.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        for name in ("stop_token_ids", "logit_bias"):  # the sampler indexes logits with them
            if not all(0 <= t < vocab for t in getattr(params, name)):
                raise ValueError(f"{name}: token ids must be in [0, {vocab}), this model's vocabulary")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's maximum length is {self.max_model_len}, "
                             f"so prompts can have at most {self.max_model_len - 1}")
        longest = min(len(ids) + params.max_new_tokens, self.max_model_len)
        if self.blocks.blocks_for(longest) > self.blocks.num_blocks:
            raise ValueError(f"prompt plus max_new_tokens ({longest} tokens) exceeds the KV cache "
                             f"({self.blocks.num_blocks * self.blocks.block_size} tokens); shorten them or raise num_blocks")

    def abort(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is None:
            return
        self._forget(request)
        self._pending.append(Output(request_id, [], "abort", num_cached_tokens=request.num_cached_tokens))

    def fail_running(self, error: str) -> list[Output]:
        """After a step raised: end every request holding KV blocks (those of the failed step among them,
        which it may have left half-updated) with finish_reason "error" and free their blocks. Waiting
        requests go on, and so does the engine."""
        failed = list(self.scheduler.running)
        for request in failed:
            self._forget(request)
        return [Output(r.request_id, [], "error", error=error, num_cached_tokens=r.num_cached_tokens)
                for r in failed]

    def abort_all(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._pending)

    def stats(self) -> dict:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "blocks_in_use": self.blocks.num_used, "blocks_total": self.blocks.num_blocks,
                "queued_tokens": self.scheduler.queued_tokens(), "preemptions": self.scheduler.num_preemptions,
                "prefix_cache_queries": self.blocks.queries, "prefix_cache_hits": self.blocks.hits,
                "blocks_cached": self.blocks.num_cached}

    def step(self) -> list[Output]:
        outputs, self._pending = self._pending, []
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return outputs
        chunks = self._chunks(scheduled)
        sampling = [s.request for s, c in zip(scheduled, chunks) if c.sample]
        constrained = [i for i, r in enumerate(sampling) if r.request_id in self.grammars]
        masks = self._masks.submit(self.grammars.forbidden, [sampling[i].request_id for i in constrained]) \
            if constrained else None  # computed while the forward runs
        logits = self.runner.execute(chunks)
        if any(c.score for c in chunks):
            logits = self._score_prompts(scheduled, chunks, logits)
        for s in scheduled:
            s.request.num_computed_tokens += s.num_tokens
        if sampling:
            sampled = self.sampler(logits, sampling, [self._generators.get(r.request_id) for r in sampling],
                                   constrained, masks and masks.result())
            for request, out in zip(sampling, sampled):
                outputs.append(self._append(request, out))
        if not self._requests:
            self._idle.set()
        return outputs

    @staticmethod
    def _chunks(scheduled) -> list[SequenceChunk]:
        """What the runner computes for each scheduled request: its next tokens from where its cache ends."""
        chunks = []
        for s in scheduled:
            r, start = s.request, s.request.num_computed_tokens
            end = start + s.num_tokens
            chunks.append(SequenceChunk(r.token_ids[start:end], start, r.block_table, end == len(r.token_ids),
                                        r.scores_prompt))
        return chunks

    def _score_prompts(self, scheduled, chunks: list[SequenceChunk], logits: torch.Tensor) -> torch.Tensor:
        """Record the prompt log-probabilities the scoring chunks' rows give; returns the sampled rows."""
        row, sampled = 0, []
        for s, chunk in zip(scheduled, chunks):
            if chunk.score:
                _record_prompt_logprobs(s.request, chunk.start, logits[row:row + len(chunk.token_ids)])
                row += len(chunk.token_ids)
                sampled += [row - 1] if chunk.sample else []
            elif chunk.sample:
                sampled.append(row)
                row += 1
        return logits[sampled]

    def _append(self, request: Request, out: Output) -> Output:
        """The sampled token joins its request; `out` gets how the request ends, if it does."""
        token = out.token_ids[0]
        request.token_ids.append(token)
        out.error = self.grammars.accept(request.request_id, token) if request.request_id in self.grammars else None
        out.finish_reason = request.finish_reason = "error" if out.error else self._finish_reason(request, token)
        if request.finish_reason is not None:
            self._forget(request)
            out.num_cached_tokens = request.num_cached_tokens
        if request.num_generated == 1 and request.params.prompt_logprobs is not None:
            out.prompt_logprobs = request.prompt_logprobs
        return out

    def _forget(self, request: Request) -> None:
        self.scheduler.remove(request)
        del self._requests[request.request_id]
        self._generators.pop(request.request_id, None)
        self.grammars.finish(request.request_id)

    def _finish_reason(self, request: Request, token: int) -> str | None:
        p = request.params
        if request.request_id in self.grammars and self.grammars.complete(request.request_id):
            return "stop"
        if request.num_generated >= p.min_new_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                return "stop"
        if request.num_generated >= p.max_new_tokens or len(request.token_ids) >= self.max_model_len:
            return "length"
        return None


def _record_prompt_logprobs(request: Request, start: int, logits: torch.Tensor) -> None:
    """Row j of `logits` follows the token at position start + j: it scores the prompt token after it.
    Positions scored before (a preempted request computes its prompt again) are kept as they were."""
    first = len(request.prompt_logprobs)  # the next position to score
    rows = range(max(first - 1 - start, 0), min(len(logits), request.prompt_len - 1 - start))
    if not rows:
        return
    targets = request.token_ids[start + 1 + rows.start:start + 1 + rows.stop]
    chosen, tops = token_logprobs(logits[rows.start:rows.stop], torch.tensor(targets, device=logits.device),
                                  request.params.prompt_logprobs)
    request.prompt_logprobs += [top | {target: value} for target, value, top in zip(targets, chosen, tops)]


def _eos_token_ids(hf_config) -> list[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    return sorted(set(eos)) if isinstance(eos, list) else [] if eos is None else [eos]


def _blocks_for_memory(model, config: EngineConfig, dtype: torch.dtype, device: torch.device,
                       profile: Callable[[], None], replicas_on_device: int = 1) -> int:
    """KV blocks for this replica. On CPU: kv_memory_fraction of total RAM. On GPU, as vLLM's
    gpu_memory_utilization: the replicas on a device use that share of its *total* memory in all (split
    evenly, so two never both count the same free memory); this replica's KV cache gets its part less
    the weights, the peak of a forward at the largest bucket, the same again for the CUDA graphs' pool
    (which keeps the largest bucket's activations) and CUDA_OVERHEAD_BYTES; and never more than is free."""
    per_block = kv_cache_bytes_per_block(model, config.block_size, dtype)
    if device.type != "cuda":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return max(int(ram * config.kv_memory_fraction) // per_block, 1)
    weights = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    profile()
    peak = torch.cuda.max_memory_allocated(device)  # weights + the forward's activations and logits
    graphs = 0 if config.eager else peak - weights
    share = torch.cuda.get_device_properties(device).total_memory * config.gpu_memory_utilization / replicas_on_device
    free = torch.cuda.mem_get_info(device)[0]
    kv_bytes = min(share - peak, free) - graphs - CUDA_OVERHEAD_BYTES
    if kv_bytes < per_block:
        gib, step = 1 << 30, max(config.buckets or [config.batch_token_budget])
        raise ValueError(f"no GPU memory left for the KV cache: this replica's share is {share / gib:.1f} GiB "
                         f"(gpu_memory_utilization {config.gpu_memory_utilization} of {device}, "
                         f"{replicas_on_device} replica(s) on it), the weights take {weights / gib:.1f} GiB, a "
                         f"{step}-token step {(peak - weights) / gib:.1f} GiB, and {free / gib:.1f} GiB are free; "
                         f"raise gpu_memory_utilization, lower token_budget, or set num_blocks")
    return int(kv_bytes) // per_block
