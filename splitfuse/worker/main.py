"""The worker process: one Engine behind a DEALER socket. Token ids in, token ids out.

Started by the frontend's router as `python -m splitfuse.worker.main --address A --replica I
--config JSON`, with the router's secret as the first line of its standard input. It connects to
the frontend, loads the model, says `ready` (with the secret), then loops: take whatever requests
arrived (a zero-timeout poll while requests run, so socket I/O never delays a step; a blocking
poll only when idle), run one step, push its outputs, all in one message. A step that raises ends
the requests it held with an error and the worker goes on; only several failures in a row (a broken device) end
the process, which the router then restarts. It exits cleanly (sockets closed) on SIGTERM/SIGINT,
and by itself when its parent, the frontend, is gone.

Started by itself instead (`splitfuse worker --connect ADDRESS`, the token in --token-file), it joins
a frontend on another machine: see `join`."""
import argparse
import logging
import os
import platform
import secrets
import signal
import sys
import time
import traceback

import msgspec
import torch
import zmq
import zmq.auth

from splitfuse import protocol
from splitfuse.config import EngineConfig, model_fingerprint, read_token_file
from splitfuse.worker import tp_group
from splitfuse.worker.engine import Engine

log = logging.getLogger("splitfuse.worker.main")  # by name: run with -m, __name__ is __main__

HEARTBEAT_INTERVAL = 1.0  # seconds; the frontend's heartbeat timeout is many of these
MAX_FAILED_STEPS = 3      # failed steps in a row after which the worker exits to be restarted
JOIN_WAIT = (2.0, 30.0)   # seconds a joining worker waits for an answer: at first, and at most (doubling)


class Worker:
    def __init__(self, engine: Engine, socket: zmq.Socket, replica: int, frontend_timeout: float | None = None,
                 parent: int | None = None):
        """frontend_timeout: for a worker that joined by itself, seconds without a word from the frontend
        after which it counts as gone; None: the frontend is the parent process, watched instead."""
        self.engine = engine
        self.socket = socket
        self.replica = replica
        self.frontend_timeout = frontend_timeout
        self.parent = parent if parent is not None else os.getppid()
        self.running = True
        self._last_heartbeat = 0.0
        self._heard = time.monotonic()  # the frontend's latest message
        self._failed_steps = 0
        # Requests sent with stream=false: None before their first output, then the outputs held since.
        self._whole: dict[str, list[protocol.Output] | None] = {}

    def run(self) -> None:
        """Serve until a signal, or until the frontend is gone: then its requests are dropped here too."""
        while self.running:
            busy = self.engine.has_unfinished()
            self._receive(timeout_ms=0 if busy else int(HEARTBEAT_INTERVAL * 1000))
            if self.engine.has_unfinished():
                outputs = self._hold(self._step())
                if outputs:
                    self._send(protocol.Step(outputs))
            drained = busy and not self.engine.has_unfinished()
            if drained or time.monotonic() - self._last_heartbeat >= HEARTBEAT_INTERVAL:
                self._heartbeat()
        self.engine.abort_all()

    def _step(self) -> list[protocol.Output]:
        """One engine step; if it raises, its requests end with the error instead of the whole replica."""
        try:
            outputs = self.engine.step()
        except Exception as e:
            self._failed_steps += 1
            if self._failed_steps >= MAX_FAILED_STEPS:
                raise
            traceback.print_exc()
            return self.engine.fail_running(f"the step running this request failed: {type(e).__name__}: {e}")
        self._failed_steps = 0
        return outputs

    def _hold(self, outputs: list[protocol.Output]) -> list[protocol.Output]:
        """The outputs to send now. Those of a request sent with stream=false wait after its first (which tells
        the frontend that it started), joined, until it ends: a message a step wakes the frontend, which on a
        machine of few cores takes its time from the steps."""
        ready = []
        for out in outputs:
            if out.id not in self._whole:  # streamed
                ready.append(out)
                continue
            held = self._whole[out.id]
            if out.finish_reason is not None:
                del self._whole[out.id]
                ready.append(protocol.Output.join([*held, out]) if held else out)
            elif held is None:  # its first
                self._whole[out.id] = []
                ready.append(out)
            else:
                held.append(out)
        return ready

    def _receive(self, timeout_ms: int) -> None:
        if not self.socket.poll(timeout_ms):
            return
        while True:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frame)

    def _handle(self, frame: bytes) -> None:
        try:
            msg = protocol.decode(frame, protocol.WORKER_REQUESTS)
        except protocol.ProtocolError as e:  # only a frontend talks to us: a bug or another version, not a user error
            log.warning("replica %d: could not read a message: %s", self.replica, e)
            if e.request_id is not None:  # its request ends with the reason rather than waiting for ever
                self._send(protocol.Error(e.request_id, f"the worker could not read this request: {e}"))
            return
        self._heard = time.monotonic()
        if isinstance(msg, protocol.Generate):
            try:
                self.engine.add_request(msg.id, msg.prompt_ids, msg.params, streamed=msg.stream)
            except Exception as e:  # this request only; the worker keeps serving
                self._send(protocol.Error(msg.id, str(e) or type(e).__name__))
                return
            if not msg.stream:
                self._whole[msg.id] = None
        elif isinstance(msg, protocol.Abort):
            self.engine.abort(msg.id)
        elif isinstance(msg, protocol.Refuse):  # the frontend dropped us (or restarted): join again
            log.warning("replica %d: %s", self.replica, msg.error)
            self.running = False
        # a Heartbeat (or a late Welcome) only says that the frontend is there

    def _heartbeat(self) -> None:
        self._last_heartbeat = time.monotonic()
        if self.frontend_timeout is None and os.getppid() != self.parent:  # it died without telling us
            self.running = False
        elif self.frontend_timeout is not None and self._last_heartbeat - self._heard > self.frontend_timeout:
            log.warning("replica %d: nothing from the frontend for %.0fs", self.replica, self.frontend_timeout)
            self.running = False
        self._send(protocol.Heartbeat(self.engine.stats()))

    def _send(self, msg: protocol.Message) -> None:
        self.socket.send(protocol.encode(msg))


