"""One forward pass of the bundled model at fixed token counts, eager vs compiled, on this machine.

    python -P -m splitfuse.benchmarks.forward [--device cuda] [--dtype bf16] [--tokens 1 8 32 128 256 512]
                                              [--no-compile] [--tensor-parallel-size N]

Prints tokens/s and model FLOPs utilisation against the bf16 (or fp32) matmul peak measured in
the same run, then the engine's per-step overhead (scheduling + input preparation) on a
decode-heavy load. With --tensor-parallel-size N, N processes (gloo) split the cores and each holds
its shard of the model; they run the same steps and rank 0 reports (FLOPs and peak are a rank's)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.compiled.loader import load_model, resolve_dtype
from splitfuse.compiled.parallel import Shard
from splitfuse.compiled.runner import ModelRunner, SequenceChunk
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.worker.engine import Engine

BLOCK = 16
CONTEXT = 256  # cached tokens behind each decode token


def clock() -> float:
    """Seconds, read once the GPU has finished the work queued so far (CUDA launches are asynchronous)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    start = clock()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (clock() - start)


def mixes(tokens: int, max_seqs: int) -> dict[str, list[SequenceChunk]]:
    """all-prompt: one fresh prompt of `tokens`; decode-heavy: decodes over CONTEXT tokens plus a prompt chunk."""
    per_seq = -(-(CONTEXT + tokens) // BLOCK)
    table = lambda i: list(range(i * per_seq, (i + 1) * per_seq))
    decodes = min(tokens, max_seqs - 1) if tokens > 1 else 1
    mixed = [SequenceChunk([7], CONTEXT, table(i), True) for i in range(decodes)]
    if tokens > decodes:
        mixed.append(SequenceChunk([5] * (tokens - decodes), 0, table(decodes), True))
    return {"all-prompt": [SequenceChunk([5] * tokens, 0, table(0), True)], "decode-heavy": mixed}


def model_flops(model, chunks: list[SequenceChunk]) -> float:
    """Matmul FLOPs: weights for every token, attention over each token's context, lm_head per sampled row."""
    d = model.model.embed_tokens.weight.shape[1]
    vocab = model.lm_head.weight.shape[0]
    body = sum(p.numel() for n, p in model.named_parameters() if "layers" in n and p.dim() == 2)
    flops = 0.0
    for c in chunks:
        n = len(c.token_ids)
        context = c.start * n + n * (n + 1) / 2
        flops += 2 * body * n + 4 * model.num_layers * d * context + (2 * vocab * d if c.sample else 0)
    return flops


def time_step(runner: ModelRunner, chunks: list[SequenceChunk], reps: int) -> float:
    runner.execute(chunks)
    start = clock()
    for _ in range(reps):
        runner.execute(chunks)
    return (clock() - start) / reps


def step_overhead(dtype: str, device: torch.device, eager: bool, decodes: int) -> dict:
    """A decode-only engine step (`decodes` sequences generating, bucket `decodes`) in parts: the model (forward
    and LM head), the sampler, and the host work: scheduling and the step's inputs (what the issue of O(1)
    work per sequence bounds), then the outputs (tokens appended, requests finished, the logits freed)."""
    engine = Engine(EngineConfig(dtype=dtype, device=str(device), eager=eager, background_compile=False,
                                 token_budget=decodes, max_num_seqs=decodes, num_blocks=32 * decodes,
                                 buckets=[decodes]), progress=False)
    spent = {"model": 0.0, "sampler": 0.0, "schedule": 0.0, "execute": 0.0, "chunks": 0.0}
    for name, obj, attr in (("model", engine.runner, "run_step"), ("sampler", engine, "sampler"),
                            ("schedule", engine.scheduler, "schedule"), ("execute", engine.runner, "execute"),
                            ("chunks", engine, "_chunks")):
        inner = getattr(obj, attr)

        def timed(*args, _inner=inner, _name=name):
            start = clock()
            result = _inner(*args)
            spent[_name] += clock() - start
            return result
        setattr(obj, attr, timed)
    for i in range(decodes):
        engine.add_request(str(i), [5] * 100, SamplingParams(max_new_tokens=60, ignore_eos=True))
    while engine.scheduler.waiting or any(r.num_new_tokens > 1 for r in engine.scheduler.running):
        engine.step()  # prompts in
    spent.update(dict.fromkeys(spent, 0.0))
    steps, start = 30, clock()
    for _ in range(steps):
        engine.step()
    total = clock() - start
    inputs = spent["schedule"] + spent["chunks"] + spent["execute"] - spent["model"]
    outputs = total - spent["execute"] - spent["sampler"] - spent["schedule"] - spent["chunks"]
    return {"step_ms": 1000 * total / steps, "model_ms": 1000 * spent["model"] / steps,
            "sampler_ms": 1000 * spent["sampler"] / steps, "inputs_ms": 1000 * inputs / steps,
            "outputs_ms": 1000 * outputs / steps, "host_fraction": (inputs + outputs) / total}


def join_group(args: argparse.Namespace) -> Shard:
    """Rank 0 starts ranks 1..N-1 (this command again) and all join one gloo group; each takes its share of the cores."""
    size = args.tensor_parallel_size
    if size == 1:
        return Shard()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // size))
    if args.rank == 0:
        args.store = tempfile.mkdtemp() + "/store"
        for rank in range(1, size):
            subprocess.Popen([sys.executable, "-P", "-m", "splitfuse.benchmarks.forward", *sys.argv[1:], "--rank", str(rank),
                              "--store", args.store])
    dist.init_process_group("gloo", store=dist.FileStore(args.store, size), rank=args.rank, world_size=size)
    return Shard(args.rank, size, dist.group.WORLD)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (auto: cuda where there is one)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 256, 512])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="eager only (compiling takes ~30 s per shape)")
    ap.add_argument("--host-only", action="store_true", help="only the engine's host work per step (no forward table)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks (processes) the model is sharded over")
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)  # given to the ranks rank 0 starts
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shard = join_group(args)
    report = print if shard.rank == 0 else lambda *a, **k: None
    torch.manual_seed(0)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_model(bundled_model_dir(), dtype, device, shard)
    peak = matmul_peak(dtype, device)
    report(f"# bundled SmolLM2-135M on {device}, {dtype}, {shard.size} rank(s) of {torch.get_num_threads()} threads; "
           f"matmul peak {peak / 1e9:.0f} GFLOP/s per rank")
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    rows = [] if args.host_only else forward_table(args, model, modes, peak, report)
    # The engine's own overhead is a rank 0 matter, the same with any number of ranks: measured with one.
    # Host work does not depend on the mode: measured at 256 sequences eagerly only.
    runs = [(mode, 64) for mode in modes] + [("eager", 256)]
    overhead = {f"{mode} {n}": step_overhead(args.dtype, device, mode == "eager", n) for mode, n in runs} \
        if shard.size == 1 else {}
    for name, o in overhead.items():
        mode, n = name.split()
        print(f"# {mode} decode step, {n} sequences: {o['step_ms']:.1f} ms = model and LM head {o['model_ms']:.1f} "
              f"+ sampler {o['sampler_ms']:.1f} + scheduling and inputs {o['inputs_ms']:.2f} + outputs "
              f"{o['outputs_ms']:.2f} (host work {100 * o['host_fraction']:.1f}%)")
    if args.json and shard.rank == 0:
        with open(args.json, "w") as f:
            json.dump({"dtype": str(dtype), "tensor_parallel_size": shard.size, "peak_flops": peak, "rows": rows,
                       "overhead": overhead}, f, indent=1)


