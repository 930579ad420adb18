"""What a request returns (streamed Deltas, a whole Response), and the per-request bookkeeping that
builds them from the worker's outputs (text deltas, stop strings, logprobs). Used by the frontend core.
A Delta is the wire's (protocol.py): what a client receives is what pipeline() hands its caller."""
from dataclasses import dataclass, field

from splitfuse import protocol
from splitfuse.protocol import Delta
from splitfuse.config import SamplingParams
from splitfuse.frontend.detokenizer import IncrementalDetokenizer
from splitfuse.frontend.tokenizer import Tokenizer


@dataclass(slots=True)
class Response:
    generated_text: str
    token_ids: list[int]
    prompt_length: int
    generated_length: int
    finish_reason: str | None       # "stop", "length", "abort" or "error"
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @classmethod
    def of(cls, whole: Delta) -> "Response":
        """The Response of a request that was not streamed, from its one Delta."""
        return cls(whole.text, whole.token_ids, whole.prompt_length or 0, len(whole.token_ids), whole.finish_reason,
                   whole.logprobs, whole.top_logprobs, whole.error, whole.num_cached_tokens or 0,
                   whole.prompt_logprobs)


@dataclass(slots=True)
class ResponseBuilder:
    """Accumulates a request's outputs into text deltas and, at the end, the whole response."""
    id: str  # the request's id as its submitter named it: its deltas carry it
    tokenizer: Tokenizer
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    _detok: IncrementalDetokenizer | None = None
    _prefix: str = ""   # return_full_text: the prompt, ahead of the first streamed text

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, self.params.stop,
                                             self.params.min_new_tokens)
        self._prefix = self.prompt_text if self.params.return_full_text else ""

    def add(self, out: protocol.Output) -> Delta:
        """A stop string also finishes the request (reason "stop"); the caller then aborts it upstream."""
        if self.finish_reason is not None:
            return Delta(self.id, finish_reason=self.finish_reason)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if not self._detok.stopped:
            self.token_ids.extend(out.token_ids)
            self.logprobs.extend(out.logprobs or [])
            self.top_logprobs.extend(out.top_logprobs or [])
        text, stopped = self._detok.add(out.token_ids)
        finish_reason = "stop" if stopped else out.finish_reason
        if finish_reason is None:
            return Delta(self.id, out.token_ids, self._prefixed(text), logprobs=out.logprobs,
                         top_logprobs=out.top_logprobs, prompt_logprobs=out.prompt_logprobs)
        self.finish_reason, self.error = finish_reason, out.error
        self.num_cached_tokens = out.num_cached_tokens or 0
        text += self._detok.flush()
        return Delta(self.id, out.token_ids, self._prefixed(text), finish_reason, out.error, out.logprobs,
                     out.top_logprobs, len(self.prompt_ids), self.num_cached_tokens, out.prompt_logprobs)

    def whole(self) -> Delta:
        """Once finished: the whole response as one Delta."""
        wants = self.params.logprobs is not None
        text = (self.prompt_text if self.params.return_full_text else "") + self._detok.text
        return Delta(self.id, self.token_ids, text, self.finish_reason, self.error, self.logprobs if wants else None,
                     self.top_logprobs if wants else None, len(self.prompt_ids), self.num_cached_tokens,
                     self.prompt_logprobs)

    def _prefixed(self, text: str) -> str:
        text, self._prefix = self._prefix + text, ""
        return text
