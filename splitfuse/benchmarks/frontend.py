"""What the frontend itself costs: its process's CPU time per generated token, and the tokens per second one
frontend passes on, with `--streams` concurrent streaming requests answered by a stand-in worker that joins
with the server's token and generates instantly (each step one token for every request it holds, as an
engine's decode steps do).

    python -P -m splitfuse.benchmarks.frontend [--streams 256] [--tokens 64] [--rounds 2]

The clients and the stand-in worker run in this process; the frontend in its own, whose CPU time is read
from /proc. Writes benchmarks/results/frontend.md."""
import argparse
import asyncio
import os
import secrets
import socket
import tempfile
import threading
import time
from pathlib import Path

import zmq

from splitfuse import protocol
from splitfuse.benchmarks.peers.run import machine
from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.config import model_fingerprint
from splitfuse.frontend.client import AsyncClient
from splitfuse.frontend.serve import serve

RESULTS = Path(__file__).parent / "results"
TOKEN_ID = 42  # what the stand-in worker generates


class InstantWorker:
    """Joins the frontend at `address` with `token` and answers every request at once, one token a step."""

    def __init__(self, address: str, token: str):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.token = token
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def ready(self) -> None:
        """Say it is ready, as a worker that joins (replica -1) with the bundled model."""
        model = bundled_model_dir()
        self.socket.send(protocol.encode(protocol.Ready(-1, os.getpid(), str(model), 2048, self.token,
                                                        "instant", model_fingerprint(model), 16)))

    def run(self) -> None:
        self.ready()
        left: dict[str, int] = {}  # request id -> tokens still to generate
        beat = time.monotonic()
        while not self.stop.is_set():
            while self.socket.poll(0 if left else 50):
                msg = protocol.decode(self.socket.recv(), protocol.WORKER_REQUESTS)
                if isinstance(msg, protocol.Generate):
                    left[msg.id] = msg.params.max_new_tokens
                elif isinstance(msg, protocol.Abort):
                    left.pop(msg.id, None)
            if left:
                outputs = []
                for rid in list(left):
                    left[rid] -= 1
                    done = left[rid] == 0
                    outputs.append(protocol.Output(rid, [TOKEN_ID], "length" if done else None,
                                                   num_cached_tokens=0 if done else None))
                    if done:
                        del left[rid]
                self.socket.send(protocol.encode(protocol.Step(outputs)))
            if time.monotonic() - beat > 1.0:  # the frontend drops a worker it does not hear from
                beat = time.monotonic()
                self.socket.send(protocol.encode(protocol.Heartbeat({"running": len(left)})))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.socket.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_round(address: str, streams: int, tokens: int) -> int:
    """`streams` concurrent streaming requests of `tokens` tokens each; the tokens received."""
    async with AsyncClient(address) as client:
        async def one(i: int) -> int:
            return sum([len(delta.token_ids) async for delta in
                        client.generate(f"Request {i}", max_new_tokens=tokens, ignore_eos=True)])
        return sum(await asyncio.gather(*(one(i) for i in range(streams))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=256, help="concurrent streaming requests")
    parser.add_argument("--tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        worker_address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    token_file = Path(tempfile.mkdtemp()) / "token"
    token_file.write_text(secrets.token_hex(32))
    worker = InstantWorker(worker_address, token_file.read_text())
    worker.thread.start()
    rows = []
    try:
        with serve(replicas=0, worker_address=worker_address, worker_token_file=str(token_file),
                   max_queued_requests=None, ready_timeout=120) as deployment:
            asyncio.run(one_round(deployment.address, 8, 4))  # warm: connections, tokenizer threads
            for round_ in range(args.rounds):
                cpu, start = cpu_seconds(deployment.process.pid), time.perf_counter()
                received = asyncio.run(one_round(deployment.address, args.streams, args.tokens))
                wall, cpu = time.perf_counter() - start, cpu_seconds(deployment.process.pid) - cpu
                rows.append((received, wall, cpu))
                print(f"round {round_ + 1}: {received} tokens in {wall:.2f} s; frontend CPU {cpu:.2f} s "
                      f"({1e6 * cpu / received:.0f} us a token)", flush=True)
    finally:
        worker.close()
    info = machine()
    lines = ["# The frontend's own cost (`python -P -m splitfuse.benchmarks.frontend`)", "",
             f"{info['cpu']}, {info['cores']} cores; {args.streams} concurrent streams of {args.tokens} tokens "
             f"against a stand-in worker that generates instantly; the frontend in a process of its own.", "",
             "| round | tokens | wall s | tokens/s passed on | frontend CPU s | CPU us per token | "
             "tokens/s per frontend core |", "|--:|--:|--:|--:|--:|--:|--:|",
             *(f"| {i + 1} | {n} | {wall:.2f} | {n / wall:.0f} | {cpu:.2f} | {1e6 * cpu / n:.0f} | {n / cpu:.0f} |"
               for i, (n, wall, cpu) in enumerate(rows))]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "frontend.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
