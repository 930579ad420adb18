"""The streaming detokenizer's stop strings against plain string search over the whole decoded text."""
import pytest

from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.frontend.detokenizer import IncrementalDetokenizer
from splitfuse.frontend.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(bundled_model_dir())


@pytest.mark.parametrize("stop", [",", ", t", "four"])
@pytest.mark.parametrize("one_by_one", [True, False])
def test_a_stop_string_ends_the_text_only_past_the_first_min_tokens_tokens(tokenizer, stop, one_by_one):
    """As vLLM takes min_tokens: a stop string ending within the first min_tokens tokens' text is passed over."""
    ids = tokenizer.encode(" one, two, three, four, five", add_special_tokens=False)
    text = tokenizer.decode(ids)
    for min_tokens in range(len(ids) + 1):
        detok = IncrementalDetokenizer(tokenizer, [], [stop], min_tokens)
        deltas = [detok.add([t]) for t in ids] if one_by_one else [detok.add(ids)]
        streamed = "".join(d for d, _ in deltas) + detok.flush()
        free = len(tokenizer.decode(ids[:min_tokens]))  # the first min_tokens tokens' text
        cut = text.find(stop, max(0, free - len(stop) + 1))
        assert streamed == detok.text == (text if cut < 0 else text[:cut]), (min_tokens, streamed)
        assert detok.stopped == (cut >= 0)
