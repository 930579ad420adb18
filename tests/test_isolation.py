"""A request can only hurt itself (issue 14): poison and nonsense parameters are refused, a step that
raises fails only its requests, nobody else can take a worker's place, one client's prompt cannot
stall the others, and clients notice a dead server (the routing cap is in test_router.py).

The tests over a real server share one deployment: a frontend process (with one hook: the prompt
SLOW takes seconds to tokenize) and one worker replica of the bundled model. Each numbered failure
of the issue has a test here that fails on the code before it was fixed."""
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

from splitfuse import protocol
from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.frontend.client import AsyncClient, Client
from splitfuse.frontend.replicas import Supervisor
from splitfuse.frontend.router import Router
from splitfuse.frontend.serve import Deployment, wait_ready
from splitfuse.frontend.tokenizer import Tokenizer
from splitfuse.worker.engine import Engine

ENGINE = dict(device="cpu", eager=True, num_blocks=256, max_model_len=512)
VOCAB = 49152  # the bundled model's
SLOW = "tokenize me slowly"
PROBE = "probe"
FRONTEND = f"""
import sys, time
from splitfuse.frontend import server, tokenizer
encode_prompt = tokenizer.Tokenizer.encode_prompt
def slow(self, params, **prompt):
    if prompt.get("prompt") == {SLOW!r}:
        time.sleep(5)  # stands in for tokenizing a long prompt
    return encode_prompt(self, params, **prompt)
tokenizer.Tokenizer.encode_prompt = slow
server.main(sys.argv[1:])
"""


