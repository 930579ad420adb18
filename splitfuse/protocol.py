"""Wire messages of both links: client <-> frontend and frontend <-> worker (docs/protocol.md).

Every message is one ZeroMQ frame holding a msgpack map with a "type", the protocol version "v"
and the fields of that type. Token ids travel as packed little-endian int32 bytes. msgpack only,
never a Python object serializer: a peer that is not ours can speak this, and a malformed message
is an error reply, never code.
Imported by the frontend and the worker alike, so it imports neither torch nor zmq."""
import reprlib
import struct
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import msgpack

VERSION = 1
MAX_MESSAGE_BYTES = 16 << 20   # larger frames are refused before they are unpacked
MAX_TIMEOUT = 86400.0          # seconds: a request's timeout is at most a day
ID_FIELDS = ("prompt_ids", "token_ids")  # list[int] in Python, packed int32 bytes on the wire


class ProtocolError(ValueError):
    """A message that cannot be accepted; `request_id` is its id when one could be read."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


def pack_ids(ids: list[int]) -> bytes:
    try:
        return struct.pack(f"<{len(ids)}i", *ids)
    except struct.error:
        raise ValueError("token ids must be 32-bit integers") from None


def unpack_ids(data: bytes) -> list[int]:
    if len(data) % 4:
        raise ValueError(f"packed token ids must be a multiple of 4 bytes (int32), got {len(data)} bytes")
    return list(struct.unpack(f"<{len(data) // 4}i", data))


# --- client -> frontend (generate and abort also frontend -> worker) -------------------------

@dataclass(slots=True)
class Generate:
    """Start a request. Exactly one of prompt (text), messages (chat) or prompt_ids is given;
    the worker link always carries prompt_ids. `params` holds SamplingParams fields."""
    TYPE: ClassVar[str] = "generate"
    id: str
    prompt: str | None = None
    messages: list | None = None
    prompt_ids: list[int] | None = None
    params: dict = field(default_factory=dict)
    stream: bool = True
    timeout: float | None = None   # seconds; None: the server's default

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("id must be a non-empty string")
        if sum(x is not None for x in (self.prompt, self.messages, self.prompt_ids)) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_ids")
        if not all(isinstance(k, str) for k in self.params):
            raise ValueError("params must map sampling parameter names (strings) to values")
        # `not 0 < t <= MAX` also refuses NaN, which compares false with everything.
        if self.timeout is not None and not 0 < self.timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be a positive number of seconds, at most {MAX_TIMEOUT:.0f}, "
                             f"got {reprlib.repr(self.timeout)}")


def prompt_fields(prompt: str | list[int] | list[dict]) -> dict:
    """Generate's prompt field for a prompt given as text, token ids or chat messages."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return {"prompt_ids": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return {"messages": prompt}
    raise ValueError("a prompt must be a string, a list of token ids, or a list of chat messages "
                     "[{'role': ..., 'content': ...}]")


@dataclass(slots=True)
class Abort:
    """Cancel a request; the reply is its final delta with finish_reason "abort"."""
    TYPE: ClassVar[str] = "abort"
    id: str


@dataclass(slots=True)
class Health:
    """Request (only `id`) and reply (`ok`: some replica serves; `replicas`: one map each)."""
    TYPE: ClassVar[str] = "health"
    id: str | None = None
    ok: bool | None = None
    replicas: list | None = None


@dataclass(slots=True)
class Stats:
    """Request (only `id`) and reply (`stats`: in-flight requests, per-replica load and engine stats)."""
    TYPE: ClassVar[str] = "stats"
    id: str | None = None
    stats: dict | None = None


# --- frontend -> client (delta and error also worker -> frontend) ----------------------------

@dataclass(slots=True)
class Delta:
    """New tokens of one request. The last delta of a request has a finish_reason ("stop", "length",
    "abort" or "error", the latter with `error` set) and its `prompt_length`. A request sent with
    stream=false gets a single delta holding the whole response. Workers send no text."""
    TYPE: ClassVar[str] = "delta"
    id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list | None = None        # of token_ids, when the request asked for logprobs
    top_logprobs: list | None = None    # per token: {token id: logprob}
    prompt_length: int | None = None
    num_cached_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache; on the last delta
    prompt_logprobs: list | None = None  # per prompt token: nil for the first, then {token id: logprob} holding
                                         # it and the top ones; once, with the first token, when asked


@dataclass(slots=True)
class Error:
    """A message was refused (malformed, unknown type, wrong version, invalid request); `id` is the
    refused request's id when it could be read. Ends that request: nothing else is sent for it."""
    TYPE: ClassVar[str] = "error"
    id: str | None
    error: str


# --- frontend <-> worker only -----------------------------------------------------------------

@dataclass(slots=True)
class Ready:
    """The worker loaded its model and takes requests. `secret` proves it belongs to this frontend: the
    secret it was given on its standard input, or for a worker that joins by itself (`replica` -1, `name`
    set) the token shared with the frontend. The frontend ignores a ready message without it, and refuses
    a joining worker whose model (`model_hash`, `max_model_len`) or `block_size` differs from its own."""
    TYPE: ClassVar[str] = "ready"
    replica: int
    pid: int
    model_dir: str
    max_model_len: int
    eos_token_ids: list
    secret: str
    name: str | None = None          # a joining worker's name at the frontend
    model_hash: str | None = None    # config.model_fingerprint of its model directory
    block_size: int | None = None


