"""The bundled SmolLM2-135M-Instruct through our stack against transformers on the same directory (fp32)."""
import pytest
import torch
import transformers

import splitfuse
from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.compiled.loader import load_model
from splitfuse.compiled.runner import ModelRunner, SequenceChunk
from splitfuse.frontend.tokenizer import Tokenizer

NEW_TOKENS = 12
TOPICS = ["the sea", "a clock", "bread", "mountains", "a library", "the moon", "rain", "a garden"]


@pytest.fixture(scope="module")
def hf_model():
    model = transformers.AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(bundled_model_dir())


def prompt_ids(tokenizer: Tokenizer) -> list[list[int]]:
    """Eight prompts from 1 to ~1000 tokens: chat-templated questions with growing context."""
    prompts = [[1]]
    for i, topic in enumerate(TOPICS[:7]):
        context = " ".join(f"Line {k}: notes about {topic} and number {k * 7 % 13}." for k in range(int(1.45 ** (i + 6))))
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": f"{context}\nSummarise {topic}."}]))
    return prompts


def hf_greedy(hf_model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_prompt_lengths_cover_range(tokenizer):
    lengths = sorted(len(p) for p in prompt_ids(tokenizer))
    assert lengths[0] == 1 and 900 <= lengths[-1] <= 1200, lengths


def test_chat_prompt_logits_match_transformers(hf_model, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    hf_ids = transformers.AutoTokenizer.from_pretrained(bundled_model_dir()).apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=True)
    assert ids == list(hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids)
    model = load_model(bundled_model_dir(), torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, num_blocks=16, block_size=16, max_num_seqs=4, max_model_len=256, buckets=[64],
                         compile=False)
    ours = runner.execute([SequenceChunk(ids, 0, list(range(4)), True)])[0]
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=1e-4)


@pytest.fixture(scope="module")
def expected(hf_model, tokenizer):
    return [hf_greedy(hf_model, ids) for ids in prompt_ids(tokenizer)]


@pytest.mark.parametrize("scheduler", ["splitfuse", "prefill-first"])
@pytest.mark.parametrize("budget", [16, 64, 256])
def test_greedy_equals_transformers_generate(expected, tokenizer, scheduler, budget):
    with splitfuse.pipeline(dtype="float32", eager=True, token_budget=budget, max_num_seqs=min(budget, 16),
                            num_blocks=256, scheduler=scheduler) as pipe:
        responses = pipe(prompt_ids(tokenizer), max_new_tokens=NEW_TOKENS)
    for response, want in zip(responses, expected):
        assert response.token_ids == want


def test_batch_invariance_fp32(tokenizer):
    """A request's greedy tokens are the same alone and among 40 other concurrent requests."""
    target = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the ocean."}])
    g = torch.Generator().manual_seed(0)
    others = [torch.randint(3, 40000, (int(n),), generator=g).tolist()
              for n in torch.randint(1, 200, (40,), generator=g)]
    with splitfuse.pipeline(dtype="float32", eager=True, token_budget=64, max_num_seqs=48, num_blocks=1024) as pipe:
        alone = pipe(target, max_new_tokens=16, ignore_eos=True)[0].token_ids
        crowd = pipe(others[:20] + [target] + others[20:], max_new_tokens=16, ignore_eos=True)[20].token_ids
    assert crowd == alone
