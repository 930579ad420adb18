"""Engine step loop on a tiny random Llama, checked against transformers' greedy tokens."""
from collections import defaultdict

import pytest
import torch
import transformers

from splitfuse.config import (AMX_BATCH_TOKEN_BUDGET, BF16_CPU_TOKEN_BUDGET, CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET,
                              MAX_NUM_SEQS, EngineConfig, SamplingParams)
from splitfuse.protocol import Output
from splitfuse.worker.engine import Engine


@pytest.fixture(scope="module")
def llama(make_checkpoint):
    path = make_checkpoint("llama")
    return path, transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def make_engine(path, **options) -> Engine:
    config = dict(model=str(path), dtype="float32", device="cpu", eager=True, num_blocks=64, block_size=16,
                  token_budget=64, max_num_seqs=8)
    return Engine(EngineConfig(**(config | options)), progress=False)


def drive(engine: Engine, steps: int | None = None) -> list[Output]:
    """Run `steps` steps, or until nothing is left (bounded, so a stall fails instead of hanging)."""
    outputs = []
    for _ in range(steps or 5000):
        if steps is None and not engine.has_unfinished():
            return outputs
        outputs += engine.step()
    assert steps is not None, "the engine did not finish"
    return outputs


def summary(outputs: list[Output]) -> dict[str, tuple[list[int], str | None]]:
    tokens, reasons = defaultdict(list), {}
    for out in outputs:
        assert out.id not in reasons, "output after the finish"
        tokens[out.id] += out.token_ids
        if out.finish_reason:
            reasons[out.id] = out.finish_reason
    return {rid: (tokens[rid], reasons.get(rid)) for rid in tokens | reasons}


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, ignoring EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def random_prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, 128, (k,), generator=g).tolist() for k in lengths]


def blocks_for(tokens: int) -> int:
    return -(-tokens // 16)


@pytest.fixture(scope="module")
def crowd(llama):
    """8 requests of 20-60 prompt tokens + 20 new ones, and transformers' greedy tokens for them."""
    prompts = random_prompts(8, 20, 60, seed=0)
    return prompts, {str(i): (hf_greedy(llama[1], p, 20), "length") for i, p in enumerate(prompts)}


@pytest.mark.parametrize("policy", ["splitfuse", "prefill-first"])
def test_preemption_under_a_tiny_pool_gives_the_greedy_tokens(llama, crowd, policy):
    prompts, expected = crowd
    for num_blocks in (6, 128):  # 6 blocks hold one request (at most 80 tokens) with one block to spare
        engine = make_engine(llama[0], num_blocks=num_blocks, scheduler=policy)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(max_new_tokens=20, ignore_eos=True))
        assert summary(drive(engine)) == expected
        stats = engine.stats()
        assert stats["blocks_in_use"] == 0 and stats["running"] == stats["waiting"] == 0
        assert (stats["preemptions"] > 0) == (num_blocks == 6)


def test_abort_frees_the_blocks_and_reports_abort(llama):
    path, hf = llama
    a, b = random_prompts(2, 20, 40, seed=1)
    engine = make_engine(path)
    engine.add_request("a", a, SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.add_request("b", b, SamplingParams(max_new_tokens=6, ignore_eos=True))
    before = summary(drive(engine, steps=3))
    cached = {rid: len(p) + len(before[rid][0]) - 1 for rid, p in (("a", a), ("b", b))}  # the newest has no K/V yet
    assert engine.stats()["blocks_in_use"] == blocks_for(cached["a"]) + blocks_for(cached["b"])
    engine.abort("a")
    assert engine.stats()["blocks_in_use"] == blocks_for(cached["b"])
    engine.add_request("c", a, SamplingParams())   # still waiting when aborted
    engine.abort("c")
    engine.abort("unknown")                        # a no-op
    after = summary(drive(engine))
    assert after["a"] == ([], "abort") and after["c"] == ([], "abort")
    assert (before["b"][0] + after["b"][0], after["b"][1]) == (hf_greedy(hf, b, 6), "length")
    assert engine.stats()["blocks_in_use"] == 0


def test_bad_input_is_a_clear_value_error_and_requests_in_flight_still_finish(llama):
    path, hf = llama
    prompts = random_prompts(3, 5, 30, seed=2)
    engine = make_engine(path)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_new_tokens=8, ignore_eos=True))
    before = drive(engine, steps=2)
    max_len = hf.config.max_position_embeddings
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("bad", [], SamplingParams())
    with pytest.raises(ValueError, match=f"maximum length is {max_len}"):
        engine.add_request("bad", [1] * (max_len + 10), SamplingParams())
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request("0", [1, 2], SamplingParams())
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 128\)"):
        engine.add_request("bad", [1, 500], SamplingParams())
    for bad, name in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
                      (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
                      (dict(top_p=1.5), "top_p")]:
        with pytest.raises(ValueError, match=f"{name} must be"):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="unknown sampling parameter.*max_tokens.*max_new_tokens"):
        SamplingParams.from_kwargs(max_tokens=5)
    got = summary(before + drive(engine))
    assert got == {str(i): (hf_greedy(hf, p, 8), "length") for i, p in enumerate(prompts)}
    assert engine.stats()["blocks_in_use"] == 0


