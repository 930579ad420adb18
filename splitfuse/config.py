"""Engine and sampling configuration: msgspec Structs, validated once, when built or decoded (the wire
carries SamplingParams as they are, a worker process gets its EngineConfig as JSON).
Imported by both the frontend and the worker, so it must not import torch."""
import hashlib
import os
import reprlib
from pathlib import Path
from typing import Any

import msgspec

from splitfuse.grammar import grammar

SCHEDULERS = ("splitfuse", "prefill-first")
CPU_TOKEN_BUDGET = 256
# Where bf16 matmuls run on the CPU's AMX tiles or AVX-512 BF16 units, a step's throughput still grows past 256
# tokens (offline 1.08x at 512, docs/performance.md).
BF16_CPU_TOKEN_BUDGET = 512
# While no request streams its tokens, no one waits on a step: where bf16 runs on AMX tiles, steps of 2048 tokens
# then gave offline 1.07x over 512, and 4096 1.01-1.05x over 2048 (docs/performance.md), fewer steps each reading
# every weight once. vLLM's CPU build takes 4096 tokens a step in LLM.generate too.
AMX_BATCH_TOKEN_BUDGET = 4096
GPU_TOKEN_BUDGET = 2048
MAX_NUM_SEQS = 256
CACHE_ENV = "SPLITFUSE_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models and built kernels live: the argument, else $SPLITFUSE_CACHE, else ~/.cache/splitfuse."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "splitfuse"))


MODEL_IDENTITY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """A hash of the files that fix a model's architecture, vocabulary and tokenization: a frontend and a
    worker joining it from another machine must agree on it. Not of the weights, which could take minutes."""
    digest = hashlib.sha256()
    for name in MODEL_IDENTITY_FILES:
        path = Path(model_dir) / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    return digest.hexdigest()[:16]


MIN_TOKEN_CHARS = 16


