"""The first minutes after a start, as a user meets them: `splitfuse.pipeline()` with its defaults (but the
prefix cache, off), sent the peers' offline workload at once and without a pause, against the same
pipeline eager.

    python -P -m splitfuse.benchmarks.startup [--window 60] [--dtype auto]

Three starts, each a fresh worker process:
- eager (`eager=True`): the baseline throughput;
- cold: an empty compile cache (a folder of this run's, the converted model and the C++ kernels linked
  in), so every bucket compiles while the workload runs;
- warm: the same cache again, as a second start of the same configuration finds it.
For each: the first answer (ready), the moment the worker serves compiled (its "compiled n/n" line), and
the generated tokens per second over the first `--window` seconds after the start. The eager and the cold
start then run the whole offline batch in one call (the cold one once it serves compiled): the steady
state of each. Writes benchmarks/results/startup.{json,md}."""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import splitfuse
from splitfuse.benchmarks.peers import workload as peers_workload
from splitfuse.benchmarks.peers.run import machine
from splitfuse.benchmarks.peers.splitfuse_runner import COMPILED, SETTLE_TIMEOUT_S, watch_stderr
from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.config import CACHE_ENV, cache_root

RESULTS = Path(__file__).parent / "results"
BATCH = 8  # requests per call in the window: finished batches count, so they are kept short


def empty_cache() -> Path:
    """A cache folder holding only what a user's machine has before its first compile."""
    folder = Path(tempfile.mkdtemp(prefix="splitfuse-startup-"))
    for kept in ("models", "kernels"):
        if (cache_root() / kept).is_dir():
            (folder / kept).symlink_to(cache_root() / kept)
    return folder


def one_start(name: str, work: dict, window: float, dtype: str, steady: bool, **options) -> dict:
    started = time.perf_counter()
    prompts, new_tokens = work["offline"], work["offline_new_tokens"]
    # No prefix cache: the window sends the workload's prompts over and over, and each time must cost the same.
    with watch_stderr(COMPILED) as compiled, splitfuse.pipeline(dtype=dtype, enable_prefix_caching=False,
                                                                **options) as pipe:
        pipe([work["probe"]], max_new_tokens=1, ignore_eos=True)
        ready = time.perf_counter() - started
        tokens, last_done, i = 0, None, 0
        while time.perf_counter() - started < window:
            batch = [prompts[(i + j) % len(prompts)] for j in range(BATCH)]
            i += BATCH
            answers = pipe(batch, max_new_tokens=new_tokens, ignore_eos=True)
            if time.perf_counter() - started <= window:
                tokens += sum(len(a.token_ids) for a in answers)
                last_done = time.perf_counter() - started
        result = {"start": name, "ready_s": ready, "window_s": window,
                  "window_tok_s": tokens / last_done if last_done else 0.0}
        if steady:
            if not options.get("eager"):
                compiled.wait(SETTLE_TIMEOUT_S)
            pipe(prompts[:BATCH], max_new_tokens=4, ignore_eos=True)  # warm-up of the compiled forward
            start = time.perf_counter()
            answers = pipe(prompts, max_new_tokens=new_tokens, ignore_eos=True)
            result["steady_tok_s"] = sum(len(a.token_ids) for a in answers) / (time.perf_counter() - start)
        result["compiled_s"] = (compiled.at - started) if compiled.is_set() else None
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=60.0, help="seconds after each start that are timed")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = peers_workload.build(bundled_model_dir())
    results = [one_start("eager", work, args.window, args.dtype, True, eager=True)]
    os.environ[CACHE_ENV] = str(empty_cache())  # the worker processes inherit it
    results.append(one_start("cold", work, args.window, args.dtype, True))
    results.append(one_start("warm", work, args.window, args.dtype, False))
    eager = results[0]["window_tok_s"]
    host = machine()
    lines = [f"# Start-up: bundled SmolLM2-135M, pipeline() defaults but no prefix cache, dtype {args.dtype}",
             "", f"{host['cpu']}, {host['cores']} cores ({host['isa']}).",
             "", f"Offline workload ({len(work['offline'])} prompts of ~384 tokens, {work['offline_new_tokens']} new "
             f"tokens each) sent at once, {BATCH} requests a call, for the first {args.window:.0f} s after each start.",
             "", "| start | first answer | serving compiled | tok/s in the first window | / eager | steady tok/s (48 at once) |",
             "|---|--:|--:|--:|--:|--:|"]
    for r in results:
        compiled = "never (eager)" if r["start"] == "eager" else f"{r['compiled_s']:.1f} s"
        steady = (f"{r['steady_tok_s']:.1f} ({r['steady_tok_s'] / results[0]['steady_tok_s']:.2f}x eager)"
                  if "steady_tok_s" in r else "")
        lines.append(f"| {r['start']} | {r['ready_s']:.1f} s | {compiled} | {r['window_tok_s']:.1f} | "
                     f"{r['window_tok_s'] / eager:.2f}x | {steady} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps({"machine": host, "window_s": args.window, "dtype": args.dtype,
                                                       "results": results}, indent=1))
    (args.out / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
