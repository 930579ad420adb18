"""Clients of a running server: `AsyncClient` (asyncio) and `Client` (blocking, for scripts).

One DEALER connection carries any number of concurrent requests; a reader task hands each
incoming message to the queue of its request. Leaving a request early (a cancelled task, a
`break` out of `generate`) sends an abort, so the server frees its KV blocks. While requests are
in flight and the server is silent, a watchdog task sends it `health` probes; when nothing at all
has come back for `connection_timeout` seconds, every request in flight raises ConnectionError."""
import asyncio
import itertools
import math
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, suppress
from dataclasses import dataclass

import zmq
import zmq.asyncio
import zmq.auth

from splitfuse import protocol
from splitfuse.config import SamplingParams
from splitfuse.frontend.response import Response
from splitfuse.protocol import Delta

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages [{"role": ..., "content": ...}]


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """For a server started with CURVE (--curve-secret, --curve-clients): its public key and this
    client's key pair, Z85-encoded, as zmq.auth.create_certificates writes them."""
    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_certificates(cls, server_certificate: str, client_secret_certificate: str) -> "CurveKeys":
        server_public, _ = zmq.auth.load_certificate(server_certificate)
        public, secret = zmq.auth.load_certificate(client_secret_certificate)
        if secret is None:
            raise ValueError(f"{client_secret_certificate} holds no secret key: give the client's secret certificate")
        return cls(server_public, public, secret)