def replica_device(device: str, replica: int) -> str:
    """On GPU each replica gets its own device (round-robin over the visible ones)."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{replica % torch.cuda.device_count()}"
    return device


def replicas_sharing(device: str, replica: int, replicas: int) -> int:
    """How many of the deployment's replicas run on this replica's device (they split its memory)."""
    mine = replica_device(device, replica)
    return sum(replica_device(device, r) == mine for r in range(replicas))


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(0)  # unwinds through the finally blocks: sockets closed, nothing half-sent


def _dealer(context: zmq.Context, identity: str) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, identity.encode())  # unique per connection: a ROUTER refuses one in use
    socket.setsockopt(zmq.LINGER, 1000)
    socket.setsockopt(zmq.SNDHWM, 0)  # never block or drop an output; a dead frontend is noticed by other means
    socket.setsockopt(zmq.RCVHWM, 0)
    return socket


def curve_keys(server_cert: str, secret_cert: str) -> tuple[bytes, bytes, bytes]:
    """(the frontend's public key, this worker's public and secret keys) from zmq.auth certificates."""
    server_public, _ = zmq.auth.load_certificate(server_cert)
    public, secret = zmq.auth.load_certificate(secret_cert)
    if secret is None:
        raise ValueError(f"{secret_cert} holds no secret key: give the worker's secret certificate")
    return server_public, public, secret


def join(context: zmq.Context, engine: Engine, address: str, ready: protocol.Ready, frontend_timeout: float,
         curve: tuple[bytes, bytes, bytes] | None = None) -> None:
    """Serve a frontend that did not start this worker. Say ready on a new connection until the frontend
    answers, waiting longer each time (it may not be up yet); once welcome, serve until it is gone, then
    join again. A refusal that joining again cannot fix (a wrong token, another model) exits with code 1,
    so that the supervisor shows it and restarts the worker. `curve`: the keys of an encrypted link (a
    frontend that does not admit this worker's key never answers)."""
    wait = JOIN_WAIT[0]
    while True:
        socket = _dealer(context, f"{ready.name}-{os.getpid()}-{secrets.token_hex(4)}")
        if curve is not None:  # set before connecting
            socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = curve
        try:
            socket.connect(address)
            socket.send(protocol.encode(ready))
            deadline = time.monotonic() + wait
            answer = _answer(socket, deadline)
            if isinstance(answer, protocol.Welcome):
                log.info("worker %r: joined %s as replica %d", ready.name, address, answer.replica)
                Worker(engine, socket, answer.replica, frontend_timeout).run()
                wait = JOIN_WAIT[0]
                continue
            if isinstance(answer, protocol.Refuse) and not answer.retry:
                log.error("worker %r: the frontend at %s refused it: %s", ready.name, address, answer.error)
                raise SystemExit(1)
            why = answer.error if answer else f"no answer from a frontend at {address} within {wait:.0f}s"
            log.warning("worker %r: %s; trying again", ready.name, why)
            time.sleep(max(0.0, deadline - time.monotonic()))
            wait = min(2 * wait, JOIN_WAIT[1])
        finally:
            socket.close(linger=0)


def _answer(socket: zmq.Socket, deadline: float) -> protocol.Welcome | protocol.Refuse | None:
    """The frontend's answer to a ready message, or None if none came by the deadline."""
    while (left := deadline - time.monotonic()) > 0:
        if socket.poll(left * 1000):
            try:
                answer = protocol.decode(socket.recv(), protocol.WORKER_REQUESTS)
            except protocol.ProtocolError:
                continue
            if isinstance(answer, (protocol.Welcome, protocol.Refuse)):
                return answer
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="splitfuse worker process (started by the frontend, or by "
                                                 "`splitfuse worker` to join one)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="the socket of the frontend that started this worker")
    where.add_argument("--connect", help="join the running frontend at this address (its --worker-address)")
    parser.add_argument("--token-file", help="with --connect: the file holding the token shared with the frontend")
    parser.add_argument("--name", help="with --connect: this worker's name at the frontend (default: the hostname)")
    parser.add_argument("--frontend-timeout", type=float, default=30.0,
                        help="with --connect: seconds without a word from the frontend before joining it again")
    parser.add_argument("--curve-server-cert", help="with --connect: the frontend's public CURVE certificate")
    parser.add_argument("--curve-secret", help="with --curve-server-cert: this worker's secret CURVE certificate")
    parser.add_argument("--replica", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, help="the frontend that started this worker, which exits when it "
                        "is gone (read at start, it could already be gone: the model loads first)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas in the deployment")
    parser.add_argument("--config", required=True, help="EngineConfig fields as JSON")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0: torch's default")
    args = parser.parse_args(argv)
    if args.connect and not args.token_file:
        parser.error("--connect needs --token-file")
    if (args.curve_server_cert is None) != (args.curve_secret is None):
        parser.error("CURVE needs both --curve-server-cert and --curve-secret")
    secret = read_token_file(args.token_file) if args.connect else sys.stdin.readline().strip()
    curve = curve_keys(args.curve_server_cert, args.curve_secret) if args.curve_server_cert else None
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)

    context = zmq.Context()
    socket = None
    if args.address:  # connect while the model loads
        socket = _dealer(context, f"replica-{args.replica}-{os.getpid()}")
        socket.connect(args.address)
    try:
        config = EngineConfig.from_json(args.config)
        sharing = replicas_sharing(config.device, args.replica, args.replicas)
        config = msgspec.structs.replace(config, device=replica_device(config.device, args.replica))
        if args.threads and not config.device.startswith("cuda"):
            torch.set_num_threads(args.threads)  # replicas sharing the CPU split its cores
        start = time.perf_counter()
        log.info("replica %d: loading %s (device %s, pid %d)...", args.replica, config.model or "the bundled model",
                 config.device, os.getpid())
        engine = (tp_group.start_leader(config, args.replica, sharing) if config.tensor_parallel_size > 1
                  else Engine(config, replicas_on_device=sharing))
        log.info("replica %d: ready in %.1fs", args.replica, time.perf_counter() - start)
        name = (args.name or platform.node()) if args.connect else None
        ready = protocol.Ready(args.replica if socket else -1, os.getpid(), str(engine.model_dir), engine.max_model_len,
                               secret, name, model_fingerprint(engine.model_dir), engine.config.block_size)
        if socket is None:
            join(context, engine, args.connect, ready, args.frontend_timeout, curve)
        else:
            socket.send(protocol.encode(ready))
            Worker(engine, socket, args.replica, parent=args.parent_pid).run()
    finally:
        if socket is not None:
            socket.close()
        context.term()


def run(argv: list[str] | None = None) -> None:
    """main(), then leave without the interpreter's teardown: a background compile may still be running,
    and tearing down under its thread aborts the process ("terminate called without an active exception")."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
