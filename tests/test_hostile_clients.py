"""The server under clients and workers that do not play fair: strings that cannot cross to a worker, requests
that ask for more than any queue holds, bodies too large or too slow, connections that never finish, a
descriptor limit reached while a worker dies, and a worker holding the token that sends what no worker
sends. Each refusal is quick and names what to change, and the server keeps serving the others.

Every wait is bounded (a socket timeout, or a loop with a deadline); every process is ended."""
import asyncio
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import zmq

from splitfuse import protocol
from splitfuse.benchmarks.frontend import InstantWorker
from splitfuse.frontend.client import Client
from splitfuse.frontend.http_server import Gate, HttpOptions
from splitfuse.frontend.serve import serve
from starlette.exceptions import HTTPException

KEY = "test-key"
ENGINE = dict(device="cpu", dtype="float32", eager=True, num_blocks=256, max_model_len=512)
LIMITS = dict(max_body_bytes=1 << 20, read_timeout=2.0, max_choices=16, max_messages=64)


@pytest.fixture(scope="module")
def server():
    with serve(http_port=0, api_key=KEY, max_queued_requests=4, http_limits=LIMITS, ready_timeout=300,
               **ENGINE) as deployment:
        yield deployment


def post(url: str, path: str, body, key: str | None = KEY, timeout: float = 20) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data, headers), timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get(url: str, path: str) -> int:
    try:
        with urllib.request.urlopen(url + path, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def test_a_stop_string_that_cannot_be_encoded_is_refused_at_once(server):
    """Before: the request hung until its timeout and counted as queued (429s for everyone else)."""
    for _ in range(3):
        for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 4}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})):
            status, text = post(server.http_url, path, body | {"stop": ["\ud800"]}, timeout=10)
            assert status == 400 and "stop" in json.loads(text)["error"]["message"], text
    status, _ = post(server.http_url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200


def test_requests_that_ask_for_more_than_is_served_get_400(server):
    url = server.http_url
    cases = [("/v1/completions", {"prompt": ["Tell me a story"] * 2000, "max_tokens": 1}, "at most 16"),
             ("/v1/completions", {"prompt": "Hi", "n": 5, "max_tokens": 1}, "queues at most 4"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}] * 2000}, "at most 64"),
             ("/v1/chat/completions", {"messages": [{"role": "root", "content": "Hi"}]}, "role"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "best_of": 2}, "best_of"),
             ("/v1/completions", {"prompt": "Hi", "suffix": "!"}, "suffix"),
             ("/v1/completions", {"prompt": ""}, "prompt")]
    for path, body, expected in cases:
        start = time.monotonic()
        status, text = post(url, path, body)
        assert status == 400 and expected in json.loads(text)["error"]["message"], (body.keys(), text)
        assert time.monotonic() - start < 10
    assert post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_bodies_are_limited_before_they_are_read_or_authenticated(server):
    """A declared 100 MB body is answered at once, unread: 401 without the key (before anything is read), 413
    with it."""
    for key, status in ((None, 401), (KEY, 413)):
        with raw(server.http_url) as sock:
            auth = f"Authorization: Bearer {key}\r\n" if key else ""
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
                         f"Content-Length: 100000000\r\n\r\n".encode())
            assert sock.recv(100).startswith(f"HTTP/1.1 {status}".encode())


@pytest.mark.parametrize("stall, status", [(0.0, 413), (5.0, 408)])
def test_a_body_read_stops_past_its_size_or_its_stall_limit(stall, status):
    """The gate in front of the app, on a body sent in parts without a declared size: its reads stop with 413
    once the parts pass max_body_bytes, or with 408 when a part is read_timeout late."""
    options = HttpOptions(max_body_bytes=1 << 20, read_timeout=1.0)
    parts = iter([{"type": "http.request", "body": b"a" * (512 << 10), "more_body": True}] * 3)

    async def receive():
        await asyncio.sleep(stall)
        return next(parts)

    async def app(scope, receive, send):  # reads the whole body, as FastAPI does before a handler runs
        while (await receive()).get("more_body"):
            pass

    scope = {"type": "http", "path": "/v1/completions", "headers": [(b"transfer-encoding", b"chunked")]}
    with pytest.raises(HTTPException) as refused:
        asyncio.run(Gate(app, options)(scope, receive, None))
    assert refused.value.status_code == status


