"""Wire messages of both links: client <-> frontend and frontend <-> worker (docs/protocol.md).

Every message is one ZeroMQ frame holding a msgpack map with a "type", the protocol version "v"
and the fields of that type. The message types below are declared once and used end to end: the
worker fills Output, the frontend hands clients the same Delta its users get. msgspec decodes and
validates a frame into one of them in one pass. msgpack only, never a Python object serializer: a
peer that is not ours can speak this, and a malformed message is an error reply, never code.
Imported by the frontend and the worker alike, so it imports neither torch nor zmq."""
import functools
import reprlib
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

from splitfuse.config import SamplingParams

VERSION = 2
MAX_MESSAGE_BYTES = 16 << 20   # larger frames are refused before they are unpacked
MAX_TIMEOUT = 86400.0          # seconds: a request's timeout is at most a day
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]  # int32 in the worker's tensors
Count = Annotated[int, Meta(ge=0)]


class ProtocolError(ValueError):
    """A message that cannot be accepted; `request_id` is its id when one could be read."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class _Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """A message of its own: "type" (the class's tag) and "v" lead its map."""
    v: int = VERSION


# --- client -> frontend (generate and abort also frontend -> worker) -------------------------

class Generate(_Message, tag="generate"):
    """Start a request. Exactly one of prompt (text), messages (chat) or prompt_ids is given;
    the worker link always carries prompt_ids and every field of `params`. There, stream=false asks the
    worker for the request's outputs in one piece, when it ends, rather than a piece a step."""
    id: Annotated[str, Meta(min_length=1)]
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_ids: list[TokenId] | None = None
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = True
    timeout: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT)] | None = None  # seconds; None: the server's default

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.prompt, self.messages, self.prompt_ids)) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_ids")


def prompt_fields(prompt: str | list[int] | list[dict]) -> dict:
    """Generate's prompt field for a prompt given as text, token ids or chat messages."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"prompt_ids": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return {"messages": prompt}
    raise ValueError("a prompt must be a string, a list of token ids, or a list of chat messages "
                     "[{'role': ..., 'content': ...}]")


class Abort(_Message, tag="abort"):
    """Cancel a request; the reply is its final delta with finish_reason "abort"."""
    id: str


class Health(_Message, tag="health"):
    """Request (only `id`) and reply (`ok`: some replica serves; `replicas`: one map each)."""
    id: str | None = None
    ok: bool | None = None
    replicas: list[dict[str, Any]] | None = None


class Stats(_Message, tag="stats"):
    """Request (only `id`) and reply (`stats`: in-flight requests, per-replica load and engine stats)."""
    id: str | None = None
    stats: dict[str, Any] | None = None


# --- frontend -> client (delta and error also worker -> frontend) ----------------------------

class Delta(_Message, tag="delta"):
    """New tokens and text of one request: what the clients, pipeline() and the server's own ZeroMQ
    socket hand their users. The last delta of a request has a finish_reason ("stop", "length",
    "abort" or "error", the latter with `error` set), its `prompt_length` and `num_cached_tokens`. A
    request sent with stream=false gets a single delta holding the whole response."""
    id: str
    token_ids: list[int] = []
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[float] | None = None                    # of token_ids, when the request asked for logprobs
    top_logprobs: list[dict[int, float]] | None = None     # per token: {token id: logprob}
    prompt_length: int | None = None
    num_cached_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache; on the last delta
    prompt_logprobs: list[dict[int, float] | None] | None = None  # per prompt token: None for the first, then
    # {token id: logprob} holding it and the top ones; once, with the first token, when asked


class Error(_Message, tag="error"):
    """A message was refused (malformed, unknown type, wrong version, invalid request); `id` is the
    refused request's id when it could be read. Ends that request: nothing else is sent for it."""
    id: str | None
    error: str


# --- frontend <-> worker only -----------------------------------------------------------------

class Ready(_Message, tag="ready"):
    """The worker loaded its model and takes requests. `secret` proves it belongs to this frontend: the
    secret it was given on its standard input, or for a worker that joins by itself (`replica` -1, `name`
    set) the token shared with the frontend. The frontend ignores a ready message without it, and refuses
    a joining worker whose model (`model_hash`, `max_model_len`) or `block_size` differs from its own."""
    replica: int
    pid: int
    model_dir: str
    max_model_len: int
    secret: str
    name: str | None = None          # a joining worker's name at the frontend
    model_hash: str | None = None    # config.model_fingerprint of its model directory
    block_size: int | None = None


class Welcome(_Message, tag="welcome"):
    """To a joining worker: it is replica `replica` now, and requests follow."""
    replica: int


class Refuse(_Message, tag="refuse"):
    """To a joining worker: not taken, for the reason in `error`. `retry` false: only another configuration
    helps (a wrong token, another model), so the worker exits with an error; true: joining again later may
    work (its name is in use, the frontend is starting, or it no longer knows this worker)."""
    error: str
    retry: bool


