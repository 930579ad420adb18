"""`splitfuse.pipeline(...)`: non-persistent generation driven from the calling process.

The model runs in one worker subprocess, started through the same router and worker code as
`splitfuse serve`; this process only tokenizes, detokenizes and waits (it never imports torch)."""
import itertools
from collections.abc import Iterator

from splitfuse import protocol
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.frontend.response import Delta, Response, ResponseBuilder
from splitfuse.frontend.router import Router
from splitfuse.frontend.tokenizer import Tokenizer

POLL_MS = 100  # wait for worker output at most this long before checking the worker is alive

Prompt = str | list[int]


class Pipeline:
    """Holds one worker process; `pipe(prompts, **sampling)` returns responses in input order."""

    def __init__(self, model: str | None = None, **engine_options):
        self._router: Router | None = Router(EngineConfig.from_kwargs(model=model, **engine_options))
        try:
            self._router.start()
        except BaseException:
            self._router.close()
            raise
        self.tokenizer = Tokenizer(self._router.info.model_dir, self._router.info.max_model_len)
        self.max_model_len = self._router.info.max_model_len
        self._ids = itertools.count()

    def __call__(self, prompts: Prompt | list[Prompt], **sampling) -> list[Response]:
        params = SamplingParams.from_kwargs(**sampling)
        return self._run([self._encode(p, params) for p in _as_list(prompts)], params)

    def chat(self, messages: list[dict] | list[list[dict]], **sampling) -> list[Response]:
        """One conversation (a list of {'role', 'content'}) or a list of them."""
        params = SamplingParams.from_kwargs(**sampling)
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        return self._run([self.tokenizer.encode_prompt(params, messages=c) for c in conversations], params)

    def stream(self, prompt: Prompt, **sampling) -> Iterator[Delta]:
        """Deltas of one prompt as they are generated."""
        params = SamplingParams.from_kwargs(**sampling)
        builders = self._submit([self._encode(prompt, params)], params)
        (rid, builder), = builders.items()
        while builder.finish_reason is None:
            delta = self._step(builders).get(rid)
            if delta is not None and (delta.text or delta.finish_reason):
                yield delta

    def stats(self) -> dict:
        """The worker engine's latest counters (running, waiting, blocks_in_use, ...)."""
        return self._router.stats()[0]["engine"]

    def close(self) -> None:
        if self._router is not None:
            self._router.close()
            self._router = None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _encode(self, prompt: Prompt, params: SamplingParams) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            return self.tokenizer.encode_prompt(params, prompt=prompt)
        if isinstance(prompt, list):
            return self.tokenizer.encode_prompt(params, prompt_ids=prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _run(self, encoded: list[tuple[str, list[int]]], params: SamplingParams) -> list[Response]:
        builders = self._submit(encoded, params)
        while any(b.finish_reason is None for b in builders.values()):
            self._step(builders)
        return [b.response() for b in builders.values()]

    def _submit(self, encoded: list[tuple[str, list[int]]], params: SamplingParams) -> dict[str, ResponseBuilder]:
        if self._router is None:
            raise ValueError("this pipeline is closed")
        builders: dict[str, ResponseBuilder] = {}
        for text, ids in encoded:
            rid = f"pipe-{next(self._ids)}"
            self._router.submit(rid, ids, params)
            builders[rid] = ResponseBuilder(self.tokenizer, ids, params, text)
        return builders

    def _step(self, builders: dict[str, ResponseBuilder]) -> dict[str, Delta]:
        """Wait for the worker's next outputs and feed them to their requests."""
        if self._router.socket.poll(POLL_MS):
            events = self._router.receive()
        else:
            events = self._router.check()  # a dead worker's requests come back as errors
        deltas = {}
        for msg in events:
            if isinstance(msg, protocol.Error):  # the worker refused a request: nothing of this call survives
                self._abort_all(builders)
                raise ValueError(msg.error)
            builder = builders.get(msg.id)
            if builder is None or builder.finish_reason is not None:
                continue
            deltas[msg.id] = delta = builder.add(msg.token_ids, msg.finish_reason, msg.logprobs,
                                                 msg.top_logprobs, msg.error)
            if delta.finish_reason is not None and msg.finish_reason is None:
                self._router.abort(msg.id)  # a stop string ended it: free its blocks
        return deltas

    def _abort_all(self, builders: dict[str, ResponseBuilder]) -> None:
        for rid, builder in builders.items():
            if builder.finish_reason is None:
                self._router.abort(rid)
                builder.finish_reason = "abort"


def pipeline(model: str | None = None, **engine_options) -> Pipeline:
    """Load `model` (a local Hugging Face directory; None: the bundled SmolLM2-135M-Instruct)."""
    return Pipeline(model, **engine_options)


def _as_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of either")
    return prompts
