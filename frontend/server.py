"""The frontend server: clients' ROUTER socket, text <-> token ids, streaming, routing to workers.

One loop: poll the client socket and the router's worker socket, handle what came, and every
100 ms look for dead workers and expired requests. Prompts are tokenized by a small thread pool
(the tokenizers library releases the GIL), so one client's long prompt never pauses the loop and
the others' streams; a finished tokenization wakes the loop through a pipe. Clients send one-frame
msgpack messages (protocol.py, docs/protocol.md). A client that cannot be sent to any more
(disconnected, or not reading) has its requests aborted. Never imports torch."""
import argparse
import itertools
import json
import os
import queue
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import zmq

from splitfuse import protocol
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.frontend.response import ResponseBuilder
from splitfuse.frontend.router import Router
from splitfuse.frontend.tokenizer import Tokenizer

TICK = 0.1               # seconds between checks for dead workers and expired requests
MAX_BATCH = 1000         # client messages handled per loop turn, so worker outputs keep flowing
CLIENT_SNDHWM = 100_000  # messages queued for one client before it counts as not reading
TOKENIZER_THREADS = 2    # a long prompt being tokenized leaves a thread for the short ones


@dataclass(slots=True)
class ClientRequest:
    client: bytes            # the client's socket identity
    id: str                  # the client's request id, unique per client while in flight
    key: str                 # the id on the worker link, unique across clients
    builder: ResponseBuilder | None  # None while its prompt is being tokenized
    stream: bool
    deadline: float
    prefix: str = ""         # return_full_text: the prompt, sent ahead of the first streamed text


