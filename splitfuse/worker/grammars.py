"""The grammar matchers of a worker's structured-output requests (llguidance), and the masks of the tokens each
may take next. A step's masks depend only on tokens taken before it, so the engine computes them while the
step's forward runs: llguidance's executor works outside the GIL, on threads of its own."""
from collections import OrderedDict

import llguidance
import llguidance.hf
import numpy as np
import torch

from splitfuse.grammar import error_message, grammar, key

COMPILED_KEPT = 64  # distinct constraints whose compiled grammars are kept (most recently used)


class Grammars:
    def __init__(self, model_dir, vocab_size: int, eos_token_ids: list[int]):
        self._model_dir, self._vocab_size, self._eos = model_dir, vocab_size, eos_token_ids or None
        self._tokenizer: llguidance.LLTokenizer | None = None  # built by the first structured request
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._executor = llguidance.LLExecutor()

    def start(self, request_id: str, structured: dict) -> None:
        """A matcher for a new request, from the compiled grammar of its constraint (compiled once)."""
        name = key(structured)
        if (compiled := self._compiled.get(name)) is None:
            compiled = llguidance.LLMatcher(self._llg_tokenizer(), grammar(structured))
            if compiled.is_error():
                raise ValueError(error_message(compiled.get_error()))
            if len(self._compiled) >= COMPILED_KEPT:
                self._compiled.popitem(last=False)
            self._compiled[name] = compiled
        self._compiled.move_to_end(name)
        self._matchers[request_id] = compiled.deep_copy()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def forbidden(self, request_ids: list[str]) -> torch.Tensor:
        """bool [len(request_ids), vocab]: the tokens each request's grammar does not take next."""
        bitmask = np.empty((len(request_ids), (self._vocab_size + 31) // 32), dtype="<i4")  # bit t: token t allowed
        self._executor.unsafe_compute_mask_ptr([(self._matchers[r], row) for row, r in enumerate(request_ids)],
                                               bitmask.ctypes.data, bitmask.shape[1] * 4, len(request_ids))
        bits = np.unpackbits(np.invert(bitmask).view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :self._vocab_size]).view(torch.bool)

    def accept(self, request_id: str, token: int) -> str | None:
        """Advance a request's matcher; its error if the token breaks the grammar, or if the grammar failed while
        its mask was computed (past one of llguidance's limits: that mask then allowed only EOS, which must not
        pass for a match)."""
        matcher = self._matchers[request_id]
        return None if not matcher.is_error() and matcher.consume_token(token) else error_message(matcher.get_error())

    def complete(self, request_id: str) -> bool:
        """The grammar is matched and has taken its end (EOS): nothing more may follow."""
        return self._matchers[request_id].is_stopped()

    def finish(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            from transformers import AutoTokenizer  # the worker's only tokenizer, for the grammars' token bytes
            self._tokenizer = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(self._model_dir),
                                                           n_vocab=self._vocab_size, eos_token=self._eos)
        return self._tokenizer
