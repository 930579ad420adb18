"""`make bench`: FastGen's serving benchmark on this machine, all backends in one run.

    python -P -m splitfuse.benchmarks.run            # reduced sweep, about 10 minutes on 2 CPU cores
    python -P -m splitfuse.benchmarks.run --quick    # smoke run: two workloads, 1 and 4 clients, a few requests
    python -P -m splitfuse.benchmarks.run --from-json splitfuse/benchmarks/results/results.json --sla-gen-slowdown 4
                                        # re-derive SLA, tables and plots from a saved run

For each scheduler ("splitfuse", "prefill-first") a `splitfuse serve` deployment is started in
turn with the same engine options; for each workload it runs a closed-loop sweep of concurrent
streaming clients, then an offline batch (every request at once). Hugging Face transformers runs
the same offline batches in this process at the same dtype. The SLA of each workload is the
single-request speed measured in this run divided by stated slowdown factors. Writes
results.json, summary.md and three PNG plots under splitfuse/benchmarks/results/, and prints the markdown."""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import splitfuse
from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.config import SCHEDULERS

from . import hf_baseline, plots, report, serving, workload
from .metrics import Offline
from .report import PresetResults

RESULTS = Path(__file__).parent / "results"
# Sizes of a run: `make bench` (about 10 minutes on 2 cores), --quick (a smoke test), --full (FastGen's sweep).
DEFAULT = dict(presets=list(workload.PRESETS), clients=[1, 4, 16], requests_per_client=2, min_requests=4,
               offline_requests=16)
QUICK = dict(presets=["p2600-g128", "p128-g128"], clients=[1, 4], requests_per_client=1, min_requests=2,
             offline_requests=4)
FULL = dict(presets=list(workload.PRESETS), clients=[1, 2, 4, 8, 16, 32], requests_per_client=4, min_requests=8,
            offline_requests=32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke run: about 3 minutes")
    size.add_argument("--full", action="store_true", help="FastGen's sweep, 1 to 32 clients: about half an hour")
    parser.add_argument("--presets", nargs="+", choices=list(workload.PRESETS), help="workloads")
    parser.add_argument("--clients", type=int, nargs="+", help="concurrency levels; must include 1 (the SLA)")
    parser.add_argument("--requests-per-client", type=int, help="requests per client at each level")
    parser.add_argument("--min-requests", type=int, help="requests at least, at each level")
    parser.add_argument("--offline-requests", type=int, help="requests in each offline batch")
    parser.add_argument("--schedulers", nargs="+", choices=SCHEDULERS, default=list(SCHEDULERS))
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--hf-batch", type=int, default=None, help="static batch size (default: the most clients)")
    parser.add_argument("--model", default=None, help="a local model directory (default: the bundled one)")
    parser.add_argument("--dtype", default="bf16", help="for every backend")
    parser.add_argument("--token-budget", type=int, default=None, help="engine token budget (default: the engine's)")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (saves its warm-up per server)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="shard the served model over this many ranks (processes, on GPU devices)")
    parser.add_argument("--sla-prompt-slowdown", type=float, default=report.SLA_PROMPT_SLOWDOWN,
                        help="S_prompt = single-request prompt tokens/s divided by this")
    parser.add_argument("--sla-gen-slowdown", type=float, default=report.SLA_GEN_SLOWDOWN,
                        help="S_gen = single-request generated tokens/s divided by this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", type=Path, default=None, help="re-report a saved results.json")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL if args.full else DEFAULT).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if 1 not in args.clients:
        parser.error("--clients must include 1: the SLA is derived from the single-request speed")
    args.clients = sorted(set(args.clients))
    return args


def machine() -> dict:
    import torch
    import transformers
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(memory),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}  # transformers here; a worker takes cores // replicas


def engine_options(args: argparse.Namespace) -> dict:
    options = {"dtype": args.dtype, "eager": args.eager, "background_compile": False,  # measure compiled speed
               "tensor_parallel_size": args.tensor_parallel_size}
    if args.token_budget is not None:
        options["token_budget"] = args.token_budget
    return options


def run_scheduler(scheduler: str, args: argparse.Namespace, workloads: dict[str, list[workload.Request]],
                  corpus: list[int], results: dict[str, PresetResults]) -> None:
    """One deployment: the sweep and the offline batch of every workload."""
    start = time.perf_counter()
    with splitfuse.serve(args.model, scheduler=scheduler, **engine_options(args)) as deployment:
        print(f"{scheduler}: server ready in {time.perf_counter() - start:.0f}s at {deployment.address}", flush=True)
        serving.warm_up(deployment.address, corpus)
        for name, requests in workloads.items():
            print(f"  {name}", flush=True)
            results[name].serving[scheduler] = serving.sweep(deployment.address, requests, args.clients,
                                                             args.requests_per_client, args.min_requests)
            offline = requests[:args.offline_requests]
            timelines = serving.run(deployment.address, offline, len(offline))
            result = Offline.from_timelines(scheduler, timelines, "splitfuse serve, every request at once, streaming")
            results[name].offline[scheduler] = result
            print(f"    offline: {len(offline)} requests in {result.seconds:.1f}s", flush=True)


def measure(args: argparse.Namespace) -> tuple[dict[str, PresetResults], dict]:
    model_dir = str(args.model or bundled_model_dir())
    corpus = workload.corpus_ids(model_dir)
    count = max(serving.requests_needed(args.clients, args.requests_per_client, args.min_requests),
                args.offline_requests)
    presets = [workload.PRESETS[p] for p in args.presets]
    workloads = {p.name: workload.make_workload(p, count, corpus, args.seed) for p in presets}
    results = {p.name: PresetResults(p) for p in presets}
    for scheduler in args.schedulers:
        run_scheduler(scheduler, args, workloads, corpus, results)
    if not args.no_hf:
        print("transformers (offline, in this process)", flush=True)
        offline = {name: w[:args.offline_requests] for name, w in workloads.items()}
        for name, backends in hf_baseline.run(model_dir, args.dtype, offline,
                                              args.hf_batch or max(args.clients)).items():
            results[name].offline.update(backends)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "from_json", "quick", "full")}
    settings.update(engine_options(args), length_scale=workload.FASTGEN_SCALE)
    return results, {"machine": machine(), "settings": settings}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.from_json:
        results, info = report.load(args.from_json)
        info["settings"].update(sla_prompt_slowdown=args.sla_prompt_slowdown, sla_gen_slowdown=args.sla_gen_slowdown)
    else:
        results, info = measure(args)
    report.derive_slas(results, args.sla_prompt_slowdown, args.sla_gen_slowdown)
    args.out.mkdir(parents=True, exist_ok=True)
    info["wall_seconds"] = round(time.perf_counter() - started)
    if not args.from_json:
        report.save(args.out / "results.json", results, info)
    text = report.markdown(results, info)
    (args.out / "summary.md").write_text(text + "\n")
    written = ([] if args.from_json else [args.out / "results.json"]) + [args.out / "summary.md"]
    written += plots.all_plots(results, args.out)
    print("\n" + text + "\n")
    print(f"wrote {', '.join(str(p) for p in written)} ({info['wall_seconds']}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