def test_stop_token_max_new_tokens_and_the_models_maximum_length(llama):
    path, hf = llama
    prompt, = random_prompts(1, 10, 10, seed=3)
    reference = hf_greedy(hf, prompt, 12)
    stop = reference[5]
    max_len = hf.config.max_position_embeddings
    long_prompt, = random_prompts(1, max_len - 6, max_len - 6, seed=4)
    engine = make_engine(path)
    engine.add_request("stop", prompt, SamplingParams(max_new_tokens=12, stop_token_ids=[stop], ignore_eos=True))
    engine.add_request("length", prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
    engine.add_request("max-len", long_prompt, SamplingParams(max_new_tokens=50, ignore_eos=True))
    got = summary(drive(engine))
    assert got["stop"] == (reference[:reference.index(stop) + 1], "stop")
    assert got["length"] == (reference, "length")
    assert got["max-len"] == (hf_greedy(hf, long_prompt, 6), "length")
    assert engine.stats()["blocks_in_use"] == 0


def test_defaults_follow_the_device_and_the_budget(llama):
    """max_num_seqs follows token_budget unless given, so a small budget alone is a valid setting."""
    assert EngineConfig().for_device(gpu=False).token_budget == CPU_TOKEN_BUDGET
    assert EngineConfig().for_device(gpu=False, bf16_gemm=True).token_budget == BF16_CPU_TOKEN_BUDGET
    amx = EngineConfig().for_device(gpu=False, bf16_gemm=True, amx=True)
    assert (amx.token_budget, amx.batch_token_budget) == (BF16_CPU_TOKEN_BUDGET, AMX_BATCH_TOKEN_BUDGET)
    assert EngineConfig().for_device(gpu=False, bf16_gemm=True).batch_token_budget == BF16_CPU_TOKEN_BUDGET
    # A budget given is kept for every step unless a batch budget is given too.
    assert EngineConfig(token_budget=64).for_device(gpu=False, amx=True).batch_token_budget == 64
    assert EngineConfig(token_budget=64, batch_token_budget=256).for_device(gpu=False).batch_token_budget == 256
    assert EngineConfig(buckets=[1, 1024]).for_device(gpu=False, amx=True).batch_token_budget == 1024
    with pytest.raises(ValueError, match="batch_token_budget"):
        EngineConfig(token_budget=64, batch_token_budget=32)
    assert EngineConfig(token_budget=64).for_device(gpu=False, bf16_gemm=True).token_budget == 64
    assert EngineConfig().for_device(gpu=True).token_budget == GPU_TOKEN_BUDGET
    assert EngineConfig(token_budget=32).for_device(gpu=False).max_num_seqs == 32
    assert EngineConfig(token_budget=4096).for_device(gpu=True).max_num_seqs == MAX_NUM_SEQS
    assert EngineConfig(max_num_seqs=8).for_device(gpu=False).max_num_seqs == 8
    engine = make_engine(llama[0], token_budget=32, max_num_seqs=None)
    assert (engine.config.token_budget, engine.config.max_num_seqs) == (32, 32)
