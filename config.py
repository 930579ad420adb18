"""Engine and sampling configuration: plain dataclasses, validated once at construction.
Imported by both the frontend and the worker, so it must not import torch."""
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

SCHEDULERS = ("splitfuse", "prefill-first")
CPU_TOKEN_BUDGET = 256
GPU_TOKEN_BUDGET = 2048
MAX_NUM_SEQS = 256
CACHE_ENV = "SPLITFUSE_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models and built kernels live: the argument, else $SPLITFUSE_CACHE, else ~/.cache/splitfuse."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "splitfuse"))


@dataclass(slots=True)
class SamplingParams:
    """Per-request generation settings; names follow DeepSpeed-MII and transformers."""
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0            # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)          # stop strings, applied on text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None   # None: none; 0: the chosen token's; n: also the top n
    return_full_text: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0,
               f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        _check(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens,
               f"min_new_tokens must be between 0 and max_new_tokens, got {self.min_new_tokens!r}")
        _check(_is_number(self.temperature) and self.temperature >= 0,
               f"temperature must be >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p!r}")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        _check(_is_number(self.presence_penalty) and _is_number(self.frequency_penalty),
               "presence_penalty and frequency_penalty must be numbers")
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be a non-empty string or a list of them")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be a list of token ids")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        return _from_kwargs(cls, "sampling parameter", kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class EngineConfig:
    """What one worker runs. `model=None` means the bundled SmolLM2-135M-Instruct."""
    model: str | None = None
    dtype: str = "auto"               # auto: bf16 where the hardware has it natively
    device: str = "auto"              # auto: cuda if available, else cpu
    token_budget: int | None = None   # tokens per forward pass (the SplitFuse target); None: per device
    max_num_seqs: int | None = None   # sequences per forward pass; None: min(token_budget, 256)
    block_size: int = 16
    num_blocks: int | None = None     # KV cache size; None: from gpu_memory_utilization (CPU: kv_memory_fraction)
    kv_memory_fraction: float = 0.1   # CPU: of total RAM for the KV cache
    gpu_memory_utilization: float = 0.9  # GPU: of total device memory for the replicas on it (weights, steps, KV)
    max_model_len: int | None = None  # None: the model's maximum
    scheduler: str = "splitfuse"
    eager: bool = False               # True: no torch.compile, no CUDA graphs
    background_compile: bool = True   # serve eagerly at once and switch to compiled when it is ready
    buckets: list[int] | None = None  # token-count shapes; None: token_budget and quarters of it down to 16
    cache_dir: str | None = None      # where the bundled model is converted to

    def __post_init__(self) -> None:
        _check(self.scheduler in SCHEDULERS, f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        _check(self.token_budget is None or (isinstance(self.token_budget, int) and self.token_budget >= 8),
               f"token_budget must be an integer >= 8, got {self.token_budget!r}")
        _check(self.max_num_seqs is None or (isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1),
               f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        _check(None in (self.max_num_seqs, self.token_budget) or self.max_num_seqs <= self.token_budget,
               f"max_num_seqs ({self.max_num_seqs}) must not exceed token_budget ({self.token_budget}): "
               f"every running sequence needs a token in each step")
        _check(self.block_size in (16, 32, 64, 128), f"block_size must be 16, 32, 64 or 128, got {self.block_size!r}")
        _check(self.num_blocks is None or (isinstance(self.num_blocks, int) and self.num_blocks >= 1),
               f"num_blocks must be a positive integer, got {self.num_blocks!r}")
        _check(0 < self.kv_memory_fraction < 1, f"kv_memory_fraction must be in (0, 1), got {self.kv_memory_fraction!r}")
        _check(0 < self.gpu_memory_utilization <= 1,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        _check(self.buckets is None or (all(isinstance(b, int) and b > 0 for b in self.buckets)
                                        and max(self.buckets) >= (self.token_budget or 0)),
               "buckets must be positive integers, the largest at least token_budget")

    def for_device(self, gpu: bool) -> "EngineConfig":
        """The options a device leaves open filled in: the token budget (the benchmark's best on CPU,
        README; a GPU's matmuls want thousands of rows) and sequences per step following it."""
        budget = self.token_budget or (GPU_TOKEN_BUDGET if gpu else CPU_TOKEN_BUDGET)
        if self.token_budget is None and self.buckets:
            budget = min(budget, max(self.buckets))
        return replace(self, token_budget=budget, max_num_seqs=self.max_num_seqs or min(budget, MAX_NUM_SEQS))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        return _from_kwargs(cls, "engine option", kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


def _from_kwargs(cls, what: str, kwargs: dict):
    unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what}(s) {', '.join(unknown)}; valid: {', '.join(f.name for f in fields(cls))}")
    return cls(**kwargs)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
