"""`splitfuse.pipeline(...)`: non-persistent generation from the calling process."""
import itertools
from collections.abc import Iterator

from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.frontend.response import Delta, Response, ResponseBuilder
from splitfuse.frontend.tokenizer import Tokenizer

Prompt = str | list[int]


class Pipeline:
    """Holds one engine; `pipe(prompts, **sampling)` returns responses in input order."""

    def __init__(self, model: str | None = None, **engine_options):
        from splitfuse.worker.engine import Engine  # torch is imported only when a pipeline is made
        self.engine = Engine(EngineConfig.from_kwargs(model=model, **engine_options))
        self.tokenizer = Tokenizer(self.engine.model_dir)
        self._ids = itertools.count()

    def __call__(self, prompts: Prompt | list[Prompt], **sampling) -> list[Response]:
        return self._run([self._encode(p) for p in _as_list(prompts)], SamplingParams.from_kwargs(**sampling))

    def chat(self, messages: list[dict] | list[list[dict]], **sampling) -> list[Response]:
        """One conversation (a list of {'role', 'content'}) or a list of them."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        encoded = [(self.tokenizer.render_chat(c), self.tokenizer.apply_chat_template(c)) for c in conversations]
        return self._run(encoded, SamplingParams.from_kwargs(**sampling))

    def stream(self, prompt: Prompt, **sampling) -> Iterator[Delta]:
        """Deltas of one prompt as they are generated."""
        params = SamplingParams.from_kwargs(**sampling)
        text, ids = self._encode(prompt)
        builders = self._submit([(text, ids)], params)
        (rid, builder), = builders.items()
        while builder.finish_reason is None:
            delta = self._step(builders).get(rid)
            if delta is not None and (delta.text or delta.finish_reason):
                yield delta

    def close(self) -> None:
        self.engine = None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _encode(self, prompt: Prompt) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return self.tokenizer.decode(prompt), prompt
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _run(self, encoded: list[tuple[str, list[int]]], params: SamplingParams) -> list[Response]:
        builders = self._submit(encoded, params)
        while any(b.finish_reason is None for b in builders.values()):
            self._step(builders)
        return [b.response() for b in builders.values()]

    def _submit(self, encoded: list[tuple[str, list[int]]], params: SamplingParams) -> dict[str, ResponseBuilder]:
        if self.engine is None:
            raise ValueError("this pipeline is closed")
        builders: dict[str, ResponseBuilder] = {}
        try:
            for text, ids in encoded:
                rid = f"pipe-{next(self._ids)}"
                self.engine.add_request(rid, ids, params)
                builders[rid] = ResponseBuilder(self.tokenizer, ids, params, text)
        except ValueError:
            for rid in builders:  # all or nothing: a bad prompt leaves nothing behind
                self.engine.abort(rid)
            self.engine.step()
            raise
        return builders

    def _step(self, builders: dict[str, ResponseBuilder]) -> dict[str, Delta]:
        deltas = {}
        for out in self.engine.step():
            builder = builders.get(out.request_id)
            if builder is None or builder.finish_reason is not None:
                continue
            deltas[out.request_id] = delta = builder.add(out.new_token_ids, out.finish_reason, out.logprobs,
                                                         out.top_logprobs, out.error)
            if delta.finish_reason is not None and out.finish_reason is None:
                self.engine.abort(out.request_id)  # a stop string ended it: free its blocks
        return deltas


def pipeline(model: str | None = None, **engine_options) -> Pipeline:
    """Load `model` (a local Hugging Face directory; None: the bundled SmolLM2-135M-Instruct)."""
    return Pipeline(model, **engine_options)


def _as_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of either")
    return prompts
