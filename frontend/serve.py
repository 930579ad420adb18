"""`splitfuse.serve(...)`: a persistent deployment (a frontend process and its worker replicas)."""
import json
import select
import subprocess
import sys
import time
from dataclasses import dataclass

from splitfuse.config import EngineConfig


@dataclass(slots=True)
class Deployment:
    """A running server; connect with AsyncClient(deployment.address) or Client(deployment.address)."""
    address: str
    process: subprocess.Popen

    def close(self, timeout: float = 30.0) -> None:
        """Stop the server and its workers (in-flight requests end with an error)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(model: str | None = None, replicas: int = 1, port: int | str | None = None, *, host: str = "127.0.0.1",
          request_timeout: float = 600.0, heartbeat_timeout: float = 30.0, ready_timeout: float = 900.0,
          **engine_options) -> Deployment:
    """Start a frontend server and `replicas` worker processes, each with its own copy of `model`
    (on GPU each on its own device; on CPU they share the cores). Returns once every replica is ready.

    port: None picks a free TCP port on `host`; an int is a TCP port on `host`; a string is a full
    ZeroMQ address such as "tcp://0.0.0.0:5555" or "ipc:///tmp/splitfuse.sock"."""
    config = EngineConfig.from_kwargs(model=model, **engine_options)  # bad options fail here, not in a child
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
    address = port if isinstance(port, str) else f"tcp://{host}:{'*' if port is None else port}"
    options = {"request_timeout": request_timeout, "heartbeat_timeout": heartbeat_timeout,
               "startup_timeout": ready_timeout}
    cmd = [sys.executable, "-m", "splitfuse.frontend.server", "--address", address, "--replicas", str(replicas),
           "--config", json.dumps(config.to_dict()), "--options", json.dumps(options), "--watch-parent"]
    # Its own session, so a Ctrl-C meant for this program does not also hit the server mid-shutdown.
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    deployment = Deployment("", process)
    try:
        deployment.address = _wait_ready(process, ready_timeout)
    except BaseException:
        deployment.close()
        raise
    return deployment


def _wait_ready(process: subprocess.Popen, timeout: float) -> str:
    """The server prints `ready <address>` on stdout once it serves; its progress goes to stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 1.0)[0]:
            line = process.stdout.readline()
            if line.startswith("ready "):
                return line.split(maxsplit=1)[1].strip()
            if not line:
                raise RuntimeError(f"the server exited with code {process.wait()} before it was ready; "
                                   f"its error output is above")
    raise RuntimeError(f"the server was not ready after {timeout:.0f}s")
