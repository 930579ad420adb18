"""The OpenAI-compatible HTTP API of a real `splitfuse serve`, driven by the official `openai` package.

Two deployments of the bundled model, each one replica with ZeroMQ and HTTP: `server` (with an API
key) for the API itself, and `small` (CURVE on its ZeroMQ socket, tight queue limits, a short
shutdown timeout) for CURVE, the 503 and 429 paths and, last, the SIGTERM drain. Every wait is
bounded and both are always closed."""
import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import tokenizers
import zmq.auth

from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.frontend.client import Client, CurveKeys
from splitfuse.frontend.pipeline import pipeline
from splitfuse.frontend.serve import serve

# fp32: these tests compare answers across paths (plumbing), which bf16 near-ties could flip where a path
# computes a prompt in another shape (a cached prefix, another chunking).
ENGINE = dict(device="cpu", dtype="float32", eager=True, num_blocks=512, max_model_len=512)
KEY = "sk-test-key"
MODEL = "smollm2-135m-instruct"  # the bundled model's directory name
LONG = dict(max_tokens=480, extra_body={"ignore_eos": True})  # far longer than any test waits for
GREEDY = dict(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def server():
    with serve(http_port=0, api_key=KEY, ready_timeout=300, **ENGINE) as d:
        yield d


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict:
    """A server's and two clients' CURVE certificates; only the first client is allowed in."""
    folder = tmp_path_factory.mktemp("curve")
    allowed = folder / "allowed"
    allowed.mkdir()
    paths = {name: zmq.auth.create_certificates(folder, name) for name in ("server", "client", "stranger")}
    (allowed / "client.key").write_bytes(Path(paths["client"][0]).read_bytes())
    return {"server_secret": str(paths["server"][1]), "allowed": str(allowed),
            "client": CurveKeys.from_certificates(paths["server"][0], paths["client"][1]),
            "stranger": CurveKeys.from_certificates(paths["server"][0], paths["stranger"][1])}


@pytest.fixture(scope="module")
def small(certificates):
    with serve(http_port=0, curve_secret=certificates["server_secret"], curve_clients=certificates["allowed"],
               # A drain short enough that LONG is still running at its end: with 20 s, LONG had finished first.
               max_queued_requests=2, max_queued_tokens=300, shutdown_timeout=4.0, ready_timeout=300, **ENGINE) as d:
        yield d


def client(deployment, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployment.http_url}/v1", api_key=key, max_retries=0, timeout=120)


def async_client(deployment, key: str = KEY, timeout: float = 120) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{deployment.http_url}/v1", api_key=key, max_retries=0, timeout=timeout)


def run(coroutine, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def http(deployment, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, str]:
    """(status, body text) of a GET, or of a POST of `body` as JSON, without the openai package."""
    request = urllib.request.Request(deployment.http_url + path, None if body is None else json.dumps(body).encode(),
                                     {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"}
                                                                             if key else {}))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def drained(deployment) -> bool:
    now = stats(deployment)
    return now["in_flight"] == 0 and all(r["engine"]["blocks_in_use"] == 0 and r["engine"]["running"] == 0
                                           for r in now["replicas"])


def stats(deployment, curve: CurveKeys | None = None) -> dict:
    with Client(deployment.address, curve=curve) as zmq_client:
        return zmq_client.stats()


async def until(condition, what: str, timeout: float = 60) -> None:
    """Wait, without blocking the event loop long, until a (blocking) condition holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        await asyncio.sleep(0.2)


def test_tokenize_detokenize_and_tokenizer_info_as_vllm_shapes_them(server):
    """The frontend's tokenizer, checked against the tokenizers package reading the same file."""
    reference = tokenizers.Tokenizer.from_file(str(bundled_model_dir() / "tokenizer.json"))
    status, text = http(server, "/tokenize", {"prompt": "The sea is calm tonight."}, key=KEY)
    answer = json.loads(text)
    assert status == 200 and answer["tokens"] == reference.encode("The sea is calm tonight.").ids
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == ENGINE["max_model_len"]
    status, text = http(server, "/detokenize", {"tokens": answer["tokens"]}, key=KEY)
    assert status == 200 and json.loads(text) == {"prompt": "The sea is calm tonight."}
    status, text = http(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}, key=KEY)
    assert status == 200 and reference.decode(json.loads(text)["tokens"], skip_special_tokens=False).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    info = json.loads(http(server, "/tokenizer_info", key=KEY)[1])
    assert reference.token_to_id(info["eos_token"]) is not None and "{%" in info["chat_template"]
    assert http(server, "/tokenize", {"prompt": "Hi"})[0] == 401  # the key guards every path but the probes
    assert http(server, "/detokenize", {"tokens": [10**6]}, key=KEY)[0] == 400


def test_models_health_metrics_and_the_api_key(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == ["smollm2-135m-instruct"] and models[0].max_model_len == ENGINE["max_model_len"]
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    assert http(server, "/health")[0] == 200  # no key needed to probe
    client(server).completions.create(model=models[0].id, prompt="Hi", max_tokens=2)
    metrics = http(server, "/metrics")[1]
    for name in ("splitfuse_requests_total", "splitfuse_prompt_tokens_total", "splitfuse_generation_tokens_total",
                 "splitfuse_time_to_first_token_seconds_bucket", "splitfuse_inter_token_latency_seconds_bucket",
                 "splitfuse_requests_running", "splitfuse_requests_waiting", "splitfuse_kv_blocks_in_use",
                 "splitfuse_preemptions_total"):
        assert name in metrics, name
    assert 'splitfuse_requests_total{finish_reason="length"}' in metrics


def test_pipeline_zeromq_and_http_give_the_same_greedy_answer(server):
    prompt, chat = "The capital of France is", [{"role": "user", "content": "Name three colors."}]
    with pipeline(**ENGINE) as pipe:
        expected = pipe(prompt, max_new_tokens=8)[0], pipe.chat(chat, max_new_tokens=8)[0]
    with Client(server.address) as zmq_client:
        over_zmq = zmq_client.complete(prompt, max_new_tokens=8), zmq_client.chat(chat, max_new_tokens=8)
    http = client(server)
    text = http.completions.create(model=MODEL, prompt=prompt, logprobs=0, **GREEDY)
    reply = http.chat.completions.create(model=MODEL, messages=chat, **GREEDY)
    for want, zmq_answer in zip(expected, over_zmq):
        assert (zmq_answer.token_ids, zmq_answer.generated_text) == (want.token_ids, want.generated_text)
    assert text.choices[0].text == expected[0].generated_text
    assert text.choices[0].logprobs.tokens == [pipe.tokenizer.decode([t], skip_special_tokens=False)
                                               for t in expected[0].token_ids]
    assert reply.choices[0].message.content == expected[1].generated_text
    assert reply.usage.completion_tokens == expected[1].generated_length
    assert reply.usage.prompt_tokens == expected[1].prompt_length


def test_completion_usage_and_logprobs(server):
    answer = client(server).completions.create(model=MODEL, prompt="The sea is", logprobs=2, **GREEDY)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.text
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == answer.usage.completion_tokens
    assert all(len(top) <= 2 and lp <= 0 for top, lp in zip(choice.logprobs.top_logprobs,
                                                             choice.logprobs.token_logprobs))
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_chat_with_usage_equals_the_whole_answer(server):
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]

    async def body():
        async with async_client(server) as api:
            whole = await api.chat.completions.create(model=MODEL, messages=messages, logprobs=True, top_logprobs=2,
                                                      **GREEDY)
            chunks = [c async for c in await api.chat.completions.create(
                model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, logprobs=True,
                top_logprobs=2, **GREEDY)]
        return whole, chunks

    whole, chunks = run(body())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
           whole.choices[0].message.content
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole.choices[0].logprobs.content]
    assert all(len(e.top_logprobs) == 2 for e in streamed)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
           (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    # The same prompt again: its full blocks came from the prefix cache.
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16 > 0


def test_n_choices_and_seeded_sampling_is_reproducible(server):
    api = client(server)
    request = dict(prompt="Once upon a time", n=3, temperature=1.0, seed=7, max_tokens=6)
    first, again = api.completions.create(model=MODEL, **request), api.completions.create(model=MODEL, **request)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.prompt_tokens == again.usage.prompt_tokens < first.usage.completion_tokens
    chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=4,
                                       seed=1)
    assert len(chat.choices) == 2


