"""The peers table and its markdown summary, from the rows the driver collected."""
import statistics

HEADER = ("| system | offline gen tok/s | single stream tok/s | ready after (cold) |\n"
          "|---|--:|--:|--:|")
DEFINITIONS = (
    "offline gen tok/s: generated tokens of all offline requests / wall time of one call that submits them "
    "all at once. Single stream tok/s: new tokens / wall time from submitting one request alone to its last "
    "token (prefill included), median over its prompts. Ready after (cold): wall time from starting the "
    "process (before its imports) until the answer to a first one-token request; one-off steps (export) "
    "are not in it and are named beside it. Warm-up runs after that and is not timed; an engine that "
    "compiles in the background is timed once it reports being done, after a second warm-up.")


def table_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['label']} | could not run: {row['error'].replace('|', '/')} | - | - |"
    ready = f"{row['ready_s']:.1f} s"
    if row.get("one_off"):
        ready += f" (after a {row['one_off']['seconds']:.0f} s one-off {row['one_off']['what']})"
    return f"| {row['label']} | {row['offline_tok_s']:.0f} | {row['single_tok_s']:.0f} | {ready} |"


def table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [table_row(r) for r in rows])


def agreement(ids: list[list[int]], reference: list[list[int]]) -> dict:
    """How far greedy outputs follow the reference's: same first token, and the mean common prefix."""
    def common(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    prefixes = [common(a, b) for a, b in zip(ids, reference)]
    return {"first_token_equal": sum(p > 0 for p in prefixes), "requests": len(prefixes),
            "mean_common_prefix": statistics.fmean(prefixes) if prefixes else 0.0}


def markdown(rows: list[dict], info: dict) -> str:
    machine, settings = info["machine"], info["settings"]
    lines = ["## splitfuse and the serving engines a user could pick instead", "", table(rows), "",
             f"Machine: {machine['cpu']}; {machine['cores']} cores, {machine['memory_gib']} GiB; "
             f"{machine['isa']}. Precision: {settings['dtype']} for every system (what splitfuse's "
             f"dtype=\"auto\" resolves to here: {settings['auto_dtype']}); {settings['threads']} threads. "
             f"Load average (1 min) at start / end: {info['load_average'][0]:.1f} / {info['load_average'][1]:.1f}.", "",
             f"Workload (seed {settings['seed']}): {settings['workload']}", "", DEFINITIONS, "",
             "How each ran:"]
    for row in rows:
        if "error" in row:
            lines.append(f"- {row['label']}: did not run (the log's end is in peers.json)")
            continue
        settle = (f"; after warm-up, timing waited {row['settle_seconds']:.0f} s more for its background "
                  f"compilation to finish" if row["settle_seconds"] > 1 else "")
        lines.append(f"- {row['label']}: {row['version']}, {row['how']}{settle}")
        if "agreement" in row:
            a = row["agreement"]
            lines.append(f"  greedy offline tokens vs {info['reference']}'s: first token equal in "
                         f"{a['first_token_equal']}/{a['requests']} requests, common prefix "
                         f"{a['mean_common_prefix']:.1f} tokens on average")
        if row.get("wrong_lengths"):
            lines.append(f"  {row['wrong_lengths']} requests did not get exactly the asked number of tokens")
    lines += ["", "One-off steps and setup: " + "; ".join(info["one_off"]), "",
              f"Command: `{info['command']}` at splitfuse commit {info['commit']}; {info['wall_seconds']} s in all."]
    return "\n".join(lines)
