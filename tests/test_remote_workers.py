"""Workers started by themselves (`splitfuse worker --connect`) join a running frontend over loopback TCP.

The model is a tiny random Llama given the bundled model's tokenizer files, so that workers load in
seconds; prompts are token ids below its vocabulary of 128. Every wait is bounded, and every process
a test starts is killed at the end of the module."""
import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from splitfuse import protocol
from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.config import model_fingerprint
from splitfuse.frontend.client import AsyncClient, Client
from splitfuse.frontend.serve import serve

ENGINE = dict(device="cpu", eager=True, dtype="float32", num_blocks=64)
PROMPT = [1, 5, 9, 20, 33]  # shorter than a block: routed by load alone, not by prefix
LONG = dict(max_new_tokens=240, ignore_eos=True)  # seconds of steps, as the model's length allows
# Both sides' heartbeat timeouts, long: this machine may pause the tests' processes for a while. A killed
# worker is noticed at once all the same, when a heartbeat cannot be sent to it.
HEARTBEAT_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def model(make_checkpoint, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama-with-tokenizer")
    shutil.copytree(make_checkpoint("llama"), path, dirs_exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundled_model_dir() / name, path / name)
    return str(path)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(secrets.token_hex(32))
    return str(path)


class Workers:
    """`splitfuse worker` processes, started as a user or a supervisor would; each logs to its own file."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.processes: list[subprocess.Popen] = []

    def start(self, address: str, token_file: str, model: str, name: str, *options: str) -> subprocess.Popen:
        with open(self.logs / f"{name}-{len(self.processes)}.log", "w") as log:
            process = subprocess.Popen([sys.executable, "-P", "-m", "splitfuse.cli", "worker", "--connect", address,
                                        "--token-file", token_file, "--name", name, "--model", model, "--device", "cpu", "--eager",
                                        "--dtype", "float32", "--num-blocks", "64",
                                        "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), *options],
                                       stdout=subprocess.DEVNULL, stderr=log)
        process.log = Path(log.name)
        self.processes.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    started = Workers(tmp_path_factory.mktemp("worker-logs"))
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture(scope="module")
def frontend(model, token_file):
    """One replica of its own, and a TCP address where workers join."""
    with serve(model=model, worker_address="tcp://127.0.0.1:*", worker_token_file=token_file, ready_timeout=300,
               heartbeat_timeout=HEARTBEAT_TIMEOUT, **ENGINE) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def joined(frontend, workers, model, token_file) -> subprocess.Popen:
    """Worker "w1", joined to the frontend."""
    worker = workers.start(frontend.worker_address, token_file, model, "w1")
    run(until(lambda client: replica_named(client, "w1"), frontend.address, "worker w1 to join"))
    return worker


def run(coroutine, timeout: float = 300):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def until(condition, address: str, what: str, timeout: float = 300):
    """Ask `condition(client)` every 0.1 s until it gives something truthy, which is returned."""
    async with AsyncClient(address) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := await condition(client):
                return value
            await asyncio.sleep(0.1)
    pytest.fail(f"gave up after {timeout:.0f}s waiting for {what}")


async def replica_named(client: AsyncClient, name: str | None) -> dict | None:
    return next((r for r in (await client.stats())["replicas"] if r["name"] == name and r["ready"]), None)


def test_a_joined_worker_gives_the_same_greedy_tokens_as_the_local_replica(frontend, joined):
    async def answers():
        async with AsyncClient(frontend.address) as client:
            # Four at once: least-outstanding routing gives each replica two.
            return (await asyncio.gather(*(client.complete(PROMPT, max_new_tokens=24, ignore_eos=True)
                                           for _ in range(4)))), await client.stats()

    responses, stats = run(answers())
    assert all(r.finish_reason == "length" and r.token_ids == responses[0].token_ids for r in responses)
    assert len(responses[0].token_ids) == 24
    served = {r["name"]: r["served"] for r in stats["replicas"]}
    assert served[None] >= 1 and served["w1"] >= 1, served  # None: the frontend's own replica


def test_a_killed_worker_errors_its_requests_and_a_restarted_one_joins_and_serves(frontend, joined, workers, model,
                                                                                 token_file):
    async def scenario():
        async with AsyncClient(frontend.address) as client:
            started = [asyncio.Event(), asyncio.Event()]

            async def consume(i: int):
                async for delta in client.generate(PROMPT, **LONG):
                    started[i].set()
                return delta

            tasks = [asyncio.create_task(consume(i)) for i in range(2)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            victim = await replica_named(client, "w1")
            assert victim["in_flight"] == 1, "least-outstanding routing gives each replica one of the two"
            os.kill(victim["pid"], signal.SIGKILL)
            finals = sorted(await asyncio.wait_for(asyncio.gather(*tasks), 60), key=lambda d: d.finish_reason)
            assert [d.finish_reason for d in finals] == ["error", "length"]  # the local replica's went on
            assert "worker 'w1'" in finals[0].error and "disconnected" in finals[0].error, finals[0].error
            assert await replica_named(client, "w1") is None  # dropped

            workers.start(frontend.worker_address, token_file, model, "w1")  # as its supervisor would
            rejoined = await until(lambda c: replica_named(c, "w1"), frontend.address, "w1 to join again")
            assert rejoined["replica"] != victim["replica"] and rejoined["pid"] != victim["pid"]
            answers = await asyncio.gather(*(client.complete(PROMPT, max_new_tokens=8, ignore_eos=True)
                                             for _ in range(4)))
            assert all(a.finish_reason == "length" and a.error is None for a in answers)
            assert (await replica_named(client, "w1"))["served"] >= 1

    assert joined.poll() is None
    run(scenario())
    assert joined.wait(10) == -signal.SIGKILL


def test_a_process_without_the_token_is_refused_and_gets_no_requests(frontend, model):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(frontend.worker_address)
    try:  # everything right but the token
        sock.send(protocol.encode(protocol.Ready(-1, os.getpid(), model, 256, secrets.token_hex(32), "impostor",
                                                 model_fingerprint(model), 16)))
        answer = protocol.decode(sock.recv(), protocol.WORKER_REQUESTS)
        assert isinstance(answer, protocol.Refuse) and not answer.retry and "token" in answer.error, answer
        sock.send(protocol.encode(protocol.Heartbeat({})))  # as if it had joined: it still has not
        answer = protocol.decode(sock.recv(), protocol.WORKER_REQUESTS)
        assert isinstance(answer, protocol.Refuse) and "does not know this worker" in answer.error, answer
        with Client(frontend.address) as client:
            assert all(client.complete(PROMPT, max_new_tokens=4).finish_reason == "length" for _ in range(4))
            assert "impostor" not in {r["name"] for r in client.stats()["replicas"]}
        assert not sock.poll(500)  # no request was sent to it
    finally:
        sock.close()


def test_a_worker_with_another_model_or_length_is_refused_and_exits_with_an_error(
        frontend, workers, model, token_file, make_checkpoint):
    cases = {  # name: (its model, options, what the refusal says); another token: the test above
        "bad-model": (str(make_checkpoint("qwen2")), (), "is not the frontend's"),
        "bad-length": (model, ("--max-model-len", "128"), "maximum model length is 128"),
    }
    started = {name: workers.start(frontend.worker_address, token_file, m, name, *options)
               for name, (m, options, _) in cases.items()}
    for name, process in started.items():
        assert process.wait(300) == 1, name
        log = process.log.read_text()
        assert f"worker {name!r}: the frontend at {frontend.worker_address} refused it" in log, log
        assert cases[name][2] in log, log
    with Client(frontend.address) as client:
        assert not set(cases) & {r["name"] for r in client.stats()["replicas"]}


def test_a_frontend_without_replicas_serves_once_a_worker_joins_and_refuses_while_none_is_up(
        frontend, workers, model, token_file):
    with socket.socket() as s:  # a free port, for a frontend that is not up yet
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    worker = workers.start(address, token_file, model, "only")  # before the frontend: it keeps trying
    with serve(model=model, replicas=0, worker_address=address, worker_token_file=token_file, ready_timeout=300,
               heartbeat_timeout=HEARTBEAT_TIMEOUT, **ENGINE) as deployment, \
            Client(deployment.address) as client, Client(frontend.address) as other:
        answer = client.complete(PROMPT, max_new_tokens=24, ignore_eos=True)
        assert answer.token_ids == other.complete(PROMPT, max_new_tokens=24, ignore_eos=True).token_ids
        assert [r["name"] for r in client.stats()["replicas"]] == ["only"]
        worker.kill()
        run(until(_no_replicas, deployment.address, "the killed worker to be dropped"))
        assert client.health()["ok"] is False
        with pytest.raises(ValueError, match="no replica is ready"):
            client.complete(PROMPT, max_new_tokens=4)


async def _no_replicas(client: AsyncClient) -> bool:
    return not (await client.stats())["replicas"]


def test_with_curve_only_a_worker_whose_key_is_listed_joins_and_gets_requests(model, token_file, tmp_path):
    keys, listed = tmp_path / "keys", tmp_path / "listed"
    keys.mkdir(), listed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    worker_public, worker_secret = zmq.auth.create_certificates(keys, "worker")
    shutil.copy(worker_public, listed)
    _, other_secret = zmq.auth.create_certificates(keys, "other")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    # Raw joining workers, all with the token: one with the listed key, one with another key, one without CURVE.
    sockets = {name: _joining(address, token_file, model, name, server_public, secret)
               for name, secret in (("listed", worker_secret), ("unlisted", other_secret), ("plain", None))}
    try:
        with serve(model=model, replicas=0, worker_address=address, worker_token_file=token_file,
                   worker_curve_secret=server_secret, worker_curve_clients=str(listed), ready_timeout=300,
                   heartbeat_timeout=HEARTBEAT_TIMEOUT, **ENGINE) as deployment, Client(deployment.address) as client:
            assert isinstance(_next(sockets["listed"], protocol.Welcome), protocol.Welcome)
            assert [r["name"] for r in client.stats()["replicas"]] == ["listed"]
            answers = []
            asking = threading.Thread(target=lambda: answers.append(client.complete(PROMPT, max_new_tokens=2)))
            asking.start()
            request = _next(sockets["listed"], protocol.Generate)
            assert request.prompt_ids == PROMPT
            sockets["listed"].send(protocol.encode(protocol.Step([protocol.Output(request.id, [7, 8], "length",
                                                                                  num_cached_tokens=0)])))
            asking.join(60)
            assert answers[0].token_ids == [7, 8]
            assert not sockets["unlisted"].poll(1000) and not sockets["plain"].poll(0)  # their handshakes failed
    finally:
        for sock in sockets.values():
            sock.close()


def _joining(address: str, token_file: str, model: str, name: str, server_public: str,
             secret_cert: str | None) -> zmq.Socket:
    """A DEALER that says ready as a joining worker would (sent once connected)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.setsockopt(zmq.LINGER, 0)
    if secret_cert is not None:
        sock.curve_serverkey = zmq.auth.load_certificate(server_public)[0]
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(secret_cert)
    sock.connect(address)
    sock.send(protocol.encode(protocol.Ready(-1, os.getpid(), model, 256, Path(token_file).read_text(), name,
                                             model_fingerprint(model), 16)))
    return sock


def _next(sock: zmq.Socket, kind: type):
    """The next message of this kind to a joined worker, past the frontend's heartbeats."""
    while not isinstance(msg := protocol.decode(sock.recv(), protocol.WORKER_REQUESTS), kind):
        assert isinstance(msg, protocol.Heartbeat), msg
    return msg
