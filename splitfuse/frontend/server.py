"""The server process: one frontend core, served over ZeroMQ (docs/protocol.md), OpenAI-compatible
HTTP (frontend/http_server.py), or both.

The main thread polls the core and the ZeroMQ client socket in one loop; the HTTP server runs on a
thread of its own and hands its requests to the core with `call_soon`. A ZeroMQ client that cannot
be sent to any more (disconnected, or not reading) has its requests aborted. SIGTERM or SIGINT
drains: nothing new is accepted (503, or an error reply), what is in flight may finish for up to
`shutdown_timeout` seconds, the rest ends with an error, and the process exits 0; a second signal
stops at once. Never imports torch."""
import argparse
import contextlib
import json
import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import zmq

from splitfuse import protocol
from splitfuse.config import EngineConfig
from splitfuse.frontend.core import TICK, Core, Overloaded, Unavailable
from splitfuse.frontend.curve import CurveOptions, curve_server
from splitfuse.frontend.http_server import HttpOptions, HttpServer
from splitfuse.frontend.replicas import RemoteWorkers
from splitfuse.protocol import Delta

log = logging.getLogger("splitfuse.frontend.server")  # by name: run with -m, __name__ is __main__

MAX_BATCH = 1000         # client messages handled per loop turn, so worker outputs keep flowing
DESCRIPTOR_RESERVE = 256  # files kept from HTTP connections: worker restarts (pipes), ZeroMQ sockets, logs
CLIENT_SNDHWM = 100_000  # messages queued for one client before it counts as not reading