def test_slow_clients_are_cut_off(server):
    """A body that stalls gets 408 after read_timeout (2 s here); a connection that never finishes its
    request head, or sends nothing, is closed after as long. Before: held as long as the client liked."""
    with raw(server.http_url) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Length: 100\r\n\r\n{{\"prompt\"".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 408")
    for opening in (b"GET /health HTTP/1.1\r\nHost: x\r\n", b""):
        with raw(server.http_url) as sock:
            sock.sendall(opening)
            assert sock.recv(100) == b""  # closed; the socket's 10 s timeout bounds the wait


DESCRIPTOR_SERVER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))
from splitfuse.cli import main
main(sys.argv[1:])
"""


def test_exhausted_descriptors_and_a_worker_kill_leave_the_server_serving(tmp_path):
    """Under a limit of 400 open files, 500 connections that never send a request take no more than the HTTP
    share (the rest is kept for workers and ZeroMQ), and a worker killed meanwhile is restarted. Before: the
    connections used every descriptor and the restart crashed the frontend (EMFILE from os.pipe)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-P", "-c", DESCRIPTOR_SERVER, "serve", "--http-port", str(port),
                               "--port", "0", "--device", "cpu", "--dtype", "float32", "--eager", "--num-blocks", "64",
                               "--max-model-len", "256", "--http-read-timeout", "30"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, idle = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 300
        while not _healthy(url):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        for _ in range(500):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        worker = next(int(line.split("pid ")[1].split(")")[0]) for line in (tmp_path / "server.log").read_text()
                      .splitlines() if "loading" in line and "pid " in line)
        os.kill(worker, signal.SIGKILL)
        time.sleep(3)  # the frontend notices and restarts it, with the connections still held
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        assert post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, key=None)[0] == 200
    finally:
        for sock in idle:
            sock.close()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        log.close()


def _healthy(url: str) -> bool:
    try:
        return get(url, "/health") == 200
    except OSError:
        return False


class FakeWorker(InstantWorker):
    """A worker that holds the token and joins, then answers every request with what `reply` makes of it."""

    def __init__(self, address: str, token: str, reply):
        super().__init__(address, token)
        self.socket.setsockopt(zmq.RCVTIMEO, 500)
        self.reply, self.received = reply, []

    def run(self) -> None:
        self.ready()
        while not self.stop.is_set():
            try:
                msg = protocol.decode(self.socket.recv(), protocol.WORKER_REQUESTS)
            except zmq.Again:
                continue
            self.received.append(msg)
            if isinstance(msg, protocol.Generate):
                self.socket.send(protocol.encode(self.reply(msg)))