def test_stop_strings_end_the_text(server):
    answer = client(server).completions.create(model=MODEL, prompt="Count from one to ten: one, two,", stop=[","],
                                               **(LONG | {"temperature": 0}))
    assert answer.choices[0].finish_reason == "stop" and "," not in answer.choices[0].text
    wait_until(lambda: drained(server), 10, "the stopped request's blocks to be freed")


def test_min_tokens_holds_back_stop_strings_as_in_vllm(server):
    """No stop string ends within the first min_tokens tokens' text (tests/test_detokenizer.py has the rest)."""
    api = client(server)
    plain = api.completions.create(model=MODEL, prompt="Seattle is", max_tokens=12, temperature=0)
    text = plain.choices[0].text
    stop = text[text.index(" ", 1):text.index(" ", 1) + 2]  # a space and a letter that the text has early
    early = api.completions.create(model=MODEL, prompt="Seattle is", max_tokens=12, temperature=0, stop=[stop])
    held = api.completions.create(model=MODEL, prompt="Seattle is", max_tokens=12, temperature=0, stop=[stop],
                                  extra_body={"min_tokens": 12})
    assert early.choices[0].finish_reason == "stop" and early.usage.completion_tokens < 12
    assert held.choices[0].text == text and held.usage.completion_tokens == 12


