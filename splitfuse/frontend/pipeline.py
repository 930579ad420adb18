"""`splitfuse.pipeline(...)`: non-persistent generation driven from the calling process.

The model runs in one worker subprocess, started through the same frontend core and worker code
as `splitfuse serve`; this process polls the core until its requests are done (it never imports
torch)."""
import threading
from collections.abc import Iterator
from functools import partial

from splitfuse import protocol
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.frontend.core import Core
from splitfuse.frontend.response import Response
from splitfuse.protocol import Delta

POLL = 0.1  # seconds; the core checks that the worker is alive between waits

Prompt = str | list[int]


class Pipeline:
    """Holds one worker process; `pipe(prompts, **sampling)` returns responses in input order. Threads may share
    one: their calls take turns at the core (its ZeroMQ sockets serve one thread at a time), each waiting while
    another's run; several callers at once are what `splitfuse.serve()` and its clients are for. `close()` from
    another thread ends the calls running or waiting there with ValueError."""

    def __init__(self, model: str | None = None, **engine_options):
        self._lock = threading.RLock()
        self._closing = threading.Event()  # a call polling the core stops at its next turn
        self._core: Core | None = Core(EngineConfig.from_kwargs(model=model, **engine_options), request_timeout=None)
        try:
            self._core.start()
        except BaseException:
            self.close()
            raise
        self.tokenizer = self._core.tokenizer
        self.max_model_len = self._core.max_model_len

    def __call__(self, prompts: Prompt | list[Prompt], **sampling) -> list[Response]:
        params = SamplingParams.from_kwargs(**sampling)
        return self._run([protocol.prompt_fields(p) for p in _as_list(prompts)], params)

    def chat(self, messages: list[dict] | list[list[dict]], **sampling) -> list[Response]:
        """One conversation (a list of {'role', 'content'}) or a list of them."""
        params = SamplingParams.from_kwargs(**sampling)
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        return self._run([{"messages": c} for c in conversations], params)

    def stream(self, prompt: Prompt, **sampling) -> Iterator[Delta]:
        """Deltas of one prompt as they are generated."""
        params = SamplingParams.from_kwargs(**sampling)
        deltas: list[Delta | Exception] = []
        with self._lock:
            key = self._core_or_closed().submit(deltas.append, params, **protocol.prompt_fields(prompt))
        try:
            while True:
                while not deltas:
                    with self._lock:
                        self._core_or_closed().poll(POLL)
                    self._raise_if_closing()
                delta = deltas.pop(0)
                if isinstance(delta, Exception):
                    raise delta
                if delta.text or delta.finish_reason:
                    yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            with self._lock:
                if self._core is not None:
                    self._core.abort(key)  # leaving early frees its blocks; nothing once it has finished

    def stats(self) -> dict:
        """The worker engine's latest counters (running, waiting, blocks_in_use, ...)."""
        with self._lock:
            return self._core_or_closed().stats()["replicas"][0]["engine"]

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            if self._core is not None:
                self._core.close()
                self._core = None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _core_or_closed(self) -> Core:
        if self._core is None:
            raise ValueError("this pipeline is closed")
        return self._core

    def _raise_if_closing(self) -> None:
        if self._closing.is_set():
            raise ValueError("this pipeline was closed while the call ran")

    def _run(self, prompts: list[dict], params: SamplingParams) -> list[Response]:
        with self._lock:
            core = self._core_or_closed()
            results: dict[int, Delta | Exception] = {}
            keys = [core.submit(partial(results.__setitem__, i), params, stream=False, **fields)
                    for i, fields in enumerate(prompts)]
            try:
                while len(results) < len(keys) and not any(isinstance(r, Exception) for r in results.values()):
                    self._raise_if_closing()
                    core.poll(POLL)
            finally:
                for key in keys:  # a refused prompt (or Ctrl-C) leaves nothing of this call running
                    core.abort(key)
        for result in results.values():
            if isinstance(result, Exception):
                raise result
        return [Response.of(results[i]) for i in range(len(keys))]


def pipeline(model: str | None = None, **engine_options) -> Pipeline:
    """Load `model` (a local Hugging Face directory; None: the bundled SmolLM2-135M-Instruct)."""
    return Pipeline(model, **engine_options)


def _as_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of either")
    return prompts
