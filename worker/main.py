"""The worker process: one Engine behind a DEALER socket. Token ids in, token ids out.

Started by the frontend's router as `python -m splitfuse.worker.main --address A --replica I
--config JSON`, with the router's secret as the first line of its standard input. It connects to
the frontend, loads the model, says `ready` (with the secret), then loops: take whatever requests
arrived (a zero-timeout poll while requests run, so socket I/O never delays a step; a blocking
poll only when idle), run one step, push its outputs, all in one message. A step that raises ends
the requests it held with an error and the worker goes on; only several failures in a row (a broken device) end
the process, which the router then restarts. It exits cleanly (sockets closed) on SIGTERM/SIGINT,
and by itself when its parent, the frontend, is gone."""
import argparse
import dataclasses
import json
import os
import signal
import sys
import time
import traceback

import torch
import zmq

from splitfuse import protocol
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.worker.engine import Engine
from splitfuse.worker.request import Request, RequestOutput

HEARTBEAT_INTERVAL = 1.0  # seconds; the frontend's heartbeat timeout is many of these
MAX_FAILED_STEPS = 3      # failed steps in a row after which the worker exits to be restarted


class Worker:
    def __init__(self, engine: Engine, socket: zmq.Socket, replica: int, secret: str):
        self.engine = engine
        self.socket = socket
        self.replica = replica
        self.secret = secret
        self.parent = os.getppid()
        self.running = True
        self._last_heartbeat = 0.0
        self._failed_steps = 0
        self._requests: dict[str, Request] = {}  # until their last output, which reports their cached tokens

    def run(self) -> None:
        self._send(protocol.Ready(self.replica, os.getpid(), str(self.engine.model_dir),
                                  self.engine.max_model_len, list(self.engine.eos_token_ids), self.secret))
        while self.running:
            busy = self.engine.has_unfinished()
            self._receive(timeout_ms=0 if busy else int(HEARTBEAT_INTERVAL * 1000))
            if self.engine.has_unfinished():
                outputs = self._step()
                if outputs:
                    self._send(protocol.Step([self._wire(out) for out in outputs]))
            drained = busy and not self.engine.has_unfinished()
            if drained or time.monotonic() - self._last_heartbeat >= HEARTBEAT_INTERVAL:
                self._heartbeat()

    def _step(self) -> list[RequestOutput]:
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
        except protocol.ProtocolError as e:  # only our frontend talks to us: a bug, not a user error
            print(f"replica {self.replica}: dropped a message: {e}", file=sys.stderr, flush=True)
            return
        if isinstance(msg, protocol.Generate):
            try:
                self._requests[msg.id] = self.engine.add_request(msg.id, msg.prompt_ids,
                                                                 SamplingParams.from_kwargs(**msg.params))
            except Exception as e:  # this request only; the worker keeps serving
                self._send(protocol.Error(msg.id, str(e) or type(e).__name__))
        else:
            self.engine.abort(msg.id)

    def _wire(self, out: RequestOutput) -> protocol.Output:
        cached = None
        if out.finish_reason is not None:
            request = self._requests.pop(out.request_id, None)
            cached = request.num_cached_tokens if request is not None else 0
        return protocol.Output(out.request_id, out.new_token_ids, out.finish_reason, out.error, out.logprobs,
                               out.top_logprobs, cached)

    def _heartbeat(self) -> None:
        self._last_heartbeat = time.monotonic()
        if os.getppid() != self.parent:  # the frontend died without telling us: nobody to serve
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="splitfuse worker process (started by the frontend)")
    parser.add_argument("--address", required=True, help="the frontend's worker socket, e.g. tcp://127.0.0.1:5600")
    parser.add_argument("--replica", type=int, default=0)
    parser.add_argument("--replicas", type=int, default=1, help="replicas in the deployment")
    parser.add_argument("--config", required=True, help="EngineConfig fields as JSON")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0: torch's default")
    args = parser.parse_args(argv)
    secret = sys.stdin.readline().strip()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)

    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, f"replica-{args.replica}-{os.getpid()}".encode())
    socket.setsockopt(zmq.LINGER, 1000)
    socket.setsockopt(zmq.SNDHWM, 0)  # never block or drop an output; a dead frontend is caught by the parent check
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.connect(args.address)
    try:
        config = EngineConfig.from_kwargs(**json.loads(args.config))
        sharing = replicas_sharing(config.device, args.replica, args.replicas)
        config = dataclasses.replace(config, device=replica_device(config.device, args.replica))
        if args.threads and not config.device.startswith("cuda"):
            torch.set_num_threads(args.threads)  # replicas sharing the CPU split its cores
        start = time.perf_counter()
        print(f"replica {args.replica}: loading {config.model or 'the bundled model'} "
              f"(device {config.device}, pid {os.getpid()})...", file=sys.stderr, flush=True)
        engine = Engine(config, replicas_on_device=sharing)
        print(f"replica {args.replica}: ready in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        Worker(engine, socket, args.replica, secret).run()
    finally:
        socket.close()
        context.term()


def run() -> None:
    """main(), then leave without the interpreter's teardown: a background compile may still be running,
    and tearing down under its thread aborts the process ("terminate called without an active exception")."""
    code = 0
    try:
        main()
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
