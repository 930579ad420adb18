"""Worker replicas and the routing of requests to them.

The router owns one ROUTER socket that every worker's DEALER connects to, starts the worker
processes, sends each request to the ready replica with the least outstanding work (prompt
tokens not yet computed plus tokens still to generate, as tracked here), and notices a worker
that exits or stops sending heartbeats: its in-flight requests end with an error and it is
started again. With prefix caching, the replica thought to hold a request's prompt prefix (from
the prompt blocks recently sent to each) counts that prefix as work it need not do. Workers run
`python -m splitfuse.worker.main`, so this module never imports torch.

Nobody else can take a worker's place: the socket is an `ipc://` file in a directory only this
user can enter (removed on close), and a worker's `ready` must carry the secret the router gave
it on its standard input.

Workers started elsewhere (`splitfuse worker --connect`, see RemoteWorkers) join on a second socket,
usually TCP: their `ready` must carry the token shared with the frontend and name the same model, or
they are refused and get nothing. Each becomes a replica like the local ones until it disconnects
(a heartbeat sent to it fails) or goes silent; then its requests end with an error and its replica
is dropped. Its supervisor restarts it, and it joins again."""
import hmac
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from splitfuse import protocol
from splitfuse.config import EngineConfig, SamplingParams, model_fingerprint, read_token_file
from splitfuse.frontend.curve import CurveOptions, curve_server

log = logging.getLogger(__name__)

MAX_RESTART_DELAY = 30.0  # seconds between restarts of a worker that keeps dying while it loads
HEARTBEAT_INTERVAL = 1.0  # seconds between the heartbeats sent to joined workers
PREFIX_MAP_BLOCKS = 1 << 16  # prompt blocks remembered per replica until its heartbeat tells its cache size


