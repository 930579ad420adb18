"""The OpenAI-compatible HTTP API over the frontend core: /v1/models, /v1/completions,
/v1/chat/completions (streamed as server-sent events ending in `data: [DONE]`), /health, /metrics.

FastAPI runs on uvicorn in a thread of its own; the core lives on the server's main thread, so a
request is handed to it with `call_soon`, and its deltas come back through the event loop's
`call_soon_threadsafe`. A client that disconnects from a stream ends the response generator,
which aborts its requests (their KV blocks are freed). Refusals map to OpenAI error objects:
400 bad request, 401 bad API key, 404 unknown model, 429 queues full, 503 no replica ready or
shutting down. Sampling fields follow OpenAI, plus vLLM's extras (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids)."""
import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Literal

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator
from starlette.exceptions import HTTPException

from splitfuse.config import (MAX_INT32, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY, MAX_STOP_CHARS, MAX_STOP_STRINGS,
                              MAX_STOP_TOKEN_IDS, MAX_TEMPERATURE, MIN_TEMPERATURE, REPETITION_PENALTY,
                              SamplingParams)
from splitfuse.frontend.core import Core, Overloaded, Unavailable
from splitfuse.protocol import Delta
from splitfuse.frontend.tools import ToolFormat
from splitfuse.grammar import ERROR_PREFIX as CONSTRAINT_ERROR, MAX_CHOICES as MAX_GRAMMAR_CHOICES

MAX_CHOICES = 64   # n: choices of one prompt
MAX_TOOLS = 128
MAX_JSON_INT = 2**53 - 1  # exact as a double, so JSON clients that parse numbers as doubles agree on the bound
DISCONNECT_POLL = 0.5  # seconds between checks that a client waiting for a whole answer is still there
STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


# --- request schemas ------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


# Fields of the OpenAI and vLLM APIs that this server does not implement yet: refused by name, so that a
# client asking for JSON or a tool call is told, not handed free text.
UNSUPPORTED = ("functions", "function_call", "suffix", "best_of")
ROLES = ("system", "developer", "user", "assistant", "tool")
OPEN_PATHS = ("/health", "/metrics", "/openapi.json")  # probes and scrapers carry no key; every other path needs it
TOKEN_ID = "x-token-id"  # marks token-id schemas in the OpenAPI document until the vocabulary's bound replaces it
TOKEN_ID_TEXT = "x-token-id-text"  # the same for token ids written as text (logit_bias's keys)


def _integral(value):
    """JSON Schema's integer: 2 and 2.0, never true or "2" (the models are strict otherwise)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Int(**bounds):
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
# The document's bound is the served model's vocabulary (see _document); the tokenizer checks it.
TokenId = Annotated[Int(ge=0, le=MAX_INT32), Field(json_schema_extra={TOKEN_ID: True})]
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class JsonSchema(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["json_schema"]
    json_schema: JsonSchema


# OpenAI's response_format: free text, any JSON object, or JSON matching the schema that type json_schema must give.
ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


Choices = Annotated[list[Text], Field(min_length=1, max_length=MAX_GRAMMAR_CHOICES)]


def _one_of(kind: str, value_type) -> type[BaseModel]:
    """vLLM's structured_outputs holds exactly one constraint: one model per kind, each with only its key."""
    return create_model(f"{kind.title().replace('_', '')}Constraint", __config__=ConfigDict(extra="forbid", strict=True),
                        **{f"{kind}_": (value_type, Field(alias=kind))})


