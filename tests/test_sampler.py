"""Sampler on synthetic fp32 logits: support restriction, seeding, penalties, stop blocking, logprobs."""
import math
from collections import Counter

import pytest
import torch

from splitfuse.config import MIN_TEMPERATURE, SamplingParams
from splitfuse.worker.request import Request
from splitfuse.worker.sampler import Sampler

EOS = 3
PROBS = [0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02]   # token i has probability PROBS[i] at temperature 1
LOGITS = torch.tensor(PROBS).log()


def req(prompt=(0,), generated=(), **params) -> Request:
    return Request("r", [*prompt, *generated], len(prompt), SamplingParams(**params))


def tokens(outputs: list) -> list[int]:
    """The token each Output of one sampler call carries."""
    return [out.token_ids[0] for out in outputs]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(logits: torch.Tensor, request: Request, n: int = 2000, seed: int = 0) -> Counter:
    sampler, g = Sampler([]), generator(seed)
    return Counter(sampler(logits[None], [request], [g])[0].token_ids[0] for _ in range(n))


def assert_distribution(counts: Counter, expected: dict[int, float], n: int = 2000) -> None:
    assert set(counts) <= set(expected), f"tokens outside the support: {set(counts) - set(expected)}"
    for token, p in expected.items():
        assert abs(counts[token] / n - p) < 0.05, (token, counts[token] / n, p)


def renormalised(tokens: list[int]) -> dict[int, float]:
    total = sum(PROBS[t] for t in tokens)
    return {t: PROBS[t] / total for t in tokens}


def test_greedy_is_argmax_also_next_to_sampled_rows():
    logits = torch.randn(4, 50, generator=generator(1))
    requests = [req(), req(do_sample=True, seed=1), req(), req(do_sample=True, temperature=0.0)]
    result = Sampler([])(logits, requests, [None, generator(1), None, None])
    expected = logits.argmax(dim=-1).tolist()
    assert [tokens(result)[i] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]


def test_plain_sampling_follows_the_softmax():
    assert_distribution(draw(LOGITS, req(do_sample=True)), renormalised(list(range(8))))


def test_temperature_scales_the_logits():
    tempered = torch.softmax(LOGITS / 0.5, dim=-1).tolist()
    assert_distribution(draw(LOGITS, req(do_sample=True, temperature=0.5)), dict(enumerate(tempered)))


def test_the_smallest_temperature_gives_argmax():
    counts = draw(LOGITS, req(do_sample=True, temperature=MIN_TEMPERATURE), n=200)
    assert counts == Counter({0: 200})


@pytest.mark.parametrize("params,support", [
    (dict(top_k=3), [0, 1, 2]),
    (dict(top_p=0.5), [0, 1]),              # 0.30 + 0.25 is the smallest prefix reaching 0.5
    (dict(top_p=0.56), [0, 1, 2]),
    (dict(min_p=0.3), [0, 1, 2, 3]),        # keep p >= 0.3 * 0.30 = 0.09
    (dict(top_k=3, top_p=0.5, min_p=0.1), [0, 1]),   # together: the strictest one wins
])
def test_filters_restrict_the_support_and_renormalise(params, support):
    assert_distribution(draw(LOGITS, req(do_sample=True, **params)), renormalised(support))


def run_seeded(rows: list[tuple[torch.Tensor, int]], steps: int = 20) -> list[list[int]]:
    """Draw `steps` tokens for each (logits, seed) row, all rows in one batch each step."""
    sampler = Sampler([])
    requests = [req(do_sample=True, top_p=0.9) for _ in rows]
    gens = [generator(seed) for _, seed in rows]
    logits = torch.stack([lg for lg, _ in rows])
    return [list(col) for col in zip(*(tokens(sampler(logits, requests, gens)) for _ in range(steps)))]


def test_seeded_sampling_reproduces_and_ignores_the_rest_of_the_batch():
    mine, other_a, other_b = (torch.randn(64, generator=generator(s)) for s in (10, 11, 12))
    alone = run_seeded([(mine, 7)])[0]
    assert run_seeded([(mine, 7)])[0] == alone
    assert run_seeded([(other_a, 1), (mine, 7), (other_b, 2)])[1] == alone
    assert run_seeded([(other_b, 7), (other_a, 3), (mine, 7)])[2] == alone
    assert run_seeded([(mine, 8)])[0] != alone


def greedy_pick(logits: list[float], **kw) -> int:
    return Sampler([])(torch.tensor([logits]), [req(**kw)], [None])[0].token_ids[0]


@pytest.mark.parametrize("logits,kw,expected", [
    # repetition: a seen positive logit is divided (2.0 / 1.5 = 1.33 > 1.1; 2.0 / 2 = 1.0 < 1.1), prompt included
    ([2.0, 1.1, 0.5], dict(prompt=[0], repetition_penalty=1.5), 0),
    ([2.0, 1.1, 0.5], dict(prompt=[0], repetition_penalty=2.0), 1),
    ([2.0, 1.1, 0.5], dict(prompt=[2], generated=[0], repetition_penalty=2.0), 1),
    # ...and a seen negative one multiplied (-1.0 * 1.4 = -1.4 > -1.5; -1.0 * 2 = -2.0 < -1.5)
    ([-1.0, -1.5, -3.0], dict(prompt=[0], repetition_penalty=1.4), 0),
    ([-1.0, -1.5, -3.0], dict(prompt=[0], repetition_penalty=2.0), 1),
    # presence: once per generated token (1.0 - 0.3 = 0.7 > 0.6; 1.0 - 0.5 < 0.6); the prompt does not count
    ([1.0, 0.6, 0.5], dict(generated=[0, 0], presence_penalty=0.3), 0),
    ([1.0, 0.6, 0.5], dict(generated=[0, 0], presence_penalty=0.5), 1),
    ([1.0, 0.6, 0.5], dict(prompt=[0, 0], presence_penalty=2.0), 0),
    ([1.0, 0.6, 0.5], dict(generated=[2], presence_penalty=-1.0), 2),
    # frequency: per occurrence (1.0 - 2 * 0.15 = 0.7 > 0.6; 1.0 - 2 * 0.25 = 0.5 < 0.6)
    ([1.0, 0.6, 0.5], dict(generated=[0, 0], frequency_penalty=0.15), 0),
    ([1.0, 0.6, 0.5], dict(generated=[0, 0], frequency_penalty=0.25), 1),
])
def test_penalties_move_the_greedy_choice_exactly_at_the_hand_computed_point(logits, kw, expected):
    assert Sampler([])(torch.tensor([logits]), [req(**kw)], [None])[0].token_ids[0] == expected


