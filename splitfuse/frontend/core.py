"""The frontend core: the one owner of the tokenizer, the router and every request's response state.

`submit` starts a request and names its sink: a callable that receives the request's Deltas (the
last has a finish_reason) or, if it is refused, a single exception. `poll` waits for and handles
what happened (worker outputs, tokenized prompts, dead workers, expired requests) and calls the
sinks. `abort` ends a request early. Refusals, stop strings, timeouts and aborts are handled here,
once: the ZeroMQ server, the HTTP server and pipeline() only turn sink calls into their replies.

Refusals are exceptions a caller can map to a status: ValueError (a bad request, HTTP 400),
Overloaded (the queues are full, 429), Unavailable (no replica ready, or shutting down, 503).

Not thread-safe: one thread polls the core, and other threads hand it work with `call_soon`, which
wakes the poll. Prompts are tokenized by a small thread pool (the tokenizers library releases the
GIL), so a long prompt never holds up the others' streams. Never imports torch."""
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import zmq

from splitfuse import protocol
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.protocol import Delta
from splitfuse.frontend.metrics import Metrics
from splitfuse.frontend.response import ResponseBuilder
from splitfuse.frontend.replicas import RemoteWorkers, Supervisor
from splitfuse.frontend.router import Router
from splitfuse.frontend.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TICK = 0.1               # seconds between checks for dead workers and expired requests
TOKENIZER_THREADS = 2    # a long prompt being tokenized leaves a thread for the short ones
# A server's default queue (pipeline() has none: its caller is its only client). Larger than the most
# answers one HTTP request may ask for (HttpOptions.max_choices), so no request is refused forever.
MAX_QUEUED_REQUESTS = 1024

Sink = Callable[[Delta | Exception], None]


class Overloaded(Exception):
    """The server queues as much as it was told to: try again later (HTTP 429)."""


class Unavailable(Exception):
    """No replica is ready, or the server is shutting down (HTTP 503)."""


@dataclass(slots=True)
class Tracked:
    """A request between submit and its last delta."""
    key: str
    id: str  # as its submitter named it, on its deltas
    sink: Sink
    params: SamplingParams
    stream: bool
    deadline: float
    arrival: float
    builder: ResponseBuilder | None = None   # None while its prompt is being tokenized
    last_output: float | None = None         # when its latest tokens came; None before the first

    @property
    def whole(self) -> bool:
        """Whether its worker may send its tokens after the first in one piece: it is not streamed, and no stop
        string needs its text as it grows."""
        return not self.stream and not self.params.stop

    @property
    def queued(self) -> bool:
        """Accepted and not yet started: nothing generated so far."""
        return self.last_output is None