Constraint = (_one_of("json", dict | Text) | _one_of("json_object", Literal[True]) | _one_of("regex", Text)
              | _one_of("choice", Choices) | _one_of("grammar", Text))


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Sampling(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI-compatible servers do, but for
    the ones named in UNSUPPORTED."""
    # no "true" for 1, no 1 for true, as the document says; no NaN or infinity, which no bound would name
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    # The bounds SamplingParams checks, so that the OpenAPI document says them too.
    model: str | None = None
    max_tokens: Int(ge=1, le=MAX_INT32) | None = None
    n: Int(ge=1, le=MAX_CHOICES) = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)] | None = None  # OpenAI's default 1; 0 greedy
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: Int(ge=0, le=MAX_JSON_INT) | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP_STRINGS)] | None = None
    presence_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    top_k: Int(ge=-1, le=MAX_INT32) = 0  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.0
    repetition_penalty: Annotated[float, Field(ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1])] = 1.0
    min_tokens: Int(ge=0, le=MAX_INT32) = 0  # capped at max_tokens: the document cannot say one bounds the other
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    logit_bias: dict[Annotated[str, Field(json_schema_extra={TOKEN_ID_TEXT: True})],
                     Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = None
    prompt_logprobs: Int(ge=0, le=MAX_LOGPROBS) | None = None  # vLLM's: each prompt token's, and the top n
    # What the text must match (grammar.py): OpenAI's response_format, or vLLM's names.
    response_format: ResponseFormat | None = None
    structured_outputs: Constraint | None = None
    guided_json: dict | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Choices | None = None
    guided_grammar: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """Clients may send null for a field they leave at its default."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None}
        if asked := [name for name in UNSUPPORTED if name in data]:
            raise ValueError(f"{', '.join(asked)}: not supported by this server yet")
        return data

    def params(self, max_model_len: int, logprobs: int | None, echo: bool, choice: int,
               forced: dict | None = None) -> SamplingParams:
        """The SamplingParams of choice `choice` (choices of one seeded request get seeds seed, seed+1, ...)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        if 0 < temperature < MIN_TEMPERATURE:  # as vLLM: logits / a tinier one overflow
            temperature = MIN_TEMPERATURE
        max_new_tokens = self.max_tokens or max_model_len
        return SamplingParams.from_kwargs(
            max_new_tokens=max_new_tokens, min_new_tokens=min(self.min_tokens, max_new_tokens),
            do_sample=temperature > 0, temperature=temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=None if self.seed is None else self.seed + choice,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop or [],
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos, logprobs=logprobs,
            return_full_text=echo, logit_bias=_token_biases(self.logit_bias or {}), structured=self.structured(forced),
            prompt_logprobs=self.prompt_logprobs if self.prompt_logprobs is not None else logprobs if echo else None)

    def structured(self, forced: dict | None = None) -> dict | None:
        """The one constraint this request names, in grammar.py's form (`forced`: its tool_choice's)."""
        named = {"tool_choice": forced, "structured_outputs": None if self.structured_outputs is None
                 else self.structured_outputs.model_dump(by_alias=True),
                 **{f"guided_{kind}": None if value is None else {kind: value} for kind, value in (
                     ("json", self.guided_json), ("regex", self.guided_regex), ("choice", self.guided_choice),
                     ("grammar", self.guided_grammar))},
                 "response_format": _response_format(self.response_format)}
        asked = {name: value for name, value in named.items() if value is not None}
        if len(asked) > 1:
            raise ValueError(f"{' and '.join(asked)}: name one constraint on the text, not {len(asked)}")
        return next(iter(asked.values()), None)


class CompletionRequest(Sampling):
    max_tokens: Int(ge=1, le=MAX_INT32) | None = 16  # OpenAI's default for completions; chat's is the model's length
    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    logprobs: Int(ge=0, le=MAX_LOGPROBS) | None = None
    echo: bool = False


class Function(BaseModel):
    model_config = ConfigDict(strict=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema of the arguments
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["function"]
    function: Function


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["function"]
    function: FunctionName


class CalledFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class PastToolCall(BaseModel):
    """An earlier assistant message's call, sent back with the conversation."""
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal[ROLES]
    content: str | list[TextPart] | None = None
    tool_calls: list[PastToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None               # a tool's answer: to which call
    name: str | None = None


class TokenizePrompt(BaseModel):
    """vLLM's /tokenize of a prompt."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: Text
    add_special_tokens: bool = True


class TokenizeChat(BaseModel):
    """vLLM's /tokenize of chat messages, rendered with the generation prompt."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[TokenId]


class ChatRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: Int(ge=0, le=MAX_LOGPROBS) | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True  # with "auto" a model may write several; "required" and a name get one

    def forced_tools(self) -> list[dict] | None:
        """The tools one of which the answer must call (tool_choice "required", or the named one)."""
        if self.tool_choice is None or isinstance(self.tool_choice, str) and self.tool_choice in ("none", "auto"):
            return None
        if not self.tools:
            raise ApiError(400, "tool_choice names tools to call, but the request has no tools", "tool_choice")
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        if self.tool_choice == "required":
            return tools
        named = [t for t in tools if t["function"]["name"] == self.tool_choice.function.name]
        if not named:
            raise ApiError(400, f"tool_choice names {self.tool_choice.function.name!r}, which is not among the "
                                f"tools", "tool_choice")
        return named


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": STATUS_TYPES.get(status, "server_error"),
                                   "param": param, "code": status}}, status_code=status)