def run(coroutine, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


# --- 2. values that make nonsense are refused on every entry point -------------------------------

@pytest.mark.parametrize("params, words", [
    (dict(presence_penalty=float("nan")), "presence_penalty must be in"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty must be in"),
    (dict(do_sample=True, temperature=1e-300), "temperature must be 0 (greedy) or in [0.01"),
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(do_sample=True, top_k=2**63), "top_k must be an integer in"),
    (dict(seed=2**70), "seed must be an integer in [0, 2**63)"),
    (dict(seed=True), "seed must be an integer"),
    (dict(max_new_tokens=10**20), "max_new_tokens must be an integer in"),
    (dict(repetition_penalty=1e-300), "repetition_penalty must be in"),
    (dict(do_sample="yes"), "do_sample must be true or false"),
    (dict(stop=["x"] * 100_000), "at most 16 strings"),
    (dict(stop=["x" * 1000]), "each of 1 to 256 characters"),
    (dict(stop_token_ids=list(range(1000))), "at most 256"),
    (dict(stop_token_ids=7), "stop_token_ids must be a list"),
])
def test_nonsense_sampling_values_are_a_value_error_also_through_the_async_client(params, words):
    with pytest.raises(ValueError) as info:
        SamplingParams(**params)
    assert words in str(info.value)

    async def through_the_client():
        async with AsyncClient("tcp://127.0.0.1:9") as client:  # refused before anything is sent
            with pytest.raises(ValueError, match="must be"):
                await client.complete("hi", **params)

    run(through_the_client(), timeout=10)


def test_the_frontend_tokenizer_refuses_what_the_model_cannot_take():
    # What the server and splitfuse.pipeline both check before a worker sees the request.
    tokenizer = Tokenizer(bundled_model_dir(), max_model_len=512)
    params = SamplingParams()
    with pytest.raises(ValueError, match=r"stop_token_ids must be integers in \[0, 49152\)"):
        tokenizer.encode_prompt(SamplingParams(stop_token_ids=[1000000]), prompt="Hello")
    with pytest.raises(ValueError, match=r"prompt token ids must be integers in \[0, 49152\)"):
        tokenizer.encode_prompt(params, prompt_ids=[1, VOCAB])
    with pytest.raises(ValueError, match="prompt has 600 tokens; the model's maximum length is 512"):
        tokenizer.encode_prompt(params, prompt_ids=[1] * 600)
    with pytest.raises(ValueError, match="characters"):  # refused by its length, untokenized
        tokenizer.encode_prompt(params, prompt="x" * (tokenizer.max_chars + 1))
    with pytest.raises(ValueError, match="characters"):
        tokenizer.encode_prompt(params, messages=[{"role": "user", "content": "x" * (tokenizer.max_chars + 1)}])
    assert tokenizer.encode_prompt(params, prompt_ids=[1, 2]) == ("", [1, 2])


def test_huge_or_nan_timeouts_and_ids_are_a_value_error_in_the_client():
    async def body():
        async with AsyncClient("tcp://127.0.0.1:9") as client:
            for timeout in (float("nan"), float("inf"), 86401, -1):
                with pytest.raises(ValueError, match=r"at `\$\.timeout`"):
                    await client.complete("hi", timeout=timeout)
            with pytest.raises(ValueError, match=r"at `\$\.prompt_ids\[0\]`"):
                await client.complete([2**40])
            with pytest.raises(ValueError, match="cannot be sent"):  # beyond msgpack's 64 bits
                await client.complete([1], timeout=2**70)

    run(body(), timeout=10)


# --- 5. clients notice a dead or unreachable server ---------------------------------------------

def test_requests_in_flight_raise_connection_error_when_the_server_dies():
    async def body():
        context = zmq.asyncio.Context()
        try:
            server = context.socket(zmq.ROUTER)
            port = server.bind_to_random_port("tcp://127.0.0.1")
            async with AsyncClient(f"tcp://127.0.0.1:{port}", connection_timeout=1.0) as client:
                async def consume(i: int):
                    async for _ in client.generate(f"prompt {i}"):
                        pass

                tasks = [asyncio.create_task(consume(i)) for i in range(3)]
                for _ in tasks:  # the server takes each request, streams one delta, then dies
                    identity, frame = await server.recv_multipart()
                    rid = protocol.decode(frame, protocol.CLIENT_REQUESTS).id
                    await server.send_multipart([identity, protocol.encode(protocol.Delta(rid, [1], "a"))])
                server.close(linger=0)
                return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            context.destroy(linger=0)

    results = run(body(), timeout=30)
    assert all(isinstance(r, ConnectionError) and "no reply from the server" in str(r) for r in results), results


def test_the_blocking_client_raises_connection_error_for_an_unreachable_server():
    with Client("tcp://127.0.0.1:9", connection_timeout=1.0) as client:  # nothing listens on port 9
        with pytest.raises(ConnectionError, match="down or unreachable"):
            client.complete("hi")
        with pytest.raises(ConnectionError):
            client.health()


# --- 1. a step that raises fails its requests, not the worker ------------------------------------

def test_a_failing_step_ends_its_requests_with_an_error_and_the_worker_keeps_serving(make_checkpoint,
                                                                                     worker_link):
    engine = Engine(EngineConfig(model=str(make_checkpoint("llama")), dtype="float32", device="cpu", eager=True,
                                 num_blocks=64, token_budget=64, max_num_seqs=2), progress=False)
    schedule, queued = engine.scheduler.schedule, threading.Event()

    def schedule_then_fail():  # a failure after the step took its KV blocks, as the poison requests caused
        queued.wait(10)  # until all four requests are sent: which step each is in is then fixed
        chunks = schedule()
        if any(c.request.request_id == "poison" for c in chunks):
            raise IndexError("injected failure")
        return chunks

    engine.scheduler.schedule = schedule_then_fail
    frontend, identity = worker_link(engine)

    def send(rid: str) -> None:
        params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        frontend.send_multipart([identity, protocol.encode(protocol.Generate(rid, prompt_ids=[1, 2, 3],
                                                                             params=params))])

    def finals(wanted: set[str]) -> dict[str, protocol.Output]:
        """The last delta of each wanted request, then a heartbeat: no KV block may be left in use."""
        ended = {}
        while True:
            assert frontend.poll(30_000), f"the worker went silent; ended so far: {sorted(ended)}"
            msg = protocol.decode(frontend.recv_multipart()[1], protocol.WORKER_REPLIES)
            if isinstance(msg, protocol.Heartbeat) and set(ended) == wanted:
                assert msg.stats["blocks_in_use"] == 0 and msg.stats["running"] == 0
                return ended
            if isinstance(msg, protocol.Step):  # one message per step, every request's outputs in it
                ended |= {out.id: out for out in msg.outputs if out.finish_reason is not None}

    for rid in ("first", "poison", "later-1", "later-2"):  # max_num_seqs 2: the last two wait
        send(rid)
    queued.set()
    ended = finals({"first", "poison", "later-1", "later-2"})
    for rid in ("first", "poison"):  # the failed step's requests
        assert ended[rid].finish_reason == "error" and "IndexError: injected failure" in ended[rid].error
    assert all(ended[rid].finish_reason == "length" for rid in ("later-1", "later-2"))
    send("afterwards")
    assert finals({"afterwards"})["afterwards"].finish_reason == "length"


def test_the_engine_refuses_token_ids_outside_the_vocabulary(make_checkpoint):
    engine = Engine(EngineConfig(model=str(make_checkpoint("llama")), dtype="float32", device="cpu", eager=True,
                                 num_blocks=16), progress=False)
    with pytest.raises(ValueError, match=r"stop_token_ids: token ids must be in \[0, 128\)"):
        engine.add_request("a", [1, 2], SamplingParams(stop_token_ids=[1000000], min_new_tokens=1))
    with pytest.raises(ValueError, match=r"logit_bias: token ids must be in \[0, 128\)"):
        engine.add_request("b", [1, 2], SamplingParams(logit_bias={128: 1.0}))


# --- 3. nobody else can take a worker's place -----------------------------------------------------

def test_a_foreign_process_cannot_take_a_replica_nor_receive_prompts(make_checkpoint):
    config = EngineConfig(model=str(make_checkpoint("llama")), dtype="float32", device="cpu", eager=True,
                          num_blocks=64)
    supervisor = Supervisor(config, startup_timeout=300)
    router = Router(supervisor)
    link_dir = supervisor.address.removeprefix("ipc://").rsplit("/", 1)[0]
    impostor = zmq.Context.instance().socket(zmq.DEALER)
    impostor.setsockopt(zmq.LINGER, 0)
    try:
        assert supervisor.address.startswith("ipc://") and os.stat(link_dir).st_mode & 0o777 == 0o700
        supervisor.start()
        real = supervisor.replicas[0]
        worker_identity = real.identity
        # Root, or the same user, can still reach the socket: the secret is what keeps it out.
        impostor.connect(supervisor.address)
        impostor.send(protocol.encode(protocol.Ready(0, real.process.pid, "/fake", 512, "a guess")))
        time.sleep(0.5)
        assert supervisor.receive() == [] and real.identity == worker_identity
        router.submit("victim", [1, 2, 3], SamplingParams(max_new_tokens=4, ignore_eos=True))
        outputs = []
        deadline = time.monotonic() + 60
        while not any(o.finish_reason for o in outputs) and time.monotonic() < deadline:
            supervisor.socket.poll(100)
            outputs += router.handle(supervisor.receive())
        assert [o.finish_reason for o in outputs][-1] == "length"
        assert sum(len(o.token_ids) for o in outputs) == 4
        assert not impostor.poll(0), "the impostor received a prompt"
    finally:
        impostor.close()
        supervisor.close()
    assert not os.path.exists(link_dir)


def test_a_worker_whose_frontend_died_while_it_loaded_exits(make_checkpoint, tmp_path):
    """A stand-in frontend starts a worker and dies at once, before the worker's model is loaded:
    the worker must still notice that nobody is left to serve, and exit."""
    config = EngineConfig(model=str(make_checkpoint("llama")), dtype="float32", device="cpu", eager=True,
                          num_blocks=64)
    start = ("import os, subprocess, sys; worker = subprocess.Popen([sys.executable, '-P', '-m', 'splitfuse.worker.main', "
             f"'--address', 'ipc://{tmp_path}/workers', '--config', sys.argv[1], '--parent-pid', str(os.getpid())], "
             "stdin=subprocess.PIPE, "
             "stdout=subprocess.DEVNULL); "
             "worker.stdin.write(b'secret\\n'); worker.stdin.close(); print(worker.pid)")
    # Only the stand-in's stdout is read (the worker's goes elsewhere): reading a pipe the worker holds would wait for it.
    pid = int(subprocess.run([sys.executable, "-P", "-c", start, config.to_json()], stdout=subprocess.PIPE,
                             text=True, check=True).stdout)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.5)
        assert not _alive(pid), "the worker outlived its frontend"
    finally:
        if _alive(pid):
            os.kill(pid, 9)


