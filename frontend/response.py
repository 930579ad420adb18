"""What a finished request returns, and the per-request bookkeeping that builds it from
streamed token ids (text deltas, stop strings, logprobs). Shared by the pipeline and the server."""
from dataclasses import dataclass, field

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


@dataclass(slots=True)
class Delta:
    """One streamed piece of a response."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[float] | None = None     # of token_ids, when the request asked for logprobs
    top_logprobs: list[dict[int, float]] | None = None


@dataclass(slots=True)
class ResponseBuilder:
    """Accumulates a request's streamed token ids into deltas and, at the end, a Response."""
    tokenizer: Tokenizer
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    _detok: IncrementalDetokenizer | None = None

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, self.params.stop)

    def add(self, new_token_ids: list[int], finish_reason: str | None = None, logprobs: list[float] | None = None,
            top_logprobs: list[dict] | None = None, error: str | None = None) -> Delta:
        """A stop string also finishes the request (reason "stop"); the caller then aborts it upstream."""
        if self.finish_reason is not None:
            return Delta("", [], self.finish_reason)
        if not self._detok.stopped:
            self.token_ids.extend(new_token_ids)
            self.logprobs.extend(logprobs or [])
            self.top_logprobs.extend(top_logprobs or [])
        text, stopped = self._detok.add(new_token_ids)
        if stopped:
            finish_reason = "stop"
        if finish_reason is not None:
            self.finish_reason, self.error = finish_reason, error
            text += self._detok.flush()
        return Delta(text, list(new_token_ids), self.finish_reason, error, logprobs, top_logprobs)

    def response(self) -> Response:
        text = self._detok.text
        if self.params.return_full_text:
            text = self.prompt_text + text
        wants = self.params.logprobs is not None
        return Response(text, self.token_ids, len(self.prompt_ids), len(self.token_ids), self.finish_reason,
                        self.logprobs if wants else None, self.top_logprobs if wants else None, self.error)
