"""The worker's loop over its socket, driven from a frontend's side of an in-process link."""
import time

from splitfuse import protocol
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.worker.engine import Engine


def test_a_request_sent_without_streaming_gets_its_first_token_at_once_and_the_rest_in_one_piece(make_checkpoint,
                                                                                               worker_link):
    """Its first output tells the frontend that it started; the others are joined until it ends, tokens and
    log-probabilities as a streamed twin's, one at a step, arrive."""
    engine = Engine(EngineConfig(model=str(make_checkpoint("llama")), dtype="float32", device="cpu", eager=True,
                                 num_blocks=64, token_budget=64, max_num_seqs=4), progress=False)
    frontend, identity = worker_link(engine)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=2)
    for rid, stream in (("streamed", True), ("whole", False)):
        frontend.send_multipart([identity, protocol.encode(protocol.Generate(rid, prompt_ids=[1, 2, 3],
                                                                             params=params, stream=stream))])
    outputs: dict[str, list[protocol.Output]] = {"streamed": [], "whole": []}
    while not all(outs and outs[-1].finish_reason for outs in outputs.values()):
        assert frontend.poll(30_000), f"the worker went silent: {outputs}"
        msg = protocol.decode(frontend.recv_multipart()[1], protocol.WORKER_REPLIES)
        if isinstance(msg, protocol.Step):
            for out in msg.outputs:
                outputs[out.id].append(out)
    streamed, whole = outputs["streamed"], outputs["whole"]
    assert len(streamed) == 6 and [len(o.token_ids) for o in whole] == [1, 5]
    assert whole[-1].finish_reason == "length" and whole[0].finish_reason is None
    joined = protocol.Output.join(whole)
    assert joined.token_ids == [t for o in streamed for t in o.token_ids]
    assert joined.logprobs == [p for o in streamed for p in o.logprobs]
    assert joined.top_logprobs == [p for o in streamed for p in o.top_logprobs]


def test_a_request_sent_without_streaming_takes_the_batch_budget_while_none_streams(make_checkpoint, worker_link):
    """Its steps carry up to batch_token_budget tokens: its 20-token prompt goes in one step, not three."""
    engine = Engine(EngineConfig(model=str(make_checkpoint("llama")), dtype="float32", device="cpu", eager=True,
                                 num_blocks=64, token_budget=8, batch_token_budget=32), progress=False)
    steps: list[int] = []  # tokens of each step
    schedule = engine.scheduler.schedule

    def counted():
        chunks = schedule()
        steps.append(sum(c.num_tokens for c in chunks))
        return chunks
    engine.scheduler.schedule = counted
    frontend, identity = worker_link(engine)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    frontend.send_multipart([identity, protocol.encode(protocol.Generate("whole", prompt_ids=list(range(1, 21)),
                                                                         params=params, stream=False))])
    finished = False
    while not finished:
        assert frontend.poll(30_000), "the worker went silent"
        msg = protocol.decode(frontend.recv_multipart()[1], protocol.WORKER_REPLIES)
        finished = isinstance(msg, protocol.Step) and any(o.finish_reason for o in msg.outputs)
    assert [n for n in steps if n][:2] == [20, 1]


def test_a_request_the_worker_cannot_read_ends_with_an_error_and_the_worker_serves_on(make_checkpoint, worker_link):
    """A frontend of another version (a remote worker's, say) sends a field this worker does not know: that request
    gets an error naming it, where it had waited for ever, and the next request is served."""
    import msgspec
    engine = Engine(EngineConfig(model=str(make_checkpoint("llama")), dtype="float32", device="cpu", eager=True,
                                 num_blocks=64, token_budget=64), progress=False)
    frontend, identity = worker_link(engine)
    unknown = msgspec.msgpack.decode(protocol.encode(protocol.Generate("unread", prompt_ids=[1, 2, 3])))
    unknown["priority"] = 1
    frontend.send_multipart([identity, msgspec.msgpack.encode(unknown)])
    frontend.send_multipart([identity, protocol.encode(protocol.Generate(
        "next", prompt_ids=[1, 2, 3], params=SamplingParams(max_new_tokens=2, ignore_eos=True)))])
    replies: dict[str, list] = {"unread": [], "next": []}
    deadline = time.monotonic() + 60  # its heartbeats go on either way
    while not (replies["unread"] and replies["next"] and replies["next"][-1].finish_reason):
        assert time.monotonic() < deadline and frontend.poll(30_000), f"no answer to both: {replies}"
        msg = protocol.decode(frontend.recv_multipart()[1], protocol.WORKER_REPLIES)
        if isinstance(msg, protocol.Error):
            replies[msg.id].append(msg)
        elif isinstance(msg, protocol.Step):
            for out in msg.outputs:
                replies[out.id].append(out)
    [error] = replies["unread"]
    assert "could not read this request" in error.error and "priority" in error.error
    assert sum(len(o.token_ids) for o in replies["next"]) == 2
