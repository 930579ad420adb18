"""The `splitfuse` command: serve, worker, compile, generate, chat, demo.

Engine options (--token-budget, --eager, ...) and sampling options (--max-new-tokens,
--temperature, ...) are made from the fields of EngineConfig and SamplingParams, so every
setting of either is available here under its own name. Never imports torch itself: the
model runs in worker processes, whose progress (loading, warm-up) goes to stderr."""
import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import zmq

from splitfuse import logs
from splitfuse.config import EngineConfig, SamplingParams, read_token_file
from splitfuse.frontend import server
from splitfuse.frontend.client import AsyncClient, Client
from splitfuse.frontend.core import MAX_QUEUED_REQUESTS
from splitfuse.frontend.serve import serve
from splitfuse.frontend.tools import TOOL_PARSERS

log = logging.getLogger("splitfuse.cli")  # by name: run with -m, __name__ is __main__

HELP = {
    "dtype": "weights and KV cache dtype: auto, bf16, fp16 or fp32",
    "device": "auto, cpu, cuda or cuda:N (with several replicas on GPU, auto/cuda gives each its own device)",
    "token_budget": "tokens per forward pass, the SplitFuse target (default: 256 on CPU, 512 where bf16 runs on AMX "
                    "or AVX-512 BF16, 2048 on GPU)",
    "batch_token_budget": "tokens per forward pass while no request streams its tokens (offline batches, "
                          "stream=false), when only throughput counts (default: 4096 where bf16 runs on AMX, else "
                          "the token budget)",
    "max_num_seqs": "sequences per forward pass (default: the token budget, at most 256)",
    "block_size": "tokens per KV cache block",
    "num_blocks": "KV cache blocks per replica (default: from --gpu-memory-utilization, on CPU --kv-memory-fraction)",
    "kv_memory_fraction": "CPU: share of RAM for the KV cache",
    "gpu_memory_utilization": "GPU: share of each GPU's total memory its replicas use in all (weights, activations, "
                              "KV cache, which gets the rest); replicas sharing a GPU split it",
    "max_model_len": "longest prompt plus generation (default: the model's maximum)",
    "scheduler": "splitfuse or prefill-first",
    "eager": "skip torch.compile and CUDA graphs: starts much faster, runs slower",
    "background_compile": "serve eagerly from the start while compiling in the background, then switch to the "
                          "compiled forward; --no-background-compile compiles every shape before serving",
    "deterministic": "a request's tokens and log-probabilities are bit-identical whatever else is in the step, "
                     "whether its prefix came from the cache and however its prompt was chunked: every shape is "
                     "compiled before serving (no eager start), and on GPU attention does not split keys",
    "buckets": "token-count shapes that are compiled (default: 1, and the batch budget and its halves down to 8 on CPU, quarters down to 16 on GPU)",
    "enable_prefix_caching": "reuse the KV cache blocks of prompt prefixes seen before (--no-enable-prefix-caching: "
                             "compute every prompt from its first token)",
    "prefix_routing": "with several replicas, send a request to the replica likely to hold its prefix, balanced "
                      "against outstanding work (--no-prefix-routing: least outstanding work only)",
    "cache_dir": "where the bundled model is converted to (default: ~/.cache/splitfuse)",
    "tensor_parallel_size": "shard each replica's model over this many processes (devices), Megatron-style over "
                            "torch.distributed (NCCL on GPU, gloo on CPU)",
    "nnodes": "hosts each tensor-parallel group spans (start the others with `splitfuse serve --node-rank K`)",
    "master_addr": "with --nnodes > 1: the address of the host that serves, where the group's ranks meet",
    "master_port": "with --nnodes > 1: a free TCP port on --master-addr for the group's rendezvous",
    "max_new_tokens": "tokens to generate at most",
    "min_new_tokens": "tokens to generate before EOS, a stop token or a stop string may end the answer",
    "do_sample": "sample instead of greedy decoding",
    "seed": "random seed of a sampled request",
    "stop": "stop strings: the text ends before the first one",
    "stop_token_ids": "token ids that end the answer",
    "ignore_eos": "keep generating past the end-of-sequence token",
    "logprobs": "return log probabilities: 0 of the chosen tokens, N also of the top N",
    "return_full_text": "prepend the prompt to the answer",
}

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a CPU does.",
    "Give me three tips for learning to program.",
    "Why is the sky blue?",
    "Tell me a fun fact about octopuses.",
    "How do I boil an egg?",
    "What is a prime number?",
]


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logs.set_level(args.log_level)
    try:
        args.run(args)
    except ValueError as e:  # a bad option or prompt: say what to change, no traceback
        sys.exit(f"splitfuse: error: {e}")
    except BrokenPipeError:  # its output went to a reader that left (| head)
        sys.exit(1)
    except (ConnectionError, zmq.ZMQError) as e:  # a wrong address, or no server behind it
        sys.exit(f"splitfuse: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitfuse", description="LLM serving with Dynamic SplitFuse.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    p = commands.add_parser("serve", help="run a persistent server (frontend + worker replicas)",
                            description="Serve a model until SIGTERM or Ctrl-C (which drain: requests in flight "
                                        "finish, up to --shutdown-timeout). Clients connect over ZeroMQ with "
                                        "splitfuse.AsyncClient, splitfuse.Client, `splitfuse generate --address`, "
                                        "or any program speaking docs/protocol.md; with --http-port, any OpenAI "
                                        "client too.")
    _add_model_options(p)
    p.add_argument("--replicas", type=int, default=1, help="worker processes, each with a copy of the model "
                                                            "(0: only workers that join, see --worker-address)")
    p.add_argument("--node-rank", type=int, default=0, help="with --nnodes > 1, this host's place in each "
                   "tensor-parallel group: 0 serves (the frontend and rank 0), k > 0 runs only host k's ranks, "
                   "which join rank 0 at --master-addr:--master-port (again whenever the group restarts)")
    p.add_argument("--port", type=int, help="ZeroMQ TCP port on --host (default: a free one, printed)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on; 0.0.0.0 for all (only on a "
                                                        "network you trust, or with --api-key / --curve-*)")
    p.add_argument("--address", help="a full ZeroMQ address instead of --host/--port, e.g. ipc:///tmp/sf.sock")
    p.add_argument("--zmq", action=argparse.BooleanOptionalAction, default=True,
                   help="serve the ZeroMQ protocol (--no-zmq: HTTP only)")
    p.add_argument("--http-port", type=int, help="also serve the OpenAI-compatible HTTP API on this port of --host "
                                                 "(0: a free one, printed)")
    p.add_argument("--api-key", help="HTTP clients must send `Authorization: Bearer KEY` (on every path but "
                                     "/health, /metrics and /openapi.json)")
    limits = p.add_argument_group("HTTP limits")
    defaults = server.HttpOptions()
    for name, text in (("max_body_bytes", "a larger request body is refused (413) before it is read"),
                       ("read_timeout", "seconds a connection may take to send a request head (then it is closed), "
                                        "and a body may stall between two of its parts (408)"),
                       ("max_connections", "HTTP connections at once; more are answered 503 at once"),
                       ("keep_alive", "seconds an idle HTTP connection is kept between requests"),
                       ("max_choices", "answers one request may ask for (prompts times n)"),
                       ("max_messages", "messages of one chat")):
        limits.add_argument("--http-" + name.replace("_", "-"), dest=name, type=type(getattr(defaults, name)),
                            default=getattr(defaults, name),
                            help=f"{text} (default: %(default)s)")
    p.add_argument("--served-model-name", help="the model name HTTP clients give (default: the model directory's)")
    p.add_argument("--tool-call-parser", choices=TOOL_PARSERS, default="hermes",
                   help="how the served model writes tool calls: hermes (Qwen2/2.5, Hermes 2/3) or llama3_json "
                        "(Llama 3.1-3.3) (default: %(default)s)")
    p.add_argument("--curve-secret", metavar="FILE", help="encrypt the ZeroMQ socket with CURVE: this server's "
                                                          "certificate with its secret key (made by "
                                                          "zmq.auth.create_certificates)")
    p.add_argument("--curve-clients", metavar="DIR", help="with --curve-secret: the public certificates of the "
                                                          "clients that may connect")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is ended")
    p.add_argument("--max-queued-requests", type=int, default=MAX_QUEUED_REQUESTS,
                   help="refuse new requests (HTTP 429, an error reply on ZeroMQ) while this many wait for their "
                        "first token (default: %(default)s)")
    p.add_argument("--max-queued-tokens", type=int, help="refuse a new request while its prompt and those waiting "
                                                         "for their first token have more tokens than this")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight get to finish after SIGTERM before they end with an error")
    p.add_argument("--worker-address", metavar="ADDRESS", help="let workers started on other machines "
                   "(`splitfuse worker --connect`) join here, e.g. tcp://0.0.0.0:5601; needs --worker-token-file")
    p.add_argument("--worker-token-file", metavar="FILE", help="the token joining workers must present (the "
                   "same file on each machine; make it with `openssl rand -hex 32 > FILE`)")
    p.add_argument("--worker-curve-secret", metavar="FILE", help="encrypt the workers' link with CURVE: this "
                   "server's certificate with its secret key (it may be --curve-secret's)")
    p.add_argument("--worker-curve-clients", metavar="DIR", help="with --worker-curve-secret: the public "
                   "certificates of the workers that may join")
    p.set_defaults(run=_serve)

    p = commands.add_parser("worker", help="a worker on this machine that joins a running server",
                            description="Load a model and join the server at --connect (started with `splitfuse "
                                        "serve --worker-address`), which then sends it requests like to its own "
                                        "replicas. Until the server answers it keeps trying, waiting longer each "
                                        "time; when the server is gone it joins again. It exits with code 1 when "
                                        "the server refuses it (another token, model, --max-model-len or "
                                        "--block-size), and on SIGTERM at once (its requests in flight end with an "
                                        "error): run it under a supervisor (systemd, Kubernetes, Slurm).")
    p.add_argument("--connect", required=True, metavar="ADDRESS", help="the server's worker address, e.g. "
                                                                        "tcp://10.0.0.1:5601")
    p.add_argument("--token-file", required=True, metavar="FILE", help="the file holding the server's token "
                                                                        "(its --worker-token-file)")
    p.add_argument("--name", help="this worker's name at the server, one per worker (default: the hostname)")
    p.add_argument("--heartbeat-timeout", type=float, default=30.0, help="seconds without a word from the server "
                   "after which it counts as gone: the worker drops its requests and joins again (default: 30)")
    p.add_argument("--curve-server-cert", metavar="FILE", help="for a server with --worker-curve-*: its public "
                   "certificate (the link is encrypted, and only that server is joined)")
    p.add_argument("--curve-secret", metavar="FILE", help="with --curve-server-cert: this worker's certificate "
                   "with its secret key (its public one in the server's --worker-curve-clients)")
    _add_model_options(p)
    p.set_defaults(run=_worker)

    p = commands.add_parser("compile", help="compile a model's buckets once, into the on-disk cache",
                            description="Compile every bucket of a configuration into the compile cache "
                                        "(~/.cache/splitfuse/compiled, or $SPLITFUSE_CACHE), so that a server or "
                                        "pipeline started later with the same model and engine options serves "
                                        "compiled from its first request. `make model` does this for the bundled "
                                        "model. Nothing is compiled again for a configuration already there.")
    _add_model_options(p)
    p.set_defaults(run=_compile)

    p = commands.add_parser("generate", help="stream one answer to stdout",
                            description="Generate from a prompt, streaming the text to stdout. Uses a running "
                                        "server with --address, else starts the model for this one prompt.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message, with the chat template")
    _add_connection_options(p)
    p.set_defaults(run=_generate)

    p = commands.add_parser("chat", help="chat interactively",
                            description="An interactive conversation (the model's chat template applies). "
                                        "Ctrl-C stops an answer; Ctrl-D or /exit quits.")
    p.add_argument("--system", help="a system message that starts the conversation")
    _add_connection_options(p)
    p.set_defaults(run=_chat)

    p = commands.add_parser("demo", help="serve the bundled model and stream answers to concurrent chats",
                            description="Start a persistent deployment, send several chat prompts at once "
                                        "through AsyncClient, stream the answers, print throughput and latency, "
                                        "shut down.")
    _add_model_options(p)
    p.add_argument("--replicas", type=int, default=1, help="worker processes")
    _add_struct_options(p.add_argument_group("sampling options"), SamplingParams, defaults={"max_new_tokens": 64})
    p.set_defaults(run=_demo)
    for command in commands.choices.values():
        command.add_argument("--log-level", choices=logs.LEVELS, default="info",
                             help="what the server and its workers report: debug adds a line per request "
                                  "(default: info, their progress; SPLITFUSE_LOG_FORMAT=json for JSON lines)")
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a local Hugging Face model directory (default: the bundled "
                                        "SmolLM2-135M-Instruct)")
    _add_struct_options(parser.add_argument_group("engine options"), EngineConfig, skip=("model",))


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="a running server, e.g. tcp://127.0.0.1:5555 (default: start one)")
    _add_model_options(parser)
    _add_struct_options(parser.add_argument_group("sampling options"), SamplingParams)