class AsyncClient:
    """`async with AsyncClient(address) as client:` then `generate`, `complete`, `chat`, `health`, `stats`.

    A request the server refuses (bad parameters, a prompt too long, ...) raises ValueError. One that
    fails after it started (its worker died, it timed out) ends with finish_reason "error" and `error` set.
    A server that is down or unreachable for `connection_timeout` seconds fails the requests in flight with
    ConnectionError."""

    def __init__(self, address: str, *, connection_timeout: float = 30.0, curve: CurveKeys | None = None):
        if not 0 < connection_timeout < math.inf:
            raise ValueError(f"connection_timeout must be a positive number of seconds, got {connection_timeout!r}")
        self.address = address
        self.connection_timeout = connection_timeout
        self.curve = curve
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()
        self._heard = 0.0  # loop time of the server's last message, or of the start of a wait for one

    async def __aenter__(self) -> "AsyncClient":
        self._connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, prompt: Prompt, *, timeout: float | None = None, **sampling) -> AsyncIterator[Delta]:
        """Stream the response to a prompt as Deltas; the last one has a finish_reason."""
        async with aclosing(self._request(prompt, sampling, stream=True, timeout=timeout)) as messages:
            async for msg in messages:
                yield msg

    async def complete(self, prompt: Prompt, *, timeout: float | None = None, **sampling) -> Response:
        """The whole response to a prompt at once."""
        async with aclosing(self._request(prompt, sampling, stream=False, timeout=timeout)) as messages:
            msg = await anext(messages)  # stream=False: a single delta holding everything
        return Response.of(msg)

    async def chat(self, messages: list[dict], *, timeout: float | None = None, **sampling) -> Response:
        """The assistant's reply to a conversation (the model's chat template is applied by the server)."""
        return await self.complete(messages, timeout=timeout, **sampling)

    async def health(self) -> dict:
        reply = await self._ask(protocol.Health)
        return {"ok": reply.ok, "replicas": reply.replicas}

    async def stats(self) -> dict:
        return (await self._ask(protocol.Stats)).stats

    async def close(self) -> None:
        """Requests still waiting raise ConnectionError. Using the client again connects anew."""
        tasks = [t for t in (self._reader, self._watchdog) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_all(ConnectionError(f"the client of {self.address} was closed"))
        if self._socket is not None:
            self._socket.close(linger=0)
            self._context.term()
        self._reader = self._watchdog = self._socket = self._context = None

    async def _request(self, prompt: Prompt, sampling: dict, stream: bool,
                       timeout: float | None) -> AsyncIterator[Delta]:
        rid = str(next(self._ids))
        params = SamplingParams.from_kwargs(**sampling)
        # Bad values fail here, as ValueError, before anything is sent: the server's own checks.
        frame = protocol.encode(protocol.Generate(rid, params=params, stream=stream, timeout=timeout,
                                                  **protocol.prompt_fields(prompt)))
        protocol.decode(frame, protocol.CLIENT_REQUESTS)
        queue = self._open(rid)
        finished = False
        try:
            await self._socket.send(frame)
            while not finished:
                msg = await queue.get()
                if isinstance(msg, BaseException):
                    raise msg
                if isinstance(msg, protocol.Error):
                    finished = True
                    raise ValueError(msg.error)
                finished = msg.finish_reason is not None
                yield msg
        finally:
            del self._queues[rid]
            if not finished and self._socket is not None:
                self._socket.send(protocol.encode(protocol.Abort(rid)))  # not awaited: may run while cancelled

    async def _ask(self, kind: type) -> protocol.Health | protocol.Stats:
        rid = str(next(self._ids))
        queue = self._open(rid)
        try:
            await self._socket.send(protocol.encode(kind(rid)))
            msg = await queue.get()
        finally:
            del self._queues[rid]
        if isinstance(msg, BaseException):
            raise msg
        if isinstance(msg, protocol.Error):
            raise ValueError(msg.error)
        return msg

    def _open(self, rid: str) -> asyncio.Queue:
        self._connect()
        if self._reader.done():
            raise ConnectionError(f"the connection to {self.address} failed earlier; make a new client")
        if not self._queues:  # the server's silence counts from now
            self._heard = asyncio.get_running_loop().time()
        self._queues[rid] = queue = asyncio.Queue()
        return queue

    def _connect(self) -> None:
        if self._socket is not None:
            return
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self._socket.curve_serverkey = self.curve.server_public
            self._socket.curve_publickey = self.curve.public
            self._socket.curve_secretkey = self.curve.secret
        self._socket.connect(self.address)
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._watchdog = loop.create_task(self._watch())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                msg = protocol.decode(await self._socket.recv(), protocol.SERVER_REPLIES)
                self._heard = loop.time()
                queue = self._queues.get(msg.id)
                if queue is not None:  # else a request we already left, or a probe
                    queue.put_nowait(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the connection is unusable: fail every waiting request with the reason
            self._fail_all(ConnectionError(f"connection to {self.address} failed: {e}"))
            raise

    async def _watch(self) -> None:
        """While requests wait, probe a silent server with `health` (its reply, id nil, only counts as
        heard) and fail them all once it has said nothing for connection_timeout seconds."""
        loop = asyncio.get_running_loop()
        interval = self.connection_timeout / 4
        while True:
            await asyncio.sleep(interval)
            silent = loop.time() - self._heard
            if not self._queues or silent < interval:
                continue
            if silent < self.connection_timeout:
                with suppress(zmq.Again):  # a probe that cannot be queued now is as good as unanswered
                    await self._socket.send(protocol.encode(protocol.Health()), zmq.NOBLOCK)
            else:
                self._fail_all(ConnectionError(f"no reply from the server at {self.address} for "
                                               f"{silent:.0f}s: it is down or unreachable"))
                self._heard = loop.time()

    def _fail_all(self, error: ConnectionError) -> None:
        for queue in self._queues.values():
            queue.put_nowait(error)


class Client:
    """Blocking wrapper of AsyncClient: its event loop runs in a background thread."""

    def __init__(self, address: str, *, connection_timeout: float = 30.0, curve: CurveKeys | None = None):
        self._client = AsyncClient(address, connection_timeout=connection_timeout, curve=curve)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="splitfuse-client", daemon=True)
        self._thread.start()

    def generate(self, prompt: Prompt, *, timeout: float | None = None, **sampling) -> Iterator[Delta]:
        self._check_open()
        stream = self._client.generate(prompt, timeout=timeout, **sampling)
        try:
            while True:
                try:
                    yield self._call(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(stream.aclose())  # leaving early aborts the request

    def complete(self, prompt: Prompt, *, timeout: float | None = None, **sampling) -> Response:
        return self._call(self._client.complete(prompt, timeout=timeout, **sampling))

    def chat(self, messages: list[dict], *, timeout: float | None = None, **sampling) -> Response:
        return self._call(self._client.chat(messages, timeout=timeout, **sampling))

    def health(self) -> dict:
        return self._call(self._client.health())

    def stats(self) -> dict:
        return self._call(self._client.stats())

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._loop.is_closed():
            raise ConnectionError(f"this client of {self._client.address} is closed; make a new one")

    def _call(self, awaitable):
        if self._loop.is_closed():
            awaitable.close()  # never run: no warning that it was not awaited
            self._check_open()
        future = asyncio.run_coroutine_threadsafe(awaitable, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C: cancels the coroutine in the loop too, which aborts its request
            raise