def _status_of(error: Exception) -> int:
    return 429 if isinstance(error, Overloaded) else 503 if isinstance(error, Unavailable) else 400


# --- the bridge to the core -------------------------------------------------------------------------

class CoreBridge:
    """Runs core calls on the core's thread and streams deltas back to this event loop."""

    def __init__(self, core: Core):
        self.core = core

    async def call(self, fn: Callable):
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except Exception as e:
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)
        self.core.call_soon(run)
        return await future

    async def generate(self, requests: list[tuple[SamplingParams, dict]], stream: bool
                       ) -> AsyncIterator[tuple[int, Delta]]:
        """(index of the request, its delta) as they come; raises the refusal of any request, leaving
        none of them running. Leaving early (a client gone) aborts those still running."""
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue = asyncio.Queue()
        keys: list[str] = []

        def submit_all() -> None:
            try:
                for i, (params, fields) in enumerate(requests):
                    sink = _sink(loop, arrived, i)
                    keys.append(self.core.submit(sink, params, stream=stream, **fields))
            except Exception:
                self._abort(keys)
                raise
        await self.call(submit_all)
        running = set(range(len(requests)))
        try:
            while running:
                i, event = await arrived.get()
                if isinstance(event, Exception):
                    raise event
                if event.finish_reason is not None:
                    running.discard(i)
                yield i, event
        finally:
            if running:
                self.core.call_soon(lambda: self._abort(keys))

    def _abort(self, keys: list[str]) -> None:
        for key in keys:  # a finished one is left alone
            self.core.abort(key)


def _sink(loop: asyncio.AbstractEventLoop, arrived: asyncio.Queue, index: int):
    def sink(event: Delta | Exception) -> None:
        with suppress(RuntimeError):  # the HTTP server's loop is closed: nobody is left to answer
            loop.call_soon_threadsafe(arrived.put_nowait, (index, event))
    return sink


