"""Wire messages: packing of token ids, round trips, and the refusal of malformed messages."""
import re

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitfuse import protocol
from splitfuse.config import SamplingParams
from splitfuse.protocol import ProtocolError


def test_token_ids_are_int32_ids_in_arrays():
    frame = protocol.encode(protocol.Generate("a", prompt_ids=[0, 7, 2**31 - 1]))
    assert msgpack.unpackb(frame)["prompt_ids"] == [0, 7, 2**31 - 1]
    for bad in (-1, 2**31):
        with pytest.raises(ProtocolError, match=r"prompt_ids\[1\]"):
            protocol.decode(protocol.encode(protocol.Generate("a", prompt_ids=[1, bad])), protocol.CLIENT_REQUESTS)


@pytest.mark.parametrize("message, accepted", [
    (protocol.Generate("a", prompt="hi", params=SamplingParams(max_new_tokens=3, stop="x"), stream=False, timeout=2.5),
     protocol.CLIENT_REQUESTS),
    (protocol.Generate("b", messages=[{"role": "user", "content": "hi"}]), protocol.CLIENT_REQUESTS),
    (protocol.Generate("c", prompt_ids=[1, 2, 3]), protocol.WORKER_REQUESTS),
    (protocol.Abort("a"), protocol.CLIENT_REQUESTS),
    (protocol.Health("h"), protocol.CLIENT_REQUESTS),
    (protocol.Stats(stats={"in_flight": 0}), protocol.SERVER_REPLIES),
    (protocol.Delta("a", [7, 8], "xy", "length", logprobs=[-0.5, -1.0], top_logprobs=[{7: -0.5}, {8: -1.0}],
                    prompt_length=3), protocol.SERVER_REPLIES),
    (protocol.Error(None, "no"), protocol.SERVER_REPLIES),
    (protocol.Ready(1, 123, "/m", 512, "s3cret"), protocol.WORKER_REPLIES),
    (protocol.Heartbeat({"blocks_in_use": 0}), protocol.WORKER_REPLIES),
    (protocol.Step([protocol.Output("a", [5]), protocol.Output("b", [6], "stop", logprobs=[-0.1],
                                                               top_logprobs=[{6: -0.1}], num_cached_tokens=16)]),
     protocol.WORKER_REPLIES),
])
def test_round_trip(message, accepted):
    assert protocol.decode(protocol.encode(message), accepted) == message


def test_every_message_has_type_and_version():
    body = msgpack.unpackb(protocol.encode(protocol.Delta("a", [1, 2])))
    assert body["type"] == "delta" and body["v"] == protocol.VERSION == 2 and body["token_ids"] == [1, 2]


def test_a_step_is_one_message_with_every_requests_outputs():
    body = msgpack.unpackb(protocol.encode(protocol.Step([protocol.Output("a", [1, 2]), protocol.Output("b", [3])])))
    assert body["type"] == "step" and [o["token_ids"] for o in body["outputs"]] == [[1, 2], [3]]
    for outputs, words in (("x", "got `str` - at `$.outputs`"), ([{"id": "a", "colour": 1}], "unknown field `colour`")):
        with pytest.raises(ProtocolError, match=re.escape(words)):
            protocol.decode(msgpack.packb({"type": "step", "v": 2, "outputs": outputs}), protocol.WORKER_REPLIES)


def test_optional_fields_may_be_left_out():
    frame = msgpack.packb({"type": "generate", "v": 2, "id": "x", "prompt": "hi"})
    assert protocol.decode(frame, protocol.CLIENT_REQUESTS) == protocol.Generate("x", prompt="hi")


def _refusal(body, accepted=protocol.CLIENT_REQUESTS) -> ProtocolError:
    frame = body if isinstance(body, bytes) else msgpack.packb(body)
    with pytest.raises(ProtocolError) as info:
        protocol.decode(frame, accepted)
    return info.value


