"""The worker replicas: the processes this frontend starts and restarts, and the workers started
elsewhere that join it. `Supervisor` owns the sockets they talk on, admits them, and tells the
router what happened to them as events (Serving, Outputs, Lost); which replica runs a request is the
router's business (router.py). Workers run `python -m splitfuse.worker.main`, so this module never
imports torch.

Nobody else can take a worker's place: the local socket is an `ipc://` file in a directory only this
user can enter (removed on close), and a worker's `ready` must carry the secret the supervisor gave
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
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from splitfuse import protocol
from splitfuse.config import EngineConfig, model_fingerprint, read_token_file
from splitfuse.frontend.curve import CurveOptions, curve_server

if TYPE_CHECKING:
    from splitfuse.frontend.router import Job

log = logging.getLogger(__name__)

MAX_RESTART_DELAY = 30.0  # seconds between restarts of a worker that keeps dying while it loads
HEARTBEAT_INTERVAL = 1.0  # seconds between the heartbeats sent to joined workers
PREFIX_MAP_BLOCKS = 1 << 16  # prompt blocks remembered per replica until its heartbeat tells its cache size


def worker_env() -> dict[str, str]:
    """This process's environment, with glibc's malloc asking for transparent huge pages (where the kernel gives
    them on request, "madvise"): a prompt step's activations, tens of MB, then miss the TLB far less. The
    peers' offline workload through pipeline() ran 1.01-1.03x as fast in three alternating pairs (Xeon with AMX,
    bf16). A setting of the user's is kept."""
    env = dict(os.environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
    return env


@dataclass(slots=True)
class RemoteWorkers:
    """Where workers started on other machines join (`splitfuse worker --connect ADDRESS`), e.g.
    "tcp://0.0.0.0:5601", the file holding the token they must present (the same file on each), and
    optionally CURVE: the link encrypted, and only workers whose public certificate is listed connect."""
    address: str
    token_file: str
    curve: CurveOptions | None = None


@dataclass(slots=True, eq=False)
class Replica:
    """One worker as the router sees it: whether it serves, and the requests and prompt blocks it was sent."""
    index: int
    socket: zmq.Socket | None = None   # the one its worker is reached on
    identity: bytes | None = None      # the live worker's socket identity, once it said ready
    pid: int | None = None
    last_seen: float = 0.0
    restarts: int = 0
    served: int = 0
    engine_stats: dict = field(default_factory=dict)
    jobs: "dict[str, Job]" = field(default_factory=dict)
    prefixes: OrderedDict[int, None] = field(default_factory=OrderedDict)  # prompt blocks sent here, LRU

    @property
    def ready(self) -> bool:
        return self.identity is not None

    @property
    def name(self) -> str | None:
        """A joined worker's name; None for the frontend's own processes."""
        return None

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


@dataclass(slots=True, eq=False)
class LocalReplica(Replica):
    """A worker process of this frontend's own, restarted whenever it dies or hangs."""
    process: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float = 0.0            # when a dead worker is started again
    failures: int = 0                  # deaths in a row before becoming ready, for the back-off

    def __str__(self) -> str:
        return f"replica {self.index} (pid {self.pid})"


@dataclass(slots=True, eq=False)
class JoinedReplica(Replica):
    """A worker started elsewhere that joined; dropped when it goes, and its supervisor restarts it."""
    worker_name: str = ""

    @property
    def name(self) -> str | None:
        return self.worker_name

    def __str__(self) -> str:
        return f"worker {self.worker_name!r} (replica {self.index})"


# --- what the supervisor tells the router -------------------------------------------------------------------

@dataclass(slots=True)
class Serving:
    """A replica said ready: it takes requests now."""
    replica: Replica


@dataclass(slots=True)
class Outputs:
    """What a replica's worker sent about its requests."""
    replica: Replica
    outputs: list[protocol.Output | protocol.Error]


@dataclass(slots=True)
class Lost:
    """A replica's worker is gone (restarted if it was ours, dropped if it joined): its requests end."""
    replica: Replica
    reason: str


Event = Serving | Outputs | Lost


class Supervisor:
    def __init__(self, config: EngineConfig, replicas: int = 1, *, heartbeat_timeout: float = 30.0,
                 startup_timeout: float = 900.0, remote: RemoteWorkers | None = None):
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < (0 if remote else 1):
            raise ValueError(f"replicas must be a positive integer (0 only when workers join from elsewhere), "
                             f"got {replicas!r}")
        self.config = config
        self.heartbeat_timeout = heartbeat_timeout
        self.startup_timeout = startup_timeout
        self.model_dir: str | None = None      # the frontend's copy of the model: its tokenizer's files
        self.remote_socket = self.remote_address = self._authenticator = None
        if remote is not None:
            self._listen(remote, replicas)
        self.socket = _worker_socket(zmq.Context.instance())
        self._dir = tempfile.mkdtemp(prefix="splitfuse-")  # mode 0700: other users cannot connect
        self.address = f"ipc://{self._dir}/workers"
        self.socket.bind(self.address)
        self._secret = secrets.token_hex(32)
        self.replicas: list[Replica] = [LocalReplica(i, self.socket) for i in range(replicas)]
        self.local_replicas = replicas
        self.started = False
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
        self.remote_socket = _worker_socket(zmq.Context())
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
                for event in self.receive():  # nothing was routed yet: only a lost replica of ours matters
                    if isinstance(event, Lost) and isinstance(event.replica, LocalReplica):
                        raise RuntimeError(f"{event.reason} while the replicas were loading")
        self.started = True

    def send(self, replica: Replica, msg: protocol.Message) -> bool:
        """False if the worker is gone (then check() reports it lost)."""
        try:
            replica.socket.send_multipart([replica.identity, protocol.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def receive(self) -> list[Event]:
        """Drain the worker sockets."""
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

    def check(self) -> list[Event]:
        """Find dead or hung workers: restart ours, drop joined ones. Joined workers get their heartbeat here."""
        now, events = time.monotonic(), []
        beat = self.remote_socket is not None and now >= self._next_beat
        if beat:
            self._next_beat = now + HEARTBEAT_INTERVAL
        for r in list(self.replicas):
            if isinstance(r, JoinedReplica):
                if beat and not self.send(r, protocol.Heartbeat({})):
                    events.append(self._drop(r, f"{r} disconnected"))
                elif now - r.last_seen > self.heartbeat_timeout:
                    events.append(self._drop(r, f"{r} sent no heartbeat for {self.heartbeat_timeout:.0f}s"))
            elif r.process is None:
                if now >= r.restart_at:
                    self._respawn(r)
            elif r.process.poll() is not None:
                events.append(self._lost(r, f"{r} exited with code {r.process.returncode}"))
            elif r.ready and now - r.last_seen > self.heartbeat_timeout:
                events.append(self._kill(r, f"{r} sent no heartbeat for {self.heartbeat_timeout:.0f}s"))
            elif not r.ready and now - r.started > self.startup_timeout:
                events.append(self._kill(r, f"{r} was not ready after {self.startup_timeout:.0f}s"))
        return events

    def stats(self) -> list[dict]:
        return [r.summary() for r in self.replicas]

    def close(self, timeout: float = 10.0) -> None:
        """SIGTERM every worker (they exit cleanly between steps), SIGKILL what is left after `timeout`.
        Joined workers are told instead: they drop their requests and wait to join the next frontend."""
        local = [r for r in self.replicas if isinstance(r, LocalReplica) and r.process is not None]
        for r in self.replicas:
            if isinstance(r, JoinedReplica):
                self.send(r, protocol.Refuse("the frontend is stopping", True))
        for r in local:
            if r.process.poll() is None:
                r.process.terminate()
        deadline = time.monotonic() + timeout
        for r in local:
            try:
                r.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.process.kill()
                r.process.wait()
        self.socket.close()
        if self.remote_socket is not None:
            self._close_remote(linger=1000)  # time for those messages to leave
        shutil.rmtree(self._dir, ignore_errors=True)

    def _on_message(self, socket: zmq.Socket, identity: bytes, frame: zmq.Frame) -> list[Event]:
        replica = next((r for r in self.replicas if r.identity == identity), None)
        try:
            msg = protocol.decode(frame.bytes, protocol.WORKER_REPLIES)
        except protocol.ProtocolError as e:
            if replica is None:
                log.warning("router: dropped a message from an unknown worker: %s", e)
                return []
            return [self._reject(replica, str(e))]
        if isinstance(msg, protocol.Ready):
            serving = self._on_ready(identity, msg) if socket is self.socket else \
                self._on_join(identity, msg, frame.get("Peer-Address"))
            return [] if serving is None else [Serving(serving)]
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
        if self.vocab_size is not None and not all(0 <= t < self.vocab_size for out in outputs
                                                   if isinstance(out, protocol.Output) for t in out.token_ids):
            return [self._reject(replica, f"token ids outside the vocabulary [0, {self.vocab_size})")]
        return [Outputs(replica, outputs)]

    def _on_ready(self, identity: bytes, msg: protocol.Ready) -> Replica | None:
        if not hmac.compare_digest(msg.secret.encode(), self._secret.encode()):
            log.warning("router: ignored a ready message without this frontend's secret")
            return None
        replica = self.replicas[msg.replica] if 0 <= msg.replica < self.local_replicas else None
        if replica is None or replica.process is None or replica.process.pid != msg.pid:
            return None  # a stale instance
        replica.identity, replica.last_seen, replica.failures = identity, time.monotonic(), 0
        return self._serving(replica, msg)

    def _on_join(self, identity: bytes, msg: protocol.Ready, peer: str) -> Replica | None:
        """A worker started elsewhere says ready: it becomes a replica, or is told why not."""
        joined = any(r.identity == identity for r in self.replicas)
        refusal = protocol.Refuse("this connection has joined already", False) if joined else self._refusal(msg)
        if refusal is not None:
            log.warning("router: refused a worker from %s (name %r): %s", peer, msg.name, refusal.error)
            self._reply(identity, refusal)
            return None
        replica = JoinedReplica(self._next_index, self.remote_socket, identity=identity, pid=msg.pid,
                                last_seen=time.monotonic(), worker_name=msg.name)
        self._next_index += 1
        self.replicas.append(replica)
        self._reply(identity, protocol.Welcome(replica.index))
        log.info("router: worker %r from %s joined as replica %d", msg.name, peer, replica.index)
        return self._serving(replica, msg)

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

    def _serving(self, replica: Replica, msg: protocol.Ready) -> Replica:
        """The first ready replica sets the model's length."""
        self.info = self.info or msg
        self.model_dir = self.model_dir or msg.model_dir
        return replica

    def _respawn(self, replica: LocalReplica) -> None:
        """A restart that fails (no descriptors or memory left, say) is tried again later, never raised."""
        try:
            self._spawn(replica)
        except OSError as e:
            replica.failures += 1
            replica.restart_at = time.monotonic() + min(2.0 ** replica.failures, MAX_RESTART_DELAY)
            log.warning("replica %d could not be started (%s); trying again in %.0fs", replica.index, e,
                        replica.restart_at - time.monotonic())

    def _spawn(self, replica: LocalReplica) -> None:
        cmd = [sys.executable, "-P", "-m", "splitfuse.worker.main", "--address", self.address,
               "--replica", str(replica.index), "--replicas", str(self.local_replicas), "--threads", str(self._threads),
               "--config", self.config.to_json(), "--parent-pid", str(os.getpid())]
        # Its own session: a terminal's Ctrl-C reaches only the frontend, which then stops the workers.
        replica.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, start_new_session=True, env=worker_env())
        replica.pid, replica.started = replica.process.pid, time.monotonic()
        try:  # on a pipe, not the command line, which every local user can read
            replica.process.stdin.write(self._secret.encode() + b"\n")
            replica.process.stdin.close()
        except BrokenPipeError:
            pass  # it died at once: check() notices

    def _reply(self, identity: bytes, msg: protocol.Welcome | protocol.Refuse) -> None:
        try:
            self.remote_socket.send_multipart([identity, protocol.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # it left already

    def _reject(self, replica: Replica, problem: str) -> Lost:
        """A worker that sent what no worker of ours sends is trusted no further: dropped if it joined from
        elsewhere, else restarted."""
        reason = f"{replica} sent an invalid message: {problem}"
        return self._drop(replica, reason) if isinstance(replica, JoinedReplica) else self._kill(replica, reason)

    def _kill(self, replica: LocalReplica, reason: str) -> Lost:
        replica.process.kill()
        replica.process.wait()
        return self._lost(replica, reason)

    def _lost(self, replica: LocalReplica, reason: str) -> Lost:
        log.warning("%s; restarting it", reason)
        replica.failures = 0 if replica.ready else replica.failures + 1
        replica.restart_at = time.monotonic() + min(2.0 ** replica.failures - 1, MAX_RESTART_DELAY)
        replica.identity = replica.process = replica.pid = None
        replica.engine_stats, replica.prefixes = {}, OrderedDict()  # the dead process's counters and cache
        replica.restarts += 1
        return Lost(replica, reason)

    def _drop(self, replica: JoinedReplica, reason: str) -> Lost:
        """A joined worker is gone: its replica with it, until its supervisor restarts it and it joins again."""
        log.warning("%s; dropped it", reason)
        self.replicas.remove(replica)
        return Lost(replica, reason)


def _worker_socket(context: zmq.Context) -> zmq.Socket:
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a dead worker fails instead of vanishing
    socket.setsockopt(zmq.SNDHWM, 0)            # an internal link: never drop a request or output
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.LINGER, 0)
    return socket


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