def test_a_worker_holding_the_token_cannot_crash_the_frontend(tmp_path):
    """Token id -1 (before: an OverflowError in the frontend's loop, which exited) drops that worker and ends
    its request with an error; so do heartbeat stats that are not counts (before: /metrics answered 500); a
    second ready on one connection is refused (before: welcomed as another replica that never answered)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    bad = FakeWorker(address, token.read_text(), lambda g: protocol.Step([protocol.Output(g.id, [-1])]))
    bad.thread.start()
    try:
        with serve(replicas=0, worker_address=address, worker_token_file=str(token), http_port=0, ready_timeout=120,
                   **ENGINE) as deployment, Client(deployment.address) as client:
            answer = client.complete("Hi", max_new_tokens=2)
            assert answer.finish_reason == "error" and "invalid" in answer.error
            assert deployment.process.poll() is None and get(deployment.http_url, "/metrics") == 200
            bad.close()

            liar = FakeWorker(address, token.read_text(), lambda g: protocol.Error(g.id, "never"))
            liar.ready()
            deadline = time.monotonic() + 30
            while not any(isinstance(m, protocol.Welcome) for m in _drain(liar, liar.received)):
                assert time.monotonic() < deadline, "the fake worker was not welcomed"
            liar.ready()  # again, on the same connection
            deadline = time.monotonic() + 30
            while not any(isinstance(m, protocol.Refuse) for m in _drain(liar, liar.received)):
                assert time.monotonic() < deadline, "a second ready was not refused"
            liar.socket.send(protocol.encode(protocol.Heartbeat({"blocks_total": "many", "running": "lots"})))
            deadline = time.monotonic() + 30
            while client.stats()["replicas"]:
                assert time.monotonic() < deadline, "the worker with bad stats was not dropped"
                time.sleep(0.2)
            assert get(deployment.http_url, "/metrics") == 200 and deployment.process.poll() is None
            liar.socket.close()
    finally:
        bad.close()


def _drain(worker: FakeWorker, into: list) -> list:
    try:
        into.append(protocol.decode(worker.socket.recv(), protocol.WORKER_REQUESTS))
    except zmq.Again:
        pass
    return into


def test_the_openapi_document_says_what_the_server_answers(server):
    """Refusals are OpenAI error objects with the statuses given (FastAPI would document 422), and /metrics is
    Prometheus text (it would be documented as JSON)."""
    with urllib.request.urlopen(server.http_url + "/openapi.json", timeout=10) as response:
        document = json.loads(response.read())
    assert "422" not in json.dumps(document["paths"])
    completions = document["paths"]["/v1/completions"]["post"]["responses"]
    assert {"400", "401", "413", "429"} <= set(completions)
    assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert list(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    status, text = post(server.http_url, "/v1/completions", {"prompt": "Hi", "max_tokens": 0})
    assert status == 400 and set(json.loads(text)["error"]) == {"message", "type", "param", "code"}


def test_the_document_bounds_what_the_server_checks(server):
    """Token ids are bounded by this model's vocabulary, a field with a default may be null, integers are
    JSON's (2.0 is one, true is not), and streams are documented as server-sent events."""
    with urllib.request.urlopen(server.http_url + "/openapi.json", timeout=10) as response:
        document = json.loads(response.read())
    schemas = document["components"]["schemas"]
    vocab_size = json.loads(post(server.http_url, "/v1/completions", {"prompt": [10**6]})[1])["error"]["message"]
    token_ids = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"][1]["items"]
    assert f"[0, {token_ids['maximum'] + 1})" in vocab_size
    assert post(server.http_url, "/v1/completions", {"prompt": [token_ids["maximum"]], "max_tokens": 1})[0] == 200
    keys = schemas["CompletionRequest"]["properties"]["logit_bias"]["anyOf"][0]["propertyNames"]["pattern"]
    top = token_ids["maximum"]
    assert [n for n in range(top + 1000) if re.fullmatch(keys, str(n))] == list(range(top + 1))
    assert not re.fullmatch(keys, "007")
    assert post(server.http_url, "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "logit_bias": {str(top): 1}})[0] == 200
    assert {"type": "null"} in schemas["CompletionRequest"]["properties"]["echo"]["anyOf"]
    assert post(server.http_url, "/v1/completions", {"prompt": "Hi", "echo": None, "n": 2.0, "max_tokens": 1})[0] == 200
    for wrong in ({"n": True}, {"echo": 1}, {"temperature": "1"}, {"max_tokens": 1.5}):
        assert post(server.http_url, "/v1/completions", {"prompt": "Hi"} | wrong)[0] == 400, wrong
    answers = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in answers
    # min_tokens beyond max_tokens is capped (the document cannot relate two fields); completions stop at
    # OpenAI's default of 16 tokens.
    status, text = post(server.http_url, "/v1/completions", {"prompt": "Hi", "min_tokens": 8, "max_tokens": 2})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 2
    status, text = post(server.http_url, "/v1/completions", {"prompt": "Hi", "ignore_eos": True})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 16