def _add_struct_options(group, cls: type, skip: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    """One --option per field. Only options given on the command line (or in `defaults`, which override
    the field's own default) are passed on, so the class stays the one place defaults live."""
    defaults = defaults or {}
    for f in msgspec.structs.fields(cls):
        if f.name in skip:
            continue
        kind, many = _option_type(f.type)
        shown = defaults.get(f.name, f.default if f.default is not msgspec.NODEFAULT else f.default_factory())
        help_text = HELP.get(f.name, f.name.replace("_", " ")) + ("" if shown is None else f" (default: {shown})")
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, argparse.SUPPRESS)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument(flag, type=kind, nargs="+" if many else None, default=default, help=help_text,
                               metavar={int: "N", float: "X"}.get(kind, "JSON" if many is None else "S"))


def _option_type(annotation) -> tuple[typing.Callable, bool | None]:
    """(what reads a value, whether it is a list; None for a JSON object) of a field annotation such as
    `int | None`, `list[str]` or `dict[int, float]`."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    if typing.get_origin(annotation) is dict:
        return _json_object(typing.get_args(annotation)[0]), None
    return annotation, False


def _json_object(key_type: type) -> typing.Callable[[str], dict]:
    """Reads a JSON object given on the command line, its keys (JSON's are strings) as key_type."""
    def read(text: str) -> dict:
        try:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("a JSON object is expected, such as '{\"5\": 1.5}'")
            return {key_type(key): item for key, item in value.items()}
        except ValueError as e:  # argparse shows it, with the option's name
            raise argparse.ArgumentTypeError(str(e)) from None
    return read


def _options(args: argparse.Namespace, cls: type) -> dict:
    return {name: getattr(args, name) for name in cls.__struct_fields__ if hasattr(args, name)}


def _engine_options(args: argparse.Namespace) -> dict:
    return _options(args, EngineConfig) | {"model": args.model}


# --- commands ---------------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> None:
    if args.node_rank:
        return _serve_node(args)
    address = (args.address or f"tcp://{args.host}:{args.port or '*'}") if args.zmq else None
    http = None if args.http_port is None else server.HttpOptions(
        args.host, args.http_port, args.api_key, args.served_model_name, args.max_body_bytes, args.read_timeout,
        args.max_connections, args.keep_alive, args.max_choices, args.max_messages, args.tool_call_parser)
    if (args.curve_secret is None) != (args.curve_clients is None):
        raise ValueError("CURVE needs both --curve-secret and --curve-clients")
    curve = server.CurveOptions(args.curve_secret, args.curve_clients) if args.curve_secret else None
    if (args.worker_address is None) != (args.worker_token_file is None):
        raise ValueError("workers that join need both --worker-address and --worker-token-file")
    worker_curve = None
    if args.worker_curve_secret or args.worker_curve_clients:
        worker_curve = server.CurveOptions(args.worker_curve_secret, args.worker_curve_clients)
    remote = (server.RemoteWorkers(args.worker_address, args.worker_token_file, worker_curve)
              if args.worker_address else None)
    log.info("starting %d replica(s) of %s...", args.replicas, args.model or "the bundled model")
    start = time.perf_counter()

    def announce(where: dict) -> None:
        serving = " and ".join(filter(None, [where["address"], where["http_url"] and f"{where['http_url']}/v1"]))
        joining = f"; workers join at {where['worker_address']}" if where["worker_address"] else ""
        log.info("serving on %s (ready in %.1fs)%s; Ctrl-C stops", serving, time.perf_counter() - start, joining)
    server.run(EngineConfig.from_kwargs(**_engine_options(args)), args.replicas, address, http=http, curve=curve,
               request_timeout=args.request_timeout, max_queued_requests=args.max_queued_requests,
               max_queued_tokens=args.max_queued_tokens, shutdown_timeout=args.shutdown_timeout, remote=remote,
               announce=announce)


def _worker(args: argparse.Namespace) -> None:
    config = EngineConfig.from_kwargs(**_engine_options(args))  # bad options fail here, before torch loads
    read_token_file(args.token_file)
    from splitfuse.worker import main as worker  # this command is the worker process: torch is wanted here
    worker.run(["--connect", args.connect, "--token-file", args.token_file, "--config", config.to_json(),
                "--frontend-timeout", str(args.heartbeat_timeout)] + (["--name", args.name] if args.name else [])
               + (["--curve-server-cert", args.curve_server_cert] if args.curve_server_cert else [])
               + (["--curve-secret", args.curve_secret] if args.curve_secret else []))


def _compile(args: argparse.Namespace) -> None:
    config = EngineConfig.from_kwargs(**_engine_options(args))  # bad options fail here, before torch loads
    from splitfuse.compiled import precompile  # this command compiles: torch is wanted here
    start = time.perf_counter()
    precompile.compile_config(config)
    log.info("splitfuse compile: ready in %s after %.1fs", precompile.cache_dir(), time.perf_counter() - start)


def _serve_node(args: argparse.Namespace) -> None:
    config = EngineConfig.from_kwargs(**_engine_options(args))  # bad options fail here, before torch loads
    from splitfuse.worker import tp_group  # this command runs ranks of the model: torch is wanted here
    tp_group.serve_node(config, args.node_rank)


@contextmanager
def _connect(args: argparse.Namespace) -> Iterator[tuple[Client, dict]]:
    """(a client of --address or of a deployment started for this command, the sampling options);
    everything is closed on exit. Sampling options are checked before a model is started."""
    sampling = _options(args, SamplingParams)
    SamplingParams.from_kwargs(**sampling)
    deployment = None
    if args.address is None:
        log.info("starting %s (use --address to reuse a running server)...", args.model or "the bundled model")
        deployment = serve(**_engine_options(args))
    client = Client(args.address or deployment.address)
    try:
        yield client, sampling
    finally:
        client.close()
        if deployment is not None:
            deployment.close()


def _generate(args: argparse.Namespace) -> None:
    with _connect(args) as (client, sampling):
        prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
        for delta in client.generate(prompt, **sampling):
            print(delta.text, end="", flush=True)
            if delta.error:
                log.error("\nsplitfuse: error: %s", delta.error)
        print()


def _chat(args: argparse.Namespace) -> None:
    history = [{"role": "system", "content": args.system}] if args.system else []
    with _connect(args) as (client, sampling):
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if line in ("/exit", "/quit"):
                break
            if not line:
                continue
            history.append({"role": "user", "content": line})
            print("assistant> ", end="", flush=True)
            answer = ""
            try:
                for delta in client.generate(history, **sampling):
                    print(delta.text, end="", flush=True)
                    answer += delta.text
                    if delta.finish_reason == "error":
                        raise ValueError(delta.error)
            except KeyboardInterrupt:
                print(" [stopped]", end="")
            except ValueError as e:  # a turn the server refuses (too long, say): the chat goes on without it
                print(f"[error: {e}]")
                history.pop()
                continue
            print()
            history.append({"role": "assistant", "content": answer})


def _demo(args: argparse.Namespace) -> None:
    sampling = _options(args, SamplingParams)
    SamplingParams.from_kwargs(**sampling)
    log.info("splitfuse demo: starting %d replica(s) of %s; the workers report loading and warm-up below",
             args.replicas, args.model or "SmolLM2-135M-Instruct")
    start = time.perf_counter()
    with serve(replicas=args.replicas, **_engine_options(args)) as deployment:
        log.info("ready at %s in %.1fs\n", deployment.address, time.perf_counter() - start)
        results = asyncio.run(_demo_requests(deployment.address, sampling))
    _print_summary(results)


async def _demo_requests(address: str, sampling: dict) -> tuple[list[dict], float]:
    """All prompts at once; the first answer is streamed as it arrives, the others printed when all are done."""
    async with AsyncClient(address) as client:
        start = time.perf_counter()
        print(f"[0] {DEMO_PROMPTS[0]}\n", flush=True)
        results = await asyncio.gather(*(_demo_one(client, q, sampling, live=i == 0)
                                         for i, q in enumerate(DEMO_PROMPTS)))
        wall = time.perf_counter() - start
    for i, (question, result) in enumerate(zip(DEMO_PROMPTS, results)):
        if i:
            print(f"\n\n[{i}] {question}\n\n{result['text'].strip()}")
    return results, wall


async def _demo_one(client: AsyncClient, question: str, sampling: dict, live: bool) -> dict:
    start, first, text, tokens = time.perf_counter(), None, "", 0
    async for delta in client.generate([{"role": "user", "content": question}], **sampling):
        first = first or time.perf_counter() - start
        text += delta.text
        tokens += len(delta.token_ids)
        if live:
            print(delta.text, end="", flush=True)
    end = time.perf_counter() - start
    return {"text": text, "ttft": first, "latency": end, "tokens": tokens,
            "tpot": (end - first) / (tokens - 1) if tokens > 1 else None}


def _print_summary(run: tuple[list[dict], float]) -> None:
    results, wall = run
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    latency = [r["latency"] for r in results]
    print(f"\n\n--- {len(results)} concurrent requests, {tokens} tokens generated in {wall:.2f}s: "
          f"{tokens / wall:.1f} tokens/s")
    print(f"time to first token: median {statistics.median(ttft):.3f}s, max {max(ttft):.3f}s")
    if tpot:
        print(f"time per output token: median {statistics.median(tpot) * 1000:.1f} ms")
    print(f"request latency: median {statistics.median(latency):.2f}s, max {max(latency):.2f}s")


if __name__ == "__main__":
    main()