def read_token_file(path: str) -> str:
    """The token a frontend and the workers that join it from other machines share, from a file (a command
    line is readable by every local user)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read the worker token file {path!r}: {e.strerror}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the worker token in {path!r} must have at least {MIN_TOKEN_CHARS} characters; "
                         f"make one with: openssl rand -hex 32 > {path}")
    return token


# Limits of SamplingParams: every value that reaches a worker is bounded, so none can overflow a tensor.
MAX_INT32 = 2**31 - 1           # token counts, ids and top_k travel as int32
MAX_SEED = 2**63 - 1            # fits torch.Generator.manual_seed and every client language's int64
MIN_TEMPERATURE = 0.01          # smaller ones overflow logits / temperature (vLLM raises them to this)
MAX_TEMPERATURE = 100.0
REPETITION_PENALTY = (0.01, 100.0)
MAX_PENALTY = 2.0               # presence and frequency penalty, as OpenAI's API
MAX_STOP_STRINGS = 16           # each is searched for in every text delta
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0          # as OpenAI's API: a bias in [-100, 100] per token
MAX_LOGIT_BIAS_TOKENS = 1024


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True):
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
    stop: list[str] | str = []    # stop strings, applied on text; one string is a list of one
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None   # None: none; 0: the chosen token's; n: also the top n
    prompt_logprobs: int | None = None  # the same for each prompt token (the first has none)
    return_full_text: bool = False
    logit_bias: dict[int, float] = {}  # added to the logits of these token ids
    structured: dict[str, Any] | None = None  # what the text must match: {"json": schema}, ... (grammar.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(is_int(self.max_new_tokens, 1, MAX_INT32),
               f"max_new_tokens must be an integer in [1, {MAX_INT32}], got {_show(self.max_new_tokens)}")
        _check(is_int(self.min_new_tokens, 0, self.max_new_tokens),
               f"min_new_tokens must be an integer between 0 and max_new_tokens, got {_show(self.min_new_tokens)}")
        for name in ("do_sample", "ignore_eos", "return_full_text"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be true or false, got "
                                                          f"{_show(getattr(self, name))}")
        # Below MIN_TEMPERATURE, logits / temperature overflows: ask for greedy (0) instead.
        _check(self.temperature == 0 or _is_real(self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE),
               f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
               f"got {_show(self.temperature)}")
        _check(is_int(self.top_k, 0, MAX_INT32),
               f"top_k must be an integer in [0, {MAX_INT32}] (0: off), got {_show(self.top_k)}")
        _check(_is_real(self.top_p, 0, 1) and self.top_p > 0, f"top_p must be in (0, 1], got {_show(self.top_p)}")
        _check(_is_real(self.min_p, 0, 1) and self.min_p < 1, f"min_p must be in [0, 1), got {_show(self.min_p)}")
        _check(_is_real(self.repetition_penalty, *REPETITION_PENALTY),
               f"repetition_penalty must be in {list(REPETITION_PENALTY)} (1: off), "
               f"got {_show(self.repetition_penalty)}")
        for name in ("presence_penalty", "frequency_penalty"):
            _check(_is_real(getattr(self, name), -MAX_PENALTY, MAX_PENALTY),
                   f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}] (0: off), got {_show(getattr(self, name))}")
        _check(self.seed is None or is_int(self.seed, 0, MAX_SEED),
               f"seed must be an integer in [0, 2**63), got {_show(self.seed)}")
        _check(isinstance(self.stop, list) and len(self.stop) <= MAX_STOP_STRINGS
               and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
               f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings, each of 1 to "
               f"{MAX_STOP_CHARS} characters")
        _check(all(is_utf8(s) for s in self.stop), "stop strings must be valid Unicode text (a lone surrogate "
                                                   "such as \\ud800 cannot be encoded)")
        _check(isinstance(self.stop_token_ids, list) and len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS
               and all(is_int(t, 0, MAX_INT32) for t in self.stop_token_ids),
               f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} non-negative token ids")
        for name in ("logprobs", "prompt_logprobs"):
            _check(getattr(self, name) is None or is_int(getattr(self, name), 0, MAX_LOGPROBS),
                   f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {_show(getattr(self, name))}")
        _check(isinstance(self.logit_bias, dict) and len(self.logit_bias) <= MAX_LOGIT_BIAS_TOKENS
               and all(is_int(t, 0, MAX_INT32) and _is_real(b, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
                       for t, b in self.logit_bias.items()),
               f"logit_bias must map at most {MAX_LOGIT_BIAS_TOKENS} token ids to biases in "
               f"[-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")
        if self.structured is not None:
            grammar(self.structured)  # a ValueError naming what is wrong

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        return _from_kwargs(cls, "sampling parameter", kwargs)


class EngineConfig(msgspec.Struct, forbid_unknown_fields=True):
    """What one worker runs. `model=None` means the bundled SmolLM2-135M-Instruct. A worker process is
    given it as JSON (`to_json`), the one form it travels in."""
    model: str | None = None
    dtype: str = "auto"               # auto: bf16 where the hardware has it natively
    device: str = "auto"              # auto: cuda if available, else cpu
    token_budget: int | None = None   # tokens per forward pass (the SplitFuse target); None: per device
    batch_token_budget: int | None = None  # the same while no request streams; None: per device (token_budget if given)
    max_num_seqs: int | None = None   # sequences per forward pass; None: min(token_budget, 256)
    block_size: int = 16
    num_blocks: int | None = None     # KV cache size; None: from gpu_memory_utilization (CPU: kv_memory_fraction)
    kv_memory_fraction: float = 0.1   # CPU: of total RAM for the KV cache
    gpu_memory_utilization: float = 0.9  # GPU: of total device memory for the replicas on it (weights, steps, KV)
    max_model_len: int | None = None  # None: the model's maximum
    scheduler: str = "splitfuse"
    eager: bool = False               # True: no torch.compile, no CUDA graphs
    background_compile: bool = True   # serve eagerly at once and switch to compiled when it is ready
    deterministic: bool = False       # outputs independent of batch, prefix cache and chunking from the first step
    buckets: list[int] | None = None  # token-count shapes; None: 1, and batch_token_budget and its halves down to 8 (GPU: quarters down to 16)
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before
    prefix_routing: bool = True       # frontend, several replicas: prefer the replica that holds a prompt's prefix
    cache_dir: str | None = None      # where the bundled model is converted to
    tensor_parallel_size: int = 1     # ranks (processes, devices) one replica's model is sharded over
    nnodes: int = 1                   # hosts a tensor-parallel group spans, tensor_parallel_size / nnodes ranks each
    master_addr: str = "127.0.0.1"    # nnodes > 1: the first host's address, where the group meets
    master_port: int | None = None    # nnodes > 1: a free port there; None (one host): any free port

    def __post_init__(self) -> None:
        _check(self.scheduler in SCHEDULERS, f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        _check(self.token_budget is None or (isinstance(self.token_budget, int) and self.token_budget >= 8),
               f"token_budget must be an integer >= 8, got {self.token_budget!r}")
        _check(self.batch_token_budget is None or (isinstance(self.batch_token_budget, int)
                                                   and self.batch_token_budget >= (self.token_budget or 8)),
               f"batch_token_budget must be an integer >= token_budget (and 8), got {self.batch_token_budget!r}")
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
        _check(is_int(self.tensor_parallel_size, 1, 1 << 16),
               f"tensor_parallel_size must be a positive integer, got {_show(self.tensor_parallel_size)}")
        _check(is_int(self.nnodes, 1, self.tensor_parallel_size) and self.tensor_parallel_size % self.nnodes == 0,
               f"nnodes ({_show(self.nnodes)}) must divide tensor_parallel_size ({self.tensor_parallel_size}): "
               f"every host runs the same number of ranks")
        _check(self.nnodes == 1 or is_int(self.master_port, 1, 65535),
               "a group over several hosts (nnodes > 1) needs master_port: a free TCP port on master_addr")
        _check(not (self.deterministic and self.scheduler == "prefill-first" and not self.eager),
               "deterministic needs scheduler 'splitfuse' (or eager): prefill-first runs a step longer than the "
               "largest bucket eagerly, and eager and compiled steps differ in their last bits")
        _check(self.buckets is None or (all(isinstance(b, int) and b > 0 for b in self.buckets)
                                        and max(self.buckets) >= max(self.token_budget or 0,
                                                                     self.batch_token_budget or 0)),
               "buckets must be positive integers, the largest at least token_budget and batch_token_budget")

    def for_device(self, gpu: bool, bf16_gemm: bool = False, amx: bool = False) -> "EngineConfig":
        """The options a device leaves open filled in: the token budget (the benchmark's best on CPU, more
        where bf16 runs on the CPU's bf16 units (`bf16_gemm`), docs/performance.md; a GPU's matmuls want thousands
        of rows), sequences per step following it, and the budget while no request streams (more on AMX tiles, `amx`)."""
        cpu_budget = BF16_CPU_TOKEN_BUDGET if bf16_gemm else CPU_TOKEN_BUDGET
        budget = self.token_budget or (GPU_TOKEN_BUDGET if gpu else cpu_budget)
        if self.token_budget is None and self.buckets:
            budget = min(budget, max(self.buckets))
        batch = self.batch_token_budget or (AMX_BATCH_TOKEN_BUDGET if amx and self.token_budget is None else budget)
        if self.batch_token_budget is None and self.buckets:
            batch = min(batch, max(self.buckets))
        return msgspec.structs.replace(self, token_budget=budget, batch_token_budget=max(batch, budget),
                                       max_num_seqs=self.max_num_seqs or min(budget, MAX_NUM_SEQS))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        return _from_kwargs(cls, "engine option", kwargs)

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str) -> "EngineConfig":
        try:
            return msgspec.json.decode(text, type=cls)
        except msgspec.DecodeError as e:
            raise ValueError(f"invalid engine configuration: {e}") from None


def _from_kwargs(cls, what: str, kwargs: dict):
    unknown = sorted(set(kwargs) - set(cls.__struct_fields__))
    if unknown:
        raise ValueError(f"unknown {what}(s) {', '.join(unknown)}; valid: {', '.join(cls.__struct_fields__)}")
    return cls(**kwargs)


def is_utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8, as every string crossing a process boundary must."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def is_int(x, low: int, high: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high


def _is_real(x, low: float, high: float) -> bool:
    """A number in [low, high]; NaN fails every comparison, so it is refused too."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and low <= x <= high


def _show(x) -> str:
    return reprlib.repr(x)  # a huge value is quoted in a short error message, not echoed whole