class ZmqFrontend:
    """The ZeroMQ client socket (docs/protocol.md) over the core."""

    def __init__(self, core: Core, address: str, curve: CurveOptions | None = None):
        self.core = core
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone client raises: abort its requests
        self.socket.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self._authenticator = curve_server(self.socket, curve) if curve is not None else None
        self.socket.bind(address)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.keys: dict[tuple[bytes, str], str] = {}   # (client, its request id) -> the core's key
        core.register(self.socket)

    def receive(self) -> None:
        for _ in range(MAX_BATCH):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_client(frames[0], frames[1:])

    def close(self) -> None:
        self.socket.close()
        if self._authenticator is not None:
            self._authenticator.stop()

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
            key = self.keys.get((client, msg.id))
            if key is not None:  # else it has just finished: nothing to do
                self.core.abort(key)
        elif isinstance(msg, protocol.Health):
            self._send(client, protocol.Health(msg.id, **self.core.health()))
        else:
            self._send(client, protocol.Stats(msg.id, stats=self.core.stats()))

    def _generate(self, client: bytes, msg: protocol.Generate) -> None:
        if (client, msg.id) in self.keys:
            return self._send(client, protocol.Error(msg.id, f"request id {msg.id!r} is already in flight"))
        try:
            key = self.core.submit(partial(self._reply, client, msg.id), msg.params, prompt=msg.prompt,
                                   messages=msg.messages, prompt_ids=msg.prompt_ids, stream=msg.stream,
                                   timeout=msg.timeout, id=msg.id)
        except (ValueError, Overloaded, Unavailable) as e:
            return self._send(client, protocol.Error(msg.id, str(e)))
        self.keys[(client, msg.id)] = key

    def _reply(self, client: bytes, rid: str, event: Delta | Exception) -> None:
        """The core's sink for one client request."""
        if (client, rid) not in self.keys:  # the client is gone: its requests were aborted
            return
        if isinstance(event, Exception):
            del self.keys[(client, rid)]
            return self._send(client, protocol.Error(rid, str(event)))
        if event.finish_reason is not None:
            del self.keys[(client, rid)]
        self._send(client, event)

    def _send(self, client: bytes, msg: protocol.Message) -> None:
        try:
            self.socket.send_multipart([client, protocol.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:  # gone (EHOSTUNREACH) or not reading (EAGAIN): nobody to stream to
            for request in [k for k in self.keys if k[0] == client]:
                self.core.abort(self.keys.pop(request))


class Server:
    def __init__(self, core: Core, zmq_frontend: ZmqFrontend | None, http: HttpServer | None,
                 shutdown_timeout: float):
        self.core, self.zmq, self.http = core, zmq_frontend, http
        self.shutdown_timeout = shutdown_timeout
        self.stopping = False
        self.serving = False

    def run(self, watch_parent: bool = False) -> None:
        """Serve until a signal (then drain) or, with watch_parent, until the process that started us is gone."""
        self.serving = True
        parent = os.getppid()
        while not self.stopping:
            self._turn()
            if watch_parent and os.getppid() != parent:
                return
        self.core.accepting = False
        deadline = time.monotonic() + self.shutdown_timeout
        while self.core.requests and time.monotonic() < deadline:
            self._turn()

    def stop(self, signum, frame) -> None:
        if self.stopping or not self.serving:
            raise SystemExit(0)  # a second signal, or one while starting: stop now, requests in flight end in error
        self.stopping = True

    def close(self) -> None:
        self.core.close()  # in-flight requests end with an error: their sinks reply before the sockets close
        if self.zmq is not None:
            self.zmq.close()
        if self.http is not None:
            self.http.stop()

    def _turn(self) -> None:
        self.core.poll(TICK)
        if self.zmq is not None:
            self.zmq.receive()


def run(config: EngineConfig, replicas: int = 1, address: str | None = "tcp://127.0.0.1:*", *,
        announce: Callable[[dict], None], http: HttpOptions | None = None, curve: CurveOptions | None = None,
        shutdown_timeout: float = 30.0, watch_parent: bool = False, **core_options) -> None:
    """Start the replicas, then the ZeroMQ socket at `address` (None: none) and the HTTP server (`http`),
    call `announce({"address": ..., "http_url": ..., "worker_address": ...})`, serve until a signal, drain,
    shut down. `worker_address` is where workers started elsewhere join (core option `remote`), or None."""
    if address is None and http is None:
        raise ValueError("nothing to serve on: give a ZeroMQ address, an HTTP port, or both")
    descriptors = raise_descriptor_limit()
    if http is not None and http.max_connections > descriptors - DESCRIPTOR_RESERVE:
        http.max_connections = max(1, descriptors - DESCRIPTOR_RESERVE)
        log.info("splitfuse: at most %d HTTP connections at once: %d file descriptors, %d kept for workers and "
                 "ZeroMQ", http.max_connections, descriptors, DESCRIPTOR_RESERVE)
    core = Core(config, replicas, **core_options)
    server = Server(core, None, None, shutdown_timeout)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    try:
        core.start()
        if address is not None:
            server.zmq = ZmqFrontend(core, address, curve)
        if http is not None:
            server.http = HttpServer(core, http, http.model_name or Path(core.model_dir).name)
            server.http.start()
        announce({"address": server.zmq and server.zmq.address, "http_url": server.http and server.http.url,
                  "worker_address": core.worker_address})
        server.run(watch_parent)
    finally:
        server.close()


def raise_descriptor_limit() -> int:
    """The soft limit on open files raised to the hard one, as vLLM does (connections and sockets are files);
    returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> None:
    """The process `splitfuse.serve()` starts; prints `ready {"address": ..., "http_url": ...}` once it serves."""
    parser = argparse.ArgumentParser(description="splitfuse frontend server (use `splitfuse serve` instead)")
    parser.add_argument("--address", default="tcp://127.0.0.1:*", help="ZeroMQ address; 'none' for no socket")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--config", default="{}", help="EngineConfig fields as JSON")
    parser.add_argument("--options", default="{}", help="Core keyword options and shutdown_timeout as JSON")
    parser.add_argument("--http", help="HttpOptions fields as JSON; absent: no HTTP server")
    parser.add_argument("--curve", help="CurveOptions fields as JSON; absent: no encryption")
    parser.add_argument("--remote", help="RemoteWorkers fields as JSON; absent: no workers join from elsewhere")
    parser.add_argument("--watch-parent", action="store_true", help="exit when the parent process is gone")
    args = parser.parse_args(argv)
    run(EngineConfig.from_json(args.config), args.replicas,
        None if args.address == "none" else args.address,
        http=HttpOptions(**json.loads(args.http)) if args.http else None,
        curve=CurveOptions(**json.loads(args.curve)) if args.curve else None,
        remote=_remote_workers(json.loads(args.remote)) if args.remote else None,
        announce=lambda where: print(f"ready {json.dumps(where)}", flush=True), watch_parent=args.watch_parent,
        **json.loads(args.options))


def _remote_workers(fields: dict) -> RemoteWorkers:
    curve = fields.pop("curve", None)
    return RemoteWorkers(**fields, curve=CurveOptions(**curve) if curve else None)


if __name__ == "__main__":
    main()