@pytest.mark.parametrize("body, request_id, words", [
    (b"\xc1", None, "not valid msgpack"),
    ([1, 2], None, "must be a msgpack map"),
    ({"type": "generate", "id": "a", "prompt": "x"}, "a", "version None"),
    ({"type": "generate", "v": 1, "id": "a", "prompt_ids": b"\x01\x00\x00\x00"}, "a", "version 1 is not supported"),
    ({"type": "generate", "v": 3, "id": "a", "prompt": "x"}, "a", "version 3"),
    ({"type": "generate", "v": True, "id": "a", "prompt": "x"}, "a", "version True"),  # True == 1, but not an int
    ({"type": "generate", "v": 2.0, "id": "a", "prompt": "x"}, "a", "version 2.0"),
    ({"type": ["generate"], "v": 2, "id": "a"}, "a", "unknown message type ['generate']"),
    ({"type": "frobnicate", "v": 2, "id": "a"}, "a", "unknown message type 'frobnicate'"),
    ({"type": "delta", "v": 2, "id": "a"}, "a", "unknown message type 'delta'"),  # a reply is no request
    ({"type": "generate", "v": 2, "prompt": "x"}, None, "missing required field `id`"),
    ({"type": "generate", "v": 2, "id": "", "prompt": "x"}, "", "length >= 1 - at `$.id`"),
    ({"type": "generate", "v": 2, "id": "a"}, "a", "exactly one of prompt, messages or prompt_ids"),
    ({"type": "generate", "v": 2, "id": "a", "prompt": "x", "prompt_ids": []}, "a", "exactly one"),
    ({"type": "generate", "v": 2, "id": "a", "prompt": 5}, "a", "got `int` - at `$.prompt`"),
    ({"type": "generate", "v": 2, "id": "a", "prompt_ids": b"\x01\x00\x00\x00"}, "a",
     "got `bytes` - at `$.prompt_ids`"),
    ({"type": "generate", "v": 2, "id": "a", "prompt": "x", "stream": 1}, "a", "got `int` - at `$.stream`"),
    ({"type": "generate", "v": 2, "id": "a", "prompt": "x", "timeout": -1}, "a", "> 0.0 - at `$.timeout`"),
    ({"type": "generate", "v": 2, "id": "a", "prompt": "x", "timeout": float("nan")}, "a", "at `$.timeout`"),
    ({"type": "generate", "v": 2, "id": "a", "prompt": "x", "timeout": float("inf")}, "a", "at `$.timeout`"),
    ({"type": "generate", "v": 2, "id": "a", "prompt": "x", "params": {1: 2}}, "a", "in `$.params`"),
    ({"type": "generate", "v": 2, "id": "a", "prompt": "x", "params": {"max_tokens": 3}}, "a",
     "unknown field `max_tokens` - at `$.params`"),
    ({"type": "generate", "v": 2, "id": "a", "prompt": "x", "params": {"top_p": 2.0}}, "a", "top_p must be in (0, 1]"),
    ({"type": "generate", "v": 2, "id": "a", "prompt": "x", "params": {"seed": 1.0}}, "a", "at `$.params.seed`"),
    ({"type": "generate", "v": 2, "id": "a", "prompt": "x", "max_tokens": 3}, "a", "unknown field `max_tokens`"),
    ({"type": "abort", "v": 2, "id": 7}, None, "got `int` - at `$.id`"),
])
def test_malformed_messages_are_refused_with_a_reason(body, request_id, words):
    error = _refusal(body)
    assert words in str(error)
    assert error.request_id == request_id


def test_frames_nested_too_deeply_or_constraints_that_break_their_reader_are_refused():
    """msgspec raises RecursionError on deep nesting, and a grammar's reader raises what it raises: each is a
    refusal, never an exception out of decode (which would end the loop serving everyone)."""
    pack = msgpack.packb
    head = pack("type") + pack("generate") + pack("v") + pack(2)
    deep_id = b"\x84" + head + pack("id") + b"\x91" * 200_000 + b"\x01" + pack("prompt") + pack("x")
    deep_messages = b"\x84" + head + pack("id") + pack("a") + pack("messages") + b"\x91" * 200_000 + b"\x01"
    for frame in (deep_id, deep_messages):
        assert "nested too deeply" in str(_refusal(frame))
    for structured, words in (({"grammar": "root ::= x"}, "Rule 'x' not found"),
                              ({"grammar": "root ::= [\\"}, "IndexError"), ({"json": "[" * 100_000}, "RecursionError")):
        error = _refusal({"type": "generate", "v": 2, "id": "a", "prompt": "x", "params": {"structured": structured}})
        assert words in str(error) and error.request_id == "a"


def test_oversized_frames_are_refused_before_unpacking():
    assert "exceeds the limit" in str(_refusal(b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1)))


def test_values_msgpack_cannot_carry_are_a_value_error_before_sending():
    with pytest.raises(ValueError, match="cannot be sent"):
        protocol.encode(protocol.Delta("a", [2**64]))


packable = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=8),
              st.binary(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)
bodies = st.fixed_dictionaries(
    {}, optional={"type": st.one_of(st.sampled_from(["generate", "abort", "health", "stats", "delta", "ready"]),
                                    packable),
                  "v": st.one_of(st.just(protocol.VERSION), packable), "id": st.one_of(st.text(max_size=4), packable),
                  "prompt": packable, "prompt_ids": packable, "messages": packable, "params": packable,
                  "stream": packable, "timeout": packable, "token_ids": packable, "secret": packable})


@settings(max_examples=300, deadline=None, database=None)
@given(frame=st.one_of(st.binary(max_size=64), packable.map(msgpack.packb), bodies.map(msgpack.packb)))
def test_any_frame_decodes_to_a_message_or_a_protocol_error(frame):
    for accepted in (protocol.CLIENT_REQUESTS, protocol.WORKER_REQUESTS, protocol.WORKER_REPLIES):
        try:
            message = protocol.decode(frame, accepted)
        except ProtocolError as e:
            assert str(e)
        else:
            assert isinstance(message, accepted)
            frame = protocol.encode(message)  # compared as bytes: a NaN inside is not equal to itself
            assert protocol.encode(protocol.decode(frame, accepted)) == frame