def test_min_new_tokens_blocks_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 8.0]])     # EOS (3) is the argmax, then token 4
    sampler = Sampler([EOS])
    pick = lambda r, g=None: sampler(logits, [r], [g])[0].token_ids[0]  # noqa: E731
    assert pick(req(min_new_tokens=2, max_new_tokens=5)) == 4
    assert pick(req(generated=[1], min_new_tokens=2, max_new_tokens=5)) == 4
    assert pick(req(generated=[1, 1], min_new_tokens=2, max_new_tokens=5)) == EOS
    assert pick(req(min_new_tokens=1, stop_token_ids=[4])) == 2                  # stop tokens are blocked too
    assert pick(req(min_new_tokens=1, stop_token_ids=[4], ignore_eos=True)) == EOS  # EOS is no stop here
    g = generator(0)
    assert EOS not in {pick(req(min_new_tokens=1, do_sample=True), g) for _ in range(200)}


def test_logprobs_of_the_chosen_token_and_the_top_n():
    logits = torch.randn(3, 40, generator=generator(5))
    requests = [req(logprobs=0), req(logprobs=5), req()]
    result = Sampler([])(logits, requests, [None] * 3)
    expected = torch.log_softmax(logits.double(), dim=-1)
    for i, out in enumerate(result[:2]):
        assert math.isclose(out.logprobs[0], expected[i, out.token_ids[0]].item(), abs_tol=1e-5)
    assert result[0].top_logprobs == [{}] and result[2].logprobs is None and result[2].top_logprobs is None
    top5 = expected[1].argsort(descending=True)[:5].tolist()
    assert sorted(result[1].top_logprobs[0]) == sorted(top5)
    for token, lp in result[1].top_logprobs[0].items():
        assert math.isclose(lp, expected[1, token].item(), abs_tol=1e-5)


def test_no_logprobs_when_nobody_asks():
    result = Sampler([])(torch.randn(2, 10), [req(), req()], [None, None])
    assert all(o.logprobs is None and o.top_logprobs is None for o in result)


def test_every_tensor_follows_the_logits_device():
    """On the meta device any tensor built on the CPU meets the logits in an op and raises, which is
    what CUDA logits would do: penalties, early-stop blocking, filters and noise all stay on device."""
    requests = [req(do_sample=True, top_k=3, top_p=0.9, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.5,
                    frequency_penalty=0.5, min_new_tokens=2, stop_token_ids=[1], generated=[0, 2]),
                req(do_sample=True, temperature=0.7, top_k=2 ** 31 - 1, logit_bias={3: -5.0})]
    logits = torch.zeros(2, 5, device="meta")
    sampler = Sampler([4])
    sampler._apply_penalties(logits, requests)
    sampler._apply_logit_bias(logits, requests)
    sampler._block_early_stop(logits, requests, set())
    assert sampler._sample(logits, requests, [None, None]).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_with_filters_and_penalties_on_the_gpu():
    """CUDA logits with every option that builds tensors: valid tokens, and a seed repeats its draw."""
    logits = torch.randn(2, 50, device="cuda")
    requests = [req(do_sample=True, top_k=5, top_p=0.9, min_p=0.01, presence_penalty=0.5, repetition_penalty=1.1,
                    min_new_tokens=3, stop_token_ids=[7], generated=[1, 2]),
                req(do_sample=True, temperature=0.7, frequency_penalty=0.3)]

    def draw_seeded() -> list[int]:
        gens = [torch.Generator("cuda").manual_seed(s) for s in (0, 1)]
        return tokens(Sampler([0])(logits, requests, gens))

    drawn = draw_seeded()
    assert all(0 <= t < 50 for t in drawn) and drawn[0] not in (0, 7) and drawn == draw_seeded()


def test_a_grammar_mask_has_the_last_word():
    """Masked rows take only allowed tokens, whatever the bias, sampling mode or min_new_tokens; a finished
    grammar may end the text (only EOS allowed) before min_new_tokens; other rows are untouched."""
    logits = torch.randn(3, 8)
    requests = [req(logit_bias={2: 100.0}), req(do_sample=True, min_new_tokens=5), req()]
    forbidden = torch.ones(2, 8, dtype=torch.bool)
    forbidden[0, [5, 6]] = False
    forbidden[1, EOS] = False
    for seed in range(20):
        picked = tokens(Sampler([EOS])(logits, requests, [None, generator(seed), None], [0, 1], forbidden))
        assert picked[0] == 5 + int(logits[0, 6] > logits[0, 5]) and picked[1] == EOS
        assert picked[2] == logits[2].argmax()
