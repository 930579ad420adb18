"""What `deterministic` costs: the peers' workload through `splitfuse.pipeline()` with it off and on, in
alternating rounds on two workers (compiled, each compiled before its first round): offline (48 prompts of
about 384 random ids, 48 new tokens, greedy, all at once) and single stream (32-id prompts, 64 new tokens,
one at a time).

    python -P -m splitfuse.benchmarks.deterministic [--rounds 2] [--dtype auto]

Writes benchmarks/results/deterministic.md."""
import argparse
import time
from pathlib import Path

import splitfuse
from splitfuse.benchmarks.peers import workload as peers_workload
from splitfuse.benchmarks.peers.run import machine
from splitfuse.compiled.bundled import bundled_model_dir

RESULTS = Path(__file__).parent / "results"


def generated_per_second(pipe, prompts: list[list[int]], new_tokens: int, one_at_a_time: bool) -> float:
    start = time.perf_counter()
    answers = [a for p in prompts for a in pipe([p], max_new_tokens=new_tokens, ignore_eos=True)] if one_at_a_time \
        else pipe(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    return sum(a.generated_length for a in answers) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each setting, alternating")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    work = peers_workload.build(bundled_model_dir())
    phases = {"offline": (work["offline"], work["offline_new_tokens"], False),
              "single stream": (work["single"], work["single_new_tokens"], True)}
    rates = {(phase, on): [] for phase in phases for on in (False, True)}
    pipes = {on: splitfuse.pipeline(dtype=args.dtype, background_compile=False, enable_prefix_caching=False,
                                    deterministic=on) for on in (False, True)}
    try:
        for round_ in range(args.rounds):
            for on, pipe in pipes.items():
                for phase, (prompts, new_tokens, one_at_a_time) in phases.items():
                    rates[phase, on].append(generated_per_second(pipe, prompts, new_tokens, one_at_a_time))
                    print(f"round {round_ + 1}, deterministic {'on' if on else 'off'}, {phase}: "
                          f"{rates[phase, on][-1]:.1f} generated tok/s", flush=True)
    finally:
        for pipe in pipes.values():
            pipe.close()
    mean = {key: sum(r) / len(r) for key, r in rates.items()}
    info = machine()
    lines = ["# What `deterministic` costs (`python -P -m splitfuse.benchmarks.deterministic`)", "",
             f"{info['cpu']} ({info['isa']}), dtype {args.dtype}; {args.rounds} alternating rounds of each setting.", "",
             "| workload | off, generated tok/s | on, generated tok/s | on / off |", "|---|--:|--:|--:|",
             *(f"| {phase} | {mean[phase, False]:.1f} ({', '.join(f'{x:.1f}' for x in rates[phase, False])}) | "
               f"{mean[phase, True]:.1f} ({', '.join(f'{x:.1f}' for x in rates[phase, True])}) | "
               f"**{mean[phase, True] / mean[phase, False]:.2f}x** |" for phase in phases)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "deterministic.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
