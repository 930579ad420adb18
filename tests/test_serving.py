"""A real deployment (frontend process + 2 worker replicas of the bundled model) on loopback TCP.

Every wait is bounded; the deployment is always closed. The tests that kill or freeze a worker
run last, since they restart a replica."""
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.frontend.client import AsyncClient, Client
from splitfuse.frontend.pipeline import pipeline
from splitfuse.frontend.serve import serve
from splitfuse.frontend.tokenizer import Tokenizer

# fp32: these tests compare answers across paths (plumbing), which bf16 near-ties could flip where a path
# computes a prompt in another shape (a cached prefix, another chunking).
ENGINE = dict(device="cpu", dtype="float32", eager=True, num_blocks=512, max_model_len=2048)
# Far longer than any test waits for: a replica with a core to itself generated 480 tokens within the 20 s a
# frozen worker is given to be found (Zen 5).
LONG = dict(max_new_tokens=2000, ignore_eos=True)
HEARTBEAT_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def deployment():
    with serve(replicas=2, heartbeat_timeout=HEARTBEAT_TIMEOUT, ready_timeout=300, **ENGINE) as d:
        yield d


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(bundled_model_dir())


def run(coroutine, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def raw_socket(address: str) -> zmq.Socket:
    """A plain DEALER, as a program that is not ours would use; receives time out instead of hanging."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def send(sock: zmq.Socket, **body) -> None:
    sock.send(msgpack.packb({"v": 2, **body}))


def receive(sock: zmq.Socket) -> dict:
    return msgpack.unpackb(sock.recv(), strict_map_key=False)


async def wait_until(condition, timeout: float, what: str):
    """Poll an async condition every 0.1 s; returns its truthy value or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := await condition():
            return value
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


async def drained(client: AsyncClient) -> bool:
    stats = await client.stats()
    # a replica not yet heard from since it (re)started has no counters, and nothing running
    return stats["in_flight"] == 0 and all(r["in_flight"] == 0 and r["engine"].get("blocks_in_use", 0) == 0
                                           and r["engine"].get("running", 0) == 0 for r in stats["replicas"])


def test_frontend_modules_do_not_import_torch():
    code = ("import sys, splitfuse.cli, splitfuse.frontend.server, splitfuse.frontend.client, "
            "splitfuse.frontend.router, splitfuse.frontend.replicas, splitfuse.frontend.serve, splitfuse.protocol, splitfuse.frontend.core, "
            "splitfuse.frontend.http_server, splitfuse.frontend.pipeline\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy'))\n"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_running_frontend_process_never_loaded_torch(deployment):
    maps = Path(f"/proc/{deployment.process.pid}/maps")  # Linux, like every machine this runs on
    assert "libtorch" not in maps.read_text()


def test_greedy_text_equals_the_pipeline(deployment):
    import torch
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    chat = [{"role": "user", "content": "Name three colors."}]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two replicas on this CPU: the same kernels, the same numerics
    try:
        with pipeline(**ENGINE) as pipe:
            expected = [pipe(p, max_new_tokens=24)[0] for p in prompts] + pipe.chat(chat, max_new_tokens=24)
    finally:
        torch.set_num_threads(threads)

    async def served():
        async with AsyncClient(deployment.address) as client:
            answers = [await client.complete(p, max_new_tokens=24) for p in prompts]
            return answers + [await client.chat(chat, max_new_tokens=24)]

    for got, want in zip(run(served()), expected):
        assert (got.generated_text, got.token_ids, got.finish_reason) == \
               (want.generated_text, want.token_ids, want.finish_reason)
        assert got.prompt_length == want.prompt_length and got.generated_length == len(got.token_ids)
    with Client(deployment.address) as client:  # the blocking wrapper streams the same text
        assert "".join(d.text for d in client.generate(prompts[0], max_new_tokens=24)) == expected[0].generated_text
        full = prompts[0] + expected[0].generated_text
        assert client.complete(prompts[0], max_new_tokens=24, return_full_text=True).generated_text == full
        assert "".join(d.text for d in client.generate(prompts[0], max_new_tokens=24, return_full_text=True)) == full


def test_streamed_logprobs_equal_the_completed_ones(deployment):
    async def go():
        async with AsyncClient(deployment.address) as client:
            deltas = [d async for d in client.generate("The sea is", max_new_tokens=6, logprobs=2)]
            whole = await client.complete("The sea is", max_new_tokens=6, logprobs=2)
        return deltas, whole
    deltas, whole = run(go())
    streamed = [lp for d in deltas for lp in d.logprobs or []]
    assert len(streamed) == whole.generated_length == 6
    assert streamed == pytest.approx(whole.logprobs)
    assert [t for d in deltas for t in d.top_logprobs or []] == whole.top_logprobs


def test_300_concurrent_streams_over_two_replicas(deployment, tokenizer):
    async def one(client: AsyncClient, i: int):
        stop = [" the"] if i % 3 == 0 else []
        text, ids, last = "", [], None
        async for delta in client.generate(f"Tell me something about the number {i}.", max_new_tokens=6, stop=stop):
            text, ids, last = text + delta.text, ids + delta.token_ids, delta
        return stop, text, ids, last.finish_reason

    async def body():
        async with AsyncClient(deployment.address) as client:
            before = [r["served"] for r in (await client.stats())["replicas"]]
            results = await asyncio.gather(*(one(client, i) for i in range(300)))
            after = [r["served"] for r in (await client.stats())["replicas"]]
            await wait_until(lambda: drained(client), 30, "the workers to drain")
            return results, [a - b for a, b in zip(after, before)]

    results, served = run(body(), timeout=240)
    assert len(results) == 300 and sum(served) == 300
    assert all(n > 0 for n in served), f"both replicas should serve some requests: {served}"
    for stop, text, ids, reason in results:
        assert reason in ("stop", "length") and 1 <= len(ids) <= 6
        full = tokenizer.decode(ids)
        cut = full.find(stop[0]) if stop and stop[0] in full else len(full)
        assert text == full[:cut]  # the streamed deltas concatenate to the final (stop-trimmed) text


def test_cancel_break_and_stop_strings_free_the_workers_blocks(deployment):
    async def body():
        async with AsyncClient(deployment.address) as client:
            started = asyncio.Event()

            async def consume():
                async for _ in client.generate("Count from one to a thousand:", **LONG):
                    started.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), 60)
            assert not await drained(client)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            async for _ in client.generate("Count from one to a thousand:", **LONG):
                break  # leaving the loop early aborts too
            stopped = await client.complete("Count from one to a thousand: one, two,", stop=[","], **LONG)
            assert stopped.finish_reason == "stop" and "," not in stopped.generated_text
            # Neither 2000-token request could have finished in this time: only aborts free the blocks.
            await wait_until(lambda: drained(client), 10, "zero blocks in use")

    run(body())


