"""`splitfuse.serve(...)`: a persistent deployment (a frontend process and its worker replicas)."""
import json
import select
import subprocess
import sys
import time
from dataclasses import dataclass

from splitfuse.config import EngineConfig
from splitfuse.frontend.core import MAX_QUEUED_REQUESTS

STOP_GRACE = 15.0  # seconds a server gets to stop its workers after its drain


@dataclass(slots=True)
class Deployment:
    """A running server. Connect with AsyncClient(deployment.address) or Client(deployment.address) over
    ZeroMQ, or with any OpenAI client at `http_url + "/v1"` when it serves HTTP."""
    address: str | None
    process: subprocess.Popen
    http_url: str | None = None
    shutdown_timeout: float = 30.0
    worker_address: str | None = None   # where workers started elsewhere join, when they may

    def close(self) -> None:
        """Stop the server and its workers (SIGTERM: in-flight requests get up to its shutdown_timeout
        to finish, then end with an error; the server is killed if it has not exited some time after)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.shutdown_timeout + STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(model: str | None = None, replicas: int = 1, port: int | str | None = None, *, host: str = "127.0.0.1",
          zmq: bool = True, http_port: int | None = None, api_key: str | None = None,
          served_model_name: str | None = None, curve_secret: str | None = None, curve_clients: str | None = None,
          request_timeout: float = 600.0, http_limits: dict | None = None, tool_call_parser: str = "hermes",
          max_queued_requests: int | None = MAX_QUEUED_REQUESTS, max_queued_tokens: int | None = None,
          shutdown_timeout: float = 30.0, heartbeat_timeout: float = 30.0, ready_timeout: float = 900.0,
          worker_address: str | None = None, worker_token_file: str | None = None,
          worker_curve_secret: str | None = None, worker_curve_clients: str | None = None,
          **engine_options) -> Deployment:
    """Start a frontend server and `replicas` worker processes, each with its own copy of `model`
    (on GPU each on its own device; on CPU they share the cores). Returns once every replica is ready.

    port: None picks a free TCP port on `host`; an int is a TCP port on `host`; a string is a full
    ZeroMQ address such as "tcp://0.0.0.0:5555" or "ipc:///tmp/splitfuse.sock". zmq=False: no ZeroMQ socket.
    http_port: also serve the OpenAI-compatible HTTP API on `host` (0: a free port), requiring
    `Authorization: Bearer <api_key>` when api_key is set; clients name the model `served_model_name`
    (default: the model directory's name). curve_secret, curve_clients: encrypt the ZeroMQ socket with
    this server's secret certificate and admit only the clients whose public certificates are in the
    curve_clients directory (see CurveKeys in frontend/client.py). http_limits: HttpOptions' limits
    (max_body_bytes, read_timeout, max_connections, keep_alive, max_choices, max_messages) where the
    defaults do not suit. tool_call_parser: how the model writes tool calls, "hermes" or "llama3_json"
    (frontend/tools.py). max_queued_requests / max_queued_tokens: requests (prompt tokens) waiting for
    their first token beyond which new ones are refused (HTTP 429); None: no limit. worker_address, worker_token_file: where workers started on other machines
    (`splitfuse worker --connect`) join, e.g. "tcp://0.0.0.0:5601", and the file of the token they must
    present; with them `replicas` may be 0, and then this returns once the first worker has joined.
    worker_curve_secret, worker_curve_clients: encrypt that link too, and admit only the workers whose
    public certificates are in that directory (this server's certificate may be the clients' one)."""
    config = EngineConfig.from_kwargs(model=model, **engine_options)  # bad options fail here, not in a child
    if (worker_address is None) != (worker_token_file is None):
        raise ValueError("workers that join from elsewhere need both worker_address and worker_token_file")
    if not isinstance(replicas, int) or replicas < (0 if worker_address else 1):
        raise ValueError(f"replicas must be a positive integer (0 only with a worker_address), got {replicas!r}")
    address = port if isinstance(port, str) else f"tcp://{host}:{'*' if port is None else port}"
    options = {"request_timeout": request_timeout, "heartbeat_timeout": heartbeat_timeout,
               "startup_timeout": ready_timeout, "max_queued_requests": max_queued_requests,
               "max_queued_tokens": max_queued_tokens, "shutdown_timeout": shutdown_timeout}
    cmd = [sys.executable, "-P", "-m", "splitfuse.frontend.server", "--address", address if zmq else "none",
           "--replicas", str(replicas), "--config", config.to_json(), "--options", json.dumps(options),
           "--watch-parent"]
    if curve_secret is not None or curve_clients is not None:
        cmd += ["--curve", json.dumps({"server_secret_file": curve_secret, "clients_dir": curve_clients})]
    if worker_address is not None:
        curve = ({"server_secret_file": worker_curve_secret, "clients_dir": worker_curve_clients}
                 if worker_curve_secret is not None or worker_curve_clients is not None else None)
        cmd += ["--remote", json.dumps({"address": worker_address, "token_file": worker_token_file, "curve": curve})]
    if http_port is not None:
        cmd += ["--http", json.dumps({"host": host, "port": http_port, "api_key": api_key,
                                      "model_name": served_model_name, "tool_call_parser": tool_call_parser,
                                      **(http_limits or {})})]
    # Its own session, so a Ctrl-C meant for this program does not also hit the server mid-shutdown.
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    deployment = Deployment(None, process, shutdown_timeout=shutdown_timeout)
    try:
        where = wait_ready(process, ready_timeout)
    except BaseException:
        deployment.close()
        raise
    deployment.address, deployment.http_url = where["address"], where["http_url"]
    deployment.worker_address = where["worker_address"]
    return deployment


def wait_ready(process: subprocess.Popen, timeout: float) -> dict:
    """The server prints `ready {"address": ..., "http_url": ...}` on stdout once it serves; its progress
    goes to stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 1.0)[0]:
            line = process.stdout.readline()
            if line.startswith("ready "):
                return json.loads(line.split(maxsplit=1)[1])
            if not line:
                raise RuntimeError(f"the server exited with code {process.wait()} before it was ready; "
                                   f"its error output is above")
    raise RuntimeError(f"the server was not ready after {timeout:.0f}s")
