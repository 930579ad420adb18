"""Same request, same answer: a request's tokens and log-probabilities, greedy and seeded sampling, are
bit-identical to running it alone, whatever else shares its steps (batches of 1-48, arrivals mid-flight,
aborts), whether its prefix came from the prefix cache, and however its prompt was chunked (token budgets
32 and 256). In bf16 on the bundled model, where the kernels before they were made batch-invariant failed
this; and in fp32 on a tiny model, where any reduction in another order shows at once."""
import random

import pytest
import torch
import transformers

from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.worker.engine import Engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama-det")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=512)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(params=["bundled bf16", "tiny fp32", "tiny fp32 compiled"])
def case(request, tiny) -> tuple[dict, int]:
    """Engine options and the vocabulary size. Compiled: `deterministic` compiles before the first step."""
    if request.param == "bundled bf16":
        return dict(model=str(bundled_model_dir()), dtype="bfloat16"), 49152
    compiled = request.param.endswith("compiled")
    return dict(model=tiny, dtype="float32", eager=not compiled, deterministic=compiled), 512


def make_engine(case, budget: int, **options) -> Engine:
    config = dict(device="cpu", eager=True, num_blocks=256, block_size=16, token_budget=budget,
                  max_num_seqs=min(budget, 48)) | case[0] | options
    engine = Engine(EngineConfig(**config), progress=False)
    assert engine.runner.compiled.is_set()  # eager, or compiled before any step
    return engine


def workload(seed: int, n: int, vocab: int) -> list[tuple[list[int], SamplingParams]]:
    """Prompts of 1-200 tokens, half of them behind one of three shared prefixes; greedy and seeded; some
    score their prompts (prompt log-probabilities), which runs their chunks in a forward of their own."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab) for _ in range(rng.randint(16, 70))] for _ in range(3)]
    requests = []
    for i in range(n):
        own = [rng.randrange(vocab) for _ in range(rng.randint(1, 130))]
        sampled = rng.random() < 0.5
        params = SamplingParams(max_new_tokens=rng.randint(1, 8), ignore_eos=True, logprobs=2, do_sample=sampled,
                                temperature=0.8, top_p=0.9, seed=rng.randrange(1 << 30) if sampled else None,
                                prompt_logprobs=1 if rng.random() < 0.15 else None)
        requests.append(((rng.choice(prefixes) + own) if i % 2 else own, params))
    return requests


def answers(outputs) -> dict[str, tuple]:
    """Each request's tokens, their log-probabilities and top log-probabilities, and its prompt's."""
    got = {}
    for out in outputs:
        tokens, logprobs, tops, prompt = got.setdefault(out.id, ([], [], [], []))
        tokens += out.token_ids
        logprobs += out.logprobs or []
        tops += out.top_logprobs or []
        prompt += out.prompt_logprobs or []
    return got


def run_alone(case, requests) -> dict[str, tuple]:
    """One request at a time, each computed from its first token (no prefix cache)."""
    engine, outputs = make_engine(case, 256, enable_prefix_caching=False), []
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
        while engine.has_unfinished():
            outputs += engine.step()
    return answers(outputs)


@pytest.mark.parametrize("budget", [32, 256])
def test_a_requests_outputs_do_not_depend_on_the_batch_the_cache_or_the_chunking(case, budget):
    requests = workload(seed=budget, n=48, vocab=case[1])
    alone = run_alone(case, requests)
    rng = random.Random(budget + 1)
    engine = make_engine(case, budget)
    outputs, pending, noise = [], list(range(len(requests))), 0
    while pending or engine.has_unfinished():
        if pending and rng.random() < 0.3:  # a batch of 1-48 arrives between steps, and requests to abort
            batch = pending[:rng.randint(1, 48)]
            pending = pending[len(batch):]
            for i in batch:
                engine.add_request(str(i), *requests[i])
            for _ in range(rng.randint(0, 3)):
                engine.add_request(f"noise-{noise}", *requests[rng.randrange(len(requests))])
                if rng.random() < 0.5:
                    outputs += engine.step()
                engine.abort(f"noise-{noise}")
                noise += 1
        outputs += engine.step()
    got = {rid: a for rid, a in answers(outputs).items() if not rid.startswith("noise")}
    assert engine.stats()["prefix_cache_hits"] > 0 and engine.stats()["blocks_in_use"] == 0
    differ = [rid for rid in alone if got[rid] != alone[rid]]
    assert not differ, f"{len(differ)} of {len(alone)} requests differ from running alone, e.g. {differ[:5]}"


def test_deterministic_compiled_needs_the_splitfuse_scheduler():
    with pytest.raises(ValueError, match="deterministic needs scheduler 'splitfuse'"):
        EngineConfig(deterministic=True, scheduler="prefill-first")
    EngineConfig(deterministic=True, scheduler="prefill-first", eager=True)