def test_a_request_past_its_timeout_ends_with_an_error_and_frees_its_blocks(deployment):
    async def body():
        async with AsyncClient(deployment.address) as client:
            answer = await client.complete("Count from one to a thousand:", timeout=1.0, **LONG)
            assert answer.finish_reason == "error" and "timed out" in answer.error
            assert answer.generated_length < LONG["max_new_tokens"]
            await wait_until(lambda: drained(client), 10, "zero blocks in use")

    run(body())


def test_client_disconnect_aborts_its_requests(deployment):
    sock = raw_socket(deployment.address)
    send(sock, type="generate", id="d", prompt="Count from one to a thousand:", params=LONG)
    assert receive(sock)["type"] == "delta"
    sock.close()

    async def body():
        async with AsyncClient(deployment.address) as client:
            await wait_until(lambda: drained(client), 10, "the disconnected client's request to be aborted")

    run(body())


def test_closing_a_client_fails_its_waiting_requests_and_a_closed_one_says_so(deployment):
    """Before, a request in flight when its client closed waited forever."""
    async def body():
        client, started = AsyncClient(deployment.address), asyncio.Event()

        async def consume():
            async for _ in client.generate("Count from one to a thousand:", **LONG):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 60)
        await client.close()
        with pytest.raises(ConnectionError, match="was closed"):
            await asyncio.wait_for(task, 10)
        async with AsyncClient(deployment.address) as other:
            await wait_until(lambda: drained(other), 30, "the closed client's request to be aborted")

    run(body())
    blocking = Client(deployment.address)
    assert blocking.complete("Hi", max_new_tokens=2).finish_reason in ("stop", "length")
    blocking.close()
    with pytest.raises(ConnectionError, match="is closed"):
        blocking.complete("Hi", max_new_tokens=2)
    with pytest.raises(ConnectionError, match="is closed"):
        next(blocking.generate("Hi", max_new_tokens=2))