def _settle(future: asyncio.Future, result, error: Exception | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


# --- the application --------------------------------------------------------------------------------

@dataclass(slots=True)
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8000                 # 0: a free one
    api_key: str | None = None       # required as `Authorization: Bearer <key>` but on OPEN_PATHS
    model_name: str | None = None    # the name clients give as `model`; None: the model directory's name
    # Limits against clients that would hold the server's memory, descriptors or queue:
    max_body_bytes: int = 8 << 20    # a larger body is refused (413) before it is read
    read_timeout: float = 15.0       # seconds for a request head, and a body's stall between two parts (408)
    max_connections: int = 512       # connections at once; more get 503 at once (uvicorn's limit_concurrency)
    keep_alive: float = 5.0          # seconds an idle connection is kept between requests
    max_choices: int = 128           # answers one request asks for (prompts times n)
    max_messages: int = 1024         # messages of one chat
    tool_call_parser: str = "hermes"  # how the served model writes tool calls (tools.TOOL_PARSERS)
    tool_format: ToolFormat = field(init=False)

    def __post_init__(self) -> None:
        self.tool_format = ToolFormat(self.tool_call_parser)  # a bad name fails here, at start


class Gate:
    """ASGI middleware in front of everything that reads a request: the API key is checked on /v1/* before
    any body is read; a body declared larger than the limit is refused unread (413), one that grows past it
    or stalls for read_timeout seconds between its parts is cut off (413, 408: raised as HTTPException, which
    FastAPI passes on from its body parsing as it is)."""

    def __init__(self, app, options: HttpOptions):
        self.app, self.options = app, options

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        key = self.options.api_key
        if key is not None and scope["path"] not in OPEN_PATHS and not hmac.compare_digest(
                headers.get(b"authorization", b""), f"Bearer {key}".encode()):
            return await _send_error(send, 401, "a valid API key is required: send the header "
                                                "`Authorization: Bearer <key>`")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.options.max_body_bytes:
            return await _send_error(send, 413, f"the request body is larger than this server takes "
                                                f"({self.options.max_body_bytes} bytes)")
        received, complete = 0, False

        async def limited() -> dict:
            nonlocal received, complete
            if complete:  # the body is in: what comes now (a disconnect) may take as long as a stream does
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.options.read_timeout)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body stalled for {self.options.read_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.options.max_body_bytes:
                    raise HTTPException(413, f"the request body is larger than this server takes "
                                             f"({self.options.max_body_bytes} bytes)")
            return message
        await self.app(scope, limited, send)


async def _send_error(send, status: int, message: str) -> None:
    response = _error_response(status, message)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def create_app(core: Core, model_name: str, options: HttpOptions) -> FastAPI:
    bridge = CoreBridge(core)
    app = FastAPI(title="splitfuse", docs_url=None, redoc_url=None)
    app.add_middleware(Gate, options=options)
    app.openapi = lambda: app.openapi_schema or _document(app, core.tokenizer.vocab_size, options.max_choices)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error_response(e.status, str(e), e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        def problem(err: dict) -> str:
            if err["type"] == "json_invalid":  # its loc is the character where the JSON broke
                return f"body: not JSON ({err['ctx']['error']} at character {err['loc'][-1]})"
            if err["loc"] == ("body",) and "json" not in request.headers.get("content-type", ""):
                return "body: a JSON object is expected, sent with Content-Type: application/json"
            return f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}"
        return _error_response(400, "; ".join(map(problem, e.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        response = _error_response(e.status_code, str(e.detail))
        response.headers.update(e.headers or {})  # a 405's Allow, say
        return response

    @app.get("/health")
    async def health():
        state = await bridge.call(core.health)
        return JSONResponse(state, status_code=200 if state["ok"] else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(core.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "splitfuse", "max_model_len": core.max_model_len}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """vLLM's: what a client needs to tokenize as the server does (lm-evaluation-harness reads it)."""
        tokenizer = core.tokenizer
        return {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                "chat_template": tokenizer.chat_template, "model_max_length": core.max_model_len,
                "vocab_size": tokenizer.vocab_size}

    @app.post("/tokenize")
    async def tokenize(body: TokenizePrompt | TokenizeChat):
        _check_model(body.model, model_name)
        if isinstance(body, TokenizeChat) and len(body.messages) > options.max_messages:
            raise ApiError(400, f"{len(body.messages)} messages; this server takes at most {options.max_messages}",
                           "messages")
        try:
            ids = await asyncio.to_thread(_tokenize, core.tokenizer, body)  # off the loop, as prompts are
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return {"count": len(ids), "max_model_len": core.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        _check_model(body.model, model_name)
        if not all(t < core.tokenizer.vocab_size for t in body.tokens):
            raise ApiError(400, f"tokens must be in [0, {core.tokenizer.vocab_size}), this model's vocabulary",
                           "tokens")
        return {"prompt": core.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, model_name)
        prompts = body.prompt if _is_batch(body.prompt) else [body.prompt]
        fields = [{"prompt": p} if isinstance(p, str) else {"prompt_ids": p} for p in prompts]
        echoed = [core.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts] \
            if body.echo and body.logprobs is not None else None
        answer = Completion(core, model_name, body.logprobs, body.prompt_logprobs is not None, echoed, body.n)
        return await _respond(bridge, request, answer, body,
                              await _requests(body, core, options, fields, body.logprobs, body.echo))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(body.model, model_name)
        if len(body.messages) > options.max_messages:
            raise ApiError(400, f"{len(body.messages)} messages in one chat; this server takes at most "
                                f"{options.max_messages}", "messages")
        body.max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        calling = bool(body.tools) and body.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if calling else None
        forced = body.forced_tools()
        fields = [{"messages": [_message(m) for m in body.messages], "tools": tools}]
        answer = ChatCompletion(core, model_name, logprobs, body.prompt_logprobs is not None,
                                options.tool_format if calling else None)
        return await _respond(bridge, request, answer, body, await _requests(
            body, core, options, fields, logprobs, False, forced and options.tool_format.constraint(forced)))

    return app


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """Every refusal: an OpenAI error object."""
    error: ErrorBody


def _document(app: FastAPI, vocab_size: int, max_choices: int) -> dict:
    """The OpenAPI document as the server answers: its refusals are OpenAI error objects with the statuses
    the Gate and the handlers give, not FastAPI's 422 validation errors; a field left out may also be null;
    token ids are bounded by this model's vocabulary."""
    app.openapi_schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    errors = {"400": "a bad parameter or prompt", "401": "a missing or wrong API key", "404": "an unknown model",
              "408": "a body that stalled", "413": "a body over the size limit", "429": "the queues are full",
              "503": "no replica ready, or shutting down"}
    reference = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in app.openapi_schema["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            if path not in OPEN_PATHS:
                operation["responses"] |= {status: {"description": text, "content": {
                    "application/json": {"schema": reference}}} for status, text in errors.items()}
            if path.endswith("completions"):  # "stream": true answers server-sent events
                operation["responses"]["200"]["content"]["text/event-stream"] = {}
    schemas = app.openapi_schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas |= {name: model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, model in (("ErrorResponse", ErrorResponse),)}
    schemas.update(schemas["ErrorResponse"].pop("$defs", {}))
    for name in ("CompletionRequest", "ChatRequest"):
        _nullable_defaults(schemas[name])
        _one_constraint(schemas[name])
    _tools_to_call(schemas["ChatRequest"])
    _bound_token_ids(schemas, vocab_size)
    for batch in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"][2:]:  # lists of prompts
        batch["maxItems"] = max_choices  # and prompts times n at most that: a product no schema states
    return app.openapi_schema


CONSTRAINTS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
               "guided_grammar")


def _given(*names: str) -> dict:
    """JSON Schema: these fields are present and not null (the server reads null as absent)."""
    return {"required": list(names), "properties": {name: {"not": {"type": "null"}} for name in names}}


def _one_constraint(schema: dict) -> None:
    """At most one constraint on the text (a response_format of type text is none, but is counted here)."""
    schema["allOf"] = [{"not": _given(a, b)} for i, a in enumerate(CONSTRAINTS) for b in CONSTRAINTS[i + 1:]]


def _tools_to_call(schema: dict) -> None:
    """tool_choice "required" or a named function needs tools, and no other constraint."""
    forcing = {"required": ["tool_choice"], "properties": {"tool_choice": {"anyOf": [
        {"const": "required"}, {"type": "object"}]}}}
    tools = {"required": ["tools"], "properties": {"tools": {"not": {"type": "null"}, "minItems": 1}}}
    schema["allOf"] += [{"if": forcing, "then": tools | {"allOf": [{"not": _given(c)} for c in CONSTRAINTS]}}]


def _nullable_defaults(schema: dict) -> None:
    """Sampling takes null for any field it has a default for."""
    required = set(schema.get("required", ()))
    for name, prop in schema["properties"].items():
        if name in required:
            continue
        kept = {key: prop.pop(key) for key in ("title", "default") if key in prop}
        variants = prop.pop("anyOf", None) or [dict(prop)]
        null = [] if {"type": "null"} in variants else [{"type": "null"}]
        schema["properties"][name] = kept | {"anyOf": variants + null}


def _bound_token_ids(node, vocab_size: int) -> None:
    if isinstance(node, dict):
        if node.pop(TOKEN_ID, False):
            node["maximum"] = vocab_size - 1
        if node.pop(TOKEN_ID_TEXT, False):
            node["pattern"] = f"^({_numbers_up_to(vocab_size - 1)})$"
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)


def _numbers_up_to(n: int) -> str:
    """A regex of the decimal numbers 0 to n, written without leading zeros."""
    digits = str(n)
    if len(digits) == 1:
        return f"[0-{n}]"
    shorter = ["0"] + [f"[1-9][0-9]{{{k - 1}}}" for k in range(1, len(digits))]
    below = [digits[:i] + f"[{int(i == 0)}-{int(d) - 1}]" + f"[0-9]{{{len(digits) - i - 1}}}"
             for i, d in enumerate(digits) if int(d) > int(i == 0)]
    return "|".join(shorter + below + [digits])


def _response_format(response_format: ResponseFormat | None) -> dict | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"json_object": True}
    return {"json": response_format.json_schema.schema_}


def _token_biases(logit_bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as strings (JSON object keys)."""
    if not all(key.isascii() and key.isdigit() for key in logit_bias):
        raise ValueError("logit_bias: keys must be token ids (strings of digits)")
    return {int(key): bias for key, bias in logit_bias.items()}


def _check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ApiError(404, f"the model {requested!r} does not exist; this server serves {served!r}", "model")


def _tokenize(tokenizer, body: TokenizePrompt | TokenizeChat) -> list[int]:
    if isinstance(body, TokenizeChat):
        return tokenizer.apply_chat_template([_message(m) for m in body.messages])
    return tokenizer.encode(body.prompt, body.add_special_tokens)


def _is_batch(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))


def _message(m: ChatMessage) -> dict:
    """A message as chat templates take it (transformers' form: a call's arguments as an object)."""
    content = m.content or "" if m.content is None or isinstance(m.content, str) else "".join(p.text for p in m.content)
    message = {"role": m.role, "content": content}
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in m.tool_calls]
    return message | {key: value for key, value in (("tool_call_id", m.tool_call_id), ("name", m.name)) if value}


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


async def _requests(body: Sampling, core: Core, options: HttpOptions, fields: list[dict], logprobs: int | None,
                    echo: bool, forced: dict | None = None) -> list[tuple[SamplingParams, dict]]:
    """Each prompt n times: choice index = prompt index * n + choice. Built off the event loop: a large
    constraint takes long to check the first time."""
    answers, queue = len(fields) * body.n, core.max_queued_requests
    if answers > options.max_choices:
        raise ApiError(400, f"this request asks for {answers} answers (prompts times n); this server gives at "
                            f"most {options.max_choices} to one request", "n")
    if queue is not None and answers > queue:
        raise ApiError(400, f"this request asks for {answers} answers (prompts times n); the server queues at "
                            f"most {queue} requests, so it could never be taken", "n")
    try:
        params = await asyncio.to_thread(lambda: [body.params(core.max_model_len, logprobs, echo, choice, forced)
                                                  for choice in range(body.n)])
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return [(p, f) for f in fields for p in params]


async def _respond(bridge: CoreBridge, request: Request, answer: "Answer", body: Sampling,
                   requests: list[tuple[SamplingParams, dict]]):
    events = bridge.generate(requests, stream=body.stream)
    try:  # refusals come before any status is sent: the first event of a stream, any event of a whole answer
        arrived = await _unless_disconnected(request, anext(events) if body.stream else _collect(events))
    except (ValueError, Overloaded, Unavailable) as e:
        raise ApiError(_status_of(e), str(e)) from None
    if arrived is None:  # the client left: its requests were aborted, nobody reads a reply
        return Response(status_code=499)
    if not body.stream:
        finals = arrived
        failed = next((d for d in finals.values() if d.finish_reason == "error"), None)
        if failed is not None:
            error = failed.error or "the request failed"
            raise ApiError(_failed_status(error, bridge.core.accepting), error)
        return answer.whole([finals[i] for i in range(len(requests))], body.n)
    usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(_sse(answer, arrived, events, len(requests), body.n, usage, bridge.core),
                             media_type="text/event-stream")


def _failed_status(error: str, accepting: bool) -> int:
    """The status of a request that failed in a worker: 400 where its own constraint failed it, else 500 (503
    while the server drains)."""
    return 400 if error.startswith(CONSTRAINT_ERROR) else 500 if accepting else 503


async def _collect(events: AsyncIterator[tuple[int, Delta]]) -> dict[int, Delta]:
    return {i: delta async for i, delta in events}


async def _unless_disconnected(request: Request, work):
    """The result of `work`, or None if the client disconnects first (then `work` is cancelled, which
    aborts its requests)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if not task.done() and await request.is_disconnected():
                return None
        return task.result()
    finally:
        task.cancel()  # a no-op once it is done


async def _sse(answer: "Answer", first: tuple[int, Delta], events: AsyncIterator[tuple[int, Delta]],
               choices: int, n: int, include_usage: bool, core: Core) -> AsyncIterator[str]:
    finals: dict[int, Delta] = {}
    generated = 0
    async with aclosing(events):
        for chunk in answer.opening(choices):
            yield _event(chunk)
        pending: list[tuple[int, Delta]] = [first]
        while pending or len(finals) < choices:
            i, delta = pending.pop() if pending else await anext(events)
            generated += len(delta.token_ids)
            if delta.finish_reason is not None:
                finals[i] = delta
            if delta.finish_reason == "error":
                status = _failed_status(delta.error or "", core.accepting)
                yield _event({"error": {"message": delta.error, "type": STATUS_TYPES[status], "param": None,
                                        "code": status}})
                continue
            chunk = answer.chunk(i, delta)
            if chunk is not None:
                yield _event(chunk)
        if include_usage:
            usage = _usage([finals[i] for i in sorted(finals)], n, generated)
            yield _event(answer.chunk_base() | {"choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _usage(finals: list[Delta], n: int, completion_tokens: int) -> dict:
    """`finals`: the last delta of each choice, in order. A prompt counts once however many choices it has."""
    prompts = finals[::n]
    prompt_tokens = sum(d.prompt_length or 0 for d in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(d.num_cached_tokens or 0 for d in prompts)}}


# --- response shapes -----------------------------------------------------------------------------------

class Answer:
    """The OpenAI shape of one endpoint's responses and chunks."""
    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, core: Core, model: str, top_logprobs: int | None, prompt_logprobs: bool):
        self.tokenizer, self.model, self.top_logprobs = core.tokenizer, model, top_logprobs
        self.prompt_logprobs = prompt_logprobs  # vLLM's field was asked for: answered in vLLM's shape
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._tokens_so_far: dict[int, int] = {}  # per choice, for completion logprobs' text offsets

    def whole(self, finals: list[Delta], n: int) -> dict:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [self.choice(i, d) for i, d in enumerate(finals)],
                "usage": _usage(finals, n, sum(len(d.token_ids) for d in finals))}

    def chunk_base(self) -> dict:
        return {"id": self.id, "object": self.chunk_name, "created": self.created, "model": self.model}

    def opening(self, choices: int) -> list[dict]:
        return []

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def choice(self, index: int, delta: Delta) -> dict:
        raise NotImplementedError

    def vllm_prompt_logprobs(self, delta: Delta) -> dict:
        """vLLM's `prompt_logprobs`: per prompt token, null for the first, then {token id: {logprob, token}}."""
        if not self.prompt_logprobs or delta.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": [None if top is None else {str(t): {"logprob": lp, "decoded_token": self.token(t)}
                                                             for t, lp in top.items()}
                                    for top in delta.prompt_logprobs]}

    def chunk(self, index: int, delta: Delta) -> dict | None:
        raise NotImplementedError


class Completion(Answer):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, core: Core, model: str, top_logprobs: int | None, prompt_logprobs: bool,
                 echoed: list[list[int]] | None, n: int):
        super().__init__(core, model, top_logprobs, prompt_logprobs)
        self.echoed, self.n = echoed, n  # echo with logprobs: each prompt's ids, whose logprobs lead the choice's

    def choice(self, index: int, delta: Delta) -> dict:
        return {"index": index, "text": delta.text, "logprobs": self._logprobs(index, delta),
                "finish_reason": delta.finish_reason} | self.vllm_prompt_logprobs(delta)

    def chunk(self, index: int, delta: Delta) -> dict | None:
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return None  # nothing to show yet (a character or a possible stop string held back)
        return self.chunk_base() | {"choices": [self.choice(index, delta)]}

    def _logprobs(self, index: int, delta: Delta) -> dict | None:
        if self.top_logprobs is None or delta.logprobs is None:
            return None
        ids, logprobs, tops = delta.token_ids, delta.logprobs, delta.top_logprobs
        if self.echoed is not None and delta.prompt_logprobs is not None:  # echo: the prompt's tokens lead
            prompt = self.echoed[index // self.n]
            ids, tops = prompt + ids, delta.prompt_logprobs + tops
            logprobs = [None] + [top[t] for top, t in zip(delta.prompt_logprobs[1:], prompt[1:])] + logprobs
        tokens = [self.token(t) for t in ids]
        offset = self._tokens_so_far.get(index, 0)
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self._tokens_so_far[index] = offset
        return {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
                "top_logprobs": [None if top is None else {self.token(t): lp for t, lp in top.items()} for top in tops]
                if self.top_logprobs else None}


class ChatCompletion(Answer):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, core: Core, model: str, top_logprobs: int | None, prompt_logprobs: bool,
                 tools: ToolFormat | None):
        super().__init__(core, model, top_logprobs, prompt_logprobs)
        self.tools = tools  # the request offered tools: its text is read for calls
        self._held: dict[int, str] = {}  # per streamed choice: text that may be a call, held until the end

    def whole(self, finals: list[Delta], n: int) -> dict:
        return super().whole(finals, n) | self.vllm_prompt_logprobs(finals[0])  # one prompt: at the top, as vLLM

    def choice(self, index: int, delta: Delta) -> dict:
        content, calls = self.tools.parse(delta.text) if self.tools else (delta.text, [])
        message = {"role": "assistant", "content": content or None if calls else content}
        return {"index": index, "message": message | ({"tool_calls": [c.openai() for c in calls]} if calls else {}),
                "logprobs": self._logprobs(delta), "finish_reason": _finish(delta.finish_reason, calls)}

    def opening(self, choices: int) -> list[dict]:
        return [self.chunk_base() | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                for i in range(choices)]

    def chunk(self, index: int, delta: Delta) -> dict | None:
        text, calls = delta.text, []
        if self.tools:  # what may begin a call is held; at the end the held text is read for calls
            text = self._held.pop(index, "") + text
            if delta.finish_reason is None:
                shown = self.tools.streamable(text)
                text, self._held[index] = text[:shown], text[shown:]
            else:
                text, calls = self.tools.parse(text)
        if not text and not calls and delta.finish_reason is None and not delta.logprobs:
            return None
        content = {"content": text} if text or not calls else {}
        tool_calls = {"tool_calls": [c.openai(i) for i, c in enumerate(calls)]} if calls else {}
        return self.chunk_base() | {"choices": [{"index": index, "delta": content | tool_calls,
                                                 "logprobs": self._logprobs(delta),
                                                 "finish_reason": _finish(delta.finish_reason, calls)}]}

    def _logprobs(self, delta: Delta) -> dict | None:
        if self.top_logprobs is None or delta.logprobs is None:
            return None
        return {"content": [self._entry(t, lp) | {"top_logprobs": [self._entry(i, v) for i, v in top.items()]}
                            for t, lp, top in zip(delta.token_ids, delta.logprobs, delta.top_logprobs)]}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _finish(finish_reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


# --- the server thread ---------------------------------------------------------------------------------

class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two guards it lacks: a connection past `max_connections` is closed as
    it opens (before it can hold a descriptor for long), and one that has not sent a whole request head
    `read_timeout` seconds after it opened, or after its last response, is closed. uvicorn alone waits for a
    head forever, and a few bytes now and then (or none) held a connection and its descriptor."""

    def __init__(self, *args, max_connections: int, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_connections, self.read_timeout = max_connections, read_timeout
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.abort()
        else:
            self._await_head()

    def connection_lost(self, exc) -> None:
        self._head_arrived()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._head_arrived()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def _await_head(self) -> None:
        self._head_arrived()
        self.head_deadline = self.loop.call_later(self.read_timeout, self.timeout_keep_alive_handler)

    def _head_arrived(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None


class HttpServer:
    """uvicorn on a thread of its own, on a socket bound at construction (so port 0 is known at once)."""

    def __init__(self, core: Core, options: HttpOptions, model_name: str):
        self.socket = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((options.host, options.port))
        host, port = self.socket.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        app = create_app(core, model_name, options)
        protocol = partial(GuardedH11, max_connections=options.max_connections, read_timeout=options.read_timeout)
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, http=protocol,
                                                     timeout_graceful_shutdown=5,
                                                     limit_concurrency=options.max_connections,
                                                     timeout_keep_alive=options.keep_alive))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.socket]},
                                        name="http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self.socket.close()
