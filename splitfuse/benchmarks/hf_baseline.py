"""Hugging Face transformers as a user would otherwise run the same workload: it has no server,
so it is measured offline (every request submitted at once), in this process, at the same dtype.

- static batching: `model.generate` on left-padded batches; each batch runs until its longest
  request is done, and only the requested tokens count as output.
- continuous batching: the engine behind `model.generate_batch` (transformers >= 4.56), driven
  through its `continuous_batching_context_manager` because `generate_batch` takes one
  `max_new_tokens` for all requests, while this workload's lengths differ per request.

EOS is ignored in both (min_new_tokens, or an EOS id no token has), as `ignore_eos` in ours."""
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

from splitfuse.compiled.loader import resolve_dtype

from .metrics import Offline
from .workload import Request

NO_EOS = -1  # an EOS token id that is never generated: requests run to their max_new_tokens
RESULT_TIMEOUT = 600.0


def load(model_dir: str, dtype: str) -> transformers.PreTrainedModel:
    """The model in the engine's resolution of `dtype` ("auto" included), so both run the same precision."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype, torch.device("cpu"))).eval()


def _pad_id(model) -> int:
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0


def _totals(requests: list[Request]) -> tuple[int, int]:
    return sum(len(r.prompt_ids) for r in requests), sum(r.max_new_tokens for r in requests)


def _generate_padded(model, batch: list[Request], pad_id: int) -> None:
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.tensor([[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
    steps = max(r.max_new_tokens for r in batch)
    model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                   pad_token_id=pad_id)


@torch.inference_mode()
def static_batching(model, requests: list[Request], batch_size: int) -> Offline:
    pad_id = _pad_id(model)
    _generate_padded(model, [Request(requests[0].prompt_ids[:16], 2)], pad_id)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        _generate_padded(model, requests[i:i + batch_size], pad_id)
    return Offline.measure("hf-static", *_totals(requests), len(requests), time.perf_counter() - start,
                           f"generate, batches of {batch_size}, left padding")


def continuous_batching(model, requests: list[Request]) -> Offline | None:
    """None where the installed transformers has no continuous batching."""
    if not hasattr(model, "continuous_batching_context_manager"):
        return None
    config = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in requests),
                              eos_token_id=NO_EOS, pad_token_id=_pad_id(model))
    # warmup=False: the built-in warm-up captures CUDA graphs; on CPU a small request warms up instead.
    with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=60,
                                                   warmup=False) as manager:
        _wait(manager, [manager.add_request(requests[0].prompt_ids[:16], max_new_tokens=2, eos_token_id=NO_EOS)])
        start = time.perf_counter()
        ids = [manager.add_request(r.prompt_ids, max_new_tokens=r.max_new_tokens, eos_token_id=NO_EOS)
               for r in requests]
        results = _wait(manager, ids)
        seconds = time.perf_counter() - start
    short = sum(1 for r, i in zip(requests, ids) if len(results[i].generated_tokens) != r.max_new_tokens)
    note = "generate_batch's engine, per-request max_new_tokens"
    return Offline.measure("hf-continuous", *_totals(requests), len(requests), seconds,
                           note + (f"; {short} requests ended early or failed" if short else ""))


def _wait(manager, ids: list[str]) -> dict:
    results, deadline = {}, time.monotonic() + RESULT_TIMEOUT
    while len(results) < len(ids):
        if time.monotonic() > deadline or not manager.is_running():
            raise RuntimeError(f"transformers' continuous batching stopped with {len(ids) - len(results)} "
                               f"requests unfinished")
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            results[result.request_id] = result
    return results


def run(model_dir: str, dtype: str, workloads: dict[str, list[Request]], batch_size: int) -> dict[str, dict]:
    """Both baselines on each workload: {preset: {backend: Offline}}; a missing one is reported, not fatal."""
    model = load(model_dir, dtype)
    print(f"  transformers {transformers.__version__}, {model.dtype}, {torch.get_num_threads()} threads", flush=True)
    results: dict[str, dict] = {}
    for name, requests in workloads.items():
        results[name] = {"hf-static": static_batching(model, requests, batch_size)}
        continuous = continuous_batching(model, requests)
        if continuous is None:
            print(f"  transformers {transformers.__version__} has no continuous batching (generate_batch)")
        else:
            results[name]["hf-continuous"] = continuous
        for r in results[name].values():
            print(f"    {name} {r.backend}: {r.requests} requests in {r.seconds:.1f}s, "
                  f"{r.output_tokens_per_s:.1f} output tokens/s", flush=True)
    return results