def test_bad_messages_get_an_error_reply_and_the_server_keeps_serving(deployment):
    sock = raw_socket(deployment.address)
    cases = [
        ([b"two", b"frames"], None, "exactly one frame"),
        ([b"\xc1"], None, "not valid msgpack"),
        ([msgpack.packb([1, 2])], None, "msgpack map"),
        ([msgpack.packb({"type": "frobnicate", "v": 2, "id": "t"})], "t", "unknown message type"),
        ([msgpack.packb({"type": "generate", "v": 99, "id": "v", "prompt": "hi"})], "v", "version 99"),
        # A client of version 1, whose prompt ids were packed bytes, learns of the version, not of a field.
        ([msgpack.packb({"type": "generate", "v": 1, "id": "v1", "prompt_ids": b"\x01\x00\x00\x00"})], "v1",
         "protocol version 1 is not supported; this peer speaks v2"),
        ([msgpack.packb({"type": "generate", "v": 2, "id": "p", "prompt": "hi", "params": {"max_tokens": 3}})],
         "p", "unknown field `max_tokens` - at `$.params`"),
        ([msgpack.packb({"type": "generate", "v": 2, "id": "o", "prompt_ids": [1] * (ENGINE["max_model_len"] + 1)})],
         "o", f"maximum length is {ENGINE['max_model_len']}"),
        ([msgpack.packb({"type": "generate", "v": 2, "id": "m", "messages": [{"role": "user"}]})], "m", "content"),
    ]
    for frames, request_id, words in cases:
        sock.send_multipart(frames)
        reply = receive(sock)
        assert reply["type"] == "error" and reply["id"] == request_id and words in reply["error"], reply
    send(sock, type="generate", id="ok", prompt="Hello", params={"max_new_tokens": 3}, stream=False)
    reply = receive(sock)
    assert reply["type"] == "delta" and reply["id"] == "ok" and reply["finish_reason"] in ("stop", "length")

    async def refused():
        async with AsyncClient(deployment.address) as client:
            with pytest.raises(ValueError, match="maximum length"):
                await client.complete(list(range(ENGINE["max_model_len"] + 1)))
            with pytest.raises(ValueError, match="temperature"):
                await client.complete("hi", temperature=-1)  # checked before it is sent

    run(refused())
    sock.close()