def prompt_block_hashes(prompt_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks. Python's hash of an int tuple is fixed within this
    process: enough for a routing hint (a collision costs one misrouted request, not a wrong answer)."""
    hashes, h = [], 0
    for start in range(0, len(prompt_ids) - block_size + 1, block_size):
        h = hash((h, *prompt_ids[start:start + block_size]))
        hashes.append(h)
    return hashes


@dataclass(slots=True)
class Job:
    """A request as the router tracks it."""
    key: str
    prompt_ids: list[int]
    params: SamplingParams
    max_model_len: int
    replica: "Replica | None" = None
    generated: int = 0
    prefix: list[int] = field(default_factory=list)  # prompt_block_hashes, when routing by prefix
    cached: int = 0                                  # prompt tokens its replica probably has cached

    @property
    def work(self) -> int:
        """Tokens this request still costs: its prompt until the first token comes back, then the rest of
        what it can generate: max_new_tokens, capped by the model's length (an upper bound: it may stop sooner)."""
        prompt = len(self.prompt_ids) - self.cached if self.generated == 0 else 0
        return prompt + min(self.params.max_new_tokens, self.max_model_len - len(self.prompt_ids)) - self.generated


@dataclass(slots=True)
class RemoteWorkers:
    """Where workers started on other machines join (`splitfuse worker --connect ADDRESS`), e.g.
    "tcp://0.0.0.0:5601", the file holding the token they must present (the same file on each), and
    optionally CURVE: the link encrypted, and only workers whose public certificate is listed connect."""
    address: str
    token_file: str
    curve: CurveOptions | None = None


@dataclass(slots=True)
class Replica:
    index: int
    process: subprocess.Popen | None = None
    identity: bytes | None = None      # the live worker's socket identity, once it said ready
    name: str | None = None            # a joined worker's name; None for the router's own processes
    socket: zmq.Socket | None = None   # the one its worker is reached on
    pid: int | None = None
    started: float = 0.0
    last_seen: float = 0.0
    restart_at: float = 0.0            # when a dead worker is started again
    failures: int = 0                  # deaths in a row before becoming ready, for the back-off
    restarts: int = 0
    served: int = 0
    engine_stats: dict = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    prefixes: OrderedDict[int, None] = field(default_factory=OrderedDict)  # prompt blocks sent here, LRU

    @property
    def ready(self) -> bool:
        return self.identity is not None

    @property
    def outstanding(self) -> int:
        return sum(job.work for job in self.jobs.values())

    def cached_prefix_blocks(self, prefix: list[int]) -> int:
        """How many leading blocks of a prompt this replica probably still has cached."""
        return next((i for i, h in enumerate(prefix) if h not in self.prefixes), len(prefix))

    def remember(self, prefix: list[int]) -> None:
        """The replica will cache these blocks; forget the least recently sent beyond its cache's size."""
        for h in prefix:
            self.prefixes[h] = None
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > self.engine_stats.get("blocks_total", PREFIX_MAP_BLOCKS):
            self.prefixes.popitem(last=False)

    def summary(self) -> dict:
        return {"replica": self.index, "name": self.name, "ready": self.ready, "pid": self.pid,
                "restarts": self.restarts, "served": self.served, "in_flight": len(self.jobs),
                "outstanding_tokens": self.outstanding, "engine": self.engine_stats}


def least_loaded(replicas: list[Replica]) -> Replica | None:
    """The ready replica with the least outstanding work; ties go to the lowest index."""
    return min((r for r in replicas if r.ready), key=lambda r: r.outstanding, default=None)


def best_for_prefix(replicas: list[Replica], job: Job, block_size: int) -> Replica | None:
    """The ready replica where the request adds the least to the work outstanding: its prompt less the
    prefix the replica probably holds, on top of what it already has. A hot prefix's replica takes its
    requests until its backlog exceeds another's by what the prefix saves, then the other computes the
    prefix too; without a cached prefix anywhere this is least_loaded. Ties go to the lowest index."""
    return min((r for r in replicas if r.ready), default=None,
               key=lambda r: r.outstanding - block_size * r.cached_prefix_blocks(job.prefix))


class Router:
    def __init__(self, config: EngineConfig, replicas: int = 1, *, heartbeat_timeout: float = 30.0,
                 startup_timeout: float = 900.0, context: zmq.Context | None = None,
                 remote: RemoteWorkers | None = None):
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < (0 if remote else 1):
            raise ValueError(f"replicas must be a positive integer (0 only when workers join from elsewhere), "
                             f"got {replicas!r}")
        self.config = config
        self.heartbeat_timeout = heartbeat_timeout
        self.startup_timeout = startup_timeout
        self.context = context or zmq.Context.instance()
        self.model_dir: str | None = None      # the frontend's copy of the model: its tokenizer's files
        self.remote_socket = self.remote_address = self._authenticator = None
        if remote is not None:
            self._listen(remote, replicas)
        self.socket = self._worker_socket(self.context)
        self._dir = tempfile.mkdtemp(prefix="splitfuse-")  # mode 0700: other users cannot connect
        self.address = f"ipc://{self._dir}/workers"
        self.socket.bind(self.address)
        self._secret = secrets.token_hex(32)
        self.replicas = [Replica(i, socket=self.socket) for i in range(replicas)]
        self.local_replicas = replicas
        self.started = False
        self.jobs: dict[str, Job] = {}
        self.waiting: deque[Job] = deque()     # submitted while no replica was ready
        self.info: protocol.Ready | None = None  # the first ready message: model_dir, max_model_len
        self.vocab_size: int | None = None  # set by the core once its tokenizer is loaded: outputs are checked
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._threads = max(1, cores // max(1, replicas))  # replicas on the CPU split its cores
        self.sockets = [self.socket] + ([self.remote_socket] if remote is not None else [])

    def _listen(self, remote: RemoteWorkers, replicas: int) -> None:
        """Bind the socket where workers from elsewhere join, once what they are checked against is known."""
        self._token = read_token_file(remote.token_file)
        self.model_dir = resolve_model_dir(self.config)
        self._model_hash = model_fingerprint(self.model_dir)
        # A context of its own: a CURVE authenticator serves a whole context, and the clients' socket may have one.
        self.remote_socket = self._worker_socket(zmq.Context())
        self.remote_socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)  # open to the network
        try:
            if remote.curve is not None:
                self._authenticator = curve_server(self.remote_socket, remote.curve)
            self.remote_socket.bind(remote.address)
        except (zmq.ZMQError, ValueError) as e:
            self._close_remote()
            raise ValueError(f"cannot listen for workers at {remote.address!r}: {e}") from None
        self.remote_address = self.remote_socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._next_index = replicas
        self._next_beat = 0.0

    def _close_remote(self, linger: int = 0) -> None:
        self.remote_socket.close(linger=linger)
        if self._authenticator is not None:
            self._authenticator.stop()
        self.remote_socket.context.term()

    @staticmethod
    def _worker_socket(context: zmq.Context) -> zmq.Socket:
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a dead worker fails instead of vanishing
        socket.setsockopt(zmq.SNDHWM, 0)            # an internal link: never drop a request or output
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
        return socket

    def start(self) -> None:
        """Start every replica and wait until all are ready. A replica that dies while loading here
        is a configuration problem (bad model, no memory), so it stops the start instead of looping.
        Without replicas of its own, wait (without a limit) for the first worker to join."""
        local = list(self.replicas)
        for replica in local:
            self._spawn(replica)
        if not local:
            log.info("router: waiting for a worker to join at %s", self.remote_address)
        deadline = time.monotonic() + self.startup_timeout
        poller = zmq.Poller()
        for socket in self.sockets:
            poller.register(socket, zmq.POLLIN)
        while not (all(r.ready for r in local) if local else self.info):
            for r in local:
                if r.process.poll() is not None:
                    raise RuntimeError(f"replica {r.index} exited with code {r.process.returncode} while loading "
                                       f"the model; its error output is above")
            if local and time.monotonic() > deadline:
                raise RuntimeError(f"replicas not ready after {self.startup_timeout:.0f}s")
            if poller.poll(100):
                self.receive()
        self.started = True

    def submit(self, key: str, prompt_ids: list[int], params: SamplingParams) -> None:
        job = Job(key, prompt_ids, params, self.info.max_model_len)
        if self.config.enable_prefix_caching and self.config.prefix_routing:
            job.prefix = prompt_block_hashes(prompt_ids, self.config.block_size)
        self.jobs[key] = job
        replica = self._choose(job)
        if replica is None:
            self.waiting.append(job)
        else:
            self._dispatch(job, replica)

    def abort(self, key: str) -> None:
        """Forget a request and have its worker free its KV blocks."""
        job = self.jobs.pop(key, None)
        if job is None:
            return
        if job.replica is None:
            self.waiting.remove(job)
        else:
            del job.replica.jobs[key]
            self._send(job.replica, protocol.Abort(key))

    def receive(self) -> list[protocol.Output | protocol.Error]:
        """Drain the worker sockets. Returns the outputs of jobs still tracked; a final one (finish
        reason or error) also ends the job here. Ready and heartbeat messages are handled here."""
        events = []
        for socket in self.sockets:
            while True:
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if len(frames) == 2:  # [identity, message]; anything else is not from one of our workers
                    events += self._on_message(socket, frames[0].bytes, frames[1])
        return events

    def _on_message(self, socket: zmq.Socket, identity: bytes, frame: zmq.Frame) -> list[protocol.Output]:
        try:
            msg = protocol.decode(frame.bytes, protocol.WORKER_REPLIES)
        except protocol.ProtocolError as e:
            replica = next((r for r in self.replicas if r.identity == identity), None)
            if replica is None:
                log.warning("router: dropped a message from an unknown worker: %s", e)
                return []
            return self._reject(replica, str(e))
        if isinstance(msg, protocol.Ready):
            if socket is self.socket:
                self._on_ready(identity, msg)
            else:
                self._on_join(identity, msg, frame.get("Peer-Address"))
            return []
        replica = next((r for r in self.replicas if r.identity == identity), None)
        if replica is None:
            if socket is self.remote_socket:  # dropped while it lived on (a network outage): it may join again
                self._reply(identity, protocol.Refuse("this frontend does not know this worker (it was silent "
                                                      "too long, or the frontend restarted): join again", True))
            return []  # else from a local worker instance that has been replaced
        replica.last_seen = time.monotonic()
        if isinstance(msg, protocol.Heartbeat):
            replica.engine_stats = msg.stats
            return []
        outputs = msg.outputs if isinstance(msg, protocol.Step) else [msg]
        if problem := next(filter(None, map(self._invalid, outputs)), None):
            return self._reject(replica, problem)
        events = []
        for out in outputs:
            job = replica.jobs.get(out.id)
            if job is None:  # aborted meanwhile
                continue
            if isinstance(out, protocol.Error) or out.finish_reason is not None:
                del self.jobs[out.id], replica.jobs[out.id]
            else:
                job.generated += len(out.token_ids)
            events.append(out)
        return events

    def check(self) -> list[protocol.Output]:
        """Find dead or hung workers and restart them (drop them, if they joined from elsewhere); returns
        error outputs for the requests they held."""
        now, failed = time.monotonic(), []
        beat = self.remote_socket is not None and now >= self._next_beat
        if beat:
            self._next_beat = now + HEARTBEAT_INTERVAL
        for r in list(self.replicas):
            if r.name is not None:
                if beat and not self._send(r, protocol.Heartbeat({})):
                    failed += self._drop(r, f"worker {r.name!r} (replica {r.index}) disconnected")
                elif now - r.last_seen > self.heartbeat_timeout:
                    failed += self._drop(r, f"worker {r.name!r} (replica {r.index}) sent no heartbeat "
                                            f"for {self.heartbeat_timeout:.0f}s")
                continue
            if r.process is None:
                if now >= r.restart_at:
                    self._respawn(r)
                continue
            if r.process.poll() is not None:
                failed += self._lost(r, f"replica {r.index} (pid {r.process.pid}) exited with code "
                                        f"{r.process.returncode}")
            elif r.ready and now - r.last_seen > self.heartbeat_timeout:
                failed += self._kill(r, f"replica {r.index} (pid {r.process.pid}) sent no heartbeat "
                                        f"for {self.heartbeat_timeout:.0f}s")
            elif not r.ready and now - r.started > self.startup_timeout:
                failed += self._kill(r, f"replica {r.index} (pid {r.process.pid}) was not ready after "
                                        f"{self.startup_timeout:.0f}s")
        return failed

    def stats(self) -> list[dict]:
        return [r.summary() for r in self.replicas]

    def close(self, timeout: float = 10.0) -> None:
        """SIGTERM every worker (they exit cleanly between steps), SIGKILL what is left after `timeout`.
        Joined workers are told instead: they drop their requests and wait to join the next frontend."""
        for r in self.replicas:
            if r.name is not None:
                self._send(r, protocol.Refuse("the frontend is stopping", True))
            elif r.process is not None and r.process.poll() is None:
                r.process.terminate()
        deadline = time.monotonic() + timeout
        for r in self.replicas:
            if r.process is None:
                continue
            try:
                r.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.process.kill()
                r.process.wait()
        self.socket.close()
        if self.remote_socket is not None:
            self._close_remote(linger=1000)  # time for those messages to leave
        shutil.rmtree(self._dir, ignore_errors=True)

    def _respawn(self, replica: Replica) -> None:
        """A restart that fails (no descriptors or memory left, say) is tried again later, never raised."""
        try:
            self._spawn(replica)
        except OSError as e:
            replica.failures += 1
            replica.restart_at = time.monotonic() + min(2.0 ** replica.failures, MAX_RESTART_DELAY)
            log.warning("replica %d could not be started (%s); trying again in %.0fs", replica.index, e,
                        replica.restart_at - time.monotonic())

    def _spawn(self, replica: Replica) -> None:
        cmd = [sys.executable, "-P", "-m", "splitfuse.worker.main", "--address", self.address,
               "--replica", str(replica.index), "--replicas", str(self.local_replicas), "--threads", str(self._threads),
               "--config", self.config.to_json(), "--parent-pid", str(os.getpid())]
        # Its own session: a terminal's Ctrl-C reaches only the frontend, which then stops the workers.
        replica.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, start_new_session=True)
        replica.pid, replica.started = replica.process.pid, time.monotonic()
        try:  # on a pipe, not the command line, which every local user can read
            replica.process.stdin.write(self._secret.encode() + b"\n")
            replica.process.stdin.close()
        except BrokenPipeError:
            pass  # it died at once: check() notices

    def _on_ready(self, identity: bytes, msg: protocol.Ready) -> None:
        if not hmac.compare_digest(msg.secret.encode(), self._secret.encode()):
            log.warning("router: ignored a ready message without this frontend's secret")
            return
        replica = self.replicas[msg.replica] if 0 <= msg.replica < len(self.replicas) else None
        if replica is None or replica.process is None or replica.process.pid != msg.pid:
            return  # a stale instance
        replica.identity, replica.last_seen, replica.failures = identity, time.monotonic(), 0
        self._serving(msg)

    def _on_join(self, identity: bytes, msg: protocol.Ready, peer: str) -> None:
        """A worker started elsewhere says ready: it becomes a replica, or is told why not."""
        joined = any(r.identity == identity for r in self.replicas)
        refusal = protocol.Refuse("this connection has joined already", False) if joined else self._refusal(msg)
        if refusal is not None:
            log.warning("router: refused a worker from %s (name %r): %s", peer, msg.name, refusal.error)
            return self._reply(identity, refusal)
        replica = Replica(self._next_index, identity=identity, name=msg.name, socket=self.remote_socket,
                          pid=msg.pid, last_seen=time.monotonic())
        self._next_index += 1
        self.replicas.append(replica)
        self._reply(identity, protocol.Welcome(replica.index))
        log.info("router: worker %r from %s joined as replica %d", msg.name, peer, replica.index)
        self._serving(msg)

    def _refusal(self, msg: protocol.Ready) -> protocol.Refuse | None:
        if not hmac.compare_digest(msg.secret.encode(), self._token.encode()):
            return protocol.Refuse("its token is not this frontend's (give both the same token file)", False)
        if not msg.name:
            return protocol.Refuse("a joining worker must give its name", False)
        if msg.model_hash != self._model_hash:
            return protocol.Refuse(f"its model ({msg.model_dir}) is not the frontend's ({self.model_dir}): their "
                                   f"config.json or tokenizer files differ", False)
        if msg.block_size != self.config.block_size:
            return protocol.Refuse(f"its block size is {msg.block_size}, the frontend's {self.config.block_size} "
                                   f"(--block-size): prefix routing needs the same", False)
        if self.info is not None and msg.max_model_len != self.info.max_model_len:
            return protocol.Refuse(f"its maximum model length is {msg.max_model_len}, the other replicas' "
                                   f"{self.info.max_model_len} (--max-model-len)", False)
        if self.local_replicas and not self.started:
            return protocol.Refuse("the frontend is still starting its own replicas", True)
        if any(r.name == msg.name for r in self.replicas):
            return protocol.Refuse(f"a worker named {msg.name!r} is serving already: give each worker its own "
                                   f"--name (a restarted one is taken once its old instance is dropped)", True)
        return None

    def _serving(self, msg: protocol.Ready) -> None:
        """A replica became ready: the first sets the model's length, and waiting jobs go out."""
        self.info = self.info or msg
        self.model_dir = self.model_dir or msg.model_dir
        while self.waiting:
            job = self.waiting.popleft()
            self._dispatch(job, self._choose(job))

    def _choose(self, job: Job) -> Replica | None:
        return best_for_prefix(self.replicas, job, self.config.block_size) if job.prefix else least_loaded(self.replicas)

    def _dispatch(self, job: Job, replica: Replica) -> None:
        job.replica = replica
        job.cached = self.config.block_size * replica.cached_prefix_blocks(job.prefix)
        replica.remember(job.prefix)
        replica.jobs[job.key] = job
        replica.served += 1
        self._send(replica, protocol.Generate(job.key, prompt_ids=job.prompt_ids, params=job.params))

    def _send(self, replica: Replica, msg: protocol.Message) -> bool:
        """False if the worker is gone (then check() fails its jobs)."""
        try:
            replica.socket.send_multipart([replica.identity, protocol.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def _reply(self, identity: bytes, msg: protocol.Welcome | protocol.Refuse) -> None:
        try:
            self.remote_socket.send_multipart([identity, protocol.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # it left already

    def _kill(self, replica: Replica, reason: str) -> list[protocol.Output]:
        replica.process.kill()
        replica.process.wait()
        return self._lost(replica, reason)

    def _lost(self, replica: Replica, reason: str) -> list[protocol.Output]:
        log.warning("%s; restarting it", reason)
        failed = self._fail_jobs(replica, reason)
        replica.failures = 0 if replica.ready else replica.failures + 1
        replica.restart_at = time.monotonic() + min(2.0 ** replica.failures - 1, MAX_RESTART_DELAY)
        replica.identity = replica.process = replica.pid = None
        replica.restarts += 1
        return failed

    def _invalid(self, out: protocol.Output | protocol.Error) -> str | None:
        """What is wrong with a worker's output that its decoding could not tell: None if nothing."""
        if isinstance(out, protocol.Output) and self.vocab_size is not None and not all(
                0 <= t < self.vocab_size for t in out.token_ids):
            return f"token ids outside the vocabulary [0, {self.vocab_size})"
        return None

    def _reject(self, replica: Replica, problem: str) -> list[protocol.Output]:
        """A worker that sent what no worker of ours sends is trusted no further: dropped if it joined from
        elsewhere, else restarted. Its requests end with an error."""
        who = (f"worker {replica.name!r} (replica {replica.index})" if replica.name is not None
               else f"replica {replica.index} (pid {replica.process.pid})")
        reason = f"{who} sent an invalid message: {problem}"
        return self._drop(replica, reason) if replica.name is not None else self._kill(replica, reason)

    def _drop(self, replica: Replica, reason: str) -> list[protocol.Output]:
        """A joined worker is gone: its replica with it, until its supervisor restarts it and it joins again."""
        log.warning("%s; dropped it", reason)
        self.replicas.remove(replica)
        return self._fail_jobs(replica, reason)

    def _fail_jobs(self, replica: Replica, reason: str) -> list[protocol.Output]:
        failed = [protocol.Output(key, finish_reason="error", error=f"{reason} while running this request")
                  for key in replica.jobs]
        for key in replica.jobs:
            del self.jobs[key]
        replica.jobs.clear()
        return failed


def resolve_model_dir(config: EngineConfig) -> str:
    """The model directory a worker would load, for the tokenizer and the check of joining workers. The
    bundled model (converted on first use) is found by a child process, since that imports torch."""
    if config.model is not None and Path(config.model).expanduser().is_dir():
        return str(Path(config.model).expanduser())
    code = ("import sys\nfrom splitfuse.compiled.loader import resolve_model_dir\n"
            "print(resolve_model_dir(sys.argv[1] or None, sys.argv[2] or None))")
    result = subprocess.run([sys.executable, "-P", "-c", code, config.model or "", config.cache_dir or ""],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else
                         f"cannot find the model {config.model!r}")
    return result.stdout.strip()