@dataclass(slots=True)
class Welcome:
    """To a joining worker: it is replica `replica` now, and requests follow."""
    TYPE: ClassVar[str] = "welcome"
    replica: int


@dataclass(slots=True)
class Refuse:
    """To a joining worker: not taken, for the reason in `error`. `retry` false: only another configuration
    helps (a wrong token, another model), so the worker exits with an error; true: joining again later may
    work (its name is in use, the frontend is starting, or it no longer knows this worker)."""
    TYPE: ClassVar[str] = "refuse"
    error: str
    retry: bool


@dataclass(slots=True)
class Output:
    """What one step produced for one request: an entry of Step.outputs, not a message of its own.
    The last output of a request has a finish_reason (and `error` when that is "error") and its
    `num_cached_tokens`."""
    id: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list | None = None        # of token_ids, when the request asked for logprobs
    top_logprobs: list | None = None    # per token: {token id: logprob}
    num_cached_tokens: int | None = None
    prompt_logprobs: list | None = None  # as Delta's


@dataclass(slots=True)
class Step:
    """Everything one engine step produced: one message per step, whatever the number of requests."""
    TYPE: ClassVar[str] = "step"
    outputs: list[Output]


@dataclass(slots=True)
class Heartbeat:
    """Sent by an idle or busy worker every second, and when it drains; carries Engine.stats(). The frontend
    sends joined workers one (stats empty) every second, so they notice when it is gone."""
    TYPE: ClassVar[str] = "heartbeat"
    stats: dict


Message = Generate | Abort | Health | Stats | Delta | Error | Ready | Welcome | Refuse | Step | Heartbeat

# What each receiver accepts.
CLIENT_REQUESTS = (Generate, Abort, Health, Stats)   # frontend, from clients
SERVER_REPLIES = (Delta, Error, Health, Stats)       # client, from the frontend
WORKER_REQUESTS = (Generate, Abort, Welcome, Refuse, Heartbeat)  # worker, from the frontend
WORKER_REPLIES = (Ready, Step, Error, Heartbeat)     # frontend, from workers
NESTED = {"outputs": Output}  # fields holding a list of maps of another class


def encode(message: Message) -> bytes:
    try:
        return msgpack.packb({"type": message.TYPE, "v": VERSION, **_body(message)}, use_bin_type=True)
    except (TypeError, OverflowError) as e:  # e.g. an integer over 64 bits, or an object msgpack has no type for
        raise ValueError(f"{message.TYPE} message cannot be sent: {e}") from None


def _body(message) -> dict[str, Any]:
    body = {}
    for f in fields(message):
        value = getattr(message, f.name)
        if f.name in ID_FIELDS and value is not None:
            value = pack_ids(value)
        elif f.name in NESTED:
            value = [_body(item) for item in value]
        body[f.name] = value
    return body


def decode(frame: bytes, accepted: tuple[type, ...]) -> Message:
    """One frame into a message of one of the `accepted` classes; ProtocolError otherwise."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"message is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"a message must be a msgpack map, got {type(body).__name__}")
    request_id = body.get("id") if isinstance(body.get("id"), str) else None
    if type(body.get("v")) is not int or body["v"] != VERSION:  # by type too: true == 1 in Python
        raise ProtocolError(f"protocol version {reprlib.repr(body.get('v'))} is not supported; "
                            f"this peer speaks v{VERSION}", request_id)
    classes = {cls.TYPE: cls for cls in accepted}
    cls = classes.get(body.get("type")) if isinstance(body.get("type"), str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {reprlib.repr(body.get('type'))}; "
                            f"expected one of {sorted(classes)}", request_id)
    try:
        return cls(**_fields_of(cls, body))
    except ValueError as e:
        raise ProtocolError(f"invalid {cls.TYPE} message: {e}", request_id) from None


def _fields_of(cls: type, body: dict) -> dict[str, Any]:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(map(str, set(body) - set(known) - {"type", "v"}))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; valid: {sorted(known)}")
    missing = [name for name, f in known.items()
               if name not in body and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    values = {}
    for name in known.keys() & body.keys():
        value = body[name]
        if name in ID_FIELDS and value is not None:
            if not isinstance(value, bytes):
                raise ValueError(f"{name} must be packed little-endian int32 bytes")
            value = unpack_ids(value)
        elif name in NESTED:
            if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
                raise ValueError(f"{name} must be an array of maps")
            value = [NESTED[name](**_fields_of(NESTED[name], item)) for item in value]
        elif not _matches(value, known[name].type):
            raise ValueError(f"field {name!r} has the wrong type {type(value).__name__}")
        values[name] = value
    return values


def _matches(value: Any, annotation: Any) -> bool:
    """Shallow type check against a field annotation (container contents are checked by their users)."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    annotation = typing.get_origin(annotation) or annotation
    if annotation in (int, float) and isinstance(value, bool):
        return False
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(value, annotation)
