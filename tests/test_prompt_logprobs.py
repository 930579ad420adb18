"""Prompt log-probabilities against transformers' (fp32): computed in chunks of any budget, beside other
requests, with a warm prefix cache (whose blocks a scoring request does not take), and after preemption;
and over HTTP as `echo` with `logprobs` (what lm-evaluation-harness's local-completions reads) and vLLM's
`prompt_logprobs`."""
import json
import urllib.request

import pytest
import torch
import transformers

from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.frontend.serve import serve
from splitfuse.worker.engine import Engine

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def llama(make_checkpoint):
    path = make_checkpoint("llama")
    return path, transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def hf_prompt_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: the log-probabilities of the token after each position but the last."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def check(prompt_logprobs: list, ids: list[int], expected: torch.Tensor, top: int) -> None:
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for position, entry in enumerate(prompt_logprobs[1:], start=1):
        row = expected[position - 1]
        wanted = {ids[position]} | set(row.topk(top).indices.tolist()) if top else {ids[position]}
        assert set(entry) == wanted, position
        assert all(abs(value - row[t].item()) < TOLERANCE for t, value in entry.items()), position


@pytest.mark.parametrize("budget", [16, 64])
def test_prompt_logprobs_match_transformers_chunked_batched_and_cached(llama, budget):
    path, hf = llama
    g = torch.Generator().manual_seed(budget)
    prefix = torch.randint(0, 128, (40,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 23, 1)]
    engine = Engine(EngineConfig(model=str(path), dtype="float32", device="cpu", eager=True, num_blocks=64,
                                 block_size=16, token_budget=budget, max_num_seqs=8), progress=False)
    engine.add_request("warm", prefix + [7, 7], SamplingParams(max_new_tokens=2))  # caches the prefix's blocks
    while engine.has_unfinished():
        engine.step()
    for i, ids in enumerate(prompts):
        engine.add_request(f"p{i}", ids, SamplingParams(max_new_tokens=3, prompt_logprobs=2 * i))
        engine.add_request(f"other{i}", prefix + [i], SamplingParams(max_new_tokens=5))  # uses the cache
    scored, cached = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                scored[out.id] = out.prompt_logprobs
    for i, ids in enumerate(prompts):
        check(scored[f"p{i}"], ids, hf_prompt_logprobs(hf, ids), 2 * i)
    assert set(scored) == {f"p{i}" for i in range(len(prompts))}
    assert engine.blocks.hits > 0  # the others did take the cached prefix


def test_a_preempted_request_keeps_its_prompt_logprobs(llama):
    """With a cache too small for both, one request is preempted and computes its prompt again; its prompt
    log-probabilities are still one per position, and right."""
    path, hf = llama
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (60,), generator=g).tolist() for _ in range(2)]
    engine = Engine(EngineConfig(model=str(path), dtype="float32", device="cpu", eager=True, num_blocks=9,
                                 block_size=16, token_budget=32, max_num_seqs=4), progress=False)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, SamplingParams(max_new_tokens=40, prompt_logprobs=0, ignore_eos=True))
    scored = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                scored[out.id] = out.prompt_logprobs
    assert engine.scheduler.num_preemptions > 0
    for i, ids in enumerate(prompts):
        check(scored[str(i)], ids, hf_prompt_logprobs(hf, ids), 0)


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_echo_with_logprobs_is_what_lm_eval_reads():
    """lm-evaluation-harness's loglikelihood request (token ids, max_tokens 1, logprobs 1, echo), and vLLM's
    prompt_logprobs on chat, on the bundled model against transformers."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()
    prompts = [[504, 2365, 6354, 30, 4775, 12], [8, 8, 1200]]
    with serve(http_port=0, zmq=False, device="cpu", dtype="float32", eager=True, num_blocks=64) as server:
        answer = post(server.http_url, "/v1/completions", {"prompt": prompts, "max_tokens": 1, "logprobs": 1,
                                                             "echo": True, "temperature": 0, "seed": 1234})
        chat = post(server.http_url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 1, "prompt_logprobs": 0})
    for choice, ids in zip(sorted(answer["choices"], key=lambda c: c["index"]), prompts):
        logprobs = choice["logprobs"]
        expected = hf_prompt_logprobs(hf, ids)
        assert len(logprobs["tokens"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
        assert all(abs(got - expected[i, t].item()) < TOLERANCE
                   for i, (got, t) in enumerate(zip(logprobs["token_logprobs"][1:-1], ids[1:])))
        # lm-eval's greedy check: the top entry's logprob is the row's maximum
        assert all(abs(max(top.values()) - expected[i].max().item()) < TOLERANCE
                   for i, top in enumerate(logprobs["top_logprobs"][1:-1]))
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