class Output(msgspec.Struct, forbid_unknown_fields=True):
    """What one step produced for one request, as the engine returns it: an entry of Step.outputs, not a
    message of its own. The last output of a request has a finish_reason (and `error` when that is
    "error") and its `num_cached_tokens`. The frontend checks its token ids against the vocabulary."""
    id: str
    token_ids: list[int] = []
    finish_reason: Literal["stop", "length", "abort", "error"] | None = None
    error: str | None = None
    logprobs: list[float] | None = None     # of token_ids, when the request asked for logprobs
    top_logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}
    num_cached_tokens: Count | None = None  # prompt tokens that came from the prefix cache
    prompt_logprobs: list[dict[int, float] | None] | None = None  # as Delta's

    def __post_init__(self) -> None:
        for name in ("logprobs", "top_logprobs"):
            if getattr(self, name) is not None and len(getattr(self, name)) != len(self.token_ids):
                raise ValueError(f"{name} must have one entry per token")
        if self.prompt_logprobs is not None and (not self.prompt_logprobs or self.prompt_logprobs[0] is not None
                                                 or None in self.prompt_logprobs[1:]):
            raise ValueError("prompt_logprobs must be nil, then one map per prompt token")

    @staticmethod
    def join(outputs: list["Output"]) -> "Output":
        """Consecutive outputs of one request as one: the tokens (and log-probabilities) of all, the end of the last."""
        first, last = outputs[0], outputs[-1]

        def all_of(name: str) -> list | None:
            parts = [getattr(o, name) for o in outputs]
            return None if all(p is None for p in parts) else [x for p in parts for x in p or []]
        return Output(last.id, [t for o in outputs for t in o.token_ids], last.finish_reason, last.error,
                      all_of("logprobs"), all_of("top_logprobs"), last.num_cached_tokens, first.prompt_logprobs)


class Step(_Message, tag="step"):
    """Everything one engine step produced: one message per step, whatever the number of requests."""
    outputs: list[Output]


class Heartbeat(_Message, tag="heartbeat"):
    """Sent by an idle or busy worker every second, and when it drains; carries Engine.stats(). The frontend
    sends joined workers one (stats empty) every second, so they notice when it is gone."""
    stats: dict[str, Count]  # the router and /metrics add them up


Message = Generate | Abort | Health | Stats | Delta | Error | Ready | Welcome | Refuse | Step | Heartbeat

# What each receiver accepts.
CLIENT_REQUESTS = (Generate, Abort, Health, Stats)   # frontend, from clients
SERVER_REPLIES = (Delta, Error, Health, Stats)       # client, from the frontend
WORKER_REQUESTS = (Generate, Abort, Welcome, Refuse, Heartbeat)  # worker, from the frontend
WORKER_REPLIES = (Ready, Step, Error, Heartbeat)     # frontend, from workers

_encoder = msgspec.msgpack.Encoder()


def encode(message: Message) -> bytes:
    try:
        return _encoder.encode(message)
    except (TypeError, OverflowError) as e:  # e.g. an integer over 64 bits, or an object msgpack has no type for
        raise ValueError(f"{type(message).__name__.lower()} message cannot be sent: {e}") from None


class _Head(msgspec.Struct):
    """The keys every message has, read before the rest: a peer of another version learns that, not
    which of its fields differ; and a message without "v" is refused, though Python code leaves it out."""
    type: Any = None
    v: Any = None
    id: Any = None


_head = msgspec.msgpack.Decoder(_Head)


@functools.cache
def _decoder(accepted: tuple[type, ...]) -> tuple[msgspec.msgpack.Decoder, list[str]]:
    return msgspec.msgpack.Decoder(Union[accepted]), sorted(cls.__struct_config__.tag for cls in accepted)


def decode(frame: bytes, accepted: tuple[type, ...]) -> Message:
    """One frame into a message of one of the `accepted` classes; ProtocolError otherwise."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")
    try:
        head = _head.decode(frame)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"a message must be a msgpack map ({e})") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"message is not valid msgpack ({e})") from None
    except RecursionError:
        raise ProtocolError("message is nested too deeply") from None
    request_id = head.id if isinstance(head.id, str) else None
    if type(head.v) is not int or head.v != VERSION:  # by type too: true == 1 in Python
        raise ProtocolError(f"protocol version {reprlib.repr(head.v)} is not supported; this peer speaks "
                            f"v{VERSION}", request_id)
    decoder, types = _decoder(accepted)
    if not isinstance(head.type, str) or head.type not in types:
        raise ProtocolError(f"unknown message type {reprlib.repr(head.type)}; expected one of {types}", request_id)
    try:
        return decoder.decode(frame)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"invalid {head.type} message: {e}", request_id) from None
    except Exception as e:  # RecursionError, or what a check in a __post_init__ let through: still a refusal
        raise ProtocolError(f"invalid {head.type} message: {type(e).__name__}: {e}", request_id) from None