def test_bad_requests_get_openai_errors(server):
    api = client(server)
    for bad in (dict(temperature=-1), dict(max_tokens=0), dict(top_p=2), dict(n=0), dict(logprobs=21)):
        with pytest.raises(openai.BadRequestError):
            api.completions.create(model=MODEL, prompt="Hi", **({"max_tokens": 4} | bad))
    with pytest.raises(openai.BadRequestError, match="maximum length"):
        api.completions.create(model=MODEL, prompt=[1] * 600, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="gpt-5", prompt="Hi", max_tokens=4)
    status, body = http(server, "/v1/chat/completions", {"messages": "nope"}, KEY)
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_bodies_that_are_not_the_json_asked_for_get_errors_that_say_so(server):
    def post(data: bytes, content_type: str | None) -> tuple[int, str]:
        request = urllib.request.Request(server.http_url + "/v1/completions", data,
                                         {"authorization": f"Bearer {KEY}"} | ({"content-type": content_type}
                                                                               if content_type else {}))
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())["error"]["message"]
    whole = b'{"model": "%s", "prompt": "Hi", "max_tokens": 2}' % MODEL.encode()
    assert post(whole, "application/json")[0] == 200
    for content_type in (None, "text/plain"):
        assert post(whole, content_type) == (400, "body: a JSON object is expected, sent with Content-Type: "
                                                  "application/json")
    broken = whole[:-1] + b', "x": [1'
    with pytest.raises(json.JSONDecodeError) as where:
        json.loads(broken)
    assert post(broken, "application/json") == (400, f"body: not JSON ({where.value.msg} at character "
                                                      f"{where.value.pos})")
    for word in (b"NaN", b"Infinity", b"-Infinity"):
        assert post(whole[:-1] + b', "temperature": ' + word + b"}", "application/json") == (
            400, "temperature: Input should be a finite number")


def test_a_client_leaving_frees_its_blocks(server):
    stream = client(server).completions.create(model=MODEL, prompt="Count from one to a thousand:", stream=True, **LONG)
    next(iter(stream))
    assert not drained(server)
    stream.close()
    wait_until(lambda: drained(server), 10, "the abandoned stream's blocks to be freed")
    with pytest.raises(openai.APITimeoutError):  # a client that gives up waiting for a whole answer
        client(server).with_options(timeout=3.0).completions.create(model=MODEL, prompt="Count to a thousand:", **LONG)
    wait_until(lambda: drained(server), 10, "the abandoned request's blocks to be freed")