def test_a_raw_zmq_program_speaks_the_documented_protocol(deployment, tokenizer):
    # The example in docs/protocol.md, run as it is written, against this server.
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    example = re.search(r"## Example: raw pyzmq\n\n```python\n(.*?)```", doc, re.S).group(1)
    example = example.replace("tcp://127.0.0.1:5555", deployment.address)
    result = subprocess.run([sys.executable, "-P", "-c", example], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[(stop|length), prompt of \d+ tokens\]", result.stdout)

    sock = raw_socket(deployment.address)
    send(sock, type="health", id="h")
    health = receive(sock)
    assert health["type"] == "health" and health["id"] == "h" and health["ok"] and len(health["replicas"]) == 2
    prompt_ids = tokenizer.encode("The capital of France is")
    send(sock, type="generate", id="g", prompt_ids=prompt_ids,
         params={"max_new_tokens": 8, "logprobs": 2}, stream=True)
    ids, text, reply = [], "", {"finish_reason": None}
    while reply["finish_reason"] is None:
        reply = receive(sock)
        assert reply["type"] == "delta" and reply["id"] == "g"
        new = reply["token_ids"]
        assert len(reply["logprobs"]) == len(new) == len(reply["top_logprobs"])
        ids, text = ids + new, text + reply["text"]
    assert reply["prompt_length"] == len(prompt_ids) and text == tokenizer.decode(ids)
    send(sock, type="generate", id="a", prompt="Count from one to a thousand:", params=LONG)
    assert receive(sock)["finish_reason"] is None
    send(sock, type="abort", id="a")
    while (reply := receive(sock))["finish_reason"] is None:  # deltas already on their way
        pass
    assert reply["finish_reason"] == "abort"
    sock.close()


def test_a_repeated_prefix_goes_to_the_replica_that_cached_it(deployment, tokenizer):
    """Prefix-aware routing end to end: questions after a shared 10-block prefix all go to the replica
    that computed it first, and it serves the prefix to the later ones from its cache."""
    prefix = tokenizer.encode(" ".join(f"Rule {k}: answer briefly and politely." for k in range(40)))[:160]

    async def body():
        async with AsyncClient(deployment.address) as client:
            async def idle():  # with the workers' first heartbeats in: their stats are known
                replicas = (await client.stats())["replicas"]
                return all("prefix_cache_hits" in r["engine"] for r in replicas) and await drained(client)
            await wait_until(idle, 30, "an idle deployment")
            before = (await client.stats())["replicas"]
            for i in range(4):
                await client.complete(prefix + tokenizer.encode(f" Question {i}?"), max_new_tokens=2)

            async def hits_counted():  # stats come with the workers' heartbeats
                after = (await client.stats())["replicas"]
                hits = [a["engine"]["prefix_cache_hits"] - b["engine"]["prefix_cache_hits"] for a, b in zip(after, before)]
                return max(hits) >= 3 * len(prefix) and (before, after, hits)
            return await wait_until(hits_counted, 10, "the cache hits in the stats")

    before, after, hits = run(body())
    served = [a["served"] - b["served"] for a, b in zip(after, before)]
    assert sorted(served) == [0, 4] and served.index(4) == hits.index(max(hits))


def test_a_killed_worker_fails_its_requests_and_is_restarted(deployment):
    run(_lose_a_worker(deployment, signal.SIGKILL, "exited with code -9", within=10), timeout=240)


def test_a_frozen_worker_is_found_by_its_missing_heartbeat(deployment):
    run(_lose_a_worker(deployment, signal.SIGSTOP, "sent no heartbeat", within=HEARTBEAT_TIMEOUT + 10), timeout=240)


async def _lose_a_worker(deployment, sig: signal.Signals, reason: str, within: float) -> None:
    """Four long requests spread over both replicas, `sig` to replica 0's worker: its requests end
    with an error naming `reason` within `within` seconds, the others keep going; then replica 0
    comes back and serves again."""
    async with AsyncClient(deployment.address) as client:
        await wait_until(lambda: drained(client), 30, "an idle deployment")
        started = [asyncio.Event() for _ in range(4)]

        async def consume(i: int):
            async for delta in client.generate(f"Count from {i} to a thousand:", **LONG):
                started[i].set()
            return delta

        tasks = [asyncio.create_task(consume(i)) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        victim = (await client.stats())["replicas"][0]
        assert 1 <= victim["in_flight"] <= 3, "least-outstanding routing spreads four equal requests"
        os.kill(victim["pid"], sig)
        deadline = time.monotonic() + within
        done = set()
        while len(done) < victim["in_flight"] and time.monotonic() < deadline:
            done |= (await asyncio.wait(set(tasks) - done, timeout=deadline - time.monotonic(),
                                        return_when=asyncio.FIRST_COMPLETED))[0]
        failed = [t.result() for t in done]
        assert len(failed) == victim["in_flight"], f"{len(failed)} requests ended within {within:.0f}s"
        assert all(d.finish_reason == "error" and reason in d.error for d in failed), failed
        assert not any(t.done() for t in set(tasks) - done)  # replica 1's requests were not disturbed
        # replica 0's counters are no longer the dead process's (before, until its successor's first heartbeat)
        assert (await client.stats())["replicas"][0]["engine"].get("blocks_in_use", 0) == 0
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        async def restarted():
            replica = (await client.stats())["replicas"][0]
            return replica["ready"] and replica["pid"] != victim["pid"] and replica

        replica = await wait_until(restarted, 120, "replica 0 to restart")
        assert replica["restarts"] == victim["restarts"] + 1
        answers = await asyncio.gather(*(client.complete(f"Say {i}.", max_new_tokens=4) for i in range(4)))
        assert all(a.finish_reason in ("stop", "length") and a.error is None for a in answers)
        assert (await client.stats())["replicas"][0]["served"] > replica["served"]


def test_a_model_that_cannot_load_fails_serve_with_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="exited with code 1 before it was ready"):
        serve(model=str(tmp_path), ready_timeout=120, **ENGINE)
