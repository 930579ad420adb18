"""What a JSON Schema on every request costs: the peers' offline workload (48 prompts of about 384 random
token ids, 48 new tokens, greedy) through `splitfuse.pipeline()`, free and then with every request held to a
JSON Schema, in alternating rounds on one worker (compiled, the compile cache loaded before the first round).

    python -P -m splitfuse.benchmarks.structured [--rounds 2] [--dtype auto]

The schema cannot be complete within 48 tokens, so both kinds generate the same number of tokens. Writes benchmarks/results/structured.md."""
import argparse
import time
from pathlib import Path

import splitfuse
from splitfuse.benchmarks.peers import workload as peers_workload
from splitfuse.benchmarks.peers.run import machine
from splitfuse.compiled.bundled import bundled_model_dir

RESULTS = Path(__file__).parent / "results"
# At least 48 words of at least one character: no answer can be complete before 48 tokens, so every request
# generates as many tokens as a free one does.
SCHEMA = {"type": "object", "properties": {"words": {"type": "array", "minItems": 48,
                                                     "items": {"type": "string", "minLength": 1, "maxLength": 16}}},
          "required": ["words"], "additionalProperties": False}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each kind, alternating")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    work = peers_workload.build(bundled_model_dir())
    prompts, new_tokens = work["offline"], work["offline_new_tokens"]
    kinds = {"free": {}, "json schema": {"structured": {"json": SCHEMA}}}
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    with splitfuse.pipeline(dtype=args.dtype, background_compile=False, enable_prefix_caching=False) as pipe:
        pipe(prompts[:4], max_new_tokens=4, **kinds["json schema"])  # warm: the grammar's tokenizer is built
        for round_ in range(args.rounds):
            for kind, extra in kinds.items():
                start = time.perf_counter()
                answers = pipe(prompts, max_new_tokens=new_tokens, **extra)
                seconds = time.perf_counter() - start
                rates[kind].append(sum(a.generated_length for a in answers) / seconds)
                print(f"round {round_ + 1}, {kind}: {rates[kind][-1]:.1f} generated tok/s "
                      f"({sum(a.generated_length for a in answers)} tokens in {seconds:.1f} s)", flush=True)
    free, constrained = (sum(r) / len(r) for r in rates.values())
    info = machine()
    lines = [f"# Structured output's cost (`python -P -m splitfuse.benchmarks.structured`)", "",
             f"{info['cpu']} ({info['isa']}), dtype {args.dtype}; {len(prompts)} prompts of ~{peers_workload.PROMPT_MEAN} random ids, "
             f"{new_tokens} new tokens, greedy, {args.rounds} alternating rounds each.", "",
             "| requests | generated tok/s (mean) | rounds |", "|---|--:|---|",
             *(f"| {kind} | {sum(r) / len(r):.1f} | {', '.join(f'{x:.1f}' for x in r)} |" for kind, r in rates.items()),
             "", f"JSON Schema on every request: **{constrained / free:.2f}x** the free throughput."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