def test_200_concurrent_streams_none_lost(server):
    async def one(api: openai.AsyncOpenAI, i: int):
        stream = await api.completions.create(model=MODEL, prompt=f"Say {i}.", max_tokens=4, stream=True,
                                              stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        return [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens

    async def body():
        async with async_client(server, timeout=300) as api:
            return await asyncio.gather(*(one(api, i) for i in range(200)))

    results = run(body(), timeout=300)
    assert len(results) == 200
    assert all(reason in ("stop", "length") and 1 <= tokens <= 4 for reason, tokens in results), results
    wait_until(lambda: drained(server), 30, "the workers to drain")


# --- the small deployment: CURVE, 503, 429, SIGTERM -------------------------------------------------------

def test_curve_admits_only_the_listed_clients(small, certificates):
    with Client(small.address, curve=certificates["client"]) as allowed:
        assert allowed.complete("Hi", max_new_tokens=2).finish_reason in ("stop", "length")
    for keys in (None, certificates["stranger"]):
        with Client(small.address, curve=keys, connection_timeout=2.0) as refused:
            with pytest.raises(ConnectionError):
                refused.complete("Hi", max_new_tokens=2)


def test_no_replica_ready_is_503(small, certificates):
    os.kill(stats(small, certificates["client"])["replicas"][0]["pid"], signal.SIGKILL)
    wait_until(lambda: http(small, "/health")[0] == 503, 10, "the loss to be noticed")
    with pytest.raises(openai.InternalServerError) as refused:
        client(small).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert refused.value.status_code == 503
    wait_until(lambda: http(small, "/health")[0] == 200, 120, "the replica to restart")


def test_past_the_queue_limits_requests_are_refused_with_429(small, certificates):
    curve = certificates["client"]
    pid = stats(small, curve)["replicas"][0]["pid"]

    def queued(n: int):
        return lambda: stats(small, curve)["queued"] == n

    async def body():
        async with async_client(small) as api:
            os.kill(pid, signal.SIGSTOP)  # nothing gets its first token: the queue only grows
            try:
                first = asyncio.create_task(api.completions.create(model=MODEL, prompt="Say 1.", max_tokens=2))
                await until(queued(1), "the first request to be queued")
                with pytest.raises(openai.RateLimitError, match="max_queued_tokens"):  # alone it would fit
                    await api.completions.create(model=MODEL, prompt=[1] * 299, max_tokens=2)
                second = asyncio.create_task(api.completions.create(model=MODEL, prompt="Say 2.", max_tokens=2))
                await until(queued(2), "the second request to be queued")
                with pytest.raises(openai.RateLimitError, match="max_queued_requests"):
                    await api.completions.create(model=MODEL, prompt="One too many.", max_tokens=2)
            finally:
                os.kill(pid, signal.SIGCONT)
            return await asyncio.gather(first, second)

    assert all(a.choices[0].finish_reason in ("stop", "length") for a in run(body()))


def test_sigterm_drains_then_exits_0(small, certificates):
    """Last: it stops the deployment. A short request in flight finishes, a new one is refused, a long one
    ends with an error at the shutdown timeout, and the process exits 0."""
    async def body():
        async with async_client(small) as api:
            long = await api.completions.create(model=MODEL, prompt="Count from one to a thousand:", stream=True,
                                                **LONG)
            await anext(aiter(long))
            short = asyncio.create_task(api.completions.create(model=MODEL, prompt="Count to five:", max_tokens=32,
                                                               temperature=0, extra_body={"ignore_eos": True}))
            # Polled, so a short request that was admitted and already done also counts: with 8 tokens it once
            # finished between two polls, and the wait ran out.
            await until(lambda: short.done() or stats(small, certificates["client"])["in_flight"] == 2,
                        "the short request")
            small.process.send_signal(signal.SIGTERM)
            await until(lambda: http(small, "/health")[0] == 503, "the drain to begin", timeout=10)
            with pytest.raises(openai.InternalServerError) as refused:
                await api.completions.create(model=MODEL, prompt="Too late.", max_tokens=2)
            assert refused.value.status_code == 503
            with pytest.raises(openai.APIError, match="shutting down") as ended:
                async for _ in long:
                    pass
            assert ended.value.body["code"] == 503  # as a whole answer that fails while draining gets
            return await short

    answer = run(body(), timeout=120)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 32
    assert small.process.wait(30) == 0