class Core:
    def __init__(self, config: EngineConfig, replicas: int = 1, *, request_timeout: float | None = 600.0,
                 max_queued_requests: int | None = None, max_queued_tokens: int | None = None,
                 heartbeat_timeout: float = 30.0, startup_timeout: float = 900.0,
                 remote: RemoteWorkers | None = None):
        for name, limit in (("max_queued_requests", max_queued_requests), ("max_queued_tokens", max_queued_tokens)):
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                raise ValueError(f"{name} must be a positive integer or None (no limit), got {limit!r}")
        self.supervisor = Supervisor(config, replicas, heartbeat_timeout=heartbeat_timeout,
                                     startup_timeout=startup_timeout, remote=remote)
        self.router = Router(self.supervisor)
        self.request_timeout = request_timeout
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.metrics = Metrics()
        self.tokenizer: Tokenizer | None = None
        self.requests: dict[str, Tracked] = {}
        self.accepting = True
        self._keys = itertools.count()
        self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()  # written by call_soon, from any thread
        os.set_blocking(self._wake_write, False)
        self._closing = threading.Lock()  # no call_soon writes to the pipe once close() closed it
        self._closed = False
        self._poller = zmq.Poller()
        for socket in self.supervisor.sockets:
            self._poller.register(socket, zmq.POLLIN)
        self._poller.register(self._wake_read, zmq.POLLIN)
        self._next_tick = 0.0

    def start(self) -> None:
        """Start the replicas and wait until every one is ready (without any: until a worker joins)."""
        self.supervisor.start()
        self.tokenizer = Tokenizer(self.supervisor.model_dir, self.supervisor.info.max_model_len)
        self.supervisor.vocab_size = self.tokenizer.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.supervisor.info.max_model_len

    @property
    def model_dir(self) -> str:
        """The frontend's copy of the served model (its tokenizer's files)."""
        return self.supervisor.model_dir

    @property
    def worker_address(self) -> str | None:
        """Where workers on other machines join; None when they cannot."""
        return self.supervisor.remote_address

    def submit(self, sink: Sink, params: SamplingParams, *, prompt: str | None = None, messages: list | None = None,
               prompt_ids: list[int] | None = None, tools: list[dict] | None = None, stream: bool = True,
               timeout: float | None = None, id: str | None = None) -> str:
        """Start a request from exactly one of prompt, messages (with the tools the chat template is given)
        or prompt_ids; returns its key. Its deltas carry `id` (by default the key). Raises Unavailable or Overloaded at once; a prompt that cannot be
        taken reaches the sink as ValueError."""
        self._admit()
        key = str(next(self._keys))
        now = time.monotonic()
        timeout = timeout or self.request_timeout
        self.requests[key] = Tracked(key, key if id is None else id, sink, params, stream,
                                     now + timeout if timeout else math.inf, now)
        future = self._pool.submit(self.tokenizer.encode_prompt, params, prompt=prompt, messages=messages,
                                   prompt_ids=prompt_ids, tools=tools)
        future.add_done_callback(lambda f: self.call_soon(lambda: self._on_encoded(key, f)))
        return key

    def abort(self, key: str, finish_reason: str = "abort", error: str | None = None) -> None:
        """End a request from this side: its worker frees its KV blocks, its sink gets the last delta.
        Nothing happens if it has already ended."""
        req = self.requests.get(key)
        if req is None:
            return
        self.router.abort(key)
        if req.builder is None:  # still being tokenized: nothing was generated
            del self.requests[key]
            req.sink(Delta(req.id, finish_reason=finish_reason, error=error))
        else:
            self._deliver(req, protocol.Output(key, [], finish_reason, error))

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for something to happen, and handle what did."""
        ready = dict(self._poller.poll(timeout * 1000))
        if any(socket in ready for socket in self.supervisor.sockets):
            self._on_outputs(self.router.handle(self.supervisor.receive()))
        if self._wake_read in ready:
            os.read(self._wake_read, 1 << 16)
            self._run_calls()
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + TICK
            self._on_outputs(self.router.handle(self.supervisor.check()))
            for req in [r for r in self.requests.values() if now > r.deadline]:
                self.abort(req.key, "error", "the request timed out")
            tokenizing = sum(r.builder is None for r in self.requests.values())
            self.metrics.update_engines(self.supervisor.stats(), tokenizing + len(self.router.waiting))

    def register(self, socket: zmq.Socket) -> None:
        """Make `poll` return as soon as `socket` is readable (an adapter's own socket)."""
        self._poller.register(socket, zmq.POLLIN)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """From any thread: run fn on the polling thread, at its next poll (never, once closed)."""
        with self._closing:
            if self._closed:
                return
            self._calls.put(fn)
            try:
                os.write(self._wake_write, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already

    def health(self) -> dict:
        replicas = [{k: s[k] for k in ("replica", "ready", "restarts")} for s in self.supervisor.stats()]
        return {"ok": self.accepting and any(r["ready"] for r in replicas), "replicas": replicas}

    def stats(self) -> dict:
        return {"in_flight": len(self.requests), "queued": sum(r.queued for r in self.requests.values()),
                "waiting": len(self.router.waiting), "replicas": self.supervisor.stats()}

    def close(self) -> None:
        """End every request with an error, stop the workers."""
        self.accepting = False
        self._pool.shutdown(cancel_futures=True)  # waits for a tokenization under way: it writes to the pipe
        for key in list(self.requests):
            self.abort(key, "error", "the server is shutting down")
        self.supervisor.close()
        with self._closing:
            self._closed = True
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _admit(self) -> None:
        if not self.accepting:
            raise Unavailable("the server is shutting down")
        if not any(r.ready for r in self.supervisor.replicas):
            raise Unavailable("no replica is ready (one is being restarted, or no worker has joined); "
                              "try again shortly")
        queued = sum(r.queued for r in self.requests.values())
        if self.max_queued_requests is not None and queued >= self.max_queued_requests:
            raise Overloaded(f"{queued} requests are waiting for their first token, as many as this server queues "
                             f"(max_queued_requests); try again later")

    def _check_queued_tokens(self, prompt_length: int) -> None:
        if self.max_queued_tokens is None:
            return
        queued = sum(len(r.builder.prompt_ids) for r in self.requests.values() if r.queued and r.builder)
        if queued + prompt_length > self.max_queued_tokens:
            raise Overloaded(f"{queued} prompt tokens are waiting for their first token; with this prompt's "
                             f"{prompt_length} that is more than this server queues (max_queued_tokens "
                             f"{self.max_queued_tokens}); try again later")

    def _on_encoded(self, key: str, future: Future) -> None:
        """A tokenized prompt goes to a worker; a refused one ends its request."""
        req = self.requests.get(key)
        if req is None or future.cancelled():  # ended while it was tokenized (abort, timeout, shutdown)
            return
        try:
            prompt_text, prompt_ids = future.result()
            self._check_queued_tokens(len(prompt_ids))
        except (ValueError, Overloaded) as e:
            del self.requests[key]
            _log_request(logging.INFO, key, "refused: %s", e)
            return req.sink(e)
        except Exception as e:  # whatever a client's input breaks (a chat template, say) ends that request only
            del self.requests[key]
            _log_request(logging.INFO, key, "refused: %s", e)
            return req.sink(ValueError(str(e) or type(e).__name__))
        req.builder = ResponseBuilder(req.id, self.tokenizer, prompt_ids, req.params, prompt_text)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        try:
            self.router.submit(key, prompt_ids, req.params, stream=not req.whole)
        except Exception as e:  # it could not be sent (encoded, routed): that request's error, never a hang
            self.router.abort(key)
            del self.requests[key]
            _log_request(logging.WARNING, key, "could not be sent to a worker: %s", e)
            req.sink(ValueError(f"the request could not be sent to a worker: {e}"))
            return
        _log_request(logging.DEBUG, key, "sent to a worker: %d prompt tokens, at most %d new", len(prompt_ids),
                     req.params.max_new_tokens)

    def _on_outputs(self, outputs: list[protocol.Output | protocol.Error]) -> None:
        for out in outputs:
            req = self.requests.get(out.id)
            if req is None:  # ended meanwhile (aborted, timed out)
                continue
            if isinstance(out, protocol.Error):  # the worker refused it
                del self.requests[out.id]
                _log_request(logging.INFO, out.id, "refused by its worker: %s", out.error)
                req.sink(ValueError(out.error))
                continue
            try:
                self._deliver(req, out)
            except Exception as e:  # whatever one output breaks ends that request, never the loop serving all
                _log_request(logging.ERROR, out.id, "its output could not be handled", exc_info=True)
                if self.requests.pop(out.id, None) is not None:
                    self.router.abort(out.id)
                    req.sink(Delta(req.id, finish_reason="error",
                                   error=f"the server could not handle this request's output: {e}"))

    def _deliver(self, req: Tracked, out: protocol.Output) -> None:
        self._observe(req, out)
        delta = req.builder.add(out)
        done = delta.finish_reason is not None
        if done:
            if out.finish_reason is None:  # a stop string ended it: free its KV blocks now
                self.router.abort(req.key)
            del self.requests[req.key]
            self.metrics.requests.labels(delta.finish_reason).inc()
            _log_request(logging.DEBUG, req.key, "finished (%s) after %.2fs%s", delta.finish_reason,
                         time.monotonic() - req.arrival, f": {delta.error}" if delta.error else "")
        if req.stream:
            req.sink(delta)
        elif done:
            req.sink(req.builder.whole())

    def _observe(self, req: Tracked, out: protocol.Output) -> None:
        if not out.token_ids:
            return
        now = time.monotonic()
        if req.last_output is None:
            self.metrics.time_to_first_token.observe(now - req.arrival)
        elif not req.whole:  # the tokens of a whole one come together: their times are not known here
            self.metrics.inter_token_latency.observe(now - req.last_output)
        req.last_output = now
        self.metrics.generation_tokens.inc(len(out.token_ids))

    def _run_calls(self) -> None:
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception:  # one adapter's bug must not stop the loop that serves everyone
                log.exception("a call on the serving loop failed")


def _log_request(level: int, key: str, message: str, *args, exc_info: bool = False) -> None:
    """A line about one request: its id leads the text and rides on the record (`request_id`, for JSON logs)."""
    log.log(level, "request %s: " + message, key, *args, exc_info=exc_info, extra={"request_id": key})