class Server:
    def __init__(self, config: EngineConfig, replicas: int = 1, address: str = "tcp://127.0.0.1:*", *,
                 request_timeout: float = 600.0, heartbeat_timeout: float = 30.0, startup_timeout: float = 900.0):
        self.router = Router(config, replicas, heartbeat_timeout=heartbeat_timeout, startup_timeout=startup_timeout)
        self.bind_address = address
        self.request_timeout = request_timeout
        self.requests: dict[str, ClientRequest] = {}        # by key
        self.keys: dict[tuple[bytes, str], str] = {}         # (client, request id) -> key
        self.tokenizer: Tokenizer | None = None
        self.socket: zmq.Socket | None = None
        self.address: str | None = None
        self._keys = itertools.count()
        self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        self._encoded: queue.SimpleQueue[tuple[str, SamplingParams, Future]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()  # written by a pool thread when a prompt is tokenized
        os.set_blocking(self._wake_write, False)

    def start(self) -> str:
        """Start the replicas, wait until they are ready, then bind the client socket; returns its address."""
        self.router.start()
        self.tokenizer = Tokenizer(self.router.info.model_dir, self.router.info.max_model_len)
        self.socket = self.router.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone client raises: abort its requests
        self.socket.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.bind(self.bind_address)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.address

    def run(self, watch_parent: bool = False) -> None:
        """Serve until interrupted (or, with watch_parent, until the process that started us is gone)."""
        parent = os.getppid()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.router.socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        next_tick = 0.0
        while True:
            ready = dict(poller.poll(TICK * 1000))
            if self.router.socket in ready:
                self._on_worker_messages(self.router.receive())
            if self._wake_read in ready:
                self._on_encoded()
            if self.socket in ready:
                self._receive_clients()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self._on_worker_messages(self.router.check())
                self._expire(now)
                if watch_parent and os.getppid() != parent:
                    return

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)  # waits for a tokenization under way: it writes to the pipe
        for req in list(self.requests.values()):
            self._finish(req, "error", "the server is shutting down")
        self.router.close()
        if self.socket is not None:
            self.socket.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    # --- from clients ---------------------------------------------------------------------

    def _receive_clients(self) -> None:
        for _ in range(MAX_BATCH):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_client(frames[0], frames[1:])

    def _on_client(self, client: bytes, frames: list[bytes]) -> None:
        if len(frames) != 1:
            return self._send(client, protocol.Error(None, f"a message must be exactly one frame holding a "
                                                           f"msgpack map, got {len(frames)} frames"))
        try:
            msg = protocol.decode(frames[0], protocol.CLIENT_REQUESTS)
        except protocol.ProtocolError as e:
            return self._send(client, protocol.Error(e.request_id, str(e)))
        if isinstance(msg, protocol.Generate):
            self._generate(client, msg)
        elif isinstance(msg, protocol.Abort):
            req = self.requests.get(self.keys.get((client, msg.id)))
            if req is not None:  # else it has just finished: nothing to do
                self.router.abort(req.key)
                self._finish(req, "abort")
        elif isinstance(msg, protocol.Health):
            replicas = [{k: s[k] for k in ("replica", "ready", "restarts")} for s in self.router.stats()]
            self._send(client, protocol.Health(msg.id, ok=any(s["ready"] for s in replicas), replicas=replicas))
        else:
            stats = {"in_flight": len(self.requests), "waiting": len(self.router.waiting),
                     "replicas": self.router.stats()}
            self._send(client, protocol.Stats(msg.id, stats=stats))

    def _generate(self, client: bytes, msg: protocol.Generate) -> None:
        if (client, msg.id) in self.keys:
            return self._send(client, protocol.Error(msg.id, f"request id {msg.id!r} is already in flight"))
        try:
            params = SamplingParams.from_kwargs(**msg.params)
        except ValueError as e:
            return self._send(client, protocol.Error(msg.id, str(e)))
        key = str(next(self._keys))
        self.requests[key] = ClientRequest(client, msg.id, key, None, msg.stream,
                                           time.monotonic() + (msg.timeout or self.request_timeout))
        self.keys[(client, msg.id)] = key
        future = self._pool.submit(self.tokenizer.encode_prompt, params, prompt=msg.prompt, messages=msg.messages,
                                   prompt_ids=msg.prompt_ids)
        future.add_done_callback(lambda f: self._wake(key, params, f))

    def _wake(self, key: str, params: SamplingParams, future: Future) -> None:
        """In a pool thread: hand the result to the loop, and wake it unless a wake-up is already pending."""
        self._encoded.put((key, params, future))
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass

    def _on_encoded(self) -> None:
        """Tokenized prompts go to a worker, refused ones get an error reply."""
        os.read(self._wake_read, 1 << 16)
        while not self._encoded.empty():
            key, params, future = self._encoded.get()
            req = self.requests.get(key)
            if req is None or future.cancelled():  # ended while it was tokenized (abort, timeout, client gone)
                continue
            try:
                prompt_text, prompt_ids = future.result()
            except Exception as e:  # whatever a client's input breaks ends that request only, never the server
                self._forget(req)
                self._send(req.client, protocol.Error(req.id, str(e) or type(e).__name__))
                continue
            req.builder = ResponseBuilder(self.tokenizer, prompt_ids, params, prompt_text)
            req.prefix = prompt_text if params.return_full_text else ""
            self.router.submit(key, prompt_ids, params)

    # --- from workers -----------------------------------------------------------------------

    def _on_worker_messages(self, messages: list[protocol.Delta | protocol.Error]) -> None:
        for msg in messages:
            req = self.requests.get(msg.id)
            if req is None:  # ended meanwhile (aborted, timed out, client gone)
                continue
            if isinstance(msg, protocol.Error):  # the worker refused it (e.g. a prompt too long)
                self._forget(req)
                self._send(req.client, protocol.Error(req.id, msg.error))
            else:
                self._deliver(req, msg.token_ids, msg.finish_reason, msg.error, msg.logprobs, msg.top_logprobs)

    def _deliver(self, req: ClientRequest, token_ids: list[int], finish_reason: str | None, error: str | None = None,
                 logprobs: list | None = None, top_logprobs: list | None = None) -> None:
        delta = req.builder.add(token_ids, finish_reason, logprobs, top_logprobs, error)
        done = delta.finish_reason is not None
        if done and finish_reason is None:
            self.router.abort(req.key)  # a stop string ended it: free its KV blocks now
        if req.stream:
            text, req.prefix = req.prefix + delta.text, ""
            msg = protocol.Delta(req.id, delta.token_ids, text, delta.finish_reason, delta.error, logprobs,
                                 top_logprobs, len(req.builder.prompt_ids) if done else None)
        elif done:
            r = req.builder.response()
            msg = protocol.Delta(req.id, r.token_ids, r.generated_text, r.finish_reason, r.error, r.logprobs,
                                 r.top_logprobs, r.prompt_length)
        else:
            return
        if done:
            self._forget(req)
        self._send(req.client, msg)

    def _finish(self, req: ClientRequest, finish_reason: str, error: str | None = None) -> None:
        """End a request from this side (abort, timeout, shutdown); the router has already let it go."""
        if req.builder is None:  # still being tokenized: nothing was generated
            self._forget(req)
            return self._send(req.client, protocol.Delta(req.id, finish_reason=finish_reason, error=error))
        self._deliver(req, [], finish_reason, error)

    def _expire(self, now: float) -> None:
        for req in [r for r in self.requests.values() if now > r.deadline]:
            self.router.abort(req.key)
            self._finish(req, "error", "the request timed out")

    def _forget(self, req: ClientRequest) -> None:
        del self.requests[req.key], self.keys[(req.client, req.id)]

    def _send(self, client: bytes, msg: protocol.Message) -> None:
        try:
            self.socket.send_multipart([client, protocol.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:  # gone (EHOSTUNREACH) or not reading (EAGAIN): nobody to stream to
            for key in [k for (c, _), k in self.keys.items() if c == client]:
                self.router.abort(key)
                self._forget(self.requests[key])


def run(config: EngineConfig, replicas: int = 1, address: str = "tcp://127.0.0.1:*", *,
        announce: Callable[[str], None], watch_parent: bool = False, **server_options) -> None:
    """Start a server, call `announce(address)` once it serves, serve until SIGTERM/SIGINT, shut down."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    server = Server(config, replicas, address, **server_options)
    try:
        announce(server.start())
        server.run(watch_parent)
    finally:
        server.close()


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(0)  # unwinds into run()'s finally: in-flight requests get an error, workers stop


def main(argv: list[str] | None = None) -> None:
    """The process `splitfuse.serve()` starts; prints `ready <address>` on stdout once it serves."""
    parser = argparse.ArgumentParser(description="splitfuse frontend server (use `splitfuse serve` instead)")
    parser.add_argument("--address", default="tcp://127.0.0.1:*")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--config", default="{}", help="EngineConfig fields as JSON")
    parser.add_argument("--options", default="{}", help="Server keyword options as JSON")
    parser.add_argument("--watch-parent", action="store_true", help="exit when the parent process is gone")
    args = parser.parse_args(argv)
    run(EngineConfig.from_kwargs(**json.loads(args.config)), args.replicas, args.address,
        announce=lambda address: print(f"ready {address}", flush=True), watch_parent=args.watch_parent,
        **json.loads(args.options))


if __name__ == "__main__":
    main()
