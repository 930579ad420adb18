"""Incremental detokenization with stop strings, for streaming."""
from splitfuse.frontend.tokenizer import Tokenizer

_CONTEXT = 5  # the prompt's last tokens the stream starts from, so word-boundary spaces come out right


class IncrementalDetokenizer:
    """Turns a request's new token ids into text deltas, through the tokenizers library's DecodeStream (one
    decode per token, in Rust).

    Never emits half a multi-byte character (byte-fallback and byte-level tokens can split one),
    and holds back any tail that could still become a stop string, so the concatenated deltas
    always equal the final, stop-trimmed text. As in vLLM, no stop string ends within the text of the first
    `min_tokens` tokens."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str], min_tokens: int = 0):
        self._step = tokenizer.decode_stream(prompt_ids[-_CONTEXT:])
        self._stop = stop
        self.text = ""       # generated text decoded so far (trimmed at a stop string)
        self._emitted = 0    # how much of self.text has been returned
        self.stopped = False
        self._min_tokens, self._tokens = min_tokens, 0
        self._free_from = 0 if min_tokens == 0 else None  # where the text after the first min_tokens tokens starts

    def add(self, new_ids: list[int]) -> tuple[str, bool]:
        """Returns (text delta, whether a stop string ended the text)."""
        if self.stopped:
            return "", True
        start = len(self.text)
        for token in new_ids:
            self.text += self._step(token) or ""
            self._tokens += 1
            if self._tokens == self._min_tokens:
                self._free_from = len(self.text)
        if len(self.text) > start and self._free_from is not None:
            self._find_stop(start)
        end = len(self.text) if self.stopped else len(self.text) - self._held_back()
        return self._emit(end), self.stopped

    def flush(self) -> str:
        """At the end of the request: whatever was held back."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        delta = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta

    def _find_stop(self, start: int) -> None:
        for s in self._stop:
            i = self.text.find(s, max(0, start - len(s) + 1, self._free_from - len(s) + 1))
            if i >= 0:
                self.text = self.text[:i]
                self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
