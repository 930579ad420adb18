"""Clients of a running server: `AsyncClient` (asyncio) and `Client` (blocking, for scripts).

One DEALER connection carries any number of concurrent requests; a reader task hands each
incoming message to the queue of its request. Leaving a request early (a cancelled task, a
`break` out of `generate`) sends an abort, so the server frees its KV blocks."""
import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

import zmq
import zmq.asyncio

from splitfuse import protocol
from splitfuse.config import SamplingParams
from splitfuse.frontend.response import Delta, Response

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages [{"role": ..., "content": ...}]


class AsyncClient:
    """`async with AsyncClient(address) as client:` then `generate`, `complete`, `chat`, `health`, `stats`.

    A request the server refuses (bad parameters, a prompt too long, ...) raises ValueError. One that
    fails after it started (its worker died, it timed out) ends with finish_reason "error" and `error` set."""

    def __init__(self, address: str):
        self.address = address
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()

    async def __aenter__(self) -> "AsyncClient":
        self._connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, prompt: Prompt, *, timeout: float | None = None, **sampling) -> AsyncIterator[Delta]:
        """Stream the response to a prompt as Deltas; the last one has a finish_reason."""
        async with aclosing(self._request(prompt, sampling, stream=True, timeout=timeout)) as messages:
            async for msg in messages:
                yield Delta(msg.text, msg.token_ids, msg.finish_reason, msg.error, msg.logprobs, msg.top_logprobs)

    async def complete(self, prompt: Prompt, *, timeout: float | None = None, **sampling) -> Response:
        """The whole response to a prompt at once."""
        async with aclosing(self._request(prompt, sampling, stream=False, timeout=timeout)) as messages:
            msg = await anext(messages)  # stream=False: a single delta holding everything
        return Response(msg.text, msg.token_ids, msg.prompt_length, len(msg.token_ids), msg.finish_reason,
                        msg.logprobs, msg.top_logprobs, msg.error)

    async def chat(self, messages: list[dict], *, timeout: float | None = None, **sampling) -> Response:
        """The assistant's reply to a conversation (the model's chat template is applied by the server)."""
        return await self.complete(messages, timeout=timeout, **sampling)

    async def health(self) -> dict:
        reply = await self._ask(protocol.Health)
        return {"ok": reply.ok, "replicas": reply.replicas}

    async def stats(self) -> dict:
        return (await self._ask(protocol.Stats)).stats

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._socket is not None:
            self._socket.close(linger=0)
            self._context.term()
        self._reader = self._socket = self._context = None

    async def _request(self, prompt: Prompt, sampling: dict, stream: bool,
                       timeout: float | None) -> AsyncIterator[protocol.Delta]:
        params = SamplingParams.from_kwargs(**sampling).to_dict()  # bad parameters fail here, before sending
        fields = _prompt_fields(prompt)
        rid, queue = self._open()
        finished = False
        try:
            await self._socket.send(protocol.encode(protocol.Generate(rid, params=params, stream=stream,
                                                                      timeout=timeout, **fields)))
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
        rid, queue = self._open()
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

    def _open(self) -> tuple[str, asyncio.Queue]:
        self._connect()
        if self._reader.done():
            raise ConnectionError(f"the connection to {self.address} failed earlier; make a new client")
        rid = str(next(self._ids))
        self._queues[rid] = queue = asyncio.Queue()
        return rid, queue

    def _connect(self) -> None:
        if self._socket is not None:
            return
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.address)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                msg = protocol.decode(await self._socket.recv(), protocol.SERVER_REPLIES)
                queue = self._queues.get(msg.id)
                if queue is not None:  # else a request we already left
                    queue.put_nowait(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the connection is unusable: fail every waiting request with the reason
            for queue in self._queues.values():
                queue.put_nowait(ConnectionError(f"connection to {self.address} failed: {e}"))
            raise


def _prompt_fields(prompt: Prompt) -> dict:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return {"prompt_ids": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return {"messages": prompt}
    raise ValueError("a prompt must be a string, a list of token ids, or a list of chat messages "
                     "[{'role': ..., 'content': ...}]")


class Client:
    """Blocking wrapper of AsyncClient: its event loop runs in a background thread."""

    def __init__(self, address: str):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="splitfuse-client", daemon=True)
        self._thread.start()
        self._client = AsyncClient(address)

    def generate(self, prompt: Prompt, *, timeout: float | None = None, **sampling) -> Iterator[Delta]:
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

    def _call(self, awaitable):
        future = asyncio.run_coroutine_threadsafe(awaitable, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C: cancels the coroutine in the loop too, which aborts its request
            raise