def forward_table(args: argparse.Namespace, model, modes: list[str], peak: float, report) -> list[dict]:
    """One forward per token count and mix, in each mode: the printed table's rows."""
    # mixes(): up to 64 sequences of CONTEXT + tokens each, in blocks of their own
    longest = CONTEXT + max(args.tokens)
    blocks = max(4096, 64 * -(-longest // BLOCK))
    runners = {mode: ModelRunner(model, num_blocks=blocks, block_size=BLOCK, max_num_seqs=64,
                                 max_model_len=max(2048, longest),
                                 buckets=sorted(args.tokens), compile=mode == "compiled", cuda_graphs=mode == "compiled")
               for mode in modes}
    for runner in runners.values():
        # The decodes' context is never stored by a step here: written once, so that it is read from memory as in
        # serving (a CPU cache's untouched pages all map the kernel's one page of zeros).
        runner.kv_cache.normal_()
        runner.compile(background=False)
    rows = []
    report(f"{'tokens':>6} {'mix':>12} " + " ".join(f"{m + ' ms':>12} {m + ' tok/s':>13} {m + ' MFU':>12}" for m in modes)
          + ("  compiled/eager" if len(modes) == 2 else ""))
    for tokens in args.tokens:
        for mix, chunks in mixes(tokens, 64).items():
            row = {"tokens": tokens, "mix": mix}
            for mode, runner in runners.items():
                seconds = time_step(runner, chunks, args.reps)
                row[mode] = {"ms": 1000 * seconds, "tok_s": tokens / seconds,
                             "mfu": model_flops(model, chunks) / seconds / peak}
            rows.append(row)
            cells = " ".join(f"{row[m]['ms']:12.1f} {row[m]['tok_s']:13.0f} {100 * row[m]['mfu']:11.1f}%" for m in modes)
            speed = f"  {row['eager']['ms'] / row['compiled']['ms']:.2f}x" if len(modes) == 2 else ""
            report(f"{tokens:>6} {mix:>12} {cells}{speed}", flush=True)
    return rows


if __name__ == "__main__":
    main()