def _alive(pid: int) -> bool:
    """Running (not exited, nor exited and waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- through a real server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deployment():
    """The frontend of `splitfuse.serve`, started by hand so that SLOW takes 5 s to tokenize."""
    options = {"request_timeout": 600.0, "heartbeat_timeout": 30.0, "startup_timeout": 300.0}
    process = subprocess.Popen([sys.executable, "-P", "-c", FRONTEND, "--replicas", "1",
                                "--config", EngineConfig(**ENGINE).to_json(),
                                "--options", json.dumps(options), "--watch-parent"],
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    deployment = Deployment(None, process)
    try:
        deployment.address = wait_ready(process, 300)["address"]
        yield deployment
    finally:
        deployment.close()


@pytest.fixture
def sock(deployment):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(deployment.address)
    yield sock
    sock.close()


def send(sock: zmq.Socket, **body) -> None:
    sock.send(msgpack.packb({"v": 2, **body}))


def receive(sock: zmq.Socket) -> dict:
    return msgpack.unpackb(sock.recv(), strict_map_key=False)


def finals(sock: zmq.Socket, *ids: str) -> dict[str, dict]:
    """The reply that ends each of the requests `ids`: an error or its last delta."""
    ended = {}
    while set(ended) != set(ids):
        reply = receive(sock)
        if reply["type"] == "error" or reply.get("finish_reason") is not None:
            ended[reply["id"]] = reply
    return ended


def final(sock: zmq.Socket, rid: str) -> dict:
    return finals(sock, rid)[rid]


def stats(sock: zmq.Socket) -> dict:
    send(sock, type="stats", id="stats")
    return final_of_type(sock, "stats")["stats"]


def final_of_type(sock: zmq.Socket, kind: str) -> dict:
    while (reply := receive(sock))["type"] != kind:
        pass
    return reply


def wait_drained(sock: zmq.Socket) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = stats(sock)
        replica = s["replicas"][0]
        if s["in_flight"] == 0 and replica["engine"].get("blocks_in_use") == replica["engine"].get("running") == 0:
            return s
        time.sleep(0.2)
    pytest.fail(f"the server did not drain: {s}")


def test_poison_requests_get_an_error_and_the_other_streams_finish(sock):
    long = {"max_new_tokens": 8, "ignore_eos": True}
    for i in range(4):
        send(sock, type="generate", id=f"other-{i}", prompt=f"Count from {i} to a hundred:", params=long)
    poison = {"poison-stop": {"stop_token_ids": [1000000], "min_new_tokens": 1},
              "poison-top-k": {"do_sample": True, "top_k": 2**63},
              "poison-ids": None}
    for rid, params in poison.items():
        if params is None:  # a prompt id outside the vocabulary
            send(sock, type="generate", id=rid, prompt_ids=[1, VOCAB])
        else:
            send(sock, type="generate", id=rid, prompt="Hello", params=params)
    replies = finals(sock, *poison, *(f"other-{i}" for i in range(4)))
    for rid in poison:
        assert replies[rid]["type"] == "error", replies[rid]
    assert "stop_token_ids" in replies["poison-stop"]["error"] and "vocabulary" in replies["poison-ids"]["error"]
    for i in range(4):
        reply = replies[f"other-{i}"]
        assert reply["type"] == "delta" and reply["finish_reason"] == "length", reply
    assert wait_drained(sock)["replicas"][0]["restarts"] == 0


def test_nonsense_values_over_the_wire_get_an_error_reply(sock):
    cases = {"nan": {"params": {"presence_penalty": float("nan")}},
             "inf": {"params": {"frequency_penalty": float("inf")}},
             "tiny": {"params": {"do_sample": True, "temperature": 1e-300}},
             "timeout": {"timeout": float("nan")},
             "stops": {"params": {"stop": ["x"] * 100_000}}}
    for rid, fields in cases.items():
        send(sock, type="generate", id=rid, prompt="Hello", **fields)
        reply = final(sock, rid)
        assert reply["type"] == "error", (rid, reply)
    sock.send(msgpack.packb({"type": "generate", "v": True, "id": "bool-version", "prompt": "Hello"}))
    reply = final(sock, "bool-version")
    assert reply["type"] == "error" and "version True" in reply["error"]


def _rss(pid: int) -> int:
    """Resident memory in bytes, from /proc (Linux, like every machine this runs on)."""
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def test_an_oversize_prompt_is_refused_before_it_is_tokenized_and_memory_comes_back(deployment, sock):
    before = _rss(deployment.process.pid)
    huge = "All work and no play makes Jack a dull boy. " * (15 * 2**20 // 44)  # 15 MiB of text
    for i in range(3):
        send(sock, type="generate", id=f"huge-{i}", prompt=huge)
        reply = final(sock, f"huge-{i}")
        assert reply["type"] == "error" and "characters" in reply["error"] and "512 tokens" in reply["error"]
        send(sock, type="generate", id=f"huge-chat-{i}", messages=[{"role": "user", "content": huge}])
        assert "characters" in final(sock, f"huge-chat-{i}")["error"]
    # Tokenizing it took the frontend from 64 MB to 1.3 GB, and kept it there.
    assert _rss(deployment.process.pid) - before < 200 << 20


def test_a_prompt_being_tokenized_does_not_pause_other_requests(sock):
    send(sock, type="generate", id="slow", prompt=SLOW, params={"max_new_tokens": 2})
    time.sleep(0.2)  # the slow one is being tokenized now
    send(sock, type="generate", id="quick", prompt="Hello", params={"max_new_tokens": 2}, stream=False)
    send(sock, type="health", id="health")
    order = []
    while len(order) < 3:
        reply = receive(sock)
        if reply["type"] == "health" or reply["type"] == "error" or reply["finish_reason"] is not None:
            order.append(reply["id"])
    assert order[-1] == "slow", f"the others waited for the slow prompt: {order}"


def test_the_health_reply_names_no_worker_process(sock):
    send(sock, type="health", id="h")
    reply = final_of_type(sock, "health")
    assert reply["ok"] and reply["replicas"] == [{"replica": 0, "ready": True, "restarts": 0}]


def test_a_slow_but_live_server_is_not_taken_for_dead(deployment):
    async def body():
        async with AsyncClient(deployment.address, connection_timeout=1.0) as client:
            # No reply for 5 s while SLOW is tokenized: the probes in between show the server is alive.
            return await client.complete(SLOW, max_new_tokens=2, ignore_eos=True)

    assert run(body()).finish_reason == "length"


# --- fuzz: any message gets a valid reply or an error reply, and the worker never restarts -----------

wild = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=6),
                 st.lists(st.one_of(st.integers(-5, 60000), st.text(max_size=3)), max_size=3))
PARAMS = {"min_new_tokens": st.integers(0, 1), "do_sample": st.booleans(),
          "temperature": st.one_of(st.just(0), st.floats(0.01, 2)),
          "top_k": st.one_of(st.integers(0, 100_000), st.integers(2**62, 2**64 - 1)),
          "top_p": st.floats(0.01, 1), "min_p": st.floats(0, 0.99), "repetition_penalty": st.floats(0.5, 2),
          "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
          "seed": st.integers(0, 2**64 - 1), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
          "stop_token_ids": st.lists(st.one_of(st.integers(0, VOCAB - 1), st.integers(VOCAB, 2**31 - 1)), max_size=3),
          "ignore_eos": st.booleans(),
          "logprobs": st.one_of(st.none(), st.integers(0, 20)), "return_full_text": st.booleans()}
# Plausible values, edges included (the vocabulary's end, int64); an accepted request generates at most 2 tokens.
plausible_params = st.fixed_dictionaries({"max_new_tokens": st.integers(1, 2)}, optional=PARAMS)
valid_extras = st.fixed_dictionaries({}, optional={"stream": st.booleans(), "timeout": st.floats(1, 60)})


def spoiled(plausible: st.SearchStrategy, keys: list[str]) -> st.SearchStrategy:
    """Two maps of `plausible` in three; the third with one key set to a wild value."""
    return st.one_of(plausible, plausible,
                     st.builds(lambda m, k, v: m | {k: v}, plausible, st.sampled_from(keys), wild))


prompts = st.one_of(st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20)}),
                    st.fixed_dictionaries({"prompt_ids": st.lists(st.integers(0, VOCAB + 5), min_size=1,
                                                                  max_size=8)}),
                    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
                        {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=10)}),
                        min_size=1, max_size=2)}))
generates = st.builds(lambda params, prompt, extra: {"type": "generate", "v": 2, "id": "fuzz", "params": params,
                                                     **prompt, **extra},
                      spoiled(plausible_params, ["max_new_tokens", *PARAMS, "unknown"]),
                      spoiled(prompts, ["prompt", "prompt_ids", "messages"]),
                      spoiled(valid_extras, ["stream", "timeout", "v", "id", "junk"]))
envelopes = st.dictionaries(st.sampled_from(["type", "v", "id", "prompt", "params"]),
                            st.one_of(wild, st.sampled_from(["generate", "abort", "health", "stats"])), max_size=5)
# A failure is reported as found: shrinking it would replay slow requests for minutes.
fuzz = settings(deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(fuzz, max_examples=50)
@given(message=generates)
@example(message={"type": "generate", "v": 2, "id": "fuzz", "prompt": "Hi",  # the issue's two poison requests
                  "params": {"max_new_tokens": 2, "stop_token_ids": [1000000], "min_new_tokens": 1}})
@example(message={"type": "generate", "v": 2, "id": "fuzz", "prompt": "Hi",
                  "params": {"max_new_tokens": 2, "do_sample": True, "top_k": 2**63}})
def test_fuzzed_sampling_parameters_get_a_valid_or_an_error_reply(sock, message):
    exchange(sock, message)


@settings(fuzz, max_examples=30)
@given(message=st.one_of(envelopes, st.binary(max_size=16)))
def test_fuzzed_frames_get_an_error_reply_or_a_valid_one(sock, message):
    if isinstance(message, dict) and "params" not in message:
        message["params"] = {"max_new_tokens": 2}  # if it happens to be a valid request, a short one
    exchange(sock, message)


def exchange(sock: zmq.Socket, message: dict | bytes) -> None:
    """Send a fuzzed message and check its replies: only valid types, its id or none, and a generate with
    a readable id ends with exactly one final reply (an error or its last delta)."""
    rid = message.get("id") if isinstance(message, dict) and isinstance(message.get("id"), str) else None
    assume(rid != PROBE)
    expects_end = isinstance(message, dict) and message.get("type") == "generate" and rid is not None
    sock.send(message if isinstance(message, bytes) else msgpack.packb(message))
    send(sock, type="health", id=PROBE)  # answered after whatever the message got at once
    probed = ended = False
    while not probed or (expects_end and not ended):
        reply = receive(sock)
        assert reply["type"] in ("delta", "error", "health", "stats"), reply
        if reply["type"] == "health" and reply["id"] == PROBE:
            probed = True
            continue
        assert reply["id"] in (rid, None) and not ended, reply
        ended = reply["type"] == "error" or reply.get("finish_reason") is not None
        if reply["type"] == "delta" and reply["finish_reason"] == "error":
            assert "timed out" in reply["error"], reply  # the only error a valid request may end with here


def test_after_all_of_the_above_the_worker_never_restarted(sock):
    assert wait_drained(sock)["replicas"][0]["restarts"] == 0
